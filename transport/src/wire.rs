//! Ferry's wire protocol: frames, page batches and control messages. Pure code: no sockets, no
//! clock. Backends read bytes and hand them here; every length read from the wire is checked
//! against a cap before it is used to size anything.
//!
//! # Frames
//!
//! Every frame starts with a 16-byte header (all integers little endian):
//!
//! ```text
//!  0       4    5    6        8             12            16
//!  +-------+----+----+--------+-------------+-------------+
//!  | "FERY"| ver|kind| flags  | payload len | CRC32(0..12)|  payload ...
//!  +-------+----+----+--------+-------------+-------------+
//! ```
//!
//! The header CRC catches a desynchronised or corrupted stream before a bogus length is trusted;
//! the length is then capped per kind ([`max_payload_len`]). Versions are negotiated in the
//! handshake; a header whose version is outside [`VERSION_MIN`]..=[`VERSION_MAX`] is refused.
//!
//! | kind | payload |
//! |---|---|
//! | `ClientHello` (1), `ServerChallenge` (2), `ClientProof` (3), `Accept` (4), `Reject` (5) | handshake, see [`crate::handshake`] |
//! | `Control` (16) | opaque bytes of the layer above (migration control), at most 1 MiB |
//! | `PageBatch` (17) | [`BatchHeader`], then the data section |
//! | `BatchAck` (18) | [`Ack`] |
//! | `Goodbye` (19) | empty: orderly end of the channel |
//! | `Abort` (20) | [`AbortMsg`]: the peer gives up, with a reason |
//!
//! # Page batches
//!
//! A batch is a list of runs of guest pages (GPA, page count), at most [`MAX_BATCH_PAGES`] pages in
//! all. A bitmap with one bit per page says which pages carry data; the others are zero pages and
//! cost one bit. The data section holds the data pages in order, either raw (`Encoding::Raw`, read
//! by the receiver straight into guest memory) or as one zstd frame (`Encoding::Zstd`), decided by
//! the sender batch by batch.
//!
//! ```text
//!  batch id u64 | round u32 | run count u16 | encoding u8 | flags u8 | total pages u32 | data len u32
//!  runs: run count x (gpa u64, pages u32)
//!  bitmap: ceil(total pages / 8) bytes, bit i of byte i/8 set = page i carries data
//!  data: data len bytes
//! ```
//!
//! # Sealed frames (protocol version 2)
//!
//! After the handshake every frame is sealed with the channel's keys ([`crate::crypto`]) unless
//! both ends run with encryption `off`, where frames are exactly as described above. A sealed
//! frame keeps the header in clear (it is the associated data of every part, and its length
//! counts the tags); its payload is split into parts, each sealed under its own nonce
//! (sequence number of the frame, part index) and each with a 16-byte tag `T`:
//!
//! ```text
//!  Control / BatchAck / Abort / Goodbye:  payload | T0
//!  PageBatch:  fixed (24) | T0 | runs + bitmap | T1 | T2 ... T(n+1) | data segment 1 ... n
//! ```
//!
//! A batch's data segments are its data pages grouped as they lie in memory: within each run,
//! every maximal stretch of consecutive data pages is one segment ([`data_segments`]); a zstd
//! batch has one segment, its compressed data. The receiver opens the fixed part and then the
//! runs and bitmap before it touches memory (the batch's round is checked against the receiver's
//! before any page is written), then reads the data section a few segments at a time (about
//! 128 KiB) into a buffer of its own and opens each raw segment out of place, straight into the
//! guest pages it belongs to: a guest page is written once, by the open. A failed tag fails the
//! batch, the channel and the migration, before commit: whatever the open wrote into pages that
//! the destination does not own yet is discarded with them.
//!
//! # Sequence on one channel
//!
//! ```text
//!  source (client)                          destination (server)
//!     | ClientHello(versions, caps, session, channel, nonce_c) |
//!     |------------------------------------------------------->|
//!     |  ServerChallenge(version, caps, nonce_s, MAC_s)        |
//!     |<-------------------------------------------------------|
//!     |  ClientProof(MAC_c)                                    |
//!     |------------------------------------------------------->|
//!     |  Accept  (or Reject(reason))                           |
//!     |<-------------------------------------------------------|
//!     |  Control / PageBatch ...                               |
//!     |------------------------------------------------------->|
//!     |  BatchAck(id) / Control ...                            |
//!     |<-------------------------------------------------------|
//!     |  Goodbye  (or Abort(reason) from either side)          |
//! ```

