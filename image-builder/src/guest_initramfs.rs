//! The default guest userland (`initrd: default` in keel.yaml): a static busybox
//! and the `/init` script in `image-builder/guest/`. Small (about 1 MB), enough to
//! see a guest boot, get a DHCP lease and offer a shell on its console.

use std::path::Path;

use crate::initramfs::{Builder, InitramfsError};

/// The guest's /init and udhcpc hook, built into keel-image so that a build needs
/// no source tree.
const INIT: &str = include_str!("../guest/init");
const UDHCPC_SCRIPT: &str = include_str!("../guest/udhcpc.script");

/// Where Debian's busybox-static puts its binary.
pub const DEFAULT_BUSYBOX: &str = "/bin/busybox";

/// The guest initramfs (uncompressed newc cpio). `busybox` must be a static binary.
pub fn build(busybox: &Path, mtime: u32) -> Result<Vec<u8>, InitramfsError> {
    let mut b = Builder::with_mtime(mtime);
    b.host_file("/bin/busybox", busybox, 0o755)?;
    b.symlink("/bin/sh", "busybox")?;
    b.file("/init", 0o755, INIT.as_bytes())?;
    b.file("/etc/udhcpc.script", 0o755, UDHCPC_SCRIPT.as_bytes())?;
    b.build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_busybox_init_and_the_dhcp_hook() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fake = dir.path().join("busybox");
        std::fs::write(&fake, b"\x7fELF fake busybox").expect("write");
        let cpio = build(&fake, 0).expect("build");
        let text = String::from_utf8_lossy(&cpio);
        for name in ["bin/busybox", "bin/sh", "init", "etc/udhcpc.script", "TRAILER!!!"] {
            assert!(text.contains(name), "{name} missing from the guest initramfs");
        }
        assert_eq!(build(&fake, 0).expect("build"), cpio, "same inputs, same bytes");
    }
}
