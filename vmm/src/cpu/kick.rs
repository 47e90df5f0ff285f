//! The vCPU kick: a real-time signal whose handler sets `immediate_exit` in the
//! thread's kvm_run, so a vCPU leaves KVM_RUN at once (to pause or stop) and a kick
//! that lands just before KVM_RUN is not lost.

use std::cell::Cell;

use kvm_bindings::kvm_run;
use vmm_sys_util::signal::{SIGRTMIN, register_signal_handler};

/// Points the kick handler at this thread's kvm_run (null: no vCPU runs here).
pub fn set_current_run(run: *mut kvm_run) {
    KVM_RUN.with(|r| r.set(run));
}

/// The real-time signal used to kick vCPU threads out of KVM_RUN.
pub fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

thread_local! {
    /// This thread's kvm_run, for the kick handler. Null when no vCPU runs here.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Async-signal-safe: a const thread-local read and one byte store.
    KVM_RUN.with(|run| {
        let ptr = run.get();
        if !ptr.is_null() {
            // SAFETY: the pointer is this thread's live kvm_run mapping; it is cleared
            // before the mapping goes away.
            unsafe { (*ptr).immediate_exit = 1 };
        }
    });
}

/// Installs the kick handler (idempotent).
pub fn install_kick_handler() -> Result<(), String> {
    static INSTALLED: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    INSTALLED
        .get_or_init(|| {
            register_signal_handler(kick_signal(), kick_handler).map_err(|e| crate::os_error::errno_message(&e))
        })
        .clone()
}
