//! Quick migration: pause the VM, save its whole state (memory and vCPU/device state) to an image
//! in a directory both hosts share, hand ownership over through a record in that directory, then
//! load the image on the target and resume. Uses only the VM traits ([`SourceVm`],
//! [`TargetFactory`]), so it works for any VMM.
//!
//! # Ownership
//! `<dir>/<vm_id>.owner` says which host owns the VM, in which state (`running`, `off`, `saved`)
//! and at which epoch. Only the owner may run the VM. Every change of the record happens under
//! `<dir>/<vm_id>.lock` (created with `O_EXCL`, removed after) and is written to a temporary file,
//! synced and renamed over the record, so a reader sees the old or the new record, never a mix;
//! a change also checks the epoch it expects, so two hosts cannot both win.
//!
//! # Files
//! Images hold guest memory and records decide ownership: every file this module creates (image,
//! record, lock) is created mode 0600 with `O_EXCL`, temporary files under an unpredictable name
//! (`.<final name>.<random>.tmp`, so nobody can plant a file or a symlink where one will be
//! written), then synced and renamed into place.
//!
//! ```text
//! source (owner, running)                         target
//!   pause; save_state
//!   write .<vm>.<epoch+1>.img.<random>.tmp, fsync, rename
//!   record := {owner: target, saved, epoch+1}   <- commit: from here the target owns the VM
//!   (drop the VM; never resume)
//!                                                 read record: owner == me, saved
//!                                                 load image (CRC per chunk), restore_state
//!                                                 record := {owner: me, running, epoch+1}
//!                                                 resume; delete image
//!                                                 (resume fails: record := {me, saved},
//!                                                  image kept, the load can be retried)
//! ```
//! A failure before the commit resumes the source (it still owns the VM). A failure after it
//! leaves the target owning a saved VM whose image is still in the directory: loading can be
//! retried; at no point do two hosts own it, and the image is removed only once the VM runs.
//! A stale lock (a host died while holding it) is reported, not broken: an operator removes it.
//!
//! # Image format (all integers little-endian)
//! ```text
//! header:  "FERRYQMI" | version u32 | body length u32 | body | crc32(magic..body)
//!          body = id length u16 | id | region count u32 | (gpa u64, length u64)* |
//!                 state length u32 | state
//! chunk*:  "CHNK" | gpa u64 | pages u32 (1..=256) | present bitmap (u64 words) |
//!          present pages' bytes | crc32(chunk from "CHNK")
//! end:     "END!" | chunks u64 | pages present u64 | crc32(end from "END!")
//! ```
//! Chunks cover every page of every region once, in ascending order; all-zero pages are not
//! stored (the target's memory starts zeroed). Every length is capped before use.

use std::fs::{self, File, OpenOptions};
use std::io::{BufReader, BufWriter, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ferry_memory::MemoryMap;
use ferry_transport::wire::PAGE_SIZE;

use crate::source::CancelToken;
use crate::vm::{SourceVm, TargetFactory, TargetVm, VmError, VmShape};

/// Image magic.
pub const IMAGE_MAGIC: [u8; 8] = *b"FERRYQMI";
/// Image format version.
pub const IMAGE_VERSION: u32 = 1;
/// Pages per chunk.
pub const CHUNK_PAGES: u32 = 256;
/// Largest header body accepted.
pub const MAX_HEADER: u32 = 16 << 20;
/// Most regions in an image.
pub const MAX_REGIONS: u32 = 4096;
/// Largest record file accepted.
const MAX_RECORD: u64 = 4096;

/// Why a quick migration step failed.
#[derive(Debug, thiserror::Error)]
pub enum QuickError {
    /// File system error.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The save was cancelled before the handover: the record did not change, the image is
    /// removed, and the source (resumed if it was running) still owns the VM.
    #[error("cancelled before the handover")]
    Cancelled,
    /// A VM or host name that cannot be used in the shared directory.
    #[error("invalid name {0:?} (1..=64 of A-Z a-z 0-9 . _ -, not starting with '.')")]
    Name(String),
    /// The record says another host owns the VM, or it is in another state.
    #[error("VM {vm}: record says owner {owner}, state {state}, epoch {epoch}; expected {expected}")]
    NotOwner {
        /// VM id.
        vm: String,
        /// Owner in the record.
        owner: String,
        /// State in the record.
        state: String,
        /// Epoch in the record.
        epoch: u64,
        /// What the caller expected.
        expected: String,
    },
    /// The VM is already registered.
    #[error("VM {0} is already registered in the shared directory")]
    Exists(String),
    /// Another host is changing the record (or died doing so: remove the lock file by hand).
    #[error("record of VM {0} is locked ({1})")]
    Locked(String, String),
    /// A record that cannot be parsed.
    #[error("bad ownership record: {0}")]
    BadRecord(String),
    /// An image that cannot be loaded.
    #[error("bad image: {0}")]
    BadImage(String),
    /// The VM failed.
    #[error("VM: {0}")]
    Vm(#[source] VmError),
    /// The image was loaded but the VM did not resume. `fate` says where the VM stands: its
    /// record is back to saved (owned by this host, image kept) so the load can be retried, or,
    /// if even that failed, what the record says.
    #[error("VM {vm} loaded but did not resume: {reason}; {fate}")]
    ResumeFailed {
        /// VM id.
        vm: String,
        /// Why resuming failed.
        reason: String,
        /// Where the VM stands now.
        fate: String,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> QuickError {
    let what = what.into();
    move |source| QuickError::Io { what, source }
}

/// A name usable in the shared directory (VM ids, host names): 1..=64 of `A-Z a-z 0-9 . _ -`,
/// not starting with `.`.
pub fn check_name(n: &str) -> Result<(), QuickError> {
    let ok = !n.is_empty()
        && n.len() <= 64
        && !n.starts_with('.')
        && n.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(QuickError::Name(n.to_string()))
    }
}

/// State of a VM in its ownership record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmRunState {
    /// The owner runs it.
    Running,
    /// Powered off (no image).
    Off,
    /// Saved to an image; the owner may load and resume it.
    Saved,
}

impl VmRunState {
    fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Off => "off",
            Self::Saved => "saved",
        }
    }
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "running" => Self::Running,
            "off" => Self::Off,
            "saved" => Self::Saved,
            _ => return None,
        })
    }
}

