//! The migration protocol's control messages (channel 0 of a session): pure encode/decode,
//! versioned, every length capped. Messages ride in transport `Control` frames; page batches ride
//! on every channel of the session, channel 0 included.
//!
//! Who sends which message when, the states of both sides, the round rule and the ownership
//! rules are in [`crate::session`] (with the sequence diagram); the state machines that follow
//! them are [`crate::session::source::SourceSession`] and
//! [`crate::session::target::TargetSession`].

use crate::vm::VmShape;

/// Protocol version of this module.
pub const MIGRATION_VERSION: u8 = 2;
/// Most regions a VM may have.
pub const MAX_REGIONS: usize = 256;
/// Longest VM id.
pub const MAX_ID: usize = 256;
/// Longest reason text.
pub const MAX_REASON: usize = 1024;
/// Largest state chunk.
pub const MAX_CHUNK: usize = 512 << 10;
/// Largest whole state blob (vCPU and device state): what the VMMs accept (the KVM state
/// decoder, `ferry_vmm_glue::kvm::state`, uses this constant as its cap), so a destination never
/// buffers more state than it could restore. A source whose state is larger fails before
/// `Complete`.
pub const MAX_STATE: u64 = 4 << 20;

/// Most blocks in one [`Msg::DiskBlocks`] (8 x 64 KiB: a message stays well under the transport's
/// 1 MiB control frame, rdma's included).
pub const MAX_DISK_BLOCKS: usize = 8;
/// Longest disk name.
pub const MAX_DISK_NAME: usize = 200;

/// A disk a shared-nothing move brings: its name (a plain file name, checked again by the
/// destination) and size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskDesc {
    /// File name.
    pub name: String,
    /// Size in bytes (any size; the last block is short).
    pub size_bytes: u64,
}

/// One block of a [`Msg::DiskBlocks`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskBlock {
    /// Block index (64 KiB blocks).
    pub block: u64,
    /// The block's bytes (its exact length), or `None`: zeros (left a hole).
    pub data: Option<Vec<u8>>,
}

/// A control message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Msg {
    /// Source: announce the VM.
    Prepare {
        /// Protocol version.
        version: u8,
        /// VM shape.
        shape: VmShape,
        /// Channels the session will open.
        channels: u16,
        /// Destination re-reads all memory for the final check (otherwise hashes taken at receipt).
        verify_full: bool,
    },
    /// Destination: ready to receive.
    PrepareOk,
    /// Destination: refuses (or fails) with a reason.
    Refuse(String),
    /// Source: round finished sending.
    RoundEnd {
        /// Round.
        round: u32,
        /// Pages sent in it.
        pages: u64,
    },
    /// Source: the VM is paused; the final round follows.
    Switchover {
        /// Number of the final round.
        round: u32,
    },
    /// Source: a piece of the VM state blob.
    StateChunk {
        /// Offset in the blob.
        offset: u64,
        /// Bytes.
        data: Vec<u8>,
    },
    /// Source: all pages and state sent.
    Complete {
        /// State length.
        state_len: u64,
        /// State checksum.
        state_crc: u32,
        /// Digest of the page hash table of the whole image.
        digest: u64,
        /// Pages in the image.
        pages: u64,
    },
    /// Destination: image verified, state restored; waiting for commit.
    Ready,
    /// Source: ownership passes to the destination.
    Commit,
    /// Destination: the VM runs here.
    Resumed,
    /// Destination: a data channel failed and its receiver has stopped; nothing more from it
    /// will be written, so the source may resend that channel's unacknowledged batches.
    ChannelLost {
        /// Channel index.
        channel: u16,
    },
    /// Source: it gave up on a data channel (stalled, or failed on its side). The destination
    /// closes its end and answers `ChannelLost` once that channel's receiver has stopped.
    ChannelDrop {
        /// Channel index.
        channel: u16,
    },
    /// Source (shared-nothing, after `PrepareOk`, before any page batch): the VM's disks.
    Disks {
        /// In the VM's order (their index is the `disk` of [`Msg::DiskBlocks`]).
        disks: Vec<DiskDesc>,
    },
    /// Destination: partial copies of every disk created; blocks may come.
    DisksOk,
    /// Source, on any channel: blocks of one disk. Answered by `DiskAck` on the same channel once
    /// they are written.
    DiskBlocks {
        /// Message number (unique in the migration).
        seq: u64,
        /// Disk index.
        disk: u16,
        /// The blocks.
        blocks: Vec<DiskBlock>,
    },
    /// Destination: the blocks of `DiskBlocks` `seq` are written.
    DiskAck {
        /// The message acknowledged.
        seq: u64,
    },
    /// Source, right before `Complete`: each disk's keyed digest.
    DiskDigests {
        /// One per disk, in order.
        digests: Vec<u64>,
    },
}

