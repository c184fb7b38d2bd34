//! Quick migration's files in the shared directory, with a synthetic guest: images and records
//! are private (mode 0600), written under unpredictable temporary names and renamed into place
//! (nothing planted at a guessable name is followed or left behind), and a load whose VM does not
//! resume is a failure that leaves the VM saved, owned by the loading host, ready to load again;
//! a save cancelled at any of its checks leaves the record, the directory and the VM as before.

use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};

use ferry_memory::MemoryMap;
use ferry_migrate::quick::{quick_load, quick_save, quick_save_cancellable, QuickError, SharedDir, VmRunState};
use ferry_migrate::source::CancelToken;
use ferry_migrate::vm::{DirtyBitmap, SourceVm, TargetFactory, TargetVm, VmError, VmShape};
use ferry_test_support::guest::{guest, same_memory, NoResume};
use ferry_vmm_glue::synthetic::SyntheticVm;
use ferry_vmm_glue::synthetic::{SyntheticFactory, SyntheticTarget};

fn tmpdir(name: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("ferry-quick-files-{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&p);
    fs::create_dir_all(&p).unwrap();
    p
}

fn mode(p: &Path) -> u32 {
    fs::metadata(p).unwrap().permissions().mode() & 0o777
}

/// Names in `dir`, sorted.
fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> =
        fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    v.sort();
    v
}

/// A factory whose VMs load but never resume.
struct NoResumeFactory(SyntheticFactory);

impl TargetFactory for NoResumeFactory {
    fn create(&self, shape: &VmShape) -> Result<Box<dyn TargetVm>, VmError> {
        Ok(Box::new(NoResume(self.0.create(shape)?)))
    }
}

#[test]
fn images_and_records_are_private_and_renamed_into_place() {
    let root = tmpdir("private");
    let dir = SharedDir::new(&root);
    // Files planted at the names the old code wrote through: a symlink to a victim file.
    let victim = root.join("victim");
    fs::write(&victim, b"untouched").unwrap();
    for planted in ["q1.2.img.tmp", "q1.owner.tmp.host-a", ".q1.2.img.tmp"] {
        symlink(&victim, root.join(planted)).unwrap();
    }
    dir.register("q1", "host-a", VmRunState::Running).unwrap();
    assert_eq!(mode(&root.join("q1.owner")), 0o600, "a registered record is not private");
    let mut vm = guest("q1", 4, 0, 0, 3);
    let s = quick_save(&dir, &mut vm, "host-a", "host-b").expect("save");
    let image = root.join(s.record.image.as_deref().expect("a saved record names its image"));
    assert_eq!(mode(&image), 0o600, "the image (guest memory) is readable by others");
    assert_eq!(mode(&root.join("q1.owner")), 0o600, "the record is not private");
    assert_eq!(fs::read(&victim).unwrap(), b"untouched", "a planted symlink was written through");
    // Only the image, the record and what was planted: no temporary file or lock left behind.
    let mut want = vec![".q1.2.img.tmp", "q1.2.img", "q1.2.img.tmp", "q1.owner", "q1.owner.tmp.host-a", "victim"];
    want.sort();
    assert_eq!(names(&root), want);
    let (t, _) = quick_load(&dir, &SyntheticFactory::new(1 << 30, false), "q1", "host-b").expect("load");
    let t = *t.into_any().downcast::<SyntheticTarget>().unwrap();
    same_memory(&vm, &t);
    assert_eq!(mode(&root.join("q1.owner")), 0o600);
    assert!(!image.exists(), "the image outlived the load");
    let _ = fs::remove_dir_all(&root);
}