/// The ownership record of one VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Host that owns the VM.
    pub owner: String,
    /// Its state.
    pub state: VmRunState,
    /// Incremented by every change.
    pub epoch: u64,
    /// Image file name (state `saved` only).
    pub image: Option<String>,
}

impl Record {
    fn encode(&self) -> String {
        let body = format!(
            "ferry-owner 1\nowner {}\nstate {}\nepoch {}\nimage {}\n",
            self.owner,
            self.state.as_str(),
            self.epoch,
            self.image.as_deref().unwrap_or("-")
        );
        format!("{body}crc {:08x}\n", crc32fast::hash(body.as_bytes()))
    }

    fn decode(s: &str) -> Result<Self, QuickError> {
        let bad = |m: &str| QuickError::BadRecord(m.to_string());
        let (body, crc_line) = s.rsplit_once("crc ").ok_or_else(|| bad("no crc"))?;
        let crc = u32::from_str_radix(crc_line.trim_end(), 16).map_err(|_| bad("crc"))?;
        if crc != crc32fast::hash(body.as_bytes()) {
            return Err(bad("crc mismatch"));
        }
        let mut lines = body.lines();
        if lines.next() != Some("ferry-owner 1") {
            return Err(bad("header"));
        }
        let mut field = |k: &str| {
            lines.next().and_then(|l| l.strip_prefix(k)).and_then(|l| l.strip_prefix(' ')).ok_or_else(|| bad(k))
        };
        let owner = field("owner")?.to_string();
        let state = VmRunState::parse(field("state")?).ok_or_else(|| bad("state"))?;
        let epoch = field("epoch")?.parse().map_err(|_| bad("epoch"))?;
        let image = match field("image")? {
            "-" => None,
            i => Some(i.to_string()),
        };
        check_name(&owner)?;
        if let Some(i) = &image {
            check_name(i)?;
        }
        Ok(Self { owner, state, epoch, image })
    }
}

/// A directory shared by the hosts (NFS, SMB, a cluster file system, or local for tests).
#[derive(Debug, Clone)]
pub struct SharedDir {
    root: PathBuf,
    lock_wait: Duration,
}

/// How long a change of a record waits for another host's change of the same record to finish
/// (its lock to go) before it reports [`QuickError::Locked`]. A change holds the lock for a
/// read, a write and two syncs: milliseconds, up to a second on a loaded machine or a slow
/// share. A lock older than this was left by a crashed holder and needs the operator.
pub const LOCK_WAIT: Duration = Duration::from_secs(5);

struct LockGuard(PathBuf);

impl Drop for LockGuard {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

/// Create a new file mode 0600 (`O_EXCL`: never an existing file or a symlink).
fn create_private(p: &Path) -> std::io::Result<File> {
    OpenOptions::new().write(true).create_new(true).mode(0o600).open(p)
}

/// A file written under a temporary, unpredictable name in `dir`, renamed into place once
/// complete and synced ([`TempFile::persist`]); removed if dropped before.
struct TempFile {
    path: PathBuf,
    file: File,
    persisted: bool,
}

impl TempFile {
    /// A new private file for what will be `dir/name`.
    fn new(dir: &Path, name: &str) -> Result<Self, QuickError> {
        let r: [u8; 12] = ferry_transport::handshake::random_bytes();
        let hex: String = r.iter().map(|b| format!("{b:02x}")).collect();
        let path = dir.join(format!(".{name}.{hex}.tmp"));
        let file = create_private(&path).map_err(io(format!("create {}", path.display())))?;
        Ok(Self { path, file, persisted: false })
    }

    /// Sync and rename over `to` (atomically replacing it), then sync the directory.
    fn persist(mut self, dir: &Path, to: &Path) -> Result<(), QuickError> {
        self.file.sync_all().map_err(io(format!("fsync {}", self.path.display())))?;
        fs::rename(&self.path, to).map_err(io(format!("rename to {}", to.display())))?;
        self.persisted = true;
        sync_dir(dir);
        Ok(())
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.persisted {
            let _ = fs::remove_file(&self.path);
        }
    }
}

fn sync_dir(p: &Path) {
    if let Ok(d) = File::open(p) {
        let _ = d.sync_all();
    }
}

impl SharedDir {
    /// Use `root` (it must exist).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into(), lock_wait: LOCK_WAIT }
    }

