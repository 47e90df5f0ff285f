//! Health verdicts and the per-boot assessment (bless, wait, give up).

use std::time::{Duration, Instant};

use keel_init::update::health::{Action, Assessment, GuestHealth, Verdict, assess, trial_deadline};

const WINDOW: Duration = Duration::from_secs(60);

fn guest(name: &str, autostart: bool, running_since: Option<Instant>, failed: bool) -> GuestHealth {
    GuestHealth {
        name: name.into(),
        autostart,
        running_since,
        failed,
    }
}

#[test]
fn healthy_only_after_every_autostart_guest_ran_for_the_window() {
    let t0 = Instant::now();
    let guests = [
        guest("a", true, Some(t0), false),
        guest("b", true, Some(t0 + Duration::from_secs(20)), false),
        guest("manual", false, None, false),
    ];
    match assess(t0 + Duration::from_secs(61), Some(t0), &guests, WINDOW) {
        Verdict::Pending { ready_at, waiting_for } => {
            assert_eq!(ready_at, Some(t0 + Duration::from_secs(80)));
            assert!(waiting_for.contains("guest b"), "{waiting_for}");
        }
        v => panic!("expected pending, got {v:?}"),
    }
    assert_eq!(
        assess(t0 + Duration::from_secs(80), Some(t0), &guests, WINDOW),
        Verdict::Healthy
    );
}

#[test]
fn a_restarted_guest_starts_its_window_again_and_a_stopped_one_blocks() {
    let t0 = Instant::now();
    let restarted = [guest("a", true, Some(t0 + Duration::from_secs(50)), false)];
    assert!(matches!(
        assess(t0 + Duration::from_secs(70), Some(t0), &restarted, WINDOW),
        Verdict::Pending { .. }
    ));
    let down = [guest("a", true, None, false)];
    assert!(matches!(
        assess(t0 + Duration::from_secs(500), Some(t0), &down, WINDOW),
        Verdict::Pending { ready_at: None, .. }
    ));
}

#[test]
fn no_config_or_a_failed_guest_is_unhealthy() {
    let t0 = Instant::now();
    assert!(matches!(assess(t0, None, &[], WINDOW), Verdict::Unhealthy(_)));
    let crashed = [guest("a", true, None, true)];
    match assess(t0, Some(t0), &crashed, WINDOW) {
        Verdict::Unhealthy(why) => assert!(why.contains("guest a"), "{why}"),
        v => panic!("expected unhealthy, got {v:?}"),
    }
    // A failed guest that is not autostart does not count.
    let manual = [guest("m", false, None, true)];
    assert!(matches!(
        assess(t0 + WINDOW, Some(t0), &manual, WINDOW),
        Verdict::Healthy
    ));
}

#[test]
fn a_trial_boot_blesses_once_or_gives_up() {
    let t0 = Instant::now();
    let mut a = Assessment::new(WINDOW, true, t0);
    let pending = Verdict::Pending {
        ready_at: Some(t0 + WINDOW),
        waiting_for: "x".into(),
    };
    assert_eq!(a.step(t0, &pending), Action::Wait(Some(t0 + WINDOW)));
    assert_eq!(a.step(t0 + WINDOW, &Verdict::Healthy), Action::Bless);
    assert_eq!(a.step(t0 + WINDOW, &Verdict::Healthy), Action::Idle);

    let mut a = Assessment::new(WINDOW, true, t0);
    assert!(matches!(
        a.step(t0, &Verdict::Unhealthy("guest a failed".into())),
        Action::GiveUp(_)
    ));

    let mut a = Assessment::new(WINDOW, true, t0);
    let stuck = Verdict::Pending {
        ready_at: None,
        waiting_for: "guest a to run".into(),
    };
    let deadline = t0 + trial_deadline(WINDOW);
    assert_eq!(a.step(t0, &stuck), Action::Wait(Some(deadline)));
    assert!(matches!(a.step(deadline, &stuck), Action::GiveUp(_)));
}

#[test]
fn a_blessed_boot_never_gives_up_but_still_blesses_to_prune() {
    let t0 = Instant::now();
    let mut a = Assessment::new(WINDOW, false, t0);
    assert_eq!(a.step(t0, &Verdict::Unhealthy("no config".into())), Action::Wait(None));
    let stuck = Verdict::Pending {
        ready_at: None,
        waiting_for: "x".into(),
    };
    assert_eq!(a.step(t0 + Duration::from_secs(10_000), &stuck), Action::Wait(None));
    assert_eq!(a.step(t0, &Verdict::Healthy), Action::Bless);
}

#[test]
fn the_trial_deadline_leaves_room_beyond_the_window() {
    assert_eq!(trial_deadline(Duration::from_secs(60)), Duration::from_secs(180));
    assert_eq!(trial_deadline(Duration::from_secs(10)), Duration::from_secs(130));
}
