//! The per-VM control socket (`keel-vmm --api-socket PATH`): how keel-init's
//! supervisor pauses, resumes, stops and measures one running VM.
//!
//! # Protocol
//!
//! A unix stream socket; each request is one line of JSON, answered by one line of
//! JSON, any number per connection:
//!
//! | request | effect | answer |
//! |---|---|---|
//! | `{"op":"ping"}` | none (the VM is built and running) | `{"ok":true}` |
//! | `{"op":"pause"}` | every vCPU leaves the guest and waits | `{"ok":true}` once all are parked |
//! | `{"op":"resume"}` | the vCPUs go back into the guest | `{"ok":true}` |
//! | `{"op":"power-button"}` | a graceful stop: the ACPI power button when the guest's OS listens to it, else Ctrl-Alt-Del; the guest ending in any way now counts as stopped | `{"ok":true}` |
//! | `{"op":"ctrl-alt-del"}` | just the key combination (Linux reboots on it) | `{"ok":true}` |
//! | `{"op":"stop"}` | hard stop, now (exit code 4) | `{"ok":true}` |
//! | `{"op":"stats"}` | none | `{"ok":true,"stats":{...}}`, see [`Stats`] |
//!
//! Errors are `{"ok":false,"error":"..."}`. The socket is created mode 0600: only
//! its owner (root, on the appliance) may connect.
//!
//! # Device statistics
//!
//! `stats` reports the vCPU threads' CPU time, the process's RSS and every device's
//! counters from the registry in [`crate::device_counters`]. Pause and resume are
//! [`crate::cpu::pause`]'s; this module is the wire server only.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::bus::lock;
use crate::control::{ExitReason, VmControl};
use crate::cpu::pause::ControlState;
use crate::device_counters::device_stats;
use crate::devices::acpi_pm::AcpiPm;
use crate::devices::i8042::I8042;

/// A client that sends nothing for this long is dropped, so one stuck client
/// cannot block the socket.
const CLIENT_IDLE_TIMEOUT: Duration = Duration::from_secs(10);

pub use keel_vmm_api::control::{DeviceKind, DeviceStats, Request, Response, Stats, VcpuStats};

/// The listening control socket and its thread; removes the socket file when dropped.
pub struct ControlServer {
    path: PathBuf,
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

/// What request handling acts on.
pub struct Targets {
    pub state: Arc<ControlState>,
    pub control: Arc<VmControl>,
    pub i8042: Arc<Mutex<I8042>>,
    pub acpi_pm: Arc<Mutex<AcpiPm>>,
}

impl ControlServer {
    /// Binds `path` (replacing a stale socket file) with mode 0600 and serves it on
    /// a thread.
    pub fn start(path: &Path, targets: Targets) -> std::io::Result<ControlServer> {
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let listener = UnixListener::bind(path)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        listener.set_nonblocking(true)?;
        let stop = EventFd::new(EFD_NONBLOCK)?;
        let thread_stop = stop.try_clone()?;
        let thread = std::thread::Builder::new()
            .name("control-socket".into())
            .spawn(move || serve(listener, thread_stop, targets))?;
        Ok(ControlServer {
            path: path.to_path_buf(),
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn serve(listener: UnixListener, stop: EventFd, targets: Targets) {
    loop {
        let mut fds = [
            libc::pollfd {
                fd: listener.as_raw_fd(),
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
        if ready < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            tracing::warn!("control socket: poll failed: {}", std::io::Error::last_os_error());
            return;
        }
        if fds[1].revents != 0 {
            return;
        }
        match listener.accept() {
            Ok((stream, _)) => {
                if let Err(e) = handle_client(stream, &targets) {
                    tracing::debug!("control socket client: {e}");
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => tracing::warn!("control socket: accept failed: {e}"),
        }
    }
}

/// Answers a client's requests one line at a time until it hangs up.
fn handle_client(stream: UnixStream, t: &Targets) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(CLIENT_IDLE_TIMEOUT))?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let response = match serde_json::from_str::<Request>(line.trim()) {
            Ok(req) => execute(req, t),
            Err(e) => Response::err(format!("bad request: {e}")),
        };
        let mut text = serde_json::to_string(&response).unwrap_or_else(|_| r#"{"ok":false}"#.into());
        text.push('\n');
        writer.write_all(text.as_bytes())?;
    }
}

fn execute(req: Request, t: &Targets) -> Response {
    tracing::debug!(?req, "control request");
    match req {
        Request::Ping => Response::ok(),
        Request::Pause => match t.state.pause(&t.control) {
            Ok(()) => {
                tracing::info!("VM paused");
                Response::ok()
            }
            Err(e) => Response::err(e),
        },
        Request::Resume => {
            t.state.resume();
            tracing::info!("VM resumed");
            Response::ok()
        }
        Request::PowerButton => {
            t.state.request_graceful_stop();
            // A paused guest cannot react to its button.
            t.state.resume();
            // As for SIGTERM: the ACPI button if the guest armed it, else the keyboard.
            let mut pm = lock(&t.acpi_pm);
            if pm.power_button_armed() && pm.press_power_button() {
                tracing::info!("power button: ACPI power button pressed");
            } else {
                drop(pm);
                lock(&t.i8042).inject_ctrl_alt_del();
                tracing::info!("power button: Ctrl-Alt-Del sent (no ACPI button handler in the guest)");
            }
            Response::ok()
        }
        Request::CtrlAltDel => {
            lock(&t.i8042).inject_ctrl_alt_del();
            Response::ok()
        }
        Request::Stop => {
            tracing::info!("hard stop requested on the control socket");
            t.control.request_exit(ExitReason::Killed);
            Response::ok()
        }
        Request::Stats => Response {
            stats: Some(Stats {
                paused: t.state.is_paused(),
                vcpus: vcpu_cpu_times(),
                rss_bytes: rss_bytes(),
                devices: device_stats(),
            }),
            ..Response::ok()
        },
    }
}

/// CPU time of each `vcpuN` thread of this process, from /proc (no bookkeeping on
/// the vCPU path). schedstat has nanoseconds; stat's ticks are the fallback.
fn vcpu_cpu_times() -> Vec<VcpuStats> {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return Vec::new();
    };
    let mut out: Vec<VcpuStats> = tasks
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let dir = e.path();
            let comm = std::fs::read_to_string(dir.join("comm")).ok()?;
            let id: u32 = comm.trim().strip_prefix("vcpu")?.parse().ok()?;
            Some(VcpuStats {
                id,
                cpu_seconds: thread_cpu_seconds(&dir)?,
            })
        })
        .collect();
    out.sort_by_key(|v| v.id);
    out
}

fn thread_cpu_seconds(task_dir: &Path) -> Option<f64> {
    if let Ok(s) = std::fs::read_to_string(task_dir.join("schedstat"))
        && let Some(ns) = s.split_whitespace().next().and_then(|v| v.parse::<u64>().ok())
    {
        return Some(ns as f64 / 1e9);
    }
    let stat = std::fs::read_to_string(task_dir.join("stat")).ok()?;
    // Fields after the command name (which may contain spaces) in parentheses:
    // state is the first, utime the 12th, stime the 13th.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (hz > 0).then(|| ticks as f64 / hz as f64)
}

fn rss_bytes() -> u64 {
    let pages = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .unwrap_or(0);
    // SAFETY: sysconf has no memory effects.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(0) as u64;
    pages * page
}