    /// Wait at most `wait` for a held record lock (default [`LOCK_WAIT`]).
    pub fn with_lock_wait(mut self, wait: Duration) -> Self {
        self.lock_wait = wait;
        self
    }

    fn record_path(&self, vm: &str) -> PathBuf {
        self.root.join(format!("{vm}.owner"))
    }

    /// Read a VM's ownership record.
    pub fn record(&self, vm: &str) -> Result<Record, QuickError> {
        check_name(vm)?;
        let p = self.record_path(vm);
        let f = File::open(&p).map_err(io(format!("open {}", p.display())))?;
        let mut s = String::new();
        f.take(MAX_RECORD).read_to_string(&mut s).map_err(io(format!("read {}", p.display())))?;
        Record::decode(&s)
    }

    /// Register a VM owned by `host` (fails if the VM is already registered).
    pub fn register(&self, vm: &str, host: &str, state: VmRunState) -> Result<Record, QuickError> {
        check_name(vm)?;
        check_name(host)?;
        let rec = Record { owner: host.into(), state, epoch: 1, image: None };
        let _lock = self.lock(vm, host)?;
        let p = self.record_path(vm);
        let mut f = match create_private(&p) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Err(QuickError::Exists(vm.into())),
            Err(e) => return Err(io(format!("create {}", p.display()))(e)),
        };
        f.write_all(rec.encode().as_bytes()).and_then(|_| f.sync_all()).map_err(io("write record"))?;
        sync_dir(&self.root);
        Ok(rec)
    }

    /// Take the record's lock, waiting (with backoff) up to the lock wait while another change
    /// holds it: the source's and the destination's steps of one handover follow each other
    /// closely, and a try-once lock failed a move whenever the other side's sync was slow.
    fn lock(&self, vm: &str, host: &str) -> Result<LockGuard, QuickError> {
        let p = self.root.join(format!("{vm}.lock"));
        let give_up = Instant::now() + self.lock_wait;
        let mut pause = Duration::from_millis(1);
        loop {
            match create_private(&p) {
                Ok(mut f) => {
                    let _ = writeln!(f, "{host} pid {}", std::process::id());
                    return Ok(LockGuard(p));
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let now = Instant::now();
                    if now >= give_up {
                        let holder = fs::read_to_string(&p).unwrap_or_default();
                        return Err(QuickError::Locked(vm.into(), holder.trim().chars().take(100).collect()));
                    }
                    std::thread::sleep(pause.min(give_up - now));
                    pause = (pause * 2).min(Duration::from_millis(50));
                }
                Err(e) => return Err(io(format!("create {}", p.display()))(e)),
            }
        }
    }

    /// Change the record from `expect` (owner, state, epoch must match) to `next` (its epoch is
    /// set to `expect.epoch + 1`), atomically. Returns the new record.
    pub fn transition(&self, vm: &str, by: &str, expect: &Record, mut next: Record) -> Result<Record, QuickError> {
        check_name(vm)?;
        check_name(&next.owner)?;
        let _lock = self.lock(vm, by)?;
        let cur = self.record(vm)?;
        if cur != *expect {
            return Err(QuickError::NotOwner {
                vm: vm.into(),
                owner: cur.owner,
                state: cur.state.as_str().into(),
                epoch: cur.epoch,
                expected: format!("{} {} epoch {}", expect.owner, expect.state.as_str(), expect.epoch),
            });
        }
        next.epoch = cur.epoch + 1;
        let mut tmp = TempFile::new(&self.root, &format!("{vm}.owner"))?;
        tmp.file.write_all(next.encode().as_bytes()).map_err(io("write record"))?;
        tmp.persist(&self.root, &self.record_path(vm))?;
        Ok(next)
    }

    /// The directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Remove the record of a VM that `host` owns and runs (the handover is over; a host agent
    /// keeps ownership in its own journal from here). Fails unless the record says so.
    pub fn unregister(&self, vm: &str, host: &str) -> Result<(), QuickError> {
        check_name(vm)?;
        check_name(host)?;
        let _lock = self.lock(vm, host)?;
        self.expect_owner(vm, host, VmRunState::Running)?;
        let p = self.record_path(vm);
        fs::remove_file(&p).map_err(io(format!("remove {}", p.display())))?;
        sync_dir(&self.root);
        Ok(())
    }

    fn expect_owner(&self, vm: &str, host: &str, state: VmRunState) -> Result<Record, QuickError> {
        let r = self.record(vm)?;
        if r.owner != host || r.state != state {
            return Err(QuickError::NotOwner {
                vm: vm.into(),
                owner: r.owner,
                state: r.state.as_str().into(),
                epoch: r.epoch,
                expected: format!("{host} {}", state.as_str()),
            });
        }
        Ok(r)
    }
}

