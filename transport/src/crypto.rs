//! Traffic protection after the handshake: the encryption modes, key derivation (HKDF-SHA256)
//! and the per-direction sealing state (AES-256-GCM) every stream channel uses.
//!
//! # Keys
//!
//! ```text
//! PRK           = HKDF-Extract(salt = nonce_c | nonce_s, IKM = PSK)
//! traffic key   = HKDF-Expand(PRK, "ferry/2 traffic" | session | channel u16 | direction u8 | mode u8, 32)
//! image key     = HKDF-Expand(PRK, "ferry/2 image" | session | channel u16, 32)
//! ```
//!
//! Direction 0 is client to server (source to destination), 1 the other way. Both nonces are
//! fresh for every channel, so every channel of every session has its own pair of keys, and a
//! frame moved to another channel, session or direction fails its tag. The image key of channel 0
//! keys the image digest that decides commit ([`ImageKey`]).
//!
//! # Sealed frames
//!
//! Each direction counts its frames from 0 (the sequence number is never sent). A frame is one or
//! more *parts*, each sealed under the nonce `sequence u64 | part u32` (little endian) with the
//! 16-byte frame header as associated data, so a frame that is altered, injected, dropped,
//! replayed or reordered fails the tag of the next frame the receiver opens, and the channel dies.
//!
//! - `aead`: a part is encrypted in place and followed by (or, for page data, listed with) its
//!   16-byte tag.
//! - `integrity`: nothing is sent encrypted; a part's tag is the AES-GCM tag of the part (frame
//!   header as associated data), computed by sealing it out of place into a scratch buffer that
//!   is then thrown away: the same key, nonce and tag size, and AES-GCM's fast path (GHASH over
//!   the part as associated data alone, the GMAC way, measured 2-3x slower than sealing here).
//!   The receiver computes the same over its copy and compares the tags in constant time.
//! - `off`: frames as in protocol version 1, no tag (trusted networks only).
//!
//! AES-256-GCM and HKDF come from aws-lc-rs: its AES-GCM code uses AVX-512 where the CPU has
//! it (about 1.25x ring's AVX2 code on this project's machines, measured 2026-12-01), it opens
//! out of place ([`Sealer::open_to`], the `integrity` receive path), and its C interface seals
//! out of place from a raw pointer ([`Sealer::seal_from_guest`]: the `aead` send path encrypts
//! guest pages without copying them first).
//!
//! How a page batch is split into parts is in [`crate::wire`].

use std::fmt;
use std::ptr::NonNull;
use std::str::FromStr;

use ferry_memory::volatile::copy_from_guest;

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use aws_lc_rs::hkdf;
use zeroize::Zeroizing;

use crate::error::{Result, TransportError};
use crate::wire::HEADER_LEN;

pub use crate::wire::TAG_LEN;

/// How frames after the handshake are protected. Both ends must agree (the handshake refuses a
/// mismatch); anything but [`Encryption::Aead`] is for networks the operator trusts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Encryption {
    /// Encrypted and authenticated (AES-256-GCM), the default.
    #[default]
    Aead,
    /// Authenticated, not encrypted (GMAC with the same keys).
    Integrity,
    /// Neither (frames carry a header CRC only).
    Off,
}

impl Encryption {
    /// Every mode, in the order help texts list them.
    pub const ALL: [Encryption; 3] = [Self::Aead, Self::Integrity, Self::Off];

    /// The mode's name, as parsed and printed.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Aead => "aead",
            Self::Integrity => "integrity",
            Self::Off => "off",
        }
    }

    /// The byte that stands for the mode in the handshake.
    pub fn to_u8(self) -> u8 {
        match self {
            Self::Aead => 0,
            Self::Integrity => 1,
            Self::Off => 2,
        }
    }

    /// The mode a handshake byte stands for.
    pub fn from_u8(b: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|m| m.to_u8() == b)
    }

    /// Whether frames carry tags.
    pub fn authenticates(self) -> bool {
        self != Self::Off
    }
}

impl fmt::Display for Encryption {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A name that is not an encryption mode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown encryption mode {0:?} (aead, integrity, off)")]
pub struct UnknownEncryption(pub String);

impl FromStr for Encryption {
    type Err = UnknownEncryption;

