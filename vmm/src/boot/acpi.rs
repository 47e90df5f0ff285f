//! ACPI tables: RSDP → XSDT → FADT (→ FACS, DSDT) and MADT.
//!
//! Kernels built without `CONFIG_X86_MPPARSE` (Debian's cloud kernel is one) ignore the
//! MP table and find CPUs only through the MADT; without it they boot one vCPU whatever
//! the VM has. The FADT declares a full (not hardware-reduced) platform: a
//! hardware-reduced one makes Linux drop the legacy PIC and the ISA IRQs, and then the
//! 8250, i8042 and RTC drivers cannot get their interrupts. So it points at the PM1a
//! registers of [`crate::devices::acpi_pm`], an SCI on IRQ 9 and a FACS, announces the
//! i8042 (Ctrl-Alt-Del) and the CMOS century register, and has a fixed-feature power
//! button (PWRBTN_STS/EN in PM1), which `keel-vmm` presses on SIGTERM.
//!
//! The DSDT (AML built with rust-vmm's `acpi_tables`) describes what a distribution
//! kernel cannot probe: COM1 (`PNP0501`), every virtio-mmio device (`LNRO0005`, the ID
//! Linux's virtio_mmio driver matches, with its register window and interrupt in
//! `_CRS`), and `\_S5` so `poweroff` ends the VM through PM1a_CNT.SLP_EN.
//!
//! Tables sit in the BIOS area at [`ACPI_ADDR`] (where Linux also scans for the RSDP)
//! and boot_params.acpi_rsdp_addr points at the RSDP directly.

use acpi_tables::Aml;
use acpi_tables::aml;
use vm_memory::{Bytes, GuestAddress};

use super::BootError;
use super::layout::{IOAPIC_ADDR, LAPIC_ADDR};
use crate::memory::GuestMemory;

/// Start of the ACPI area (inside the 0xe0000..0x100000 BIOS range, not RAM in e820).
pub const ACPI_ADDR: u64 = 0xe_0000;
const ACPI_AREA_END: u64 = 0x10_0000;
/// The RSDP follows the FACS (16-byte aligned, where Linux's scan looks).
pub const RSDP_OFFSET: u64 = FACS_LEN as u64;

const OEM_ID: &[u8; 6] = b"KEEL  ";
const OEM_TABLE_ID: &[u8; 8] = b"KEELVMM ";
const CREATOR_ID: &[u8; 4] = b"KEEL";
const HEADER_LEN: usize = 36;

// FADT flags and IA-PC boot architecture flags.
const FADT_WBINVD: u32 = 1 << 0;
const FADT_SLP_BUTTON: u32 = 1 << 5; // set = no fixed sleep button
/// C2/C3 latencies above these limits mean "not supported".
const P_LVL2_UNSUPPORTED: u16 = 101;
const P_LVL3_UNSUPPORTED: u16 = 1001;
/// Generic Address Structure: system I/O space.
const GAS_SYSTEM_IO: u8 = 1;
const GAS_ACCESS_WORD: u8 = 2;
const FACS_LEN: usize = 64;
const IAPC_8042: u16 = 1 << 1;
const IAPC_VGA_NOT_PRESENT: u16 = 1 << 2;
const IAPC_MSI_NOT_SUPPORTED: u16 = 1 << 3;
const FADT_LEN: usize = 276;
const FADT_REVISION: u8 = 6;
/// CMOS register holding the century, for the RTC driver.
const CMOS_CENTURY: u8 = 0x32;

// MADT.
const MADT_PCAT_COMPAT: u32 = 1;
const MADT_LOCAL_APIC: u8 = 0;
const MADT_IOAPIC: u8 = 1;
const MADT_LOCAL_APIC_NMI: u8 = 4;
const LAPIC_ENABLED: u32 = 1;

