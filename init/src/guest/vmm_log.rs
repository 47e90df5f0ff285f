//! A keel-vmm's stderr: relayed to the appliance console line by line, and its last
//! lines kept, debug lines included, so a VMM that fails or hangs at start can be
//! explained with what it said last.
//!
//! keel-init runs every keel-vmm at `RUST_LOG=debug`: the VMM says each blocking step
//! of its start-up before it takes it (opening files, KVM ioctls, connecting the
//! console). Those lines only go to the tail, not to the console; `info` and above, and
//! the VMM's final `keel-vmm: error: ...` line, go to both.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read};
use std::sync::{Arc, Mutex};

use tracing::error;

/// How many of a VMM's last stderr lines are kept.
pub const TAIL_LINES: usize = 20;
/// A longer line is cut (a VMM cannot grow keel-init's memory through its stderr).
const MAX_LINE: usize = 1024;

/// The environment keel-init gives every keel-vmm so the tail explains a hang.
pub const VMM_LOG_ENV: (&str, &str) = ("RUST_LOG", "debug");

/// The last lines a VMM wrote on stderr; shared with its relay thread.
#[derive(Clone, Debug, Default)]
pub struct VmmLog(Arc<Mutex<Tail>>);

#[derive(Debug, Default)]
struct Tail {
    lines: VecDeque<String>,
    /// The last line that was not debug or trace: the VMM's error line when it fails.
    last_message: Option<String>,
}

impl VmmLog {
    /// Forgets the previous run's lines (a new VMM starts).
    pub fn clear(&self) {
        let mut t = self.lock();
        t.lines.clear();
        t.last_message = None;
    }

    /// The last line at info level or above (or not a log line at all).
    pub fn last_message(&self) -> Option<String> {
        self.lock().last_message.clone()
    }

    /// The kept lines, oldest first.
    pub fn tail(&self) -> Vec<String> {
        self.lock().lines.iter().cloned().collect()
    }

    fn push(&self, line: &str) -> bool {
        let quiet = is_debug_line(line);
        let mut t = self.lock();
        if t.lines.len() == TAIL_LINES {
            t.lines.pop_front();
        }
        t.lines.push_back(line.to_string());
        if !quiet {
            t.last_message = Some(line.to_string());
        }
        !quiet
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Tail> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Whether a keel-vmm stderr line is one of its debug or trace lines. tracing's plain
/// format is `TIMESTAMP LEVEL message`; anything else (the final error line) is not.
pub fn is_debug_line(line: &str) -> bool {
    let mut words = line.split_whitespace();
    let _timestamp = words.next();
    matches!(words.next(), Some("DEBUG" | "TRACE"))
}

/// Copies a VMM's pipe to the console line by line with `prefix` (stdout: every line;
/// stderr with a `log`: lines above debug), keeping stderr's lines in `log`. Runs on its
/// own thread until the VMM closes its end.
pub fn relay(pipe: impl Read + Send + 'static, prefix: String, log: Option<VmmLog>) {
    let thread_name = format!("relay {prefix}");
    let spawned = std::thread::Builder::new().name(thread_name.clone()).spawn(move || {
        let mut reader = BufReader::new(pipe);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            // At most MAX_LINE bytes a line: the rest of a longer one comes as the next.
            match (&mut reader).take(MAX_LINE as u64).read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let text = String::from_utf8_lossy(&buf);
                    let text = text.trim_end_matches(['\n', '\r']);
                    let show = log.as_ref().is_none_or(|l| l.push(text));
                    if show {
                        crate::logging::console_line(&format!("{prefix} {text}"));
                    }
                }
            }
        }
    });
    if let Err(e) = spawned {
        error!("cannot start {thread_name}: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_lines_go_to_the_tail_only_and_the_error_line_is_the_last_message() {
        let log = VmmLog::default();
        assert!(!log.push("2026-12-07T02:15:54.123456Z DEBUG opening /dev/kvm"));
        assert!(log.push("2026-12-07T02:15:54.223456Z  INFO virtio-blk disk.img at 0xd0000000 irq 16"));
        assert!(!log.push("2026-12-07T02:15:54.323456Z TRACE x"));
        assert!(log.push("keel-vmm: error: KVM_CREATE_VM: Cannot allocate memory"));
        assert_eq!(
            log.last_message().as_deref(),
            Some("keel-vmm: error: KVM_CREATE_VM: Cannot allocate memory")
        );
        assert_eq!(log.tail().len(), 4);
        assert!(log.tail()[0].ends_with("opening /dev/kvm"));
        log.clear();
        assert!(log.tail().is_empty() && log.last_message().is_none());
    }

    #[test]
    fn the_tail_keeps_the_last_lines_only() {
        let log = VmmLog::default();
        for i in 0..TAIL_LINES + 5 {
            log.push(&format!("line {i}"));
        }
        let tail = log.tail();
        assert_eq!(tail.len(), TAIL_LINES);
        assert_eq!(tail[0], "line 5");
        assert_eq!(tail[TAIL_LINES - 1], format!("line {}", TAIL_LINES + 4));
    }
}