/// What saving took.
#[derive(Debug, Clone)]
pub struct SaveReport {
    /// Pause of the VM (part of `total`).
    pub pause: Duration,
    /// From pause to image durable (state + memory + fsync + record).
    pub total: Duration,
    /// Image size.
    pub file_bytes: u64,
    /// Pages stored (non-zero).
    pub pages_stored: u64,
    /// Pages of the guest.
    pub pages_total: u64,
    /// vCPU/device state size.
    pub state_bytes: usize,
    /// The record after the handover.
    pub record: Record,
}

/// What loading took.
#[derive(Debug, Clone)]
pub struct LoadReport {
    /// From opening the image to the VM resumed.
    pub total: Duration,
    /// Image size.
    pub file_bytes: u64,
    /// Pages loaded.
    pub pages_loaded: u64,
}

fn put_u32(v: &mut Vec<u8>, x: u32) {
    v.extend_from_slice(&x.to_le_bytes());
}
fn put_u64(v: &mut Vec<u8>, x: u64) {
    v.extend_from_slice(&x.to_le_bytes());
}

/// Write the image of a paused VM into `f` (flushed, not synced); returns (bytes, pages stored).
fn write_image(
    f: &mut File,
    path: &Path,
    shape: &VmShape,
    state: &[u8],
    mem: &MemoryMap,
    cancel: &CancelToken,
) -> Result<(u64, u64), QuickError> {
    let mut w = BufWriter::with_capacity(4 << 20, f);
    let r = write_chunks(&mut w, shape, state, mem, Some(cancel)).map_err(|e| match e {
        QuickError::Io { source, .. } => io(format!("write {}", path.display()))(source),
        e => e,
    })?;
    w.flush().map_err(io(format!("flush {}", path.display())))?;
    Ok(r)
}

/// An image's header (magic, version, length, the VM's shape and state, CRC), as
/// [`read_header`] reads it.
fn encode_header(shape: &VmShape, state: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&(shape.vm_id.len() as u16).to_le_bytes());
    body.extend_from_slice(shape.vm_id.as_bytes());
    put_u32(&mut body, shape.regions.len() as u32);
    for &(gpa, len) in &shape.regions {
        put_u64(&mut body, gpa);
        put_u64(&mut body, len);
    }
    put_u32(&mut body, state.len() as u32);
    body.extend_from_slice(state);
    let mut head = IMAGE_MAGIC.to_vec();
    put_u32(&mut head, IMAGE_VERSION);
    put_u32(&mut head, body.len() as u32);
    head.extend_from_slice(&body);
    let crc = crc32fast::hash(&head);
    put_u32(&mut head, crc);
    head
}

/// Write the image of a paused VM (the format in the module docs) to `w`; returns (bytes,
/// pages stored). (What `quick_save` writes; public for the image reader's fuzz target.)
pub fn write_image_to(
    w: &mut impl Write,
    shape: &VmShape,
    state: &[u8],
    mem: &MemoryMap,
) -> Result<(u64, u64), QuickError> {
    write_chunks(w, shape, state, mem, None)
}

/// [`write_image_to`], stopping between chunks once `cancel` is set.
fn write_chunks(
    w: &mut impl Write,
    shape: &VmShape,
    state: &[u8],
    mem: &MemoryMap,
    cancel: Option<&CancelToken>,
) -> Result<(u64, u64), QuickError> {
    let werr = || io("write image");
    let head = encode_header(shape, state);
    w.write_all(&head).map_err(werr())?;
    let mut bytes = head.len() as u64;
    let mut chunks = 0u64;
    let mut stored = 0u64;
    let mut buf = vec![0u8; CHUNK_PAGES as usize * PAGE_SIZE];
    let mut out = Vec::with_capacity(buf.len() + 1024);
    for &(gpa0, len) in &shape.regions {
        let pages_in_region = len / PAGE_SIZE as u64;
        let mut p = 0;
        while p < pages_in_region {
            if cancel.is_some_and(CancelToken::is_cancelled) {
                return Err(QuickError::Cancelled);
            }
            let n = (pages_in_region - p).min(u64::from(CHUNK_PAGES));
            let gpa = gpa0 + p * PAGE_SIZE as u64;
            let host = mem
                .lookup(gpa, n as usize * PAGE_SIZE)
                .ok_or_else(|| QuickError::BadImage(format!("gpa {gpa:#x} not in guest memory")))?;
            let mut bitmap = vec![0u64; (n as usize).div_ceil(64)];
            let mut present = 0usize;
            for i in 0..n as usize {
                let Some(page) = host.subslice(i * PAGE_SIZE, PAGE_SIZE).filter(|p| !p.is_zero_page()) else {
                    continue;
                };
                bitmap[i / 64] |= 1 << (i % 64);
                page.read_into(0, &mut buf[present * PAGE_SIZE..(present + 1) * PAGE_SIZE]);
                present += 1;
            }
            out.clear();
            out.extend_from_slice(b"CHNK");
            put_u64(&mut out, gpa);
            put_u32(&mut out, n as u32);
            for b in &bitmap {
                put_u64(&mut out, *b);
            }
            out.extend_from_slice(&buf[..present * PAGE_SIZE]);
            let crc = crc32fast::hash(&out);
            put_u32(&mut out, crc);
            w.write_all(&out).map_err(werr())?;
            bytes += out.len() as u64;
            chunks += 1;
            stored += present as u64;
            p += n;
        }
    }
    let mut end = b"END!".to_vec();
    put_u64(&mut end, chunks);
    put_u64(&mut end, stored);
    let crc = crc32fast::hash(&end);
    put_u32(&mut end, crc);
    w.write_all(&end).map_err(werr())?;
    bytes += end.len() as u64;
    Ok((bytes, stored))
}

