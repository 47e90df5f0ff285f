//! Diagnostics: every problem found in a config file, with its position.
//!
//! Printed as `FILE:LINE:COL: error: MESSAGE` (the format compilers use, so editors
//! and CI logs make them clickable), sorted by position, all at once.

use std::fmt;

use serde::Serialize;

use super::yaml::Pos;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Error,
    Warning,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Diagnostic {
    pub severity: Severity,
    pub line: usize,
    pub col: usize,
    pub message: String,
}

impl Diagnostic {
    pub fn pos(&self) -> Pos {
        Pos::new(self.line, self.col)
    }
}

/// The diagnostics of one file.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Diagnostics {
    items: Vec<Diagnostic>,
}

impl Diagnostics {
    pub fn error(&mut self, pos: Pos, message: impl Into<String>) {
        self.push(Severity::Error, pos, message.into());
    }

    pub fn warning(&mut self, pos: Pos, message: impl Into<String>) {
        self.push(Severity::Warning, pos, message.into());
    }

    fn push(&mut self, severity: Severity, pos: Pos, message: String) {
        let d = Diagnostic {
            severity,
            line: pos.line,
            col: pos.col,
            message,
        };
        // The same node can be reached twice (e.g. through a YAML alias); say it once.
        if !self.items.contains(&d) {
            self.items.push(d);
        }
    }

    pub fn has_errors(&self) -> bool {
        self.items.iter().any(|d| d.severity == Severity::Error)
    }

    pub fn errors(&self) -> impl Iterator<Item = &Diagnostic> {
        self.items.iter().filter(|d| d.severity == Severity::Error)
    }

    pub fn warnings(&self) -> impl Iterator<Item = &Diagnostic> {
        self.items.iter().filter(|d| d.severity == Severity::Warning)
    }

    /// All diagnostics sorted by position (errors before warnings at the same spot).
    pub fn sorted(&self) -> Vec<Diagnostic> {
        let mut v = self.items.clone();
        v.sort_by_key(|a| (a.line, a.col, a.severity));
        v
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Renders every diagnostic as `FILE:LINE:COL: severity: message`, one per line.
    pub fn render(&self, file: &str) -> String {
        let mut out = String::new();
        for d in self.sorted() {
            out.push_str(&format!("{}\n", Rendered { file, diag: &d }));
        }
        out
    }
}

struct Rendered<'a> {
    file: &'a str,
    diag: &'a Diagnostic,
}

impl fmt::Display for Rendered<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sev = match self.diag.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        write!(
            f,
            "{}:{}:{}: {}: {}",
            self.file, self.diag.line, self.diag.col, sev, self.diag.message
        )
    }
}
