//! Loads the kernel (bzImage or ELF vmlinux, via linux-loader), the initrd and the
//! command line into guest memory.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::{BzImage, Elf, KernelLoader, KernelLoaderResult};
use vm_memory::{Bytes, GuestAddress};

use super::BootError;
use super::layout::{CMDLINE_ADDR, DEFAULT_INITRD_ADDR_MAX, ELF_CMDLINE_MAX};
use crate::memory::{GuestMemory, HIMEM_START, low_ram_end};
use crate::os_error::os_message;

const ELF_MAGIC: &[u8; 4] = b"\x7fELF";
/// "HdrS" at offset 0x202 marks a Linux boot-protocol setup header.
const SETUP_MAGIC_OFFSET: usize = 0x202;
const SETUP_MAGIC: &[u8; 4] = b"HdrS";
/// The 64-bit entry point sits this far into a bzImage's protected-mode kernel.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
/// Boot protocol 2.06 added `cmdline_size`; older kernels are not worth supporting.
const MIN_BOOT_PROTOCOL: u16 = 0x0206;
/// xloadflags bit 0: the kernel has a 64-bit entry point at +0x200.
const XLF_KERNEL_64: u16 = 1;
const PAGE: u64 = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFormat {
    Elf,
    BzImage,
}

/// Where the kernel landed and how to enter it.
#[derive(Debug, Clone)]
pub struct LoadedKernel {
    pub format: KernelFormat,
    /// 64-bit entry point (guest-physical, identity mapped).
    pub entry: GuestAddress,
    /// First byte above everything the kernel owns (for bzImage: its decompression
    /// footprint, `init_size`), where an initrd may start.
    pub end: u64,
    /// The bzImage's setup header, copied into boot_params.
    pub setup_header: Option<setup_header>,
}

impl LoadedKernel {
    /// Highest address the initrd may occupy.
    pub fn initrd_addr_max(&self) -> u64 {
        match &self.setup_header {
            Some(h) if h.initrd_addr_max != 0 => u64::from(h.initrd_addr_max),
            _ => DEFAULT_INITRD_ADDR_MAX,
        }
    }

    /// Longest command line (without NUL) the kernel accepts.
    pub fn cmdline_max(&self) -> usize {
        match &self.setup_header {
            Some(h) if h.cmdline_size != 0 => h.cmdline_size as usize,
            _ => ELF_CMDLINE_MAX - 1,
        }
    }
}

/// Opens a boot file for reading without ever blocking: O_NONBLOCK, so a FIFO in its
/// place cannot hold the VMM at start (opening a FIFO for reading waits for a writer),
/// then refuses anything that is not a regular file. Regular files ignore O_NONBLOCK,
/// so reads behave as usual.
pub fn open_regular(path: &Path) -> Result<File, String> {
    tracing::debug!("opening {}", path.display());
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| os_message(&e))?;
    let meta = file.metadata().map_err(|e| os_message(&e))?;
    if !meta.file_type().is_file() {
        return Err("not a regular file".into());
    }
    Ok(file)
}

/// Loads `path` into `mem`, recognising the format by its magic bytes.
pub fn load_kernel(mem: &GuestMemory, path: &Path) -> Result<LoadedKernel, BootError> {
    let err = |reason: String| BootError::Kernel {
        path: path.to_path_buf(),
        reason,
    };
    let mut file = open_regular(path).map_err(err)?;
    let mut head = [0u8; SETUP_MAGIC_OFFSET + 4];
    let head_len = read_up_to(&mut file, &mut head).map_err(|e| err(os_message(&e)))?;
    let head = &head[..head_len];
    let mem_size = crate::memory::total_size(mem);

    let format = if head.starts_with(ELF_MAGIC) {
        KernelFormat::Elf
    } else if head.get(SETUP_MAGIC_OFFSET..SETUP_MAGIC_OFFSET + 4) == Some(SETUP_MAGIC) {
        KernelFormat::BzImage
    } else if head_len == 0 {
        return Err(err("file is empty".into()));
    } else {
        return Err(err(
            "not a kernel: neither an ELF vmlinux nor a bzImage (no ELF magic, no HdrS setup header)".into(),
        ));
    };

    let highmem = Some(GuestAddress(HIMEM_START));
    let loaded: KernelLoaderResult = match format {
        KernelFormat::Elf => Elf::load(mem, None, &mut file, highmem),
        KernelFormat::BzImage => BzImage::load(mem, None, &mut file, highmem),
    }
    .map_err(|e| err(loader_message(&e, mem_size)))?;

    match format {
        KernelFormat::Elf => Ok(LoadedKernel {
            format,
            entry: loaded.kernel_load,
            end: loaded.kernel_end,
            setup_header: None,
        }),
        KernelFormat::BzImage => {
            let hdr = loaded
                .setup_header
                .ok_or_else(|| err("bzImage loader returned no setup header".into()))?;
            let version = hdr.version;
            if version < MIN_BOOT_PROTOCOL {
                return Err(err(format!(
                    "boot protocol {}.{:02} is too old: need 2.06 or newer",
                    version >> 8,
                    version & 0xff
                )));
            }
            let xloadflags = hdr.xloadflags;
            if xloadflags & XLF_KERNEL_64 == 0 {
                return Err(err("bzImage has no 64-bit entry point (xloadflags bit 0 clear)".into()));
            }
            // The kernel decompresses itself in place and needs init_size bytes there.
            let init_end = loaded.kernel_load.0 + u64::from(hdr.init_size);
            let end = loaded.kernel_end.max(init_end);
            if end > low_ram_end(mem_size) {
                return Err(err(format!(
                    "needs {} MiB of memory to unpack itself: give the guest more memory",
                    end.div_ceil(1 << 20)
                )));
            }
            Ok(LoadedKernel {
                format,
                entry: GuestAddress(loaded.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET),
                end,
                setup_header: Some(hdr),
            })
        }
    }
}

