//! The device thread: one epoll loop that waits on every virtio device's queue
//! notifiers (ioeventfds) and backend fds (taps) and runs the device work they trigger,
//! so vCPU threads only ever touch registers.
//!
//! Own loop rather than rust-vmm's event-manager: the set of fds is fixed when the VM is
//! built (devices keep their fds for their whole life; reset only stops processing), so
//! all this needs is one epoll, a stop eventfd and a dispatch by index. Measured on the
//! block benchmark (`ci/bench`), an ioeventfd → completion round trip through this loop
//! costs a few microseconds, far below one request's I/O.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::bus::lock;
use crate::control::{ExitReason, VmControl};
use crate::virtio::mmio::MmioTransport;

/// Token of the stop eventfd; device sources are `device << 16 | source`.
const STOP_TOKEN: u64 = u64::MAX;

/// The loop before it runs: devices are added while the VM is built.
pub struct EventLoop {
    epoll: Epoll,
    devices: Vec<Arc<Mutex<MmioTransport>>>,
    stop: EventFd,
}

impl EventLoop {
    pub fn new() -> std::io::Result<Self> {
        let epoll = Epoll::new()?;
        let stop = EventFd::new(EFD_NONBLOCK)?;
        epoll.ctl(
            ControlOperation::Add,
            stop.as_raw_fd(),
            EpollEvent::new(EventSet::IN, STOP_TOKEN),
        )?;
        Ok(EventLoop {
            epoll,
            devices: Vec::new(),
            stop,
        })
    }

    /// Watches every event source of `device` from now on.
    pub fn add(&mut self, device: Arc<Mutex<MmioTransport>>) -> std::io::Result<()> {
        let index = self.devices.len() as u64;
        let sources = lock(&device).event_sources();
        for (i, (fd, events)) in sources.into_iter().enumerate() {
            let set = EventSet::from_bits_truncate(events);
            self.epoll
                .ctl(ControlOperation::Add, fd, EpollEvent::new(set, index << 16 | i as u64))?;
        }
        self.devices.push(device);
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.devices.is_empty()
    }

    /// Starts the loop thread; the returned handle stops and joins it. A panic on the
    /// thread (a device bug) ends the VM through `control` instead of leaving its
    /// devices dead.
    pub fn spawn(self, control: Arc<VmControl>) -> std::io::Result<EventLoopThread> {
        let stop = self.stop.try_clone()?;
        let handle = std::thread::Builder::new().name("devices".into()).spawn(move || {
            let _guard = PanicGuard(control);
            self.run()
        })?;
        Ok(EventLoopThread {
            stop,
            handle: Some(handle),
        })
    }

    /// Runs until the stop eventfd fires. Also usable inline (tests, benchmarks).
    pub fn run(self) {
        let mut events = vec![EpollEvent::default(); 64];
        loop {
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!("device event loop: epoll_wait: {e}");
                    return;
                }
            };
            for ev in &events[..n] {
                let token = ev.data();
                if token == STOP_TOKEN {
                    return;
                }
                self.dispatch(token, ev.events());
            }
        }
    }

    /// Runs one round: waits up to `timeout_ms` and handles what arrived. Returns the
    /// number of events handled, or None once stop was requested.
    pub fn run_once(&self, timeout_ms: i32) -> Option<usize> {
        let mut events = vec![EpollEvent::default(); 64];
        let n = self.epoll.wait(timeout_ms, &mut events).unwrap_or(0);
        for ev in &events[..n] {
            if ev.data() == STOP_TOKEN {
                return None;
            }
            self.dispatch(ev.data(), ev.events());
        }
        Some(n)
    }

    fn dispatch(&self, token: u64, events: u32) {
        let device = (token >> 16) as usize;
        let source = (token & 0xffff) as usize;
        if let Some(dev) = self.devices.get(device) {
            lock(dev).handle_event(source, events);
        }
    }

    pub fn stop_fd(&self) -> RawFd {
        self.stop.as_raw_fd()
    }
}

struct PanicGuard(Arc<VmControl>);

impl Drop for PanicGuard {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0
                .request_exit(ExitReason::Error("the device thread panicked".into()));
        }
    }
}

/// The running loop thread.
pub struct EventLoopThread {
    stop: EventFd,
    handle: Option<JoinHandle<()>>,
}

impl EventLoopThread {
    /// Stops the loop and waits for it.
    pub fn stop(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        let _ = self.stop.write(1);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

impl Drop for EventLoopThread {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::BusDevice;
    use crate::devices::IrqLine;
    use crate::virtio::Interrupt;
    use crate::virtio::driver::{Buf, SplitRing};
    use crate::virtio::rng::Rng;
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    /// The runtime path without KVM: a queue notification on the ioeventfd is served on
    /// the loop thread and answered through the interrupt eventfd (the irqfd).
    #[test]
    fn notification_is_served_on_the_loop_thread_and_interrupts() {
        let mem: crate::memory::GuestMemory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let mut ring = SplitRing::new(&mem, 0x1_0000, 8);
        let line = IrqLine::new(5).unwrap();
        let irq = line.eventfd().try_clone().unwrap();
        let t = Arc::new(Mutex::new(
            MmioTransport::new(Box::<Rng>::default(), mem.clone(), Interrupt::new(line)).unwrap(),
        ));
        let w = |reg: u64, v: u32| lock(&t).write(reg, &v.to_le_bytes());
        for (reg, v) in [
            (0x70, 1),
            (0x70, 3),
            (0x24, 1),
            (0x20, 1),
            (0x70, 0xb),
            (0x30, 0),
            (0x38, 8),
        ] {
            w(reg, v);
        }
        w(0x80, ring.desc as u32);
        w(0x90, ring.avail as u32);
        w(0xa0, ring.used as u32);
        w(0x44, 1);
        w(0x70, 0xf);
        let notify = lock(&t).queue_evts()[0].try_clone().unwrap();
        let mut event_loop = EventLoop::new().unwrap();
        event_loop.add(t.clone()).unwrap();
        let thread = event_loop.spawn(Arc::new(VmControl::new().unwrap())).unwrap();

        ring.add_chain(&mem, &[Buf::w(0x8_0000, 32)]);
        notify.write(1).unwrap();
        let mut pfd = libc::pollfd {
            fd: irq.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        assert_eq!(unsafe { libc::poll(&mut pfd, 1, 5000) }, 1, "interrupt within 5 s");
        assert_eq!(ring.take_used(&mem), vec![(0, 32)]);
        let mut status = [0u8; 4];
        lock(&t).read(0x60, &mut status);
        assert_eq!(u32::from_le_bytes(status), 1, "used-ring interrupt pending");
        thread.stop();
    }
}
