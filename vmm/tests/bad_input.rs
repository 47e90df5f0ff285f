//! Bad input never panics: each case exits non-zero with one line naming the problem.

mod common;

use std::time::Duration;

use common::*;

const TIMEOUT: Duration = Duration::from_secs(30);

/// Runs keel-vmm and checks for exit code 1 and exactly one error line containing
/// every `expected` fragment.
fn expect_error(args: &[&str], expected: &[&str]) {
    let run = run_vmm(args, TIMEOUT);
    let lines: Vec<&str> = run.stderr.lines().collect();
    assert_eq!(run.code(), Some(1), "args {args:?}: stderr {:?}", run.stderr);
    assert_eq!(lines.len(), 1, "one line for {args:?}: {:?}", run.stderr);
    assert!(lines[0].starts_with("keel-vmm: error: "), "{:?}", lines[0]);
    for fragment in expected {
        assert!(lines[0].contains(fragment), "{:?} lacks {fragment:?}", lines[0]);
    }
    assert!(!run.stderr.contains("panicked"));
    assert!(run.stdout.is_empty(), "no guest output: {:?}", run.stdout_text());
}

fn good_elf(dir: &std::path::Path) -> String {
    write_file(dir, "vmlinux", &elf_kernel(&hello_guest(b"hi"), LOAD_ADDR, 0))
        .to_string_lossy()
        .into_owned()
}

#[test]
fn missing_kernel() {
    expect_error(
        &["--kernel", "/nonexistent"],
        &["kernel /nonexistent: No such file or directory"],
    );
}

#[test]
fn kernel_is_a_directory() {
    let dir = tempfile::tempdir().unwrap();
    expect_error(
        &["--kernel", dir.path().to_str().unwrap()],
        &["kernel ", "not a regular file"],
    );
}

#[test]
fn garbage_and_empty_kernels() {
    let dir = tempfile::tempdir().unwrap();
    let garbage: Vec<u8> = (0..8192u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let path = write_file(dir.path(), "garbage", &garbage);
    expect_error(&["--kernel", path.to_str().unwrap()], &["garbage", "not a kernel"]);
    let empty = write_file(dir.path(), "empty", b"");
    expect_error(&["--kernel", empty.to_str().unwrap()], &["file is empty"]);
}

#[test]
fn truncated_elf_kernels() {
    let dir = tempfile::tempdir().unwrap();
    let full = elf_kernel(&hello_guest(b"hi"), LOAD_ADDR, 0);
    let header_only = write_file(dir.path(), "head", &full[..40]);
    expect_error(&["--kernel", header_only.to_str().unwrap()], &["invalid ELF image"]);
    let no_segment = write_file(dir.path(), "noseg", &full[..0x1000 + 4]);
    expect_error(&["--kernel", no_segment.to_str().unwrap()], &["truncated"]);
}

#[test]
fn bad_bzimages() {
    let dir = tempfile::tempdir().unwrap();
    let pm = vec![0xf4u8; 0x400];
    let old = write_file(dir.path(), "old", &bzimage(&pm, 0x0205, 1));
    expect_error(&["--kernel", old.to_str().unwrap()], &["boot protocol 2.05 is too old"]);
    let no64 = write_file(dir.path(), "no64", &bzimage(&pm, 0x020f, 0));
    expect_error(&["--kernel", no64.to_str().unwrap()], &["no 64-bit entry"]);
    let truncated = write_file(dir.path(), "trunc", &bzimage(&pm, 0x020f, 1)[..0x300]);
    expect_error(&["--kernel", truncated.to_str().unwrap()], &["truncated bzImage"]);
}

#[test]
fn initrd_larger_than_memory() {
    let dir = tempfile::tempdir().unwrap();
    let kernel = good_elf(dir.path());
    let initrd = dir.path().join("big-initrd");
    let f = std::fs::File::create(&initrd).unwrap();
    f.set_len(17 << 20).unwrap(); // sparse: costs no disk
    expect_error(
        &[
            "--kernel",
            &kernel,
            "--initrd",
            initrd.to_str().unwrap(),
            "--memory",
            "16MiB",
        ],
        &["initrd ", "do not fit", "give the guest more memory"],
    );
}

#[test]
fn missing_initrd() {
    let dir = tempfile::tempdir().unwrap();
    let kernel = good_elf(dir.path());
    expect_error(
        &["--kernel", &kernel, "--initrd", "/nonexistent-initrd"],
        &["initrd /nonexistent-initrd: No such file or directory"],
    );
}

#[test]
fn memory_below_minimum() {
    let dir = tempfile::tempdir().unwrap();
    let kernel = good_elf(dir.path());
    expect_error(
        &["--kernel", &kernel, "--memory", "15MiB"],
        &["memory 15MiB is below the minimum of 16 MiB"],
    );
}

#[test]
fn vcpu_count_out_of_range() {
    let dir = tempfile::tempdir().unwrap();
    let kernel = good_elf(dir.path());
    expect_error(
        &["--kernel", &kernel, "--cpus", "0"],
        &["cpus 0 is out of range: use 1 to 32"],
    );
    expect_error(&["--kernel", &kernel, "--cpus", "33"], &["cpus 33 is out of range"]);
}

#[test]
fn bad_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_file(dir.path(), "vm.json", br#"{"kernel": "/k", "cpu": 2}"#);
    expect_error(
        &["--config", cfg.to_str().unwrap()],
        &["config ", "unknown field `cpu`"],
    );
}

#[test]
fn usage_errors_exit_2() {
    for args in [
        &[][..],
        &["--kernel", "/k", "--memory", "lots"][..],
        &["--kernel", "/k", "--serial", "tcp:1"][..],
        &["--kernel", "/k", "--cpus", "-1"][..],
    ] {
        let run = run_vmm(args, TIMEOUT);
        assert_eq!(run.code(), Some(2), "{args:?}: {}", run.stderr);
        assert!(!run.stderr.contains("panicked"));
    }
}

#[test]
fn help_documents_exit_codes_and_examples() {
    let run = run_vmm(&["--help"], TIMEOUT);
    assert_eq!(run.code(), Some(0));
    let help = run.stdout_text();
    for needle in [
        "Exit codes:",
        "3  the guest asked to reboot",
        "Examples:",
        "--boot-timer",
    ] {
        assert!(help.contains(needle), "--help lacks {needle:?}");
    }
}

/// Hides /dev/kvm in a private mount namespace (needs root and util-linux's unshare).
#[test]
fn no_dev_kvm_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let kernel = good_elf(dir.path());
    let out = std::process::Command::new("unshare")
        .args([
            "--mount",
            "--",
            "sh",
            "-c",
            "mount -t tmpfs none /dev && exec \"$0\" --kernel \"$1\" --memory 32MiB",
        ])
        .arg(vmm_bin())
        .arg(&kernel)
        .output()
        .unwrap_or_else(|e| panic!("this test needs util-linux's unshare: {e}"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("unshare:") && !stderr.contains("mount:"),
        "this test needs root to hide /dev/kvm in a mount namespace: {stderr}"
    );
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("cannot open /dev/kvm: No such file or directory"),
        "{stderr}"
    );
}