use crate::error::WireError;

/// Frame magic.
pub const MAGIC: [u8; 4] = *b"FERY";
/// Oldest protocol version this build speaks (2: sealed frames, encryption mode in the hello,
/// keyed page hashes; version 1 authenticated the handshake only and is refused).
pub const VERSION_MIN: u8 = 2;
/// Newest protocol version this build speaks.
pub const VERSION_MAX: u8 = 2;
/// Length of a frame header.
pub const HEADER_LEN: usize = 16;
/// Guest page size carried by the protocol.
pub const PAGE_SIZE: usize = ferry_memory::PAGE_SIZE;
/// Most pages one batch may carry (4 MiB of data).
pub const MAX_BATCH_PAGES: u32 = 1024;
/// Most runs one batch may carry.
pub const MAX_BATCH_RUNS: u16 = 1024;
/// Most bytes in a control message.
pub const MAX_CONTROL_LEN: u32 = 1 << 20;
/// Most bytes in a handshake or abort message.
pub const MAX_SMALL_LEN: u32 = 1024;
/// Length of the fixed part of a batch header.
pub const BATCH_FIXED_LEN: usize = 24;
/// Length of one encoded run.
pub const RUN_LEN: usize = 12;
/// Length of an encoded [`Ack`].
pub const ACK_LEN: usize = 16;

/// Length of a sealed part's authentication tag.
pub const TAG_LEN: usize = 16;

/// Most tag bytes a sealed page batch carries: fixed part, runs and bitmap, and a segment per page.
pub const MAX_BATCH_TAGS_LEN: u32 = ((MAX_BATCH_PAGES as usize + 2) * TAG_LEN) as u32;

/// The data segments of a batch, as (run index, first page in the run, pages): within each run,
/// every maximal stretch of consecutive data pages. A sealed raw batch seals each on its own.
pub fn data_segments(h: &BatchHeader) -> Vec<(usize, u32, u32)> {
    let mut out = Vec::new();
    let mut i = 0usize;
    for (ri, r) in h.runs.iter().enumerate() {
        let mut open: Option<(u32, u32)> = None;
        for p in 0..r.pages {
            if h.is_data(i) {
                match &mut open {
                    Some((_, n)) => *n += 1,
                    None => open = Some((p, 1)),
                }
            } else if let Some((f, n)) = open.take() {
                out.push((ri, f, n));
            }
            i += 1;
        }
        if let Some((f, n)) = open.take() {
            out.push((ri, f, n));
        }
    }
    out
}

/// Most bytes a zstd data section may take for `raw` bytes of pages (zstd's own bound, rounded up).
pub fn zstd_bound(raw: usize) -> usize {
    raw + (raw >> 7) + 512
}

/// Largest payload of a page batch frame.
pub fn max_batch_payload() -> u32 {
    let pages = MAX_BATCH_PAGES as usize;
    (BATCH_FIXED_LEN + MAX_BATCH_RUNS as usize * RUN_LEN + pages.div_ceil(8) + zstd_bound(pages * PAGE_SIZE)) as u32
}

/// Kind of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameKind {
    /// Handshake, client to server.
    ClientHello = 1,
    /// Handshake, server to client.
    ServerChallenge = 2,
    /// Handshake, client to server.
    ClientProof = 3,
    /// Handshake accepted.
    Accept = 4,
    /// Handshake refused, with a reason.
    Reject = 5,
    /// Opaque control message of the layer above.
    Control = 16,
    /// Page batch.
    PageBatch = 17,
    /// Acknowledgement of a page batch.
    BatchAck = 18,
    /// Orderly end of the channel.
    Goodbye = 19,
    /// The peer gives up.
    Abort = 20,
}

impl FrameKind {
    /// Decode a kind byte.
    pub fn from_u8(v: u8) -> Result<Self, WireError> {
        Ok(match v {
            1 => Self::ClientHello,
            2 => Self::ServerChallenge,
            3 => Self::ClientProof,
            4 => Self::Accept,
            5 => Self::Reject,
            16 => Self::Control,
            17 => Self::PageBatch,
            18 => Self::BatchAck,
            19 => Self::Goodbye,
            20 => Self::Abort,
            other => return Err(WireError::UnknownKind(other)),
        })
    }
}