#[test]
fn a_load_that_does_not_resume_is_a_failure_and_can_be_retried() {
    let root = tmpdir("noresume");
    let dir = SharedDir::new(&root);
    dir.register("q2", "host-a", VmRunState::Running).unwrap();
    let mut vm = guest("q2", 4, 0, 0, 4);
    quick_save(&dir, &mut vm, "host-a", "host-b").expect("save");
    let bad = NoResumeFactory(SyntheticFactory::new(1 << 30, false));
    match quick_load(&dir, &bad, "q2", "host-b") {
        Err(QuickError::ResumeFailed { vm, reason, fate }) => {
            assert_eq!(vm, "q2");
            assert!(reason.contains("would not start"), "{reason}");
            assert!(fate.contains("saved, owned by host-b") && fate.contains("load it again"), "{fate}");
        }
        other => panic!("expected ResumeFailed, got {:?}", other.map(|r| r.1)),
    }
    // The VM's fate as the record tells it: saved, owned by host-b, its image still there.
    let r = dir.record("q2").unwrap();
    assert_eq!((r.owner.as_str(), r.state), ("host-b", VmRunState::Saved));
    let image = root.join(r.image.as_deref().expect("the image is still named"));
    assert!(image.exists(), "the image is gone: the VM would be lost");
    // Loading again on a working host brings the VM back as it was saved.
    let (t, _) = quick_load(&dir, &SyntheticFactory::new(1 << 30, false), "q2", "host-b").expect("retry");
    let t = *t.into_any().downcast::<SyntheticTarget>().unwrap();
    same_memory(&vm, &t);
    assert_eq!(dir.record("q2").unwrap().state, VmRunState::Running);
    let _ = fs::remove_dir_all(&root);
}

/// Where [`CancelAt`] pulls the cancel switch.
#[derive(Debug, Clone, Copy, PartialEq)]
enum At {
    /// Before the save starts.
    Before,
    /// While the state is saved (the VM is paused).
    SaveState,
    /// When the image writer maps the memory (before its first chunk).
    Memory,
}

/// A synthetic guest that cancels its save at a chosen point: deterministic, no timing.
struct CancelAt {
    vm: SyntheticVm,
    token: CancelToken,
    at: At,
}

impl SourceVm for CancelAt {
    fn shape(&self) -> VmShape {
        self.vm.shape()
    }
    fn memory(&self) -> MemoryMap {
        if self.at == At::Memory {
            self.token.cancel();
        }
        self.vm.memory()
    }
    fn start_dirty_log(&mut self) -> Result<(), VmError> {
        self.vm.start_dirty_log()
    }
    fn take_dirty(&mut self) -> Result<DirtyBitmap, VmError> {
        self.vm.take_dirty()
    }
    fn return_dirty(&mut self, pages: &DirtyBitmap) {
        self.vm.return_dirty(pages)
    }
    fn stop_dirty_log(&mut self) {
        self.vm.stop_dirty_log()
    }
    fn pause(&mut self) -> Result<(), VmError> {
        self.vm.pause()
    }
    fn resume(&mut self) -> Result<(), VmError> {
        self.vm.resume()
    }
    fn is_running(&self) -> bool {
        self.vm.is_running()
    }
    fn save_state(&mut self) -> Result<Vec<u8>, VmError> {
        if self.at == At::SaveState {
            self.token.cancel();
        }
        self.vm.save_state()
    }
    fn set_throttle(&mut self, percent: u8) {
        self.vm.set_throttle(percent)
    }
}

#[test]
fn a_cancelled_save_leaves_the_record_the_directory_and_the_vm_as_they_were() {
    for (i, at) in [At::Before, At::SaveState, At::Memory].into_iter().enumerate() {
        let root = tmpdir(&format!("cancel{i}"));
        let dir = SharedDir::new(&root);
        let before = dir.register("q3", "host-a", VmRunState::Running).unwrap();
        let token = CancelToken::new();
        if at == At::Before {
            token.cancel();
        }
        let mut vm = CancelAt { vm: guest("q3", 8, 2, 0, 5), token: token.clone(), at };
        assert!(vm.is_running());
        match quick_save_cancellable(&dir, &mut vm, "host-a", "host-b", &token) {
            Err(QuickError::Cancelled) => {}
            other => panic!("{at:?}: expected Cancelled, got {:?}", other.map(|r| r.record)),
        }
        assert_eq!(dir.record("q3").unwrap(), before, "{at:?}: the record changed");
        assert_eq!(names(&root), ["q3.owner"], "{at:?}: an image or temporary file was left");
        assert!(vm.is_running(), "{at:?}: the VM was not resumed");
        // Still the owner: the next save (not cancelled) hands it over.
        let s = quick_save(&dir, &mut vm.vm, "host-a", "host-b").expect("save after a cancel");
        assert_eq!((s.record.owner.as_str(), s.record.state), ("host-b", VmRunState::Saved));
        let _ = fs::remove_dir_all(&root);
    }
}
