//! The state seam end to end, on /dev/kvm: a running tiny guest is paused and its state
//! and memory saved; a fresh VM is restored from them; saving that one again gives the
//! same bytes; and the restored guest goes on counting where the first one stopped.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use iced_x86::code_asm::*;
use keel_vmm::persist::VmState;
use keel_vmm::{ExitReason, MemorySize, SerialOutput, Vm, VmConfig};

/// Guest-physical address of the guest's counter (below the kernel, in plain RAM).
const COUNTER_ADDR: u64 = 0x7000;
/// Spin iterations between two serial bytes: a few hundred bytes per second on PVM.
const DELAY: u32 = 2000;

/// Forever: count in memory, print the count's low byte on COM1, spin a while. The
/// count lives in RAM and the spin in registers, so continuing correctly needs both.
fn counter_guest() -> Vec<u8> {
    let mut a = asm64();
    serial_setup(&mut a);
    let mut top = a.create_label();
    let mut spin = a.create_label();
    a.set_label(&mut top).unwrap();
    a.mov(eax, dword_ptr(COUNTER_ADDR)).unwrap();
    a.inc(eax).unwrap();
    a.mov(dword_ptr(COUNTER_ADDR), eax).unwrap();
    a.out(dx, al).unwrap();
    a.mov(ecx, DELAY).unwrap();
    a.set_label(&mut spin).unwrap();
    a.dec(ecx).unwrap();
    a.jnz(spin).unwrap();
    a.jmp(top).unwrap();
    assemble(a, LOAD_ADDR)
}

fn config(kernel: &Path, serial: &Path, cpus: u8) -> VmConfig {
    let mut c = VmConfig::new(kernel);
    c.cpus = cpus;
    c.memory = MemorySize::mib(32);
    c.serial = SerialOutput::File(serial.to_owned());
    // The filter would apply to this whole test process.
    c.seccomp = false;
    c
}

/// Waits until `path` holds at least `n` bytes; returns them.
fn wait_for_output(path: &Path, n: usize) -> Vec<u8> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = std::fs::read(path).unwrap_or_default();
        if out.len() >= n {
            return out;
        }
        assert!(
            Instant::now() < deadline,
            "guest printed {} of {n} bytes in 60 s",
            out.len()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The JSON paths where two states differ (at most a few), for a readable failure.
fn differences(a: &serde_json::Value, b: &serde_json::Value, path: &str, out: &mut Vec<String>) {
    use serde_json::Value;
    if out.len() >= 8 {
        return;
    }
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            for (k, v) in x {
                match y.get(k) {
                    Some(w) => differences(v, w, &format!("{path}.{k}"), out),
                    None => out.push(format!("{path}.{k}: missing after restore")),
                }
            }
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => {
            for (i, (v, w)) in x.iter().zip(y).enumerate() {
                differences(v, w, &format!("{path}[{i}]"), out);
            }
        }
        _ if a != b => out.push(format!("{path}: {a} then {b}")),
        _ => {}
    }
}

