//! The Intel MultiProcessor Specification 1.4 table: without ACPI this is how Linux
//! learns how many CPUs exist (one processor entry per vCPU, APIC ID = vCPU index),
//! where the IOAPIC is and how the ISA IRQs reach it.
//!
//! Layout at [`MPTABLE_ADDR`]: the 16-byte floating pointer, immediately followed by the
//! configuration table header and its entries. Encoded byte by byte (little endian)
//! rather than with packed structs: the format is small and this keeps it checkable.

use vm_memory::{Bytes, GuestAddress};

use super::BootError;
use super::layout::{IOAPIC_ADDR, IOAPIC_EXTRA_PINS, LAPIC_ADDR, MPTABLE_ADDR};
use crate::memory::{EBDA_START, GuestMemory};

const SPEC_REV_1_4: u8 = 4;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTSTRAP: u8 = 2;
/// CPUID family 6 signature and FPU + APIC feature flags, as firmware reports them.
const CPU_SIGNATURE: u32 = 0x600;
const CPU_FEATURES: u32 = (1 << 0) | (1 << 9);
const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
/// Polarity/trigger "conforms to the bus" (ISA: active high, edge).
const INT_FLAGS_CONFORMING: u16 = 0;
const ISA_BUS_ID: u8 = 0;
const ISA_IRQS: u8 = 16;
const ALL_LAPICS: u8 = 0xff;
const HEADER_LEN: usize = 44;
const FLOATING_POINTER_LEN: usize = 16;

/// Room the table may use: the last KiB of conventional memory.
const MAX_TABLE_LEN: usize = (0xa0000 - EBDA_START) as usize;

