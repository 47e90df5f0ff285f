//! The VMM's seccomp filter: once a VM is built, keel-vmm needs a few dozen system calls,
//! and a guest that breaks out of a device model should find only those.
//!
//! [`install`] runs at the start of [`crate::Vm::run`], on the main thread, before any
//! other thread exists; every thread the VMM then starts (device loop, vCPUs, serial
//! input, control socket) inherits it. Setup — opening the kernel, disks and taps,
//! creating the VM and its vCPUs — is over by then, so `execve`, `open` of devices,
//! `connect`, `ptrace`, `mount`, network sockets and most ioctls are simply not there.
//!
//! What stays, and why (the list below says it per call):
//! - `ioctl` only for KVM_RUN, the two register reads that report a vCPU failure,
//!   TUNSETOFFLOAD (the guest's virtio-net driver chooses offloads at run time), FIONBIO
//!   and the terminal's TCGETS/TCSETS;
//! - `socket` only for AF_UNIX (the control socket is bound once the vCPUs run);
//! - `clone` only with CLONE_THREAD; `clone3`, whose flags a filter cannot see, fails
//!   with ENOSYS, and glibc then falls back to `clone`;
//! - `tgkill` only within this process (the vCPU kick), `prctl` only for PR_SET_NAME
//!   (thread names);
//! - `openat`, `getdents64` and `statx` for `/proc/self` (the control socket's stats) and,
//!   in dynamically linked test builds, glibc loading libgcc_s when a thread ends.
//!
//! Anything else raises SIGSYS; the handler writes one line naming the call and ends the
//! VMM with the VMM-error exit code, like any other VMM failure. (Were SIGSYS blocked at
//! that moment, the kernel would end the process by the signal itself, without the line;
//! the VMM never blocks it.) `--no-seccomp` (or
//! `"seccomp": false`) runs without the filter, to tell a missing entry from a real bug.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule, TargetArch,
};

/// Why the filter could not be installed.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("building the seccomp filter: {0}")]
    Build(String),
    #[error("installing the seccomp filter: {0}")]
    Install(String),
    #[error("installing the SIGSYS handler: {0}")]
    Handler(String),
}

// ioctl request numbers (<asm-generic/ioctl.h>: dir << 30 | size << 16 | type << 8 | nr).
const fn ioc(dir: u64, kind: u64, nr: u64, size: usize) -> u64 {
    dir << 30 | (size as u64) << 16 | kind << 8 | nr
}
const IOC_READ: u64 = 2;
const KVMIO: u64 = 0xAE;
const KVM_RUN: u64 = ioc(0, KVMIO, 0x80, 0);
const KVM_GET_REGS: u64 = ioc(IOC_READ, KVMIO, 0x81, size_of::<kvm_bindings::kvm_regs>());
const KVM_GET_SREGS: u64 = ioc(IOC_READ, KVMIO, 0x83, size_of::<kvm_bindings::kvm_sregs>());
const TCGETS: u64 = 0x5401;
const TCSETS: u64 = 0x5402;
const FIONBIO: u64 = 0x5421;

/// The ioctls the VMM makes after setup.
const IOCTLS: &[(u64, &str)] = &[
    (KVM_RUN, "vCPU threads"),
    (KVM_GET_REGS, "registers of a failed vCPU, for its error"),
    (KVM_GET_SREGS, "registers of a failed vCPU, for its error"),
    (
        crate::virtio::tap::TUNSETOFFLOAD,
        "offloads the guest's virtio-net driver chose",
    ),
    (TCGETS, "is stdin a terminal; its mode before raw"),
    (TCSETS, "terminal to raw mode and back"),
    (FIONBIO, "control socket (non-blocking accept, blocking clients)"),
];

