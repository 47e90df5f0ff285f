//! Each guest's serial console: an in-memory ring buffer (what `keelctl logs`
//! shows and `keelctl console` replays), a rotated log file on the data
//! partition, live subscribers (`logs -f`, `console`), keyboard input from
//! attached consoles, and the `[guest NAME]` relay to the appliance's console.
//!
//! keel-vmm runs with `--serial unix:PATH` and connects to a socket the
//! supervisor listens on before spawning it, so no byte of early boot output is
//! lost. The hub outlives the VMM process: history survives guest restarts, and
//! on start the ring is seeded from the log file so it survives appliance
//! reboots too.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::broadcast;
use tracing::{debug, warn};

/// Bytes of recent output kept in memory per guest.
pub const RING_BYTES: usize = 256 * 1024;
/// A log file is rotated when it grows past this size.
pub const LOG_ROTATE_BYTES: u64 = 4 * 1024 * 1024;
/// Rotated files kept: NAME.log.1 (newest) .. NAME.log.N.
pub const LOG_KEEP: u32 = 3;
/// Longest line relayed to the appliance console in one piece.
const RELAY_LINE_MAX: usize = 4096;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One guest's console, shared by the supervisor, the VMM reader thread and API handlers.
pub struct ConsoleHub {
    name: String,
    state: Mutex<HubState>,
    /// Total bytes the guest has written since this hub was created.
    bytes_out: AtomicU64,
    /// Whether output is also relayed line by line to the appliance console.
    relay: bool,
}

struct HubState {
    ring: VecDeque<u8>,
    live: broadcast::Sender<Bytes>,
    /// The current VMM connection, where input goes.
    vmm: Option<UnixStream>,
    log: Option<RotatingLog>,
    /// Output since the last newline, for the console relay.
    partial_line: Vec<u8>,
}

impl ConsoleHub {
    /// A hub for guest `name`. With `log_dir`, output is appended to
    /// `log_dir/NAME.log` (rotated) and the ring starts with that file's tail.
    pub fn new(name: &str, log_dir: Option<&Path>, relay: bool) -> Arc<ConsoleHub> {
        let (live, _) = broadcast::channel(256);
        let mut ring = VecDeque::with_capacity(RING_BYTES);
        let log = log_dir.and_then(|dir| match RotatingLog::open(dir, name) {
            Ok(log) => {
                if let Ok(tail) = log.tail(RING_BYTES) {
                    ring.extend(tail);
                }
                Some(log)
            }
            Err(e) => {
                warn!(guest = name, "console log file unavailable: {e}");
                None
            }
        });
        Arc::new(ConsoleHub {
            name: name.to_string(),
            state: Mutex::new(HubState {
                ring,
                live,
                vmm: None,
                log,
                partial_line: Vec::new(),
            }),
            bytes_out: AtomicU64::new(0),
            relay,
        })
    }

    pub fn bytes_out(&self) -> u64 {
        self.bytes_out.load(Ordering::Relaxed)
    }

    /// Records output from the guest.
    pub fn push_output(&self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        self.bytes_out.fetch_add(bytes.len() as u64, Ordering::Relaxed);
        let mut guard = lock(&self.state);
        let st = &mut *guard;
        let overflow = (st.ring.len() + bytes.len())
            .saturating_sub(RING_BYTES)
            .min(st.ring.len());
        st.ring.drain(..overflow);
        let keep = &bytes[bytes.len().saturating_sub(RING_BYTES)..];
        st.ring.extend(keep);
        if let Some(log) = &mut st.log
            && let Err(e) = log.write(bytes)
        {
            warn!(
                guest = self.name,
                "console log write failed, logging to file stops: {e}"
            );
            st.log = None;
        }
        // No subscribers is normal; lagging ones see a gap (broadcast semantics).
        let _ = st.live.send(Bytes::copy_from_slice(bytes));
        if self.relay {
            self.relay_lines(st, bytes);
        }
    }

    fn relay_lines(&self, st: &mut HubState, bytes: &[u8]) {
        for &b in bytes {
            if b == b'\n' || st.partial_line.len() >= RELAY_LINE_MAX {
                let text = String::from_utf8_lossy(&st.partial_line);
                crate::logging::console_line(&format!("[guest {}] {}", self.name, text.trim_end_matches('\r')));
                st.partial_line.clear();
                if b == b'\n' {
                    continue;
                }
            }
            st.partial_line.push(b);
        }
    }