/// The most payload bytes a frame of this kind may announce (tags of a sealed frame included).
pub fn max_payload_len(kind: FrameKind) -> u32 {
    let tag = TAG_LEN as u32;
    match kind {
        FrameKind::ClientHello
        | FrameKind::ServerChallenge
        | FrameKind::ClientProof
        | FrameKind::Accept
        | FrameKind::Reject => MAX_SMALL_LEN,
        FrameKind::Abort => MAX_SMALL_LEN + tag,
        FrameKind::Control => MAX_CONTROL_LEN + tag,
        FrameKind::PageBatch => max_batch_payload() + MAX_BATCH_TAGS_LEN,
        FrameKind::BatchAck => ACK_LEN as u32 + tag,
        FrameKind::Goodbye => tag,
    }
}

/// A decoded frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// Protocol version of this frame.
    pub version: u8,
    /// What the payload is.
    pub kind: FrameKind,
    /// Kind-specific flags (none defined yet; must be zero).
    pub flags: u16,
    /// Payload length (already checked against [`max_payload_len`]).
    pub len: u32,
}

impl FrameHeader {
    /// A header of this build's version.
    pub fn new(kind: FrameKind, len: usize) -> Self {
        Self { version: VERSION_MAX, kind, flags: 0, len: len as u32 }
    }

    /// Encode into 16 bytes.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&MAGIC);
        b[4] = self.version;
        b[5] = self.kind as u8;
        b[6..8].copy_from_slice(&self.flags.to_le_bytes());
        b[8..12].copy_from_slice(&self.len.to_le_bytes());
        let crc = crc32fast::hash(&b[0..12]);
        b[12..16].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decode and check 16 bytes: magic, CRC, version, kind, flags and the length cap.
    pub fn decode(b: &[u8; HEADER_LEN]) -> Result<Self, WireError> {
        if b[0..4] != MAGIC {
            return Err(WireError::BadMagic);
        }
        let crc = u32::from_le_bytes([b[12], b[13], b[14], b[15]]);
        if crc != crc32fast::hash(&b[0..12]) {
            return Err(WireError::HeaderChecksum);
        }
        let version = b[4];
        if !(VERSION_MIN..=VERSION_MAX).contains(&version) {
            return Err(WireError::UnsupportedVersion(version));
        }
        let kind = FrameKind::from_u8(b[5])?;
        let flags = u16::from_le_bytes([b[6], b[7]]);
        if flags != 0 {
            return Err(WireError::UnknownFlags(flags));
        }
        let len = u32::from_le_bytes([b[8], b[9], b[10], b[11]]);
        let cap = max_payload_len(kind);
        if len > cap {
            return Err(WireError::TooLong { kind, len, cap });
        }
        Ok(Self { version, kind, flags, len })
    }
}

/// Encode a whole small frame (header + payload).
pub fn encode_frame(kind: FrameKind, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(HEADER_LEN + payload.len());
    v.extend_from_slice(&FrameHeader::new(kind, payload.len()).encode());
    v.extend_from_slice(payload);
    v
}

/// A run of guest pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PageRun {
    /// Guest-physical address of the first page (page aligned).
    pub gpa: u64,
    /// Number of pages (at least one).
    pub pages: u32,
}

impl PageRun {
    /// Bytes covered by the run.
    pub fn len(&self) -> usize {
        self.pages as usize * PAGE_SIZE
    }

    /// True if the run holds no page (never valid on the wire).
    pub fn is_empty(&self) -> bool {
        self.pages == 0
    }
}

/// How the data section of a batch is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Encoding {
    /// Data pages as they are.
    Raw = 0,
    /// Data pages concatenated and compressed as one zstd frame.
    Zstd = 1,
}

/// Batch flag: the destination is known to hold zeros for every page of this batch (first copy of
/// these pages into fresh memory), so zero pages need no write at all.
pub const BATCH_DEST_ZEROED: u8 = 1;

/// Header of a page batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchHeader {
    /// Sender-chosen id, echoed in the [`Ack`].
    pub id: u64,
    /// Pre-copy round this batch belongs to.
    pub round: u32,
    /// Encoding of the data section.
    pub encoding: Encoding,
    /// Batch flags (`BATCH_*`).
    pub flags: u8,
    /// The pages, in order.
    pub runs: Vec<PageRun>,
    /// One bit per page: set = data page, clear = zero page.
    pub data_map: Vec<u8>,
    /// Bytes of the data section on the wire.
    pub data_len: u32,
}

