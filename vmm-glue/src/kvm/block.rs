//! The KVM guest's paravirtual block device: a handful of 32-bit I/O ports through which the
//! guest program reads and writes sectors of the VM's disks, each a [`ferry_disk::Disk`] (so
//! every guest write lands in the disk's dirty-block log and, during a storage move, in its
//! mirror).
//!
//! | port | dir | register |
//! |---|---|---|
//! | [`PORT_SECTOR_LO`], [`PORT_SECTOR_HI`] | out | first sector (512 bytes each), in halves |
//! | [`PORT_COUNT`] | out | sectors (1 ..= [`MAX_REQUEST_SECTORS`]) |
//! | [`PORT_BUF_LO`], [`PORT_BUF_HI`] | out | guest-physical address of the buffer, in halves |
//! | [`PORT_DISK`] | out | which disk (index, 0 at reset) |
//! | [`PORT_CMD`] | out | [`CMD_READ`] or [`CMD_WRITE`]: runs the request at once |
//! | [`PORT_STATUS`] | in | status of the last command ([`STATUS_OK`] or an error) |
//! | [`PORT_CAP_LO`], [`PORT_CAP_HI`] | in | the selected disk's size in whole sectors |
//! | [`PORT_DERR_OFF_LO`] .. [`PORT_DERR_VAL_HI`] | out | the guest reports a disk word it found wrong: offset, value |
//!
//! A request runs synchronously on the vCPU thread while the guest waits in its `OUT`, so once a
//! pause returns no request is in flight, and the registers (kept between requests: the guest
//! program issues a write with the registers of the read before it) are the whole device state;
//! they travel with the VM ([`BlockState`], a section of [`super::state`]).
//!
//! Everything the guest writes is checked before it is used: a disk index that does not exist,
//! a count of 0 or above the maximum, a range past the disk's last whole sector (a disk whose
//! size is not a multiple of 512 keeps its tail out of reach), a buffer that is not inside one
//! region of guest memory, an unknown command: each gives an error status, counted, and nothing
//! is read or written. A disk error (I/O, file system full) is [`STATUS_IO`]. A read into guest
//! memory marks the buffer's pages dirty for the memory migration (KVM's log does not see the
//! VMM's writes).

use std::sync::{Arc, Mutex};

use ferry_disk::Disk;
use ferry_memory::MemoryMap;
use ferry_migrate::vm::DirtyBitmap;

use super::state::MAX_ERROR_RECORDS;

/// Bytes per sector.
pub const SECTOR_BYTES: u64 = 512;
/// Most sectors in one request (128 KiB).
pub const MAX_REQUEST_SECTORS: u32 = 256;

/// Port: first sector, low 32 bits.
pub const PORT_SECTOR_LO: u16 = 0x100;
/// Port: first sector, high 32 bits.
pub const PORT_SECTOR_HI: u16 = 0x104;
/// Port: sectors in the request.
pub const PORT_COUNT: u16 = 0x108;
/// Port: buffer GPA, low 32 bits.
pub const PORT_BUF_LO: u16 = 0x10C;
/// Port: buffer GPA, high 32 bits.
pub const PORT_BUF_HI: u16 = 0x110;
/// Port: disk index.
pub const PORT_DISK: u16 = 0x114;
/// Port: command (runs the request).
pub const PORT_CMD: u16 = 0x118;
/// Port (in): status of the last command.
pub const PORT_STATUS: u16 = 0x11C;
/// Port (in): the selected disk's whole sectors, low 32 bits.
pub const PORT_CAP_LO: u16 = 0x120;
/// Port (in): the selected disk's whole sectors, high 32 bits.
pub const PORT_CAP_HI: u16 = 0x124;
/// Port: disk offset of a word the guest found wrong, low 32 bits.
pub const PORT_DERR_OFF_LO: u16 = 0x130;
/// Port: that offset, high 32 bits.
pub const PORT_DERR_OFF_HI: u16 = 0x134;
/// Port: the value found, low 32 bits.
pub const PORT_DERR_VAL_LO: u16 = 0x138;
/// Port: the value found, high 32 bits (completes a disk error record).
pub const PORT_DERR_VAL_HI: u16 = 0x13C;

