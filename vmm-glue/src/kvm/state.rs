//! The saved state of a KVM VM (vCPUs and the VMM's port device): a versioned binary format.
//!
//! ```text
//! magic "FERRYKVM" (8) | version u32 | section count u32
//! section*: tag u32 | length u32 | bytes           (each length <= MAX_SECTION)
//! crc32 u32 of everything before it                 (whole blob <= MAX_STATE)
//! ```
//! All integers little-endian. KVM structures are stored as their kernel ABI bytes (they are
//! plain integers and arrays, so any bytes decode; KVM itself refuses values it does not like).
//! Decoding checks the size cap, the CRC, the magic, the version, every length and that each
//! section's size is exactly its structure's; garbage gives a [`StateError`], never a panic.
//! The block device's section (registers and counters) is optional: a blob without it (from a
//! build before the device) loads with the device reset.

use kvm_bindings::{
    kvm_debugregs, kvm_fpu, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs,
};
use zerocopy::{FromBytes, IntoBytes};

use super::block::BlockState;

/// Magic at the start of a state blob.
pub const MAGIC: [u8; 8] = *b"FERRYKVM";
/// Format version written (and the only one read).
pub const VERSION: u32 = 1;
/// Largest blob accepted: the migration protocol's cap on state
/// ([`ferry_migrate::protocol::MAX_STATE`]), one constant for both.
pub const MAX_STATE: usize = ferry_migrate::protocol::MAX_STATE as usize;
/// Largest section accepted.
pub const MAX_SECTION: usize = 1 << 20;
/// Most sections accepted.
pub const MAX_SECTIONS: u32 = 256;
/// Most MSRs in a blob.
pub const MAX_MSRS: usize = 1024;
/// Most error records kept in device state.
pub const MAX_ERROR_RECORDS: usize = 16;

const T_REGS: u32 = 1;
const T_SREGS: u32 = 2;
const T_FPU: u32 = 3;
const T_XSAVE: u32 = 4;
const T_XCRS: u32 = 5;
const T_DEBUGREGS: u32 = 6;
const T_LAPIC: u32 = 7;
const T_MSRS: u32 = 8;
const T_EVENTS: u32 = 9;
const T_MP_STATE: u32 = 10;
const T_DEVICE: u32 = 11;
const T_PIC_MASTER: u32 = 12;
const T_PIC_SLAVE: u32 = 13;
const T_IOAPIC: u32 = 14;
const T_BLOCK: u32 = 15;

/// Why a state blob cannot be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StateError {
    /// Shorter than a header and a CRC.
    #[error("state blob too short ({0} bytes)")]
    TooShort(usize),
    /// Larger than [`MAX_STATE`].
    #[error("state blob too large ({0} bytes)")]
    TooLarge(usize),
    /// CRC mismatch.
    #[error("state blob CRC mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    Crc {
        /// CRC in the blob.
        stored: u32,
        /// CRC of the bytes.
        computed: u32,
    },
    /// Not a Ferry KVM state blob.
    #[error("bad magic")]
    Magic,
    /// A version this build cannot read.
    #[error("unsupported state version {0}")]
    Version(u32),
    /// A section runs past the end, or too many sections.
    #[error("truncated or oversized section {0}")]
    Section(u32),
    /// A section of the wrong size for its structure.
    #[error("section {tag} has {len} bytes, expected {expected}")]
    SectionSize {
        /// Section tag.
        tag: u32,
        /// Its length.
        len: usize,
        /// Size of the structure.
        expected: usize,
    },
    /// A tag this version does not know, or one that appears twice.
    #[error("unknown or repeated section tag {0}")]
    Tag(u32),
    /// A required section is missing.
    #[error("missing section {0}")]
    Missing(&'static str),
    /// Bytes after the last section.
    #[error("trailing bytes after sections")]
    Trailing,
}

/// The VMM's port device: latched halves of the guest's reports and what it reported.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceState {
    /// Latched 32-bit writes, indexed by `(port - 0xE0) / 4`.
    pub latch: [u32; 8],
    /// Reports completed (writes to the checksum-high port).
    pub reports: u64,
    /// Pass counter of the last report.
    pub passes: u64,
    /// Checksum of the last report.
    pub checksum: u64,
    /// Error records completed.
    pub errors: u64,
    /// The first error records: (address, value found).
    pub error_records: Vec<(u64, u64)>,
    /// Writes to ports the device does not know.
    pub unknown_port_writes: u64,
}

