//! Shared helpers for keel-vmm's integration tests: tiny guests assembled with iced-x86,
//! wrapped as ELF or bzImage kernels, and a runner for the `keel-vmm` binary.
//!
//! These guests run on `/dev/kvm`, which on the development machines is PVM: guest code
//! is emulated at ~1.7 M instructions/s, so guests stay tens to hundreds of
//! instructions long.
#![allow(dead_code)] // each test binary uses a different subset

pub mod virtio_guest;

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use iced_x86::code_asm::*;

/// Where the tiny kernels are linked and loaded (the ELF loader wants >= 1 MiB).
pub const LOAD_ADDR: u64 = 0x10_0000;
/// Offset of boot_params fields the guests read (Linux boot protocol).
pub const BP_RAMDISK_IMAGE: i32 = 0x218;
pub const BP_RAMDISK_SIZE: i32 = 0x21c;
pub const BP_CMD_LINE_PTR: i32 = 0x228;
pub const COM1: u16 = 0x3f8;
pub const BOOT_TIMER_PORT: u16 = 0x3f0;

/// Panics with a clear message when /dev/kvm is unusable, unless KEEL_SKIP_KVM=1 (then
/// returns false and the caller returns early, visibly skipping).
pub fn require_kvm() -> bool {
    if std::env::var("KEEL_SKIP_KVM").as_deref() == Ok("1") {
        eprintln!("KEEL_SKIP_KVM=1: skipping a test that needs /dev/kvm");
        return false;
    }
    if let Err(e) = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        panic!(
            "this test needs /dev/kvm (read/write) and cannot open it: {e}. \
             Run on a KVM-capable machine, or set KEEL_SKIP_KVM=1 to skip by hand."
        );
    }
    true
}

/// A 64-bit assembler whose code will run at `LOAD_ADDR + offset`.
pub fn asm64() -> CodeAssembler {
    CodeAssembler::new(64).expect("64-bit assembler")
}

pub fn assemble(mut a: CodeAssembler, ip: u64) -> Vec<u8> {
    a.assemble(ip).expect("test guest assembles")
}

/// `out COM1, byte` for each byte of `text` (DX must hold COM1; see `serial_setup`).
pub fn print(a: &mut CodeAssembler, text: &[u8]) {
    for &b in text {
        a.mov(al, b as u32).unwrap();
        a.out(dx, al).unwrap();
    }
}

/// Points DX at COM1.
pub fn serial_setup(a: &mut CodeAssembler) {
    a.mov(dx, COM1 as u32).unwrap();
}

/// Writes the boot-timer magic (clobbers AL/DX, leaves DX at COM1).
pub fn boot_timer(a: &mut CodeAssembler) {
    a.mov(dx, BOOT_TIMER_PORT as u32).unwrap();
    a.mov(al, 123u32).unwrap();
    a.out(dx, al).unwrap();
    serial_setup(a);
}

/// Pulses the CPU reset line through the i8042 (what Linux does with `reboot=k`), then
/// halts in case the reset is ignored.
pub fn i8042_reset(a: &mut CodeAssembler) {
    a.mov(al, 0xfeu32).unwrap();
    a.out(0x64, al).unwrap();
    halt_forever(a);
}

/// cli; hlt in a loop: with an in-kernel LAPIC this blocks in KVM forever.
pub fn halt_forever(a: &mut CodeAssembler) {
    let mut top = a.create_label();
    a.set_label(&mut top).unwrap();
    a.cli().unwrap();
    a.hlt().unwrap();
    a.jmp(top).unwrap();
}

/// Prints the NUL-terminated string whose 32-bit address is at [rbx + field]
/// (RBX = boot_params). Clobbers RSI, AL.
pub fn print_cstr_at(a: &mut CodeAssembler, field: i32) {
    let mut top = a.create_label();
    let mut done = a.create_label();
    a.mov(esi, dword_ptr(rbx + field)).unwrap();
    a.set_label(&mut top).unwrap();
    a.mov(al, byte_ptr(rsi)).unwrap();
    a.test(al, al).unwrap();
    a.jz(done).unwrap();
    a.out(dx, al).unwrap();
    a.inc(rsi).unwrap();
    a.jmp(top).unwrap();
    a.set_label(&mut done).unwrap();
    a.nop().unwrap();
}

