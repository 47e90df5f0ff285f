//! What a VMM that does not move is doing: each of its threads' scheduler state,
//! wait channel and kernel stack from /proc, for the log line that reports a start or
//! a stop that did not finish. PID 1 is root, so `/proc/PID/task/TID/stack` is readable.

use std::fmt::Write as _;
use std::path::Path;

/// Kernel stack frames kept per thread (the innermost ones say what it waits for).
const STACK_FRAMES: usize = 12;
/// Threads described at the most (a VMM has one per vCPU plus a few).
const MAX_THREADS: usize = 40;

/// One line per thread of `pid`: `tid NAME state S wchan W: frame <- frame ...`,
/// or why it cannot be read (the process has gone).
pub fn describe(pid: i32) -> Vec<String> {
    describe_under(Path::new("/proc"), pid)
}

fn describe_under(proc_root: &Path, pid: i32) -> Vec<String> {
    let task_dir = proc_root.join(pid.to_string()).join("task");
    let mut tids: Vec<i32> = match std::fs::read_dir(&task_dir) {
        Ok(entries) => entries
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .collect(),
        Err(e) => return vec![format!("{}: {e}", task_dir.display())],
    };
    tids.sort_unstable();
    tids.truncate(MAX_THREADS);
    tids.iter()
        .map(|tid| describe_thread(&task_dir.join(tid.to_string()), *tid))
        .collect()
}

fn describe_thread(dir: &Path, tid: i32) -> String {
    let read = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap_or_default();
    let comm = read("comm");
    let wchan = read("wchan");
    let state = scheduler_state(&read("stat")).unwrap_or('?');
    let mut line = format!(
        "tid {tid} {} state {state} wchan {}",
        comm.trim(),
        if wchan.trim().is_empty() { "-" } else { wchan.trim() }
    );
    let stack = read("stack");
    let frames: Vec<&str> = stack
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .take(STACK_FRAMES)
        .collect();
    if !frames.is_empty() {
        let _ = write!(line, ": {}", frames.join(" <- "));
    }
    line
}

/// The state letter of a `/proc/.../stat` line (R, S, D, T, Z...). The command name
/// in parentheses may itself hold spaces and parentheses, so the state is the first
/// field after the last `)`.
fn scheduler_state(stat: &str) -> Option<char> {
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().next()?.chars().next()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_state_after_the_command_name() {
        assert_eq!(scheduler_state("123 (keel-vmm) S 1 123 0"), Some('S'));
        assert_eq!(scheduler_state("123 (a) b) (c) D 1"), Some('D'));
        assert_eq!(scheduler_state("garbage"), None);
    }

    #[test]
    fn describes_every_thread_of_a_live_process() {
        let me = std::process::id() as i32;
        let lines = describe(me);
        assert!(!lines.is_empty());
        assert!(lines[0].starts_with(&format!("tid {me} ")), "{lines:?}");
        assert!(lines[0].contains(" state "), "{lines:?}");
    }

    #[test]
    fn a_process_that_has_gone_is_said_so() {
        let lines = describe_under(Path::new("/proc"), i32::MAX);
        assert_eq!(lines.len(), 1);
        assert!(lines[0].contains("No such file"), "{lines:?}");
    }
}