/// A table: the 36-byte header (checksum filled by `finish`) plus the body.
fn table(signature: &[u8; 4], revision: u8, body: &[u8]) -> Vec<u8> {
    let mut t = Vec::with_capacity(HEADER_LEN + body.len());
    t.extend(signature);
    t.extend(((HEADER_LEN + body.len()) as u32).to_le_bytes());
    t.push(revision);
    t.push(0); // checksum
    t.extend(OEM_ID);
    t.extend(OEM_TABLE_ID);
    t.extend(1u32.to_le_bytes()); // OEM revision
    t.extend(CREATOR_ID);
    t.extend(1u32.to_le_bytes()); // creator revision
    t.extend(body);
    t[9] = checksum(&t);
    t
}

fn checksum(data: &[u8]) -> u8 {
    data.iter().fold(0u8, |a, b| a.wrapping_add(*b)).wrapping_neg()
}

/// A virtio-mmio device as the guest must be told about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioDeviceInfo {
    pub addr: u64,
    pub len: u64,
    pub irq: u32,
}

/// `_SB.COM1`: the 8250 at 0x3f8, IRQ 4, so pnpacpi binds the serial driver to it.
fn com1_device(bytes: &mut Vec<u8>) {
    use crate::devices::serial::{COM1_IRQ, COM1_LEN, COM1_PORT};
    let io = aml::IO::new(COM1_PORT as u16, COM1_PORT as u16, 1, COM1_LEN as u8);
    let irq = aml::Interrupt::new(true, true, false, false, COM1_IRQ);
    let crs = aml::ResourceTemplate::new(vec![&io, &irq]);
    let hid = aml::EISAName::new("PNP0501");
    aml::Device::new(
        "COM1".into(),
        vec![
            &aml::Name::new("_HID".into(), &hid),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new("_CRS".into(), &crs),
        ],
    )
    .to_aml_bytes(bytes);
}

/// `_SB.VRnn`: one virtio-mmio device. Edge-triggered, active-high: the VMM pulses the
/// line through an irqfd.
fn virtio_device(bytes: &mut Vec<u8>, index: usize, dev: &MmioDeviceInfo) {
    let name = format!("VR{index:02X}");
    let mem = aml::Memory32Fixed::new(true, dev.addr as u32, dev.len as u32);
    let irq = aml::Interrupt::new(true, true, false, false, dev.irq);
    let crs = aml::ResourceTemplate::new(vec![&mem, &irq]);
    let uid = index as u32;
    aml::Device::new(
        name.as_str().into(),
        vec![
            &aml::Name::new("_HID".into(), &"LNRO0005"),
            &aml::Name::new("_UID".into(), &uid),
            &aml::Name::new("_CCA".into(), &aml::ONE),
            &aml::Name::new("_CRS".into(), &crs),
        ],
    )
    .to_aml_bytes(bytes);
}

/// The DSDT's AML: `\_S5` and the `\_SB` devices.
pub fn dsdt_aml(devices: &[MmioDeviceInfo]) -> Vec<u8> {
    let mut sb = Vec::new();
    com1_device(&mut sb);
    for (i, dev) in devices.iter().enumerate() {
        virtio_device(&mut sb, i, dev);
    }
    let mut body = Vec::new();
    // SLP_TYPa = 5 for S5; the PM device powers off on any SLP_EN, as S5 is the only
    // sleep state it has.
    let s5 = aml::Package::new(vec![&5u8, &5u8, &aml::ZERO, &aml::ZERO]);
    aml::Name::new("_S5_".into(), &s5).to_aml_bytes(&mut body);
    body.extend(aml::Scope::raw("\\_SB_".into(), sb));
    body
}

fn dsdt(devices: &[MmioDeviceInfo]) -> Vec<u8> {
    table(b"DSDT", 2, &dsdt_aml(devices))
}

/// Firmware ACPI Control Structure: no checksum, 64-byte aligned, no waking vector.
fn facs() -> Vec<u8> {
    let mut f = vec![0u8; FACS_LEN];
    f[..4].copy_from_slice(b"FACS");
    f[4..8].copy_from_slice(&(FACS_LEN as u32).to_le_bytes());
    f[32] = 2; // version
    f
}