/// The fixed part of a batch header, decoded and checked alone so that the variable part's length
/// is known (and capped) before it is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchFixed {
    /// Batch id.
    pub id: u64,
    /// Round.
    pub round: u32,
    /// Number of runs.
    pub nruns: u16,
    /// Encoding.
    pub encoding: Encoding,
    /// Flags.
    pub flags: u8,
    /// Total pages over all runs.
    pub total_pages: u32,
    /// Data section length.
    pub data_len: u32,
}

impl BatchFixed {
    /// Decode and check the fixed 24 bytes.
    pub fn decode(b: &[u8]) -> Result<Self, WireError> {
        if b.len() < BATCH_FIXED_LEN {
            return Err(WireError::Truncated);
        }
        let id = u64::from_le_bytes(b[0..8].try_into().map_err(|_| WireError::Truncated)?);
        let round = u32::from_le_bytes(b[8..12].try_into().map_err(|_| WireError::Truncated)?);
        let nruns = u16::from_le_bytes([b[12], b[13]]);
        let encoding = match b[14] {
            0 => Encoding::Raw,
            1 => Encoding::Zstd,
            e => return Err(WireError::UnknownEncoding(e)),
        };
        let flags = b[15];
        if flags & !BATCH_DEST_ZEROED != 0 {
            return Err(WireError::UnknownFlags(flags as u16));
        }
        let total_pages = u32::from_le_bytes(b[16..20].try_into().map_err(|_| WireError::Truncated)?);
        let data_len = u32::from_le_bytes(b[20..24].try_into().map_err(|_| WireError::Truncated)?);
        if nruns == 0 || nruns > MAX_BATCH_RUNS {
            return Err(WireError::BadBatch("run count out of range"));
        }
        if total_pages == 0 || total_pages > MAX_BATCH_PAGES {
            return Err(WireError::BadBatch("page count out of range"));
        }
        if u32::from(nruns) > total_pages {
            return Err(WireError::BadBatch("more runs than pages"));
        }
        if data_len as usize > zstd_bound(total_pages as usize * PAGE_SIZE) {
            return Err(WireError::BadBatch("data section too long"));
        }
        Ok(Self { id, round, nruns, encoding, flags, total_pages, data_len })
    }

    /// Length of the variable part (runs + bitmap) that follows the fixed part.
    pub fn var_len(&self) -> usize {
        self.nruns as usize * RUN_LEN + (self.total_pages as usize).div_ceil(8)
    }

    /// Payload length the frame header must announce for this batch.
    pub fn frame_len(&self) -> usize {
        BATCH_FIXED_LEN + self.var_len() + self.data_len as usize
    }
}

impl BatchHeader {
    /// Total pages in the batch.
    pub fn total_pages(&self) -> u32 {
        self.runs.iter().map(|r| r.pages).sum()
    }

    /// Pages that carry data.
    pub fn data_pages(&self) -> u32 {
        self.data_map.iter().map(|b| b.count_ones()).sum()
    }

    /// Is page `i` (0-based over all runs) a data page?
    pub fn is_data(&self, i: usize) -> bool {
        self.data_map[i / 8] & (1 << (i % 8)) != 0
    }

    /// Bytes of the data pages once decoded.
    pub fn raw_len(&self) -> usize {
        self.data_pages() as usize * PAGE_SIZE
    }

