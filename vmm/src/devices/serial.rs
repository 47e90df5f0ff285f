//! The 8250/16550 UART at 0x3f8 (COM1, IRQ 4), emulated by vm-superio.
//!
//! Output goes to stdout, a file, a unix socket or nowhere. Input comes from stdin when
//! it is a terminal (put in raw mode for the VM's lifetime, `Ctrl-A x` stops the VM) or
//! from the unix socket. Every guest byte is several exits, so the output path is one
//! unbuffered `write` per byte and nothing else.

use std::fs::OpenOptions;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use vm_superio::Serial;

use crate::bus::{BusDevice, lock};
use crate::config::SerialOutput;
use crate::control::{ExitReason, VmControl};
use crate::devices::IrqLine;
use crate::error::Error;
use crate::os_error::os_message;

pub const COM1_PORT: u64 = 0x3f8;
pub const COM1_LEN: u64 = 8;
pub const COM1_IRQ: u32 = 4;

/// Where the UART's transmitted bytes go.
pub enum SerialSink {
    Stdout,
    File(std::fs::File),
    Unix(UnixStream),
    None,
}

impl Write for SerialSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            // Straight to fd 1: std's Stdout is line-buffered behind a lock, and a guest
            // prompt without a newline must show up immediately.
            SerialSink::Stdout => raw_write(libc::STDOUT_FILENO, buf),
            SerialSink::File(f) => f.write(buf),
            SerialSink::Unix(s) => s.write(buf),
            SerialSink::None => Ok(buf.len()),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn raw_write(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: writing from a valid slice to a file descriptor.
    let n = unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// The UART as a bus device.
pub struct SerialDevice {
    uart: Serial<IrqLine, vm_superio::serial::NoEvents, SerialSink>,
    /// Output errors are reported once, then bytes are dropped: the guest must never
    /// block on a console nobody reads.
    output_failed: bool,
}

impl SerialDevice {
    pub fn new(irq: IrqLine, sink: SerialSink) -> Self {
        SerialDevice {
            uart: Serial::new(irq, sink),
            output_failed: false,
        }
    }

    pub fn irq(&self) -> &IrqLine {
        self.uart.interrupt_evt()
    }

    /// Queues input bytes for the guest; returns how many fit in the receive FIFO.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        self.uart.enqueue_raw_bytes(bytes).unwrap_or(0)
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let Some(first) = data.first_mut() {
            *first = self.uart.read(offset as u8);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        if let Err(e) = self.uart.write(offset as u8, value)
            && !self.output_failed
        {
            self.output_failed = true;
            tracing::warn!("serial output failed, dropping further errors: {e}");
        }
    }
}

/// Opens the configured output. `Unix` connects to a listening socket owned by the
/// supervisor, so no output is lost before someone attaches.
pub fn open_sink(target: &SerialOutput) -> Result<SerialSink, Error> {
    let fail = |e: io::Error| Error::Serial {
        target: target.to_string(),
        reason: os_message(&e),
    };
    Ok(match target {
        SerialOutput::Stdio => SerialSink::Stdout,
        SerialOutput::None => SerialSink::None,
        SerialOutput::File(path) => {
            SerialSink::File(OpenOptions::new().create(true).append(true).open(path).map_err(fail)?)
        }
        SerialOutput::Unix(path) => {
            // Blocks only while the listener's backlog is full (the supervisor accepts
            // at once); said first so a hang here names what it waits for.
            tracing::debug!("connecting the serial console to {}", path.display());
            SerialSink::Unix(UnixStream::connect(path).map_err(fail)?)
        }
    })
}

/// Puts a terminal in raw mode and restores it when dropped (also on unwinding).
pub struct RawTerminal {
    fd: RawFd,
    saved: libc::termios,
}

impl RawTerminal {
    pub fn enable(fd: RawFd) -> io::Result<Self> {
        // SAFETY: termios is plain data; tcgetattr fills it for a valid fd.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: valid fd and pointer.
        if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let mut raw = saved;
        // SAFETY: valid pointer to an initialised termios.
        unsafe { libc::cfmakeraw(&mut raw) };
        // Keep output processing so the VMM's own log lines still start at column 0.
        raw.c_oflag = saved.c_oflag;
        // SAFETY: valid fd and pointer.
        if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(RawTerminal { fd, saved })
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        // SAFETY: restoring the attributes read in `enable` on the same fd.
        unsafe { libc::tcsetattr(self.fd, libc::TCSANOW, &self.saved) };
    }
}

/// True when fd is a terminal.
pub fn is_terminal(fd: RawFd) -> bool {
    // SAFETY: isatty only inspects the fd.
    unsafe { libc::isatty(fd) == 1 }
}

/// Byte that starts the console escape (Ctrl-A), as in QEMU.
const ESCAPE: u8 = 0x01;

/// Forwards bytes from `fd` into the UART until the VM stops or the fd closes.
/// On a terminal `Ctrl-A x` stops the VM hard and `Ctrl-A Ctrl-A` sends one Ctrl-A.
pub fn spawn_input_thread(
    fd: RawFd,
    is_tty: bool,
    stop: vmm_sys_util::eventfd::EventFd,
    serial: Arc<Mutex<SerialDevice>>,
    control: Arc<VmControl>,
) -> io::Result<JoinHandle<()>> {
    std::thread::Builder::new().name("serial-in".into()).spawn(move || {
        let mut buf = [0u8; 64];
        let mut escape_pending = false;
        while !control.is_stopping() {
            // `stop` becomes readable at teardown.
            let mut fds = [
                libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: stop.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: two valid pollfds.
            let ready = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
            if ready < 0 || fds[1].revents != 0 {
                if ready < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return;
            }
            if fds[0].revents == 0 {
                continue;
            }
            // SAFETY: reading into a valid buffer.
            let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                return; // EOF or error: the guest simply gets no more input.
            }
            let mut bytes: Vec<u8> = Vec::with_capacity(n as usize);
            for &b in &buf[..n as usize] {
                if is_tty && escape_pending {
                    escape_pending = false;
                    match b {
                        b'x' | b'X' => {
                            control.request_exit(ExitReason::Killed);
                            return;
                        }
                        ESCAPE => bytes.push(ESCAPE),
                        other => bytes.extend([ESCAPE, other]),
                    }
                } else if is_tty && b == ESCAPE {
                    escape_pending = true;
                } else {
                    bytes.push(b);
                }
            }
            let mut rest = &bytes[..];
            while !rest.is_empty() && !control.is_stopping() {
                let taken = lock(&serial).enqueue_input(rest);
                rest = &rest[taken..];
                if !rest.is_empty() {
                    // FIFO full: the guest has not drained it yet.
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
        }
    })
}
