//! Stream channels (`tcp`, `zstd`): frames on a byte stream.
//!
//! Sending a raw batch is one `writev`: the header from a small buffer, the data pages straight
//! from guest memory (the kernel copies them; no `&[u8]` is formed over live guest memory).
//! Receiving a raw batch reads the header, then `readv`s the data pages straight to their GPAs.
//! With zstd the data pages are copied (volatile) into a staging buffer, compressed as one frame,
//! and sent compressed only if that saves at least 1/8; the receiver decompresses into staging
//! and scatters. Memory per channel is bounded by a few batch-sized buffers.
//!
//! Sealed channels (`aead`, `integrity`; [`crate::crypto`]) seal every frame. Sending with
//! `aead`, each segment of data pages is encrypted straight from guest memory into the staging
//! buffer (one pass over the guest pages: `Sealer::seal_from_guest`, which replaced a volatile
//! copy followed by an in-place seal, the copy being 0.13 CPU-s of a 1.28 GB migration); with
//! `integrity` the pages are copied (volatile) and tagged there (the tag must cover exactly the
//! bytes sent); zstd compresses first, then seals. Header, tags and staging go in one `writev`.
//! Receiving, the batch header is opened before any memory is touched (its round admitted by
//! the sink); the data section is then taken about 128 KiB (whole segments) at a time. With
//! `aead` the kernel reads the ciphertext straight into the guest pages it belongs to and each
//! segment is opened (decrypted) in place while it is in cache: the kernel's copy writes cold
//! memory without reading it first, where AES code writing cold guest pages reads each line
//! before writing it (opening out of place from our buffer into the guest cost 0.1 CPU-s more
//! per 1.28 GB, measured 2026-12-01; reading a whole 1 MiB batch before opening it made the
//! open CPU 1.4x). A failed tag fails the batch and the channel: the migration aborts before
//! commit, and the destination memory it wrote (not yet the guest's) is discarded with it.
//! With `integrity` the data is read into our buffer, its tag checked, then copied in. A failed
//! tag fails the receive with [`TransportError::Unauthenticated`].

use std::io::{self, Read};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;

use crate::channel::{check_data_map, check_send_request, ChannelRx, ChannelTx, Incoming, ReceivedBatch, SentBatch};
use crate::crypto::Sealer;
use crate::error::{Result, TransportError, WireError};
use crate::wire::{
    data_segments, zstd_bound, AbortMsg, Ack, BatchFixed, BatchHeader, Encoding, FrameHeader, FrameKind, PageRun,
    BATCH_DEST_ZEROED, BATCH_FIXED_LEN, HEADER_LEN, MAX_CONTROL_LEN, PAGE_SIZE,
};
use ferry_memory::volatile::{copy_from_guest, page_is_zero};
use ferry_memory::{MemorySink, MemorySource};

/// Most iovecs passed to one writev/readv (Linux IOV_MAX).
const IOV_MAX: usize = 1024;

/// A sealed batch's data section is read (and opened) this many bytes at a time, or one segment
/// if that is longer: small enough that the ciphertext is still in cache when it is opened
/// (reading a whole 1 MiB batch first made the open run at half its speed, measured
/// 2026-12-01).
const OPEN_CHUNK: usize = 128 << 10;

/// Compress only if it saves at least 1/8 of the data.
fn worth_compressing(raw: usize, compressed: usize) -> bool {
    compressed <= raw - raw / 8
}

/// Step `iov` (from index `start`) past `done` bytes that a partial readv/writev moved.
fn advance(iov: &mut [libc::iovec], start: &mut usize, mut done: usize) {
    while done > 0 {
        let v = &mut iov[*start];
        if done >= v.iov_len {
            done -= v.iov_len;
            v.iov_len = 0;
            *start += 1;
        } else {
            // SAFETY: done < iov_len, so the new base stays inside the same buffer.
            v.iov_base = unsafe { (v.iov_base as *mut u8).add(done) } as *mut libc::c_void;
            v.iov_len -= done;
            done = 0;
        }
    }
}

/// Write every byte described by `iov`, resuming after partial writes.
fn writev_all(fd: i32, iov: &mut [libc::iovec]) -> io::Result<usize> {
    let mut total = 0;
    let mut start = 0;
    while start < iov.len() {
        if iov[start].iov_len == 0 {
            start += 1;
            continue;
        }
        let n = (iov.len() - start).min(IOV_MAX);
        // SAFETY: every iovec points at memory valid for reads of iov_len bytes (a local buffer,
        // or guest memory under the MemorySource contract); the kernel only reads it.
        let r = unsafe { libc::writev(fd, iov[start..].as_ptr(), n as i32) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        total += r as usize;
        advance(iov, &mut start, r as usize);
    }
    Ok(total)
}

/// Fill every byte described by `iov`, resuming after partial reads. EOF is `Truncated`.
fn readv_all(fd: i32, iov: &mut [libc::iovec]) -> Result<()> {
    let mut start = 0;
    while start < iov.len() {
        if iov[start].iov_len == 0 {
            start += 1;
            continue;
        }
        let n = (iov.len() - start).min(IOV_MAX);
        // SAFETY: every iovec points at memory valid for writes of iov_len bytes (a local buffer,
        // or destination guest memory under the MemorySink contract).
        let r = unsafe { libc::readv(fd, iov[start..].as_ptr(), n as i32) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e.into());
        }
        if r == 0 {
            return Err(TransportError::Truncated);
        }
        advance(iov, &mut start, r as usize);
    }
    Ok(())
}

