//! Logging for keel-init: `tracing` to the console, each line stamped with the time
//! since boot like the kernel's own messages, so the two interleave readably.

use std::fmt;
use std::io::Write;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::FormatTime;
use tracing_subscriber::reload;

/// `[   12.345678]`: seconds since boot (CLOCK_BOOTTIME), as dmesg prints them.
struct Uptime;

impl FormatTime for Uptime {
    fn format_time(&self, w: &mut Writer<'_>) -> fmt::Result {
        let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
            .map(|ts| (ts.tv_sec(), ts.tv_nsec() / 1000))
            .unwrap_or((0, 0));
        write!(w, "[{:5}.{:06}]", t.0, t.1)
    }
}

/// Changes the log level once the config has been read.
pub struct LevelHandle(reload::Handle<EnvFilter, tracing_subscriber::Registry>);

impl LevelHandle {
    pub fn set(&self, level: &str) {
        if let Ok(filter) = EnvFilter::try_new(level) {
            let _ = self.0.reload(filter);
        }
    }
}

/// Installs the console logger. `KEEL_LOG` (e.g. `debug`) overrides the start level.
pub fn init() -> LevelHandle {
    use tracing_subscriber::prelude::*;
    let filter = EnvFilter::try_from_env("KEEL_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    let fmt = tracing_subscriber::fmt::layer()
        .with_timer(Uptime)
        .with_target(false)
        .with_ansi(false)
        .with_writer(std::io::stdout);
    let _ = tracing_subscriber::registry().with(filter).with(fmt).try_init();
    LevelHandle(handle)
}

/// Writes one line to the console as it is (for relayed guest output).
pub fn console_line(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}