/// Command: read sectors into the buffer.
pub const CMD_READ: u32 = 1;
/// Command: write the buffer to sectors.
pub const CMD_WRITE: u32 = 2;

/// Status: done.
pub const STATUS_OK: u32 = 0;
/// Status: the sectors run past the disk.
pub const STATUS_BAD_RANGE: u32 = 1;
/// Status: the buffer is not inside one region of guest memory.
pub const STATUS_BAD_BUFFER: u32 = 2;
/// Status: the disk's file failed.
pub const STATUS_IO: u32 = 3;
/// Status: unknown command.
pub const STATUS_BAD_COMMAND: u32 = 4;
/// Status: no disk with that index.
pub const STATUS_NO_DISK: u32 = 5;
/// Status: count 0 or above [`MAX_REQUEST_SECTORS`].
pub const STATUS_BAD_COUNT: u32 = 6;

/// Is `port` one of the block device's?
pub fn is_block_port(port: u16) -> bool {
    (PORT_SECTOR_LO..=PORT_DERR_VAL_HI).contains(&port)
}

/// The device's registers and counters: part of the VM's saved state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BlockState {
    /// First sector of the request.
    pub sector: u64,
    /// Sectors in the request.
    pub count: u32,
    /// Buffer GPA.
    pub buffer: u64,
    /// Selected disk.
    pub disk: u32,
    /// Status of the last command.
    pub status: u32,
    /// Read requests done.
    pub reads: u64,
    /// Write requests done.
    pub writes: u64,
    /// Commands refused or failed (any status but OK).
    pub failed: u64,
    /// Latched halves of a disk error report (offset lo/hi, value lo/hi).
    pub error_latch: [u32; 4],
    /// Disk words the guest reported wrong.
    pub disk_errors: u64,
    /// The first of them: (disk offset, value found).
    pub error_records: Vec<(u64, u64)>,
}

/// The device: registers, the disks, the guest memory it reads and writes.
pub(crate) struct BlockDevice {
    pub(crate) state: BlockState,
    pub(crate) disks: Vec<Arc<Disk>>,
    mem: MemoryMap,
    dirty: Arc<Mutex<DirtyBitmap>>,
    staging: Vec<u8>,
}

fn set_lo(v: &mut u64, x: u32) {
    *v = (*v & !0xffff_ffff) | u64::from(x);
}

fn set_hi(v: &mut u64, x: u32) {
    *v = (*v & 0xffff_ffff) | (u64::from(x) << 32);
}

impl BlockDevice {
    pub(crate) fn new(mem: MemoryMap, dirty: Arc<Mutex<DirtyBitmap>>) -> Self {
        Self { state: BlockState::default(), disks: Vec::new(), mem, dirty, staging: Vec::new() }
    }

    /// A guest `OUT` to one of the device's ports.
    pub(crate) fn port_out(&mut self, port: u16, v: u32) {
        let s = &mut self.state;
        match port {
            PORT_SECTOR_LO => set_lo(&mut s.sector, v),
            PORT_SECTOR_HI => set_hi(&mut s.sector, v),
            PORT_COUNT => s.count = v,
            PORT_BUF_LO => set_lo(&mut s.buffer, v),
            PORT_BUF_HI => set_hi(&mut s.buffer, v),
            PORT_DISK => s.disk = v,
            PORT_CMD => {
                let status = self.run(v);
                let s = &mut self.state;
                s.status = status;
                if status != STATUS_OK {
                    s.failed += 1;
                }
            }
            PORT_DERR_OFF_LO..=PORT_DERR_VAL_HI if port.is_multiple_of(4) => {
                s.error_latch[usize::from((port - PORT_DERR_OFF_LO) / 4)] = v;
                if port == PORT_DERR_VAL_HI {
                    s.disk_errors += 1;
                    if s.error_records.len() < MAX_ERROR_RECORDS {
                        let l = s.error_latch;
                        let pair = |i: usize| u64::from(l[i]) | (u64::from(l[i + 1]) << 32);
                        s.error_records.push((pair(0), pair(2)));
                    }
                }
            }
            _ => {}
        }
    }