fn iov(p: *const u8, len: usize) -> libc::iovec {
    libc::iovec { iov_base: p as *mut libc::c_void, iov_len: len }
}

/// Read exactly `buf.len()` bytes; EOF in the middle is `Truncated`.
fn read_exact(s: &mut TcpStream, buf: &mut [u8]) -> Result<()> {
    s.read_exact(buf).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            TransportError::Truncated
        } else {
            e.into()
        }
    })
}

/// Chooses, batch by batch, between sending compressed and raw, from three measured rates:
/// the link's drain rate `L` (wire bytes/s leaving the socket's send queue, counted only while the
/// queue stayed full, i.e. while the link was the bottleneck), the compressor's speed `C` (guest
/// bytes/s) and its ratio `R`. Raw moves `L` guest bytes/s; compressed moves `min(C, L * R)`.
/// Compress when that is at least 10 % more. Never saturated (loopback, a fast NIC): the sender
/// is the bottleneck, and raw (no compression work) is fastest, with no probing. Once the link
/// is the bottleneck, every 16th batch tries the other way, so `C`, `R` and `L` stay current
/// when the link or the data change.
#[derive(Debug, Clone, Default)]
pub struct CompressChooser {
    link: Option<f64>,
    speed: Option<f64>,
    ratio: Option<f64>,
    n: u64,
    /// Batches in a row during which the send queue did not stay full.
    unsaturated: u32,
    /// Last sample: (time, bytes queued in the socket, bytes written so far).
    last: Option<(std::time::Instant, usize, u64)>,
    written: u64,
}

impl CompressChooser {
    const PROBE_EVERY: u64 = 16;
    const ALPHA: f64 = 0.25;
    /// A send queue at least this full counts as "the link is busy".
    const FULL: usize = 256 << 10;

    fn ewma(slot: &mut Option<f64>, x: f64) {
        *slot = Some(slot.map_or(x, |old| old + Self::ALPHA * (x - old)));
    }

    /// Whether compressing is expected to move more guest bytes per second.
    pub fn prefers_compression(&self) -> bool {
        match (self.link, self.speed, self.ratio) {
            (Some(l), Some(c), Some(r)) => c.min(l * r) >= 1.1 * l,
            _ => false,
        }
    }

    /// Whether to compress the next batch (ask only for batches that carry data).
    pub fn compress_next(&mut self) -> bool {
        self.n += 1;
        if self.speed.is_none() {
            // Measure the compressor early: from the second batch with data until it is measured.
            return self.n >= 2;
        }
        if self.link.is_none() {
            // The link is not the bottleneck: nothing to gain, no probes either.
            return false;
        }
        let prefer = self.prefers_compression();
        // Probing the losing way costs a batch's worth of compression; where compression is
        // hopeless (the compressor under half the link's rate) probe a quarter as often.
        let hopeless = matches!((self.speed, self.link), (Some(c), Some(l)) if c < 0.5 * l);
        let every = if !prefer && hopeless { 4 * Self::PROBE_EVERY } else { Self::PROBE_EVERY };
        prefer != self.n.is_multiple_of(every)
    }

    /// A batch of `raw` guest bytes was compressed to `out` bytes in `took`.
    pub fn record_compression(&mut self, raw: usize, out: usize, took: std::time::Duration) {
        Self::ewma(&mut self.speed, raw as f64 / took.as_secs_f64().max(1e-9));
        Self::ewma(&mut self.ratio, raw as f64 / out.max(1) as f64);
    }

    /// After a write of `wrote` bytes (`compressed` or raw): `queued` bytes still in the
    /// socket's send queue.
    pub fn record_send(&mut self, at: std::time::Instant, wrote: usize, queued: usize, compressed: bool) {
        self.written += wrote as u64;
        if let Some((t0, q0, w0)) = self.last {
            let dt = at.duration_since(t0).as_secs_f64();
            // Drained = what went in minus what is still queued more than before.
            let drained = (self.written - w0) as f64 - (queued as f64 - q0 as f64);
            if q0 >= Self::FULL && queued >= Self::FULL && dt > 0.0 && drained > 0.0 {
                Self::ewma(&mut self.link, drained / dt);
                self.unsaturated = 0;
            } else if !compressed {
                // Raw batches that do not fill the queue: the link is faster than the sender.
                // (Compressed ones may not fill it because the compressor is the bottleneck,
                // which says nothing about the link.)
                self.unsaturated += 1;
                if self.unsaturated > Self::PROBE_EVERY as u32 {
                    self.link = None;
                }
            }
        }
        self.last = Some((at, queued, self.written));
    }