/// Reads as much of `buf` as the file has.
fn read_up_to(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    file.seek(SeekFrom::Start(0))?;
    Ok(filled)
}

/// linux-loader's messages, made to say what an operator can do about them.
fn loader_message(e: &linux_loader::loader::Error, mem_size: u64) -> String {
    use linux_loader::loader::Error as L;
    use linux_loader::loader::bzimage::Error as B;
    use linux_loader::loader::elf::Error as E;
    match e {
        L::Elf(E::ReadKernelImage) | L::Bzimage(B::ReadBzImageCompressedKernel) => format!(
            "truncated, or does not fit in {} of guest memory",
            crate::config::MemorySize(mem_size)
        ),
        L::Elf(E::ReadProgramHeader) | L::Elf(E::SeekKernelStart) => {
            "truncated ELF file (program headers or segments missing)".into()
        }
        L::Elf(E::InvalidEntryAddress) => "ELF entry point is below 1 MiB: link the kernel at 1 MiB or higher".into(),
        L::Bzimage(B::Underflow) => "truncated bzImage (shorter than its setup sectors)".into(),
        L::Elf(inner) => format!("invalid ELF image: {}", strip_prefix(&inner.to_string())),
        L::Bzimage(inner) => format!("invalid bzImage: {}", strip_prefix(&inner.to_string())),
        L::InvalidKernelStartAddress => "bzImage wants to load below 1 MiB".into(),
        other => strip_prefix(&other.to_string()),
    }
}

fn strip_prefix(s: &str) -> String {
    s.trim_start_matches("Kernel Loader: ").to_string()
}

/// Where an initrd was placed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadedInitrd {
    pub addr: u64,
    pub size: u64,
}

/// Places the initrd as high as allowed (below `initrd_addr_max` and the MMIO gap),
/// page aligned, above the kernel, as bootloaders do.
pub fn initrd_placement(size: u64, kernel_end: u64, addr_max: u64, mem_size: u64) -> Option<u64> {
    let top = low_ram_end(mem_size).min(addr_max.saturating_add(1));
    let addr = top.checked_sub(size)? & !(PAGE - 1);
    let floor = kernel_end.div_ceil(PAGE) * PAGE;
    (addr >= floor).then_some(addr)
}

pub fn load_initrd(mem: &GuestMemory, path: &Path, kernel: &LoadedKernel) -> Result<LoadedInitrd, BootError> {
    let err = |reason: String| BootError::Initrd {
        path: path.to_path_buf(),
        reason,
    };
    let mut file = open_regular(path).map_err(err)?;
    let size = file.metadata().map_err(|e| err(os_message(&e)))?.len();
    let mem_size = crate::memory::total_size(mem);
    let addr = initrd_placement(size, kernel.end, kernel.initrd_addr_max(), mem_size).ok_or_else(|| {
        err(format!(
            "{} bytes do not fit in guest memory ({}) next to the kernel: give the guest more memory",
            size,
            crate::config::MemorySize(mem_size)
        ))
    })?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, size as usize)
        .map_err(|e| err(format!("cannot read: {e}")))?;
    Ok(LoadedInitrd { addr, size })
}

/// Validates the command line against the kernel's limit and writes it to guest memory.
pub fn load_cmdline(mem: &GuestMemory, cmdline: &str, kernel: &LoadedKernel) -> Result<u32, BootError> {
    let max = kernel.cmdline_max();
    if cmdline.len() > max {
        return Err(BootError::Cmdline(format!(
            "{} bytes is longer than the {max} bytes this kernel accepts",
            cmdline.len()
        )));
    }
    let cl = Cmdline::try_from(cmdline, max + 1).map_err(|e| BootError::Cmdline(format!("invalid: {e}")))?;
    linux_loader::loader::load_cmdline(mem, GuestAddress(CMDLINE_ADDR), &cl)
        .map_err(|_| BootError::GuestWrite("the command line"))?;
    // Make sure the terminating NUL is there even for an empty line.
    mem.write_obj(0u8, GuestAddress(CMDLINE_ADDR + cmdline.len() as u64))
        .map_err(|_| BootError::GuestWrite("the command line"))?;
    Ok(cmdline.len() as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn initrd_goes_high_and_page_aligned() {
        let mem = 128u64 << 20;
        let addr = initrd_placement(10_000, 2 << 20, DEFAULT_INITRD_ADDR_MAX, mem).unwrap();
        assert_eq!(addr % PAGE, 0);
        assert!(addr + 10_000 <= mem);
        assert!(addr >= mem - 16384);
    }

    #[test]
    fn initrd_respects_addr_max_and_kernel() {
        let mem = 2u64 << 30;
        let addr = initrd_placement(1 << 20, 16 << 20, 0x37ff_ffff, mem).unwrap();
        assert!(addr + (1 << 20) <= 0x3800_0000);
        assert_eq!(initrd_placement(mem, 16 << 20, u64::MAX, mem), None);
        assert_eq!(initrd_placement((120 << 20) + 1, 8 << 20, u64::MAX, 128 << 20), None);
    }
}