/// A Generic Address Structure for a system I/O register block.
fn gas_io(port: u16, bits: u8) -> [u8; 12] {
    let mut g = [0u8; 12];
    g[0] = GAS_SYSTEM_IO;
    g[1] = bits;
    g[3] = GAS_ACCESS_WORD;
    g[4..12].copy_from_slice(&u64::from(port).to_le_bytes());
    g
}

fn fadt(dsdt_addr: u64, facs_addr: u64) -> Vec<u8> {
    use crate::devices::acpi_pm::{PM_BASE, PM1_CNT_LEN, PM1_EVT_LEN, SCI_IRQ};
    let pm1_cnt = PM_BASE + u16::from(PM1_EVT_LEN);
    let mut body = vec![0u8; FADT_LEN - HEADER_LEN];
    let mut put = |offset: usize, bytes: &[u8]| {
        let at = offset - HEADER_LEN;
        body[at..at + bytes.len()].copy_from_slice(bytes);
    };
    put(36, &(facs_addr as u32).to_le_bytes());
    put(40, &(dsdt_addr as u32).to_le_bytes());
    put(46, &SCI_IRQ.to_le_bytes());
    put(56, &u32::from(PM_BASE).to_le_bytes()); // PM1a_EVT_BLK
    put(64, &u32::from(pm1_cnt).to_le_bytes()); // PM1a_CNT_BLK
    put(88, &[PM1_EVT_LEN, PM1_CNT_LEN]);
    put(96, &P_LVL2_UNSUPPORTED.to_le_bytes());
    put(98, &P_LVL3_UNSUPPORTED.to_le_bytes());
    put(132, &facs_addr.to_le_bytes()); // X_FIRMWARE_CTRL
    put(148, &gas_io(PM_BASE, PM1_EVT_LEN * 8)); // X_PM1a_EVT_BLK
    put(172, &gas_io(pm1_cnt, PM1_CNT_LEN * 8)); // X_PM1a_CNT_BLK
    put(108, &[CMOS_CENTURY]);
    put(
        109,
        &(IAPC_8042 | IAPC_VGA_NOT_PRESENT | IAPC_MSI_NOT_SUPPORTED).to_le_bytes(),
    );
    // PWR_BUTTON clear: the power button is the fixed-feature one in PM1.
    put(112, &(FADT_WBINVD | FADT_SLP_BUTTON).to_le_bytes());
    put(131, &[0]); // FADT minor version
    put(140, &dsdt_addr.to_le_bytes()); // X_DSDT
    put(268, b"KEELVMM\0"); // hypervisor vendor identity
    table(b"FACP", FADT_REVISION, &body)
}

fn madt(cpus: u8) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend(LAPIC_ADDR.to_le_bytes());
    body.extend(MADT_PCAT_COMPAT.to_le_bytes());
    for cpu in 0..cpus {
        body.extend([MADT_LOCAL_APIC, 8, cpu, cpu]);
        body.extend(LAPIC_ENABLED.to_le_bytes());
    }
    // The IOAPIC takes the first ID after the vCPUs, as in the MP table.
    body.extend([MADT_IOAPIC, 12, cpus, 0]);
    body.extend(IOAPIC_ADDR.to_le_bytes());
    body.extend(0u32.to_le_bytes()); // GSI base
    // NMI on LINT1 of every processor.
    body.extend([MADT_LOCAL_APIC_NMI, 6, 0xff]);
    body.extend(0u16.to_le_bytes());
    body.push(1);
    table(b"APIC", 5, &body)
}

fn xsdt(entries: &[u64]) -> Vec<u8> {
    let body: Vec<u8> = entries.iter().flat_map(|a| a.to_le_bytes()).collect();
    table(b"XSDT", 1, &body)
}