    /// Measured link drain rate (wire bytes/s), compressor speed (guest bytes/s) and ratio.
    pub fn rates(&self) -> (Option<f64>, Option<f64>, Option<f64>) {
        (self.link, self.speed, self.ratio)
    }
}

/// Bytes in a socket's send queue (not yet sent or not yet acknowledged), or 0 if unknown.
fn send_queue(fd: i32) -> usize {
    let mut n: libc::c_int = 0;
    // SAFETY: TIOCOUTQ (SIOCOUTQ) writes one int through the pointer; fd is our socket.
    let r = unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut n) };
    if r == 0 && n > 0 {
        n as usize
    } else {
        0
    }
}

/// Sending half of a stream channel.
pub struct StreamTx {
    sock: TcpStream,
    compressor: Option<zstd::bulk::Compressor<'static>>,
    hdr: Vec<u8>,
    staging: Vec<u8>,
    cbuf: Vec<u8>,
    spans: Vec<(usize, usize)>,
    /// With zstd: per-batch choice between compressed and raw (`None`: always try compressing).
    chooser: Option<CompressChooser>,
    seal: Sealer,
    /// Fixed part and runs + bitmap of a sealed batch, encoded before they are sealed.
    clear: Vec<u8>,
}

impl StreamTx {
    /// Wrap a connected socket. `zstd_level`: compress batches at this level (the capability must
    /// have been negotiated). `seal`: the sending direction's keys (from the handshake).
    pub fn new(sock: TcpStream, zstd_level: Option<i32>, seal: Sealer) -> Result<Self> {
        let compressor = match zstd_level {
            Some(l) => Some(zstd::bulk::Compressor::new(l).map_err(TransportError::Io)?),
            None => None,
        };
        Ok(Self {
            sock,
            compressor,
            hdr: Vec::with_capacity(16 << 10),
            staging: Vec::new(),
            cbuf: Vec::new(),
            spans: Vec::new(),
            chooser: None,
            seal,
            clear: Vec::new(),
        })
    }

    /// The frame sealing state (for test peers that write raw frames).
    #[doc(hidden)]
    pub fn sealer_mut(&mut self) -> &mut Sealer {
        &mut self.seal
    }

    /// With zstd, choose per batch whether compressing pays ([`CompressChooser`]).
    pub fn adaptive(mut self, on: bool) -> Self {
        self.chooser = (on && self.compressor.is_some()).then(CompressChooser::default);
        self
    }

    fn send_small(&mut self, kind: FrameKind, payload: &[u8]) -> Result<()> {
        let f = self.seal.seal_frame(kind, payload);
        let mut v = [iov(f.as_ptr(), f.len())];
        writev_all(self.sock.as_raw_fd(), &mut v)?;
        Ok(())
    }

