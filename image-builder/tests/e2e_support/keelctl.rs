//! keelctl (the static one the image carries) against an appliance's forwarded TCP API,
//! as the e2e suites drive it.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::console::StageFailure;
use crate::run;

/// How long one keelctl call may take before the test kills it.
pub const KEELCTL_DEADLINE: Duration = Duration::from_secs(180);

/// keelctl (the static one the image carries) pointed at the forwarded TCP API.
pub struct Keelctl {
    /// The suite's name, for the log lines.
    pub suite: &'static str,
    pub binary: PathBuf,
    pub url: String,
    pub token: String,
}

impl Keelctl {
    /// Runs `keelctl ARGS`; its stdout when it exits 0.
    pub fn run(&self, args: &[&str]) -> Result<String, String> {
        let mut cmd = Command::new(&self.binary);
        cmd.args(["--host", &self.url, "--token", &self.token]).args(args);
        // Longer than any keel-init answer (a stop's 30 s timeout and its slack): a
        // keelctl still running then is hung, and the stage fails saying so.
        let out = run::run_timeout(cmd, KEELCTL_DEADLINE).map_err(|e| format!("keelctl {}: {e}", args.join(" ")))?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        println!("{}: $ keelctl {} -> {}", self.suite, args.join(" "), out.status);
        for line in stdout.lines().chain(String::from_utf8_lossy(&out.stderr).lines()) {
            println!("  > {line}");
        }
        if out.status.success() {
            Ok(stdout)
        } else {
            Err(format!(
                "keelctl {} exited with {}: {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    /// `keelctl list --json` as (name, state) pairs.
    pub fn states(&self) -> Result<Vec<(String, String)>, String> {
        let text = self.run(&["list", "--json"])?;
        let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| format!("list --json: {e}: {text}"))?;
        let guests = value
            .as_array()
            .ok_or_else(|| format!("list --json is not an array: {text}"))?;
        Ok(guests
            .iter()
            .map(|g| {
                let field = |k: &str| g.get(k).and_then(|v| v.as_str()).unwrap_or("").to_string();
                (field("name"), field("state"))
            })
            .collect())
    }

    /// Polls `list --json` until `want` holds, or fails with the last answer.
    pub fn wait_until(
        &self,
        what: &str,
        timeout: Duration,
        want: impl Fn(&[(String, String)]) -> bool,
    ) -> Result<(), StageFailure> {
        let deadline = Instant::now() + timeout;
        let mut last = String::new();
        while Instant::now() < deadline {
            match self.states() {
                Ok(states) if want(&states) => return Ok(()),
                Ok(states) => last = format!("{states:?}"),
                Err(e) => last = e,
            }
            std::thread::sleep(Duration::from_secs(2));
        }
        Err(StageFailure(format!(
            "{what}: not within {} s; last answer: {last}",
            timeout.as_secs()
        )))
    }
}

pub fn state_of<'a>(states: &'a [(String, String)], guest: &str) -> Option<&'a str> {
    states.iter().find(|(n, _)| n == guest).map(|(_, s)| s.as_str())
}