    fn from_str(s: &str) -> std::result::Result<Self, UnknownEncryption> {
        Self::ALL.into_iter().find(|o| o.as_str() == s.trim()).ok_or_else(|| UnknownEncryption(s.to_string()))
    }
}

/// Direction of a channel's traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Client (source) to server (destination).
    ToServer,
    /// Server to client.
    ToClient,
}

struct Len(usize);

impl hkdf::KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

/// What a channel's keys are derived from: the key, both nonces, the session and channel.
pub(crate) struct KeyInput<'a> {
    pub psk: &'a [u8],
    pub nonce_client: &'a [u8],
    pub nonce_server: &'a [u8],
    pub session: &'a [u8; 16],
    pub channel: u16,
    pub mode: Encryption,
}

fn prk(k: &KeyInput<'_>) -> hkdf::Prk {
    let mut salt = Vec::with_capacity(k.nonce_client.len() + k.nonce_server.len());
    salt.extend_from_slice(k.nonce_client);
    salt.extend_from_slice(k.nonce_server);
    hkdf::Salt::new(hkdf::HKDF_SHA256, &salt).extract(k.psk)
}

fn expand(prk: &hkdf::Prk, info: &[&[u8]]) -> Zeroizing<[u8; 32]> {
    let mut out = Zeroizing::new([0u8; 32]);
    // 32 bytes is far below HKDF-SHA256's limit of 255 * 32: expand and fill cannot fail.
    prk.expand(info, Len(32)).and_then(|okm| okm.fill(&mut out[..])).expect("HKDF expands 32 bytes");
    out
}

/// The 32-byte traffic secret of one direction of one channel.
pub(crate) fn traffic_secret(k: &KeyInput<'_>, dir: Direction) -> Zeroizing<[u8; 32]> {
    let d = [match dir {
        Direction::ToServer => 0u8,
        Direction::ToClient => 1,
    }];
    expand(&prk(k), &[b"ferry/2 traffic", k.session, &k.channel.to_le_bytes(), &d, &[k.mode.to_u8()]])
}

/// The channel's image key (see [`ImageKey`]).
pub(crate) fn image_secret(k: &KeyInput<'_>) -> Zeroizing<[u8; 32]> {
    expand(&prk(k), &[b"ferry/2 image", k.session, &k.channel.to_le_bytes()])
}

/// A secret both ends of a channel derive from the handshake and nobody else can: channel 0's
/// keys the image digest of a migration, so the digest that decides commit cannot be recomputed
/// (or forged for altered memory) by anyone without the pre-shared key. Zeroed when dropped.
#[derive(Clone, PartialEq, Eq)]
pub struct ImageKey(Zeroizing<[u8; 32]>);

impl ImageKey {
    /// The key bytes.
    pub fn bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// A key from raw bytes (tests and simulations).
    pub fn from_bytes(b: [u8; 32]) -> Self {
        Self(Zeroizing::new(b))
    }
}

impl fmt::Debug for ImageKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ImageKey(<secret>)")
    }
}

/// The keys of an established channel: one per direction, the mode, and the image key.
pub struct ChannelKeys {
    /// The agreed mode.
    pub mode: Encryption,
    pub(crate) send: Zeroizing<[u8; 32]>,
    pub(crate) recv: Zeroizing<[u8; 32]>,
    /// The channel's image key.
    pub image: ImageKey,
}

impl fmt::Debug for ChannelKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChannelKeys").field("mode", &self.mode).finish_non_exhaustive()
    }
}

impl ChannelKeys {
    pub(crate) fn derive(k: &KeyInput<'_>, client: bool) -> Self {
        let (to_s, to_c) = (traffic_secret(k, Direction::ToServer), traffic_secret(k, Direction::ToClient));
        let (send, recv) = if client { (to_s, to_c) } else { (to_c, to_s) };
        Self { mode: k.mode, send, recv, image: ImageKey(image_secret(k)) }
    }

    /// The sealing state of the sending direction.
    pub fn sealer(&self) -> Sealer {
        let mut s = Sealer::new(self.mode, &self.send);
        // Only the sending direction seals guest pages: openers do not make the context.
        s.guest = (self.mode == Encryption::Aead).then(|| GuestSealKey::new(&self.send));
        s
    }

