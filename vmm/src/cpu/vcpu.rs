//! One thread per vCPU: configure it, then run it and dispatch its exits to the buses
//! until the VM stops.
//!
//! Stopping: the main thread sets the VM's stop flag and sends [`kick_signal`] to each
//! vCPU thread. The handler sets `immediate_exit` in that thread's `kvm_run`, so a
//! KVM_RUN that was about to start returns at once instead of losing the wakeup, and one
//! already running returns with EINTR; the loop then sees the flag and ends.

use std::sync::Arc;
use std::thread::JoinHandle;

use kvm_bindings::{CpuId, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN, kvm_run};
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};

use super::state::{VcpuState, complete_pending_io};
use super::{CpuError, cpuid, kick, msr, regs};
use crate::bus::Bus;
use crate::control::{ExitReason, VmControl};
use crate::state_error::StateError;

/// What a vCPU thread needs to handle exits.
pub struct VcpuContext {
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub control: Arc<VmControl>,
    /// Pause/resume from the control socket (`crate::api`).
    pub api: Arc<super::pause::ControlState>,
}

/// A created and configured vCPU, not yet running.
pub struct Vcpu {
    pub id: u8,
    fd: VcpuFd,
    /// The MSRs KVM can save (`KVM_GET_MSR_INDEX_LIST`), for [`Vcpu::save`].
    msr_indexes: Vec<u32>,
}

/// What creating any vCPU of a VM takes, booted or restored.
pub struct VcpuSetup<'a> {
    pub cpus: u8,
    pub supported_cpuid: &'a CpuId,
    pub tsc_deadline: bool,
    pub supported_msrs: &'a [u32],
}

impl Vcpu {
    /// Creates vCPU `id` with its CPUID: the part a booted and a restored vCPU share.
    fn create(vm: &VmFd, id: u8, setup: &VcpuSetup<'_>) -> Result<Self, CpuError> {
        let fd = vm
            .create_vcpu(u64::from(id))
            .map_err(CpuError::setup(id, "KVM_CREATE_VCPU"))?;
        let table = cpuid::for_vcpu(setup.supported_cpuid, id, setup.cpus, setup.tsc_deadline)?;
        fd.set_cpuid2(&table).map_err(CpuError::setup(id, "KVM_SET_CPUID2"))?;
        Ok(Vcpu {
            id,
            fd,
            msr_indexes: setup.supported_msrs.to_vec(),
        })
    }

    /// Creates vCPU `id` and gives it its MSRs, FPU and LAPIC state at boot. The boot
    /// processor (`entry` given) also gets the 64-bit entry state; the others wait in
    /// KVM for the guest's INIT/SIPI, as on real hardware.
    pub fn new(vm: &VmFd, id: u8, setup: &VcpuSetup<'_>, entry: Option<u64>) -> Result<Self, CpuError> {
        let vcpu = Self::create(vm, id, setup)?;
        msr::set_boot_msrs(&vcpu.fd, id, setup.supported_msrs)?;
        regs::set_fpu(&vcpu.fd, id)?;
        if let Some(entry) = entry {
            regs::set_boot_sregs(&vcpu.fd, id)?;
            regs::set_boot_regs(&vcpu.fd, id, entry)?;
        }
        regs::set_lint_pins(&vcpu.fd, id)?;
        Ok(vcpu)
    }

    /// Creates vCPU `state.id` and puts the saved state into it.
    pub fn restore(vm: &VmFd, setup: &VcpuSetup<'_>, state: &VcpuState) -> Result<Self, CpuError> {
        let vcpu = Self::create(vm, state.id, setup)?;
        state.apply(&vcpu.fd)?;
        Ok(vcpu)
    }

    /// This vCPU's state, taken on the thread that owns it (it is not running).
    pub fn save(&mut self) -> Result<VcpuState, StateError> {
        complete_pending_io(&mut self.fd)?;
        VcpuState::capture(&self.fd, self.id, &self.msr_indexes)
    }
}

/// Starts the vCPU's thread.
pub fn spawn(vcpu: Vcpu, ctx: Arc<VcpuContext>) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name(format!("vcpu{}", vcpu.id))
        .spawn(move || run(vcpu, &ctx))
}

/// Reports a panic in this thread as a VM error so the main thread does not wait forever.
struct PanicGuard<'a> {
    id: u8,
    control: &'a VmControl,
}

