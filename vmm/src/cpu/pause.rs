//! Pausing and resuming the vCPUs: the state the vCPU threads check before each
//! KVM_RUN and the control socket's `pause`/`resume` set. It lives with the vCPUs;
//! the socket server only calls it.
//!
//! While paused, [`ControlState::capture_vcpus`] has every parked vCPU thread take its
//! own state ([`VcpuState`]): the thread owns its `VcpuFd`, and KVM wants a vCPU's
//! pending I/O completed by the thread that ran it before its registers are read.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use super::state::VcpuState;
use crate::bus::lock;
use crate::control::VmControl;
use crate::state_error::StateError;

/// How long `pause` waits for every vCPU to leave the guest.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Default)]
struct PauseState {
    paused: bool,
    /// vCPU threads currently waiting in [`ControlState::vcpu_checkpoint`].
    parked: usize,
    /// Bumped by each [`ControlState::capture_vcpus`]; a parked thread that has not yet
    /// answered this generation takes its state.
    capture: u64,
    captured: Vec<Result<VcpuState, String>>,
}

/// What the control socket shares with the vCPU threads and the main thread.
pub struct ControlState {
    pause: Mutex<PauseState>,
    changed: Condvar,
    /// pthreads of the running vCPU threads, to kick them out of KVM_RUN. Cleared
    /// (under the lock) before they are joined, so a kick never targets a dead thread.
    vcpu_threads: Mutex<Vec<libc::pthread_t>>,
    graceful_stop: AtomicBool,
}

impl Default for ControlState {
    fn default() -> Self {
        Self::new()
    }
}

impl ControlState {
    pub fn new() -> Self {
        ControlState {
            pause: Mutex::new(PauseState::default()),
            changed: Condvar::new(),
            vcpu_threads: Mutex::new(Vec::new()),
            graceful_stop: AtomicBool::new(false),
        }
    }

