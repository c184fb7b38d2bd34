//! A small tmpfs mounted for one test (a file system that fills up: "disk full" at a
//! destination), unmounted when dropped.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A tmpfs mounted on a directory the test owns; unmounted on drop.
#[derive(Debug)]
pub struct SmallTmpfs(PathBuf);

impl SmallTmpfs {
    /// Mount a tmpfs of `size` (mount's syntax: `1m`, `256k`) on a new directory `small` under
    /// `parent`. Where mounting is not permitted (not root, no CAP_SYS_ADMIN) prints
    /// `SKIP: <test>: <reason>` and returns `None`.
    pub fn mount(parent: &Path, size: &str, test: &str) -> Option<Self> {
        let dir = parent.join("small");
        std::fs::create_dir(&dir).expect("creating the tmpfs mount point");
        let st = Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"]).arg(&dir).status();
        if st.is_ok_and(|s| s.success()) {
            Some(Self(dir))
        } else {
            println!("SKIP: {test}: cannot mount a {size} tmpfs (needs root / CAP_SYS_ADMIN)");
            None
        }
    }

    /// The mounted directory.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for SmallTmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}