fn rsdp(xsdt_addr: u64) -> Vec<u8> {
    let mut r = Vec::with_capacity(36);
    r.extend(b"RSD PTR ");
    r.push(0); // checksum over the first 20 bytes
    r.extend(OEM_ID);
    r.push(2); // revision: ACPI 2.0+ (XSDT)
    r.extend(0u32.to_le_bytes()); // no RSDT
    r.extend(36u32.to_le_bytes());
    r.extend(xsdt_addr.to_le_bytes());
    r.push(0); // extended checksum over all 36 bytes
    r.extend([0u8; 3]);
    r[8] = checksum(&r[..20]);
    r[32] = checksum(&r);
    r
}

/// All tables laid out from `base` (64-byte aligned), FACS first, then the RSDP at
/// [`RSDP_OFFSET`]; returns the bytes.
pub fn build(cpus: u8, devices: &[MmioDeviceInfo], base: u64) -> Vec<u8> {
    let align = |n: usize| n.div_ceil(16) * 16;
    let facs_addr = base; // 64-byte aligned, as the FACS must be
    let rsdp_addr = facs_addr + FACS_LEN as u64;
    let dsdt_addr = rsdp_addr + align(36) as u64;
    let dsdt = dsdt(devices);
    let fadt_addr = dsdt_addr + align(dsdt.len()) as u64;
    let fadt = fadt(dsdt_addr, facs_addr);
    let madt_addr = fadt_addr + align(fadt.len()) as u64;
    let madt = madt(cpus);
    let xsdt_addr = madt_addr + align(madt.len()) as u64;
    let xsdt = xsdt(&[fadt_addr, madt_addr]);

    let mut out = Vec::new();
    for (addr, bytes) in [
        (facs_addr, facs()),
        (rsdp_addr, rsdp(xsdt_addr)),
        (dsdt_addr, dsdt),
        (fadt_addr, fadt),
        (madt_addr, madt),
        (xsdt_addr, xsdt),
    ] {
        out.resize((addr - base) as usize, 0);
        out.extend(bytes);
    }
    out
}