    fn send_pages(
        &mut self,
        id: u64,
        round: u32,
        flags: u8,
        runs: &[PageRun],
        known: Option<&[u8]>,
        src: &dyn MemorySource,
    ) -> Result<SentBatch> {
        let total = check_send_request(runs, flags)?;
        if let Some(k) = known {
            check_data_map(total, k)?;
        }
        // Zero detection (or the caller's map); remember the data spans (host address, length),
        // merged within a run.
        let mut map = vec![0u8; (total as usize).div_ceil(8)];
        self.spans.clear();
        let mut i = 0usize;
        for r in runs {
            if r.gpa % PAGE_SIZE as u64 != 0 {
                return Err(TransportError::InvalidBatch("unaligned run"));
            }
            let base = src
                .source_slice(r.gpa, r.len())
                .ok_or(TransportError::BadAddress { gpa: r.gpa, len: r.len() })?
                .as_ptr();
            let mut open: Option<(usize, usize)> = None;
            for p in 0..r.pages as usize {
                // SAFETY: p < r.pages, so the page lies inside the run the source vouched for.
                let page = unsafe { base.add(p * PAGE_SIZE) };
                let zero = match known {
                    Some(k) => k[i / 8] & (1 << (i % 8)) == 0,
                    // SAFETY: page-aligned (gpa aligned, regions page aligned), 4096 bytes valid.
                    None => unsafe { page_is_zero(page) },
                };
                if zero {
                    if let Some(s) = open.take() {
                        self.spans.push(s);
                    }
                } else {
                    map[i / 8] |= 1 << (i % 8);
                    match &mut open {
                        Some((_, len)) => *len += PAGE_SIZE,
                        None => open = Some((page.as_ptr() as usize, PAGE_SIZE)),
                    }
                }
                i += 1;
            }
            if let Some(s) = open.take() {
                self.spans.push(s);
            }
        }
        let data_pages: u32 = map.iter().map(|b| b.count_ones()).sum();
        let raw_len = data_pages as usize * PAGE_SIZE;
        let mut header = BatchHeader {
            id,
            round,
            encoding: Encoding::Raw,
            flags,
            runs: runs.to_vec(),
            data_map: map,
            data_len: raw_len as u32,
        };
        let mut compressed = false;
        let mut use_staging = false;
        let sealed = self.seal.tag_len() > 0;
        let try_zstd = raw_len > 0 && self.chooser.as_mut().is_none_or(CompressChooser::compress_next);
        let compressing = self.compressor.is_some() && try_zstd;
        if sealed || compressing {
            // Sealing sends from our own buffer (the bytes sent are the bytes sealed), and the
            // compressor needs the pages there too. The compressor takes them all at once;
            // sealing alone fills each span as it seals it (aead: encrypted from the guest pages,
            // integrity: copied then tagged; `Sealer::seal_from_guest`).
            // Grown, never shrunk: a shorter batch after a longer one must not pay for zeroing
            // (every byte of staging[..raw_len] is written below before it is sent).
            if self.staging.len() < raw_len {
                self.staging.resize(raw_len, 0);
            }
            if compressing {
                let mut off = 0;
                for &(p, len) in &self.spans {
                    // SAFETY: the span was resolved above through the MemorySource, valid for
                    // len bytes while `src` is borrowed, page aligned.
                    unsafe { copy_from_guest(&mut self.staging[off..off + len], NonNull::new_unchecked(p as *mut u8)) };
                    off += len;
                }
            }
            use_staging = true;
        }
        if let (Some(c), true) = (self.compressor.as_mut(), try_zstd) {
            self.cbuf.resize(zstd_bound(raw_len), 0);
            let t = std::time::Instant::now();
            let n = c.compress_to_buffer(&self.staging[..raw_len], &mut self.cbuf[..]).map_err(TransportError::Io)?;
            if let Some(ch) = self.chooser.as_mut() {
                ch.record_compression(raw_len, n, t.elapsed());
            }
            if worth_compressing(raw_len, n) {
                self.cbuf.truncate(n);
                header.encoding = Encoding::Zstd;
                header.data_len = n as u32;
                compressed = true;
                use_staging = false;
            }
        }
        self.hdr.clear();
        if sealed {
            let t = self.seal.tag_len();
            let segments = if compressed { 1 } else { self.spans.len() };
            let payload_len = header.encoded_len() + 2 * t + segments * t + header.data_len as usize;
            let fh = FrameHeader::new(FrameKind::PageBatch, payload_len).encode();
            self.hdr.extend_from_slice(&fh);
            self.clear.clear();
            header.encode_into(&mut self.clear);
            let (fixed, var) = self.clear.split_at_mut(BATCH_FIXED_LEN);
            let t0 = self.seal.seal(&fh, 0, fixed);
            let t1 = self.seal.seal(&fh, 1, var);
            self.hdr.extend_from_slice(fixed);
            self.hdr.extend_from_slice(&t0);
            self.hdr.extend_from_slice(var);
            self.hdr.extend_from_slice(&t1);
            if compressed {
                let tag = self.seal.seal(&fh, 2, &mut self.cbuf);
                self.hdr.extend_from_slice(&tag);
            } else {
                let mut off = 0;
                for (i, &(p, len)) in self.spans.iter().enumerate() {
                    let out = &mut self.staging[off..off + len];
                    let tag = if compressing {
                        // Already copied for the compressor (which did not save enough).
                        self.seal.seal(&fh, 2 + i as u32, out)
                    } else {
                        // SAFETY: as for the copy above (a span resolved through the
                        // MemorySource, valid for len bytes while `src` is borrowed); staging
                        // is our own buffer, not guest memory. With `aead` this encrypts from
                        // the guest pages into staging in one pass (no copy first).
                        unsafe {
                            self.seal.seal_from_guest(&fh, 2 + i as u32, NonNull::new_unchecked(p as *mut u8), out)
                        }
                    };
                    self.hdr.extend_from_slice(&tag);
                    off += len;
                }
            }
            self.seal.next_frame();
        } else {
            let payload_len = header.encoded_len() + header.data_len as usize;
            self.hdr.extend_from_slice(&FrameHeader::new(FrameKind::PageBatch, payload_len).encode());
            header.encode_into(&mut self.hdr);
        }
        let mut v: Vec<libc::iovec> = Vec::with_capacity(self.spans.len() + 1);
        v.push(iov(self.hdr.as_ptr(), self.hdr.len()));
        if compressed {
            v.push(iov(self.cbuf.as_ptr(), self.cbuf.len()));
        } else if use_staging {
            v.push(iov(self.staging.as_ptr(), raw_len));
        } else {
            v.extend(self.spans.iter().map(|&(p, l)| iov(p as *const u8, l)));
        }
        let wire = writev_all(self.sock.as_raw_fd(), &mut v)?;
        if let Some(ch) = self.chooser.as_mut() {
            ch.record_send(std::time::Instant::now(), wire, send_queue(self.sock.as_raw_fd()), compressed);
        }
        Ok(SentBatch { pages: total, data_pages, zero_pages: total - data_pages, wire_bytes: wire as u64, compressed })
    }
}