/// The state of one vCPU, as KVM gives it.
#[derive(Clone, Default)]
pub struct VcpuState {
    /// General registers.
    pub regs: kvm_regs,
    /// Special registers (segments, control registers, EFER, descriptor tables).
    pub sregs: kvm_sregs,
    /// Legacy FPU state (only where XSAVE is not available).
    pub fpu: Option<kvm_fpu>,
    /// XSAVE area (the 4 KiB `kvm_xsave::region`).
    pub xsave: Option<Box<[u32; 1024]>>,
    /// Extended control registers.
    pub xcrs: Option<kvm_xcrs>,
    /// Debug registers.
    pub debugregs: Option<kvm_debugregs>,
    /// Local APIC (only with an in-kernel irqchip).
    pub lapic: Option<Box<kvm_lapic_state>>,
    /// MSRs: (index, value).
    pub msrs: Vec<(u32, u64)>,
    /// Pending exceptions, interrupts, NMIs, interrupt shadow.
    pub events: Option<kvm_vcpu_events>,
    /// Multiprocessing state.
    pub mp_state: Option<kvm_mp_state>,
}

/// Everything `save_state` captures.
#[derive(Clone, Default)]
pub struct VmState {
    /// The vCPU (one per VM in this VMM).
    pub vcpu: VcpuState,
    /// In-kernel interrupt controllers (PIC master, PIC slave, IOAPIC), with an irqchip only.
    pub irqchips: Option<Box<[kvm_irqchip; 3]>>,
    /// The port device.
    pub device: DeviceState,
    /// The block device's registers and counters.
    pub block: BlockState,
}

fn fpu_bytes(f: &kvm_fpu) -> Vec<u8> {
    let mut v = Vec::with_capacity(416);
    for r in &f.fpr {
        v.extend_from_slice(r);
    }
    v.extend_from_slice(&f.fcw.to_le_bytes());
    v.extend_from_slice(&f.fsw.to_le_bytes());
    v.push(f.ftwx);
    v.extend_from_slice(&f.last_opcode.to_le_bytes());
    v.extend_from_slice(&f.last_ip.to_le_bytes());
    v.extend_from_slice(&f.last_dp.to_le_bytes());
    for r in &f.xmm {
        v.extend_from_slice(r);
    }
    v.extend_from_slice(&f.mxcsr.to_le_bytes());
    v
}

const FPU_LEN: usize = 8 * 16 + 2 + 2 + 1 + 2 + 8 + 8 + 16 * 16 + 4;

fn fpu_from(b: &[u8]) -> Option<kvm_fpu> {
    let mut r = Reader { b, pos: 0 };
    let mut f = kvm_fpu::default();
    for x in f.fpr.iter_mut() {
        x.copy_from_slice(r.take(16)?);
    }
    f.fcw = r.u16()?;
    f.fsw = r.u16()?;
    f.ftwx = r.take(1)?[0];
    f.last_opcode = r.u16()?;
    f.last_ip = r.u64()?;
    f.last_dp = r.u64()?;
    for x in f.xmm.iter_mut() {
        x.copy_from_slice(r.take(16)?);
    }
    f.mxcsr = r.u32()?;
    Some(f)
}

fn device_bytes(d: &DeviceState) -> Vec<u8> {
    let mut v = Vec::new();
    for l in d.latch {
        v.extend_from_slice(&l.to_le_bytes());
    }
    for x in [d.reports, d.passes, d.checksum, d.errors, d.unknown_port_writes] {
        v.extend_from_slice(&x.to_le_bytes());
    }
    let n = d.error_records.len().min(MAX_ERROR_RECORDS);
    v.extend_from_slice(&(n as u32).to_le_bytes());
    for (a, f) in &d.error_records[..n] {
        v.extend_from_slice(&a.to_le_bytes());
        v.extend_from_slice(&f.to_le_bytes());
    }
    v
}

fn device_from(b: &[u8]) -> Option<DeviceState> {
    let mut r = Reader { b, pos: 0 };
    let mut d = DeviceState::default();
    for l in d.latch.iter_mut() {
        *l = r.u32()?;
    }
    d.reports = r.u64()?;
    d.passes = r.u64()?;
    d.checksum = r.u64()?;
    d.errors = r.u64()?;
    d.unknown_port_writes = r.u64()?;
    let n = r.u32()? as usize;
    if n > MAX_ERROR_RECORDS {
        return None;
    }
    for _ in 0..n {
        d.error_records.push((r.u64()?, r.u64()?));
    }
    (r.pos == b.len()).then_some(d)
}