    /// Encode the header (fixed part, runs, bitmap) into `out`; the caller appends the data.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.id.to_le_bytes());
        out.extend_from_slice(&self.round.to_le_bytes());
        out.extend_from_slice(&(self.runs.len() as u16).to_le_bytes());
        out.push(self.encoding as u8);
        out.push(self.flags);
        out.extend_from_slice(&self.total_pages().to_le_bytes());
        out.extend_from_slice(&self.data_len.to_le_bytes());
        for r in &self.runs {
            out.extend_from_slice(&r.gpa.to_le_bytes());
            out.extend_from_slice(&r.pages.to_le_bytes());
        }
        out.extend_from_slice(&self.data_map);
    }

    /// Length of the encoded header.
    pub fn encoded_len(&self) -> usize {
        BATCH_FIXED_LEN + self.runs.len() * RUN_LEN + self.data_map.len()
    }

    /// Decode the variable part after `fixed` and check the whole header for consistency.
    pub fn decode_var(fixed: &BatchFixed, var: &[u8]) -> Result<Self, WireError> {
        if var.len() != fixed.var_len() {
            return Err(WireError::Truncated);
        }
        let mut runs = Vec::with_capacity(fixed.nruns as usize);
        let mut sum: u32 = 0;
        for chunk in var[..fixed.nruns as usize * RUN_LEN].chunks_exact(RUN_LEN) {
            let gpa = u64::from_le_bytes(chunk[0..8].try_into().map_err(|_| WireError::Truncated)?);
            let pages = u32::from_le_bytes(chunk[8..12].try_into().map_err(|_| WireError::Truncated)?);
            if pages == 0 {
                return Err(WireError::BadBatch("empty run"));
            }
            if gpa % PAGE_SIZE as u64 != 0 {
                return Err(WireError::BadBatch("unaligned run"));
            }
            if gpa.checked_add(u64::from(pages) * PAGE_SIZE as u64).is_none() {
                return Err(WireError::BadBatch("run wraps the address space"));
            }
            sum = sum.checked_add(pages).ok_or(WireError::BadBatch("page count overflow"))?;
            runs.push(PageRun { gpa, pages });
        }
        if sum != fixed.total_pages {
            return Err(WireError::BadBatch("runs do not add up to the page count"));
        }
        let data_map = var[fixed.nruns as usize * RUN_LEN..].to_vec();
        let tail_bits = fixed.total_pages % 8;
        if tail_bits != 0 {
            let last = data_map[data_map.len() - 1];
            if last >> tail_bits != 0 {
                return Err(WireError::BadBatch("bitmap bits past the last page"));
            }
        }
        let h = Self {
            id: fixed.id,
            round: fixed.round,
            encoding: fixed.encoding,
            flags: fixed.flags,
            runs,
            data_map,
            data_len: fixed.data_len,
        };
        let raw = h.raw_len();
        match h.encoding {
            Encoding::Raw if fixed.data_len as usize != raw => {
                return Err(WireError::BadBatch("raw data length does not match the bitmap"))
            }
            Encoding::Zstd if raw == 0 || fixed.data_len == 0 => {
                return Err(WireError::BadBatch("compressed batch without data"))
            }
            Encoding::Zstd if fixed.data_len as usize > zstd_bound(raw) => {
                return Err(WireError::BadBatch("compressed data longer than its bound"))
            }
            _ => {}
        }
        Ok(h)
    }
}

/// Acknowledgement of a batch: the receiver has written every page of it into guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ack {
    /// Batch id.
    pub id: u64,
    /// Round of the batch.
    pub round: u32,
    /// Pages written.
    pub pages: u32,
}

impl Ack {
    /// Encode.
    pub fn encode(&self) -> [u8; ACK_LEN] {
        let mut b = [0u8; ACK_LEN];
        b[0..8].copy_from_slice(&self.id.to_le_bytes());
        b[8..12].copy_from_slice(&self.round.to_le_bytes());
        b[12..16].copy_from_slice(&self.pages.to_le_bytes());
        b
    }

    /// Decode.
    pub fn decode(b: &[u8]) -> Result<Self, WireError> {
        if b.len() != ACK_LEN {
            return Err(WireError::Truncated);
        }
        Ok(Self {
            id: u64::from_le_bytes(b[0..8].try_into().map_err(|_| WireError::Truncated)?),
            round: u32::from_le_bytes(b[8..12].try_into().map_err(|_| WireError::Truncated)?),
            pages: u32::from_le_bytes(b[12..16].try_into().map_err(|_| WireError::Truncated)?),
        })
    }
}

/// An abort (or reject) message: a code and a human-readable reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AbortMsg {
    /// Machine-readable reason code (meaning defined by the layer that aborts).
    pub code: u16,
    /// Human-readable reason.
    pub reason: String,
}

impl AbortMsg {
    /// Encode (the reason is cut to fit [`MAX_SMALL_LEN`]).
    pub fn encode(&self) -> Vec<u8> {
        let mut v = self.code.to_le_bytes().to_vec();
        let mut r = self.reason.as_bytes();
        let max = MAX_SMALL_LEN as usize - 2;
        if r.len() > max {
            let mut cut = max;
            while !self.reason.is_char_boundary(cut) {
                cut -= 1;
            }
            r = &r[..cut];
        }
        v.extend_from_slice(r);
        v
    }