    /// The opening state of the receiving direction.
    pub fn opener(&self) -> Sealer {
        Sealer::new(self.mode, &self.recv)
    }

    /// Keys of a channel with no protection (`off`): frames as in version 1.
    pub fn off() -> Self {
        Self {
            mode: Encryption::Off,
            send: Zeroizing::new([0; 32]),
            recv: Zeroizing::new([0; 32]),
            image: ImageKey::from_bytes([0; 32]),
        }
    }
}

/// One direction's sealing (or opening) state: the key and the frame sequence number. A failed
/// open leaves it poisoned: the channel is dead.
pub struct Sealer {
    mode: Encryption,
    key: Option<LessSafeKey>,
    seq: u64,
    /// `integrity`: where a part is copied to be encrypted for its tag.
    scratch: Vec<u8>,
    /// `aead`, sending direction: the same key as an aws-lc AEAD context, for sealing guest
    /// pages straight from guest memory ([`Sealer::seal_from_guest`]; without it, that copies
    /// and seals in place).
    guest: Option<GuestSealKey>,
}

/// An AES-256-GCM context of aws-lc used through its C interface, for the one call that reads
/// guest memory: `LessSafeKey` takes the plaintext as `&[u8]`, and a slice may not cover memory
/// the running guest writes at the same time; the C call takes a raw pointer. Freed (and its key
/// schedule with it) when dropped.
struct GuestSealKey(NonNull<aws_lc_sys::EVP_AEAD_CTX>);

// SAFETY: the context is owned by one Sealer, used through `&mut self` only, and aws-lc's AEAD
// contexts hold no thread-local state.
unsafe impl Send for GuestSealKey {}

impl GuestSealKey {
    fn new(secret: &[u8; 32]) -> Self {
        // SAFETY: EVP_aead_aes_256_gcm returns a static descriptor; the key pointer is valid for
        // 32 bytes, the length AES-256-GCM takes; the tag length is the default (16). aws-lc
        // copies the key into the context it allocates.
        let ctx = unsafe {
            aws_lc_sys::EVP_AEAD_CTX_new(aws_lc_sys::EVP_aead_aes_256_gcm(), secret.as_ptr(), secret.len(), TAG_LEN)
        };
        // Null only when allocation fails, which Rust treats as fatal everywhere else too.
        Self(NonNull::new(ctx).expect("aws-lc allocates an AES-256-GCM context"))
    }
}

impl Drop for GuestSealKey {
    fn drop(&mut self) {
        // SAFETY: the context came from EVP_AEAD_CTX_new and is freed once, here.
        unsafe { aws_lc_sys::EVP_AEAD_CTX_free(self.0.as_ptr()) };
    }
}

impl fmt::Debug for Sealer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sealer").field("mode", &self.mode).field("seq", &self.seq).finish_non_exhaustive()
    }
}

fn tags_equal(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && std::hint::black_box(a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y))) == 0
}

impl Sealer {
    fn new(mode: Encryption, secret: &[u8; 32]) -> Self {
        let key = mode.authenticates().then(|| {
            // A 32-byte key is what AES-256-GCM takes: this cannot fail.
            LessSafeKey::new(UnboundKey::new(&AES_256_GCM, secret).expect("AES-256 takes a 32-byte key"))
        });
        Self { mode, key, seq: 0, scratch: Vec::new(), guest: None }
    }

    /// A sealer that does nothing (`off`).
    pub fn off() -> Self {
        Self { mode: Encryption::Off, key: None, seq: 0, scratch: Vec::new(), guest: None }
    }

    /// `integrity`: the AES-GCM tag of `data` (header as associated data), sealed out of place
    /// into a scratch buffer that is then thrown away.
    fn tag_of_copy(&mut self, hdr: &[u8; HEADER_LEN], part: u32, data: &[u8]) -> Option<[u8; TAG_LEN]> {
        let nonce = self.nonce(part);
        let key = self.key.as_ref()?;
        self.scratch.resize(data.len(), 0);
        let mut tag = [0u8; TAG_LEN];
        key.seal_out_of_place_scatter(nonce, Aad::from(hdr), data, &mut self.scratch, &[], &mut tag).ok()?;
        Some(tag)
    }

    /// The mode.
    pub fn mode(&self) -> Encryption {
        self.mode
    }

