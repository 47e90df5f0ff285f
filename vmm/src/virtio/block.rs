//! virtio-blk backed by a raw image file (VIRTIO 1.x section 5.2).
//!
//! Requests are served synchronously on the device thread with preadv/pwritev straight
//! between the file and guest memory (no bounce buffer, except for O_DIRECT with
//! buffers the host cannot use directly). FLUSH is fdatasync; DISCARD and WRITE_ZEROES
//! punch holes, so discarded ranges read back as zeros and sparse images stay sparse.
//! The capacity is the file size rounded down to 512-byte sectors. A block device (an
//! LVM volume, a partition) works the same way as an image file.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use vm_memory::VolatileSlice;

use super::persist::{self, BlockState, VirtioDeviceState};
use super::queue_handler::{self, Chain, IovecBuf};
use super::{COMMON_FEATURES, NeedsReset, QueueContext, VirtioDevice, read_config_bytes};
pub use crate::device_config::DiskConfig;
use crate::device_counters::{DeviceCounters, DeviceKind};
use crate::memory::GuestMemory;
use crate::os_error::os_message;
use crate::state_error::StateError;

pub const SECTOR_SIZE: u64 = 512;
const QUEUE_SIZE: u16 = 256;
/// Data segments per request: the queue minus header and status descriptors.
const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// Largest request accepted (header, data and status together).
pub const MAX_REQUEST_BYTES: u64 = 32 << 20;
/// DISCARD / WRITE_ZEROES ranges per request.
const MAX_DISCARD_SEGMENTS: u32 = 16;
/// Alignment (in sectors) discards are most useful at: a 4 KiB file system block.
const DISCARD_ALIGNMENT_SECTORS: u32 = 8;
const MAX_DISCARD_SECTORS: u32 = u32::MAX / SECTOR_SIZE as u32;
const HEADER_LEN: u64 = 16;
const DISCARD_SEGMENT_LEN: u64 = 16;
const ID_BYTES: usize = VIRTIO_BLK_ID_BYTES as usize;
const CONFIG_LEN: usize = 60;
/// O_DIRECT buffers must be aligned to the logical block size; 4 KiB covers all disks.
const DIRECT_ALIGN: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("disk {}: {reason}", path.display())]
    Open { path: PathBuf, reason: String },
}

/// A virtio-blk device.
pub struct Block {
    file: File,
    path: PathBuf,
    readonly: bool,
    direct: bool,
    capacity: u64,
    id: [u8; ID_BYTES],
    config: [u8; CONFIG_LEN],
    chain: Chain,
    iov: IovecBuf,
    bounce: Option<AlignedBuf>,
    /// Reads ("in") and writes ("out") for the control socket's `stats`.
    counters: Arc<DeviceCounters>,
}

impl Block {
    pub fn open(config: &DiskConfig) -> Result<Block, BlockError> {
        let err = |reason: String| BlockError::Open {
            path: config.path.clone(),
            reason,
        };
        let mut options = OpenOptions::new();
        options.read(true).write(!config.readonly);
        // O_NONBLOCK: a FIFO or a character device in the disk's place cannot hold the
        // VMM at start (opening a FIFO read-only waits for a writer); the type check
        // below refuses it, and the flag is cleared again for the file it accepts.
        let mut flags = libc::O_NONBLOCK;
        if config.direct {
            flags |= libc::O_DIRECT;
        }
        options.custom_flags(flags);
        tracing::debug!("opening disk {}", config.path.display());
        let file = options.open(&config.path).map_err(|e| {
            let hint = match e.raw_os_error() {
                Some(libc::EINVAL) if config.direct => " (this file system does not support O_DIRECT: drop direct=on)",
                Some(libc::EACCES) | Some(libc::EROFS) if !config.readonly => {
                    " (use readonly=on for a read-only image)"
                }
                _ => "",
            };
            err(format!("{}{hint}", os_message(&e)))
        })?;
        let meta = file.metadata().map_err(|e| err(os_message(&e)))?;
        let kind = meta.file_type();
        if !kind.is_file() && !kind.is_block_device() {
            return Err(err("not a regular file or block device (raw images only)".into()));
        }
        clear_nonblocking(&file).map_err(|e| err(os_message(&e)))?;
        // The end offset is the size for files and block devices alike (a block
        // device's metadata says 0).
        let size = (&file).seek(SeekFrom::End(0)).map_err(|e| err(os_message(&e)))?;
        let capacity = size / SECTOR_SIZE;
        if capacity == 0 {
            return Err(err(format!("{size} bytes is smaller than one 512-byte sector")));
        }
        let mut id = [0u8; ID_BYTES];
        if let Some(serial) = &config.serial {
            if serial.len() > ID_BYTES || !serial.is_ascii() {
                return Err(err(format!("serial {serial:?}: at most {ID_BYTES} ASCII characters")));
            }
            id[..serial.len()].copy_from_slice(serial.as_bytes());
        }
        let mut block = Block {
            file,
            path: config.path.clone(),
            readonly: config.readonly,
            direct: config.direct,
            capacity,
            id,
            config: [0; CONFIG_LEN],
            chain: Chain::default(),
            iov: IovecBuf::default(),
            bounce: None,
            counters: DeviceCounters::detached(DeviceKind::Block),
        };
        block.config = block.config_space();
        Ok(block)
    }

