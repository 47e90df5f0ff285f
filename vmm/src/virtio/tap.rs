//! The tap backend of virtio-net: a tap device opened by name (TUNSETIFF) or handed over
//! as an open fd by the supervisor, always with IFF_NO_PI and IFF_VNET_HDR so virtio-net
//! headers (checksum and segmentation offload metadata) pass through unchanged.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

/// Size of `struct virtio_net_hdr_v1` (with num_buffers): what VERSION_1 drivers use.
pub const VNET_HDR_LEN: usize = 12;

const IFF_TAP: i16 = 0x0002;
const IFF_NO_PI: i16 = 0x1000;
const IFF_VNET_HDR: i16 = 0x4000;
const IFNAMSIZ: usize = 16;

// ioctl numbers from <linux/if_tun.h>: _IOW('T', 202, int) etc.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
pub(crate) const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNGETIFF: libc::c_ulong = 0x8004_54d2;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;

/// Offload flags for TUNSETOFFLOAD: what the guest accepts on receive.
pub const TUN_F_CSUM: u32 = 0x01;
pub const TUN_F_TSO4: u32 = 0x02;
pub const TUN_F_TSO6: u32 = 0x04;
pub const TUN_F_TSO_ECN: u32 = 0x08;

#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("tap {name}: cannot open /dev/net/tun: {reason} (is the tun module loaded?)")]
    OpenTun { name: String, reason: String },
    #[error("tap {name}: TUNSETIFF: {reason}")]
    SetIff { name: String, reason: String },
    #[error("tap name {0:?}: expected 1 to 15 characters without '/' or NUL")]
    BadName(String),
    #[error("net fd={fd}: {reason}")]
    BadFd { fd: RawFd, reason: String },
    #[error("tap {name}: {what}: {reason}")]
    Ioctl {
        name: String,
        what: &'static str,
        reason: String,
    },
}

/// `struct ifreq` as far as the tun ioctls use it.
#[repr(C)]
#[derive(Clone, Copy)]
struct IfReq {
    name: [u8; IFNAMSIZ],
    flags: i16,
    _pad: [u8; 22],
}

impl IfReq {
    fn new(name: &str, flags: i16) -> Self {
        let mut r = IfReq {
            name: [0; IFNAMSIZ],
            flags,
            _pad: [0; 22],
        };
        r.name[..name.len()].copy_from_slice(name.as_bytes());
        r
    }

    fn name(&self) -> String {
        let end = self.name.iter().position(|&b| b == 0).unwrap_or(IFNAMSIZ);
        String::from_utf8_lossy(&self.name[..end]).into_owned()
    }
}

/// An open tap queue in non-blocking mode.
#[derive(Debug)]
pub struct Tap {
    fd: OwnedFd,
    name: String,
}

fn errno_text() -> String {
    crate::os_error::os_message(&io::Error::last_os_error())
}

