//! The 64-bit boot state: GDT, identity page tables, segment and control registers,
//! general registers, FPU and the LAPIC's LINT pins.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress};

use super::CpuError;
use crate::boot::layout::{BOOT_STACK, GDT_ADDR, IDT_ADDR, PD_ADDR, PD_COUNT, PDPT_ADDR, PML4_ADDR, ZERO_PAGE_ADDR};
use crate::memory::GuestMemory;

const BOOT_CS: u16 = 0x10;
const BOOT_DS: u16 = 0x18;
const BOOT_TSS: u16 = 0x20;

const CR0_PE: u64 = 1 << 0;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

const PTE_PRESENT_RW: u64 = 0x3;
const PDE_HUGE: u64 = 0x80;

/// Access flags in the GDT's descriptor layout: code = 64-bit, execute/read;
/// data = 32-bit, read/write; TSS = busy 64-bit TSS. All present, DPL 0, 4 KiB
/// granularity.
const FLAGS_CODE64: u16 = 0xa09b;
const FLAGS_DATA: u16 = 0xc093;
const FLAGS_TSS: u16 = 0x808b;

/// A GDT descriptor from access/flags, base and limit (the layout Linux's GDT_ENTRY
/// macro produces).
pub fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let (flags, base, limit) = (u64::from(flags), u64::from(base), u64::from(limit));
    ((base & 0xff00_0000) << 32)
        | ((flags & 0xf0ff) << 40)
        | ((limit & 0x000f_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0xffff)
}

/// The segment register state that loading `selector` with `entry` would produce.
pub fn segment(entry: u64, selector: u16) -> kvm_segment {
    let bit = |n: u32| ((entry >> n) & 1) as u8;
    let raw_limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let granular = bit(55) == 1;
    kvm_segment {
        base: ((entry >> 16) & 0xff_ffff) | ((entry >> 32) & 0xff00_0000),
        limit: if granular { (raw_limit << 12) | 0xfff } else { raw_limit },
        selector,
        type_: ((entry >> 40) & 0xf) as u8,
        present: bit(47),
        dpl: ((entry >> 45) & 3) as u8,
        db: bit(54),
        s: bit(44),
        l: bit(53),
        g: bit(55),
        avl: bit(52),
        unusable: 0,
        padding: 0,
    }
}

fn gdt() -> [u64; 5] {
    [
        0,
        0,
        gdt_entry(FLAGS_CODE64, 0, 0xfffff),
        gdt_entry(FLAGS_DATA, 0, 0xfffff),
        gdt_entry(FLAGS_TSS, 0, 0xfffff),
    ]
}

/// Writes the GDT, an empty IDT and the identity page tables (first 4 GiB in 2 MiB
/// pages) into guest memory. Shared by all vCPUs.
pub fn write_boot_tables(mem: &GuestMemory) -> Result<(), CpuError> {
    let w = |val: u64, addr: u64, what| {
        mem.write_obj(val, GuestAddress(addr))
            .map_err(|_| CpuError::GuestWrite(what))
    };
    for (i, entry) in gdt().iter().enumerate() {
        w(*entry, GDT_ADDR + 8 * i as u64, "the GDT")?;
    }
    w(0, IDT_ADDR, "the IDT")?;
    w(PDPT_ADDR | PTE_PRESENT_RW, PML4_ADDR, "page tables")?;
    let mut pds = Vec::with_capacity(512 * PD_COUNT as usize * 8);
    for gib in 0..PD_COUNT {
        let pd = PD_ADDR + gib * 0x1000;
        w(pd | PTE_PRESENT_RW, PDPT_ADDR + gib * 8, "page tables")?;
        for i in 0..512u64 {
            let phys = (gib << 30) | (i << 21);
            pds.extend((phys | PTE_PRESENT_RW | PDE_HUGE).to_le_bytes());
        }
    }
    mem.write_slice(&pds, GuestAddress(PD_ADDR))
        .map_err(|_| CpuError::GuestWrite("page tables"))
}

