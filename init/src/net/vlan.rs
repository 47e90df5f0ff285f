//! 802.1Q sub-interfaces of the uplink for `bridged` bridges with a `vlan:`.

use std::io;

use super::link::{Link, Rtnl};

/// The VLAN interface's name: `<uplink>.<id>` as `ip link` users expect, with
/// the uplink part shortened when the result would not fit IFNAMSIZ (15 chars).
pub fn name(uplink: &str, id: u16) -> String {
    let suffix = format!(".{id}");
    let keep = 15usize.saturating_sub(suffix.len()).min(uplink.len());
    format!("{}{suffix}", &uplink[..keep])
}

/// Makes sure VLAN `id` on `parent` exists under its name and is up; returns it.
/// An existing link of that name that is not this VLAN is an error, never reused.
pub async fn ensure(rtnl: &Rtnl, parent: &Link, id: u16) -> io::Result<Link> {
    let want = name(&parent.name, id);
    if let Some(l) = rtnl.link(&want).await? {
        if l.kind.as_deref() != Some("vlan") || l.vlan_id != Some(id) || l.parent != Some(parent.index) {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{want} exists but is not VLAN {id} of {}", parent.name),
            ));
        }
    } else {
        rtnl.create_vlan(&want, parent.index, id).await.map_err(|e| {
            if e.raw_os_error() == Some(libc::EOPNOTSUPP) {
                io::Error::new(
                    e.kind(),
                    format!("{e}: this kernel has no 802.1Q VLAN support (CONFIG_VLAN_8021Q, module 8021q)"),
                )
            } else {
                e
            }
        })?;
    }
    let link = rtnl
        .link(&want)
        .await?
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("{want} vanished after creation")))?;
    rtnl.set_up(link.index).await?;
    Ok(link)
}

#[cfg(test)]
mod tests {
    #[test]
    fn names_fit_ifnamsiz() {
        assert_eq!(super::name("enp1s0", 20), "enp1s0.20");
        let long = super::name("enp0s31f6abcdef", 4094);
        assert_eq!(long.len(), 15);
        assert!(long.ends_with(".4094"));
    }
}
