//! A vCPU's architectural state as KVM holds it, taken and put back for snapshots and
//! migration: general and system registers, MSRs, the in-kernel LAPIC, the extended FPU
//! state (XSAVE) and XCRs, debug registers, pending events and the MP state.
//!
//! The order follows what KVM needs on restore (the same order Firecracker and Cloud
//! Hypervisor use): the MP state first, registers before the LAPIC (the LAPIC base
//! lives in an MSR and in sregs' `apic_base`), MSRs after the LAPIC (TSC deadline
//! needs the LAPIC), and pending events last, since setting registers may clear them.
//!
//! CPUID is not carried: a restored vCPU gets it from this host the way a booted one
//! does ([`super::cpuid::for_vcpu`]); checking that two hosts' CPUID agree is the
//! migration's job.

use kvm_bindings::{
    Msrs, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs,
    kvm_xsave,
};
use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Serialize};

use crate::state_error::{StateError, kvm};

/// The IA32_TSC MSR: its value moves with real time (see `crate::persist`).
pub const MSR_IA32_TSC: u32 = 0x10;
/// Offset of the LAPIC timer's current-count register (TMCCT) in `kvm_lapic_state`:
/// KVM computes it from the timer's deadline when asked, so it moves with real time.
pub const LAPIC_TMCCT: usize = 0x390;
/// At most this many MSRs are taken (KVM's index list is a few dozen to ~150).
const MAX_MSRS: usize = 1024;

/// One model-specific register and its value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsrValue {
    pub index: u32,
    pub data: u64,
}

/// Everything KVM holds for one vCPU. (Not `Clone`: kvm-bindings' XSAVE area is not.)
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    pub id: u8,
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub debug_regs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    pub msrs: Vec<MsrValue>,
    pub events: kvm_vcpu_events,
}

impl VcpuState {
    /// Takes vCPU `id`'s state. `msr_indexes` is KVM's list of MSRs it can save
    /// (`KVM_GET_MSR_INDEX_LIST`); the ones this vCPU cannot read (KVM stops at the first
    /// it refuses) are left out. Call it on a vCPU that is not in KVM_RUN, after
    /// [`complete_pending_io`].
    pub fn capture(fd: &VcpuFd, id: u8, msr_indexes: &[u32]) -> Result<Self, StateError> {
        Ok(VcpuState {
            id,
            mp_state: fd.get_mp_state().map_err(kvm("KVM_GET_MP_STATE"))?,
            regs: fd.get_regs().map_err(kvm("KVM_GET_REGS"))?,
            sregs: fd.get_sregs().map_err(kvm("KVM_GET_SREGS"))?,
            xsave: fd.get_xsave().map_err(kvm("KVM_GET_XSAVE"))?,
            xcrs: fd.get_xcrs().map_err(kvm("KVM_GET_XCRS"))?,
            debug_regs: fd.get_debug_regs().map_err(kvm("KVM_GET_DEBUGREGS"))?,
            lapic: fd.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?,
            msrs: read_msrs(fd, msr_indexes)?,
            events: fd.get_vcpu_events().map_err(kvm("KVM_GET_VCPU_EVENTS"))?,
        })
    }