impl Drop for PanicGuard<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.control
                .request_exit(ExitReason::Error(format!("vCPU {} thread panicked", self.id)));
        }
    }
}

/// What to do after one exit.
enum Next {
    Continue,
    Stop(ExitReason),
}

/// Raw exit facts gathered while `run()`'s borrow is live, handled after it ends.
enum Fault {
    Shutdown,
    FailEntry(u64),
    Internal,
    Crash,
    Unexpected(String),
    RunError(String),
}

/// Userspace exits per port / MMIO page, logged at debug level when the vCPU ends: the
/// first thing to look at when a guest boots slowly (each exit costs microseconds).
#[derive(Default)]
struct ExitStats {
    total: u64,
    by_address: std::collections::HashMap<(bool, u64), u64>,
}

impl ExitStats {
    fn log(&self, id: u8) {
        if !tracing::enabled!(tracing::Level::DEBUG) {
            return;
        }
        let mut top: Vec<_> = self.by_address.iter().collect();
        top.sort_by(|a, b| b.1.cmp(a.1));
        let top: Vec<String> = top
            .iter()
            .take(8)
            .map(|((mmio, addr), n)| format!("{}{addr:#x}={n}", if *mmio { "mmio:" } else { "port:" }))
            .collect();
        tracing::debug!("vCPU {id}: {} userspace exits; busiest: {}", self.total, top.join(" "));
    }
}

fn run(mut vcpu: Vcpu, ctx: &VcpuContext) {
    let _guard = PanicGuard {
        id: vcpu.id,
        control: &ctx.control,
    };
    let run_ptr: *mut kvm_run = vcpu.fd.get_kvm_run();
    kick::set_current_run(run_ptr);
    let mut stats = ExitStats::default();
    let count = tracing::enabled!(tracing::Level::DEBUG);
    while !ctx.control.is_stopping() {
        ctx.api.vcpu_checkpoint(&ctx.control, &mut || vcpu.save());
        if count {
            // SAFETY: reading the exit reason and address of the last exit.
            let (reason, port, mmio) = unsafe {
                (
                    (*run_ptr).exit_reason,
                    (*run_ptr).__bindgen_anon_1.io.port,
                    (*run_ptr).__bindgen_anon_1.mmio.phys_addr,
                )
            };
            match reason {
                kvm_bindings::KVM_EXIT_IO => {
                    stats.total += 1;
                    *stats.by_address.entry((false, u64::from(port))).or_default() += 1;
                }
                kvm_bindings::KVM_EXIT_MMIO => {
                    stats.total += 1;
                    *stats.by_address.entry((true, mmio & !0xfff)).or_default() += 1;
                }
                _ => {}
            }
        }
        match step(&mut vcpu, run_ptr, ctx) {
            Next::Continue => {}
            Next::Stop(reason) => {
                ctx.control.request_exit(reason);
                break;
            }
        }
    }
    kick::set_current_run(std::ptr::null_mut());
    stats.log(vcpu.id);
}