    /// Counts this disk's reads and writes in `counters` (from [`device_counters`]).
    pub fn with_counters(mut self, counters: Arc<DeviceCounters>) -> Self {
        self.counters = counters;
        self
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    fn config_space(&self) -> [u8; CONFIG_LEN] {
        let mut c = [0u8; CONFIG_LEN];
        let mut put = |at: usize, bytes: &[u8]| c[at..at + bytes.len()].copy_from_slice(bytes);
        put(0, &self.capacity.to_le_bytes());
        put(12, &SEG_MAX.to_le_bytes());
        put(36, &MAX_DISCARD_SECTORS.to_le_bytes());
        put(40, &MAX_DISCARD_SEGMENTS.to_le_bytes());
        put(44, &DISCARD_ALIGNMENT_SECTORS.to_le_bytes());
        put(48, &MAX_DISCARD_SECTORS.to_le_bytes()); // max_write_zeroes_sectors
        put(52, &MAX_DISCARD_SEGMENTS.to_le_bytes()); // max_write_zeroes_seg
        put(56, &[1]); // write_zeroes_may_unmap
        c
    }

    /// Serves one parsed request; returns the bytes written into guest memory.
    fn serve(&mut self, mem: &GuestMemory) -> u32 {
        let chain = &self.chain;
        // Without a device-writable last byte there is nowhere to put a status: the
        // request can only be returned unserved.
        if !chain.ends_writable || chain.writable_len == 0 {
            tracing::debug!(
                "{}: request without a status byte: {:?}",
                self.path.display(),
                chain.error
            );
            return 0;
        }
        let status_at = chain.writable_len - 1;
        let (status, data_written) = match &chain.error {
            Some(e) => {
                tracing::debug!("{}: bad request: {e}", self.path.display());
                (VIRTIO_BLK_S_IOERR, 0)
            }
            None => self.execute(mem),
        };
        let writable = std::mem::take(&mut self.chain.writable);
        queue_handler::write_to(mem, &writable, status_at, &[status as u8]);
        self.chain.writable = writable;
        (data_written + 1) as u32
    }

    /// Runs the request; returns (status, data bytes written to the guest).
    fn execute(&mut self, mem: &GuestMemory) -> (u32, u64) {
        let mut header = [0u8; HEADER_LEN as usize];
        if self.chain.readable_len < HEADER_LEN
            || queue_handler::read_from(mem, &self.chain.readable, 0, &mut header) != header.len()
        {
            return (VIRTIO_BLK_S_IOERR, 0);
        }
        let kind = u32::from_le_bytes(header[0..4].try_into().unwrap_or_default());
        let sector = u64::from_le_bytes(header[8..16].try_into().unwrap_or_default());
        let in_len = self.chain.writable_len - 1;
        let out_len = self.chain.readable_len - HEADER_LEN;
        match kind {
            VIRTIO_BLK_T_IN => match self.rw(mem, sector, in_len, false) {
                Ok(()) => {
                    self.counters.add_in(in_len);
                    (VIRTIO_BLK_S_OK, in_len)
                }
                Err(status) => (status, 0),
            },
            VIRTIO_BLK_T_OUT if self.readonly => (VIRTIO_BLK_S_IOERR, 0),
            VIRTIO_BLK_T_OUT => match self.rw(mem, sector, out_len, true) {
                Ok(()) => {
                    self.counters.add_out(out_len);
                    (VIRTIO_BLK_S_OK, 0)
                }
                Err(status) => (status, 0),
            },
            VIRTIO_BLK_T_FLUSH => {
                // SAFETY: fdatasync on an fd we own.
                if unsafe { libc::fdatasync(self.file.as_raw_fd()) } == 0 {
                    (VIRTIO_BLK_S_OK, 0)
                } else {
                    self.log_io("fdatasync", &std::io::Error::last_os_error());
                    (VIRTIO_BLK_S_IOERR, 0)
                }
            }
            VIRTIO_BLK_T_GET_ID => {
                let n = (in_len as usize).min(ID_BYTES);
                let writable = std::mem::take(&mut self.chain.writable);
                let done = queue_handler::write_to(mem, &writable, 0, &self.id[..n]);
                self.chain.writable = writable;
                (VIRTIO_BLK_S_OK, done as u64)
            }
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES if self.readonly => (VIRTIO_BLK_S_IOERR, 0),
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => (self.punch(mem, kind, out_len), 0),
            _ => (VIRTIO_BLK_S_UNSUPP, 0),
        }
    }

    /// Checks a sector range against the disk; returns the byte offset.
    fn range(&self, sector: u64, len: u64) -> Option<u64> {
        if !len.is_multiple_of(SECTOR_SIZE) {
            return None;
        }
        let end = sector.checked_add(len / SECTOR_SIZE)?;
        (end <= self.capacity).then(|| sector * SECTOR_SIZE)
    }

    fn rw(&mut self, mem: &GuestMemory, sector: u64, len: u64, write: bool) -> Result<(), u32> {
        let offset = self.range(sector, len).ok_or(VIRTIO_BLK_S_IOERR)?;
        if len == 0 {
            return Ok(());
        }
        let (segments, skip) = if write {
            (&self.chain.readable, HEADER_LEN)
        } else {
            (&self.chain.writable, 0)
        };
        queue_handler::chain_iovecs(mem, segments, skip, len, &mut self.iov.0);
        let direct_ok =
            !self.direct
                || self.iov.0.iter().all(|v| {
                    (v.iov_base as usize).is_multiple_of(DIRECT_ALIGN) && v.iov_len.is_multiple_of(DIRECT_ALIGN)
                });
        let result = if direct_ok {
            let r = full_io(&self.file, &mut self.iov.0, offset, write);
            self.iov.0.clear();
            r
        } else {
            self.iov.0.clear();
            let mut parts: Vec<VolatileSlice<'_>> = Vec::with_capacity(segments.len());
            queue_handler::slices(mem, segments, skip, len, &mut parts);
            self.bounced_io(&parts, offset, len, write)
        };
        result.map_err(|e| {
            self.log_io(if write { "write" } else { "read" }, &e);
            VIRTIO_BLK_S_IOERR
        })
    }

    /// O_DIRECT with guest buffers the kernel cannot DMA into directly: go through an
    /// aligned buffer.
    fn bounced_io(&mut self, parts: &[VolatileSlice<'_>], offset: u64, len: u64, write: bool) -> std::io::Result<()> {
        let len = len as usize;
        let buf = self.bounce.get_or_insert_with(AlignedBuf::default);
        let bytes = buf.get(len)?;
        if write {
            let mut at = 0;
            for p in parts {
                at += p.copy_to(&mut bytes[at..]);
            }
        }
        let mut iov = vec![libc::iovec {
            iov_base: bytes.as_mut_ptr().cast(),
            iov_len: len,
        }];
        full_io(&self.file, &mut iov, offset, write)?;
        if !write {
            let mut at = 0;
            for p in parts {
                let n = p.len();
                p.copy_from(&bytes[at..at + n]);
                at += n;
            }
        }
        Ok(())
    }

    /// DISCARD and WRITE_ZEROES: a list of {sector, num_sectors, flags} after the header.
    fn punch(&mut self, mem: &GuestMemory, kind: u32, out_len: u64) -> u32 {
        if out_len == 0
            || !out_len.is_multiple_of(DISCARD_SEGMENT_LEN)
            || out_len / DISCARD_SEGMENT_LEN > u64::from(MAX_DISCARD_SEGMENTS)
        {
            return VIRTIO_BLK_S_IOERR;
        }
        for i in 0..out_len / DISCARD_SEGMENT_LEN {
            let mut seg = [0u8; DISCARD_SEGMENT_LEN as usize];
            let at = HEADER_LEN + i * DISCARD_SEGMENT_LEN;
            if queue_handler::read_from(mem, &self.chain.readable, at, &mut seg) != seg.len() {
                return VIRTIO_BLK_S_IOERR;
            }
            let sector = u64::from_le_bytes(seg[0..8].try_into().unwrap_or_default());
            let sectors = u32::from_le_bytes(seg[8..12].try_into().unwrap_or_default());
            let flags = u32::from_le_bytes(seg[12..16].try_into().unwrap_or_default());
            // DISCARD defines no flags; WRITE_ZEROES only "unmap allowed".
            let allowed = if kind == VIRTIO_BLK_T_DISCARD {
                0
            } else {
                VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
            };
            if flags & !allowed != 0 {
                return VIRTIO_BLK_S_UNSUPP;
            }
            if sectors > MAX_DISCARD_SECTORS {
                return VIRTIO_BLK_S_IOERR;
            }
            let len = u64::from(sectors) * SECTOR_SIZE;
            let Some(offset) = self.range(sector, len) else {
                return VIRTIO_BLK_S_IOERR;
            };
            if len == 0 {
                continue;
            }
            if let Err(e) = punch_hole(&self.file, offset, len) {
                if kind == VIRTIO_BLK_T_DISCARD {
                    // A discard is a hint: a file system without hole punching just
                    // keeps the data.
                    tracing::debug!("{}: discard not supported here: {e}", self.path.display());
                    continue;
                }
                if let Err(e) = write_zeroes(&self.file, offset, len) {
                    self.log_io("write zeroes", &e);
                    return VIRTIO_BLK_S_IOERR;
                }
            }
        }
        VIRTIO_BLK_S_OK
    }

    fn log_io(&self, what: &str, e: &std::io::Error) {
        tracing::warn!("{}: {what} failed: {}", self.path.display(), os_message(e));
    }
}

/// preadv/pwritev until every byte moved; a short read at end of file is an error.
fn full_io(file: &File, iov: &mut [libc::iovec], mut offset: u64, write: bool) -> std::io::Result<()> {
    let mut iov = iov;
    while !iov.is_empty() {
        let count = iov.len().min(libc::UIO_MAXIOV as usize) as libc::c_int;
        // SAFETY: the iovecs point into guest memory checked to be mapped for their
        // whole length (or into our own buffer); the fd is ours.
        let n = unsafe {
            if write {
                libc::pwritev(file.as_raw_fd(), iov.as_ptr(), count, offset as libc::off_t)
            } else {
                libc::preadv(file.as_raw_fd(), iov.as_ptr(), count, offset as libc::off_t)
            }
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the image file ended before the request did",
            ));
        }
        let mut n = n as usize;
        offset += n as u64;
        while n > 0 {
            let first = &mut iov[0];
            if n >= first.iov_len {
                n -= first.iov_len;
                iov = &mut iov[1..];
            } else {
                // SAFETY: advancing within the same buffer.
                first.iov_base = unsafe { first.iov_base.cast::<u8>().add(n) }.cast();
                first.iov_len -= n;
                n = 0;
            }
        }
        while iov.first().is_some_and(|v| v.iov_len == 0) {
            iov = &mut iov[1..];
        }
    }
    Ok(())
}