/// Why a control message does not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// Too short.
    #[error("truncated control message")]
    Truncated,
    /// Unknown message tag.
    #[error("unknown control message {0}")]
    UnknownTag(u8),
    /// A field over its cap or invalid.
    #[error("invalid control message: {0}")]
    Invalid(&'static str),
    /// Bytes left over.
    #[error("trailing bytes after control message")]
    Trailing,
}

struct R<'a>(&'a [u8]);

impl<'a> R<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], ProtocolError> {
        if self.0.len() < n {
            return Err(ProtocolError::Truncated);
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, ProtocolError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, ProtocolError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, ProtocolError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, ProtocolError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
    fn bytes(&mut self, cap: usize) -> Result<&'a [u8], ProtocolError> {
        let n = self.u32()? as usize;
        if n > cap {
            return Err(ProtocolError::Invalid("length over its cap"));
        }
        self.take(n)
    }
    fn string(&mut self, cap: usize) -> Result<String, ProtocolError> {
        let b = self.bytes(cap)?;
        String::from_utf8(b.to_vec()).map_err(|_| ProtocolError::Invalid("text is not UTF-8"))
    }
}

fn put_bytes(v: &mut Vec<u8>, b: &[u8]) {
    v.extend_from_slice(&(b.len() as u32).to_le_bytes());
    v.extend_from_slice(b);
}

/// Whether an encoded message is a `Complete` (by its tag alone: the receiver of channel 0
/// seals guest memory on it before reading the next frame, whatever the rest decodes to).
pub fn is_complete(bytes: &[u8]) -> bool {
    bytes.first() == Some(&7)
}

/// Whether an encoded message is a `DiskAck` (the source's readers hand those to the disk
/// pump, not to the session).
pub fn is_disk_ack(bytes: &[u8]) -> bool {
    bytes.first() == Some(&16)
}

/// Whether an encoded message is `DiskBlocks` (the destination's receivers write those
/// themselves, on whatever channel they come).
pub fn is_disk_blocks(bytes: &[u8]) -> bool {
    bytes.first() == Some(&15)
}

