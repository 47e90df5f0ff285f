//! Shared by the supervisor/API integration tests: tiny guests assembled with
//! iced-x86 and wrapped as ELF kernels (the same scheme as keel-vmm's tests), and
//! a keel-init running in test mode under a temporary root, driven with keelctl.
//!
//! These tests need /dev/kvm and root; they fail loudly without them unless
//! KEEL_SKIP_KVM=1 is set by hand.
#![allow(dead_code)] // each test binary uses a different subset

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use iced_x86::code_asm::*;

/// Where the tiny kernels are linked and loaded (the ELF loader wants >= 1 MiB).
pub const LOAD_ADDR: u64 = 0x10_0000;
const COM1: u32 = 0x3f8;
const COM1_LSR: u32 = 0x3fd;

/// Panics unless /dev/kvm is usable and we are root; false (skip) only with
/// KEEL_SKIP_KVM=1 set by hand.
pub fn require_kvm_and_root() -> bool {
    if std::env::var("KEEL_SKIP_KVM").as_deref() == Ok("1") {
        eprintln!("KEEL_SKIP_KVM=1: skipping a test that needs /dev/kvm and root");
        return false;
    }
    if let Err(e) = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        panic!("this test needs /dev/kvm (read/write) and cannot open it: {e}. Set KEEL_SKIP_KVM=1 to skip by hand.");
    }
    if !nix::unistd::geteuid().is_root() {
        panic!("this test needs root (keel-init's API socket is root-only); run it as root");
    }
    true
}

fn assemble(a: CodeAssembler) -> Vec<u8> {
    let mut a = a;
    a.assemble(LOAD_ADDR).expect("test guest assembles")
}

fn print(a: &mut CodeAssembler, text: &[u8]) {
    a.mov(dx, COM1).unwrap();
    for &b in text {
        a.mov(al, b as u32).unwrap();
        a.out(dx, al).unwrap();
    }
}

/// Prints `.` forever, about one per 2000 port exits (~10 ms), so a paused guest
/// visibly stops counting.
pub fn counter_guest() -> Vec<u8> {
    let mut a = CodeAssembler::new(64).unwrap();
    print(&mut a, b"counting\n");
    let mut top = a.create_label();
    let mut delay = a.create_label();
    a.set_label(&mut top).unwrap();
    a.mov(dx, COM1).unwrap();
    a.mov(al, b'.' as u32).unwrap();
    a.out(dx, al).unwrap();
    a.mov(ecx, 2000u32).unwrap();
    a.set_label(&mut delay).unwrap();
    a.out(0x80, al).unwrap();
    a.dec(ecx).unwrap();
    a.jnz(delay).unwrap();
    a.jmp(top).unwrap();
    assemble(a)
}

/// Prints `ready>`, then answers each byte received on the serial port with
/// `got:<byte>` and a newline.
pub fn echo_guest() -> Vec<u8> {
    let mut a = CodeAssembler::new(64).unwrap();
    print(&mut a, b"ready>\n");
    let mut poll = a.create_label();
    a.set_label(&mut poll).unwrap();
    a.mov(dx, COM1_LSR).unwrap();
    a.in_(al, dx).unwrap();
    a.test(al, 1u32).unwrap();
    a.jz(poll).unwrap();
    a.mov(dx, COM1).unwrap();
    a.in_(al, dx).unwrap();
    a.mov(bl, al).unwrap();
    print(&mut a, b"got:");
    a.mov(al, bl).unwrap();
    a.out(dx, al).unwrap();
    a.mov(al, b'\n' as u32).unwrap();
    a.out(dx, al).unwrap();
    a.jmp(poll).unwrap();
    assemble(a)
}

/// Prints `boom`, then faults with an empty IDT: #UD → #DF → triple fault, which
/// keel-vmm reports as a reboot right after start.
pub fn triple_fault_guest() -> Vec<u8> {
    let mut a = CodeAssembler::new(64).unwrap();
    print(&mut a, b"boom\n");
    a.push(0).unwrap();
    a.push(0).unwrap();
    a.lidt(ptr(rsp)).unwrap();
    a.ud2().unwrap();
    assemble(a)
}

/// A minimal ELF64 executable: one PT_LOAD of `image` at LOAD_ADDR, entry at its start.
pub fn elf_kernel(image: &[u8]) -> Vec<u8> {
    const EHDR: usize = 64;
    const PHDR: usize = 56;
    const DATA_OFFSET: usize = 0x1000;
    let mut f = Vec::with_capacity(DATA_OFFSET + image.len());
    f.extend(b"\x7fELF");
    f.extend([2, 1, 1, 0]);
    f.extend([0u8; 8]);
    f.extend(2u16.to_le_bytes()); // ET_EXEC
    f.extend(0x3eu16.to_le_bytes()); // x86-64
    f.extend(1u32.to_le_bytes());
    f.extend(LOAD_ADDR.to_le_bytes()); // entry
    f.extend((EHDR as u64).to_le_bytes()); // e_phoff
    f.extend(0u64.to_le_bytes());
    f.extend(0u32.to_le_bytes());
    f.extend((EHDR as u16).to_le_bytes());
    f.extend((PHDR as u16).to_le_bytes());
    f.extend(1u16.to_le_bytes());
    f.extend(64u16.to_le_bytes());
    f.extend(0u16.to_le_bytes());
    f.extend(0u16.to_le_bytes());
    f.extend(1u32.to_le_bytes()); // PT_LOAD
    f.extend(7u32.to_le_bytes());
    f.extend((DATA_OFFSET as u64).to_le_bytes());
    f.extend(LOAD_ADDR.to_le_bytes());
    f.extend(LOAD_ADDR.to_le_bytes());
    f.extend((image.len() as u64).to_le_bytes());
    f.extend((image.len() as u64).to_le_bytes());
    f.extend(0x1000u64.to_le_bytes());
    f.resize(DATA_OFFSET, 0);
    f.extend(image);
    f
}