impl ChannelTx for StreamTx {
    fn send_batch(
        &mut self,
        id: u64,
        round: u32,
        flags: u8,
        runs: &[PageRun],
        src: &dyn MemorySource,
    ) -> Result<SentBatch> {
        self.send_pages(id, round, flags, runs, None, src)
    }

    fn send_batch_mapped(
        &mut self,
        id: u64,
        round: u32,
        flags: u8,
        runs: &[PageRun],
        data_map: &[u8],
        src: &dyn MemorySource,
    ) -> Result<SentBatch> {
        self.send_pages(id, round, flags, runs, Some(data_map), src)
    }

    fn send_control(&mut self, msg: &[u8]) -> Result<()> {
        if msg.len() > MAX_CONTROL_LEN as usize {
            return Err(TransportError::InvalidBatch("control message longer than 1 MiB"));
        }
        self.send_small(FrameKind::Control, msg)
    }

    fn send_ack(&mut self, ack: Ack) -> Result<()> {
        self.send_small(FrameKind::BatchAck, &ack.encode())
    }

    fn send_abort(&mut self, code: u16, reason: &str) -> Result<()> {
        self.send_small(FrameKind::Abort, &AbortMsg { code, reason: reason.to_string() }.encode())
    }

    fn close(&mut self) -> Result<()> {
        self.send_small(FrameKind::Goodbye, &[])?;
        let _ = self.sock.shutdown(std::net::Shutdown::Write);
        Ok(())
    }
}

/// Receiving half of a stream channel.
pub struct StreamRx {
    sock: TcpStream,
    zstd_allowed: bool,
    decompressor: zstd::bulk::Decompressor<'static>,
    buf: Vec<u8>,
    staging: Vec<u8>,
    open: Sealer,
    tags: Vec<u8>,
}

impl StreamRx {
    /// Wrap a connected socket; `zstd_allowed` if the capability was negotiated; `open`: the
    /// receiving direction's keys (from the handshake).
    pub fn new(sock: TcpStream, zstd_allowed: bool, open: Sealer) -> Result<Self> {
        Ok(Self {
            sock,
            zstd_allowed,
            decompressor: zstd::bulk::Decompressor::new().map_err(TransportError::Io)?,
            buf: Vec::new(),
            staging: Vec::new(),
            open,
            tags: Vec::new(),
        })
    }

    /// Read the batch header (fixed part, runs and bitmap), opened if the channel is sealed.
    fn read_batch_header(&mut self, fh: &[u8; HEADER_LEN], len: usize) -> Result<BatchHeader> {
        let t = self.open.tag_len();
        let mut fixed = [0u8; BATCH_FIXED_LEN + crate::wire::TAG_LEN];
        if len < BATCH_FIXED_LEN + 2 * t {
            return Err(WireError::BadBatch("frame shorter than a batch header").into());
        }
        read_exact(&mut self.sock, &mut fixed[..BATCH_FIXED_LEN + t])?;
        let (fx, tag) = fixed.split_at_mut(BATCH_FIXED_LEN);
        self.open.open(fh, 0, fx, &tag[..t])?;
        let f = BatchFixed::decode(fx)?;
        self.buf.resize(f.var_len() + t, 0);
        read_exact(&mut self.sock, &mut self.buf)?;
        let (var, tag) = self.buf.split_at_mut(f.var_len());
        self.open.open(fh, 1, var, tag)?;
        let h = BatchHeader::decode_var(&f, var)?;
        let segments = if t == 0 {
            0
        } else if h.encoding == Encoding::Zstd {
            1
        } else {
            data_segments(&h).len()
        };
        if f.frame_len() + (2 + segments) * t != len {
            return Err(WireError::BadBatch("frame length does not match the batch").into());
        }
        self.tags.resize(segments * t, 0);
        Ok(h)
    }

    fn recv_batch(&mut self, fh: &[u8; HEADER_LEN], len: usize, sink: &dyn MemorySink) -> Result<ReceivedBatch> {
        let h = self.read_batch_header(fh, len)?;
        if h.encoding == Encoding::Zstd && !self.zstd_allowed {
            return Err(TransportError::NotNegotiated("zstd"));
        }
        // The receiver's word on the batch (its round) before any page is touched.
        sink.admit_batch(h.round).map_err(TransportError::BatchRefused)?;
        let zeroed = h.flags & BATCH_DEST_ZEROED != 0;
        // Resolve every run before touching memory: a bad address fails the batch whole.
        let mut bases = Vec::with_capacity(h.runs.len());
        for r in &h.runs {
            bases.push(
                sink.sink_slice(r.gpa, r.len())
                    .ok_or(TransportError::BadAddress { gpa: r.gpa, len: r.len() })?
                    .as_ptr(),
            );
        }
        // The segments' tags come before the data.
        let mut tags = std::mem::take(&mut self.tags);
        let read = read_exact(&mut self.sock, &mut tags);
        let res = read.and_then(|()| self.recv_data(fh, &h, &bases, zeroed, &tags, sink));
        self.tags = tags;
        res?;
        self.open.next_frame();
        let pages = h.total_pages();
        Ok(ReceivedBatch {
            id: h.id,
            round: h.round,
            pages,
            data_pages: h.data_pages(),
            wire_bytes: (HEADER_LEN + len) as u64,
            runs: h.runs,
        })
    }

