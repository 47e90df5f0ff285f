//! Watching a QEMU serial console from an end-to-end test: every line is echoed (so the CI
//! log shows the boot), and each stage waits for its line with its own timeout.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, ExitCode, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

/// A running QEMU whose stdout (the serial console) and stderr are read line by line.
pub struct Console {
    child: Child,
    lines: Receiver<String>,
    started: Instant,
    /// The last lines seen, shown when a stage fails.
    recent: Vec<String>,
    /// Every line read so far.
    history: Vec<String>,
}

/// A stage that did not see its line in time, or saw the console end first.
#[derive(Debug)]
pub struct StageFailure(pub String);

fn pump(source: impl Read + Send + 'static, prefix: &'static str, tx: mpsc::Sender<String>) {
    thread::spawn(move || {
        let mut reader = BufReader::new(source);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match reader.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => return,
                Ok(_) => {
                    let line = String::from_utf8_lossy(&buf)
                        .trim_end_matches(['\r', '\n'])
                        .replace('\r', "");
                    if tx.send(format!("{prefix}{line}")).is_err() {
                        return;
                    }
                }
            }
        }
    });
}

impl Console {
    /// Starts `command` with stdin closed and stdout/stderr captured.
    pub fn spawn(mut command: Command) -> std::io::Result<Self> {
        let started = Instant::now();
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let (tx, lines) = mpsc::channel();
        if let Some(out) = child.stdout.take() {
            pump(out, "", tx.clone());
        }
        if let Some(err) = child.stderr.take() {
            pump(err, "qemu stderr: ", tx);
        }
        Ok(Self {
            child,
            lines,
            started,
            recent: Vec::new(),
            history: Vec::new(),
        })
    }

    /// Time since QEMU was started.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Reads lines until one contains `needle`, which it returns; fails after `timeout` or
    /// when the console closes. Lines containing any of `fatal` fail the stage at once.
    pub fn expect(&mut self, needle: &str, fatal: &[&str], timeout: Duration) -> Result<String, StageFailure> {
        self.expect_any(&[needle], fatal, timeout).map(|(_, line)| line)
    }

