//! A synthetic guest: guest memory filled with a page mixture (or loaded from a raw memory image)
//! and an optional writer thread that dirties a working set at a set rate. It implements the
//! engine's [`SourceVm`], [`TargetVm`] and [`TargetFactory`] for real: dirty pages are tracked
//! in an atomic bitmap, pause really stops the writer, the state blob carries the writer's state.
//!
//! Every page the writer touches gets a self-describing stamp (magic, page index, generation and a
//! checksum of the rest of the page), and the writer keeps each page's generation in its state,
//! so [`check_stamps`] can prove after a migration that no written page was lost or stale.

use std::fs::File;
use std::io::Read;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::guestdisk::{self, DiskSpec, DiskWriterCounters, DiskWriterState, SECTOR_BYTES};
use crate::pagemix::{fill_page, splitmix, Mix, PageKind};
use ferry_disk::Disk;
use ferry_memory::reserve::MemoryReserve;
use ferry_memory::{AnonMemory, MemoryMap};
use ferry_migrate::vm::{DirtyBitmap, RegionBitmap, SourceVm, TargetFactory, TargetVm, VmError, VmShape};
use ferry_transport::wire::PAGE_SIZE;

/// Errors of the synthetic guest.
#[derive(Debug, thiserror::Error)]
pub enum SyntheticError {
    /// Memory could not be mapped.
    #[error(transparent)]
    Memory(#[from] ferry_memory::MemoryError),
    /// The image file could not be read.
    #[error("reading memory image {path}: {err}")]
    Image {
        /// Path.
        path: PathBuf,
        /// Error.
        err: std::io::Error,
    },
    /// A state blob that does not decode.
    #[error("bad synthetic state blob: {0}")]
    BadState(&'static str),
    /// A VM with this id already exists on this host.
    #[error("a VM with id {0:?} already exists on this host")]
    Duplicate(String),
    /// The shape cannot be hosted.
    #[error("cannot host {needed} bytes of guest memory (limit {limit})")]
    TooBig {
        /// Asked.
        needed: u64,
        /// Limit.
        limit: u64,
    },
    /// Invalid shape.
    #[error("invalid VM shape: {0}")]
    BadShape(&'static str),
    /// A disk could not be opened or read.
    #[error(transparent)]
    Disk(#[from] ferry_disk::DiskError),
}

/// How to build a synthetic guest.
#[derive(Debug, Clone)]
pub struct SyntheticConfig {
    /// VM id.
    pub vm_id: String,
    /// Guest memory bytes (split over `regions` regions of unequal, non-64-page-multiple sizes).
    pub memory_bytes: u64,
    /// Number of regions.
    pub regions: usize,
    /// Page mixture.
    pub mix: Mix,
    /// Seed of the contents.
    pub seed: u64,
    /// Load memory from this raw image instead (its length sets the memory size).
    pub image: Option<PathBuf>,
    /// Bytes of the working set the writer rewrites (0 = no writer).
    pub working_set_bytes: u64,
    /// Writer pace in bytes per second (0 = as fast as it can).
    pub dirty_rate_bytes_per_s: u64,
    /// Disks (images that exist: see [`crate::guestdisk::create_image`]).
    pub disks: Vec<DiskSpec>,
    /// Bytes at the start of each disk that the disk writer rewrites (0 = no disk writer).
    pub disk_working_set_bytes: u64,
    /// Disk writer pace in bytes per second over all disks (0 = as fast as it can).
    pub disk_write_rate_bytes_per_s: u64,
}

impl Default for SyntheticConfig {
    fn default() -> Self {
        Self {
            vm_id: "synthetic-0".into(),
            memory_bytes: 64 << 20,
            regions: 3,
            mix: Mix::default(),
            seed: 1,
            image: None,
            working_set_bytes: 0,
            dirty_rate_bytes_per_s: 0,
            disks: Vec::new(),
            disk_working_set_bytes: 0,
            disk_write_rate_bytes_per_s: 0,
        }
    }
}

/// Split `pages` into `n` regions of unequal sizes, none a multiple of 64 pages (bitmap edges),
/// with 1 MiB holes between them. Returns (gpa, bytes).
pub fn layout(pages: u64, n: usize) -> Vec<(u64, u64)> {
    let n = n.clamp(1, 8) as u64;
    let n = n.min(pages.max(1));
    let mut out = Vec::new();
    let mut gpa = 0u64;
    let mut left = pages;
    for i in 0..n {
        let mut p = if i == n - 1 { left } else { (pages / n) + i * 13 + 7 };
        p = p.min(left - (n - 1 - i));
        if p % 64 == 0 && i != n - 1 && p > 1 {
            p -= 1;
        }
        out.push((gpa, p * PAGE_SIZE as u64));
        gpa += p * PAGE_SIZE as u64 + (1 << 20);
        left -= p;
    }
    out
}

/// Read the next page of a raw memory image into `page` (a file's tail short of a page reads as
/// if zero-padded; past the end, a zero page).
pub fn read_image_page(r: &mut impl Read, page: &mut [u8]) -> std::io::Result<()> {
    page.fill(0);
    let mut got = 0;
    while got < page.len() {
        match r.read(&mut page[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

const STAMP_MAGIC: u64 = 0x5354_414d_5046_5259; // "YRFPMATS"

struct Shared {
    dirty: Vec<Vec<AtomicU64>>, // per region, per 64 pages
    logging: AtomicBool,
    throttle: AtomicU8,
    /// (paused asked, writers parked), under one lock with one condvar.
    run: Mutex<(bool, u32)>,
    cv: Condvar,
    stop: AtomicBool,
    writes: AtomicU64,
    generation: AtomicU64,
}

/// Writer state: what the state blob carries.
#[derive(Debug, Clone, PartialEq, Eq)]
struct WriterState {
    rng: u64,
    generation: u64,
    /// generation last written per working-set page (0 = never)
    gens: Vec<u64>,
}

/// The synthetic guest (source side, or a received VM after commit).
pub struct SyntheticVm {
    shape: VmShape,
    mem: Vec<Arc<AnonMemory>>,
    map: MemoryMap,
    shared: Arc<Shared>,
    writer: Option<JoinHandle<()>>,
    state: Arc<Mutex<WriterState>>,
    ws_pages: u64,
    rate: u64,
    running: bool,
    /// Disks and their writer (boxed: most guests have none and the VM stays small).
    disk: Box<GuestDisks>,
}

/// A synthetic guest's disks and disk writer.
#[derive(Default)]
struct GuestDisks {
    disks: Vec<Arc<Disk>>,
    specs: Vec<DiskSpec>,
    state: Arc<Mutex<DiskWriterState>>,
    counters: Arc<DiskWriterCounters>,
    writer: Option<JoinHandle<()>>,
}

/// The map of a guest's regions; it holds each region's memory, so it stays valid after the VM.
fn region_maps(mem: &[Arc<AnonMemory>], shape: &VmShape) -> Result<MemoryMap, SyntheticError> {
    Ok(MemoryMap::from_anon(shape.regions.iter().zip(mem).map(|(&(gpa, _), m)| (gpa, m.clone())))?)
}

fn shared_for(shape: &VmShape) -> Arc<Shared> {
    Arc::new(Shared {
        dirty: shape
            .regions
            .iter()
            .map(|r| (0..(r.1 / PAGE_SIZE as u64).div_ceil(64)).map(|_| AtomicU64::new(0)).collect())
            .collect(),
        logging: AtomicBool::new(false),
        throttle: AtomicU8::new(100),
        run: Mutex::new((true, 0)),
        cv: Condvar::new(),
        stop: AtomicBool::new(false),
        writes: AtomicU64::new(0),
        generation: AtomicU64::new(0),
    })
}

/// (region, page within region) of global page `i`.
fn locate(shape: &VmShape, mut i: u64) -> (usize, u64) {
    for (r, &(_, len)) in shape.regions.iter().enumerate() {
        let pages = len / PAGE_SIZE as u64;
        if i < pages {
            return (r, i);
        }
        i -= pages;
    }
    (shape.regions.len() - 1, 0)
}

fn write_stamp(page: &mut [u8], index: u64, generation: u64) {
    let mut s = index ^ generation.rotate_left(17);
    for c in page[32..].chunks_exact_mut(8) {
        c.copy_from_slice(&splitmix(&mut s).to_le_bytes());
    }
    let sum = page[32..]
        .chunks_exact(8)
        .fold(0u64, |a, c| a.rotate_left(5) ^ u64::from_le_bytes(c.try_into().unwrap_or([0; 8])));
    page[0..8].copy_from_slice(&STAMP_MAGIC.to_le_bytes());
    page[8..16].copy_from_slice(&index.to_le_bytes());
    page[16..24].copy_from_slice(&generation.to_le_bytes());
    page[24..32].copy_from_slice(&sum.to_le_bytes());
}

fn writer_loop(
    shape: VmShape,
    mem: Vec<Arc<AnonMemory>>,
    sh: Arc<Shared>,
    st: Arc<Mutex<WriterState>>,
    ws_pages: u64,
    rate: u64,
) {
    let mut page = vec![0u8; PAGE_SIZE];
    let tick = Duration::from_millis(5);
    let mut next = Instant::now();
    let mut st_local = match st.lock() {
        Ok(g) => g.clone(),
        Err(_) => return,
    };
    loop {
        // Pause point: park and publish state.
        let was_paused = sh.run.lock().map(|r| r.0).unwrap_or(false);
        if !park_point(&sh, &st, &mut st_local) {
            return;
        }
        if was_paused {
            next = Instant::now();
        }
        // Pages this tick: rate * tick * throttle.
        let thr = u64::from(sh.throttle.load(Ordering::Relaxed).max(1));
        let per_tick = if rate == 0 {
            256
        } else {
            ((rate as f64 * tick.as_secs_f64()) as u64 / PAGE_SIZE as u64).max(1) * thr / 100
        };
        for _ in 0..per_tick.max(1) {
            let idx = splitmix(&mut st_local.rng) % ws_pages;
            st_local.generation += 1;
            let g = st_local.generation;
            st_local.gens[idx as usize] = g;
            write_stamp(&mut page, idx, g);
            let (r, p) = locate(&shape, idx);
            mem[r].write_from(p as usize * PAGE_SIZE, &page);
            // write, then mark: a take that clears between the two still sees the mark later.
            if sh.logging.load(Ordering::Acquire) {
                sh.dirty[r][(p / 64) as usize].fetch_or(1 << (p % 64), Ordering::AcqRel);
            }
            sh.writes.fetch_add(1, Ordering::Relaxed);
            sh.generation.store(g, Ordering::Relaxed);
        }
        if rate != 0 || thr < 100 {
            next += tick;
            let now = Instant::now();
            if next > now {
                std::thread::sleep(next - now);
            } else if now - next > Duration::from_millis(100) {
                next = now; // fell behind: do not burst
            }
        }
    }
}

/// Park while a pause is asked (publishing the writer's state first); returns false on stop.
fn park_point<T: Clone>(sh: &Shared, st: &Mutex<T>, local: &mut T) -> bool {
    let mut run = sh.run.lock().unwrap_or_else(|e| e.into_inner());
    if run.0 {
        if let Ok(mut g) = st.lock() {
            *g = local.clone();
        }
        run.1 += 1;
        sh.cv.notify_all();
        while run.0 && !sh.stop.load(Ordering::SeqCst) {
            run = sh.cv.wait(run).unwrap_or_else(|e| e.into_inner());
        }
        if let Ok(g) = st.lock() {
            *local = g.clone();
        }
        run.1 -= 1;
    }
    !sh.stop.load(Ordering::SeqCst)
}

fn disk_writer_loop(
    disks: Vec<Arc<Disk>>,
    sh: Arc<Shared>,
    st: Arc<Mutex<DiskWriterState>>,
    counters: Arc<DiskWriterCounters>,
    rate: u64,
) {
    let mut buf = vec![0u8; SECTOR_BYTES as usize];
    let tick = Duration::from_millis(5);
    let mut next = Instant::now();
    let mut local = match st.lock() {
        Ok(g) => g.clone(),
        Err(_) => return,
    };
    let mut failed = false;
    loop {
        let was_parked = sh.run.lock().map(|r| r.0).unwrap_or(false);
        if !park_point(&sh, &st, &mut local) {
            return;
        }
        if was_parked {
            next = Instant::now();
        }
        let budget = if rate == 0 { 64 * SECTOR_BYTES } else { ((rate as f64 * tick.as_secs_f64()) as u64).max(1) };
        let mut done = 0;
        while done < budget && !failed {
            match local.write_one(&disks, &mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    done += n;
                    counters.writes.fetch_add(1, Ordering::Relaxed);
                    counters.bytes.fetch_add(n, Ordering::Relaxed);
                }
                Err(_) => {
                    counters.errors.fetch_add(1, Ordering::Relaxed);
                    failed = true; // a disk that fails stops the writer (as a guest would see EIO)
                }
            }
        }
        if rate != 0 || failed {
            next += tick;
            let now = Instant::now();
            if next > now {
                std::thread::sleep(next - now);
            } else if now - next > Duration::from_millis(100) {
                next = now;
            }
        }
    }
}

impl SyntheticVm {
    /// Build the guest: map and fill memory, start the writer (paused until [`SourceVm::resume`]).
    pub fn new(cfg: &SyntheticConfig) -> Result<Self, SyntheticError> {
        let mut image = None;
        let bytes = if let Some(p) = &cfg.image {
            let f = File::open(p).map_err(|err| SyntheticError::Image { path: p.clone(), err })?;
            let len = f.metadata().map_err(|err| SyntheticError::Image { path: p.clone(), err })?.len();
            image = Some(f);
            len.div_ceil(PAGE_SIZE as u64) * PAGE_SIZE as u64
        } else {
            cfg.memory_bytes.div_ceil(PAGE_SIZE as u64) * PAGE_SIZE as u64
        };
        let pages = (bytes / PAGE_SIZE as u64).max(1);
        let shape = VmShape { vm_id: cfg.vm_id.clone(), regions: layout(pages, cfg.regions) };
        let mut mem = Vec::new();
        for &(_, len) in &shape.regions {
            mem.push(Arc::new(AnonMemory::new(len as usize, false)?));
        }
        let mut buf = vec![0u8; PAGE_SIZE];
        let mut idx = 0u64;
        for (m, &(_, len)) in mem.iter().zip(&shape.regions) {
            for p in 0..len / PAGE_SIZE as u64 {
                if let Some(f) = image.as_mut() {
                    read_image_page(f, &mut buf)
                        .map_err(|err| SyntheticError::Image { path: cfg.image.clone().unwrap_or_default(), err })?;
                    if buf.iter().any(|&b| b != 0) {
                        m.write_from(p as usize * PAGE_SIZE, &buf);
                    }
                } else {
                    let k = cfg.mix.kind(cfg.seed, idx);
                    if k != PageKind::Zero {
                        fill_page(&mut buf, k, cfg.seed, idx);
                        m.write_from(p as usize * PAGE_SIZE, &buf);
                    }
                }
                idx += 1;
            }
        }
        let ws_pages = (cfg.working_set_bytes / PAGE_SIZE as u64).min(pages);
        let mut vm = Self::assemble(
            shape,
            mem,
            WriterState { rng: cfg.seed ^ 0xabcdef, generation: 0, gens: vec![0; ws_pages as usize] },
            ws_pages,
            cfg.dirty_rate_bytes_per_s,
        )?;
        if !cfg.disks.is_empty() {
            vm.attach_disks(cfg)?;
        }
        Ok(vm)
    }

    fn attach_disks(&mut self, cfg: &SyntheticConfig) -> Result<(), SyntheticError> {
        let g = &mut self.disk;
        g.disks = guestdisk::open_disks(&cfg.disks)?;
        g.specs = cfg.disks.clone();
        let sectors = guestdisk::working_set_sectors(&cfg.disks, cfg.disk_working_set_bytes);
        g.state = Arc::new(Mutex::new(DiskWriterState::new(cfg.seed, &sectors)));
        if cfg.disk_working_set_bytes > 0 {
            let (d, sh, st, c) = (g.disks.clone(), self.shared.clone(), g.state.clone(), g.counters.clone());
            let rate = cfg.disk_write_rate_bytes_per_s;
            g.writer = Some(std::thread::spawn(move || disk_writer_loop(d, sh, st, c, rate)));
        }
        Ok(())
    }

    /// Threads that write guest state (each parks on pause).
    fn writers(&self) -> u32 {
        u32::from(self.writer.is_some()) + u32::from(self.disk.writer.is_some())
    }

    /// The guest's disks.
    pub fn disks(&self) -> &[Arc<Disk>] {
        &self.disk.disks
    }

    /// Sectors the disk writer has written (and bytes).
    pub fn disk_writes(&self) -> (u64, u64) {
        (self.disk.counters.writes.load(Ordering::Relaxed), self.disk.counters.bytes.load(Ordering::Relaxed))
    }

    /// Disk writes that failed (the writer stops at the first).
    pub fn disk_write_errors(&self) -> u64 {
        self.disk.counters.errors.load(Ordering::Relaxed)
    }

    /// Check every sector of every disk against what the guest wrote (see
    /// [`guestdisk::check_disk`]); returns the sectors that differ, per disk. Call while paused.
    pub fn check_disks(&self) -> Result<Vec<u64>, SyntheticError> {
        let st = self.disk.state.lock().map_err(|_| SyntheticError::BadState("disk writer state poisoned"))?.clone();
        let mut out = Vec::new();
        for (i, (d, spec)) in self.disk.disks.iter().zip(&self.disk.specs).enumerate() {
            out.push(guestdisk::check_disk(d, i as u64, spec, &st.gens[i])?);
        }
        Ok(out)
    }

    fn assemble(
        shape: VmShape,
        mem: Vec<Arc<AnonMemory>>,
        st: WriterState,
        ws_pages: u64,
        rate: u64,
    ) -> Result<Self, SyntheticError> {
        let map = region_maps(&mem, &shape)?;
        let shared = shared_for(&shape);
        shared.generation.store(st.generation, Ordering::Relaxed);
        let state = Arc::new(Mutex::new(st));
        let writer = if ws_pages > 0 {
            let (s, m, sh, stc) = (shape.clone(), mem.clone(), shared.clone(), state.clone());
            Some(std::thread::spawn(move || writer_loop(s, m, sh, stc, ws_pages, rate)))
        } else {
            None
        };
        Ok(Self { shape, mem, map, shared, writer, state, ws_pages, rate, running: false, disk: Box::default() })
    }

    /// Pages written by the writer so far.
    pub fn writes(&self) -> u64 {
        self.shared.writes.load(Ordering::Relaxed)
    }

    /// The generation of the writer (counts every page write since the guest was created).
    pub fn generation(&self) -> u64 {
        self.shared.generation.load(Ordering::Relaxed)
    }

    /// Read a whole page (volatile), by global page index.
    pub fn read_page(&self, index: u64, out: &mut [u8]) {
        let (r, p) = locate(&self.shape, index);
        self.mem[r].read_into(p as usize * PAGE_SIZE, out);
    }

    /// Total pages.
    pub fn pages(&self) -> u64 {
        self.shape.memory_bytes() / PAGE_SIZE as u64
    }
}

/// Check that every working-set page holds the stamp of the generation the writer last wrote to
/// it (pages never written must be untouched by the writer). Returns the number of bad pages.
/// Call only while the VM is paused.
pub fn check_stamps(vm: &SyntheticVm) -> Result<u64, SyntheticError> {
    let st = vm.state.lock().map_err(|_| SyntheticError::BadState("writer state poisoned"))?.clone();
    let mut page = vec![0u8; PAGE_SIZE];
    let mut want = vec![0u8; PAGE_SIZE];
    let mut bad = 0;
    for (i, &g) in st.gens.iter().enumerate() {
        if g == 0 {
            continue;
        }
        vm.read_page(i as u64, &mut page);
        write_stamp(&mut want, i as u64, g);
        if page != want {
            bad += 1;
        }
    }
    Ok(bad)
}

impl Drop for SyntheticVm {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        {
            let _g = self.shared.run.lock();
            self.shared.cv.notify_all();
        }
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
        if let Some(w) = self.disk.writer.take() {
            let _ = w.join();
        }
    }
}

impl ferry_disk::Quiesce for SyntheticVm {
    fn pause(&mut self) -> Result<(), VmError> {
        SourceVm::pause(self)
    }

    fn resume(&mut self) -> Result<(), VmError> {
        SourceVm::resume(self)
    }
}

/// Magic and version of the writer's state blob: magic, rng, generation, working-set pages,
/// rate, one generation per working-set page, CRC-32 of all before it (little endian).
const STATE_MAGIC: &[u8; 8] = b"FSYN\x02\0\0\0";

fn encode_state(st: &WriterState, ws_pages: u64, rate: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(44 + st.gens.len() * 8);
    v.extend_from_slice(STATE_MAGIC);
    v.extend_from_slice(&st.rng.to_le_bytes());
    v.extend_from_slice(&st.generation.to_le_bytes());
    v.extend_from_slice(&ws_pages.to_le_bytes());
    v.extend_from_slice(&rate.to_le_bytes());
    for g in &st.gens {
        v.extend_from_slice(&g.to_le_bytes());
    }
    let crc = crc32fast::hash(&v);
    v.extend_from_slice(&crc.to_le_bytes());
    v
}

fn decode_state(b: &[u8], pages: u64) -> Result<(WriterState, u64, u64), SyntheticError> {
    let word = |i: usize| -> Result<u64, SyntheticError> {
        b.get(i..i + 8)
            .and_then(|s| s.try_into().ok())
            .map(u64::from_le_bytes)
            .ok_or(SyntheticError::BadState("truncated"))
    };
    if b.len() < 44 || &b[0..8] != STATE_MAGIC {
        return Err(SyntheticError::BadState("bad magic or version"));
    }
    let (body, crc) = b.split_at(b.len() - 4);
    if crc32fast::hash(body).to_le_bytes() != crc {
        return Err(SyntheticError::BadState("checksum mismatch"));
    }
    let (rng, generation, ws, rate) = (word(8)?, word(16)?, word(24)?, word(32)?);
    if ws > pages || (body.len() - 40) as u64 != ws * 8 {
        return Err(SyntheticError::BadState("working set does not fit the memory"));
    }
    let gens = body[40..].chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8]))).collect();
    Ok((WriterState { rng, generation, gens }, ws, rate))
}

impl SourceVm for SyntheticVm {
    fn shape(&self) -> VmShape {
        self.shape.clone()
    }

    fn memory(&self) -> MemoryMap {
        self.map.clone()
    }

    fn start_dirty_log(&mut self) -> Result<(), VmError> {
        for r in &self.shared.dirty {
            for w in r {
                w.store(0, Ordering::Relaxed);
            }
        }
        self.shared.logging.store(true, Ordering::Release);
        Ok(())
    }

    fn take_dirty(&mut self) -> Result<DirtyBitmap, VmError> {
        let mut out = DirtyBitmap::default();
        for (r, &(gpa, len)) in self.shared.dirty.iter().zip(&self.shape.regions) {
            let mut b = RegionBitmap::new(gpa, len / PAGE_SIZE as u64);
            for (i, w) in r.iter().enumerate() {
                b.bits[i] = w.swap(0, Ordering::AcqRel);
            }
            out.regions.push(b);
        }
        Ok(out)
    }

    fn return_dirty(&mut self, pages: &DirtyBitmap) {
        for (r, b) in self.shared.dirty.iter().zip(&pages.regions) {
            for (w, v) in r.iter().zip(&b.bits) {
                w.fetch_or(*v, Ordering::AcqRel);
            }
        }
    }

    fn stop_dirty_log(&mut self) {
        self.shared.logging.store(false, Ordering::Release);
    }

    fn pause(&mut self) -> Result<(), VmError> {
        let mut run = self.shared.run.lock().map_err(|_| "poisoned")?;
        run.0 = true;
        self.shared.cv.notify_all();
        {
            // Wait until every writer has parked: after this no guest write happens.
            while run.1 < self.writers() {
                run = self.shared.cv.wait(run).map_err(|_| "poisoned")?;
            }
        }
        self.running = false;
        Ok(())
    }

    fn resume(&mut self) -> Result<(), VmError> {
        self.shared.run.lock().map_err(|_| "poisoned")?.0 = false;
        self.shared.cv.notify_all();
        self.running = true;
        Ok(())
    }

    fn is_running(&self) -> bool {
        self.running
    }

    fn save_state(&mut self) -> Result<Vec<u8>, VmError> {
        if self.running {
            return Err("save_state while running".into());
        }
        let st = self.state.lock().map_err(|_| "poisoned")?;
        Ok(encode_state(&st, self.ws_pages, self.rate))
    }

    fn set_throttle(&mut self, percent: u8) {
        self.shared.throttle.store(percent.clamp(1, 100), Ordering::Relaxed);
    }

    fn disks(&self) -> Vec<Arc<Disk>> {
        self.disk.disks.clone()
    }
}

/// A synthetic VM being received.
pub struct SyntheticTarget {
    shape: VmShape,
    mem: Vec<Arc<AnonMemory>>,
    map: MemoryMap,
    state: Option<(WriterState, u64, u64)>,
    registry: Arc<Mutex<std::collections::HashSet<String>>>,
}

impl SyntheticTarget {
    /// After commit: turn the received memory and state into a running [`SyntheticVm`].
    pub fn into_vm(mut self) -> Result<SyntheticVm, SyntheticError> {
        let (st, ws, rate) = self.state.take().ok_or(SyntheticError::BadState("no state restored"))?;
        let mem = std::mem::take(&mut self.mem);
        let mut vm = SyntheticVm::assemble(self.shape.clone(), mem, st, ws, rate)?;
        vm.running = false;
        Ok(vm)
    }

    /// Total pages.
    pub fn pages(&self) -> u64 {
        self.shape.memory_bytes() / PAGE_SIZE as u64
    }

    /// Read a whole page by global index.
    pub fn read_page(&self, index: u64, out: &mut [u8]) {
        let (r, p) = locate(&self.shape, index);
        self.mem[r].read_into(p as usize * PAGE_SIZE, out);
    }
}

impl Drop for SyntheticTarget {
    fn drop(&mut self) {
        if let Ok(mut r) = self.registry.lock() {
            r.remove(&self.shape.vm_id);
        }
    }
}

impl TargetVm for SyntheticTarget {
    fn memory(&self) -> MemoryMap {
        self.map.clone()
    }

    fn restore_state(&mut self, state: &[u8]) -> Result<(), VmError> {
        self.state = Some(decode_state(state, self.pages())?);
        Ok(())
    }

    fn resume(&mut self) -> Result<(), VmError> {
        if self.state.is_none() {
            return Err("resume before restore_state".into());
        }
        Ok(())
    }

    fn into_any(self: Box<Self>) -> Box<dyn std::any::Any + Send> {
        self
    }
}

/// Creates synthetic target VMs, refusing duplicates and shapes over a memory limit.
pub struct SyntheticFactory {
    /// Most guest memory one VM may have.
    pub memory_limit: u64,
    /// Fault destination memory in while preparing (no page faults while receiving).
    pub prefault: bool,
    /// Memory made ready ahead of migrations; regions are carved from it when it holds enough.
    pub reserve: Option<Arc<MemoryReserve>>,
    registry: Arc<Mutex<std::collections::HashSet<String>>>,
}

impl SyntheticFactory {
    /// A factory with a memory limit.
    pub fn new(memory_limit: u64, prefault: bool) -> Self {
        Self { memory_limit, prefault, reserve: None, registry: Default::default() }
    }

    /// Take guest memory from `reserve` when it holds enough (cold memory otherwise).
    pub fn with_reserve(mut self, reserve: Arc<MemoryReserve>) -> Self {
        self.reserve = Some(reserve);
        self
    }

    /// Register an id as present (a VM already running here).
    pub fn occupy(&self, id: &str) {
        if let Ok(mut r) = self.registry.lock() {
            r.insert(id.to_string());
        }
    }
}

impl TargetFactory for SyntheticFactory {
    fn create(&self, shape: &VmShape) -> Result<Box<dyn TargetVm>, VmError> {
        let needed = shape.memory_bytes();
        if needed > self.memory_limit {
            return Err(Box::new(SyntheticError::TooBig { needed, limit: self.memory_limit }));
        }
        if shape.regions.is_empty()
            || shape.regions.iter().any(|r| r.0 % PAGE_SIZE as u64 != 0 || r.1 % PAGE_SIZE as u64 != 0 || r.1 == 0)
        {
            return Err(Box::new(SyntheticError::BadShape("regions must be non-empty and page aligned")));
        }
        {
            let mut reg = self.registry.lock().map_err(|_| "poisoned")?;
            if !reg.insert(shape.vm_id.clone()) {
                return Err(Box::new(SyntheticError::Duplicate(shape.vm_id.clone())));
            }
        }
        let mut mem = Vec::new();
        for &(_, len) in &shape.regions {
            let ready = self.reserve.as_ref().and_then(|r| r.take(len as usize));
            let from_reserve = ready.is_some();
            let m = match ready.map_or_else(|| AnonMemory::new(len as usize, false), Ok) {
                Ok(m) => m,
                Err(e) => {
                    if let Ok(mut r) = self.registry.lock() {
                        r.remove(&shape.vm_id);
                    }
                    return Err(Box::new(SyntheticError::from(e)));
                }
            };
            if self.prefault && !from_reserve {
                m.prefault();
            }
            mem.push(Arc::new(m));
        }
        let map = region_maps(&mem, shape)?;
        Ok(Box::new(SyntheticTarget { shape: shape.clone(), mem, map, state: None, registry: self.registry.clone() }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_has_odd_regions() {
        let l = layout(10_000, 3);
        assert_eq!(l.iter().map(|r| r.1).sum::<u64>(), 10_000 * PAGE_SIZE as u64);
        assert!(l.iter().all(|r| !(r.1 / PAGE_SIZE as u64).is_multiple_of(64)));
        for w in l.windows(2) {
            assert!(w[0].0 + w[0].1 < w[1].0);
        }
    }

    #[test]
    fn writer_dirties_and_pause_stops_it() {
        let cfg = SyntheticConfig {
            memory_bytes: 8 << 20,
            working_set_bytes: 1 << 20,
            dirty_rate_bytes_per_s: 0,
            ..Default::default()
        };
        let mut vm = SyntheticVm::new(&cfg).unwrap();
        vm.start_dirty_log().unwrap();
        vm.resume().unwrap();
        while vm.writes() < 1000 {
            std::thread::sleep(Duration::from_millis(5));
        }
        vm.pause().unwrap();
        let w = vm.writes();
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(vm.writes(), w, "writer kept writing while paused");
        let d = vm.take_dirty().unwrap();
        assert!(d.count() > 0 && d.count() <= 256);
        assert_eq!(vm.take_dirty().unwrap().count(), 0);
        vm.return_dirty(&d);
        assert_eq!(vm.take_dirty().unwrap(), d);
        assert_eq!(check_stamps(&vm).unwrap(), 0);
        let st = vm.save_state().unwrap();
        assert!(decode_state(&st, vm.pages()).is_ok());
        let mut bad = st.clone();
        bad[20] ^= 1;
        assert!(decode_state(&bad, vm.pages()).is_err());
        assert!(decode_state(&st[..30], vm.pages()).is_err());
    }

    /// Every page of `shape` read through `map`, in region order.
    fn pages_via_map(map: &MemoryMap, shape: &VmShape) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        for &(gpa, len) in &shape.regions {
            for off in (0..len).step_by(PAGE_SIZE) {
                let mut page = vec![0u8; PAGE_SIZE];
                map.lookup(gpa + off, PAGE_SIZE).expect("page inside the map").read_into(0, &mut page);
                out.push(page);
            }
        }
        out
    }

    #[test]
    fn guest_memory_outlives_the_vm_that_handed_it_out() {
        // Source side: the map handed out by `SourceVm::memory` still reads the guest's pages
        // after the VM (and its writer thread) is gone.
        let cfg = SyntheticConfig { memory_bytes: 2 << 20, working_set_bytes: 256 << 10, ..Default::default() };
        let mut vm = SyntheticVm::new(&cfg).unwrap();
        vm.resume().unwrap();
        while vm.writes() < 100 {
            std::thread::sleep(Duration::from_millis(1));
        }
        vm.pause().unwrap();
        let shape = vm.shape();
        let map = SourceVm::memory(&vm);
        let mut want = Vec::new();
        for i in 0..vm.pages() {
            let mut page = vec![0u8; PAGE_SIZE];
            vm.read_page(i, &mut page);
            want.push(page);
        }
        assert!(want.iter().any(|p| p.iter().any(|&b| b != 0)), "the guest holds data");
        drop(vm);
        assert!(pages_via_map(&map, &shape) == want, "pages read after the VM was dropped differ");

        // Target side: a map kept past the target (and its factory) still reads and writes.
        let f = SyntheticFactory::new(4 << 20, true);
        let s = VmShape { vm_id: "kept".into(), regions: vec![(0, 1 << 20), (4 << 20, 1 << 20)] };
        let t = f.create(&s).unwrap();
        let map = t.memory();
        drop(t);
        drop(f);
        let p = map.lookup((4 << 20) + PAGE_SIZE as u64, PAGE_SIZE).expect("inside");
        p.write_from(0, &[5u8; 16]);
        assert_eq!(p.read_u8(15), 5);
        assert_eq!(pages_via_map(&map, &s).iter().filter(|pg| pg.iter().any(|&b| b != 0)).count(), 1);
    }

    #[test]
    fn factory_refuses_duplicates_and_oversize() {
        let f = SyntheticFactory::new(1 << 20, false);
        let s = VmShape { vm_id: "a".into(), regions: vec![(0, 1 << 20)] };
        let t = f.create(&s).unwrap();
        assert!(f.create(&s).is_err());
        drop(t);
        assert!(f.create(&s).is_ok());
        assert!(f.create(&VmShape { vm_id: "b".into(), regions: vec![(0, 2 << 20)] }).is_err());
    }
}