    /// Decode (a reason that is not UTF-8 is shown lossily).
    pub fn decode(b: &[u8]) -> Result<Self, WireError> {
        if b.len() < 2 {
            return Err(WireError::Truncated);
        }
        Ok(Self { code: u16::from_le_bytes([b[0], b[1]]), reason: String::from_utf8_lossy(&b[2..]).into_owned() })
    }
}

/// A whole frame decoded from a buffer (used by tests, the fuzz target and buffer-based backends;
/// stream backends decode piece by piece with the same checks).
#[derive(Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    /// A handshake frame, decoded by [`crate::handshake`].
    Handshake(FrameKind, &'a [u8]),
    /// Control message.
    Control(&'a [u8]),
    /// Page batch with its data section.
    Batch(BatchHeader, &'a [u8]),
    /// Acknowledgement.
    Ack(Ack),
    /// Orderly close.
    Goodbye,
    /// Abort.
    Abort(AbortMsg),
}

/// Decode one frame from the front of `buf`. `Ok(None)` means more bytes are needed; on success
/// the frame and the number of bytes it took are returned.
pub fn decode_frame(buf: &[u8]) -> Result<Option<(Frame<'_>, usize)>, WireError> {
    let Some(hb) = buf.get(..HEADER_LEN) else {
        return Ok(None);
    };
    let hb: &[u8; HEADER_LEN] = hb.try_into().map_err(|_| WireError::Truncated)?;
    let h = FrameHeader::decode(hb)?;
    let end = HEADER_LEN + h.len as usize;
    let Some(p) = buf.get(HEADER_LEN..end) else {
        return Ok(None);
    };
    let frame = match h.kind {
        FrameKind::ClientHello
        | FrameKind::ServerChallenge
        | FrameKind::ClientProof
        | FrameKind::Accept
        | FrameKind::Reject => Frame::Handshake(h.kind, p),
        FrameKind::Control => Frame::Control(p),
        FrameKind::BatchAck => Frame::Ack(Ack::decode(p)?),
        FrameKind::Goodbye => Frame::Goodbye,
        FrameKind::Abort => Frame::Abort(AbortMsg::decode(p)?),
        FrameKind::PageBatch => {
            let fixed = BatchFixed::decode(p)?;
            if fixed.frame_len() != p.len() {
                return Err(WireError::BadBatch("frame length does not match the batch"));
            }
            let var = &p[BATCH_FIXED_LEN..BATCH_FIXED_LEN + fixed.var_len()];
            let bh = BatchHeader::decode_var(&fixed, var)?;
            Frame::Batch(bh, &p[BATCH_FIXED_LEN + fixed.var_len()..])
        }
    };
    Ok(Some((frame, end)))
}

/// Encode a whole page batch frame with its data section (tests and buffer-based backends).
pub fn encode_batch_frame(h: &BatchHeader, data: &[u8]) -> Vec<u8> {
    let len = h.encoded_len() + data.len();
    let mut v = Vec::with_capacity(HEADER_LEN + len);
    v.extend_from_slice(&FrameHeader::new(FrameKind::PageBatch, len).encode());
    h.encode_into(&mut v);
    v.extend_from_slice(data);
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_batch() -> impl Strategy<Value = (BatchHeader, Vec<u8>)> {
        (
            any::<u64>(),
            any::<u32>(),
            proptest::collection::vec((0u64..1 << 30, 1u32..8), 1..20),
            any::<u64>(),
            any::<bool>(),
        )
            .prop_map(|(id, round, runs, mapseed, zeroed)| {
                let runs: Vec<PageRun> =
                    runs.into_iter().map(|(p, n)| PageRun { gpa: p * PAGE_SIZE as u64, pages: n }).collect();
                let total: u32 = runs.iter().map(|r| r.pages).sum();
                let mut map = vec![0u8; (total as usize).div_ceil(8)];
                for i in 0..total as usize {
                    if (mapseed.rotate_left(i as u32 % 64) ^ i as u64) & 1 == 1 {
                        map[i / 8] |= 1 << (i % 8);
                    }
                }
                let mut h = BatchHeader {
                    id,
                    round,
                    encoding: Encoding::Raw,
                    flags: if zeroed { BATCH_DEST_ZEROED } else { 0 },
                    runs,
                    data_map: map,
                    data_len: 0,
                };
                let data: Vec<u8> = (0..h.raw_len()).map(|i| (i * 7 + id as usize) as u8).collect();
                h.data_len = data.len() as u32;
                (h, data)
            })
    }

    proptest! {
        #[test]
        fn batch_round_trip((h, data) in arb_batch()) {
            let f = encode_batch_frame(&h, &data);
            let (frame, used) = decode_frame(&f).unwrap().unwrap();
            prop_assert_eq!(used, f.len());
            prop_assert_eq!(frame, Frame::Batch(h.clone(), &data[..]));
            // every strict prefix asks for more bytes, never errors or panics
            for cut in [0, 1, HEADER_LEN, f.len() - 1] {
                prop_assert!(decode_frame(&f[..cut]).unwrap().is_none());
            }
        }

        #[test]
        fn ack_and_abort_round_trip(id in any::<u64>(), round in any::<u32>(), pages in any::<u32>(), code in any::<u16>(), reason in ".{0,40}") {
            let a = Ack { id, round, pages };
            let f = encode_frame(FrameKind::BatchAck, &a.encode());
            prop_assert_eq!(decode_frame(&f).unwrap().unwrap().0, Frame::Ack(a));
            let m = AbortMsg { code, reason };
            let f = encode_frame(FrameKind::Abort, &m.encode());
            prop_assert_eq!(decode_frame(&f).unwrap().unwrap().0, Frame::Abort(m));
        }

        #[test]
        fn control_round_trip(p in proptest::collection::vec(any::<u8>(), 0..2000)) {
            let f = encode_frame(FrameKind::Control, &p);
            prop_assert_eq!(decode_frame(&f).unwrap().unwrap().0, Frame::Control(&p[..]));
        }

        #[test]
        fn garbage_never_panics(b in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode_frame(&b);
        }

        #[test]
        fn any_flipped_header_bit_is_caught((h, data) in arb_batch(), bit in 0usize..128) {
            let mut f = encode_batch_frame(&h, &data);
            f[bit / 8] ^= 1 << (bit % 8);
            prop_assert!(decode_frame(&f).is_err());
        }
    }

    #[test]
    fn length_caps_are_enforced_before_use() {
        let mut h = FrameHeader::new(FrameKind::Control, 0).encode();
        h[8..12].copy_from_slice(&(max_payload_len(FrameKind::Control) + 1).to_le_bytes());
        let crc = crc32fast::hash(&h[0..12]);
        h[12..16].copy_from_slice(&crc.to_le_bytes());
        assert!(matches!(FrameHeader::decode(&h), Err(WireError::TooLong { .. })));
    }

    #[test]
    fn unknown_version_is_refused() {
        let mut h = FrameHeader::new(FrameKind::Goodbye, 0);
        h.version = 9;
        assert_eq!(FrameHeader::decode(&h.encode()), Err(WireError::UnsupportedVersion(9)));
    }

    #[test]
    fn inconsistent_batches_are_refused() {
        let h = BatchHeader {
            id: 1,
            round: 0,
            encoding: Encoding::Raw,
            flags: 0,
            runs: vec![PageRun { gpa: 0, pages: 3 }],
            data_map: vec![0b0000_1011],
            data_len: 3 * PAGE_SIZE as u32,
        };
        // a bit past the last page
        assert!(matches!(decode_frame(&encode_batch_frame(&h, &vec![0; 3 * PAGE_SIZE])), Err(WireError::BadBatch(_))));
        // raw length that does not match the bitmap
        let mut h2 = h.clone();
        h2.data_map = vec![0b011];
        assert!(decode_frame(&encode_batch_frame(&h2, &vec![0; 3 * PAGE_SIZE])).is_err());
        h2.data_len = 2 * PAGE_SIZE as u32;
        assert!(decode_frame(&encode_batch_frame(&h2, &vec![0; 2 * PAGE_SIZE])).unwrap().is_some());
        // unaligned run
        let mut h3 = h2.clone();
        h3.runs[0].gpa = 5;
        assert!(decode_frame(&encode_batch_frame(&h3, &vec![0; 2 * PAGE_SIZE])).is_err());
    }
}
