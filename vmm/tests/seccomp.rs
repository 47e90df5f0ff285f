//! The seccomp filter: on every thread of a running VMM, off with --no-seccomp, and a call
//! outside its list ends the process with one line naming the call while listed calls
//! (threads through the clone3 → clone fallback, AF_UNIX sockets) keep working.

mod common;

use std::io::Read;
use std::os::fd::{FromRawFd, OwnedFd};
use std::process::{Child, Command, Stdio};

use common::*;

/// Starts keel-vmm on a guest that writes the boot timer and halts, and waits until it has.
fn running_vmm(dir: &std::path::Path, extra: &[&str]) -> Child {
    let mut a = asm64();
    boot_timer(&mut a);
    halt_forever(&mut a);
    let kernel = write_file(dir, "halt.elf", &elf_kernel(&assemble(a, LOAD_ADDR), LOAD_ADDR, 0));
    let mut child = Command::new(vmm_bin())
        .args(["--kernel", kernel.to_str().unwrap(), "--serial", "none", "--boot-timer"])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn keel-vmm");
    wait_for_boot_timer(&mut child);
    child
}

/// `Seccomp:` (mode) and `Seccomp_filters:` of every thread of `pid`.
fn seccomp_of_threads(pid: u32) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).expect("task dir") {
        let path = task.unwrap().path();
        let status = std::fs::read_to_string(path.join("status")).expect("status");
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_string())
                .unwrap_or_default()
        };
        out.push((field("Name:"), field("Seccomp:"), field("Seccomp_filters:")));
    }
    out
}

#[test]
fn every_thread_of_a_running_vmm_is_filtered_unless_turned_off() {
    if !require_kvm() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut vmm = running_vmm(dir.path(), &[]);
    let threads = seccomp_of_threads(vmm.id());
    vmm.kill().unwrap();
    vmm.wait().unwrap();
    assert!(threads.iter().any(|(name, _, _)| name == "vcpu0"), "{threads:?}");
    for (name, mode, filters) in &threads {
        // Mode 2 is SECCOMP_MODE_FILTER; two filters: the allowlist and clone3's ENOSYS.
        assert_eq!(
            (mode.as_str(), filters.as_str()),
            ("2", "2"),
            "thread {name}: {threads:?}"
        );
    }

    let mut vmm = running_vmm(dir.path(), &["--no-seccomp"]);
    let threads = seccomp_of_threads(vmm.id());
    vmm.kill().unwrap();
    vmm.wait().unwrap();
    for (name, mode, _) in &threads {
        assert_eq!(mode, "0", "thread {name} with --no-seccomp: {threads:?}");
    }
}

/// Forks; the child installs the filter, does `before` (listed calls that must still
/// work, writing "ok" lines), then `forbidden`. Returns the child's exit code and what it
/// wrote to stderr.
fn in_filtered_child(forbidden: impl FnOnce()) -> (i32, String) {
    let mut fds = [0; 2];
    // SAFETY: pipe fills two fds we then own.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: fork in a test process; the child only uses fds, the allocator (made safe
    // across fork by glibc) and threads it starts itself, then exits without unwinding.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork");
    if pid == 0 {
        // SAFETY: the write end replaces stderr in the child only.
        unsafe {
            libc::dup2(fds[1], 2);
            libc::close(fds[0]);
        }
        let say = |s: &str| {
            // SAFETY: writing a buffer we own to fd 2.
            unsafe { libc::write(2, s.as_ptr().cast(), s.len()) };
        };
        if let Err(e) = keel_vmm::seccomp::install() {
            say(&format!("install failed: {e}\n"));
            // SAFETY: ends the child without running the parent's test harness.
            unsafe { libc::_exit(90) };
        }
        // Listed: a new thread (glibc tries clone3, gets ENOSYS, falls back to clone
        // with CLONE_THREAD), and an AF_UNIX socket.
        match std::thread::spawn(|| 7).join() {
            Ok(7) => say("thread ok\n"),
            _ => say("thread failed\n"),
        }
        // SAFETY: plain socket(2); the fd is closed at once.
        let unix = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) };
        if unix >= 0 {
            say("unix socket ok\n");
            // SAFETY: closing the fd just made.
            unsafe { libc::close(unix) };
        }
        forbidden();
        say("forbidden call returned\n");
        // SAFETY: as above.
        unsafe { libc::_exit(91) };
    }
    // SAFETY: the parent's copy of the write end; closing it lets the read see EOF.
    unsafe { libc::close(fds[1]) };
    // SAFETY: fds[0] is the read end, owned here from now on.
    let mut reader = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fds[0]) });
    let mut text = String::new();
    reader.read_to_string(&mut text).unwrap();
    let mut status = 0;
    // SAFETY: waiting for our own child.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    assert!(
        libc::WIFEXITED(status),
        "child did not exit normally: status {status:#x}, stderr {text:?}"
    );
    (libc::WEXITSTATUS(status), text)
}

#[test]
fn an_unlisted_call_ends_the_vmm_with_one_line_naming_it() {
    // SAFETY: socket(2) with constant arguments.
    let (code, text) = in_filtered_child(|| unsafe {
        libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
    });
    assert_eq!(code, keel_vmm::EXIT_ERROR, "{text}");
    assert!(text.contains("thread ok\nunix socket ok\n"), "{text}");
    assert!(
        text.contains(&format!(
            "keel-vmm: error: seccomp blocked system call {}",
            libc::SYS_socket
        )),
        "{text}"
    );

    // execve is not listed at all.
    let (code, text) = in_filtered_child(|| {
        let path = c"/bin/true";
        let argv = [path.as_ptr(), std::ptr::null()];
        // SAFETY: a NUL-terminated path and a NULL-terminated argv that outlive the call.
        unsafe { libc::execv(path.as_ptr(), argv.as_ptr()) };
    });
    assert_eq!(code, keel_vmm::EXIT_ERROR, "{text}");
    assert!(
        text.contains(&format!("seccomp blocked system call {}", libc::SYS_execve)),
        "{text}"
    );
}

#[test]
fn an_unlisted_ioctl_is_blocked_by_its_request_number() {
    let (code, text) = in_filtered_child(|| {
        let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
        // SAFETY: TIOCGWINSZ fills a winsize we own (if it were allowed).
        unsafe { libc::ioctl(0, libc::TIOCGWINSZ, &mut ws) };
    });
    assert_eq!(code, keel_vmm::EXIT_ERROR, "{text}");
    assert!(
        text.contains(&format!("seccomp blocked system call {}", libc::SYS_ioctl)),
        "{text}"
    );
}