    /// Bytes of tag per part (0 with `off`).
    pub fn tag_len(&self) -> usize {
        if self.key.is_some() {
            TAG_LEN
        } else {
            0
        }
    }

    /// Whether parts are encrypted (`aead`).
    pub fn encrypts(&self) -> bool {
        self.mode == Encryption::Aead
    }

    fn nonce_bytes(&self, part: u32) -> [u8; 12] {
        let mut n = [0u8; 12];
        n[..8].copy_from_slice(&self.seq.to_le_bytes());
        n[8..].copy_from_slice(&part.to_le_bytes());
        n
    }

    fn nonce(&self, part: u32) -> Nonce {
        Nonce::assume_unique_for_key(self.nonce_bytes(part))
    }

    /// Seal part `part` of the current frame in place (encrypted with `aead`, untouched with
    /// `integrity`) and return its tag (empty with `off`).
    pub fn seal(&mut self, hdr: &[u8; HEADER_LEN], part: u32, data: &mut [u8]) -> [u8; TAG_LEN] {
        let Some(key) = &self.key else { return [0; TAG_LEN] };
        // AES-GCM fails only past 2^36 bytes per message; parts are at most a few MiB.
        let tag = if self.mode == Encryption::Aead {
            key.seal_in_place_separate_tag(self.nonce(part), Aad::from(hdr), data)
                .ok()
                .and_then(|t| t.as_ref().try_into().ok())
        } else {
            self.tag_of_copy(hdr, part, data)
        };
        tag.expect("a part is far below AES-GCM's message limit")
    }

    /// Seal part `part` of the current frame from guest memory: `out.len()` bytes at `src` are
    /// encrypted into `out` (`aead`, one pass that reads the guest pages once, instead of a copy
    /// and an in-place seal), or copied into `out` and tagged there (`integrity`, whose tag must
    /// cover exactly the bytes sent, so it seals its own copy; `off`: copied). Returns the tag.
    ///
    /// A page the guest writes during the call is sealed as whatever mix of old and new bytes
    /// was read: AES-GCM authenticates the ciphertext it produced, so the receiver gets exactly
    /// that mix, and the dirty log sends the page again.
    ///
    /// # Safety
    /// `src` must be valid for reads of `out.len()` bytes for the whole call (guest memory that
    /// the guest may write meanwhile is fine: it is only read, through a raw pointer), and must
    /// not overlap `out`.
    pub unsafe fn seal_from_guest(
        &mut self,
        hdr: &[u8; HEADER_LEN],
        part: u32,
        src: NonNull<u8>,
        out: &mut [u8],
    ) -> [u8; TAG_LEN] {
        let Some(ctx) = self.guest.as_ref().filter(|_| self.mode == Encryption::Aead) else {
            // SAFETY: the caller's contract (src readable for out.len() bytes).
            unsafe { copy_from_guest(out, src) };
            return self.seal(hdr, part, out);
        };
        let nonce = self.nonce_bytes(part);
        let mut tag = [0u8; TAG_LEN];
        let mut tag_len = 0usize;
        // SAFETY: the context is live (owned by self); `out` is valid for out.len() bytes of
        // writes and `src` for as many reads (the caller's contract), and they do not overlap;
        // the tag buffer holds TAG_LEN bytes and max_out_tag_len says so; nonce and associated
        // data are valid for the lengths passed; no extra input.
        let ok = unsafe {
            aws_lc_sys::EVP_AEAD_CTX_seal_scatter(
                ctx.0.as_ptr(),
                out.as_mut_ptr(),
                tag.as_mut_ptr(),
                &mut tag_len,
                TAG_LEN,
                nonce.as_ptr(),
                nonce.len(),
                src.as_ptr(),
                out.len(),
                std::ptr::null(),
                0,
                hdr.as_ptr(),
                hdr.len(),
            )
        };
        // AES-GCM fails only past 2^36 bytes per message; parts are at most a few MiB.
        assert!(ok == 1 && tag_len == TAG_LEN, "a part is far below AES-GCM's message limit");
        tag
    }

