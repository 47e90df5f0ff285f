//! `struct boot_params` (the "zero page"): the setup header, command line, initrd and the
//! e820 memory map, as the Linux x86 boot protocol describes them.

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use vm_memory::GuestAddress;

use super::BootError;
use super::layout::{CMDLINE_ADDR, ZERO_PAGE_ADDR};
use super::loader::{LoadedInitrd, LoadedKernel};
use crate::memory::{E820Entry, GuestMemory};

const BOOT_FLAG_MAGIC: u16 = 0xaa55;
const HDRS_MAGIC: u32 = 0x5372_6448;
/// "Undefined" boot loader ID: we have none registered.
const LOADER_TYPE_UNDEFINED: u8 = 0xff;
/// Alignment the kernel asks for when its header does not say (16 MiB, Linux's default).
const DEFAULT_KERNEL_ALIGNMENT: u32 = 0x100_0000;

/// Builds boot_params and writes them to the zero page.
pub fn write_boot_params(
    mem: &GuestMemory,
    kernel: &LoadedKernel,
    cmdline_len: u32,
    initrd: Option<LoadedInitrd>,
    e820: &[E820Entry],
    acpi_rsdp: Option<u64>,
) -> Result<(), BootError> {
    let mut params = build_boot_params(kernel, cmdline_len, initrd, e820)?;
    if let Some(rsdp) = acpi_rsdp {
        params.acpi_rsdp_addr = rsdp;
    }
    LinuxBootConfigurator::write_bootparams(&BootParams::new(&params, GuestAddress(ZERO_PAGE_ADDR)), mem)
        .map_err(|_| BootError::GuestWrite("boot_params"))
}

pub fn build_boot_params(
    kernel: &LoadedKernel,
    cmdline_len: u32,
    initrd: Option<LoadedInitrd>,
    e820: &[E820Entry],
) -> Result<boot_params, BootError> {
    let mut params = boot_params::default();
    if let Some(hdr) = kernel.setup_header {
        params.hdr = hdr;
    }
    params.hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    params.hdr.boot_flag = BOOT_FLAG_MAGIC;
    params.hdr.header = HDRS_MAGIC;
    params.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    params.hdr.cmdline_size = cmdline_len;
    if params.hdr.kernel_alignment == 0 {
        params.hdr.kernel_alignment = DEFAULT_KERNEL_ALIGNMENT;
    }
    if let Some(initrd) = initrd {
        // Placement keeps the initrd below 4 GiB, so the 32-bit fields suffice.
        params.hdr.ramdisk_image = initrd.addr as u32;
        params.hdr.ramdisk_size = initrd.size as u32;
    }
    if e820.len() > params.e820_table.len() {
        return Err(BootError::GuestWrite("an e820 map this long"));
    }
    for (slot, entry) in params.e820_table.iter_mut().zip(e820) {
        *slot = boot_e820_entry {
            addr: entry.addr,
            size: entry.size,
            r#type: entry.kind as u32,
        };
    }
    params.e820_entries = e820.len() as u8;
    Ok(params)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::boot::KernelFormat;
    use crate::memory::e820_map;

    #[test]
    fn fills_header_initrd_and_e820() {
        let kernel = LoadedKernel {
            format: KernelFormat::Elf,
            entry: GuestAddress(0x100_0000),
            end: 0x200_0000,
            setup_header: None,
        };
        let initrd = LoadedInitrd {
            addr: 0x700_0000,
            size: 1234,
        };
        let map = e820_map(128 << 20);
        let p = build_boot_params(&kernel, 42, Some(initrd), &map).unwrap();
        let (flag, magic, ptr, size) = (p.hdr.boot_flag, p.hdr.header, p.hdr.cmd_line_ptr, p.hdr.cmdline_size);
        assert_eq!((flag, magic), (0xaa55, 0x5372_6448));
        assert_eq!((ptr, size), (CMDLINE_ADDR as u32, 42));
        let (img, len) = (p.hdr.ramdisk_image, p.hdr.ramdisk_size);
        assert_eq!((img, len), (0x700_0000, 1234));
        assert_eq!(p.e820_entries as usize, map.len());
        let last = p.e820_table[map.len() - 1];
        let (addr, sz, ty) = (last.addr, last.size, last.r#type);
        assert_eq!((addr, sz, ty), (0x10_0000, (128 << 20) - 0x10_0000, 1));
    }
}
