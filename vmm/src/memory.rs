//! Guest physical memory: where RAM lives, the 32-bit MMIO gap, and the e820 map the
//! guest is told about.

use vm_memory::{GuestAddress, GuestMemoryMmap};

use crate::types::MemorySize;

/// Guest RAM as mapped into this process.
pub type GuestMemory = GuestMemoryMmap<()>;

/// Start of the 32-bit MMIO gap (LAPIC, IOAPIC, TSS, future virtio-mmio devices).
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO gap: RAM above 3 GiB continues here.
pub const MMIO_GAP_END: u64 = 1 << 32;
/// First byte after conventional memory: the MP table sits in the last KiB below it.
pub const EBDA_START: u64 = 0x9fc00;
/// Start of "high" memory where kernels are loaded.
pub const HIMEM_START: u64 = 0x10_0000;

/// One range of the guest-physical address space that holds RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RamRange {
    pub start: u64,
    pub len: u64,
}

impl RamRange {
    pub fn end(&self) -> u64 {
        self.start + self.len
    }
}

/// The kinds of e820 entries this VMM reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum E820Kind {
    Ram = 1,
    Reserved = 2,
}

/// One e820 map entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: E820Kind,
}

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("cannot allocate {size} of guest memory: {reason}")]
    Allocate { size: MemorySize, reason: String },
}

/// RAM ranges for a guest of `size` bytes: one range below the MMIO gap, and a second one
/// above 4 GiB for whatever does not fit below it.
pub fn ram_ranges(size: u64) -> Vec<RamRange> {
    if size <= MMIO_GAP_START {
        vec![RamRange { start: 0, len: size }]
    } else {
        vec![
            RamRange {
                start: 0,
                len: MMIO_GAP_START,
            },
            RamRange {
                start: MMIO_GAP_END,
                len: size - MMIO_GAP_START,
            },
        ]
    }
}

/// Total RAM of a guest memory map.
pub fn total_size(mem: &GuestMemory) -> u64 {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    mem.iter().map(|r| r.len()).sum()
}

/// Top of RAM below 4 GiB: the limit for everything the 32-bit boot fields address.
pub fn low_ram_end(size: u64) -> u64 {
    size.min(MMIO_GAP_START)
}

/// Maps the guest's RAM anonymously. Pages are untouched (and cost nothing) until the
/// guest or the loader writes them; MAP_NORESERVE keeps big guests from failing on
/// overcommit accounting.
pub fn allocate(size: MemorySize) -> Result<GuestMemory, MemoryError> {
    let ranges: Vec<(GuestAddress, usize)> = ram_ranges(size.bytes())
        .iter()
        .map(|r| (GuestAddress(r.start), r.len as usize))
        .collect();
    GuestMemoryMmap::from_ranges(&ranges).map_err(|e| MemoryError::Allocate {
        size,
        reason: e.to_string(),
    })
}

/// The e820 map: conventional memory up to the EBDA (the MP table lives there, so it is
/// reserved), the legacy hole is left out, then RAM from 1 MiB.
pub fn e820_map(size: u64) -> Vec<E820Entry> {
    let mut map = vec![
        E820Entry {
            addr: 0,
            size: EBDA_START,
            kind: E820Kind::Ram,
        },
        E820Entry {
            addr: EBDA_START,
            size: 0xa0000 - EBDA_START,
            kind: E820Kind::Reserved,
        },
    ];
    for range in ram_ranges(size) {
        let start = range.start.max(HIMEM_START);
        if range.end() > start {
            map.push(E820Entry {
                addr: start,
                size: range.end() - start,
                kind: E820Kind::Ram,
            });
        }
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_is_one_range() {
        assert_eq!(
            ram_ranges(128 << 20),
            vec![RamRange {
                start: 0,
                len: 128 << 20
            }]
        );
        let map = e820_map(128 << 20);
        assert_eq!(map.len(), 3);
        assert_eq!(map[2].addr, HIMEM_START);
        assert_eq!(map[2].size, (128 << 20) - HIMEM_START);
    }

    #[test]
    fn big_guest_skips_the_mmio_gap() {
        let size = 6u64 << 30;
        let ranges = ram_ranges(size);
        assert_eq!(ranges.len(), 2);
        assert_eq!(ranges[0].end(), MMIO_GAP_START);
        assert_eq!(ranges[1].start, 1 << 32);
        assert_eq!(ranges[0].len + ranges[1].len, size);
        let map = e820_map(size);
        let ram: u64 = map.iter().filter(|e| e.kind == E820Kind::Ram).map(|e| e.size).sum();
        assert_eq!(ram, size - (HIMEM_START - EBDA_START));
        assert!(
            map.iter()
                .all(|e| e.addr + e.size <= MMIO_GAP_START || e.addr >= MMIO_GAP_END)
        );
        assert_eq!(low_ram_end(size), MMIO_GAP_START);
    }
}