    /// Open part `part` of the current frame in place (decrypted with `aead`) against `tag`.
    pub fn open(&mut self, hdr: &[u8; HEADER_LEN], part: u32, data: &mut [u8], tag: &[u8]) -> Result<()> {
        let Some(key) = &self.key else { return Ok(()) };
        let tag: [u8; TAG_LEN] = tag.try_into().map_err(|_| TransportError::Unauthenticated)?;
        if self.mode == Encryption::Aead {
            key.open_in_place_separate_tag(self.nonce(part), Aad::from(hdr), &tag, data)
                .map(|_| ())
                .map_err(|_| TransportError::Unauthenticated)
        } else {
            self.check_tag(hdr, part, data, &tag)
        }
    }

    /// `integrity`: compare the tag of `data` with `tag`, in constant time.
    fn check_tag(&mut self, hdr: &[u8; HEADER_LEN], part: u32, data: &[u8], tag: &[u8; TAG_LEN]) -> Result<()> {
        let t = self.tag_of_copy(hdr, part, data).ok_or(TransportError::Unauthenticated)?;
        if tags_equal(&t, tag) {
            Ok(())
        } else {
            Err(TransportError::Unauthenticated)
        }
    }

    /// Open part `part` of the current frame out of place: `sealed` (as received) is checked
    /// against `tag` and its plaintext written to `out` (same length). With `aead` this is one
    /// pass that reads the ciphertext and writes `out` once (the receive path reads a batch's
    /// data into its own buffer and opens it straight into the guest pages); with `integrity`
    /// the tag is checked and then the bytes copied. If the tag fails, `out` may hold garbage:
    /// the caller must treat the whole frame as refused (the channel dies).
    pub fn open_to(
        &mut self,
        hdr: &[u8; HEADER_LEN],
        part: u32,
        sealed: &[u8],
        tag: &[u8],
        out: &mut [u8],
    ) -> Result<()> {
        if sealed.len() != out.len() {
            return Err(TransportError::Unauthenticated);
        }
        let Some(key) = &self.key else {
            out.copy_from_slice(sealed);
            return Ok(());
        };
        let tag: [u8; TAG_LEN] = tag.try_into().map_err(|_| TransportError::Unauthenticated)?;
        if self.mode == Encryption::Aead {
            key.open_separate_gather(self.nonce(part), Aad::from(hdr), sealed, &tag, out)
                .map_err(|_| TransportError::Unauthenticated)
        } else {
            self.check_tag(hdr, part, sealed, &tag)?;
            out.copy_from_slice(sealed);
            Ok(())
        }
    }

    /// The current frame is done: the next one takes the next sequence number.
    pub fn next_frame(&mut self) {
        self.seq = self.seq.wrapping_add(1);
    }

    /// Seal a small frame's payload: returns header + (sealed payload | tag) and moves on.
    pub fn seal_frame(&mut self, kind: crate::wire::FrameKind, payload: &[u8]) -> Vec<u8> {
        let t = self.tag_len();
        let hdr = crate::wire::FrameHeader::new(kind, payload.len() + t).encode();
        let mut v = Vec::with_capacity(HEADER_LEN + payload.len() + t);
        v.extend_from_slice(&hdr);
        v.extend_from_slice(payload);
        if t > 0 {
            let tag = self.seal(&hdr, 0, &mut v[HEADER_LEN..]);
            v.extend_from_slice(&tag);
        }
        self.next_frame();
        v
    }