    /// A guest `IN` from one of the device's ports (0 for a port that reads nothing).
    pub(crate) fn port_in(&self, port: u16) -> u32 {
        let cap = || self.disks.get(self.state.disk as usize).map_or(0, |d| d.size_bytes() / SECTOR_BYTES);
        match port {
            PORT_STATUS => self.state.status,
            PORT_CAP_LO => cap() as u32,
            PORT_CAP_HI => (cap() >> 32) as u32,
            _ => 0,
        }
    }

    /// Run a command with the current registers; returns its status.
    fn run(&mut self, cmd: u32) -> u32 {
        if cmd != CMD_READ && cmd != CMD_WRITE {
            return STATUS_BAD_COMMAND;
        }
        let s = &self.state;
        let Some(disk) = self.disks.get(s.disk as usize) else {
            return STATUS_NO_DISK;
        };
        if s.count == 0 || s.count > MAX_REQUEST_SECTORS {
            return STATUS_BAD_COUNT;
        }
        let sectors = disk.size_bytes() / SECTOR_BYTES;
        if s.sector.checked_add(u64::from(s.count)).is_none_or(|end| end > sectors) {
            return STATUS_BAD_RANGE;
        }
        let len = u64::from(s.count) * SECTOR_BYTES; // <= 128 KiB
        let Some(buf) = self.mem.lookup(s.buffer, len as usize) else {
            return STATUS_BAD_BUFFER;
        };
        let off = s.sector * SECTOR_BYTES; // < disk size: no overflow
        self.staging.resize(len as usize, 0);
        if cmd == CMD_READ {
            if disk.read_at(off, &mut self.staging).is_err() {
                return STATUS_IO;
            }
            buf.write_from(0, &self.staging);
            super::mark_dirty(&self.dirty, s.buffer, len);
            self.state.reads += 1;
        } else {
            buf.read_into(0, &mut self.staging);
            if disk.write_at(off, &self.staging).is_err() {
                return STATUS_IO;
            }
            self.state.writes += 1;
        }
        STATUS_OK
    }
}

/// The value the guest program writes at byte `off` of its disk in generation `gen` (0: never
/// written, zeros): `(2 * off + 1) * gen * K`, an odd factor times the generation's, so distinct
/// generations and offsets give distinct words.
pub fn disk_stamp(off: u64, gen: u64) -> u64 {
    off.wrapping_mul(2).wrapping_add(1).wrapping_mul(gen.wrapping_mul(super::guest::K))
}