    /// Read (and open) a batch's data section into the sink.
    fn recv_data(
        &mut self,
        fh: &[u8; HEADER_LEN],
        h: &BatchHeader,
        bases: &[NonNull<u8>],
        zeroed: bool,
        tags: &[u8],
        _sink: &dyn MemorySink,
    ) -> Result<()> {
        let t = self.open.tag_len();
        let raw_len = h.raw_len();
        match h.encoding {
            Encoding::Raw => {
                let mut v: Vec<libc::iovec> = Vec::new();
                let mut i = 0;
                for (r, base) in h.runs.iter().zip(bases) {
                    for p in 0..r.pages as usize {
                        // SAFETY: p < pages: inside the run the sink vouched for.
                        let page = unsafe { base.as_ptr().add(p * PAGE_SIZE) };
                        if h.is_data(i) {
                            if t == 0 {
                                match v.last_mut() {
                                    Some(last) if (last.iov_base as usize) + last.iov_len == page as usize => {
                                        last.iov_len += PAGE_SIZE
                                    }
                                    _ => v.push(iov(page, PAGE_SIZE)),
                                }
                            }
                        } else if !zeroed {
                            // SAFETY: the page lies in sink memory, valid while `sink` is borrowed; a raw write
                            // under ferry_memory's access contract.
                            unsafe { page.write_bytes(0, PAGE_SIZE) };
                        }
                        i += 1;
                    }
                }
                if t == 0 {
                    readv_all(self.sock.as_raw_fd(), &mut v)?;
                } else {
                    // Sealed: the data section is read into our own buffer and each segment
                    // opened out of place into its guest pages, so every guest page is written
                    // once, by the open (a failed tag fails the batch and the channel: the
                    // migration aborts before commit, and what the open wrote into destination
                    // memory, not yet the guest's, is discarded with it). The
                    // section is read a few segments at a time (at least OPEN_CHUNK bytes, or
                    // what is left), so the ciphertext is still in cache when it is opened.
                    let segs = data_segments(h);
                    let mut k = 0;
                    while k < segs.len() {
                        let mut end = k;
                        let mut chunk = 0;
                        while end < segs.len() && (chunk < OPEN_CHUNK || end == k) {
                            chunk += segs[end].2 as usize * PAGE_SIZE;
                            end += 1;
                        }
                        let seg_of = |&(ri, first, n): &(usize, u32, u32)| {
                            // SAFETY: the segment's pages lie inside run `ri`, which the sink
                            // vouched for (first + n <= pages); this receiver is the only writer
                            // of a batch's pages while it receives them (the destination's guest
                            // is not running and the round barrier keeps other channels off these
                            // pages), so a slice over them is not observed by anyone else; each
                            // slice is used and dropped before the next one is made.
                            unsafe {
                                std::slice::from_raw_parts_mut(
                                    bases[ri].as_ptr().add(first as usize * PAGE_SIZE),
                                    n as usize * PAGE_SIZE,
                                )
                            }
                        };
                        if self.open.encrypts() {
                            // aead: the kernel reads the chunk's ciphertext straight into its
                            // guest pages (its copy writes cold memory without reading it
                            // first) and each segment is opened in place while in cache.
                            // Opening out of place from our buffer made the AES code write the
                            // cold guest pages itself, reading every line before writing it:
                            // 0.1 CPU-s more per 1.28 GB (measured 2026-12-01, perf).
                            let mut v: Vec<libc::iovec> = segs[k..end]
                                .iter()
                                .map(|s| iov(seg_of(s).as_mut_ptr(), s.2 as usize * PAGE_SIZE))
                                .collect();
                            readv_all(self.sock.as_raw_fd(), &mut v)?;
                            for (j, s) in segs[k..end].iter().enumerate() {
                                let i = k + j;
                                self.open.open(fh, 2 + i as u32, seg_of(s), &tags[i * t..(i + 1) * t])?;
                            }
                        } else {
                            // integrity: the tag is checked over our copy before any guest page
                            // is written, then the bytes copied in.
                            // Grown, never shrunk (no zeroing of a buffer the read overwrites).
                            if self.staging.len() < chunk {
                                self.staging.resize(chunk, 0);
                            }
                            read_exact(&mut self.sock, &mut self.staging[..chunk])?;
                            let mut off = 0;
                            for (j, s) in segs[k..end].iter().enumerate() {
                                let len = s.2 as usize * PAGE_SIZE;
                                let sealed = &self.staging[off..off + len];
                                let i = k + j;
                                self.open.open_to(fh, 2 + i as u32, sealed, &tags[i * t..(i + 1) * t], seg_of(s))?;
                                off += len;
                            }
                        }
                        k = end;
                    }
                }
            }
            Encoding::Zstd => {
                self.buf.resize(h.data_len as usize, 0);
                read_exact(&mut self.sock, &mut self.buf)?;
                if t > 0 {
                    self.open.open(fh, 2, &mut self.buf, &tags[..t])?;
                }
                self.staging.resize(raw_len, 0);
                let n = self
                    .decompressor
                    .decompress_to_buffer(&self.buf, &mut self.staging[..])
                    .map_err(|e| TransportError::Decompress(e.to_string()))?;
                if n != raw_len {
                    return Err(TransportError::Decompress(format!("{n} bytes instead of {raw_len}")));
                }
                let mut i = 0;
                let mut off = 0;
                for (r, base) in h.runs.iter().zip(bases) {
                    for p in 0..r.pages as usize {
                        // SAFETY: p < pages: inside the run the sink vouched for.
                        let page = unsafe { base.as_ptr().add(p * PAGE_SIZE) };
                        if h.is_data(i) {
                            // SAFETY: staging holds raw_len bytes and off + 4096 <= raw_len (one
                            // data page per set bit); the page is sink memory, written raw under
                            // ferry_memory's access contract.
                            unsafe { std::ptr::copy_nonoverlapping(self.staging.as_ptr().add(off), page, PAGE_SIZE) };
                            off += PAGE_SIZE;
                        } else if !zeroed {
                            // SAFETY: sink memory, valid while `sink` is borrowed (access contract as above).
                            unsafe { page.write_bytes(0, PAGE_SIZE) };
                        }
                        i += 1;
                    }
                }
            }
        }
        Ok(())
    }