pub fn keelctl_bin() -> &'static str {
    env!("CARGO_BIN_EXE_keelctl")
}

/// keel-vmm, built by the same cargo invocation into the same directory
/// (`cargo nextest run --workspace` / `cargo build --workspace`).
pub fn vmm_bin() -> PathBuf {
    let dir = Path::new(env!("CARGO_BIN_EXE_keel-init")).parent().expect("target dir");
    let vmm = dir.join("keel-vmm");
    if !vmm.exists() {
        panic!(
            "{} not found: build it first (`cargo build -p keel-vmm`, or run the tests with --workspace)",
            vmm.display()
        );
    }
    vmm
}

/// A keel-init in test mode under a temporary root; SIGTERMed and waited for on drop.
pub struct Appliance {
    pub root: tempfile::TempDir,
    child: Option<Child>,
    pub socket: PathBuf,
}

impl Appliance {
    /// Writes each `(file, bytes)` into pool `images` and starts keel-init with `config`.
    pub fn start(config: &str, kernels: &[(&str, Vec<u8>)]) -> Appliance {
        Self::start_with(config, kernels, &[])
    }

    /// Like [`Appliance::start`], with extra files (path under the root, content)
    /// written first, e.g. an API token on KEEL-CONFIG.
    pub fn start_with(config: &str, kernels: &[(&str, Vec<u8>)], files: &[(&str, &[u8])]) -> Appliance {
        Self::start_with_vmm(config, kernels, files, |_| vmm_bin())
    }

    /// Like [`Appliance::start_with`], with the VMM program keel-init runs made by
    /// `vmm` from the temporary root (e.g. a wrapper script around [`vmm_bin`]).
    pub fn start_with_vmm(
        config: &str,
        kernels: &[(&str, Vec<u8>)],
        files: &[(&str, &[u8])],
        vmm: impl FnOnce(&Path) -> PathBuf,
    ) -> Appliance {
        let root = tempfile::tempdir().expect("temp root");
        let vmm = vmm(root.path());
        for (rel, bytes) in files {
            let p = root.path().join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, bytes).unwrap();
        }
        let pool = root.path().join("var/lib/keel/pools/images");
        std::fs::create_dir_all(&pool).unwrap();
        for (name, bytes) in kernels {
            std::fs::write(pool.join(name), bytes).unwrap();
        }
        let cfg = root.path().join("initial.yaml");
        std::fs::write(&cfg, config).unwrap();
        let log = std::fs::File::create(root.path().join("keel-init.log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_keel-init"))
            .args(["--test-mode", "--root"])
            .arg(root.path())
            .arg("--config")
            .arg(&cfg)
            .arg("--vmm")
            .arg(&vmm)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn keel-init");
        let socket = root.path().join("run/keel/api.sock");
        let mut app = Appliance {
            root,
            child: Some(child),
            socket,
        };
        let start = Instant::now();
        while !app.socket.exists() {
            if let Some(status) = app.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("keel-init exited early ({status}):\n{}", app.log());
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "the API socket did not appear:\n{}",
                app.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        app
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.root.path().join("keel-init.log")).unwrap_or_default()
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.root.path().join(rel)
    }

    /// Runs keelctl against this appliance.
    pub fn keelctl(&self, args: &[&str]) -> Output {
        Command::new(keelctl_bin())
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run keelctl")
    }

    /// Runs keelctl and panics (with both outputs and keel-init's log) unless it succeeds.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.keelctl(args);
        if !out.status.success() {
            panic!(
                "keelctl {args:?} failed ({}):\nstdout: {}\nstderr: {}\nkeel-init log:\n{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                self.log()
            );
        }
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `keelctl --json status NAME` as JSON.
    pub fn status(&self, name: &str) -> serde_json::Value {
        serde_json::from_str(&self.ok(&["--json", "status", name])).expect("status is JSON")
    }

    /// Polls `status` until `pred` holds; panics with the last status after `timeout`.
    pub fn wait_status(
        &self,
        name: &str,
        timeout: Duration,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let start = Instant::now();
        loop {
            let s = self.status(name);
            if pred(&s) {
                return s;
            }
            if start.elapsed() > timeout {
                panic!(
                    "guest {name} did not reach the expected state in {timeout:?}; last status: {s:#}\nkeel-init log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Appliance {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(40) {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub fn state(s: &serde_json::Value) -> &str {
    s["state"].as_str().unwrap_or("")
}