/// System calls allowed whatever their arguments, with the reason each is needed.
const ALLOWED: &[(i64, &str)] = &[
    // Memory: the allocator, thread stacks, guard pages.
    (libc::SYS_brk, "allocator"),
    (libc::SYS_mmap, "allocator, thread stacks, O_DIRECT bounce buffers"),
    (libc::SYS_munmap, "allocator, teardown"),
    (libc::SYS_mremap, "allocator"),
    (libc::SYS_mprotect, "thread stack guard pages"),
    (libc::SYS_madvise, "allocator"),
    // Threads and their synchronisation.
    (libc::SYS_futex, "mutexes, condvars, joins"),
    (libc::SYS_set_robust_list, "new threads"),
    (libc::SYS_rseq, "new threads"),
    (libc::SYS_sched_getaffinity, "std's thread setup"),
    (libc::SYS_sched_yield, "spin loops in locks"),
    (libc::SYS_gettid, "kick signals, logging"),
    (libc::SYS_getpid, "kick signals"),
    (libc::SYS_exit, "a thread ends"),
    (libc::SYS_exit_group, "the VMM ends"),
    (libc::SYS_restart_syscall, "a call interrupted by the kick signal"),
    // Signals: the vCPU kick, SIGTERM/SIGINT through a signalfd, alternate stacks.
    (libc::SYS_rt_sigaction, "kick and SIGSYS handlers"),
    (libc::SYS_rt_sigprocmask, "stop signals blocked for the signalfd"),
    (libc::SYS_rt_sigreturn, "return from the kick handler"),
    (libc::SYS_sigaltstack, "std's stack-overflow handler per thread"),
    (libc::SYS_signalfd4, "stop signals"),
    // Time.
    (libc::SYS_clock_gettime, "timestamps where the vDSO cannot serve them"),
    (libc::SYS_clock_nanosleep, "sleeps"),
    (libc::SYS_nanosleep, "sleeps"),
    // File descriptors: disks, taps, eventfds, sockets, the console.
    (libc::SYS_read, "eventfds, taps, signalfd, stdin, sockets"),
    (libc::SYS_write, "eventfds (irqfd), taps, serial output, logs"),
    (libc::SYS_readv, "tap receive"),
    (libc::SYS_writev, "tap transmit"),
    (libc::SYS_pread64, "virtio-blk"),
    (libc::SYS_pwrite64, "virtio-blk"),
    (libc::SYS_preadv, "virtio-blk"),
    (libc::SYS_pwritev, "virtio-blk"),
    (libc::SYS_preadv2, "virtio-blk"),
    (libc::SYS_pwritev2, "virtio-blk"),
    (libc::SYS_lseek, "std's file reads"),
    (libc::SYS_fdatasync, "virtio-blk FLUSH"),
    (libc::SYS_fsync, "virtio-blk FLUSH"),
    (
        libc::SYS_fallocate,
        "virtio-blk DISCARD and WRITE_ZEROES (punching holes)",
    ),
    (libc::SYS_close, "closing fds"),
    (libc::SYS_fcntl, "dup with CLOEXEC, fd flags"),
    (libc::SYS_eventfd2, "stop events of the device and input threads"),
    (libc::SYS_epoll_wait, "device thread"),
    (libc::SYS_epoll_pwait, "device thread"),
    (libc::SYS_epoll_ctl, "device thread (tap back-pressure)"),
    (libc::SYS_poll, "exit wait, serial input, control socket"),
    (libc::SYS_ppoll, "exit wait, serial input, control socket"),
    (libc::SYS_getrandom, "virtio-rng, hash maps"),
    // The control socket (AF_UNIX only, see socket below).
    (libc::SYS_bind, "control socket"),
    (libc::SYS_listen, "control socket"),
    (libc::SYS_accept4, "control socket"),
    (libc::SYS_recvfrom, "control socket"),
    (libc::SYS_sendto, "control socket"),
    (libc::SYS_setsockopt, "control socket client timeout"),
    (libc::SYS_getsockopt, "control socket errors"),
    (libc::SYS_shutdown, "control socket"),
    (libc::SYS_chmod, "control socket mode 0600"),
    (libc::SYS_unlink, "control socket path, stale and at exit"),
    (libc::SYS_unlinkat, "control socket path, stale and at exit"),
    // /proc/self for the control socket's stats (and glibc's libgcc_s, dynamic builds).
    (libc::SYS_openat, "/proc/self/statm and /proc/self/task/*/stat"),
    (libc::SYS_getdents64, "/proc/self/task"),
    (libc::SYS_statx, "std's file reads"),
    (libc::SYS_newfstatat, "std's file reads"),
    (libc::SYS_fstat, "std's file reads"),
];

fn cond(arg: u8, len: SeccompCmpArgLen, op: SeccompCmpOp, value: u64) -> Result<SeccompCondition, SeccompError> {
    SeccompCondition::new(arg, len, op, value).map_err(|e| SeccompError::Build(e.to_string()))
}

fn rule(conditions: Vec<SeccompCondition>) -> Result<SeccompRule, SeccompError> {
    SeccompRule::new(conditions).map_err(|e| SeccompError::Build(e.to_string()))
}

fn compile(
    rules: BTreeMap<i64, Vec<SeccompRule>>,
    mismatch: SeccompAction,
    matched: SeccompAction,
) -> Result<BpfProgram, SeccompError> {
    SeccompFilter::new(rules, mismatch, matched, TargetArch::x86_64)
        .and_then(BpfProgram::try_from)
        .map_err(|e| SeccompError::Build(e.to_string()))
}