/// Long mode with paging, flat segments per the boot protocol, the BSP's entry state.
pub fn set_boot_sregs(vcpu: &VcpuFd, id: u8) -> Result<(), CpuError> {
    let mut sregs = vcpu.get_sregs().map_err(CpuError::setup(id, "KVM_GET_SREGS"))?;
    let table = gdt();
    let code = segment(table[2], BOOT_CS);
    let data = segment(table[3], BOOT_DS);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(table[4], BOOT_TSS);
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (table.len() * 8 - 1) as u16;
    sregs.idt.base = IDT_ADDR;
    sregs.idt.limit = 7;
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_PG;
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 = CR4_PAE;
    sregs.efer = EFER_LME | EFER_LMA;
    vcpu.set_sregs(&sregs).map_err(CpuError::setup(id, "KVM_SET_SREGS"))
}

/// RIP at the kernel's 64-bit entry, RSI at boot_params, a small stack, IF clear.
pub fn set_boot_regs(vcpu: &VcpuFd, id: u8, entry: u64) -> Result<(), CpuError> {
    let regs = kvm_regs {
        rflags: 0x2, // bit 1 is reserved-as-one; interrupts off
        rip: entry,
        rsp: BOOT_STACK,
        rbp: BOOT_STACK,
        rsi: ZERO_PAGE_ADDR,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(CpuError::setup(id, "KVM_SET_REGS"))
}

/// x87 control word and MXCSR at their reset values (all exceptions masked).
pub fn set_fpu(vcpu: &VcpuFd, id: u8) -> Result<(), CpuError> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(CpuError::setup(id, "KVM_SET_FPU"))
}

const APIC_LVT_LINT0: usize = 0x350;
const APIC_LVT_LINT1: usize = 0x360;
const DELIVERY_MODE_MASK: u32 = 0x700;
const DELIVERY_EXTINT: u32 = 0x700;
const DELIVERY_NMI: u32 = 0x400;

/// LINT0 delivers the PIC's interrupts (ExtINT), LINT1 delivers NMIs: the virtual-wire
/// setup firmware leaves and the MP table announces.
pub fn set_lint_pins(vcpu: &VcpuFd, id: u8) -> Result<(), CpuError> {
    let mut lapic = vcpu.get_lapic().map_err(CpuError::setup(id, "KVM_GET_LAPIC"))?;
    for (offset, mode) in [(APIC_LVT_LINT0, DELIVERY_EXTINT), (APIC_LVT_LINT1, DELIVERY_NMI)] {
        let reg = &mut lapic.regs[offset..offset + 4];
        let bytes: [u8; 4] = std::array::from_fn(|i| reg[i] as u8);
        let value = (u32::from_le_bytes(bytes) & !DELIVERY_MODE_MASK) | mode;
        for (dst, src) in reg.iter_mut().zip(value.to_le_bytes()) {
            *dst = src as _;
        }
    }
    vcpu.set_lapic(&lapic).map_err(CpuError::setup(id, "KVM_SET_LAPIC"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_decode_to_flat_segments() {
        let code = segment(gdt_entry(FLAGS_CODE64, 0, 0xfffff), BOOT_CS);
        assert_eq!(code.base, 0);
        assert_eq!(code.limit, 0xffff_ffff);
        assert_eq!(
            (code.type_, code.s, code.present, code.l, code.db, code.g),
            (0xb, 1, 1, 1, 0, 1)
        );
        let data = segment(gdt_entry(FLAGS_DATA, 0, 0xfffff), BOOT_DS);
        assert_eq!((data.type_, data.db, data.l), (3, 1, 0));
        let tss = segment(gdt_entry(FLAGS_TSS, 0, 0xfffff), BOOT_TSS);
        assert_eq!((tss.type_, tss.s), (0xb, 0));
        // The well-known encoding of a flat 64-bit kernel code segment.
        assert_eq!(gdt_entry(FLAGS_CODE64, 0, 0xfffff), 0x00af_9b00_0000_ffff);
    }
}