    /// Like [`Console::expect`] for the first line that contains any of `needles`:
    /// returns which one (its index) and the line.
    pub fn expect_any(
        &mut self,
        needles: &[&str],
        fatal: &[&str],
        timeout: Duration,
    ) -> Result<(usize, String), StageFailure> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.remember(&line);
                    if let Some(i) = needles.iter().position(|n| line.contains(n)) {
                        return Ok((i, line));
                    }
                    if let Some(f) = fatal.iter().find(|f| line.contains(**f)) {
                        return Err(StageFailure(format!("saw {f:?} while waiting for {needles:?}")));
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    return Err(StageFailure(format!(
                        "no line containing {needles:?} within {} s",
                        timeout.as_secs()
                    )));
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let status = self
                        .child
                        .wait()
                        .map(|s| s.to_string())
                        .unwrap_or_else(|e| e.to_string());
                    return Err(StageFailure(format!(
                        "console closed ({status}) before a line containing {needles:?}"
                    )));
                }
            }
        }
    }

    /// Echoes what the console prints for up to `wait` (less if it closes). Fails when
    /// a line contains any of `fatal`, or the console has closed (QEMU is gone).
    #[allow(dead_code)] // used by e2e_update only (each test includes this file)
    pub fn watch(&mut self, wait: Duration, fatal: &[&str]) -> Result<(), StageFailure> {
        let deadline = Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.remember(&line);
                    if let Some(f) = fatal.iter().find(|f| line.contains(**f)) {
                        return Err(StageFailure(format!("saw {f:?}")));
                    }
                }
                Err(RecvTimeoutError::Timeout) => return Ok(()),
                Err(RecvTimeoutError::Disconnected) => {
                    let status = self
                        .child
                        .wait()
                        .map(|s| s.to_string())
                        .unwrap_or_else(|e| e.to_string());
                    return Err(StageFailure(format!("console closed ({status})")));
                }
            }
        }
    }

    fn remember(&mut self, line: &str) {
        println!("  | {line}");
        self.recent.push(line.to_owned());
        if self.recent.len() > 40 {
            self.recent.remove(0);
        }
        self.history.push(line.to_owned());
    }

    /// The last line read so far that contains `needle` (read by any of the methods).
    #[allow(dead_code)] // used by e2e_update only
    pub fn seen(&self, needle: &str) -> Option<&str> {
        self.history
            .iter()
            .rev()
            .find(|l| l.contains(needle))
            .map(String::as_str)
    }

    /// The process id of the command (for `keel-image run`: the parent of QEMU).
    #[allow(dead_code)] // used by e2e_update only
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for QEMU to exit on its own, echoing what it still prints.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus, StageFailure> {
        let deadline = Instant::now() + timeout;
        loop {
            while let Ok(line) = self.lines.try_recv() {
                self.remember(&line);
            }
            match self.child.try_wait() {
                Ok(Some(status)) => return Ok(status),
                Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(50)),
                Ok(None) => {
                    return Err(StageFailure(format!(
                        "QEMU still running after {} s",
                        timeout.as_secs()
                    )));
                }
                Err(e) => return Err(StageFailure(format!("waiting for QEMU: {e}"))),
            }
        }
    }

    /// The last lines seen, for a failure report.
    pub fn recent(&self) -> &[String] {
        &self.recent
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        // Never leave a QEMU behind, whatever failed.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Counts stages and prints the closing `N passed, N failed` line CI reads.
pub struct Report {
    name: &'static str,
    passed: usize,
    failed: usize,
}

impl Report {
    pub fn new(name: &'static str) -> Self {
        Self {
            name,
            passed: 0,
            failed: 0,
        }
    }

    /// Records one stage's outcome and prints it with the time since QEMU started.
    pub fn stage<T>(&mut self, console: &Console, stage: &str, result: Result<T, StageFailure>) -> Option<T> {
        let at = console.elapsed().as_secs_f64();
        match result {
            Ok(value) => {
                self.passed += 1;
                println!("{}: PASS {stage} (t={at:.1} s)", self.name);
                Some(value)
            }
            Err(StageFailure(why)) => {
                self.failed += 1;
                println!("{}: FAIL {stage} (t={at:.1} s): {why}", self.name);
                println!("{}: last console lines:", self.name);
                for line in console.recent() {
                    println!("  | {line}");
                }
                None
            }
        }
    }

    /// Records a check that involves no console (e.g. a command's exit status).
    #[allow(dead_code)] // used by e2e_image, not by e2e_vmm (each test includes this file)
    pub fn check(&mut self, stage: &str, result: Result<(), String>) -> bool {
        match result {
            Ok(()) => {
                self.passed += 1;
                println!("{}: PASS {stage}", self.name);
                true
            }
            Err(why) => {
                self.failed += 1;
                println!("{}: FAIL {stage}: {why}", self.name);
                false
            }
        }
    }

    /// Counts stages that were never reached because an earlier one failed.
    pub fn skipped_as_failed(&mut self, stages: &[&str]) {
        for stage in stages {
            self.failed += 1;
            println!("{}: FAIL {stage}: not reached", self.name);
        }
    }

    /// Prints the closing line; true when everything passed.
    pub fn finish(&self) -> bool {
        println!("{}: {} passed, {} failed", self.name, self.passed, self.failed);
        self.failed == 0 && self.passed > 0
    }
}

/// A suite's exit code from its outcome: `Ok(all passed)`, or a setup error, which is
/// reported and counted as the one failure (so CI's closing line still appears).
pub fn exit_code(suite: &str, outcome: Result<bool, String>) -> ExitCode {
    match outcome {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("{suite}: error: {e}");
            println!("{suite}: 0 passed, 1 failed");
            ExitCode::FAILURE
        }
    }
}