/// Encodes the floating pointer and configuration table for `cpus` vCPUs as they will
/// sit at `base`.
pub fn build(cpus: u8, base: u64) -> Vec<u8> {
    let ioapic_id = cpus; // the first ID after the vCPUs' APIC IDs
    let mut entries = Vec::new();
    let mut count: u16 = 0;

    for cpu in 0..cpus {
        let flags = CPU_ENABLED | if cpu == 0 { CPU_BOOTSTRAP } else { 0 };
        entries.extend([ENTRY_PROCESSOR, cpu, APIC_VERSION, flags]);
        entries.extend(CPU_SIGNATURE.to_le_bytes());
        entries.extend(CPU_FEATURES.to_le_bytes());
        entries.extend([0u8; 8]);
        count += 1;
    }
    entries.extend([ENTRY_BUS, ISA_BUS_ID]);
    entries.extend(b"ISA   ");
    count += 1;
    entries.extend([ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend(IOAPIC_ADDR.to_le_bytes());
    count += 1;
    // ISA IRQ n -> IOAPIC pin n, which is how KVM's default GSI routing wires them.
    for irq in 0..ISA_IRQS {
        entries.push(ENTRY_IO_INTERRUPT);
        entries.push(INT_TYPE_INT);
        entries.extend(INT_FLAGS_CONFORMING.to_le_bytes());
        entries.extend([ISA_BUS_ID, irq, ioapic_id, irq]);
        count += 1;
    }
    // IOAPIC pins 16-23 (virtio-mmio devices): without an entry Linux never maps them.
    for pin in IOAPIC_EXTRA_PINS {
        entries.push(ENTRY_IO_INTERRUPT);
        entries.push(INT_TYPE_INT);
        entries.extend(INT_FLAGS_CONFORMING.to_le_bytes());
        entries.extend([ISA_BUS_ID, pin, ioapic_id, pin]);
        count += 1;
    }
    // LINT0 = ExtINT (the PIC), LINT1 = NMI, on every LAPIC; matches the LVT setup.
    for (kind, lint) in [(INT_TYPE_EXTINT, 0u8), (INT_TYPE_NMI, 1u8)] {
        entries.push(ENTRY_LOCAL_INTERRUPT);
        entries.push(kind);
        entries.extend(INT_FLAGS_CONFORMING.to_le_bytes());
        entries.extend([ISA_BUS_ID, 0, ALL_LAPICS, lint]);
        count += 1;
    }

    let table_addr = base + FLOATING_POINTER_LEN as u64;
    let mut header = Vec::with_capacity(HEADER_LEN);
    header.extend(b"PCMP");
    header.extend(((HEADER_LEN + entries.len()) as u16).to_le_bytes());
    header.push(SPEC_REV_1_4);
    header.push(0); // checksum, patched below
    header.extend(b"KEEL    ");
    header.extend(b"KEEL-VMM    ");
    header.extend(0u32.to_le_bytes()); // OEM table pointer
    header.extend(0u16.to_le_bytes()); // OEM table size
    header.extend(count.to_le_bytes());
    header.extend(LAPIC_ADDR.to_le_bytes());
    header.extend(0u16.to_le_bytes()); // extended table length
    header.push(0); // extended table checksum
    header.push(0); // reserved
    debug_assert_eq!(header.len(), HEADER_LEN);
    let mut table = header;
    table.extend(entries);
    table[7] = checksum(&table);

    let mut fp = Vec::with_capacity(FLOATING_POINTER_LEN);
    fp.extend(b"_MP_");
    fp.extend((table_addr as u32).to_le_bytes());
    fp.push(1); // length in 16-byte units
    fp.push(SPEC_REV_1_4);
    fp.push(0); // checksum, patched below
    fp.extend([0u8; 5]); // feature bytes: 0 = a configuration table is present
    fp[10] = checksum(&fp);

    fp.extend(table);
    fp
}

/// The byte that makes all bytes of `data` sum to zero.
fn checksum(data: &[u8]) -> u8 {
    data.iter().fold(0u8, |a, b| a.wrapping_add(*b)).wrapping_neg()
}

/// Writes the MP table for `cpus` vCPUs into guest memory.
pub fn write(mem: &GuestMemory, cpus: u8) -> Result<(), BootError> {
    let bytes = build(cpus, MPTABLE_ADDR);
    if bytes.len() > MAX_TABLE_LEN {
        return Err(BootError::GuestWrite("an MP table for this many vCPUs"));
    }
    mem.write_slice(&bytes, GuestAddress(MPTABLE_ADDR))
        .map_err(|_| BootError::GuestWrite("the MP table"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(data: &[u8]) -> u8 {
        data.iter().fold(0u8, |a, b| a.wrapping_add(*b))
    }

    #[test]
    fn checksums_and_counts() {
        for cpus in [1u8, 2, 4, 32] {
            let t = build(cpus, MPTABLE_ADDR);
            assert!(t.len() <= MAX_TABLE_LEN, "{cpus} cpus: {} bytes", t.len());
            assert_eq!(&t[..4], b"_MP_");
            assert_eq!(sum(&t[..16]), 0, "floating pointer checksum");
            let ptr = u32::from_le_bytes(t[4..8].try_into().unwrap()) as u64;
            assert_eq!(ptr, MPTABLE_ADDR + 16);
            let table = &t[16..];
            assert_eq!(&table[..4], b"PCMP");
            let len = u16::from_le_bytes([table[4], table[5]]) as usize;
            assert_eq!(len, table.len());
            assert_eq!(sum(table), 0, "config table checksum");
            let count = u16::from_le_bytes([table[34], table[35]]);
            assert_eq!(count, cpus as u16 + 1 + 1 + 16 + 8 + 2);
            // Processor entries come first, APIC IDs in order, only CPU 0 is the BSP.
            for cpu in 0..cpus as usize {
                let e = &table[HEADER_LEN + cpu * 20..];
                assert_eq!((e[0], e[1]), (ENTRY_PROCESSOR, cpu as u8));
                assert_eq!(e[3] & CPU_BOOTSTRAP != 0, cpu == 0);
            }
        }
    }
}