    /// Seal a frame encoded in clear (as [`crate::wire::encode_frame`] and
    /// [`crate::wire::encode_batch_frame`] make them) the way a channel sends it: for test peers
    /// and fault injectors that write raw frames on an established channel. Bytes that do not
    /// start with a valid header go unchanged (no sequence number used). A frame cut short is
    /// sealed as if its missing bytes were zeros and cut short again. A batch whose header does
    /// not decode has its fixed part (and runs and bitmap, if they are there) sealed and the
    /// rest left in clear: the receiver refuses it once it opens the part that does not decode.
    #[doc(hidden)]
    pub fn seal_encoded(&mut self, frame: &[u8]) -> Vec<u8> {
        use crate::wire::{data_segments, BatchFixed, BatchHeader, Encoding, FrameHeader, FrameKind, PAGE_SIZE};
        let Some(h) = frame.get(..HEADER_LEN).and_then(|h| FrameHeader::decode(h.try_into().ok()?).ok()) else {
            return frame.to_vec();
        };
        let t = self.tag_len();
        if t == 0 {
            return frame.to_vec();
        }
        let mut p = frame[HEADER_LEN..].to_vec();
        let given = frame.len();
        p.resize(h.len as usize, 0);
        let out = if h.kind != FrameKind::PageBatch {
            self.seal_frame(h.kind, &p)
        } else {
            let fixed_len = crate::wire::BATCH_FIXED_LEN.min(p.len());
            let mut parts: Vec<(Vec<u8>, bool)> = vec![(p[..fixed_len].to_vec(), true)];
            let mut rest = &p[fixed_len..];
            if let Ok(f) = BatchFixed::decode(&p[..fixed_len]) {
                let var_len = f.var_len().min(rest.len());
                parts.push((rest[..var_len].to_vec(), true));
                let var = &rest[..var_len];
                rest = &rest[var_len..];
                if let Ok(bh) = BatchHeader::decode_var(&f, var) {
                    if rest.len() == bh.data_len as usize {
                        let segs: Vec<usize> = match bh.encoding {
                            Encoding::Zstd => vec![rest.len()],
                            Encoding::Raw => data_segments(&bh).iter().map(|s| s.2 as usize * PAGE_SIZE).collect(),
                        };
                        let mut off = 0;
                        for n in segs {
                            parts.push((rest[off..off + n].to_vec(), true));
                            off += n;
                        }
                        rest = &[];
                    }
                }
            }
            let sealed = parts.len();
            let len = parts.iter().map(|x| x.0.len()).sum::<usize>() + sealed * t + rest.len();
            let hdr = FrameHeader::new(FrameKind::PageBatch, len).encode();
            let mut head = hdr.to_vec();
            let mut tags = Vec::new();
            let mut data = Vec::new();
            for (i, (mut b, _)) in parts.into_iter().enumerate() {
                let tag = self.seal(&hdr, i as u32, &mut b);
                if i < 2 {
                    head.extend_from_slice(&b);
                    head.extend_from_slice(&tag);
                } else {
                    tags.extend_from_slice(&tag);
                    data.extend_from_slice(&b);
                }
            }
            self.next_frame();
            head.extend_from_slice(&tags);
            head.extend_from_slice(&data);
            head.extend_from_slice(rest);
            head
        };
        let mut out = out;
        if given < HEADER_LEN + h.len as usize {
            out.truncate(given);
        }
        out
    }

