//! The restart policy: after an exit, restart now, later (exponential backoff) or
//! not at all, and when a run of failures is a crash loop. Pure, so it is tested
//! on its own.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::config::{Guest, RestartPolicy};

use super::state::{Exit, VMM_EXIT_POWEROFF, VMM_EXIT_REBOOT};

/// A guest that ran at least this long before ending had a healthy run: a reboot
/// then restarts it at once and the backoff starts over. Ending sooner is a
/// failed boot — a kernel panic with `panic=1` or a triple fault also looks like a
/// reboot to the VMM — and backs off like a crash, so a boot loop cannot spin.
pub const HEALTHY_RUN: Duration = Duration::from_secs(10);

/// What to do after an exit, decided from the policy alone (pure, so it is tested).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    RestartNow,
    RestartAfter(Duration),
    Stop,
    CrashLoop,
}

/// Restart bookkeeping of one guest.
#[derive(Clone, Debug, Default)]
pub struct RestartHistory {
    /// Times of recent restarts (within the crash-loop window).
    recent: VecDeque<Instant>,
    /// Consecutive failed runs, for the exponential backoff.
    failures: u32,
}

impl RestartHistory {
    pub fn recent_restarts(&self) -> usize {
        self.recent.len()
    }

    /// `never` leaves every ended guest stopped (also after a guest reboot, which
    /// is how a guest without ACPI ends its VM). Otherwise a guest that asks to
    /// reboot after a healthy run is restarted at once, a clean poweroff is final
    /// unless the policy is `always`, and anything else — a reboot within
    /// [`HEALTHY_RUN`] of starting included — is a failure, restarted after a
    /// backoff that doubles up to `max_backoff`, until `max_restarts` within
    /// `window` makes it a crash loop.
    pub fn decide(&mut self, g: &Guest, exit: Exit, uptime: Duration, now: Instant) -> Decision {
        let r = &g.restart;
        let clean = exit == Exit::Code(VMM_EXIT_POWEROFF);
        let reboot = exit == Exit::Code(VMM_EXIT_REBOOT);
        let restart = match r.policy {
            RestartPolicy::Never => false,
            RestartPolicy::OnFailure => !clean,
            RestartPolicy::Always => true,
        };
        if !restart {
            return Decision::Stop;
        }
        while self
            .recent
            .front()
            .is_some_and(|t| now.duration_since(*t) > r.window.get())
        {
            self.recent.pop_front();
        }
        if self.recent.len() >= *r.max_restarts as usize {
            return Decision::CrashLoop;
        }
        self.recent.push_back(now);
        let healthy = uptime >= HEALTHY_RUN;
        if healthy {
            self.failures = 0;
        }
        if (reboot || clean) && healthy {
            return Decision::RestartNow;
        }
        let delay = r
            .backoff
            .get()
            .saturating_mul(1u32 << self.failures.min(20))
            .min(r.max_backoff.get());
        self.failures += 1;
        Decision::RestartAfter(delay)
    }

    /// An operator's start forgives the past.
    pub fn reset(&mut self) {
        *self = RestartHistory::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guest(policy: &str) -> Guest {
        super::super::supervisor::tests_support::guest(policy)
    }

    const SHORT: Duration = Duration::from_secs(1);
    const LONG: Duration = Duration::from_secs(60);

    #[test]
    fn on_failure_backs_off_exponentially_then_declares_a_crash_loop() {
        let g = guest("on-failure");
        let mut h = RestartHistory::default();
        let t = Instant::now();
        assert_eq!(
            h.decide(&g, Exit::Code(1), SHORT, t),
            Decision::RestartAfter(Duration::from_secs(1))
        );
        assert_eq!(
            h.decide(&g, Exit::Signal(9), SHORT, t),
            Decision::RestartAfter(Duration::from_secs(2))
        );
        assert_eq!(
            h.decide(&g, Exit::Code(1), SHORT, t),
            Decision::RestartAfter(Duration::from_secs(4))
        );
        assert_eq!(h.decide(&g, Exit::Code(1), SHORT, t), Decision::CrashLoop);
        // Outside the window the history is forgotten, but not the backoff growth
        // of a guest that never ran healthily.
        assert_eq!(
            h.decide(&g, Exit::Code(1), SHORT, t + Duration::from_secs(120)),
            Decision::RestartAfter(Duration::from_secs(4))
        );
        // A healthy run resets the backoff.
        assert_eq!(
            h.decide(&g, Exit::Code(1), LONG, t + Duration::from_secs(120)),
            Decision::RestartAfter(Duration::from_secs(1))
        );
    }

    #[test]
    fn a_reboot_right_after_start_is_a_failed_boot() {
        let g = guest("on-failure");
        let mut h = RestartHistory::default();
        let t = Instant::now();
        assert_eq!(
            h.decide(&g, Exit::Code(VMM_EXIT_REBOOT), SHORT, t),
            Decision::RestartAfter(Duration::from_secs(1))
        );
        assert_eq!(
            h.decide(&g, Exit::Code(VMM_EXIT_REBOOT), SHORT, t),
            Decision::RestartAfter(Duration::from_secs(2))
        );
        assert_eq!(h.decide(&g, Exit::Code(VMM_EXIT_REBOOT), LONG, t), Decision::RestartNow);
    }

    #[test]
    fn poweroff_and_reboot_follow_the_policy() {
        let t = Instant::now();
        let mut h = RestartHistory::default();
        assert_eq!(
            h.decide(&guest("on-failure"), Exit::Code(VMM_EXIT_POWEROFF), LONG, t),
            Decision::Stop
        );
        assert_eq!(
            h.decide(&guest("on-failure"), Exit::Code(VMM_EXIT_REBOOT), LONG, t),
            Decision::RestartNow
        );
        assert_eq!(
            h.decide(&guest("always"), Exit::Code(VMM_EXIT_POWEROFF), LONG, t),
            Decision::RestartNow
        );
        assert_eq!(h.decide(&guest("never"), Exit::Code(1), LONG, t), Decision::Stop);
        assert_eq!(
            h.decide(&guest("never"), Exit::Code(VMM_EXIT_REBOOT), LONG, t),
            Decision::Stop
        );
    }
}
