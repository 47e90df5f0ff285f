//! Fixed guest-physical addresses of the boot structures, all below 1 MiB so any guest
//! of at least 16 MiB has them. Same shape as Firecracker's, with the GDT laid out the
//! way the boot protocol documents (__BOOT_CS = 0x10, __BOOT_DS = 0x18).

/// GDT: null, null, code (0x10), data (0x18), TSS (0x20).
pub const GDT_ADDR: u64 = 0x500;
/// An empty IDT: the kernel installs its own before enabling interrupts.
pub const IDT_ADDR: u64 = 0x520;
/// `struct boot_params` ("zero page"); RSI points here at entry.
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Initial stack (grows down, below the page tables).
pub const BOOT_STACK: u64 = 0x8ff0;
/// Identity page tables: PML4, one PDPT, four page directories of 2 MiB pages (4 GiB,
/// so the LAPIC/IOAPIC at the top of the 32-bit space are mapped too).
pub const PML4_ADDR: u64 = 0x9000;
pub const PDPT_ADDR: u64 = 0xa000;
pub const PD_ADDR: u64 = 0xb000;
pub const PD_COUNT: u64 = 4;
/// Kernel command line.
pub const CMDLINE_ADDR: u64 = 0x2_0000;
/// Longest command line accepted for ELF kernels (Linux x86's COMMAND_LINE_SIZE).
pub const ELF_CMDLINE_MAX: usize = 2048;
/// MP floating pointer + configuration table (the last KiB of conventional memory,
/// one of the places Linux scans).
pub const MPTABLE_ADDR: u64 = crate::memory::EBDA_START;
/// Where KVM's TSS (3 pages) and identity-map page live on Intel: inside the MMIO gap.
pub const KVM_TSS_ADDR: u64 = 0xfffb_d000;
pub const KVM_IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;
/// Local APIC and IOAPIC MMIO bases (handled by KVM's irqchip).
pub const LAPIC_ADDR: u32 = 0xfee0_0000;
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
/// Highest initrd address a kernel without a setup header is assumed to accept.
pub const DEFAULT_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;
/// virtio-mmio windows: one 4 KiB page per device from here, inside the MMIO gap.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// Interrupt lines of virtio devices, in device order. IOAPIC pins 16-23 first (free of
/// any legacy meaning; the MP table routes them for kernels without ACPI), then the ISA
/// IRQs no emulated device uses (COM1 4, i8042 1/12, RTC 8, SCI 9, PIT 0 stay theirs).
pub const VIRTIO_IRQS: [u32; 16] = [16, 17, 18, 19, 20, 21, 22, 23, 5, 6, 7, 10, 11, 14, 15, 3];
/// IOAPIC pins above the ISA range that the MP table describes.
pub const IOAPIC_EXTRA_PINS: std::ops::RangeInclusive<u8> = 16..=23;