    /// Open a small frame's payload (`body` = sealed payload | tag) in place; returns the
    /// plaintext's length and moves on.
    pub fn open_frame(&mut self, hdr: &[u8; HEADER_LEN], body: &mut [u8]) -> Result<usize> {
        let t = self.tag_len();
        let n = body.len().checked_sub(t).ok_or(TransportError::Unauthenticated)?;
        let (data, tag) = body.split_at_mut(n);
        self.open(hdr, 0, data, tag)?;
        self.next_frame();
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::FrameKind;

    fn input<'a>(psk: &'a [u8], nc: &'a [u8], ns: &'a [u8], session: &'a [u8; 16], channel: u16) -> KeyInput<'a> {
        KeyInput { psk, nonce_client: nc, nonce_server: ns, session, channel, mode: Encryption::Aead }
    }

    #[test]
    fn keys_differ_by_channel_direction_session_nonce_mode_and_key() {
        let (psk, psk2) = ([1u8; 32], [2u8; 32]);
        let (nc, ns, ns2) = ([3u8; 32], [4u8; 32], [5u8; 32]);
        let (s1, s2) = ([6u8; 16], [7u8; 16]);
        let base = input(&psk, &nc, &ns, &s1, 0);
        let k = |i: &KeyInput<'_>, d| *traffic_secret(i, d);
        let a = k(&base, Direction::ToServer);
        let mut seen = std::collections::HashSet::new();
        for v in [
            a,
            k(&base, Direction::ToClient),
            k(&input(&psk, &nc, &ns, &s1, 1), Direction::ToServer),
            k(&input(&psk, &nc, &ns, &s2, 0), Direction::ToServer),
            k(&input(&psk, &nc, &ns2, &s1, 0), Direction::ToServer),
            k(&input(&psk2, &nc, &ns, &s1, 0), Direction::ToServer),
            k(&KeyInput { mode: Encryption::Integrity, ..input(&psk, &nc, &ns, &s1, 0) }, Direction::ToServer),
            *image_secret(&base),
            *image_secret(&input(&psk, &nc, &ns, &s1, 1)),
        ] {
            assert!(seen.insert(v), "two derivations gave the same key");
        }
        // Deterministic: both ends derive the same.
        assert_eq!(a, k(&input(&psk, &nc, &ns, &s1, 0), Direction::ToServer));
        let (c, s) = (ChannelKeys::derive(&base, true), ChannelKeys::derive(&base, false));
        assert_eq!((*c.send, *c.recv), (*s.recv, *s.send));
        assert_eq!(c.image, s.image);
    }

    fn pair(mode: Encryption) -> (Sealer, Sealer) {
        let (psk, n) = ([9u8; 32], [1u8; 32]);
        let i = KeyInput { mode, ..input(&psk, &n, &n, &[0; 16], 0) };
        (ChannelKeys::derive(&i, true).sealer(), ChannelKeys::derive(&i, false).opener())
    }

    #[test]
    fn frames_open_in_order_and_fail_when_altered_replayed_or_reordered() {
        for mode in [Encryption::Aead, Encryption::Integrity] {
            let (mut tx, mut rx) = pair(mode);
            let frames: Vec<Vec<u8>> = (0..3u8).map(|i| tx.seal_frame(FrameKind::Control, &[i; 40])).collect();
            if mode == Encryption::Aead {
                assert_ne!(&frames[0][HEADER_LEN..HEADER_LEN + 40], &[0u8; 40][..], "aead encrypts");
            } else {
                assert_eq!(&frames[0][HEADER_LEN..HEADER_LEN + 40], &[0u8; 40][..], "integrity does not");
            }
            let open = |rx: &mut Sealer, f: &[u8]| {
                let hdr: [u8; HEADER_LEN] = f[..HEADER_LEN].try_into().unwrap();
                let mut body = f[HEADER_LEN..].to_vec();
                rx.open_frame(&hdr, &mut body).map(|n| body[..n].to_vec())
            };
            assert_eq!(open(&mut rx, &frames[0]).unwrap(), vec![0u8; 40]);
            // Reordered: frame 2 where 1 is due.
            assert!(matches!(open(&mut rx, &frames[2]), Err(TransportError::Unauthenticated)), "{mode}");
            // Replayed: frame 0 again.
            let (_, mut rx) = pair(mode);
            open(&mut rx, &frames[0]).unwrap();
            assert!(open(&mut rx, &frames[0]).is_err(), "{mode}");
            // Altered payload, tag, or header (the header is associated data).
            for at in [HEADER_LEN + 3, frames[1].len() - 1, 5] {
                let (_, mut rx) = pair(mode);
                open(&mut rx, &frames[0]).unwrap();
                let mut f = frames[1].clone();
                f[at] ^= 0x40;
                assert!(open(&mut rx, &f).is_err(), "{mode}: flipped byte {at}");
            }
            // The reverse direction's key does not open it.
            let (mut tx2, _) = pair(mode);
            let f = tx2.seal_frame(FrameKind::Control, &[0; 40]);
            let mut wrong =
                ChannelKeys::derive(&KeyInput { mode, ..input(&[9u8; 32], &[1u8; 32], &[1u8; 32], &[0; 16], 0) }, true)
                    .opener();
            assert!(open(&mut wrong, &f).is_err(), "{mode}: opened with the other direction's key");
        }
    }

    #[test]
    fn out_of_place_open_matches_in_place_and_refuses_what_in_place_refuses() {
        for mode in [Encryption::Aead, Encryption::Integrity] {
            let hdr = crate::wire::FrameHeader::new(FrameKind::PageBatch, 4096 + TAG_LEN).encode();
            let plain: Vec<u8> = (0..4096u32).map(|i| (i * 7 % 251) as u8).collect();
            let (mut tx, _) = pair(mode);
            let mut sealed = plain.clone();
            let tag = tx.seal(&hdr, 2, &mut sealed);
            // Opened out of place: the plaintext lands in `out`, the sealed bytes stay.
            let (_, mut rx) = pair(mode);
            let mut out = vec![0u8; 4096];
            rx.open_to(&hdr, 2, &sealed, &tag, &mut out).unwrap();
            assert_eq!(out, plain, "{mode}");
            // The same as in place.
            let (_, mut rx) = pair(mode);
            let mut in_place = sealed.clone();
            rx.open(&hdr, 2, &mut in_place, &tag).unwrap();
            assert_eq!(in_place, plain, "{mode}");
            // Refused: another part index (nonce), an altered byte, tag or header, a short output.
            let mut bad = sealed.clone();
            bad[100] ^= 1;
            let mut bad_tag = tag;
            bad_tag[0] ^= 1;
            let mut bad_hdr = hdr;
            bad_hdr[9] ^= 1;
            for (h, part, data, t) in [
                (&hdr, 3, &sealed, &tag),
                (&hdr, 2, &bad, &tag),
                (&hdr, 2, &sealed, &bad_tag),
                (&bad_hdr, 2, &sealed, &tag),
            ] {
                let (_, mut rx) = pair(mode);
                let r = rx.open_to(h, part, data, t, &mut out);
                assert!(matches!(r, Err(TransportError::Unauthenticated)), "{mode}: part {part}");
            }
            let (_, mut rx) = pair(mode);
            assert!(rx.open_to(&hdr, 2, &sealed, &tag, &mut out[..4000]).is_err(), "{mode}: short output");
        }
    }

    #[test]
    fn sealing_from_guest_memory_equals_sealing_a_copy_in_place() {
        for mode in [Encryption::Aead, Encryption::Integrity, Encryption::Off] {
            let hdr = crate::wire::FrameHeader::new(FrameKind::PageBatch, 3 * 4096 + TAG_LEN).encode();
            let guest: Vec<u8> = (0..3 * 4096u32).map(|i| (i * 13 % 253) as u8).collect();
            // Two frames, so the sequence number takes part too.
            let (mut a, _) = pair(mode);
            let (mut b, _) = pair(mode);
            for frame in 0..2u32 {
                let mut in_place = guest.clone();
                let tag_a = a.seal(&hdr, 2 + frame, &mut in_place);
                let mut out = vec![0xAAu8; guest.len()];
                // SAFETY: `guest` is a live buffer of out.len() bytes that does not overlap `out`.
                let tag_b = unsafe { b.seal_from_guest(&hdr, 2 + frame, NonNull::from(&guest[0]), &mut out) };
                assert_eq!(out, in_place, "{mode}: frame {frame}");
                assert_eq!(tag_a, tag_b, "{mode}: frame {frame}");
                if mode == Encryption::Aead {
                    assert_ne!(out, guest, "aead encrypts");
                } else {
                    assert_eq!(out, guest, "{mode} sends the bytes as they are");
                }
                a.next_frame();
                b.next_frame();
            }
            // And the receiver opens what seal_from_guest made.
            let (mut tx, mut rx) = pair(mode);
            let mut out = vec![0u8; guest.len()];
            // SAFETY: as above.
            let tag = unsafe { tx.seal_from_guest(&hdr, 2, NonNull::from(&guest[0]), &mut out) };
            let mut opened = vec![0u8; guest.len()];
            rx.open_to(&hdr, 2, &out, &tag, &mut opened).unwrap();
            assert_eq!(opened, guest, "{mode}");
        }
    }

    #[test]
    fn off_adds_nothing() {
        let (mut tx, mut rx) = pair(Encryption::Off);
        let f = tx.seal_frame(FrameKind::Control, b"plain");
        assert_eq!(f, crate::wire::encode_frame(FrameKind::Control, b"plain"));
        let hdr: [u8; HEADER_LEN] = f[..HEADER_LEN].try_into().unwrap();
        let mut body = f[HEADER_LEN..].to_vec();
        assert_eq!(rx.open_frame(&hdr, &mut body).unwrap(), 5);
    }

    #[test]
    fn mode_names_round_trip() {
        for m in Encryption::ALL {
            assert_eq!(m.to_string().parse::<Encryption>(), Ok(m));
            assert_eq!(Encryption::from_u8(m.to_u8()), Some(m));
        }
        assert!("tls".parse::<Encryption>().is_err());
        assert_eq!(Encryption::default(), Encryption::Aead);
    }
}
