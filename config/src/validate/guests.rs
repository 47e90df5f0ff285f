//! The meaning of `guests:`: names, sizes within keel-vmm's limits, boot files, disks
//! and volumes, NICs and their MACs, restart and deadline settings.

use super::*;

pub(super) fn check_guests(cfg: &Config, d: &mut Diagnostics) {
    let bridges: Vec<&str> = cfg.network.bridges.iter().map(|b| b.name.value.as_str()).collect();
    let mut names: HashMap<&str, Pos> = HashMap::new();
    // Volume → (guest, read-only?, size, position) of its first attachment.
    let mut volumes: HashMap<&PoolPath, (&str, bool, ByteSize, Pos)> = HashMap::new();
    let mut macs: HashMap<MacAddr, (String, Pos)> = HashMap::new();
    // Declared volume bytes per pool, for the pool cap warning.
    let mut pool_use: HashMap<&str, u64> = HashMap::new();

    for g in &cfg.guests {
        let name = g.name.value.as_str();
        let name_ok = (1..=MAX_GUEST_NAME).contains(&name.len())
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !name.starts_with('-');
        if !name_ok {
            d.error(
                g.name.pos,
                format!("guest name `{name}` is not valid; use 1-{MAX_GUEST_NAME} lowercase letters, digits and `-`"),
            );
        }
        if let Some(first) = names.insert(name, g.name.pos) {
            d.error(
                g.name.pos,
                format!("duplicate guest name `{name}` (first declared at line {})", first.line),
            );
        }
        if *g.vcpus == 0 || *g.vcpus > MAX_VCPUS {
            d.error(
                g.vcpus.pos,
                format!("vcpus must be between 1 and {MAX_VCPUS}, found {}", *g.vcpus),
            );
        }
        let mem = g.memory.value;
        if mem < MIN_GUEST_MEMORY {
            d.error(
                g.memory.pos,
                format!("memory {mem} is below the minimum of {MIN_GUEST_MEMORY}"),
            );
        } else if mem > MAX_GUEST_MEMORY {
            d.error(
                g.memory.pos,
                format!("memory {mem} is above keel-vmm's maximum of {MAX_GUEST_MEMORY}"),
            );
        } else if mem.bytes() % 4096 != 0 {
            d.error(
                g.memory.pos,
                format!("memory {mem} is not a whole number of 4KiB pages"),
            );
        }
        if g.boot.value == BootSource::Disk {
            check_disk_boot(g, d);
        }
        if let BootFile::Pool(p) = &g.kernel.value {
            check_pool_ref(cfg, &Spanned::new(p.clone(), g.kernel.pos), "kernel", d);
        }
        if let Some(Spanned {
            value: BootFile::Pool(p),
            pos,
        }) = &g.initrd
        {
            check_pool_ref(cfg, &Spanned::new(p.clone(), *pos), "initrd", d);
        }
        if let Some(c) = &g.cmdline
            && c.contains(['\n', '\0'])
        {
            d.error(c.pos, "cmdline must be one line");
        }
        let devices = g.virtio_devices();
        if keel_vmm_api::limits::check_devices(devices).is_err() {
            // At the first device past the limit (disks come first, then NICs).
            let over = keel_vmm_api::limits::MAX_DEVICES;
            let seed = usize::from(g.cloud_init.is_some());
            let at = match g.disks.get(over) {
                Some(disk) => disk.volume.pos,
                None => g
                    .nics
                    .get(over.saturating_sub(g.disks.len() + seed))
                    .map_or(g.name.pos, |n| n.bridge.pos),
            };
            let seed_note = if seed == 1 {
                " (its cloud-init seed is a disk too)"
            } else {
                ""
            };
            d.error(
                at,
                format!(
                    "guest `{name}` has {devices} disks and NICs{seed_note}; keel-vmm gives a guest at most {} virtio devices",
                    keel_vmm_api::limits::MAX_DEVICES
                ),
            );
        } else if let Err(e) = keel_vmm_api::limits::check_cmdline(g.kernel_cmdline().len(), devices) {
            let at = g.cmdline.as_ref().map(|c| c.pos).unwrap_or(g.name.pos);
            d.error(
                at,
                format!("guest `{name}`: the kernel {e} (Keel's own part included); shorten it"),
            );
        }

        for disk in &g.disks {
            check_pool_ref(cfg, &disk.volume, "volume", d);
            if disk.size.bytes() == 0 {
                d.error(
                    disk.size.pos,
                    format!(
                        "volume `{}` has size zero; give it a size such as 10GiB",
                        disk.volume.value
                    ),
                );
            } else if disk.size.bytes() % 512 != 0 {
                d.error(
                    disk.size.pos,
                    format!(
                        "volume size {} is not a multiple of 512 bytes (the disk sector size)",
                        disk.size.value
                    ),
                );
            }
            if let Some(img) = &disk.image {
                check_pool_ref(cfg, img, "image", d);
                if disk.source.is_some() {
                    d.error(
                        img.pos,
                        "give `source` (a file) or `image` (an imported image), not both",
                    );
                }
                if !crate::schema::is_image_name(&img.path) {
                    d.error(
                        img.pos,
                        format!("image `{}`: write POOL/NAME with the name `keelctl image list` shows (lowercase letters, digits, `.`, `_`, `-`)", img.value),
                    );
                }
            }
            if let Some(src) = &disk.source {
                check_pool_ref(cfg, src, "source image", d);
                if src.value == disk.volume.value {
                    d.error(src.pos, "a volume cannot be seeded from itself");
                }
            }
            match volumes.get(&disk.volume.value) {
                Some(&(other, ro, size, at)) => {
                    if !(ro && disk.readonly) {
                        d.error(disk.volume.pos, format!("volume `{}` is already attached to guest `{other}` (line {}); a volume shared between attachments must be readonly in all of them", disk.volume.value, at.line));
                    } else if size != disk.size.value {
                        d.error(
                            disk.size.pos,
                            format!(
                                "volume `{}` is declared with size {} here and {size} at line {}",
                                disk.volume.value, disk.size.value, at.line
                            ),
                        );
                    }
                }
                None => {
                    volumes.insert(
                        &disk.volume.value,
                        (name, disk.readonly, disk.size.value, disk.volume.pos),
                    );
                    let used = pool_use.entry(disk.volume.pool.as_str()).or_default();
                    *used = used.saturating_add(disk.size.bytes());
                }
            }
        }

        if g.nics.is_empty() {
            d.warning(g.name.pos, format!("guest `{name}` has no network interface"));
        }
        for (i, nic) in g.nics.iter().enumerate() {
            if !bridges.contains(&nic.bridge.as_str()) {
                d.error(
                    nic.bridge.pos,
                    format!(
                        "guest `{name}` nic {i} refers to bridge `{}`, which is not declared under network.bridges{}",
                        nic.bridge.value,
                        suggest(&nic.bridge, &bridges)
                    ),
                );
            }
            let mac = g.nic_mac(i);
            if let MacSpec::Fixed(m) = nic.mac.value
                && (m.is_multicast() || m.is_zero())
            {
                d.error(
                    nic.mac.pos,
                    format!("MAC {m} is not a unicast address (the low bit of the first byte must be 0)"),
                );
            }
            let pos = if nic.mac.value == MacSpec::Auto {
                nic.bridge.pos
            } else {
                nic.mac.pos
            };
            let who = format!("guest `{name}` nic {i}");
            if let Some((other, at)) = macs.insert(mac, (who, pos)) {
                d.error(pos, format!("MAC {mac} is also used by {other} (line {})", at.line));
            }
        }

        let r = &g.restart;
        if r.backoff.get().is_zero() {
            d.error(r.backoff.pos, "restart backoff must be larger than zero, e.g. 1s");
        }
        if r.backoff.value > r.max_backoff.value {
            d.error(
                r.max_backoff.pos,
                format!(
                    "max_backoff {} is shorter than backoff {}",
                    r.max_backoff.value, r.backoff.value
                ),
            );
        }
        if *r.max_restarts == 0 {
            d.error(
                r.max_restarts.pos,
                "max_restarts must be at least 1 (use policy `never` for no restarts)",
            );
        }
        if r.window.get().is_zero() {
            d.error(r.window.pos, "restart window must be larger than zero, e.g. 10m");
        }
        for (what, t) in [("start_timeout", &g.start_timeout), ("stop_timeout", &g.stop_timeout)] {
            if t.get().is_zero() || t.get() > crate::schema::MAX_GUEST_TIMEOUT.get() {
                d.error(
                    t.pos,
                    format!(
                        "{what} {} is out of range: give a duration from 1s to {}, e.g. 30s",
                        t.value,
                        crate::schema::MAX_GUEST_TIMEOUT
                    ),
                );
            }
        }
    }

    for p in &cfg.storage.pools {
        if let (Some(cap), Some(used)) = (&p.size, pool_use.get(p.name.as_str()))
            && *used > cap.bytes()
        {
            d.warning(cap.pos, format!("volumes declared in pool `{}` add up to {}, more than its cap of {}; they are sparse, but can fill it", p.name.value, ByteSize(*used), cap.value));
        }
    }
}

/// `boot: disk` takes the kernel and initramfs from the guest's first disk, so that disk
/// must exist and the boot-file fields must not say something else.
fn check_disk_boot(g: &Guest, d: &mut Diagnostics) {
    let name = g.name.value.as_str();
    if g.disks.is_empty() {
        d.error(
            g.boot.pos,
            format!("guest `{name}` has `boot: disk` but no disks; add its system disk under `disks:` (the first disk boots)"),
        );
    }
    if g.kernel.value != BootFile::Default {
        d.error(
            g.kernel.pos,
            format!("guest `{name}`: `kernel:` and `boot: disk` both say where the kernel is; remove one"),
        );
    }
    if let Some(initrd) = &g.initrd {
        d.error(
            initrd.pos,
            format!("guest `{name}`: `initrd:` and `boot: disk` both say where the initramfs is; remove one"),
        );
    }
}