fn punch_hole(file: &File, offset: u64, len: u64) -> std::io::Result<()> {
    // SAFETY: fallocate on an fd we own.
    let r = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset as libc::off_t,
            len as libc::off_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn write_zeroes(file: &File, mut offset: u64, len: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let zeros = vec![0u8; 64 << 10];
    let end = offset + len;
    while offset < end {
        let n = ((end - offset) as usize).min(zeros.len());
        file.write_all_at(&zeros[..n], offset)?;
        offset += n as u64;
    }
    Ok(())
}

/// A page-aligned, growable byte buffer for O_DIRECT bounces.
#[derive(Default)]
struct AlignedBuf {
    ptr: Option<std::ptr::NonNull<u8>>,
    cap: usize,
}

// SAFETY: the buffer is owned memory used by one thread at a time.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    fn get(&mut self, len: usize) -> std::io::Result<&mut [u8]> {
        if len > self.cap {
            self.free();
            let layout = std::alloc::Layout::from_size_align(len.max(DIRECT_ALIGN), DIRECT_ALIGN)
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            // SAFETY: non-zero size layout.
            let p = unsafe { std::alloc::alloc_zeroed(layout) };
            self.ptr = Some(std::ptr::NonNull::new(p).ok_or_else(|| std::io::Error::other("out of memory"))?);
            self.cap = layout.size();
        }
        match self.ptr {
            // SAFETY: ptr is valid for cap >= len bytes and exclusively ours.
            Some(p) => Ok(unsafe { std::slice::from_raw_parts_mut(p.as_ptr(), len) }),
            None => Ok(&mut []),
        }
    }

    fn free(&mut self) {
        if let Some(p) = self.ptr.take() {
            // SAFETY: allocated in `get` with this size and alignment.
            unsafe {
                std::alloc::dealloc(
                    p.as_ptr(),
                    std::alloc::Layout::from_size_align_unchecked(self.cap, DIRECT_ALIGN),
                )
            };
        }
        self.cap = 0;
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        self.free();
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn name(&self) -> &'static str {
        "virtio-blk"
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        let mut f = COMMON_FEATURES | 1 << VIRTIO_BLK_F_SEG_MAX | 1 << VIRTIO_BLK_F_FLUSH;
        if self.readonly {
            f |= 1 << VIRTIO_BLK_F_RO;
        } else {
            f |= 1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES;
        }
        f
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn activate(&mut self, _acked: u64) -> Result<(), String> {
        Ok(())
    }

    fn reset(&mut self) {}

    /// Only the capacity, to refuse a disk of another size (see [`persist`]).
    fn save_state(&self) -> VirtioDeviceState {
        VirtioDeviceState::Block(BlockState {
            capacity_sectors: self.capacity,
        })
    }

    fn restore_state(&mut self, state: &VirtioDeviceState) -> Result<(), StateError> {
        let VirtioDeviceState::Block(saved) = state else {
            return Err(persist::wrong_device_state(self.name(), state));
        };
        if saved.capacity_sectors != self.capacity {
            return Err(StateError::Mismatch {
                what: self.name(),
                reason: format!(
                    "{}: {} sectors, the saved guest's disk had {}",
                    self.path.display(),
                    self.capacity,
                    saved.capacity_sectors
                ),
            });
        }
        Ok(())
    }

    fn process_queue(&mut self, ctx: &mut QueueContext<'_>, index: usize) -> Result<(), NeedsReset> {
        if index != 0 {
            return Ok(());
        }
        ctx.serve_queue(0, |ctx| {
            let mut used_any = false;
            while queue_handler::pop_chain(&mut ctx.queues[0], ctx.mem, MAX_REQUEST_BYTES, &mut self.chain)? {
                let written = self.serve(ctx.mem);
                queue_handler::add_used(&mut ctx.queues[0], ctx.mem, self.chain.head, written)?;
                used_any = true;
            }
            Ok(used_any)
        })
    }
}

/// Describes a disk for logs.
pub fn describe(config: &DiskConfig) -> String {
    let p: &Path = &config.path;
    format!(
        "{}{}{}",
        p.display(),
        if config.readonly { " (read-only)" } else { "" },
        if config.direct { " (O_DIRECT)" } else { "" }
    )
}

/// Clears O_NONBLOCK (set only so that opening could not block).
fn clear_nonblocking(file: &File) -> std::io::Result<()> {
    // SAFETY: F_GETFL/F_SETFL on an fd this function borrows; no memory is passed.
    let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests;
