//! Issue 12: configs built to exhaust memory or time are refused by `keel-image
//! validate` with a `FILE:LINE:COL: error:` line, quickly and in little memory. Each
//! runs in a child process whose peak RSS the kernel reports (wait4's ru_maxrss).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The most a validate run may use, whatever the input (the bound).
const PEAK_LIMIT_KIB: i64 = 64 * 1024;
/// Generous against a loaded CI machine; the figure itself is printed.
const TIME_LIMIT: Duration = Duration::from_secs(5);

/// Runs `keel-image validate FILE`; its stdout+stderr, peak RSS (KiB) and wall time.
fn validate(file: &Path) -> (bool, String, i64, Duration) {
    let out = tempfile::NamedTempFile::new().unwrap();
    let t = Instant::now();
    // Reaped below with wait4 (for its rusage), not with Child::wait.
    #[allow(clippy::zombie_processes)]
    let child = Command::new(env!("CARGO_BIN_EXE_keel-image"))
        .arg("validate")
        .arg(file)
        .stdin(Stdio::null())
        .stdout(out.reopen().unwrap())
        .stderr(out.reopen().unwrap())
        .spawn()
        .expect("run keel-image");
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value for wait4 to fill.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waits for our own child; both pointers are to live locals.
    let pid = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut usage) };
    assert_eq!(pid, child.id() as i32, "wait4: {}", std::io::Error::last_os_error());
    let took = t.elapsed();
    let text = std::fs::read_to_string(out.path()).unwrap_or_default();
    let ok = libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0;
    (ok, text, usage.ru_maxrss, took)
}

fn refused_quickly(name: &str, content: &[u8], expect: &str) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join(name);
    std::fs::write(&file, content).unwrap();
    file_refused_quickly(&file, expect);
}

/// As [`refused_quickly`] for a file already written. The test process itself must be
/// small when it forks: the child's peak RSS counts what it had before exec.
fn file_refused_quickly(file: &Path, expect: &str) {
    let name = file.file_name().unwrap_or_default().to_string_lossy().into_owned();
    let size = std::fs::metadata(file).map(|m| m.len()).unwrap_or(0);
    let (ok, text, peak_kib, took) = validate(file);
    println!("{name}: {size} bytes refused in {took:?}, peak RSS {peak_kib} KiB");
    assert!(!ok, "{name} validated:\n{text}");
    let prefix = format!("{}:", file.display());
    let line = text
        .lines()
        .find(|l| l.starts_with(&prefix) && l.contains(": error: "))
        .unwrap_or_else(|| panic!("no FILE:LINE:COL: error: line for {name}:\n{text}"));
    let rest = &line[prefix.len()..];
    let mut parts = rest.splitn(3, ':');
    let (l, c) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    assert!(
        l.parse::<usize>().is_ok() && c.parse::<usize>().is_ok(),
        "no line and column in {line}"
    );
    assert!(line.contains(expect), "{name}: expected `{expect}` in {line}");
    assert!(peak_kib < PEAK_LIMIT_KIB, "{name}: peak RSS {peak_kib} KiB");
    assert!(took < TIME_LIMIT, "{name}: took {took:?}");
}

#[test]
fn an_alias_bomb_is_refused() {
    // Nine levels of ten aliases each: 10^9 values once expanded.
    let mut y = String::from("version: 1\na0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
    for i in 1..10 {
        let p = i - 1;
        y.push_str(&format!(
            "a{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]\n"
        ));
    }
    refused_quickly("bomb.yaml", y.as_bytes(), "once aliases are expanded");
}

#[test]
fn deep_nesting_is_refused() {
    // Past Keel's own limit (64 levels)...
    let y = format!("version: 1\nx: {}{}\n", "[".repeat(100), "]".repeat(100));
    refused_quickly("deep.yaml", y.as_bytes(), "nest more than 64 deep");
    // ...and far past it, where saphyr-parser's own recursion limit stops it first.
    let depth = 100_000;
    let y = format!("version: 1\nx: {}{}\n", "[".repeat(depth), "]".repeat(depth));
    refused_quickly("deeper.yaml", y.as_bytes(), "recursion limit exceeded");
}

#[test]
fn a_very_large_file_is_refused_without_reading_it_all() {
    // 64 MiB of comments, written in pieces: refused after the first MiB.
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("huge.yaml");
    let mut f = std::io::BufWriter::new(std::fs::File::create(&file).unwrap());
    f.write_all(b"version: 1\n").unwrap();
    let line = b"# padding padding padding padding padding padding padding padding padding\n";
    for _ in 0..(64 << 20) / line.len() {
        f.write_all(line).unwrap();
    }
    f.flush().unwrap();
    drop(f);
    file_refused_quickly(&file, "1 MiB");
}

#[test]
fn a_map_with_very_many_keys_is_refused_in_linear_time() {
    let mut y = String::from("version: 1\nx:\n");
    for i in 0..60_000 {
        y.push_str(&format!("  k{i}: 1\n"));
    }
    refused_quickly("wide.yaml", y.as_bytes(), "more than 100000 values");
}

#[test]
fn bytes_that_are_not_utf8_are_refused_at_their_position() {
    refused_quickly(
        "latin1.yaml",
        b"version: 1\nguests:\n  - name: caf\xe9\n",
        "3:14: error: byte 32 is not UTF-8",
    );
}