    /// Flushes a last unterminated line to the appliance console (the VMM ended).
    fn flush_relay(&self) {
        let mut st = lock(&self.state);
        if self.relay && !st.partial_line.is_empty() {
            let text = String::from_utf8_lossy(&st.partial_line).into_owned();
            crate::logging::console_line(&format!("[guest {}] {}", self.name, text.trim_end_matches('\r')));
        }
        st.partial_line.clear();
    }

    /// The last `replay` bytes of output and a receiver for everything after them,
    /// taken under one lock so nothing is lost or doubled in between.
    pub fn subscribe(&self, replay: usize) -> (Vec<u8>, broadcast::Receiver<Bytes>) {
        let st = lock(&self.state);
        let skip = st.ring.len().saturating_sub(replay);
        (st.ring.iter().skip(skip).copied().collect(), st.live.subscribe())
    }

    /// The last `lines` lines of output (all of the ring for 0).
    pub fn tail_lines(&self, lines: usize) -> Vec<u8> {
        let ring: Vec<u8> = lock(&self.state).ring.iter().copied().collect();
        last_lines(&ring, lines).to_vec()
    }

    /// [`ConsoleHub::tail_lines`] and a receiver for what follows, taken together.
    pub fn tail_and_subscribe(&self, lines: usize) -> (Vec<u8>, broadcast::Receiver<Bytes>) {
        let st = lock(&self.state);
        let ring: Vec<u8> = st.ring.iter().copied().collect();
        (last_lines(&ring, lines).to_vec(), st.live.subscribe())
    }

    /// Sends keyboard input to the guest. False when no VMM is connected.
    pub fn send_input(&self, bytes: &[u8]) -> bool {
        let mut st = lock(&self.state);
        let Some(stream) = &mut st.vmm else { return false };
        match stream.write_all(bytes) {
            Ok(()) => true,
            Err(e) => {
                debug!(guest = self.name, "console input dropped: {e}");
                false
            }
        }
    }

    pub fn connected(&self) -> bool {
        lock(&self.state).vmm.is_some()
    }

    /// Serves one VMM run: waits for keel-vmm to connect to `listener`, then
    /// copies its output into the hub until it disconnects. Runs on its own
    /// thread (blocking I/O, no work on PID 1's event loop). Returns early if
    /// `cancel` is set before the VMM connects (it died first).
    pub fn serve_vmm(self: &Arc<Self>, listener: UnixListener, cancel: Arc<AtomicBool>) -> std::io::Result<()> {
        let hub = self.clone();
        std::thread::Builder::new()
            .name(format!("console {}", self.name))
            .spawn(move || hub.run_vmm_connection(listener, &cancel))?;
        Ok(())
    }

    fn run_vmm_connection(&self, listener: UnixListener, cancel: &AtomicBool) {
        let Some(stream) = accept_until_cancelled(&listener, cancel) else {
            return;
        };
        drop(listener);
        match stream.try_clone() {
            Ok(input) => {
                let _ = input.set_write_timeout(Some(Duration::from_secs(1)));
                lock(&self.state).vmm = Some(input);
            }
            Err(e) => warn!(guest = self.name, "console input unavailable: {e}"),
        }
        let mut stream = stream;
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => self.push_output(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    debug!(guest = self.name, "console read ended: {e}");
                    break;
                }
            }
        }
        lock(&self.state).vmm = None;
        self.flush_relay();
    }
}

/// The last `lines` lines of `text` (all of it for 0); a trailing newline ends
/// the last line rather than starting an empty one.
fn last_lines(text: &[u8], lines: usize) -> &[u8] {
    if lines == 0 {
        return text;
    }
    let body = text.strip_suffix(b"\n").unwrap_or(text);
    let mut seen = 0;
    for (i, &b) in body.iter().enumerate().rev() {
        if b == b'\n' {
            seen += 1;
            if seen == lines {
                return &text[i + 1..];
            }
        }
    }
    text
}