/// Check every sector of `disk` against what the guest program wrote there, from the host (the
/// guest paused): `slots` requests of `request_sectors` sectors at the start of the disk, slot
/// `(g - 1) % slots` written by generation `g`, and `last_gen` the last generation the guest
/// published as written (the one after it may have been written too, if the guest was paused
/// before it published it); zeros everywhere else. Returns the sectors that differ.
pub fn check_guest_disk(
    disk: &Disk,
    slots: u64,
    request_sectors: u32,
    last_gen: u64,
) -> Result<u64, ferry_disk::DiskError> {
    let size = disk.size_bytes();
    let req_bytes = u64::from(request_sectors) * SECTOR_BYTES;
    let ws_bytes = slots.saturating_mul(req_bytes).min(size);
    let mut bad = 0;
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0;
    while off < size {
        let len = (buf.len() as u64).min(size - off) as usize;
        disk.read_at(off, &mut buf[..len])?;
        for (i, sector) in buf[..len].chunks(SECTOR_BYTES as usize).enumerate() {
            let soff = off + (i * SECTOR_BYTES as usize) as u64;
            let ok = if soff < ws_bytes && soff + SECTOR_BYTES <= size {
                let slot = soff / req_bytes;
                // The latest generation <= last_gen + 1 that writes this slot, and the one before.
                let newest = last_gen + 1;
                let g1 = if newest > slot { newest - (newest - (slot + 1)) % slots } else { 0 };
                let g0 = g1.saturating_sub(slots);
                let holds = |g: u64| {
                    sector.chunks_exact(8).enumerate().all(|(w, b)| {
                        u64::from_le_bytes(b.try_into().unwrap_or_default()) == disk_stamp(soff + 8 * w as u64, g)
                    })
                };
                if g1 == newest {
                    holds(g1) || holds(g0)
                } else {
                    holds(g1)
                }
            } else {
                sector.iter().all(|&b| b == 0)
            };
            if !ok {
                bad += 1;
            }
        }
        off += len as u64;
    }
    Ok(bad)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_memory::AnonMemory;
    use ferry_migrate::vm::RegionBitmap;

    fn device(dir: &std::path::Path, size: u64) -> (BlockDevice, Arc<AnonMemory>, Arc<Mutex<DirtyBitmap>>) {
        let mem = Arc::new(AnonMemory::new(1 << 20, false).unwrap());
        let map = MemoryMap::from_anon([(0, mem.clone())]).unwrap();
        let dirty = Arc::new(Mutex::new(DirtyBitmap { regions: vec![RegionBitmap::new(0, 256)] }));
        let path = dir.join("d.img");
        ferry_disk::image::create_sparse(&path, size).unwrap();
        let mut dev = BlockDevice::new(map, dirty.clone());
        dev.disks = vec![Arc::new(Disk::open(&path).unwrap())];
        (dev, mem, dirty)
    }

    fn request(dev: &mut BlockDevice, sector: u64, count: u32, buf: u64, cmd: u32) -> u32 {
        dev.port_out(PORT_SECTOR_LO, sector as u32);
        dev.port_out(PORT_SECTOR_HI, (sector >> 32) as u32);
        dev.port_out(PORT_COUNT, count);
        dev.port_out(PORT_BUF_LO, buf as u32);
        dev.port_out(PORT_BUF_HI, (buf >> 32) as u32);
        dev.port_out(PORT_CMD, cmd);
        dev.port_in(PORT_STATUS)
    }

    #[test]
    fn reads_and_writes_go_through_the_disk_and_mark_dirty() {
        let dir = tempfile::tempdir().unwrap();
        let size = (1 << 20) + 300; // not a multiple of a sector: the tail is out of reach
        let (mut dev, mem, dirty) = device(dir.path(), size);
        assert_eq!(dev.port_in(PORT_CAP_LO), 2048);
        assert_eq!(dev.port_in(PORT_CAP_HI), 0);
        let disk = dev.disks[0].clone();
        disk.dirty_log().start();
        mem.write_from(0x4000, &[0xab; 1024]);
        assert_eq!(request(&mut dev, 2047, 1, 0x4000, CMD_WRITE), STATUS_OK);
        let mut got = [0u8; 512];
        disk.read_at(2047 * 512, &mut got).unwrap();
        assert_eq!(got, [0xab; 512]);
        let take = disk.dirty_log().take();
        assert_eq!(take.set().runs(), vec![((2047 * 512) / ferry_disk::BLOCK_BYTES, 1)], "the write is logged");
        assert_eq!(request(&mut dev, 2046, 2, 0x8000, CMD_READ), STATUS_OK);
        let mut back = [0u8; 1024];
        mem.read_into(0x8000, &mut back);
        assert_eq!(&back[..512], &[0; 512]);
        assert_eq!(&back[512..], &[0xab; 512]);
        let d = dirty.lock().unwrap();
        assert!(d.regions[0].get(8) && !d.regions[0].get(9) && !d.regions[0].get(7), "the read's buffer page is dirty");
        assert_eq!((dev.state.reads, dev.state.writes, dev.state.failed), (1, 1, 0));
    }

    #[test]
    fn hostile_registers_get_an_error_status_and_touch_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (mut dev, mem, _) = device(dir.path(), 1 << 20);
        dev.disks[0].dirty_log().start();
        mem.write_from(0, &[0x5a; 4096]);
        let cases = [
            (2048, 1, 0, CMD_WRITE, STATUS_BAD_RANGE),        // past the end
            (2047, 2, 0, CMD_WRITE, STATUS_BAD_RANGE),        // runs past the end
            (u64::MAX, 1, 0, CMD_WRITE, STATUS_BAD_RANGE),    // overflows
            (u64::MAX - 1, 2, 0, CMD_READ, STATUS_BAD_RANGE), // overflows
            (0, 0, 0, CMD_WRITE, STATUS_BAD_COUNT),           // nothing
            (0, MAX_REQUEST_SECTORS + 1, 0, CMD_WRITE, STATUS_BAD_COUNT),
            (0, u32::MAX, 0, CMD_READ, STATUS_BAD_COUNT),
            (0, 1, (1 << 20) - 511, CMD_READ, STATUS_BAD_BUFFER), // buffer runs past memory
            (0, 1, 1 << 40, CMD_READ, STATUS_BAD_BUFFER),         // outside memory
            (0, 1, u64::MAX - 10, CMD_WRITE, STATUS_BAD_BUFFER),  // wraps
            (0, 1, 0, 0, STATUS_BAD_COMMAND),
            (0, 1, 0, 77, STATUS_BAD_COMMAND),
        ];
        for (i, &(sector, count, buf, cmd, want)) in cases.iter().enumerate() {
            assert_eq!(request(&mut dev, sector, count, buf, cmd), want, "case {i}");
        }
        dev.port_out(PORT_DISK, 1);
        assert_eq!(request(&mut dev, 0, 1, 0, CMD_WRITE), STATUS_NO_DISK);
        assert_eq!(dev.port_in(PORT_CAP_LO), 0);
        assert_eq!(dev.state.failed, cases.len() as u64 + 1);
        assert_eq!((dev.state.reads, dev.state.writes), (0, 0));
        let disk = &dev.disks[0];
        assert_eq!(disk.dirty_log().pending(), 0, "nothing written");
        assert_eq!(disk.allocated_bytes().unwrap(), 0);
        // Unknown ports in the range are ignored.
        dev.port_out(PORT_DISK + 1, 9);
        dev.port_out(0x128, 9);
        assert_eq!(dev.port_in(0x12C), 0);
    }

    #[test]
    fn guest_error_reports_are_latched_and_capped() {
        let dir = tempfile::tempdir().unwrap();
        let (mut dev, _, _) = device(dir.path(), 1 << 20);
        for i in 0..20u32 {
            dev.port_out(PORT_DERR_OFF_LO, 8 * i);
            dev.port_out(PORT_DERR_OFF_HI, 1);
            dev.port_out(PORT_DERR_VAL_LO, 7);
            dev.port_out(PORT_DERR_VAL_HI, 0);
        }
        assert_eq!(dev.state.disk_errors, 20);
        assert_eq!(dev.state.error_records.len(), MAX_ERROR_RECORDS);
        assert_eq!(dev.state.error_records[1], ((1 << 32) | 8, 7));
    }

    #[test]
    fn the_host_check_follows_the_generations() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.img");
        let size = 64 * 1024 + 1000;
        ferry_disk::image::create_sparse(&path, size).unwrap();
        let disk = Disk::open(&path).unwrap();
        let (slots, count) = (5u64, 4u32);
        let write_gen = |g: u64| {
            let slot = (g - 1) % slots;
            let off = slot * u64::from(count) * SECTOR_BYTES;
            let data: Vec<u8> =
                (0..u64::from(count) * 64).flat_map(|w| disk_stamp(off + 8 * w, g).to_le_bytes()).collect();
            disk.write_at(off, &data).unwrap();
        };
        assert_eq!(check_guest_disk(&disk, slots, count, 0).unwrap(), 0);
        for g in 1..=12 {
            write_gen(g);
        }
        assert_eq!(check_guest_disk(&disk, slots, count, 12).unwrap(), 0);
        assert_eq!(check_guest_disk(&disk, slots, count, 11).unwrap(), 0, "the newest may be unpublished");
        assert_eq!(check_guest_disk(&disk, slots, count, 10).unwrap(), u64::from(count), "two ahead is wrong");
        assert_eq!(check_guest_disk(&disk, slots, count, 17).unwrap(), 5 * u64::from(count), "missing writes");
        disk.write_at(size - 1, &[1]).unwrap();
        assert_eq!(check_guest_disk(&disk, slots, count, 12).unwrap(), 1, "the tail is checked");
    }
}
