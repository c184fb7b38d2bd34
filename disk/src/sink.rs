//! Where copied blocks go: the [`BlockSink`] trait, and [`FileSink`], a new sparse image file
//! under a temporary name that becomes a disk only when it is committed.
//!
//! The local move writes through a `FileSink`; a shared-nothing move's destination writes the
//! blocks it receives through one too. Tests wrap a sink to inject I/O errors.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::image;

/// A destination for disk blocks.
pub trait BlockSink: Send {
    /// Write `data` at `off`.
    fn write_at(&mut self, off: u64, data: &[u8]) -> io::Result<()>;
    /// Make `[off, off + len)` read as zeros, occupying nothing where the file system can.
    fn zero(&mut self, off: u64, len: u64) -> io::Result<()>;
    /// Make everything written so far durable.
    fn sync(&mut self) -> io::Result<()>;
    /// Start writing `[off, off + len)` back to storage without waiting (so the final
    /// [`BlockSink::sync`] has little left to do). A hint: the default does nothing.
    fn start_writeback(&mut self, _off: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }
}

/// A new image file at a temporary path (`DIR/.NAME.ferry-partial`), created sparse at the
/// disk's size. [`FileSink::commit`] gives it its final name (never replacing a file);
/// [`FileSink::discard`] (or dropping it uncommitted) removes it.
#[derive(Debug)]
pub struct FileSink {
    file: Arc<File>,
    temp: PathBuf,
    committed: bool,
}

/// The temporary name of a disk's partial copy in `dir`: hidden, and never a name a disk has.
pub fn partial_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!(".{name}.ferry-partial"))
}

impl FileSink {
    /// Create the partial copy of disk `name` (of `size_bytes`) in `dir`; fails if it exists.
    pub fn create(dir: &Path, name: &str, size_bytes: u64) -> io::Result<Self> {
        let temp = partial_path(dir, name);
        let file = image::create_sparse(&temp, size_bytes)?;
        Ok(Self { file: Arc::new(file), temp, committed: false })
    }

    /// The file being written.
    pub fn file(&self) -> Arc<File> {
        self.file.clone()
    }

    /// The temporary path.
    pub fn temp_path(&self) -> &Path {
        &self.temp
    }

    /// A second handle that writes into the same file (the one given to the mirror).
    pub fn writer(&self) -> FileWriter {
        FileWriter { file: self.file.clone() }
    }

    /// Give the file its final name `path`, never replacing an existing file (a hard link, then
    /// the temporary name is removed). After this the file is a disk.
    pub fn commit(&mut self, path: &Path) -> io::Result<()> {
        std::fs::hard_link(&self.temp, path)?;
        self.committed = true;
        let _ = std::fs::remove_file(&self.temp);
        Ok(())
    }

    /// Remove the partial copy.
    pub fn discard(mut self) -> io::Result<()> {
        self.committed = true; // nothing left for drop to do
        std::fs::remove_file(&self.temp)
    }
}

impl Drop for FileSink {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.temp);
        }
    }
}

/// Writes into a [`FileSink`]'s file.
#[derive(Debug)]
pub struct FileWriter {
    file: Arc<File>,
}

impl BlockSink for FileWriter {
    fn write_at(&mut self, off: u64, data: &[u8]) -> io::Result<()> {
        self.file.write_all_at(data, off)
    }

    fn zero(&mut self, off: u64, len: u64) -> io::Result<()> {
        image::punch_hole(&self.file, off, len)
    }

    fn sync(&mut self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn start_writeback(&mut self, off: u64, len: u64) -> io::Result<()> {
        image::start_writeback(&self.file, off, len)
    }
}