/// Prints the initrd (address and size from boot_params at RBX). Clobbers RSI, RCX, AL.
pub fn print_initrd(a: &mut CodeAssembler) {
    let mut top = a.create_label();
    let mut done = a.create_label();
    a.mov(esi, dword_ptr(rbx + BP_RAMDISK_IMAGE)).unwrap();
    a.mov(ecx, dword_ptr(rbx + BP_RAMDISK_SIZE)).unwrap();
    a.set_label(&mut top).unwrap();
    a.test(ecx, ecx).unwrap();
    a.jz(done).unwrap();
    a.mov(al, byte_ptr(rsi)).unwrap();
    a.out(dx, al).unwrap();
    a.inc(rsi).unwrap();
    a.dec(ecx).unwrap();
    a.jmp(top).unwrap();
    a.set_label(&mut done).unwrap();
    a.nop().unwrap();
}

/// A minimal ELF64 executable: one PT_LOAD of `image` at physical `addr`, entry at
/// `addr` + `entry_offset`.
pub fn elf_kernel(image: &[u8], addr: u64, entry_offset: u64) -> Vec<u8> {
    const EHDR: usize = 64;
    const PHDR: usize = 56;
    const DATA_OFFSET: usize = 0x1000;
    let mut f = Vec::with_capacity(DATA_OFFSET + image.len());
    f.extend(b"\x7fELF");
    f.extend([2, 1, 1, 0]); // 64-bit, little endian, version 1, SysV ABI
    f.extend([0u8; 8]);
    f.extend(2u16.to_le_bytes()); // ET_EXEC
    f.extend(0x3eu16.to_le_bytes()); // x86-64
    f.extend(1u32.to_le_bytes());
    f.extend((addr + entry_offset).to_le_bytes());
    f.extend((EHDR as u64).to_le_bytes()); // e_phoff
    f.extend(0u64.to_le_bytes()); // e_shoff
    f.extend(0u32.to_le_bytes()); // e_flags
    f.extend((EHDR as u16).to_le_bytes());
    f.extend((PHDR as u16).to_le_bytes());
    f.extend(1u16.to_le_bytes()); // e_phnum
    f.extend(64u16.to_le_bytes()); // e_shentsize
    f.extend(0u16.to_le_bytes()); // e_shnum
    f.extend(0u16.to_le_bytes()); // e_shstrndx
    assert_eq!(f.len(), EHDR);
    f.extend(1u32.to_le_bytes()); // PT_LOAD
    f.extend(7u32.to_le_bytes()); // RWX
    f.extend((DATA_OFFSET as u64).to_le_bytes());
    f.extend(addr.to_le_bytes()); // vaddr
    f.extend(addr.to_le_bytes()); // paddr
    f.extend((image.len() as u64).to_le_bytes());
    f.extend((image.len() as u64).to_le_bytes());
    f.extend(0x1000u64.to_le_bytes());
    f.resize(DATA_OFFSET, 0);
    f.extend(image);
    f
}