/// Writes the tables; returns the RSDP address for boot_params.
pub fn write(mem: &GuestMemory, cpus: u8, devices: &[MmioDeviceInfo]) -> Result<u64, BootError> {
    let bytes = build(cpus, devices, ACPI_ADDR);
    if ACPI_ADDR + bytes.len() as u64 > ACPI_AREA_END {
        return Err(BootError::GuestWrite("ACPI tables this large"));
    }
    mem.write_slice(&bytes, GuestAddress(ACPI_ADDR))
        .map_err(|_| BootError::GuestWrite("the ACPI tables"))?;
    Ok(ACPI_ADDR + RSDP_OFFSET)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FADT_HW_REDUCED_ACPI: u32 = 1 << 20;

    fn sum(data: &[u8]) -> u8 {
        data.iter().fold(0u8, |a, b| a.wrapping_add(*b))
    }

    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
    }
    fn u64_at(b: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
    }

    /// Follows the pointers from the RSDP and checks every table's checksum and length.
    #[test]
    fn tables_link_up_and_checksum() {
        let base = ACPI_ADDR;
        let all = build(4, &[], base);
        let at = |addr: u64| &all[(addr - base) as usize..];
        let rsdp = at(base + RSDP_OFFSET);
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert_eq!(sum(&rsdp[..20]), 0);
        assert_eq!(sum(&rsdp[..36]), 0);
        let xsdt = at(u64_at(rsdp, 24));
        assert_eq!(&xsdt[..4], b"XSDT");
        let xsdt = &xsdt[..u32_at(xsdt, 4) as usize];
        assert_eq!(sum(xsdt), 0);
        let entries: Vec<u64> = (HEADER_LEN..xsdt.len()).step_by(8).map(|o| u64_at(xsdt, o)).collect();
        let mut signatures = Vec::new();
        for addr in entries {
            let t = at(addr);
            let t = &t[..u32_at(t, 4) as usize];
            assert_eq!(sum(t), 0, "{:?}", std::str::from_utf8(&t[..4]));
            signatures.push(t[..4].to_vec());
            if &t[..4] == b"FACP" {
                assert_eq!(t.len(), FADT_LEN);
                assert_eq!(u32_at(t, 112) & FADT_HW_REDUCED_ACPI, 0);
                let facs = at(u64_at(t, 132));
                assert_eq!(&facs[..4], b"FACS");
                assert_eq!(u64_at(t, 132) % 64, 0);
                assert_eq!(u32_at(t, 56), 0x600);
                assert_eq!(u32_at(t, 64), 0x604);
                let dsdt = at(u64_at(t, 140));
                assert_eq!(&dsdt[..4], b"DSDT");
                assert_eq!(sum(&dsdt[..u32_at(dsdt, 4) as usize]), 0);
            }
            if &t[..4] == b"APIC" {
                let mut off = 44;
                let mut ids = Vec::new();
                while off < t.len() {
                    if t[off] == MADT_LOCAL_APIC {
                        ids.push(t[off + 3]);
                    }
                    off += t[off + 1] as usize;
                }
                assert_eq!(off, t.len(), "entries fill the table exactly");
                assert_eq!(ids, vec![0, 1, 2, 3]);
            }
        }
        assert_eq!(signatures, vec![b"FACP".to_vec(), b"APIC".to_vec()]);
    }

    #[test]
    fn thirty_two_vcpus_fit() {
        let devices: Vec<MmioDeviceInfo> = (0..16)
            .map(|i| MmioDeviceInfo {
                addr: 0xd000_0000 + i * 0x1000,
                len: 0x1000,
                irq: 16 + i as u32,
            })
            .collect();
        assert!(ACPI_ADDR + build(32, &devices, ACPI_ADDR).len() as u64 <= ACPI_AREA_END);
    }

    /// The DSDT names every virtio device with its window and line, COM1 and \_S5
    /// (checked against `iasl -d` output when written; here by its AML encoding).
    #[test]
    fn dsdt_describes_devices_s5_and_com1() {
        let devices = [
            MmioDeviceInfo {
                addr: 0xd000_0000,
                len: 0x1000,
                irq: 16,
            },
            MmioDeviceInfo {
                addr: 0xd000_1000,
                len: 0x1000,
                irq: 5,
            },
        ];
        let t = dsdt(&devices);
        assert_eq!(&t[..4], b"DSDT");
        assert_eq!(sum(&t), 0);
        assert_eq!(u32_at(&t, 4) as usize, t.len());
        let count = |needle: &[u8]| t.windows(needle.len()).filter(|w| *w == needle).count();
        assert_eq!(count(b"LNRO0005\0"), 2);
        assert_eq!(count(b"VR00"), 1);
        assert_eq!(count(b"VR01"), 1);
        assert_eq!(count(b"_S5_"), 1);
        assert_eq!(count(b"COM1"), 1);
        // Memory32Fixed descriptors: tag 0x86, length 9, read-write, base, length.
        let mut mem0 = vec![0x86, 9, 0, 1];
        mem0.extend(0xd000_0000u32.to_le_bytes());
        mem0.extend(0x1000u32.to_le_bytes());
        assert_eq!(count(&mem0), 1);
        // Extended interrupt descriptors: consumer, edge, active high, one line.
        for irq in [16u32, 5, 4] {
            let mut d = vec![0x89, 6, 0, 0x03, 1];
            d.extend(irq.to_le_bytes());
            assert_eq!(count(&d), 1, "interrupt {irq}");
        }
    }

    #[test]
    fn fadt_has_a_fixed_power_button() {
        let f = fadt(0x1000, 0x2000);
        assert_eq!(
            u32_at(&f, 112) & (1 << 4),
            0,
            "PWR_BUTTON clear: fixed-feature button present"
        );
    }
}
