//! Writing a disk image as a sparse file: runs of zero blocks are skipped (left as
//! holes) instead of written, so an image's free space costs no disk blocks. Used by
//! image imports (receiving, qcow2 conversion) and by sparse clones.

use std::borrow::Borrow;
use std::fs::File;
use std::os::unix::fs::FileExt;

/// Granularity of hole detection: the file system block size of ext4 and XFS.
pub const BLOCK: usize = 4096;

/// Writes at increasing offsets of a file (owned, or `&File`), leaving all-zero
/// blocks as holes. Counts the bytes it allocates against `budget`.
pub struct SparseWriter<F: Borrow<File>> {
    file: F,
    pos: u64,
    /// Bytes of data written (not holes).
    pub allocated: u64,
    budget: u64,
}

#[derive(Debug)]
pub struct OverBudget {
    pub needed: u64,
    pub budget: u64,
}

impl<F: Borrow<File>> SparseWriter<F> {
    pub fn new(file: F, budget: u64) -> Self {
        SparseWriter {
            file,
            pos: 0,
            allocated: 0,
            budget,
        }
    }

    pub fn position(&self) -> u64 {
        self.pos
    }

    /// Skips `len` bytes that read as zero.
    pub fn skip(&mut self, len: u64) {
        self.pos += len;
    }

    /// Writes `data` at the current position, block by block, skipping zero blocks.
    pub fn write(&mut self, data: &[u8]) -> std::io::Result<Result<(), OverBudget>> {
        for block in data.chunks(BLOCK) {
            if block.iter().all(|&b| b == 0) {
                self.pos += block.len() as u64;
                continue;
            }
            if self.allocated + block.len() as u64 > self.budget {
                return Ok(Err(OverBudget {
                    needed: self.allocated + block.len() as u64,
                    budget: self.budget,
                }));
            }
            self.file.borrow().write_all_at(block, self.pos)?;
            self.pos += block.len() as u64;
            self.allocated += block.len() as u64;
        }
        Ok(Ok(()))
    }
}

impl SparseWriter<File> {
    /// Sets the file's length to `len` (trailing holes count) and syncs it.
    pub fn finish(self, len: u64) -> std::io::Result<File> {
        self.file.set_len(len)?;
        self.file.sync_all()?;
        Ok(self.file)
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;

    #[test]
    fn zero_blocks_become_holes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        let mut w = SparseWriter::new(File::create(&p).unwrap(), u64::MAX);
        w.write(&vec![0u8; 1 << 20]).unwrap().unwrap();
        w.write(&[7u8; 10]).unwrap().unwrap();
        w.skip(1 << 20);
        w.finish(3 << 20).unwrap();
        let m = std::fs::metadata(&p).unwrap();
        assert_eq!(m.len(), 3 << 20);
        assert!(m.blocks() * 512 <= 64 * 1024, "{} bytes allocated", m.blocks() * 512);
        let bytes = std::fs::read(&p).unwrap();
        assert_eq!(&bytes[1 << 20..(1 << 20) + 10], &[7u8; 10]);
        assert!(bytes[..1 << 20].iter().all(|&b| b == 0));
    }

    #[test]
    fn the_budget_counts_data_only() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = SparseWriter::new(File::create(dir.path().join("img")).unwrap(), 8192);
        w.write(&vec![0u8; 1 << 20]).unwrap().unwrap();
        w.write(&[1u8; 8192]).unwrap().unwrap();
        assert!(w.write(&[1u8; 1]).unwrap().is_err());
    }
}