struct Cursor<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], QuickError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.b.len())
            .ok_or_else(|| QuickError::BadImage("header truncated".into()))?;
        let s = &self.b[self.pos..end];
        self.pos = end;
        Ok(s)
    }
}

struct Image {
    shape: VmShape,
    state: Vec<u8>,
}

fn read_exact(r: &mut impl Read, n: usize, what: &str) -> Result<Vec<u8>, QuickError> {
    let mut v = vec![0; n];
    r.read_exact(&mut v).map_err(|e| QuickError::BadImage(format!("{what}: {e}")))?;
    Ok(v)
}

fn le_u32(b: &[u8]) -> u32 {
    let mut a = [0; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_le_bytes(a)
}
fn le_u64(b: &[u8]) -> u64 {
    let mut a = [0; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

fn read_header(r: &mut impl Read) -> Result<Image, QuickError> {
    let bad = |m: String| QuickError::BadImage(m);
    let fixed = read_exact(r, 16, "header")?;
    if fixed[..8] != IMAGE_MAGIC {
        return Err(bad("not a Ferry quick-migration image".into()));
    }
    let version = le_u32(&fixed[8..]);
    if version != IMAGE_VERSION {
        return Err(bad(format!("version {version}")));
    }
    let blen = le_u32(&fixed[12..]);
    if blen > MAX_HEADER {
        return Err(bad(format!("header of {blen} bytes")));
    }
    let body = read_exact(r, blen as usize, "header body")?;
    let crc = read_exact(r, 4, "header crc")?;
    let mut h = crc32fast::Hasher::new();
    h.update(&fixed);
    h.update(&body);
    if h.finalize() != le_u32(&crc) {
        return Err(bad("header crc mismatch".into()));
    }
    // The body is CRC-checked, but still parsed with bounds checks.
    let mut c = Cursor { b: &body, pos: 0 };
    let idlen = u16::from_le_bytes([c.take(1)?[0], c.take(1)?[0]]) as usize;
    let vm_id = String::from_utf8(c.take(idlen)?.to_vec()).map_err(|_| bad("vm id not utf-8".into()))?;
    let nreg = le_u32(c.take(4)?);
    if nreg == 0 || nreg > MAX_REGIONS {
        return Err(bad(format!("{nreg} regions")));
    }
    let mut regions = Vec::new();
    for _ in 0..nreg {
        let gpa = le_u64(c.take(8)?);
        let len = le_u64(c.take(8)?);
        if !gpa.is_multiple_of(PAGE_SIZE as u64)
            || !len.is_multiple_of(PAGE_SIZE as u64)
            || len == 0
            || gpa.checked_add(len).is_none()
        {
            return Err(bad(format!("region {gpa:#x}+{len:#x}")));
        }
        // Regions overlapping one another would map one guest address twice.
        if let Some(&(g, l)) = regions.iter().find(|&&(g, l): &&(u64, u64)| gpa < g + l && g < gpa + len) {
            return Err(bad(format!("region {gpa:#x}+{len:#x} overlaps {g:#x}+{l:#x}")));
        }
        regions.push((gpa, len));
    }
    let slen = le_u32(c.take(4)?) as usize;
    let state = c.take(slen)?.to_vec();
    if c.pos != body.len() {
        return Err(bad("trailing bytes in header".into()));
    }
    Ok(Image { shape: VmShape { vm_id, regions }, state })
}

/// Read an image: its header, then the guest memory `memory` gives for the image's shape (the
/// target's, not running), then every chunk into it. Returns the shape, the VM state and the
/// pages loaded. Every length is capped and every CRC checked before use; garbage is an error,
/// never a panic. (What `quick_load` runs on the file; public for its fuzz target.)
pub fn read_image(
    r: &mut impl Read,
    memory: impl FnOnce(&VmShape) -> Result<MemoryMap, QuickError>,
) -> Result<(VmShape, Vec<u8>, u64), QuickError> {
    let img = read_header(r)?;
    let mem = memory(&img.shape)?;
    let pages = read_chunks(r, &img.shape, &mem)?;
    Ok((img.shape, img.state, pages))
}

/// Read the chunks into `mem` (the target, not running). Returns pages loaded.
fn read_chunks(r: &mut impl Read, shape: &VmShape, mem: &MemoryMap) -> Result<u64, QuickError> {
    let bad = |m: String| QuickError::BadImage(m);
    let mut expect = shape.regions.iter().flat_map(|&(gpa, len)| {
        let pages = len / PAGE_SIZE as u64;
        (0..pages.div_ceil(u64::from(CHUNK_PAGES))).map(move |c| {
            let p = c * u64::from(CHUNK_PAGES);
            (gpa + p * PAGE_SIZE as u64, (pages - p).min(u64::from(CHUNK_PAGES)) as u32)
        })
    });
    let mut chunks = 0u64;
    let mut loaded = 0u64;
    let mut page = vec![0u8; PAGE_SIZE];
    loop {
        let tag = read_exact(r, 4, "chunk tag")?;
        if tag == b"END!" {
            let rest = read_exact(r, 20, "end record")?;
            let mut h = crc32fast::Hasher::new();
            h.update(&tag);
            h.update(&rest[..16]);
            if h.finalize() != le_u32(&rest[16..]) {
                return Err(bad("end record crc mismatch".into()));
            }
            if le_u64(&rest) != chunks || le_u64(&rest[8..]) != loaded || expect.next().is_some() {
                return Err(bad("image ends before all of guest memory".into()));
            }
            return Ok(loaded);
        }
        if tag != b"CHNK" {
            return Err(bad(format!("bad chunk tag after {chunks} chunks")));
        }
        let head = read_exact(r, 12, "chunk header")?;
        let gpa = le_u64(&head);
        let n = le_u32(&head[8..]);
        if expect.next() != Some((gpa, n)) {
            return Err(bad(format!("unexpected chunk {gpa:#x}+{n} pages")));
        }
        let words = (n as usize).div_ceil(64);
        let bm = read_exact(r, words * 8, "chunk bitmap")?;
        let bitmap: Vec<u64> = bm.chunks_exact(8).map(le_u64).collect();
        if !n.is_multiple_of(64) && bitmap[words - 1] >> (n % 64) != 0 {
            return Err(bad("bitmap bits past the chunk".into()));
        }
        let mut h = crc32fast::Hasher::new();
        h.update(&tag);
        h.update(&head);
        h.update(&bm);
        for i in 0..n as usize {
            if bitmap[i / 64] & (1 << (i % 64)) == 0 {
                continue;
            }
            let page_gpa = gpa + (i * PAGE_SIZE) as u64;
            let dst = mem.lookup(page_gpa, PAGE_SIZE).ok_or_else(|| bad(format!("gpa {page_gpa:#x} not in memory")))?;
            // Read into a buffer, then copy in: no `&mut [u8]` over guest memory (ferry-memory's
            // access contract).
            r.read_exact(&mut page).map_err(|e| bad(format!("page {page_gpa:#x}: {e}")))?;
            h.update(&page);
            dst.write_from(0, &page);
            loaded += 1;
        }
        let crc = read_exact(r, 4, "chunk crc")?;
        if h.finalize() != le_u32(&crc) {
            return Err(bad(format!("chunk at {gpa:#x}: crc mismatch")));
        }
        chunks += 1;
    }
}

/// Quick-migrate a VM that `from` owns (running) to host `to`: pause, save the image, hand the
/// record over. On success the caller must drop the source VM without resuming it (the target
/// owns it now). On failure the source is resumed if it was running and still owns the VM.
pub fn quick_save(dir: &SharedDir, vm: &mut dyn SourceVm, from: &str, to: &str) -> Result<SaveReport, QuickError> {
    quick_save_cancellable(dir, vm, from, to, &CancelToken::new())
}

/// [`quick_save`] that stops when `cancel` is set: before the pause, after the state is
/// saved, between image chunks and right before the handover, it ends with
/// [`QuickError::Cancelled`] (the record unchanged, the image removed, the VM resumed if it
/// was running). Once the record names `to`, a cancel no longer applies: the target owns the VM.
pub fn quick_save_cancellable(
    dir: &SharedDir,
    vm: &mut dyn SourceVm,
    from: &str,
    to: &str,
    cancel: &CancelToken,
) -> Result<SaveReport, QuickError> {
    let check = || if cancel.is_cancelled() { Err(QuickError::Cancelled) } else { Ok(()) };
    let shape = vm.shape();
    check_name(&shape.vm_id)?;
    check_name(from)?;
    check_name(to)?;
    let rec = dir.expect_owner(&shape.vm_id, from, VmRunState::Running)?;
    let was_running = vm.is_running();
    check()?;
    let t0 = Instant::now();
    vm.pause().map_err(QuickError::Vm)?;
    let pause = t0.elapsed();
    let image = format!("{}.{}.img", shape.vm_id, rec.epoch + 1);
    let attempt = (|| {
        let state = vm.save_state().map_err(QuickError::Vm)?;
        check()?;
        let mut tmp = TempFile::new(&dir.root, &image)?;
        let shown = tmp.path.clone();
        let (bytes, stored) = write_image(&mut tmp.file, &shown, &shape, &state, &vm.memory(), cancel)?;
        check()?;
        tmp.persist(&dir.root, &dir.root.join(&image))?;
        check()?;
        let next = Record { owner: to.into(), state: VmRunState::Saved, epoch: 0, image: Some(image.clone()) };
        let record = dir.transition(&shape.vm_id, from, &rec, next)?; // commit point
        Ok((bytes, stored, state.len(), record))
    })();
    match attempt {
        Ok((file_bytes, pages_stored, state_bytes, record)) => Ok(SaveReport {
            pause,
            total: t0.elapsed(),
            file_bytes,
            pages_stored,
            pages_total: shape.memory_bytes() / PAGE_SIZE as u64,
            state_bytes,
            record,
        }),
        Err(e) => {
            let _ = fs::remove_file(dir.root.join(&image));
            if was_running {
                // Still the owner: the record did not change.
                let _ = vm.resume();
            }
            Err(e)
        }
    }
}

/// Load the saved VM `vm_id` that `host` now owns, resume it, and mark it running.
pub fn quick_load(
    dir: &SharedDir,
    factory: &dyn TargetFactory,
    vm_id: &str,
    host: &str,
) -> Result<(Box<dyn TargetVm>, LoadReport), QuickError> {
    let (t, r) = quick_load_into(dir, vm_id, host, |shape| factory.create(shape).map(Boxed))?;
    Ok((t.0, r))
}

struct Boxed(Box<dyn TargetVm>);

impl TargetVm for Boxed {
    fn memory(&self) -> MemoryMap {
        self.0.memory()
    }
    fn restore_state(&mut self, state: &[u8]) -> Result<(), VmError> {
        self.0.restore_state(state)
    }
    fn resume(&mut self) -> Result<(), VmError> {
        self.0.resume()
    }
    fn into_any(self: Box<Self>) -> Box<dyn std::any::Any + Send> {
        self.0.into_any()
    }
}

/// [`quick_load`] with the target made by `create` (for callers that keep the concrete VM type).
pub fn quick_load_into<T: TargetVm>(
    dir: &SharedDir,
    vm_id: &str,
    host: &str,
    create: impl FnOnce(&VmShape) -> Result<T, VmError>,
) -> Result<(T, LoadReport), QuickError> {
    check_name(vm_id)?;
    check_name(host)?;
    let rec = dir.expect_owner(vm_id, host, VmRunState::Saved)?;
    let image = rec.image.clone().ok_or_else(|| QuickError::BadRecord("saved without image".into()))?;
    let t0 = Instant::now();
    let path = dir.root.join(&image);
    let f = File::open(&path).map_err(io(format!("open {}", path.display())))?;
    let file_bytes = f.metadata().map(|m| m.len()).unwrap_or(0);
    let mut r = BufReader::with_capacity(4 << 20, f);
    let mut made = None;
    let (_, state, pages_loaded) = read_image(&mut r, |shape| {
        if shape.vm_id != vm_id {
            return Err(QuickError::BadImage(format!("image is of VM {:?}", shape.vm_id)));
        }
        let t = create(shape).map_err(QuickError::Vm)?;
        let mem = t.memory();
        made = Some(t);
        Ok(mem)
    })?;
    let mut target = made.ok_or(QuickError::BadImage("no guest memory was made".into()))?;
    target.restore_state(&state).map_err(QuickError::Vm)?;
    let next = Record { owner: host.into(), state: VmRunState::Running, epoch: 0, image: None };
    let running = dir.transition(vm_id, host, &rec, next)?;
    if let Err(e) = target.resume() {
        // Not running: the VM goes back to saved (ours, image kept) so the load can be retried;
        // the loaded copy is dropped first.
        drop(target);
        let back = Record { owner: host.into(), state: VmRunState::Saved, epoch: 0, image: Some(image.clone()) };
        let fate = match dir.transition(vm_id, host, &running, back) {
            Ok(r) => format!(
                "it is not running anywhere: saved, owned by {host} (epoch {}), image {} kept; load it again",
                r.epoch,
                path.display()
            ),
            Err(e2) => format!(
                "it is not running anywhere, but its record still says running on {host} ({e2}); image {} kept",
                path.display()
            ),
        };
        return Err(QuickError::ResumeFailed { vm: vm_id.into(), reason: e.to_string(), fate });
    }
    let total = t0.elapsed();
    let _ = fs::remove_file(&path);
    Ok((target, LoadReport { total, file_bytes, pages_loaded }))
}

/// Quick migration of a VM that is off: only ownership moves.
pub fn handover_off(dir: &SharedDir, vm_id: &str, from: &str, to: &str) -> Result<Record, QuickError> {
    check_name(to)?;
    let rec = dir.expect_owner(vm_id, from, VmRunState::Off)?;
    dir.transition(vm_id, from, &rec, Record { owner: to.into(), state: VmRunState::Off, epoch: 0, image: None })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir(name: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("ferry-quick-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).unwrap();
        p
    }

    #[test]
    fn record_roundtrip_and_garbage() {
        let r = Record { owner: "host-a".into(), state: VmRunState::Saved, epoch: 7, image: Some("vm.8.img".into()) };
        assert_eq!(Record::decode(&r.encode()).unwrap(), r);
        let mut s = r.encode().into_bytes();
        s[20] ^= 1;
        assert!(Record::decode(&String::from_utf8_lossy(&s)).is_err());
        for g in ["", "crc ", "crc zz", "ferry-owner 1\ncrc 0"] {
            assert!(Record::decode(g).is_err());
        }
    }

    #[test]
    fn names_are_checked() {
        for n in ["", "..", ".x", "a/b", "a b", &"x".repeat(65)] {
            assert!(check_name(n).is_err(), "{n:?}");
        }
        check_name("vm-1.a_b").unwrap();
    }

    /// A change waits for a lock held only briefly (the other side's change in progress) and
    /// succeeds once it goes; a lock held past the wait is reported with its holder.
    #[test]
    fn a_briefly_held_lock_is_waited_for() {
        let d = SharedDir::new(tmpdir("lockwait")).with_lock_wait(Duration::from_secs(10));
        d.register("vm1", "a", VmRunState::Off).unwrap();
        let lock = d.root.join("vm1.lock");
        fs::write(&lock, "b pid 2\n").unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let holder = std::thread::spawn(move || {
            // Release only after the change below has started waiting.
            rx.recv().unwrap();
            std::thread::sleep(Duration::from_millis(100));
            fs::remove_file(lock).unwrap();
        });
        tx.send(()).unwrap();
        let r = handover_off(&d, "vm1", "a", "b").unwrap();
        assert_eq!(r.owner, "b");
        holder.join().unwrap();
        let d = d.with_lock_wait(Duration::from_millis(50));
        fs::write(d.root.join("vm1.lock"), "c pid 3\n").unwrap();
        match handover_off(&d, "vm1", "b", "a") {
            Err(QuickError::Locked(vm, holder)) => assert_eq!((vm.as_str(), holder.as_str()), ("vm1", "c pid 3")),
            other => panic!("expected Locked, got {other:?}"),
        }
        assert_eq!(d.record("vm1").unwrap().owner, "b", "nothing changed under a held lock");
    }

    #[test]
    fn ownership_moves_once() {
        let d = SharedDir::new(tmpdir("own")).with_lock_wait(Duration::from_millis(200));
        let r = d.register("vm1", "a", VmRunState::Off).unwrap();
        assert!(matches!(d.register("vm1", "b", VmRunState::Off), Err(QuickError::Exists(_))));
        let r2 = handover_off(&d, "vm1", "a", "b").unwrap();
        assert_eq!((r2.owner.as_str(), r2.epoch), ("b", r.epoch + 1));
        // A second handover from a (a stale owner) fails: exactly one owner.
        assert!(matches!(handover_off(&d, "vm1", "a", "c"), Err(QuickError::NotOwner { .. })));
        // A stale expectation (old epoch) fails even for the right owner.
        assert!(d.transition("vm1", "b", &r, r2.clone()).is_err());
        // A held lock blocks changes and is reported.
        fs::write(d.root.join("vm1.lock"), "x pid 1\n").unwrap();
        assert!(matches!(handover_off(&d, "vm1", "b", "a"), Err(QuickError::Locked(..))));
        fs::remove_file(d.root.join("vm1.lock")).unwrap();
        handover_off(&d, "vm1", "b", "a").unwrap();
        // Only the owner of a running VM removes its record; then it can be registered again.
        assert!(matches!(d.unregister("vm1", "a"), Err(QuickError::NotOwner { .. })), "off, not running");
        let r = d.record("vm1").unwrap();
        let run = Record { owner: "a".into(), state: VmRunState::Running, epoch: 0, image: None };
        d.transition("vm1", "a", &r, run).unwrap();
        assert!(matches!(d.unregister("vm1", "b"), Err(QuickError::NotOwner { .. })));
        d.unregister("vm1", "a").unwrap();
        assert!(d.record("vm1").is_err());
        d.register("vm1", "b", VmRunState::Running).unwrap();
        let _ = fs::remove_dir_all(&d.root);
    }

    #[test]
    fn garbage_images_are_errors() {
        let mut cases: Vec<Vec<u8>> = vec![vec![], b"FERRYQMI".to_vec(), vec![0xff; 64]];
        let mut h = IMAGE_MAGIC.to_vec();
        put_u32(&mut h, IMAGE_VERSION);
        put_u32(&mut h, u32::MAX);
        cases.push(h);
        for c in cases {
            assert!(read_header(&mut &c[..]).is_err());
        }
    }

    /// A header with a valid CRC around `regions`.
    fn header_with(regions: &[(u64, u64)]) -> Vec<u8> {
        encode_header(&VmShape { vm_id: "vm".into(), regions: regions.to_vec() }, &[])
    }

    /// Found by the quick_image fuzz target: a zero-length region (and overlapping ones) reached
    /// the memory map, which refused it with a panic in the caller.
    #[test]
    fn empty_and_overlapping_regions_are_bad_images() {
        let p = PAGE_SIZE as u64;
        let ok = read_header(&mut &header_with(&[(0, p), (p, 2 * p)])[..]).expect("adjacent regions");
        assert_eq!(ok.shape.regions.len(), 2);
        for regions in [vec![(0, 0)], vec![(0, 2 * p), (p, p)], vec![(4 * p, p), (0, 8 * p)]] {
            match read_header(&mut &header_with(&regions)[..]) {
                Err(QuickError::BadImage(_)) => {}
                Err(e) => panic!("{regions:?}: {e}"),
                Ok(_) => panic!("{regions:?} accepted"),
            }
        }
    }
}