/// A bzImage with a boot protocol 2.15 setup header whose protected-mode part is `pm`
/// (loaded at 1 MiB; the 64-bit entry is `pm[0x200..]`).
pub fn bzimage(pm: &[u8], version: u16, xloadflags: u16) -> Vec<u8> {
    const SETUP_SECTS: u8 = 1;
    let setup_len = (SETUP_SECTS as usize + 1) * 512;
    let mut f = vec![0u8; setup_len];
    let put = |f: &mut Vec<u8>, off: usize, bytes: &[u8]| {
        f[off..off + bytes.len()].copy_from_slice(bytes);
    };
    put(&mut f, 0x1f1, &[SETUP_SECTS]);
    put(&mut f, 0x1f4, &((pm.len() as u32).div_ceil(16)).to_le_bytes()); // syssize
    put(&mut f, 0x1fe, &0xaa55u16.to_le_bytes());
    put(&mut f, 0x200, &[0xeb, 0x66]); // jmp over the header, as real ones do
    put(&mut f, 0x202, b"HdrS");
    put(&mut f, 0x206, &version.to_le_bytes());
    put(&mut f, 0x211, &[0x01]); // loadflags: LOADED_HIGH
    put(&mut f, 0x214, &(LOAD_ADDR as u32).to_le_bytes()); // code32_start
    put(&mut f, 0x22c, &0x7fff_ffffu32.to_le_bytes()); // initrd_addr_max
    put(&mut f, 0x230, &0x20_0000u32.to_le_bytes()); // kernel_alignment
    put(&mut f, 0x236, &xloadflags.to_le_bytes());
    put(&mut f, 0x238, &2047u32.to_le_bytes()); // cmdline_size
    put(&mut f, 0x260, &((pm.len() as u32 + 0xfff) & !0xfff).to_le_bytes()); // init_size
    f.extend(pm);
    f
}

/// Writes `bytes` to a fresh file in `dir`.
pub fn write_file(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).expect("write test file");
    path
}

pub fn vmm_bin() -> &'static str {
    env!("CARGO_BIN_EXE_keel-vmm")
}

/// Result of one keel-vmm run.
#[derive(Debug)]
pub struct Run {
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Run {
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }
    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
}

/// Runs keel-vmm with `args`, stdin from /dev/null, killing it after `timeout`.
pub fn run_vmm(args: &[&str], timeout: Duration) -> Run {
    run_vmm_env(args, &[], timeout)
}

/// `run_vmm` with environment variables set for the VMM (e.g. RUST_LOG).
pub fn run_vmm_env(args: &[&str], env: &[(&str, &str)], timeout: Duration) -> Run {
    let child = Command::new(vmm_bin())
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn keel-vmm");
    wait_with_timeout(child, timeout)
}

/// Collects output while waiting; panics (after killing it) if the VMM overruns.
pub fn wait_with_timeout(mut child: Child, timeout: Duration) -> Run {
    let start = Instant::now();
    let mut out_pipe = child.stdout.take().expect("stdout piped");
    let mut err_pipe = child.stderr.take().expect("stderr piped");
    let out_reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out_pipe.read_to_end(&mut v);
        v
    });
    let err_reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err_pipe.read_to_end(&mut v);
        v
    });
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for keel-vmm") {
            break status;
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            let out = out_reader.join().unwrap_or_default();
            let err = err_reader.join().unwrap_or_default();
            panic!(
                "keel-vmm did not exit within {timeout:?}\nstdout: {}\nstderr: {}",
                String::from_utf8_lossy(&out),
                String::from_utf8_lossy(&err)
            );
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    let elapsed = start.elapsed();
    Run {
        status,
        stdout: out_reader.join().unwrap_or_default(),
        stderr: String::from_utf8_lossy(&err_reader.join().unwrap_or_default()).into_owned(),
        elapsed,
    }
}

/// A guest that prints `text`, writes the boot timer, and resets through the i8042.
pub fn hello_guest(text: &[u8]) -> Vec<u8> {
    let mut a = asm64();
    serial_setup(&mut a);
    print(&mut a, text);
    boot_timer(&mut a);
    i8042_reset(&mut a);
    assemble(a, LOAD_ADDR)
}

/// Reads stderr until the boot-timer line; keeps draining it afterwards in a thread.
pub fn wait_for_boot_timer(child: &mut Child) -> String {
    let stderr = child.stderr.take().expect("stderr piped");
    let mut reader = BufReader::new(stderr);
    let mut line = String::new();
    loop {
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => panic!("keel-vmm ended without a boot-timer line"),
            Ok(_) if line.contains("boot-timer: guest ready") => break,
            Ok(_) => {}
        }
    }
    std::thread::spawn(move || std::io::copy(&mut reader, &mut std::io::sink()));
    line.trim_end().to_string()
}