fn step(vcpu: &mut Vcpu, run_ptr: *mut kvm_run, ctx: &VcpuContext) -> Next {
    let fault = match vcpu.fd.run() {
        Ok(VcpuExit::IoOut(port, data)) => {
            for chunk in data.chunks(io_size(run_ptr, data.len())) {
                if !ctx.pio.write(u64::from(port), chunk) {
                    tracing::trace!("unhandled port write {port:#x} {chunk:x?}");
                }
            }
            return Next::Continue;
        }
        Ok(VcpuExit::IoIn(port, data)) => {
            let size = io_size(run_ptr, data.len());
            for chunk in data.chunks_mut(size) {
                // Nothing there: an open ISA bus reads all ones.
                chunk.fill(0xff);
                if !ctx.pio.read(u64::from(port), chunk) {
                    tracing::trace!("unhandled port read {port:#x}");
                }
            }
            return Next::Continue;
        }
        Ok(VcpuExit::MmioWrite(addr, data)) => {
            if !ctx.mmio.write(addr, data) {
                tracing::trace!("unhandled MMIO write {addr:#x} {data:x?}");
            }
            return Next::Continue;
        }
        Ok(VcpuExit::MmioRead(addr, data)) => {
            data.fill(0xff);
            if !ctx.mmio.read(addr, data) {
                tracing::trace!("unhandled MMIO read {addr:#x}");
            }
            return Next::Continue;
        }
        // Only seen without an in-kernel LAPIC; with it, HLT waits in KVM.
        Ok(VcpuExit::Hlt) => return Next::Stop(ExitReason::PowerOff),
        Ok(VcpuExit::SystemEvent(kind, _)) => match kind {
            KVM_SYSTEM_EVENT_SHUTDOWN => return Next::Stop(ExitReason::PowerOff),
            KVM_SYSTEM_EVENT_RESET => return Next::Stop(ExitReason::Reboot),
            _ => Fault::Crash,
        },
        Ok(VcpuExit::Shutdown) => Fault::Shutdown,
        Ok(VcpuExit::FailEntry(reason, _)) => Fault::FailEntry(reason),
        Ok(VcpuExit::InternalError) => Fault::Internal,
        Ok(VcpuExit::IrqWindowOpen | VcpuExit::Intr) => return Next::Continue,
        Ok(other) => Fault::Unexpected(format!("{other:?}")),
        Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
            // A kick: the loop condition decides whether to go on.
            vcpu.fd.set_kvm_immediate_exit(0);
            return Next::Continue;
        }
        Err(e) => Fault::RunError(crate::os_error::errno_message(&e)),
    };
    let id = vcpu.id;
    let regs = describe_registers(&vcpu.fd);
    match fault {
        Fault::Shutdown => {
            // A triple fault: how some kernels reboot (reboot=t), and how a crashed
            // early boot ends. Either way the guest is reset, i.e. rebooted.
            tracing::warn!("vCPU {id}: triple fault (KVM_EXIT_SHUTDOWN), treating as reboot; {regs}");
            Next::Stop(ExitReason::Reboot)
        }
        Fault::FailEntry(reason) => Next::Stop(ExitReason::Error(format!(
            "vCPU {id}: KVM_EXIT_FAIL_ENTRY (hardware entry failure reason {reason:#x}); {regs}"
        ))),
        Fault::Internal => {
            // SAFETY: the exit reason says the `internal` union member is valid.
            let suberror = unsafe { (*run_ptr).__bindgen_anon_1.internal.suberror };
            Next::Stop(ExitReason::Error(format!(
                "vCPU {id}: KVM_EXIT_INTERNAL_ERROR (suberror {suberror}{}); {regs}",
                if suberror == kvm_bindings::KVM_INTERNAL_ERROR_EMULATION {
                    ": instruction emulation failed"
                } else {
                    ""
                }
            )))
        }
        Fault::Crash => Next::Stop(ExitReason::Error(format!("vCPU {id}: guest crash event; {regs}"))),
        Fault::Unexpected(what) => Next::Stop(ExitReason::Error(format!("vCPU {id}: unexpected exit {what}; {regs}"))),
        Fault::RunError(reason) => Next::Stop(ExitReason::Error(format!(
            "vCPU {id}: KVM_RUN failed: {reason}; {regs}"
        ))),
    }
}

/// Size of one port access: KVM hands string I/O (`rep outsb`) over as `count` accesses
/// of `size` bytes in one buffer.
fn io_size(run_ptr: *mut kvm_run, total: usize) -> usize {
    // SAFETY: called only for KVM_EXIT_IO, when the `io` union member is valid.
    let size = unsafe { (*run_ptr).__bindgen_anon_1.io.size } as usize;
    if size == 0 { total.max(1) } else { size }
}

/// One line with the registers that explain where a guest died.
pub fn describe_registers(fd: &VcpuFd) -> String {
    match (fd.get_regs(), fd.get_sregs()) {
        (Ok(r), Ok(s)) => format!(
            "rip={:#x} rsp={:#x} rflags={:#x} rax={:#x} rbx={:#x} rcx={:#x} rdx={:#x} rsi={:#x} rdi={:#x} \
             cs={:#x} cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x}",
            r.rip,
            r.rsp,
            r.rflags,
            r.rax,
            r.rbx,
            r.rcx,
            r.rdx,
            r.rsi,
            r.rdi,
            s.cs.selector,
            s.cr0,
            s.cr2,
            s.cr3,
            s.cr4,
            s.efer
        ),
        (Err(e), _) | (_, Err(e)) => {
            format!("registers unavailable: {}", crate::os_error::errno_message(&e))
        }
    }
}