impl Msg {
    /// Encode.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::new();
        match self {
            Msg::Prepare { version, shape, channels, verify_full } => {
                v.push(1);
                v.push(*version);
                put_bytes(&mut v, shape.vm_id.as_bytes());
                v.extend_from_slice(&(shape.regions.len() as u32).to_le_bytes());
                for (g, l) in &shape.regions {
                    v.extend_from_slice(&g.to_le_bytes());
                    v.extend_from_slice(&l.to_le_bytes());
                }
                v.extend_from_slice(&channels.to_le_bytes());
                v.push(u8::from(*verify_full));
            }
            Msg::PrepareOk => v.push(2),
            Msg::Refuse(r) => {
                v.push(3);
                let mut cut = r.len().min(MAX_REASON);
                while !r.is_char_boundary(cut) {
                    cut -= 1;
                }
                put_bytes(&mut v, &r.as_bytes()[..cut]);
            }
            Msg::RoundEnd { round, pages } => {
                v.push(4);
                v.extend_from_slice(&round.to_le_bytes());
                v.extend_from_slice(&pages.to_le_bytes());
            }
            Msg::Switchover { round } => {
                v.push(5);
                v.extend_from_slice(&round.to_le_bytes());
            }
            Msg::StateChunk { offset, data } => {
                v.push(6);
                v.extend_from_slice(&offset.to_le_bytes());
                put_bytes(&mut v, data);
            }
            Msg::Complete { state_len, state_crc, digest, pages } => {
                v.push(7);
                v.extend_from_slice(&state_len.to_le_bytes());
                v.extend_from_slice(&state_crc.to_le_bytes());
                v.extend_from_slice(&digest.to_le_bytes());
                v.extend_from_slice(&pages.to_le_bytes());
            }
            Msg::Ready => v.push(8),
            Msg::Commit => v.push(9),
            Msg::Resumed => v.push(10),
            Msg::ChannelLost { channel } => {
                v.push(11);
                v.extend_from_slice(&channel.to_le_bytes());
            }
            Msg::ChannelDrop { channel } => {
                v.push(12);
                v.extend_from_slice(&channel.to_le_bytes());
            }
            Msg::Disks { disks } => {
                v.push(13);
                v.extend_from_slice(&(disks.len() as u32).to_le_bytes());
                for d in disks {
                    put_bytes(&mut v, d.name.as_bytes());
                    v.extend_from_slice(&d.size_bytes.to_le_bytes());
                }
            }
            Msg::DisksOk => v.push(14),
            Msg::DiskBlocks { seq, disk, blocks } => {
                v.push(15);
                v.extend_from_slice(&seq.to_le_bytes());
                v.extend_from_slice(&disk.to_le_bytes());
                v.extend_from_slice(&(blocks.len() as u16).to_le_bytes());
                for b in blocks {
                    v.extend_from_slice(&b.block.to_le_bytes());
                    match &b.data {
                        None => v.push(0),
                        Some(d) => {
                            v.push(1);
                            put_bytes(&mut v, d);
                        }
                    }
                }
            }
            Msg::DiskAck { seq } => {
                v.push(16);
                v.extend_from_slice(&seq.to_le_bytes());
            }
            Msg::DiskDigests { digests } => {
                v.push(17);
                v.extend_from_slice(&(digests.len() as u32).to_le_bytes());
                for d in digests {
                    v.extend_from_slice(&d.to_le_bytes());
                }
            }
        }
        v
    }

    /// Decode, checking every field.
    pub fn decode(b: &[u8]) -> Result<Self, ProtocolError> {
        let mut r = R(b);
        let m = match r.u8()? {
            1 => {
                let version = r.u8()?;
                let vm_id = r.string(MAX_ID)?;
                let n = r.u32()? as usize;
                if n == 0 || n > MAX_REGIONS {
                    return Err(ProtocolError::Invalid("region count"));
                }
                let mut regions = Vec::with_capacity(n);
                for _ in 0..n {
                    let (g, l) = (r.u64()?, r.u64()?);
                    if g % 4096 != 0 || l % 4096 != 0 || l == 0 || g.checked_add(l).is_none() {
                        return Err(ProtocolError::Invalid("region not page aligned or empty"));
                    }
                    regions.push((g, l));
                }
                let channels = r.u16()?;
                if channels == 0 {
                    return Err(ProtocolError::Invalid("zero channels"));
                }
                let verify_full = match r.u8()? {
                    0 => false,
                    1 => true,
                    _ => return Err(ProtocolError::Invalid("flag")),
                };
                Msg::Prepare { version, shape: VmShape { vm_id, regions }, channels, verify_full }
            }
            2 => Msg::PrepareOk,
            3 => Msg::Refuse(r.string(MAX_REASON)?),
            4 => Msg::RoundEnd { round: r.u32()?, pages: r.u64()? },
            5 => Msg::Switchover { round: r.u32()? },
            6 => Msg::StateChunk { offset: r.u64()?, data: r.bytes(MAX_CHUNK)?.to_vec() },
            7 => {
                let state_len = r.u64()?;
                if state_len > MAX_STATE {
                    return Err(ProtocolError::Invalid("state too large"));
                }
                Msg::Complete { state_len, state_crc: r.u32()?, digest: r.u64()?, pages: r.u64()? }
            }
            8 => Msg::Ready,
            9 => Msg::Commit,
            10 => Msg::Resumed,
            11 => Msg::ChannelLost { channel: r.u16()? },
            12 => Msg::ChannelDrop { channel: r.u16()? },
            13 => {
                let n = r.u32()? as usize;
                if n == 0 || n > ferry_disk::remote::MAX_DISKS {
                    return Err(ProtocolError::Invalid("disk count"));
                }
                let mut disks = Vec::with_capacity(n);
                for _ in 0..n {
                    let name = r.string(MAX_DISK_NAME)?;
                    let size_bytes = r.u64()?;
                    if size_bytes > ferry_disk::remote::MAX_DISK_BYTES {
                        return Err(ProtocolError::Invalid("disk too large"));
                    }
                    disks.push(DiskDesc { name, size_bytes });
                }
                Msg::Disks { disks }
            }
            14 => Msg::DisksOk,
            15 => {
                let (seq, disk, n) = (r.u64()?, r.u16()?, r.u16()? as usize);
                if n == 0 || n > MAX_DISK_BLOCKS {
                    return Err(ProtocolError::Invalid("disk block count"));
                }
                let mut blocks = Vec::with_capacity(n);
                for _ in 0..n {
                    let block = r.u64()?;
                    let data = match r.u8()? {
                        0 => None,
                        1 => Some(r.bytes(ferry_disk::BLOCK_BYTES as usize)?.to_vec()),
                        _ => return Err(ProtocolError::Invalid("flag")),
                    };
                    blocks.push(DiskBlock { block, data });
                }
                Msg::DiskBlocks { seq, disk, blocks }
            }
            16 => Msg::DiskAck { seq: r.u64()? },
            17 => {
                let n = r.u32()? as usize;
                if n > ferry_disk::remote::MAX_DISKS {
                    return Err(ProtocolError::Invalid("disk count"));
                }
                let mut digests = Vec::with_capacity(n);
                for _ in 0..n {
                    digests.push(r.u64()?);
                }
                Msg::DiskDigests { digests }
            }
            t => return Err(ProtocolError::UnknownTag(t)),
        };
        if !r.0.is_empty() {
            return Err(ProtocolError::Trailing);
        }
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn all() -> Vec<Msg> {
        vec![
            Msg::Prepare {
                version: 1,
                shape: VmShape { vm_id: "vm-1".into(), regions: vec![(0, 4096 * 3), (1 << 30, 4096)] },
                channels: 4,
                verify_full: true,
            },
            Msg::PrepareOk,
            Msg::Refuse("no room".into()),
            Msg::RoundEnd { round: 3, pages: 99 },
            Msg::Switchover { round: 7 },
            Msg::StateChunk { offset: 10, data: vec![1, 2, 3] },
            Msg::Complete { state_len: 3, state_crc: 5, digest: 6, pages: 7 },
            Msg::Ready,
            Msg::Commit,
            Msg::Resumed,
            Msg::ChannelLost { channel: 3 },
            Msg::ChannelDrop { channel: 2 },
            Msg::Disks {
                disks: vec![
                    DiskDesc { name: "root.img".into(), size_bytes: 12345 },
                    DiskDesc { name: "data".into(), size_bytes: 1 << 40 },
                ],
            },
            Msg::DisksOk,
            Msg::DiskBlocks {
                seq: 9,
                disk: 1,
                blocks: vec![DiskBlock { block: 3, data: None }, DiskBlock { block: 4, data: Some(vec![5; 100]) }],
            },
            Msg::DiskAck { seq: 9 },
            Msg::DiskDigests { digests: vec![1, 2] },
        ]
    }

    #[test]
    fn disk_messages_are_capped() {
        let blocks = |n: usize, len: usize| Msg::DiskBlocks {
            seq: 1,
            disk: 0,
            blocks: (0..n).map(|b| DiskBlock { block: b as u64, data: Some(vec![1; len]) }).collect(),
        };
        assert!(Msg::decode(&blocks(MAX_DISK_BLOCKS, ferry_disk::BLOCK_BYTES as usize).encode()).is_ok());
        assert!(blocks(MAX_DISK_BLOCKS, ferry_disk::BLOCK_BYTES as usize).encode().len() < (1 << 20) - 1);
        assert_eq!(
            Msg::decode(&blocks(MAX_DISK_BLOCKS + 1, 1).encode()),
            Err(ProtocolError::Invalid("disk block count"))
        );
        assert_eq!(Msg::decode(&blocks(0, 1).encode()), Err(ProtocolError::Invalid("disk block count")));
        assert_eq!(
            Msg::decode(&blocks(1, ferry_disk::BLOCK_BYTES as usize + 1).encode()),
            Err(ProtocolError::Invalid("length over its cap"))
        );
        let disks = |n: usize, size_bytes: u64| Msg::Disks {
            disks: (0..n).map(|i| DiskDesc { name: format!("d{i}"), size_bytes }).collect(),
        };
        assert_eq!(Msg::decode(&disks(0, 1).encode()), Err(ProtocolError::Invalid("disk count")));
        assert_eq!(Msg::decode(&disks(65, 1).encode()), Err(ProtocolError::Invalid("disk count")));
        assert_eq!(
            Msg::decode(&disks(1, ferry_disk::remote::MAX_DISK_BYTES + 1).encode()),
            Err(ProtocolError::Invalid("disk too large"))
        );
        let long = Msg::Disks { disks: vec![DiskDesc { name: "x".repeat(MAX_DISK_NAME + 1), size_bytes: 1 }] };
        assert_eq!(Msg::decode(&long.encode()), Err(ProtocolError::Invalid("length over its cap")));
    }

    #[test]
    fn round_trip_every_message() {
        for m in all() {
            assert_eq!(Msg::decode(&m.encode()).unwrap(), m);
            assert_eq!(is_complete(&m.encode()), matches!(m, Msg::Complete { .. }), "{m:?}");
            assert_eq!(is_disk_ack(&m.encode()), matches!(m, Msg::DiskAck { .. }), "{m:?}");
            assert_eq!(is_disk_blocks(&m.encode()), matches!(m, Msg::DiskBlocks { .. }), "{m:?}");
        }
    }

    #[test]
    fn state_larger_than_the_cap_is_refused() {
        let over = Msg::Complete { state_len: MAX_STATE + 1, state_crc: 0, digest: 0, pages: 1 };
        assert_eq!(Msg::decode(&over.encode()), Err(ProtocolError::Invalid("state too large")));
    }

    #[test]
    fn caps_and_garbage() {
        assert!(Msg::decode(&[]).is_err());
        assert!(Msg::decode(&[99]).is_err());
        let mut big = vec![6u8];
        big.extend_from_slice(&0u64.to_le_bytes());
        big.extend_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(Msg::decode(&big), Err(ProtocolError::Invalid("length over its cap")));
        let mut p = all()[0].encode();
        p.push(0);
        assert_eq!(Msg::decode(&p), Err(ProtocolError::Trailing));
    }

    proptest! {
        #[test]
        fn never_panics(b in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = Msg::decode(&b);
        }

        #[test]
        fn truncation_is_an_error(i in 0usize..17, cut in 0usize..40) {
            let e = all()[i].encode();
            if cut < e.len() {
                prop_assert!(Msg::decode(&e[..cut]).is_err());
            }
        }
    }
}