/// Accepts one connection, polling so a cancelled start does not leave the
/// thread waiting forever.
fn accept_until_cancelled(listener: &UnixListener, cancel: &AtomicBool) -> Option<UnixStream> {
    loop {
        if cancel.load(Ordering::SeqCst) {
            return None;
        }
        let mut fds = [libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        // SAFETY: one valid pollfd.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), 1, 100) };
        if ready > 0 {
            match listener.accept() {
                Ok((s, _)) => {
                    let _ = s.set_nonblocking(false);
                    return Some(s);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => {
                    warn!("console socket accept failed: {e}");
                    return None;
                }
            }
        }
    }
}

/// An append-only log file rotated by size: NAME.log, NAME.log.1, ... NAME.log.N.
struct RotatingLog {
    path: PathBuf,
    file: File,
    size: u64,
}

impl RotatingLog {
    fn open(dir: &Path, name: &str) -> std::io::Result<RotatingLog> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join(format!("{name}.log"));
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        let size = file.metadata()?.len();
        Ok(RotatingLog { path, file, size })
    }

    fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        if self.size + bytes.len() as u64 > LOG_ROTATE_BYTES && self.size > 0 {
            self.rotate()?;
        }
        self.file.write_all(bytes)?;
        self.size += bytes.len() as u64;
        Ok(())
    }

    fn rotated(&self, n: u32) -> PathBuf {
        let mut p = self.path.clone().into_os_string();
        p.push(format!(".{n}"));
        p.into()
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        for n in (1..LOG_KEEP).rev() {
            let from = self.rotated(n);
            if from.exists() {
                std::fs::rename(&from, self.rotated(n + 1))?;
            }
        }
        std::fs::rename(&self.path, self.rotated(1))?;
        self.file = OpenOptions::new().create(true).append(true).open(&self.path)?;
        self.size = 0;
        Ok(())
    }

    /// The last `max` bytes of the current file.
    fn tail(&self, max: usize) -> std::io::Result<Vec<u8>> {
        let mut f = File::open(&self.path)?;
        let len = f.metadata()?.len();
        f.seek(SeekFrom::Start(len.saturating_sub(max as u64)))?;
        let mut v = Vec::new();
        f.read_to_end(&mut v)?;
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_keeps_the_newest_bytes_and_tails_by_line() {
        let hub = ConsoleHub::new("t", None, false);
        hub.push_output(b"one\ntwo\nthree\n");
        assert_eq!(hub.tail_lines(2), b"two\nthree\n");
        assert_eq!(hub.tail_lines(0), b"one\ntwo\nthree\n");
        assert_eq!(hub.tail_lines(10), b"one\ntwo\nthree\n");
        let big = vec![b'x'; RING_BYTES + 10];
        hub.push_output(&big);
        assert_eq!(hub.tail_lines(0).len(), RING_BYTES);
        assert_eq!(hub.bytes_out(), 14 + RING_BYTES as u64 + 10);
    }

    #[test]
    fn subscribe_replays_then_streams_without_gaps() {
        let hub = ConsoleHub::new("t", None, false);
        hub.push_output(b"hello ");
        let (replay, mut rx) = hub.subscribe(3);
        assert_eq!(replay, b"lo ");
        hub.push_output(b"world");
        assert_eq!(rx.try_recv().unwrap().as_ref(), b"world");
    }

    #[test]
    fn log_file_rotates_and_seeds_the_ring() {
        let dir = tempfile::tempdir().unwrap();
        {
            let hub = ConsoleHub::new("g", Some(dir.path()), false);
            let chunk = vec![b'a'; 1024 * 1024];
            for _ in 0..5 {
                hub.push_output(&chunk);
            }
            hub.push_output(b"\nlast line\n");
        }
        assert!(
            dir.path().join("g.log.1").exists(),
            "rotated at {LOG_ROTATE_BYTES} bytes"
        );
        assert!(std::fs::metadata(dir.path().join("g.log")).unwrap().len() < LOG_ROTATE_BYTES);
        let again = ConsoleHub::new("g", Some(dir.path()), false);
        assert_eq!(again.tail_lines(1), b"last line\n");
    }

    #[test]
    fn input_without_a_vmm_is_refused() {
        let hub = ConsoleHub::new("t", None, false);
        assert!(!hub.send_input(b"x"));
        assert!(!hub.connected());
    }
}
