//! Per-guest-NIC tap devices, handed to keel-vmm as open file descriptors.
//!
//! A tap is created with TUNSETIFF (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR; creating
//! one over rtnetlink is refused with EOPNOTSUPP), attached to its bridge and
//! brought up. It is *not* made persistent: the kernel removes it as soon as
//! the last descriptor closes, so a crashed VMM never leaves a tap behind.
//! [`delete`] removes one explicitly (e.g. a leftover of the same name).

use std::fs::OpenOptions;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;

use sha2::{Digest, Sha256};

use super::NetError;
use super::link::Rtnl;

nix::ioctl_write_ptr_bad!(tun_set_iff, libc::TUNSETIFF, libc::ifreq);

/// An open tap: the name it has in the kernel and the descriptor keel-vmm reads
/// and writes frames through (with a virtio-net header in front of each).
#[derive(Debug)]
pub struct Tap {
    pub name: String,
    pub bridge: String,
    pub fd: OwnedFd,
}

/// The tap name of a guest's NIC: `kt` + 10 hex digits of a hash of the guest
/// name and NIC index. Stable across restarts, 12 characters (IFNAMSIZ is 15),
/// and unlikely to collide with anything an operator names.
pub fn name_for(guest: &str, nic_index: usize) -> String {
    let h = Sha256::digest(format!("keel-tap\0{guest}\0{nic_index}").as_bytes());
    let hex: String = h.iter().take(5).map(|b| format!("{b:02x}")).collect();
    format!("kt{hex}")
}

/// Creates tap `name`, attaches it to `bridge` and brings it up. A leftover
/// link of the same name is removed first. The descriptor is close-on-exec:
/// clear that flag (or dup it) when passing it to keel-vmm.
pub async fn create(name: &str, bridge: &str) -> Result<Tap, NetError> {
    let err = |op| {
        let name = name.to_owned();
        move |source| NetError::Tap { name, op, source }
    };
    if name.is_empty() || name.len() > 15 {
        return Err(NetError::Tap {
            name: name.to_owned(),
            op: "check name",
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "must be 1-15 characters"),
        });
    }
    let rtnl = Rtnl::connect().map_err(|source| NetError::Netlink { source })?;
    let br = rtnl
        .link(bridge)
        .await
        .map_err(err("look up bridge"))?
        .filter(|l| l.is_bridge())
        .ok_or_else(|| NetError::Tap {
            name: name.to_owned(),
            op: "attach",
            source: std::io::Error::new(std::io::ErrorKind::NotFound, format!("bridge {bridge} does not exist")),
        })?;
    if let Some(old) = rtnl.link(name).await.map_err(err("look up"))? {
        rtnl.delete(old.index).await.map_err(err("remove leftover"))?;
    }

    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/net/tun")
        .map_err(err("open /dev/net/tun"))?;
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.as_bytes()) {
        *dst = *src as libc::c_char;
    }
    req.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
    // SAFETY: the fd is an open /dev/net/tun and `req` a valid ifreq for TUNSETIFF.
    unsafe { tun_set_iff(file.as_raw_fd(), &req) }.map_err(|e| NetError::Tap {
        name: name.to_owned(),
        op: "TUNSETIFF",
        source: e.into(),
    })?;
    let fd: OwnedFd = file.into();

    let link = rtnl
        .link(name)
        .await
        .map_err(err("look up"))?
        .ok_or_else(|| NetError::Tap {
            name: name.to_owned(),
            op: "look up",
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "missing right after TUNSETIFF"),
        })?;
    rtnl.set_controller(link.index, Some(br.index))
        .await
        .map_err(err("attach to bridge"))?;
    rtnl.set_up(link.index).await.map_err(err("set up"))?;
    tracing::debug!(tap = name, bridge, "tap created");
    Ok(Tap {
        name: name.to_owned(),
        bridge: bridge.to_owned(),
        fd,
    })
}

/// Removes tap `name` if it exists. Dropping the last descriptor of a tap made
/// by [`create`] removes it too; this covers leftovers and early teardown.
pub async fn delete(name: &str) -> Result<(), NetError> {
    let rtnl = Rtnl::connect().map_err(|source| NetError::Netlink { source })?;
    let err = |op| {
        let name = name.to_owned();
        move |source| NetError::Tap { name, op, source }
    };
    match rtnl.link(name).await.map_err(err("look up"))? {
        Some(l) if l.kind.as_deref() == Some("tun") => rtnl.delete(l.index).await.map_err(err("delete")),
        Some(l) => Err(NetError::Tap {
            name: name.to_owned(),
            op: "delete",
            source: std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "is a {}, not a tap; left alone",
                    l.kind.as_deref().unwrap_or("physical NIC")
                ),
            ),
        }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn tap_names_are_short_stable_and_distinct() {
        let a = super::name_for("web", 0);
        assert_eq!(a, super::name_for("web", 0));
        assert_ne!(a, super::name_for("web", 1));
        assert_ne!(a, super::name_for("web2", 0));
        assert_eq!(a.len(), 12);
        assert!(a.starts_with("kt"));
    }
}