fn save_restore_resave_and_continue(cpus: u8) {
    if !require_kvm() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let kernel = write_file(dir.path(), "vmlinux", &elf_kernel(&counter_guest(), LOAD_ADDR, 0));
    let (out_a, out_b) = (dir.path().join("a.out"), dir.path().join("b.out"));

    // A: boot, let it count, pause, save.
    let vm = Vm::build(&config(&kernel, &out_a, cpus), Instant::now()).unwrap();
    let handle = vm.state_handle();
    let running = std::thread::spawn(move || vm.run());
    wait_for_output(&out_a, 20);
    handle.pause().unwrap();
    let saved = handle.save().unwrap();
    let mut memory = Vec::new();
    handle.write_memory(&mut memory).unwrap();
    let bytes = saved.to_bytes().unwrap();
    let printed_a = std::fs::read(&out_a).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(std::fs::read(&out_a).unwrap(), printed_a, "a paused guest printed on");
    handle.stop();
    assert_eq!(running.join().unwrap().unwrap(), ExitReason::Killed);
    assert_eq!(saved.vcpus.len(), usize::from(cpus));
    assert!(
        saved.vcpus[0].msrs.len() > 5,
        "MSRs were saved: {:?}",
        saved.vcpus[0].msrs
    );

    // B: a fresh VM from the state; saved again before it runs, the same bytes.
    let state = VmState::from_bytes(&bytes).unwrap();
    let mut restored = Vm::restore(
        &config(&kernel, &out_b, cpus),
        Instant::now(),
        &state,
        &mut memory.as_slice(),
    )
    .unwrap();
    let again = restored.save_state().unwrap().to_bytes().unwrap();
    if again != bytes {
        let (a, b): (serde_json::Value, serde_json::Value) = (
            serde_json::from_slice(&bytes).unwrap(),
            serde_json::from_slice(&again).unwrap(),
        );
        let mut diffs = Vec::new();
        differences(&a, &b, "state", &mut diffs);
        panic!("the restored VM's state differs from the saved one: {diffs:#?}");
    }
    let mut memory_again = Vec::new();
    restored.write_memory(&mut memory_again).unwrap();
    assert!(memory_again == memory, "the restored VM's memory differs");

    // B runs: the count goes on from A's last byte, one by one.
    let handle = restored.state_handle();
    let running = std::thread::spawn(move || restored.run());
    let printed_b = wait_for_output(&out_b, 10);
    handle.stop();
    assert_eq!(running.join().unwrap().unwrap(), ExitReason::Killed);
    let last_a = *printed_a.last().unwrap();
    let expected: Vec<u8> = (1..=10u8).map(|i| last_a.wrapping_add(i)).collect();
    assert_eq!(
        &printed_b[..10],
        &expected[..],
        "the restored guest must go on from {last_a} (A printed {} bytes)",
        printed_a.len()
    );
}

#[test]
fn a_paused_guest_restored_into_a_fresh_vm_saves_the_same_and_goes_on() {
    save_restore_resave_and_continue(1);
}

#[test]
fn a_two_vcpu_vm_restores_both_vcpus() {
    // vCPU 1 never got a SIPI: it is restored waiting for one (its MP state), while
    // vCPU 0 counts on.
    save_restore_resave_and_continue(2);
}

#[test]
fn a_state_that_does_not_fit_the_config_is_refused_before_anything_runs() {
    if !require_kvm() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let kernel = write_file(dir.path(), "vmlinux", &elf_kernel(&counter_guest(), LOAD_ADDR, 0));
    let out = dir.path().join("a.out");
    let mut vm = Vm::build(&config(&kernel, &out, 1), Instant::now()).unwrap();
    let state = vm.save_state().unwrap();
    let mut memory = Vec::new();
    vm.write_memory(&mut memory).unwrap();

    let two = config(&kernel, &out, 2);
    let err = Vm::restore(&two, Instant::now(), &state, &mut memory.as_slice())
        .err()
        .expect("2 vCPUs from a 1-vCPU state");
    assert!(err.to_string().contains("vCPU"), "{err}");
    let mut bigger = config(&kernel, &out, 1);
    bigger.memory = MemorySize::mib(64);
    let err = Vm::restore(&bigger, Instant::now(), &state, &mut memory.as_slice())
        .err()
        .expect("64 MiB from a 32 MiB state");
    assert!(err.to_string().contains("guest memory"), "{err}");
    let err = Vm::restore(&config(&kernel, &out, 1), Instant::now(), &state, &mut &memory[..4096])
        .err()
        .expect("a memory image too short");
    assert!(err.to_string().contains("shorter"), "{err}");

    let mut json: serde_json::Value = serde_json::from_slice(&state.to_bytes().unwrap()).unwrap();
    json["format"] = 99.into();
    let err = VmState::from_bytes(&serde_json::to_vec(&json).unwrap()).unwrap_err();
    assert!(err.to_string().contains("format 99"), "{err}");
    let err = VmState::from_bytes(&vec![b' '; keel_vmm::persist::MAX_STATE_BYTES + 1]).unwrap_err();
    assert!(err.to_string().contains("at most"), "{err}");
}