impl Tap {
    /// Opens (or creates, with CAP_NET_ADMIN) the tap `name` in this thread's network
    /// namespace.
    pub fn open(name: &str) -> Result<Tap, TapError> {
        if name.is_empty() || name.len() >= IFNAMSIZ || name.contains(['/', '\0']) {
            return Err(TapError::BadName(name.into()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(|e| TapError::OpenTun {
                name: name.into(),
                reason: crate::os_error::os_message(&e),
            })?;
        let mut req = IfReq::new(name, IFF_TAP | IFF_NO_PI | IFF_VNET_HDR);
        // SAFETY: TUNSETIFF reads and writes a struct ifreq we own.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF as _, &mut req) } < 0 {
            return Err(TapError::SetIff {
                name: name.into(),
                reason: errno_text(),
            });
        }
        let tap = Tap {
            fd: file.into(),
            name: req.name(),
        };
        tap.set_vnet_hdr_size()?;
        Ok(tap)
    }

    /// Takes over an already open tap fd (from the supervisor). It must be a tap with
    /// IFF_NO_PI and IFF_VNET_HDR; it is made non-blocking and close-on-exec.
    pub fn from_fd(fd: RawFd) -> Result<Tap, TapError> {
        let bad = |reason: String| TapError::BadFd { fd, reason };
        if fd < 0 {
            return Err(bad("not a file descriptor".into()));
        }
        // SAFETY: F_GETFD only inspects the fd table.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            return Err(bad(format!("{} (was it passed to keel-vmm?)", errno_text())));
        }
        let mut req = IfReq::new("", 0);
        // SAFETY: TUNGETIFF writes a struct ifreq we own.
        if unsafe { libc::ioctl(fd, TUNGETIFF as _, &mut req) } < 0 {
            return Err(bad(format!("not a tap device (TUNGETIFF: {})", errno_text())));
        }
        let want = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
        if req.flags & want != want {
            return Err(bad(format!(
                "tap {} lacks {}: open it with IFF_TAP|IFF_NO_PI|IFF_VNET_HDR",
                req.name(),
                [
                    (IFF_TAP, "IFF_TAP"),
                    (IFF_NO_PI, "IFF_NO_PI"),
                    (IFF_VNET_HDR, "IFF_VNET_HDR")
                ]
                .iter()
                .filter(|(f, _)| req.flags & f == 0)
                .map(|(_, n)| *n)
                .collect::<Vec<_>>()
                .join("|")
            )));
        }
        // SAFETY: plain fcntl flag updates on a valid fd.
        unsafe {
            let fl = libc::fcntl(fd, libc::F_GETFL);
            libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK);
            libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
        }
        // SAFETY: the caller hands the fd over to us; it is valid (checked above).
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        let tap = Tap {
            fd: owned,
            name: req.name(),
        };
        tap.set_vnet_hdr_size()?;
        Ok(tap)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    fn ioctl_int(&self, what: &'static str, request: libc::c_ulong, arg: libc::c_ulong) -> Result<(), TapError> {
        // SAFETY: tun ioctls taking an integer argument by value.
        if unsafe { libc::ioctl(self.fd.as_raw_fd(), request as _, arg) } < 0 {
            return Err(TapError::Ioctl {
                name: self.name.clone(),
                what,
                reason: errno_text(),
            });
        }
        Ok(())
    }

    fn set_vnet_hdr_size(&self) -> Result<(), TapError> {
        let size: libc::c_int = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads an int through the pointer.
        if unsafe { libc::ioctl(self.fd.as_raw_fd(), TUNSETVNETHDRSZ as _, &size) } < 0 {
            return Err(TapError::Ioctl {
                name: self.name.clone(),
                what: "TUNSETVNETHDRSZ",
                reason: errno_text(),
            });
        }
        Ok(())
    }

    /// Tells the kernel which offloads the guest accepts in received frames.
    pub fn set_offload(&self, flags: u32) -> Result<(), TapError> {
        self.ioctl_int("TUNSETOFFLOAD", TUNSETOFFLOAD, libc::c_ulong::from(flags))
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// What virtio-net needs from its backend: frames (each with a virtio-net header) in
/// and out, non-blocking, and the offload switch. The tap is the real one; tests use a
/// socket pair.
pub trait NetBackend: AsRawFd + Send {
    fn set_offload(&self, flags: u32) -> io::Result<()>;
}

impl NetBackend for Tap {
    fn set_offload(&self, flags: u32) -> io::Result<()> {
        Tap::set_offload(self, flags).map_err(|e| io::Error::other(e.to_string()))
    }
}

/// A connected datagram socket pair end as a backend: frames keep their boundaries,
/// offloads are accepted and ignored. For tests and benchmarks without a tap.
pub struct SocketBackend(pub OwnedFd);

impl AsRawFd for SocketBackend {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

impl NetBackend for SocketBackend {
    fn set_offload(&self, _flags: u32) -> io::Result<()> {
        Ok(())
    }
}

impl SocketBackend {
    /// A non-blocking SOCK_SEQPACKET pair: (device end, peer end).
    pub fn pair() -> io::Result<(SocketBackend, OwnedFd)> {
        let mut fds = [0; 2];
        // SAFETY: socketpair fills two fds.
        if unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
                fds.as_mut_ptr(),
            )
        } < 0
        {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fresh fds we own.
        let (a, b) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        Ok((SocketBackend(a), b))
    }
}
