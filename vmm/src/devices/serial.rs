//! The 8250/16550 UART at 0x3f8 (COM1, IRQ 4), emulated by vm-superio.
//!
//! Output goes to stdout, a file, a unix socket or nowhere. Input comes from stdin when
//! it is a terminal (put in raw mode for the VM's lifetime, `Ctrl-A x` stops the VM) or
//! from the unix socket. Every guest byte is several exits, so the output path is one
//! unbuffered `write` per byte and nothing else.
//!
//! Saved state ([`SerialState`]) is vm-superio's register file and receive FIFO: what
//! the guest's driver sees. The output sink and the input thread belong to the VMM
//! process and are set up again by whoever restores.

use std::fs::OpenOptions;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use vm_superio::Serial;
use vm_superio::serial::NoEvents;

use crate::bus::{BusDevice, lock};
use crate::config::SerialOutput;
use crate::control::{ExitReason, VmControl};
use crate::devices::IrqLine;
use crate::error::Error;
use crate::os_error::os_message;
use crate::state_error::StateError;

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

/// Size of vm-superio's receive FIFO (its `FIFO_SIZE`, which it does not export):
/// a saved state holding more is refused before vm-superio sees it.
const FIFO_SIZE: usize = 64;

/// The UART's interrupt line as vm-superio's trigger. Shared (`Arc`) because
/// vm-superio has no way to hand its trigger back: a restore builds a new `Serial`
/// around the same line, which must stay the eventfd KVM was given.
///
/// Raising never fails as far as vm-superio knows: an eventfd write fails only when its
/// counter would overflow, which cannot happen while KVM drains it, so a failure is
/// logged (as the other devices do) rather than reported as an output error.
#[derive(Clone)]
struct SerialIrq(Arc<IrqLine>);

impl vm_superio::Trigger for SerialIrq {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        if let Err(e) = self.0.pulse() {
            tracing::warn!("serial: cannot raise IRQ {}: {e}", self.0.gsi());
        }
        Ok(())
    }
}

/// The UART as a bus device.
pub struct SerialDevice {
    uart: Serial<SerialIrq, NoEvents, SerialSink>,
    /// Output errors are reported once, then bytes are dropped: the guest must never
    /// block on a console nobody reads.
    output_failed: bool,
}

/// The UART's guest-visible state: vm-superio's `SerialState` field for field (it has
/// no serde), converted both ways. Registers are carried as they are: every value is
/// one the guest could have written or the UART could have reached, and vm-superio
/// only tests their bits. The FIFO is bounded by [`SerialDevice::restore`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialState {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    /// Received bytes the guest has not read yet, oldest first.
    pub in_buffer: Vec<u8>,
}