    /// Puts the state into a freshly created vCPU (its CPUID already set).
    pub fn apply(&self, fd: &VcpuFd) -> Result<(), StateError> {
        if self.msrs.len() > MAX_MSRS {
            return Err(StateError::Invalid {
                what: "vCPU MSRs",
                reason: format!("{} MSRs, at most {MAX_MSRS}", self.msrs.len()),
            });
        }
        fd.set_mp_state(self.mp_state).map_err(kvm("KVM_SET_MP_STATE"))?;
        fd.set_regs(&self.regs).map_err(kvm("KVM_SET_REGS"))?;
        fd.set_sregs(&self.sregs).map_err(kvm("KVM_SET_SREGS"))?;
        // SAFETY: a 4 KiB legacy xsave area, the size KVM_SET_XSAVE reads.
        unsafe { fd.set_xsave(&self.xsave) }.map_err(kvm("KVM_SET_XSAVE"))?;
        fd.set_xcrs(&self.xcrs).map_err(kvm("KVM_SET_XCRS"))?;
        fd.set_debug_regs(&self.debug_regs).map_err(kvm("KVM_SET_DEBUGREGS"))?;
        fd.set_lapic(&self.lapic).map_err(kvm("KVM_SET_LAPIC"))?;
        let entries: Vec<kvm_msr_entry> = self
            .msrs
            .iter()
            .map(|m| kvm_msr_entry {
                index: m.index,
                data: m.data,
                ..Default::default()
            })
            .collect();
        let msrs = Msrs::from_entries(&entries).map_err(|e| StateError::Invalid {
            what: "vCPU MSRs",
            reason: format!("{e:?}"),
        })?;
        let written = fd.set_msrs(&msrs).map_err(kvm("KVM_SET_MSRS"))?;
        if written != entries.len() {
            return Err(StateError::Mismatch {
                what: "vCPU MSRs",
                reason: format!("this KVM refused MSR {:#x}", entries[written].index),
            });
        }
        fd.set_vcpu_events(&self.events).map_err(kvm("KVM_SET_VCPU_EVENTS"))?;
        Ok(())
    }

    /// The LAPIC timer's current count (see [`LAPIC_TMCCT`]).
    pub fn lapic_timer_count(&self) -> u32 {
        let r = &self.lapic.regs[LAPIC_TMCCT..LAPIC_TMCCT + 4];
        u32::from_le_bytes([r[0] as u8, r[1] as u8, r[2] as u8, r[3] as u8])
    }

    pub fn set_lapic_timer_count(&mut self, count: u32) {
        for (dst, src) in self.lapic.regs[LAPIC_TMCCT..LAPIC_TMCCT + 4]
            .iter_mut()
            .zip(count.to_le_bytes())
        {
            *dst = src as std::os::raw::c_char;
        }
    }

    pub fn msr(&self, index: u32) -> Option<u64> {
        self.msrs.iter().find(|m| m.index == index).map(|m| m.data)
    }

    pub fn set_msr(&mut self, index: u32, data: u64) {
        if let Some(m) = self.msrs.iter_mut().find(|m| m.index == index) {
            m.data = data;
        }
    }
}

/// Finishes an exit userspace already handled (an `in` whose data KVM copies into the
/// guest's register on the next entry, an MMIO read): KVM_RUN with `immediate_exit` set
/// completes it and returns at once without running guest code. KVM's documentation
/// asks for this before the vCPU's state is taken.
pub fn complete_pending_io(fd: &mut VcpuFd) -> Result<(), StateError> {
    fd.set_kvm_immediate_exit(1);
    let result = fd.run().map(|_| ()).map_err(|e| e.errno());
    fd.set_kvm_immediate_exit(0);
    match result {
        Err(errno) if errno == libc::EINTR || errno == libc::EAGAIN => Ok(()),
        Ok(()) => Ok(()),
        Err(errno) => Err(StateError::Kvm {
            what: "KVM_RUN (completing pending I/O)",
            reason: crate::os_error::os_message(&std::io::Error::from_raw_os_error(errno)),
        }),
    }
}

/// Reads every MSR of `indexes` this vCPU returns; KVM_GET_MSRS stops at the first one it
/// cannot read, which is dropped before reading on.
fn read_msrs(fd: &VcpuFd, indexes: &[u32]) -> Result<Vec<MsrValue>, StateError> {
    let mut left: Vec<u32> = indexes.iter().copied().take(MAX_MSRS).collect();
    let mut out = Vec::with_capacity(left.len());
    while !left.is_empty() {
        let entries: Vec<kvm_msr_entry> = left
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|e| StateError::Invalid {
            what: "vCPU MSRs",
            reason: format!("{e:?}"),
        })?;
        let read = fd.get_msrs(&mut msrs).map_err(kvm("KVM_GET_MSRS"))?;
        out.extend(msrs.as_slice()[..read].iter().map(|e| MsrValue {
            index: e.index,
            data: e.data,
        }));
        if read < left.len() {
            tracing::debug!("MSR {:#x} cannot be read on this vCPU; not saved", left[read]);
        }
        left.drain(..(read + 1).min(left.len()));
    }
    Ok(out)
}