fn block_bytes(b: &BlockState) -> Vec<u8> {
    let mut v = Vec::new();
    for x in [b.sector, b.buffer, b.reads, b.writes, b.failed, b.disk_errors] {
        v.extend_from_slice(&x.to_le_bytes());
    }
    for x in [b.count, b.disk, b.status] {
        v.extend_from_slice(&x.to_le_bytes());
    }
    for l in b.error_latch {
        v.extend_from_slice(&l.to_le_bytes());
    }
    let n = b.error_records.len().min(MAX_ERROR_RECORDS);
    v.extend_from_slice(&(n as u32).to_le_bytes());
    for (o, f) in &b.error_records[..n] {
        v.extend_from_slice(&o.to_le_bytes());
        v.extend_from_slice(&f.to_le_bytes());
    }
    v
}

fn block_from(bytes: &[u8]) -> Option<BlockState> {
    let mut r = Reader { b: bytes, pos: 0 };
    let mut b = BlockState {
        sector: r.u64()?,
        buffer: r.u64()?,
        reads: r.u64()?,
        writes: r.u64()?,
        failed: r.u64()?,
        disk_errors: r.u64()?,
        count: r.u32()?,
        disk: r.u32()?,
        status: r.u32()?,
        ..Default::default()
    };
    for l in b.error_latch.iter_mut() {
        *l = r.u32()?;
    }
    let n = r.u32()? as usize;
    if n > MAX_ERROR_RECORDS {
        return None;
    }
    for _ in 0..n {
        b.error_records.push((r.u64()?, r.u64()?));
    }
    (r.pos == bytes.len()).then_some(b)
}

struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let s = self.b.get(self.pos..end)?;
        self.pos = end;
        Some(s)
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes(self.take(2)?.try_into().ok()?))
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
}

fn push_section(out: &mut Vec<u8>, n: &mut u32, tag: u32, bytes: &[u8]) {
    out.extend_from_slice(&tag.to_le_bytes());
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(bytes);
    *n += 1;
}

/// Serialize.
pub fn encode(s: &VmState) -> Vec<u8> {
    let mut out = Vec::with_capacity(8192);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes()); // section count, patched below
    let mut n = 0;
    let v = &s.vcpu;
    push_section(&mut out, &mut n, T_REGS, v.regs.as_bytes());
    push_section(&mut out, &mut n, T_SREGS, v.sregs.as_bytes());
    if let Some(f) = &v.fpu {
        push_section(&mut out, &mut n, T_FPU, &fpu_bytes(f));
    }
    if let Some(x) = &v.xsave {
        push_section(&mut out, &mut n, T_XSAVE, x.as_bytes());
    }
    if let Some(x) = &v.xcrs {
        push_section(&mut out, &mut n, T_XCRS, x.as_bytes());
    }
    if let Some(x) = &v.debugregs {
        push_section(&mut out, &mut n, T_DEBUGREGS, x.as_bytes());
    }
    if let Some(x) = &v.lapic {
        push_section(&mut out, &mut n, T_LAPIC, x.as_bytes());
    }
    let mut m = Vec::with_capacity(4 + v.msrs.len() * 12);
    let nm = v.msrs.len().min(MAX_MSRS);
    m.extend_from_slice(&(nm as u32).to_le_bytes());
    for (i, d) in &v.msrs[..nm] {
        m.extend_from_slice(&i.to_le_bytes());
        m.extend_from_slice(&d.to_le_bytes());
    }
    push_section(&mut out, &mut n, T_MSRS, &m);
    if let Some(x) = &v.events {
        push_section(&mut out, &mut n, T_EVENTS, x.as_bytes());
    }
    if let Some(x) = &v.mp_state {
        push_section(&mut out, &mut n, T_MP_STATE, x.as_bytes());
    }
    if let Some(chips) = &s.irqchips {
        for (tag, chip) in [T_PIC_MASTER, T_PIC_SLAVE, T_IOAPIC].into_iter().zip(chips.iter()) {
            push_section(&mut out, &mut n, tag, chip.as_bytes());
        }
    }
    push_section(&mut out, &mut n, T_DEVICE, &device_bytes(&s.device));
    push_section(&mut out, &mut n, T_BLOCK, &block_bytes(&s.block));
    out[12..16].copy_from_slice(&n.to_le_bytes());
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