impl From<vm_superio::SerialState> for SerialState {
    fn from(s: vm_superio::SerialState) -> Self {
        SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

impl From<&SerialState> for vm_superio::SerialState {
    fn from(s: &SerialState) -> Self {
        vm_superio::SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

impl SerialDevice {
    pub fn new(irq: IrqLine, sink: SerialSink) -> Self {
        SerialDevice {
            uart: Serial::new(SerialIrq(Arc::new(irq)), sink),
            output_failed: false,
        }
    }

    pub fn irq(&self) -> &IrqLine {
        &self.uart.interrupt_evt().0
    }

    pub fn state(&self) -> SerialState {
        self.uart.state().into()
    }

    /// Puts the registers and the receive FIFO back, keeping this device's interrupt
    /// line and sink. vm-superio raises the interrupt again if one was pending (an
    /// enabled "data ready" or "transmitter empty" condition), so a guest saved between
    /// the interrupt and its handler still gets it.
    pub fn restore(&mut self, state: &SerialState) -> Result<(), StateError> {
        if state.in_buffer.len() > FIFO_SIZE {
            return Err(StateError::Invalid {
                what: "serial",
                reason: format!(
                    "{} bytes in the receive FIFO, which holds {FIFO_SIZE}",
                    state.in_buffer.len()
                ),
            });
        }
        // vm-superio builds a restored UART only from owned parts: take the sink out,
        // leaving a UART that writes nowhere for the moment in between.
        let irq = self.uart.interrupt_evt().clone();
        let placeholder = Serial::new(irq.clone(), SerialSink::None);
        let sink = std::mem::replace(&mut self.uart, placeholder).into_writer();
        // from_state fails only on an over-full FIFO (refused above) or a failing
        // trigger (ours never fails), so the sink cannot be lost here.
        self.uart = Serial::from_state(&state.into(), irq, NoEvents, sink).map_err(|e| StateError::Invalid {
            what: "serial",
            reason: e.to_string(),
        })?;
        Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    // 8250 register offsets.
    const DATA: u64 = 0;
    const IER: u64 = 1;
    const IIR: u64 = 2;
    const LCR: u64 = 3;
    const MCR: u64 = 4;
    const LSR: u64 = 5;
    const SCR: u64 = 7;
    const LCR_DLAB: u8 = 0x80;
    const LSR_DATA_READY: u8 = 0x01;
    const IIR_RDA: u8 = 0x04;

    fn device() -> SerialDevice {
        SerialDevice::new(IrqLine::new(COM1_IRQ).unwrap(), SerialSink::None)
    }
    fn out(d: &mut SerialDevice, offset: u64, v: u8) {
        d.write(offset, &[v]);
    }
    fn inb(d: &mut SerialDevice, offset: u64) -> u8 {
        let mut b = [0u8];
        d.read(offset, &mut b);
        b[0]
    }

    /// A UART as Linux's 8250 driver leaves it, with two received bytes unread.
    fn configured() -> SerialDevice {
        let mut d = device();
        out(&mut d, LCR, LCR_DLAB);
        out(&mut d, DATA, 0x0c); // 9600 baud
        out(&mut d, IER, 0x00);
        out(&mut d, LCR, 0x03); // 8N1
        out(&mut d, IER, 0x01); // receive interrupt
        out(&mut d, MCR, 0x0b);
        out(&mut d, SCR, 0x5a);
        assert_eq!(d.enqueue_input(b"hi"), 2);
        d
    }

    #[test]
    fn fifo_size_is_vm_superios() {
        assert_eq!(device().uart.fifo_capacity(), FIFO_SIZE);
    }

    #[test]
    fn restored_uart_reads_back_registers_and_pending_input() {
        let saved = configured().state();
        let mut d = device();
        d.restore(&saved).unwrap();
        assert_eq!(
            d.irq().eventfd().read().unwrap(),
            1,
            "the pending receive interrupt is raised again"
        );
        assert_eq!(inb(&mut d, LCR), 0x03);
        assert_eq!(inb(&mut d, IER), 0x01);
        assert_eq!(inb(&mut d, MCR), 0x0b);
        assert_eq!(inb(&mut d, SCR), 0x5a);
        assert_eq!(inb(&mut d, IIR) & 0x0f, IIR_RDA);
        assert_eq!(inb(&mut d, LSR) & LSR_DATA_READY, LSR_DATA_READY);
        assert_eq!([inb(&mut d, DATA), inb(&mut d, DATA)], *b"hi");
        assert_eq!(inb(&mut d, LSR) & LSR_DATA_READY, 0, "FIFO drained");
        out(&mut d, LCR, 0x03 | LCR_DLAB);
        assert_eq!((inb(&mut d, DATA), inb(&mut d, IER)), (0x0c, 0x00), "divisor latch");
        assert_eq!(d.state().in_buffer, Vec::<u8>::new());
    }

    #[test]
    fn restore_keeps_the_sink() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console");
        let file = OpenOptions::new().create(true).append(true).open(&path).unwrap();
        let mut d = SerialDevice::new(IrqLine::new(COM1_IRQ).unwrap(), SerialSink::File(file));
        out(&mut d, DATA, b'a');
        d.restore(&configured().state()).unwrap();
        out(&mut d, DATA, b'b');
        assert_eq!(std::fs::read(&path).unwrap(), b"ab");
    }

    #[test]
    fn state_round_trips_through_json() {
        let saved = configured().state();
        let json = serde_json::to_string(&saved).unwrap();
        assert_eq!(serde_json::from_str::<SerialState>(&json).unwrap(), saved);
        // Restoring and saving again gives the same state.
        let mut d = device();
        d.restore(&saved).unwrap();
        assert_eq!(d.state(), saved);
    }

    #[test]
    fn overfull_fifo_is_refused_and_the_device_kept() {
        let mut saved = configured().state();
        saved.in_buffer = vec![b'x'; FIFO_SIZE + 1];
        let mut d = configured();
        let before = d.state();
        assert!(matches!(
            d.restore(&saved),
            Err(StateError::Invalid { what: "serial", .. })
        ));
        assert_eq!(d.state(), before);
    }
}
