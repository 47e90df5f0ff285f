//! Boots tiny guests through the `keel-vmm` binary on /dev/kvm: ELF and bzImage paths,
//! command line and initrd delivery, the boot timer, reset and exit codes.

mod common;

use std::time::Duration;

use common::*;
use iced_x86::code_asm::*;

const TIMEOUT: Duration = Duration::from_secs(60);

#[test]
fn elf_guest_prints_and_reset_exits_with_reboot_code() {
    if !require_kvm() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let kernel = write_file(
        dir.path(),
        "vmlinux",
        &elf_kernel(&hello_guest(b"hello from elf\n"), LOAD_ADDR, 0),
    );
    let run = run_vmm(&["--kernel", kernel.to_str().unwrap(), "--memory", "32MiB"], TIMEOUT);
    assert_eq!(run.stdout_text(), "hello from elf\n", "stderr: {}", run.stderr);
    assert_eq!(run.code(), Some(3), "reboot exit code; stderr: {}", run.stderr);
    assert!(
        !run.stderr.contains("boot-timer"),
        "boot timer is off without --boot-timer: {}",
        run.stderr
    );
}

#[test]
fn boot_timer_line_is_logged() {
    if !require_kvm() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let kernel = write_file(dir.path(), "vmlinux", &elf_kernel(&hello_guest(b"x"), LOAD_ADDR, 0));
    let run = run_vmm(
        &[
            "--kernel",
            kernel.to_str().unwrap(),
            "--memory",
            "128MiB",
            "--boot-timer",
        ],
        TIMEOUT,
    );
    assert_eq!(run.code(), Some(3), "stderr: {}", run.stderr);
    let line = run
        .stderr
        .lines()
        .find(|l| l.contains("boot-timer: guest ready"))
        .unwrap_or_else(|| panic!("no boot-timer line in: {}", run.stderr));
    let us: u64 = line
        .split("guest ready ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no number in {line}"));
    assert!(
        us > 0 && us < run.elapsed.as_micros() as u64,
        "{us} us vs {:?}",
        run.elapsed
    );
    assert!(line.ends_with("us after VMM start"), "{line}");
}

/// The guest reads boot_params (RSI at entry): it prints the command line and the
/// initrd contents, which only arrive if the loader put them where the header says.
fn boot_params_echo_guest() -> Vec<u8> {
    let mut a = asm64();
    a.mov(rbx, rsi).unwrap();
    serial_setup(&mut a);
    print(&mut a, b"cmdline=");
    print_cstr_at(&mut a, BP_CMD_LINE_PTR);
    print(&mut a, b"\ninitrd=");
    print_initrd(&mut a);
    print(&mut a, b"\n");
    i8042_reset(&mut a);
    // The 64-bit entry of a bzImage is 0x200 into the protected-mode code.
    let code = assemble(a, LOAD_ADDR + 0x200);
    let mut pm = vec![0xf4u8; 0x200]; // hlt: nothing should run from here
    pm.extend(code);
    pm
}

#[test]
fn bzimage_guest_sees_cmdline_and_initrd() {
    if !require_kvm() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let kernel = write_file(dir.path(), "bzImage", &bzimage(&boot_params_echo_guest(), 0x020f, 1));
    let initrd = write_file(dir.path(), "initrd", b"INITRD-CONTENTS");
    let run = run_vmm(
        &[
            "--kernel",
            kernel.to_str().unwrap(),
            "--initrd",
            initrd.to_str().unwrap(),
            "--cmdline",
            "console=ttyS0 keel.test=1",
            "--memory",
            "64MiB",
        ],
        TIMEOUT,
    );
    assert_eq!(
        run.stdout_text(),
        "cmdline=console=ttyS0 keel.test=1\ninitrd=INITRD-CONTENTS\n",
        "stderr: {}",
        run.stderr
    );
    assert_eq!(run.code(), Some(3), "stderr: {}", run.stderr);
}

#[test]
fn elf_guest_with_config_file_and_file_serial() {
    if !require_kvm() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let kernel = write_file(
        dir.path(),
        "vmlinux",
        &elf_kernel(&hello_guest(b"to a file\n"), LOAD_ADDR, 0),
    );
    let log = dir.path().join("console.log");
    let config = serde_json::json!({
        "kernel": kernel,
        "memory": "48MiB",
        "serial": format!("file:{}", log.display()),
    });
    let config_path = write_file(dir.path(), "vm.json", config.to_string().as_bytes());
    let run = run_vmm(&["--config", config_path.to_str().unwrap()], TIMEOUT);
    assert_eq!(run.code(), Some(3), "stderr: {}", run.stderr);
    assert!(run.stdout.is_empty(), "console went to the file, not stdout");
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "to a file\n");
}

#[test]
fn guest_larger_than_3gib_boots_across_the_mmio_gap() {
    if !require_kvm() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let kernel = write_file(dir.path(), "vmlinux", &elf_kernel(&hello_guest(b"big\n"), LOAD_ADDR, 0));
    let initrd = write_file(dir.path(), "initrd", b"I");
    let run = run_vmm(
        &[
            "--kernel",
            kernel.to_str().unwrap(),
            "--initrd",
            initrd.to_str().unwrap(),
            "--memory",
            "5GiB",
        ],
        TIMEOUT,
    );
    assert_eq!(run.stdout_text(), "big\n", "stderr: {}", run.stderr);
    assert_eq!(run.code(), Some(3), "stderr: {}", run.stderr);
}

#[test]
fn rust_log_sets_the_level_and_a_bad_one_is_said_and_ignored() {
    if !require_kvm() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let kernel = write_file(dir.path(), "vmlinux", &elf_kernel(&hello_guest(b""), LOAD_ADDR, 0));
    let run_with = |level: &str| {
        let run = run_vmm_env(
            &["--kernel", kernel.to_str().unwrap(), "--boot-timer", "--serial", "none"],
            &[("RUST_LOG", level)],
            TIMEOUT,
        );
        assert_eq!(run.code(), Some(3), "RUST_LOG={level}: {}", run.stderr);
        run.stderr
    };
    let debug = run_with("debug");
    assert!(
        debug.contains("DEBUG") && debug.contains("boot-timer: guest ready"),
        "{debug}"
    );
    let warn = run_with("warn");
    assert!(!warn.contains("boot-timer") && !warn.contains("INFO"), "{warn}");
    let bogus = run_with("keel_vmm=debug");
    assert!(bogus.contains("RUST_LOG=\"keel_vmm=debug\" is not a level"), "{bogus}");
    assert!(
        bogus.contains("boot-timer: guest ready") && !bogus.contains("DEBUG"),
        "{bogus}"
    );
}