    /// Called by each vCPU thread before every KVM_RUN: waits here while the VM is
    /// paused. The wait re-checks `control` so a stop ends a paused VM too (a
    /// condvar does not notice the kick signal).
    ///
    /// `capture` takes this vCPU's state when [`Self::capture_vcpus`] asks for it.
    pub fn vcpu_checkpoint(&self, control: &VmControl, capture: &mut dyn FnMut() -> Result<VcpuState, StateError>) {
        let mut st = lock(&self.pause);
        if !st.paused {
            return;
        }
        st.parked += 1;
        let mut answered = st.capture;
        self.changed.notify_all();
        while st.paused && !control.is_stopping() {
            if st.capture != answered {
                answered = st.capture;
                drop(st);
                let taken = capture().map_err(|e| e.to_string());
                st = lock(&self.pause);
                st.captured.push(taken);
                self.changed.notify_all();
                continue;
            }
            st = match self.changed.wait_timeout(st, Duration::from_millis(50)) {
                Ok((guard, _)) => guard,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
        st.parked -= 1;
        self.changed.notify_all();
    }

    pub fn set_vcpu_threads(&self, threads: Vec<libc::pthread_t>) {
        *lock(&self.vcpu_threads) = threads;
    }

    pub fn clear_vcpu_threads(&self) {
        lock(&self.vcpu_threads).clear();
    }

    /// Whether a graceful stop was asked for through the socket (the main thread
    /// then reports a guest reboot or poweroff as "stopped").
    pub fn stop_requested(&self) -> bool {
        self.graceful_stop.load(Ordering::SeqCst)
    }

    /// Records that a graceful stop was asked for (see [`Self::stop_requested`]).
    pub fn request_graceful_stop(&self) {
        self.graceful_stop.store(true, Ordering::SeqCst);
    }

    pub fn is_paused(&self) -> bool {
        lock(&self.pause).paused
    }

    /// Parks every vCPU; returns once all have left the guest.
    pub fn pause(&self, control: &VmControl) -> Result<(), String> {
        let threads = {
            let mut st = lock(&self.pause);
            st.paused = true;
            lock(&self.vcpu_threads).clone()
        };
        // Kick each vCPU out of KVM_RUN (the handler sets immediate_exit, so a kick
        // that lands just before KVM_RUN is not lost); the loop then parks.
        for t in &threads {
            // SAFETY: the pthread ids are live: they are removed before the threads are joined.
            unsafe { libc::pthread_kill(*t, super::kick::kick_signal()) };
        }
        let deadline = Instant::now() + PAUSE_TIMEOUT;
        let mut st = lock(&self.pause);
        while st.parked < threads.len() && !control.is_stopping() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(format!(
                    "only {} of {} vCPUs paused within {PAUSE_TIMEOUT:?}",
                    st.parked,
                    threads.len()
                ));
            }
            st = match self.changed.wait_timeout(st, left.min(Duration::from_millis(50))) {
                Ok((guard, _)) => guard,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
        Ok(())
    }

    /// Has every parked vCPU take its state (see the module doc); the VM must be
    /// paused. The states come back ordered by vCPU id.
    pub fn capture_vcpus(&self, control: &VmControl) -> Result<Vec<VcpuState>, StateError> {
        let threads = lock(&self.vcpu_threads).len();
        let mut st = lock(&self.pause);
        if !st.paused || st.parked < threads {
            return Err(StateError::Invalid {
                what: "vCPU state",
                reason: "the VM must be paused before its state is taken".into(),
            });
        }
        st.capture += 1;
        st.captured.clear();
        self.changed.notify_all();
        let deadline = Instant::now() + PAUSE_TIMEOUT;
        while st.captured.len() < threads {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || control.is_stopping() {
                return Err(StateError::Kvm {
                    what: "vCPU state",
                    reason: format!("only {} of {threads} vCPUs gave their state", st.captured.len()),
                });
            }
            st = match self.changed.wait_timeout(st, left.min(Duration::from_millis(50))) {
                Ok((guard, _)) => guard,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
        let mut states = std::mem::take(&mut st.captured)
            .into_iter()
            .collect::<Result<Vec<_>, String>>()
            .map_err(|reason| StateError::Kvm {
                what: "vCPU state",
                reason,
            })?;
        states.sort_by_key(|s| s.id);
        Ok(states)
    }

    pub fn resume(&self) {
        lock(&self.pause).paused = false;
        self.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::AtomicU64;

    use super::*;
    use crate::control::ExitReason;

    #[test]
    fn pause_waits_for_vcpus_to_park_and_resume_releases_them() {
        let state = Arc::new(ControlState::new());
        let control = Arc::new(VmControl::new().unwrap());
        // A stand-in vCPU thread that runs the checkpoint in a loop.
        let spins = Arc::new(AtomicU64::new(0));
        let (s, c, n) = (state.clone(), control.clone(), spins.clone());
        let t = std::thread::spawn(move || {
            while !c.is_stopping() {
                s.vcpu_checkpoint(&c, &mut || {
                    Err(StateError::Invalid {
                        what: "stand-in vCPU",
                        reason: "has no state".into(),
                    })
                });
                n.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(1));
            }
        });
        // Kicks are sent to registered threads; the handler is installed for them.
        super::super::kick::install_kick_handler().unwrap();
        {
            use std::os::unix::thread::JoinHandleExt;
            state.set_vcpu_threads(vec![t.as_pthread_t()]);
        }
        state.pause(&control).unwrap();
        let frozen = spins.load(Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(spins.load(Ordering::Relaxed), frozen, "a paused vCPU must not run");
        assert!(state.is_paused());
        state.resume();
        std::thread::sleep(Duration::from_millis(30));
        assert!(spins.load(Ordering::Relaxed) > frozen, "resume must release the vCPU");
        state.clear_vcpu_threads();
        control.request_exit(ExitReason::PowerOff);
        t.join().unwrap();
    }
}