fn exact<T: FromBytes>(tag: u32, b: &[u8]) -> Result<T, StateError> {
    T::read_from_bytes(b).map_err(|_| StateError::SectionSize { tag, len: b.len(), expected: std::mem::size_of::<T>() })
}

/// Deserialize (never panics on any input).
pub fn decode(blob: &[u8]) -> Result<VmState, StateError> {
    if blob.len() < 20 {
        return Err(StateError::TooShort(blob.len()));
    }
    if blob.len() > MAX_STATE {
        return Err(StateError::TooLarge(blob.len()));
    }
    let (body, crc) = blob.split_at(blob.len() - 4);
    let stored = u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]);
    let computed = crc32fast::hash(body);
    if stored != computed {
        return Err(StateError::Crc { stored, computed });
    }
    if body[..8] != MAGIC {
        return Err(StateError::Magic);
    }
    let mut r = Reader { b: body, pos: 8 };
    let version = r.u32().ok_or(StateError::TooShort(blob.len()))?;
    if version != VERSION {
        return Err(StateError::Version(version));
    }
    let count = r.u32().ok_or(StateError::TooShort(blob.len()))?;
    if count > MAX_SECTIONS {
        return Err(StateError::Section(count));
    }
    let mut s = VmState::default();
    let mut seen = 0u64;
    let (mut regs, mut sregs, mut msrs, mut device) = (false, false, false, false);
    for i in 0..count {
        let tag = r.u32().ok_or(StateError::Section(i))?;
        let len = r.u32().ok_or(StateError::Section(i))? as usize;
        if len > MAX_SECTION {
            return Err(StateError::Section(i));
        }
        let b = r.take(len).ok_or(StateError::Section(i))?;
        if !(1..64).contains(&tag) || seen & (1 << tag) != 0 {
            return Err(StateError::Tag(tag));
        }
        seen |= 1 << tag;
        let v = &mut s.vcpu;
        match tag {
            T_REGS => {
                v.regs = exact(tag, b)?;
                regs = true;
            }
            T_SREGS => {
                v.sregs = exact(tag, b)?;
                sregs = true;
            }
            T_FPU => {
                if b.len() != FPU_LEN {
                    return Err(StateError::SectionSize { tag, len: b.len(), expected: FPU_LEN });
                }
                v.fpu = Some(fpu_from(b).ok_or(StateError::Section(i))?);
            }
            T_XSAVE => {
                v.xsave = Some(Box::new(exact(tag, b)?));
            }
            T_XCRS => v.xcrs = Some(exact(tag, b)?),
            T_DEBUGREGS => v.debugregs = Some(exact(tag, b)?),
            T_LAPIC => v.lapic = Some(Box::new(exact(tag, b)?)),
            T_MSRS => {
                let mut m = Reader { b, pos: 0 };
                let n = m.u32().ok_or(StateError::Section(i))? as usize;
                if n > MAX_MSRS || b.len() != 4 + n * 12 {
                    return Err(StateError::SectionSize { tag, len: b.len(), expected: 4 + n.min(MAX_MSRS) * 12 });
                }
                for _ in 0..n {
                    let idx = m.u32().ok_or(StateError::Section(i))?;
                    let val = m.u64().ok_or(StateError::Section(i))?;
                    v.msrs.push((idx, val));
                }
                msrs = true;
            }
            T_EVENTS => v.events = Some(exact(tag, b)?),
            T_MP_STATE => v.mp_state = Some(exact(tag, b)?),
            T_DEVICE => {
                s.device = device_from(b).ok_or(StateError::Section(i))?;
                device = true;
            }
            T_BLOCK => s.block = block_from(b).ok_or(StateError::Section(i))?,
            T_PIC_MASTER | T_PIC_SLAVE | T_IOAPIC => {
                let chip: kvm_irqchip = exact(tag, b)?;
                let chips = s.irqchips.get_or_insert_with(|| Box::new([kvm_irqchip::default(); 3]));
                chips[(tag - T_PIC_MASTER) as usize] = chip;
            }
            _ => return Err(StateError::Tag(tag)),
        }
    }
    if r.pos != body.len() {
        return Err(StateError::Trailing);
    }
    let chips = [T_PIC_MASTER, T_PIC_SLAVE, T_IOAPIC].iter().filter(|&&t| seen & (1 << t) != 0).count();
    if chips != 0 && chips != 3 {
        return Err(StateError::Missing("one of the interrupt controllers"));
    }
    for (present, name) in [(regs, "regs"), (sregs, "sregs"), (msrs, "msrs"), (device, "device")] {
        if !present {
            return Err(StateError::Missing(name));
        }
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> VmState {
        let mut s = VmState::default();
        s.vcpu.regs.rip = 0x9000;
        s.vcpu.regs.r14 = 42;
        s.vcpu.sregs.cr3 = 0x1000;
        let mut f = kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() };
        f.xmm[3][7] = 9;
        s.vcpu.fpu = Some(f);
        let mut x = Box::new([0u32; 1024]);
        x[5] = 0xdead;
        s.vcpu.xsave = Some(x);
        s.vcpu.msrs = vec![(0x10, 123), (0xc000_0082, 0xffff_8000_0000_0000)];
        s.vcpu.events = Some(kvm_vcpu_events::default());
        s.device.passes = 17;
        s.device.error_records = vec![(0x10_0000, 5)];
        s.block = BlockState {
            sector: 1 << 33,
            count: 8,
            buffer: 0x2_0000,
            status: 2,
            writes: 9,
            disk_errors: 1,
            error_records: vec![(4096, 77)],
            ..Default::default()
        };
        s
    }

    #[test]
    fn roundtrip() {
        let s = sample();
        let b = encode(&s);
        let d = decode(&b).unwrap();
        assert_eq!(d.vcpu.regs, s.vcpu.regs);
        assert_eq!(d.vcpu.sregs, s.vcpu.sregs);
        assert_eq!(d.vcpu.fpu.unwrap().xmm, s.vcpu.fpu.unwrap().xmm);
        assert_eq!(d.vcpu.fpu.unwrap().fcw, 0x37f);
        assert_eq!(d.vcpu.xsave.unwrap()[5], 0xdead);
        assert_eq!(d.vcpu.msrs, s.vcpu.msrs);
        assert_eq!(d.device, s.device);
        assert_eq!(d.block, s.block, "the block device's registers travel");
        // A blob from before the block device (no such section) loads with the device reset.
        let old = VmState { block: BlockState::default(), ..s.clone() };
        let mut b = encode(&old);
        let block_len = block_bytes(&old.block).len() + 8;
        b.truncate(b.len() - 4 - block_len);
        let n = u32::from_le_bytes(b[12..16].try_into().unwrap()) - 1;
        b[12..16].copy_from_slice(&n.to_le_bytes());
        b.extend_from_slice(&[0; 4]);
        assert_eq!(decode(&reseal(b)).unwrap().block, BlockState::default());
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(matches!(decode(b""), Err(StateError::TooShort(0))));
        assert!(matches!(decode(&[0xff; 100]), Err(StateError::Crc { .. })));
        assert!(matches!(decode(&vec![0; MAX_STATE + 1]), Err(StateError::TooLarge(_))));
        let mut b = encode(&sample());
        b[30] ^= 1;
        assert!(matches!(decode(&b), Err(StateError::Crc { .. })));
    }

    fn reseal(mut b: Vec<u8>) -> Vec<u8> {
        let n = b.len() - 4;
        let crc = crc32fast::hash(&b[..n]);
        b[n..].copy_from_slice(&crc.to_le_bytes());
        b
    }

    #[test]
    fn well_sealed_garbage_is_an_error() {
        let good = encode(&sample());
        let mut b = good.clone();
        b[8] = 9; // version
        assert_eq!(decode(&reseal(b)).err(), Some(StateError::Version(9)));
        let mut b = good.clone();
        b[0] = b'X';
        assert_eq!(decode(&reseal(b)).err(), Some(StateError::Magic));
        let mut b = good.clone();
        b[20..24].copy_from_slice(&u32::MAX.to_le_bytes()); // first section length
        assert!(decode(&reseal(b)).is_err());
        let mut b = good.clone();
        b[20..24].copy_from_slice(&8u32.to_le_bytes()); // regs section too short
        assert!(decode(&reseal(b)).is_err());
        // Every single-byte corruption of every position, resealed, must not panic.
        for i in 0..good.len() - 4 {
            for x in [1u8, 0x80, 0xff] {
                let mut b = good.clone();
                b[i] ^= x;
                let _ = decode(&reseal(b));
            }
        }
        // Every truncation, resealed.
        for n in 4..good.len() {
            let mut b = good[..n].to_vec();
            b.extend_from_slice(&[0; 4]);
            let _ = decode(&reseal(b));
        }
    }
}
