//! The largest guest keel-vmm boots, stated once. keel-vmm's own config check
//! (`VmConfig::validate`) calls these functions, and so can any validator that wants
//! to refuse a guest before a VMM is started for it.

use crate::MemorySize;

/// Most vCPUs: the MP table and MADT layout are sized for 32 processors.
pub const MAX_VCPUS: u8 = 32;
/// Smallest guest the boot layout fits in (page tables, boot_params, kernel at 1 MiB, initrd).
pub const MIN_MEMORY: u64 = 16 << 20;
/// Largest guest accepted: far beyond any appliance guest, but keeps address math safe.
pub const MAX_MEMORY: u64 = 1 << 40;
/// Most virtio devices one guest may have, all kinds together: disks, NICs, the rng,
/// and the devices later work adds (a cloud-init seed disk, a balloon). Each takes one
/// of the 16 virtio-mmio windows and interrupt lines keel-vmm's boot layout reserves
/// (`VIRTIO_IRQS` in vmm/src/boot/layout.rs is sized by this constant).
pub const MAX_DEVICES: usize = 16;
/// Longest kernel command line in bytes, the terminating NUL included: Linux x86's
/// COMMAND_LINE_SIZE. It covers what keel-vmm appends (see [`DEVICE_CMDLINE_ENTRY_MAX`]).
pub const MAX_CMDLINE_LEN: usize = 2048;
/// What keel-vmm appends to the command line per virtio device, at most:
/// ` virtio_mmio.device=4K@0xd000f000:15` (36 bytes).
pub const DEVICE_CMDLINE_ENTRY_MAX: usize = 36;

/// A value beyond one of the limits; the message names the value and the limit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    #[error("cpus {0} is out of range: use 1 to {MAX_VCPUS}")]
    Cpus(u8),
    #[error("memory {0} is below the minimum of 16 MiB: use --memory 16MiB or more")]
    MemoryTooSmall(MemorySize),
    #[error("memory {0} is above the maximum of 1 TiB")]
    MemoryTooLarge(MemorySize),
    #[error("{0} virtio devices (disks + nets + rng and the like): at most {MAX_DEVICES} fit")]
    Devices(usize),
    #[error(
        "cmdline is {len} bytes; with up to {appended} bytes keel-vmm appends for the devices it must stay below {MAX_CMDLINE_LEN}"
    )]
    Cmdline { len: usize, appended: usize },
}

/// 1 to [`MAX_VCPUS`] vCPUs.
pub fn check_cpus(cpus: u8) -> Result<(), LimitError> {
    if cpus == 0 || cpus > MAX_VCPUS {
        return Err(LimitError::Cpus(cpus));
    }
    Ok(())
}

/// [`MIN_MEMORY`] to [`MAX_MEMORY`] of guest RAM.
pub fn check_memory(memory: MemorySize) -> Result<(), LimitError> {
    if memory.0 < MIN_MEMORY {
        return Err(LimitError::MemoryTooSmall(memory));
    }
    if memory.0 > MAX_MEMORY {
        return Err(LimitError::MemoryTooLarge(memory));
    }
    Ok(())
}

/// At most [`MAX_DEVICES`] virtio devices of all kinds together.
pub fn check_devices(devices: usize) -> Result<(), LimitError> {
    if devices > MAX_DEVICES {
        return Err(LimitError::Devices(devices));
    }
    Ok(())
}

/// A command line of `len` bytes (no NUL) for a guest with `devices` virtio devices
/// fits once keel-vmm has appended the devices' entries and the NUL.
pub fn check_cmdline(len: usize, devices: usize) -> Result<(), LimitError> {
    let appended = devices.saturating_mul(DEVICE_CMDLINE_ENTRY_MAX);
    if len.saturating_add(appended).saturating_add(1) > MAX_CMDLINE_LEN {
        return Err(LimitError::Cmdline { len, appended });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_are_inclusive() {
        assert!(check_cpus(1).is_ok() && check_cpus(MAX_VCPUS).is_ok());
        assert_eq!(check_cpus(0), Err(LimitError::Cpus(0)));
        assert_eq!(
            check_cpus(33).unwrap_err().to_string(),
            "cpus 33 is out of range: use 1 to 32"
        );
        assert!(check_memory(MemorySize(MIN_MEMORY)).is_ok());
        assert!(check_memory(MemorySize(MAX_MEMORY)).is_ok());
        assert_eq!(
            check_memory(MemorySize::mib(8)).unwrap_err().to_string(),
            "memory 8MiB is below the minimum of 16 MiB: use --memory 16MiB or more"
        );
        assert!(check_memory(MemorySize(MAX_MEMORY + 1)).is_err());
        assert!(check_devices(MAX_DEVICES).is_ok());
        assert!(
            check_devices(MAX_DEVICES + 1)
                .unwrap_err()
                .to_string()
                .starts_with("17 virtio devices")
        );
    }

    #[test]
    fn cmdline_budget_counts_the_appended_devices_and_the_nul() {
        assert!(check_cmdline(MAX_CMDLINE_LEN - 1, 0).is_ok());
        assert!(check_cmdline(MAX_CMDLINE_LEN, 0).is_err());
        let room = MAX_CMDLINE_LEN - 1 - MAX_DEVICES * DEVICE_CMDLINE_ENTRY_MAX;
        assert!(check_cmdline(room, MAX_DEVICES).is_ok());
        assert_eq!(
            check_cmdline(room + 1, MAX_DEVICES),
            Err(LimitError::Cmdline {
                len: room + 1,
                appended: MAX_DEVICES * DEVICE_CMDLINE_ENTRY_MAX
            })
        );
        assert!(check_cmdline(usize::MAX, usize::MAX).is_err(), "no overflow");
    }
}
