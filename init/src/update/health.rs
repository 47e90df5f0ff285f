//! When a boot counts as healthy, and what to do about it.
//!
//! Healthy: the config was applied, and every autostart guest has been running
//! without a restart for the whole health window. The supervisor knows its guests'
//! states; it passes a snapshot ([`GuestHealth`]) and gets a [`Verdict`]. Pure
//! functions of their inputs and the clock, so they are tested without guests.
//!
//! [`Assessment`] turns verdicts into actions for one boot: bless once healthy;
//! on a trial boot that cannot get healthy (a guest crash-looped, no valid
//! config, or the deadline passed) give up, so PID 1 reboots and systemd-boot
//! spends the next try, and after the last one boots the previous version. Without
//! the reboot a bad version would sit there unhealthy and never roll back.

use std::time::{Duration, Instant};

/// One guest, as the supervisor sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestHealth {
    pub name: String,
    /// Declared with `autostart: true`: health waits for it.
    pub autostart: bool,
    /// Since when its current keel-vmm runs (`None`: not running now).
    pub running_since: Option<Instant>,
    /// Given up on (crash loop, or it could not be started): it will not become
    /// healthy without an operator.
    pub failed: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Healthy,
    /// Not yet; healthy at `ready_at` if nothing changes (`None`: waiting for a
    /// guest to (re)start or for the config).
    Pending {
        ready_at: Option<Instant>,
        waiting_for: String,
    },
    /// Will not become healthy by waiting.
    Unhealthy(String),
}

/// The verdict at `now`. `config_applied_at`: when the config was applied (`None`:
/// no valid config, which never becomes healthy by itself).
pub fn assess(now: Instant, config_applied_at: Option<Instant>, guests: &[GuestHealth], window: Duration) -> Verdict {
    let Some(applied) = config_applied_at else {
        return Verdict::Unhealthy("no valid config was applied".into());
    };
    if let Some(g) = guests.iter().find(|g| g.autostart && g.failed) {
        return Verdict::Unhealthy(format!("guest {} failed", g.name));
    }
    // Healthy from the latest of: config applied + window, each guest's start + window.
    let mut ready_at = applied + window;
    let mut waiting_for = "the health window after the config was applied".to_owned();
    for g in guests.iter().filter(|g| g.autostart) {
        match g.running_since {
            None => {
                return Verdict::Pending {
                    ready_at: None,
                    waiting_for: format!("guest {} to run", g.name),
                };
            }
            Some(since) if since + window > ready_at => {
                ready_at = since + window;
                waiting_for = format!("guest {} to run for the health window", g.name);
            }
            Some(_) => {}
        }
    }
    if now >= ready_at {
        Verdict::Healthy
    } else {
        Verdict::Pending {
            ready_at: Some(ready_at),
            waiting_for,
        }
    }
}

/// How long a trial boot may take to become healthy before it is given up:
/// three health windows, and at least two minutes beyond one window (guests
/// booting under load, DHCP, first-boot formatting of KEEL-DATA).
pub fn trial_deadline(window: Duration) -> Duration {
    (window * 3).max(window + Duration::from_secs(120))
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Nothing to do yet; look again at this time (or on the next guest change).
    Wait(Option<Instant>),
    /// Healthy: bless the running entry and prune (once per boot).
    Bless,
    /// A trial boot that will not become healthy: reboot so systemd-boot spends a
    /// try (and after the last one boots the previous version).
    GiveUp(String),
    /// Done for this boot (blessed, or not a trial and nothing to bless).
    Idle,
}

/// The health assessment of one boot.
#[derive(Debug, Clone)]
pub struct Assessment {
    window: Duration,
    on_trial: bool,
    started: Instant,
    done: bool,
}

impl Assessment {
    /// `on_trial`: systemd-boot counted this boot (`LoaderBootCountPath` set).
    pub fn new(window: Duration, on_trial: bool, started: Instant) -> Self {
        Self {
            window,
            on_trial,
            started,
            done: false,
        }
    }

    pub fn on_trial(&self) -> bool {
        self.on_trial
    }

    /// The next action for the latest verdict. `Bless` is returned once; after it
    /// (or after `GiveUp`), `Idle`.
    pub fn step(&mut self, now: Instant, verdict: &Verdict) -> Action {
        if self.done {
            return Action::Idle;
        }
        let deadline = self.started + trial_deadline(self.window);
        match verdict {
            Verdict::Healthy => {
                self.done = true;
                Action::Bless
            }
            // Not on trial: the entry is blessed already and there is nothing to
            // roll back to by rebooting; wait (bless still prunes once healthy).
            Verdict::Unhealthy(_) if !self.on_trial => Action::Wait(None),
            Verdict::Unhealthy(reason) => {
                self.done = true;
                Action::GiveUp(reason.clone())
            }
            Verdict::Pending { .. } if self.on_trial && now >= deadline => {
                self.done = true;
                Action::GiveUp(format!(
                    "not healthy within {}s of boot",
                    trial_deadline(self.window).as_secs()
                ))
            }
            Verdict::Pending { ready_at, .. } => {
                let wake = match (ready_at, self.on_trial) {
                    (Some(r), true) => Some((*r).min(deadline)),
                    (Some(r), false) => Some(*r),
                    (None, true) => Some(deadline),
                    (None, false) => None,
                };
                Action::Wait(wake)
            }
        }
    }
}
