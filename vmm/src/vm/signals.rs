//! SIGTERM, SIGINT and SIGHUP while the VM runs: blocked in every thread and read
//! through a signalfd by the main thread (see `Vm::run`).

use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use crate::error::{Error, Result};
use crate::os_error::os_message;

/// Blocks SIGTERM/SIGINT/SIGHUP (so vCPU threads spawned afterwards inherit the mask)
/// and reads them through a signalfd; restores the old mask when dropped.
pub(super) struct SignalGuard {
    fd: OwnedFd,
    old_mask: libc::sigset_t,
}

impl SignalGuard {
    pub(super) fn block_stop_signals() -> Result<Self> {
        // SAFETY: sigset_t is plain data, initialised by sigemptyset below.
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let mut old_mask: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: valid pointers to sigset_t; signal numbers are valid.
        unsafe {
            libc::sigemptyset(&mut set);
            for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
                libc::sigaddset(&mut set, sig);
            }
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut old_mask);
        }
        // SAFETY: valid sigset; -1 creates a new fd.
        let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK) };
        if fd < 0 {
            let e = std::io::Error::last_os_error();
            // SAFETY: restoring the mask saved above.
            unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old_mask, std::ptr::null_mut()) };
            return Err(Error::Io {
                what: "signalfd",
                reason: os_message(&e),
            });
        }
        // SAFETY: fd is a fresh descriptor we own.
        let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        Ok(SignalGuard { fd, old_mask })
    }

    pub(super) fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// The next pending signal number, if any.
    pub(super) fn read(&self) -> Option<u32> {
        // SAFETY: signalfd_siginfo is plain data.
        let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
        let size = std::mem::size_of::<libc::signalfd_siginfo>();
        // SAFETY: reading into a buffer of the right size.
        let n = unsafe { libc::read(self.fd(), (&mut info as *mut libc::signalfd_siginfo).cast(), size) };
        (n as usize == size).then_some(info.ssi_signo)
    }
}

impl Drop for SignalGuard {
    fn drop(&mut self) {
        // Signals that arrived after we stopped listening are dropped, not delivered
        // with their default action: drain the fd before unblocking.
        while self.read().is_some() {}
        // SAFETY: restoring the mask saved when blocking.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &self.old_mask, std::ptr::null_mut()) };
    }
}