/// The allowlist: [`ALLOWED`] unconditionally, plus the calls allowed only with the
/// arguments the VMM uses. Anything else traps.
pub fn allowlist() -> Result<BpfProgram, SeccompError> {
    use SeccompCmpArgLen::{Dword, Qword};
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = ALLOWED.iter().map(|&(nr, _)| (nr, Vec::new())).collect();
    // The kernel reads the request as an unsigned int: compare the low 32 bits only.
    let ioctls = IOCTLS
        .iter()
        .map(|&(request, _)| rule(vec![cond(1, Dword, SeccompCmpOp::Eq, request)?]))
        .collect::<Result<_, _>>()?;
    rules.insert(libc::SYS_ioctl, ioctls);
    rules.insert(
        libc::SYS_socket,
        vec![rule(vec![cond(0, Dword, SeccompCmpOp::Eq, libc::AF_UNIX as u64)?])?],
    );
    let thread = libc::CLONE_THREAD as u64;
    rules.insert(
        libc::SYS_clone,
        vec![rule(vec![cond(0, Qword, SeccompCmpOp::MaskedEq(thread), thread)?])?],
    );
    // clone3 is answered ENOSYS by the second filter; it must pass this one to get there.
    rules.insert(libc::SYS_clone3, Vec::new());
    // std names each thread it starts (vcpu0, devices, ...) from inside the thread.
    rules.insert(
        libc::SYS_prctl,
        vec![rule(vec![cond(0, Dword, SeccompCmpOp::Eq, libc::PR_SET_NAME as u64)?])?],
    );
    // SAFETY: getpid has no preconditions.
    let pid = unsafe { libc::getpid() } as u64;
    rules.insert(
        libc::SYS_tgkill,
        vec![rule(vec![cond(0, Dword, SeccompCmpOp::Eq, pid)?])?],
    );
    compile(rules, SeccompAction::Trap, SeccompAction::Allow)
}

/// `clone3` → ENOSYS, everything else allowed (the allowlist decides).
fn clone3_enosys() -> Result<BpfProgram, SeccompError> {
    let rules = BTreeMap::from([(libc::SYS_clone3, Vec::new())]);
    compile(rules, SeccompAction::Allow, SeccompAction::Errno(libc::ENOSYS as u32))
}

/// Installs both filters on the calling thread (and so on every thread it starts later)
/// and the SIGSYS handler that reports a blocked call. Irreversible for this process.
pub fn install() -> Result<(), SeccompError> {
    let t = std::time::Instant::now();
    let allowlist = allowlist()?;
    let clone3 = clone3_enosys()?;
    let compiled = t.elapsed();
    install_sigsys_handler()?;
    // The clone3 filter first: once the allowlist is in, `seccomp` itself is not allowed.
    seccompiler::apply_filter(&clone3).map_err(|e| SeccompError::Install(e.to_string()))?;
    seccompiler::apply_filter(&allowlist).map_err(|e| SeccompError::Install(e.to_string()))?;
    tracing::debug!(
        "seccomp filter ({} BPF instructions) compiled in {compiled:?}, installed in {:?}",
        allowlist.len() + clone3.len(),
        t.elapsed() - compiled
    );
    Ok(())
}

/// The handler only calls async-signal-safe functions (write, _exit) on stack data.
fn install_sigsys_handler() -> Result<(), SeccompError> {
    vmm_sys_util::signal::register_signal_handler(libc::SIGSYS, on_sigsys)
        .map_err(|e| SeccompError::Handler(crate::os_error::errno_message(&e)))
}

/// The blocked call's number from a SIGSYS siginfo: `_sigsys._syscall`, after the three
/// ints of the header, the padding and the call address (offset 24 on x86_64).
const SIGSYS_SYSCALL_OFFSET: usize = 24;

extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers; for SIGSYS from
    // seccomp the field at this offset is the system call number.
    let nr = unsafe {
        info.cast::<u8>()
            .add(SIGSYS_SYSCALL_OFFSET)
            .cast::<i32>()
            .read_unaligned()
    };
    let mut digits = [0u8; 12];
    let mut line = [0u8; 160];
    let mut len = 0;
    for part in [
        &b"keel-vmm: error: seccomp blocked system call "[..],
        format_decimal(nr, &mut digits),
        b" (a call keel-vmm's filter does not list; --no-seccomp runs without it)\n",
    ] {
        line[len..len + part.len()].copy_from_slice(part);
        len += part.len();
    }
    // SAFETY: write and _exit are async-signal-safe; `line` outlives the call.
    unsafe {
        libc::write(2, line.as_ptr().cast(), len);
        libc::_exit(crate::EXIT_ERROR);
    }
}

/// Formats `n` into `buf` without allocating (signal handler).
fn format_decimal(n: i32, buf: &mut [u8; 12]) -> &[u8] {
    let mut v = i64::from(n).unsigned_abs();
    let mut at = buf.len();
    loop {
        at -= 1;
        buf[at] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    if n < 0 {
        at -= 1;
        buf[at] = b'-';
    }
    &buf[at..]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_kernel_headers() {
        // Values from <linux/kvm.h> on x86_64 (struct kvm_regs is 144 bytes, kvm_sregs 312).
        assert_eq!(KVM_RUN, 0xae80);
        assert_eq!(KVM_GET_REGS, 0x8090_ae81);
        assert_eq!(KVM_GET_SREGS, 0x8138_ae83);
    }

    #[test]
    fn decimal_formatting_without_allocation() {
        assert_eq!(format_decimal(0, &mut [0; 12]), b"0");
        assert_eq!(format_decimal(41, &mut [0; 12]), b"41");
        assert_eq!(format_decimal(-2147483648, &mut [0; 12]), b"-2147483648");
    }

    #[test]
    fn both_filters_compile() {
        assert!(!allowlist().unwrap().is_empty());
        assert!(!clone3_enosys().unwrap().is_empty());
    }
}
