//! The local storage move against a guest that writes while it moves: contents, sparseness, odd
//! sizes, convergence, and a failure or cancel at every step leaving the VM on its original
//! files with no partial copy left behind.

use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use ferry_disk::local::{move_storage_with, VmError};
use ferry_disk::{
    image, move_storage, BlockSink, CancelToken, Disk, MirrorMode, MoveError, MoveOptions, Phase, Quiesce, BLOCK_BYTES,
};

/// A guest with disks and one writer thread; it keeps a shadow of what every disk must hold.
struct Guest {
    disks: Vec<Arc<Disk>>,
    shadow: Arc<Mutex<Vec<Vec<u8>>>>,
    run: Arc<(Mutex<(bool, bool)>, Condvar)>, // (pause asked, parked)
    stop: Arc<AtomicBool>,
    writes: Arc<AtomicU64>,
    writer: Option<JoinHandle<()>>,
    running: bool,
}

fn splitmix(s: &mut u64) -> u64 {
    *s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *s;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Make an image of `size` bytes: every third 64 KiB block data, every seventh block written
/// with zeros (allocated but zero), the rest holes. Returns its contents.
fn make_image(path: &Path, size: u64, seed: u64) -> Vec<u8> {
    let f = image::create_sparse(path, size).unwrap();
    let mut want = vec![0u8; size as usize];
    let mut s = seed;
    for b in 0..size.div_ceil(BLOCK_BYTES) {
        let off = b * BLOCK_BYTES;
        let len = BLOCK_BYTES.min(size - off) as usize;
        if b.is_multiple_of(3) {
            let data: Vec<u8> = (0..len).map(|_| splitmix(&mut s) as u8 | 1).collect();
            f.write_all_at(&data, off).unwrap();
            want[off as usize..off as usize + len].copy_from_slice(&data);
        } else if b.is_multiple_of(7) {
            f.write_all_at(&vec![0u8; len], off).unwrap();
        }
    }
    f.sync_all().unwrap();
    want
}

impl Guest {
    /// Disks of the given sizes in `dir`; the writer writes `rate_bytes_per_s` (0: flat out)
    /// over the first `ws_bytes` of each disk once resumed.
    fn new(dir: &Path, sizes: &[u64], ws_bytes: u64, rate_bytes_per_s: u64) -> Self {
        let mut disks = Vec::new();
        let mut shadow = Vec::new();
        for (i, &size) in sizes.iter().enumerate() {
            let p = dir.join(format!("disk{i}.img"));
            shadow.push(make_image(&p, size, i as u64 + 1));
            disks.push(Arc::new(Disk::open(&p).unwrap()));
        }
        let mut g = Guest {
            disks,
            shadow: Arc::new(Mutex::new(shadow)),
            run: Arc::new((Mutex::new((true, false)), Condvar::new())),
            stop: Arc::new(AtomicBool::new(false)),
            writes: Arc::new(AtomicU64::new(0)),
            writer: None,
            running: false,
        };
        if ws_bytes > 0 {
            let (disks, shadow, run, stop, writes) =
                (g.disks.clone(), g.shadow.clone(), g.run.clone(), g.stop.clone(), g.writes.clone());
            g.writer = Some(std::thread::spawn(move || {
                let mut s = 42u64;
                let mut buf = vec![0u8; 12_000];
                loop {
                    {
                        let (m, cv) = &*run;
                        let mut r = m.lock().unwrap();
                        if r.0 {
                            r.1 = true;
                            cv.notify_all();
                            while r.0 && !stop.load(Ordering::SeqCst) {
                                r = cv.wait(r).unwrap();
                            }
                            r.1 = false;
                        }
                    }
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    let d = (splitmix(&mut s) % disks.len() as u64) as usize;
                    let size = disks[d].size_bytes();
                    let ws = ws_bytes.min(size);
                    // Odd offsets and lengths that cross block edges; one write in 8 is zeros.
                    let len = (1 + splitmix(&mut s) % buf.len() as u64).min(ws);
                    let off = splitmix(&mut s) % (ws - len + 1);
                    let zero = splitmix(&mut s).is_multiple_of(8);
                    for x in &mut buf[..len as usize] {
                        *x = if zero { 0 } else { splitmix(&mut s) as u8 };
                    }
                    {
                        let mut sh = shadow.lock().unwrap();
                        disks[d].write_at(off, &buf[..len as usize]).unwrap();
                        sh[d][off as usize..(off + len) as usize].copy_from_slice(&buf[..len as usize]);
                    }
                    writes.fetch_add(1, Ordering::Relaxed);
                    if rate_bytes_per_s > 0 {
                        std::thread::sleep(Duration::from_secs_f64(len as f64 / rate_bytes_per_s as f64));
                    }
                }
            }));
        }
        g
    }

    /// Every disk (through its current file) equals the shadow. Pauses the guest to look.
    fn check(&mut self) {
        let was = self.running;
        self.pause().unwrap();
        let sh = self.shadow.lock().unwrap();
        for (d, want) in self.disks.iter().zip(sh.iter()) {
            let got = std::fs::read(d.path()).unwrap();
            assert_eq!(got.len(), want.len(), "{} keeps its size", d.name());
            assert!(got == *want, "{} ({}) differs from what the guest wrote", d.name(), d.path().display());
        }
        drop(sh);
        if was {
            self.resume().unwrap();
        }
    }

    fn wait_writes(&self, n: u64) {
        if self.writer.is_none() {
            return;
        }
        let w0 = self.writes.load(Ordering::Relaxed);
        while self.writes.load(Ordering::Relaxed) < w0 + n {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

impl Quiesce for Guest {
    fn pause(&mut self) -> Result<(), VmError> {
        let (m, cv) = &*self.run;
        let mut r = m.lock().unwrap();
        r.0 = true;
        cv.notify_all();
        while self.writer.is_some() && !r.1 {
            r = cv.wait(r).unwrap();
        }
        self.running = false;
        Ok(())
    }

    fn resume(&mut self) -> Result<(), VmError> {
        let (m, cv) = &*self.run;
        m.lock().unwrap().0 = false;
        cv.notify_all();
        self.running = true;
        Ok(())
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.run.1.notify_all();
        if let Some(w) = self.writer.take() {
            w.join().unwrap();
        }
    }
}

fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

const SIZES: [u64; 3] = [3 * 1024 * 1024 + 4321, 65_536 * 5 + 1, 777_777];

#[test]
fn moves_every_disk_while_the_guest_writes_and_keeps_holes() {
    let src = tempfile::tempdir().unwrap();
    let dst = tempfile::tempdir().unwrap();
    let mut g = Guest::new(src.path(), &SIZES, 1 << 20, 0);
    let old: Vec<PathBuf> = g.disks.iter().map(|d| d.path()).collect();
    let alloc_before: Vec<u64> = g.disks.iter().map(|d| d.allocated_bytes().unwrap()).collect();
    g.resume().unwrap();
    g.wait_writes(200);
    let disks = g.disks.clone();
    let mut phases = Vec::new();
    let opts = MoveOptions { switch_bytes: 0, ..Default::default() };
    let st = move_storage(&disks, dst.path(), &mut g, &opts, &CancelToken::new(), &mut |p| phases.push(p)).unwrap();
    assert!(g.running, "the guest runs after the move");
    g.wait_writes(200); // and writes to the new files
    g.check();
    for (d, o) in g.disks.iter().zip(&old) {
        assert_eq!(d.path(), dst.path().join(d.name()), "the disk uses its copy");
        assert!(!o.exists(), "the old file {} is removed", o.display());
    }
    assert_eq!(entries(dst.path()), vec!["disk0.img", "disk1.img", "disk2.img"], "no partial copy left");
    assert!(entries(src.path()).is_empty());
    assert_eq!(phases.first(), Some(&Phase::Prepared));
    assert_eq!(phases.last(), Some(&Phase::Committed));
    for (s, a) in st.disks.iter().zip(&alloc_before) {
        // disk0 has written-zero blocks past the writer's 1 MiB working set.
        if s.name == "disk0.img" {
            assert!(s.zero_bytes > 0, "{}: allocated zero blocks are detected", s.name);
        }
        // Every seventh block of the original is allocated zeros: the copy leaves those as holes.
        assert!(s.new_allocated_bytes < *a + (2 << 20), "{}: {} -> {}", s.name, a, s.new_allocated_bytes);
    }
    assert!(st.downtime <= st.total);
}

#[test]
fn sparse_files_stay_sparse() {
    let src = tempfile::tempdir().unwrap();
    let dst = tempfile::tempdir().unwrap();
    let p = src.path().join("big.img");
    let size = 64 * 1024 * 1024 + 999; // 64 MiB, a few blocks of data
    let f = image::create_sparse(&p, size).unwrap();
    f.write_all_at(&[7u8; 5000], 10 * BLOCK_BYTES + 3).unwrap();
    f.write_all_at(&vec![0u8; 8 << 20], 20 << 20).unwrap(); // 8 MiB of written zeros
    f.write_all_at(&[9u8; 10], size - 10).unwrap();
    drop(f);
    let d = Arc::new(Disk::open(&p).unwrap());
    assert!(d.allocated_bytes().unwrap() >= 8 << 20);
    let mut g = Guest::new(src.path(), &[], 0, 0);
    let st = move_storage(
        std::slice::from_ref(&d),
        dst.path(),
        &mut g,
        &MoveOptions::default(),
        &CancelToken::new(),
        &mut |_| {},
    )
    .unwrap();
    let new = std::fs::metadata(dst.path().join("big.img")).unwrap();
    assert_eq!(new.len(), size);
    assert!(new.blocks() * 512 <= 4 * BLOCK_BYTES, "the copy occupies {} bytes", new.blocks() * 512);
    assert_eq!(
        st.disks[0].written_bytes,
        2 * 4096 + 999,
        "only the 4 KiB units holding data were written (5000 bytes at offset 3 span two; the tail is 999 bytes)"
    );
    let mut b = vec![0u8; 5000];
    d.read_at(10 * BLOCK_BYTES + 3, &mut b).unwrap();
    assert_eq!(b, vec![7u8; 5000]);
    let mut t = [0u8; 10];
    d.read_at(size - 10, &mut t).unwrap();
    assert_eq!(t, [9u8; 10]);
    assert!(d.read_at(size - 9, &mut t).is_err(), "reads past the end are refused");
}

#[test]
fn a_guest_writing_flat_out_converges() {
    let src = tempfile::tempdir().unwrap();
    let dst = tempfile::tempdir().unwrap();
    let mut g = Guest::new(src.path(), &SIZES, 4 << 20, 0);
    g.resume().unwrap();
    g.wait_writes(100);
    let disks = g.disks.clone();
    let opts = MoveOptions { switch_bytes: 0, max_background_passes: 2, ..Default::default() };
    move_storage(&disks, dst.path(), &mut g, &opts, &CancelToken::new(), &mut |_| {}).unwrap();
    g.check();
}

/// A guest faster than any copy, without timing: every write of the copier makes the guest (on
/// the copier's thread) write 32 sectors across the disk while the mirror is in background mode.
/// Needs a `Guest` without a writer thread (no one else writes or holds the shadow).
struct Dirtier {
    inner: Box<dyn BlockSink>,
    disk: Arc<Disk>,
    index: usize,
    shadow: Arc<Mutex<Vec<Vec<u8>>>>,
    rng: u64,
}

impl BlockSink for Dirtier {
    fn write_at(&mut self, off: u64, data: &[u8]) -> io::Result<()> {
        self.inner.write_at(off, data)?;
        if !self.disk.is_write_blocking() {
            let mut sh = self.shadow.lock().unwrap();
            for _ in 0..32 {
                let len = 4096.min(self.disk.size_bytes());
                let at = splitmix(&mut self.rng) % (self.disk.size_bytes() - len + 1);
                let v = vec![splitmix(&mut self.rng) as u8 | 1; len as usize];
                self.disk.write_at(at, &v).unwrap();
                sh[self.index][at as usize..(at + len) as usize].copy_from_slice(&v);
            }
        }
        Ok(())
    }
    fn zero(&mut self, off: u64, len: u64) -> io::Result<()> {
        self.inner.zero(off, len)
    }
    fn sync(&mut self) -> io::Result<()> {
        self.inner.sync()
    }
}

fn dirtier(g: &Guest) -> impl Fn(&Disk, Box<dyn BlockSink>) -> Box<dyn BlockSink> + '_ {
    move |d, inner| {
        let index = g.disks.iter().position(|x| x.name() == d.name()).unwrap();
        Box::new(Dirtier { inner, disk: g.disks[index].clone(), index, shadow: g.shadow.clone(), rng: index as u64 })
    }
}

#[test]
fn auto_mode_turns_write_blocking_when_passes_stop_shrinking() {
    let src = tempfile::tempdir().unwrap();
    let dst = tempfile::tempdir().unwrap();
    let mut g = Guest::new(src.path(), &SIZES, 0, 0);
    g.resume().unwrap();
    let disks = g.disks.clone();
    let mut phases = Vec::new();
    let opts = MoveOptions { switch_bytes: 0, ..Default::default() };
    let wrap = dirtier(&g);
    let mut q = NoPause;
    let st = move_storage_with(&disks, dst.path(), &mut q, &opts, &CancelToken::new(), &mut |p| phases.push(p), &wrap)
        .unwrap();
    drop(wrap);
    assert!(st.write_blocking, "{phases:?}");
    assert!(phases.contains(&Phase::WriteBlocking));
    assert!(st.passes >= 2);
    g.check();
}

/// The guest of the [`Dirtier`] tests writes only from the copier's thread: nothing to pause.
struct NoPause;

impl Quiesce for NoPause {
    fn pause(&mut self) -> Result<(), VmError> {
        Ok(())
    }
    fn resume(&mut self) -> Result<(), VmError> {
        Ok(())
    }
}

#[test]
fn refuses_to_replace_a_file_and_touches_nothing() {
    let src = tempfile::tempdir().unwrap();
    let dst = tempfile::tempdir().unwrap();
    std::fs::write(dst.path().join("disk1.img"), b"mine").unwrap();
    let mut g = Guest::new(src.path(), &SIZES, 0, 0);
    let disks = g.disks.clone();
    let e = move_storage(&disks, dst.path(), &mut g, &MoveOptions::default(), &CancelToken::new(), &mut |_| {});
    assert!(matches!(e, Err(MoveError::Invalid(_))), "{e:?}");
    assert_eq!(std::fs::read(dst.path().join("disk1.img")).unwrap(), b"mine");
    assert_eq!(entries(dst.path()), vec!["disk1.img"]);
    g.check();
    let e = move_storage(
        &disks,
        &dst.path().join("nope"),
        &mut g,
        &MoveOptions::default(),
        &CancelToken::new(),
        &mut |_| {},
    );
    assert!(matches!(e, Err(MoveError::Invalid(_))), "{e:?}");
}

/// After a failed move: the VM runs on its original files, which hold what the guest wrote,
/// and the destination holds no copy, partial or whole.
fn assert_untouched(g: &mut Guest, src: &Path, dst: &Path) {
    assert!(g.running, "the guest runs");
    for d in &g.disks {
        assert_eq!(d.path().parent(), Some(src), "{} stays on its original file", d.name());
        assert!(!d.is_write_blocking());
        assert!(!d.dirty_log().is_logging());
    }
    assert!(entries(dst).is_empty(), "left in the destination: {:?}", entries(dst));
    g.wait_writes(50);
    g.check();
}

#[test]
fn cancel_at_every_step_leaves_the_vm_on_its_files() {
    let steps = [Phase::Prepared, Phase::Copy, Phase::DirtyPass(1), Phase::WriteBlocking, Phase::Sync, Phase::Paused];
    for step in steps {
        let src = tempfile::tempdir().unwrap();
        let dst = tempfile::tempdir().unwrap();
        // The guest writes from the copier's thread (see `Dirtier`), so every step is reached
        // whatever the machine's load.
        let mut g = Guest::new(src.path(), &SIZES, 0, 0);
        g.resume().unwrap();
        let disks = g.disks.clone();
        let cancel = CancelToken::new();
        let mut seen = false;
        let opts = MoveOptions { switch_bytes: 0, max_background_passes: 1, ..Default::default() };
        let paused = std::cell::Cell::new(false);
        let mut q = Watch(&paused);
        let r = move_storage_with(
            &disks,
            dst.path(),
            &mut q,
            &opts,
            &cancel,
            &mut |p| {
                if p == step {
                    seen = true;
                    cancel.cancel();
                }
            },
            &dirtier(&g),
        );
        assert!(seen, "{step:?} was reached");
        assert!(matches!(r, Err(MoveError::Cancelled)), "cancel at {step:?}: {r:?}");
        assert!(!paused.get(), "cancel at {step:?}: the guest was resumed");
        assert_untouched(&mut g, src.path(), dst.path());
        // The disks are free again: a second move succeeds.
        let st = move_storage(&disks, dst.path(), &mut g, &MoveOptions::default(), &CancelToken::new(), &mut |_| {});
        assert!(st.is_ok(), "after a cancel at {step:?}: {st:?}");
        g.check();
    }
}

/// Records whether the guest is paused.
struct Watch<'a>(&'a std::cell::Cell<bool>);

impl Quiesce for Watch<'_> {
    fn pause(&mut self) -> Result<(), VmError> {
        self.0.set(true);
        Ok(())
    }
    fn resume(&mut self) -> Result<(), VmError> {
        self.0.set(false);
        Ok(())
    }
}

/// When a [`Failing`] sink fails (with EIO).
#[derive(Debug, Clone, Copy)]
enum FailWhen {
    /// From the n-th write on (counted over all disks).
    AtWrite(u64),
    /// Every write made while its disk is write-blocking.
    WriteBlocking,
    /// The sync.
    Sync,
}

struct Failing {
    inner: Box<dyn BlockSink>,
    disk: Arc<Disk>,
    writes: Arc<AtomicU64>,
    when: FailWhen,
}

const EIO: i32 = 5;

impl BlockSink for Failing {
    fn write_at(&mut self, off: u64, data: &[u8]) -> io::Result<()> {
        let n = self.writes.fetch_add(1, Ordering::SeqCst);
        match self.when {
            FailWhen::AtWrite(k) if n >= k => return Err(io::Error::from_raw_os_error(EIO)),
            FailWhen::WriteBlocking if self.disk.is_write_blocking() => return Err(io::Error::from_raw_os_error(EIO)),
            _ => {}
        }
        self.inner.write_at(off, data)
    }
    fn zero(&mut self, off: u64, len: u64) -> io::Result<()> {
        self.inner.zero(off, len)
    }
    fn sync(&mut self) -> io::Result<()> {
        if matches!(self.when, FailWhen::Sync) {
            return Err(io::Error::from_raw_os_error(EIO));
        }
        self.inner.sync()
    }
}

#[test]
fn an_io_error_at_every_step_leaves_the_vm_on_its_files() {
    // The first write of the copy; a later one; the copier's first write in write-blocking
    // mode (a dirty pass); a mirrored guest write (made between two passes); the sync.
    let cases = [
        ("first copy write", FailWhen::AtWrite(0), MirrorMode::Auto, false),
        ("a later copy write", FailWhen::AtWrite(5), MirrorMode::Auto, false),
        ("a dirty pass's write", FailWhen::WriteBlocking, MirrorMode::WriteBlocking, false),
        ("a mirrored guest write", FailWhen::WriteBlocking, MirrorMode::WriteBlocking, true),
        ("the sync", FailWhen::Sync, MirrorMode::Auto, false),
    ];
    for (what, when, mode, guest_write) in cases {
        let src = tempfile::tempdir().unwrap();
        let dst = tempfile::tempdir().unwrap();
        // Deterministic: the guest writes from the copier's thread (`Dirtier`, while the copy
        // is in background mode) and, for the mirrored case, from the progress callback.
        let mut g = Guest::new(src.path(), &SIZES, 0, 0);
        g.resume().unwrap();
        let disks = g.disks.clone();
        let writes = Arc::new(AtomicU64::new(0));
        let opts = MoveOptions { switch_bytes: 0, mode, ..Default::default() };
        let dirty = dirtier(&g);
        let shadow = g.shadow.clone();
        let mut q = NoPause;
        let mut guest_write_ok = None;
        let r = move_storage_with(
            &disks,
            dst.path(),
            &mut q,
            &opts,
            &CancelToken::new(),
            &mut |p| {
                if guest_write && p == Phase::DirtyPass(1) && guest_write_ok.is_none() {
                    let d = &disks[0];
                    assert!(d.is_write_blocking());
                    let v = vec![0x5a; 3000];
                    guest_write_ok = Some(d.write_at(70_000, &v).is_ok());
                    shadow.lock().unwrap()[0][70_000..73_000].copy_from_slice(&v);
                }
            },
            &|d, inner| {
                let inner = dirty(d, inner);
                let disk = disks.iter().find(|x| x.name() == d.name()).unwrap().clone();
                Box::new(Failing { inner, disk, writes: writes.clone(), when })
            },
        );
        match r {
            Err(MoveError::Disk(ferry_disk::DiskError::Target { err, .. })) => {
                assert_eq!(err.raw_os_error(), Some(EIO), "{what}")
            }
            other => panic!("{what}: {other:?}"),
        }
        if guest_write {
            assert_eq!(guest_write_ok, Some(true), "a failing mirror never fails the guest's write");
        }
        drop(dirty);
        assert_untouched(&mut g, src.path(), dst.path());
    }
}

#[test]
fn a_full_file_system_leaves_the_vm_on_its_files() {
    let src = tempfile::tempdir().unwrap();
    let dst = tempfile::tempdir().unwrap();
    let Some(tmpfs) =
        ferry_test_support::tmpfs::SmallTmpfs::mount(dst.path(), "1m", "a_full_file_system_leaves_the_vm_on_its_files")
    else {
        return;
    };
    let mnt = tmpfs.path().to_path_buf();
    let mut g = Guest::new(src.path(), &SIZES, 2 << 20, 0);
    g.resume().unwrap();
    g.wait_writes(50);
    let disks = g.disks.clone();
    let r = move_storage(&disks, &mnt, &mut g, &MoveOptions::default(), &CancelToken::new(), &mut |_| {});
    match r {
        Err(MoveError::Disk(ferry_disk::DiskError::Target { err, .. })) => {
            assert_eq!(err.raw_os_error(), Some(28), "ENOSPC: {err}")
        }
        other => panic!("{other:?}"),
    }
    assert_untouched(&mut g, src.path(), &mnt);
}
