//! Model-specific registers at their boot values, restricted to the ones this KVM knows.

use kvm_bindings::{Msrs, kvm_msr_entry};
use kvm_ioctls::{Kvm, VcpuFd};

use super::CpuError;

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

/// Fast string operations enabled, as firmware leaves it.
const MISC_ENABLE_FAST_STRING: u64 = 1;
/// MTRRs enabled with write-back as the default type: without it Linux treats all of
/// RAM as uncached until it sets up PAT.
const MTRR_ENABLE_WRITEBACK: u64 = (1 << 11) | 6;

/// The boot MSR values.
pub fn boot_values() -> [(u32, u64); 10] {
    [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WRITEBACK),
    ]
}

/// Indexes of the MSRs KVM can save/restore (read once per VM).
pub fn supported(kvm: &Kvm) -> Result<Vec<u32>, CpuError> {
    kvm.get_msr_index_list()
        .map(|l| l.as_slice().to_vec())
        .map_err(|e| CpuError::MsrList(crate::os_error::errno_message(&e)))
}

/// Writes the boot MSRs that KVM supports.
pub fn set_boot_msrs(vcpu: &VcpuFd, id: u8, supported: &[u32]) -> Result<(), CpuError> {
    let entries: Vec<kvm_msr_entry> = boot_values()
        .iter()
        .filter(|(index, _)| supported.contains(index))
        .map(|&(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    let msrs = Msrs::from_entries(&entries).map_err(|e| CpuError::Setup {
        id,
        what: "building MSR list",
        reason: format!("{e:?}"),
    })?;
    let written = vcpu.set_msrs(&msrs).map_err(CpuError::setup(id, "KVM_SET_MSRS"))?;
    if written != entries.len() {
        // KVM stops at the first MSR it refuses; name it.
        return Err(CpuError::Setup {
            id,
            what: "KVM_SET_MSRS",
            reason: format!("KVM refused MSR {:#x}", entries[written].index),
        });
    }
    Ok(())
}