    /// Read a small frame's payload (`len` bytes on the wire) and open it.
    fn read_small(&mut self, fh: &[u8; HEADER_LEN], len: usize) -> Result<Vec<u8>> {
        let mut p = vec![0u8; len];
        read_exact(&mut self.sock, &mut p)?;
        let n = self.open.open_frame(fh, &mut p)?;
        p.truncate(n);
        Ok(p)
    }
}

impl ChannelRx for StreamRx {
    fn recv(&mut self, sink: &dyn MemorySink) -> Result<Incoming> {
        let mut hb = [0u8; HEADER_LEN];
        // EOF before the first header byte: the peer vanished without Goodbye.
        let n = loop {
            match self.sock.read(&mut hb) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            }
        };
        if n == 0 {
            return Err(TransportError::Closed);
        }
        read_exact(&mut self.sock, &mut hb[n..])?;
        let h = FrameHeader::decode(&hb)?;
        let len = h.len as usize;
        let t = self.open.tag_len();
        match h.kind {
            FrameKind::PageBatch => Ok(Incoming::Batch(self.recv_batch(&hb, len, sink)?)),
            FrameKind::Control => Ok(Incoming::Control(self.read_small(&hb, len)?)),
            FrameKind::BatchAck => {
                if len != crate::wire::ACK_LEN + t {
                    return Err(WireError::Truncated.into());
                }
                Ok(Incoming::Ack(Ack::decode(&self.read_small(&hb, len)?)?))
            }
            FrameKind::Goodbye => {
                if len != t {
                    return Err(WireError::Truncated.into());
                }
                self.read_small(&hb, len)?;
                Ok(Incoming::Closed)
            }
            FrameKind::Abort => {
                let m = AbortMsg::decode(&self.read_small(&hb, len)?)?;
                Err(TransportError::PeerAborted { code: m.code, reason: m.reason })
            }
            k => Err(WireError::Unexpected(k).into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Drive the chooser through `batches` 1 MiB batches on a simulated link of `link` bytes/s
    /// (None: faster than the sender) with a compressor of `speed` bytes/s and `ratio`; returns
    /// how many batches it compressed.
    fn run(ch: &mut CompressChooser, batches: usize, link: Option<f64>, speed: f64, ratio: f64) -> usize {
        let mb = 1usize << 20;
        let mut t = ch.last.map_or_else(std::time::Instant::now, |l| l.0);
        let mut queued = ch.last.map_or(0, |l| l.1) as f64;
        let mut compressed = 0;
        for _ in 0..batches {
            let z = ch.compress_next();
            let wire = if z { (mb as f64 / ratio) as usize } else { mb };
            // Producing the batch: compressing takes time, a raw batch is a copy (8 GB/s).
            let make = if z { mb as f64 / speed } else { mb as f64 / 8e9 };
            if z {
                compressed += 1;
                ch.record_compression(mb, wire, std::time::Duration::from_secs_f64(make));
            }
            // The queue drains at the link rate meanwhile; a full 4 MiB queue blocks the write.
            let mut dt = make;
            queued += wire as f64;
            if let Some(l) = link {
                let cap = 4.0 * mb as f64;
                if queued > cap {
                    dt = dt.max((queued - cap) / l);
                }
                queued = (queued - l * dt).max(0.0);
            } else {
                queued = 0.0;
            }
            t += std::time::Duration::from_secs_f64(dt);
            ch.record_send(t, wire, queued as usize, z);
        }
        compressed
    }

    #[test]
    fn chooser_compresses_only_where_the_link_is_the_bottleneck() {
        let mut ch = CompressChooser::default();
        // Loopback: the link is never the bottleneck; compressing (0.5 GB/s) only slows down.
        let z = run(&mut ch, 160, None, 0.5e9, 3.0);
        assert!(z <= 1, "compressed {z} of 160 on a link faster than the sender");
        // A 1 Gbit link (125 MB/s), pages compress 2.5x at 0.5 GB/s: compressing moves 2.5x more.
        let z = run(&mut ch, 320, Some(125e6), 0.5e9, 2.5);
        assert!(z >= 260, "compressed only {z} of 320 on a 1 Gbit link");
        assert!(ch.prefers_compression(), "{:?}", ch.rates());
        let (l, c, r) = ch.rates();
        assert!((l.unwrap() / 125e6 - 1.0).abs() < 0.25, "link rate {l:?}");
        assert!((c.unwrap() / 0.5e9 - 1.0).abs() < 0.05 && (r.unwrap() - 2.5).abs() < 0.1);
        // Incompressible pages (ratio 1.05): raw again.
        let z = run(&mut ch, 160, Some(125e6), 0.5e9, 1.05);
        assert!(z <= 40, "still compressing {z} of 160 incompressible batches");
        // A busy CPU: the compressor (200 MB/s) cannot fill a 125 MB/s link at ratio 2.5, so the
        // queue drains while compressing; compressing still moves more (200 > 125 MB/s).
        let mut ch = CompressChooser::default();
        let z = run(&mut ch, 320, Some(125e6), 0.2e9, 2.5);
        assert!(z >= 260, "compressed only {z} of 320 with a slow compressor on a slower link");
        // A 10 Gbit link with a 0.5 GB/s compressor: the compressor would be the bottleneck.
        let mut ch = CompressChooser::default();
        let z = run(&mut ch, 320, Some(1.25e9), 0.5e9, 2.5);
        assert!(z <= 40, "compressed {z} of 320 where raw is faster");
        // A loopback-like path that fills the queue now and then, drained at 4 GB/s: compressing
        // at 0.5 GB/s is hopeless, so it probes rarely (about 1 batch in 64).
        let mut ch = CompressChooser::default();
        let z = run(&mut ch, 640, Some(4e9), 0.5e9, 3.0);
        assert!(z <= 16, "probed {z} of 640 batches where compressing is hopeless");
    }

    #[test]
    fn advance_steps_over_whole_and_partial_iovecs() {
        let (a, b, c) = ([1u8; 10], [2u8; 5], [3u8; 7]);
        let mut v = [iov(a.as_ptr(), 10), iov(b.as_ptr(), 5), iov(c.as_ptr(), 7)];
        let mut start = 0;
        advance(&mut v, &mut start, 4);
        assert_eq!((start, v[0].iov_len, v[0].iov_base as usize), (0, 6, a.as_ptr() as usize + 4));
        advance(&mut v, &mut start, 6 + 5 + 2);
        assert_eq!((start, v[1].iov_len, v[2].iov_len), (2, 0, 5));
        assert_eq!(v[2].iov_base as usize, c.as_ptr() as usize + 2);
        advance(&mut v, &mut start, 5);
        assert_eq!(start, 3);
    }

    #[test]
    fn writev_and_readv_resume_after_partial_transfers() {
        // A socket pair with small buffers forces partial writes; the reader gets every byte.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let w = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (r, _) = l.accept().unwrap();
        let _ = socket2::SockRef::from(&w).set_send_buffer_size(4096);
        let parts: Vec<Vec<u8>> = (0..40u8).map(|i| vec![i; 1000 + i as usize * 977]).collect();
        let want: Vec<u8> = parts.concat();
        let n = want.len();
        let reader = std::thread::spawn(move || {
            let mut got = vec![0u8; n];
            let (x, y) = got.split_at_mut(n / 3);
            let mut v = [iov(x.as_mut_ptr(), x.len()), iov(y.as_mut_ptr(), y.len())];
            readv_all(r.as_raw_fd(), &mut v).unwrap();
            got
        });
        let mut v: Vec<libc::iovec> = parts.iter().map(|p| iov(p.as_ptr(), p.len())).collect();
        assert_eq!(writev_all(w.as_raw_fd(), &mut v).unwrap(), n);
        assert_eq!(reader.join().unwrap(), want);
    }
}
