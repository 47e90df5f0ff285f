//! Several vCPUs: the guest's BSP wakes the APs with INIT/SIPI through the in-kernel
//! LAPIC; each AP reports the APIC ID that its CPUID gives it.

mod common;

use std::time::Duration;

use common::*;
use iced_x86::code_asm::*;

/// Real-mode AP entry: SIPI vector 0x10 starts it at 0x1000:0000.
const TRAMPOLINE: u64 = 0x1_0000;
const SIPI_VECTOR: u32 = (TRAMPOLINE >> 12) as u32;
/// A byte the APs increment (DS = 0x1000, so [0x100] is 0x10100).
const COUNTER: u64 = TRAMPOLINE + 0x100;
/// Where the trampoline sits in the kernel image before the BSP copies it down.
const TRAMPOLINE_IMAGE_OFFSET: u64 = 0x1000;
const LAPIC_SVR: u64 = 0xfee0_00f0;
const LAPIC_ICR_LOW: u64 = 0xfee0_0300;
/// ICR: all excluding self, level assert; INIT = 0x500, startup = 0x600.
const ICR_INIT_ALL_BUT_SELF: u32 = 0x000c_4500;
const ICR_SIPI_ALL_BUT_SELF: u32 = 0x000c_4600 | SIPI_VECTOR;

/// Prints '0' + (CPUID.1:EBX[31:24]); DX is reloaded since CPUID clobbers EDX.
fn print_apic_id(a: &mut CodeAssembler) {
    a.mov(eax, 1u32).unwrap();
    a.cpuid().unwrap();
    a.shr(ebx, 24u32).unwrap();
    a.mov(al, bl).unwrap();
    a.add(al, b'0' as u32).unwrap();
    a.mov(dx, COM1 as u32).unwrap();
    a.out(dx, al).unwrap();
}

fn trampoline() -> Vec<u8> {
    let mut a = CodeAssembler::new(16).unwrap();
    a.cli().unwrap();
    a.mov(ax, (TRAMPOLINE >> 4) as u32).unwrap();
    a.mov(ds, ax).unwrap();
    print_apic_id(&mut a);
    a.lock().inc(byte_ptr(0x100)).unwrap();
    halt_forever(&mut a);
    a.assemble(0).unwrap()
}

fn smp_guest(aps: u8) -> Vec<u8> {
    let tramp = trampoline();
    let mut a = asm64();
    serial_setup(&mut a);
    print(&mut a, b"[");
    print_apic_id(&mut a);
    // Copy the trampoline below 1 MiB.
    a.mov(rsi, LOAD_ADDR + TRAMPOLINE_IMAGE_OFFSET).unwrap();
    a.mov(rdi, TRAMPOLINE).unwrap();
    a.mov(ecx, tramp.len() as u32).unwrap();
    a.cld().unwrap();
    a.rep().movsb().unwrap();
    // Software-enable the LAPIC, then INIT + SIPI to all other CPUs.
    a.mov(rdi, LAPIC_SVR).unwrap();
    a.mov(dword_ptr(rdi), 0x1ffu32).unwrap();
    a.mov(rdi, LAPIC_ICR_LOW).unwrap();
    a.mov(dword_ptr(rdi), ICR_INIT_ALL_BUT_SELF).unwrap();
    a.mov(dword_ptr(rdi), ICR_SIPI_ALL_BUT_SELF).unwrap();
    a.mov(dword_ptr(rdi), ICR_SIPI_ALL_BUT_SELF).unwrap();
    // Wait until every AP has reported.
    let mut wait = a.create_label();
    a.mov(rsi, COUNTER).unwrap();
    a.set_label(&mut wait).unwrap();
    a.pause().unwrap();
    a.cmp(byte_ptr(rsi), aps as u32).unwrap();
    a.jb(wait).unwrap();
    serial_setup(&mut a);
    print(&mut a, b"]\n");
    i8042_reset(&mut a);
    let mut image = assemble(a, LOAD_ADDR);
    assert!(image.len() <= TRAMPOLINE_IMAGE_OFFSET as usize);
    image.resize(TRAMPOLINE_IMAGE_OFFSET as usize, 0xf4);
    image.extend(tramp);
    image
}

#[test]
fn four_vcpus_each_report_their_apic_id() {
    if !require_kvm() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let kernel = write_file(dir.path(), "vmlinux", &elf_kernel(&smp_guest(3), LOAD_ADDR, 0));
    let run = run_vmm(
        &["--kernel", kernel.to_str().unwrap(), "--cpus", "4", "--memory", "64MiB"],
        Duration::from_secs(60),
    );
    let out = run.stdout_text();
    assert_eq!(run.code(), Some(3), "stdout: {out:?} stderr: {}", run.stderr);
    let inner = out
        .strip_prefix("[0")
        .and_then(|s| s.strip_suffix("]\n"))
        .unwrap_or_else(|| panic!("BSP reports first as 0: {out:?}"));
    let mut ids: Vec<char> = inner.chars().collect();
    ids.sort();
    assert_eq!(ids, vec!['1', '2', '3'], "every AP once: {out:?}");
}
