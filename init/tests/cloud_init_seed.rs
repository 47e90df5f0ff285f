//! The cloud-init seed against what reads it in a guest: Debian's own cloud-init finds
//! the disk by its label (blkid on a loop device) and parses the three files (its
//! NoCloud datasource; only its mount step is replaced, by mtools copying the files
//! out, since this host's kernel has no vfat — the guest kernel's vfat mounts it in
//! e2e); its schema check takes the user-data and its network renderer turns the
//! network-config into systemd-networkd files; `fsck.fat` and `blkid` check the file
//! system. Keys come from `ssh-keygen`.

mod common;

use std::path::Path;
use std::process::Command;

use keel_init::guest::cloud_init::{nic_networks, seed, seed_disk};

/// Panics unless the tools these tests stand on are here (ci/setup installs them).
fn require_tools() {
    common::require_root();
    for (tool, package) in [
        ("/usr/bin/cloud-init", "cloud-init"),
        ("/usr/sbin/fsck.fat", "dosfstools"),
        ("/usr/sbin/blkid", "util-linux"),
        ("/usr/sbin/losetup", "mount"),
        ("/usr/bin/ssh-keygen", "openssh-client"),
        ("/usr/bin/mcopy", "mtools"),
    ] {
        assert!(
            Path::new(tool).exists(),
            "this test needs {tool}; run ci/setup (package {package})"
        );
    }
}

fn ssh_public_key(dir: &Path, kind: &str) -> String {
    let key = dir.join(format!("id_{kind}"));
    common::run_ok(
        "ssh-keygen",
        &[
            "-q",
            "-t",
            kind,
            "-N",
            "",
            "-C",
            "keel-test",
            "-f",
            key.to_str().unwrap(),
        ],
    );
    std::fs::read_to_string(key.with_extension("pub"))
        .unwrap()
        .trim()
        .to_owned()
}

/// A read-only loop device over `image`, detached on drop.
struct Loop(String);

impl Loop {
    fn attach(image: &Path) -> Loop {
        Loop(
            common::run_ok("losetup", &["--read-only", "--find", "--show", image.to_str().unwrap()])
                .trim()
                .to_owned(),
        )
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

/// Runs Debian's cloud-init NoCloud datasource as it runs in a guest (device scan by
/// label, mount, parse), with its own state kept in `dir`; returns what it found.
fn nocloud_datasource(dir: &Path) -> serde_json::Value {
    let script = r#"
import json, logging, sys
logging.basicConfig(level=logging.DEBUG, stream=sys.stderr)
from cloudinit import helpers
from cloudinit.sources.DataSourceNoCloud import DataSourceNoCloud
d = sys.argv[1]
paths = helpers.Paths({"cloud_dir": d + "/cloud", "run_dir": d + "/run"})
ds = DataSourceNoCloud(sys_cfg={}, distro=None, paths=paths)
devices = ds._get_devices("cidata")
# The one step replaced: this host's kernel has no vfat, so instead of mounting the
# device cloud-init's mount_cb copies its files out with mtools (an independent FAT
# reader) and hands that directory to the datasource's callback as a mount point.
import subprocess, tempfile
from cloudinit import util
def mount_cb(device, callback, data=None, **kwargs):
    with tempfile.TemporaryDirectory() as mp:
        subprocess.run(["mcopy", "-s", "-n", "-i", device, "::", mp], check=True)
        return callback(mp, data)
util.mount_cb = mount_cb
found = ds.get_data()
ud = ds.userdata_raw if found else None
print(json.dumps({
    "found": bool(found),
    "devices": devices,
    "seed": ds.seed,
    "metadata": ds.metadata,
    "userdata": ud.decode() if isinstance(ud, bytes) else ud,
    "network": ds.network_config if found else None,
}, default=repr))
"#;
    let out = Command::new("/usr/bin/python3")
        .args(["-c", script, dir.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cloud-init's datasource failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut v: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
    // What cloud-init logged, for the assertion messages.
    v["log"] = String::from_utf8_lossy(&out.stderr).into();
    v
}

#[test]
fn cloud_init_reads_the_seed_keel_writes() {
    require_tools();
    let dir = tempfile::tempdir().unwrap();
    let ed = ssh_public_key(dir.path(), "ed25519");
    let rsa = ssh_public_key(dir.path(), "rsa");
    let cfg = common::config(&format!(
        r#"
version: 1
storage: {{pools: [{{name: p}}]}}
network:
  bridges:
    - name: br-nat
      mode: nat
      address: 10.100.0.1/24
      dhcp: {{range: 10.100.0.100-10.100.0.199, static_leases: [{{mac: "02:00:00:00:00:10", address: 10.100.0.10}}]}}
guests:
  - name: web
    memory: 512MiB
    boot: disk
    disks: [{{volume: p/web, size: 4GiB}}]
    nics: [{{bridge: br-nat, mac: "02:00:00:00:00:10"}}]
    cloud_init:
      ssh_authorized_keys: ["{ed}"]
      users: [{{name: ops, sudo: true, groups: [adm], ssh_authorized_keys: ["{rsa}"]}}]
      packages: [htop]
      runcmd: ["echo keel > /root/marker"]
"#
    ));
    let g = &cfg.guests[0];
    let s = seed(
        g,
        g.cloud_init.as_ref().unwrap(),
        &nic_networks(g, &cfg.network.bridges),
        None,
    );
    let image = dir.path().join("cidata.img");
    seed_disk::write(&image, &s.files()).unwrap();

    let fsck = Command::new("fsck.fat")
        .args(["-n", image.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        fsck.status.success(),
        "fsck.fat:\n{}",
        String::from_utf8_lossy(&fsck.stdout)
    );
    let label = common::run_ok("blkid", &["-p", "-s", "LABEL", "-o", "value", image.to_str().unwrap()]);
    assert_eq!(label.trim(), "CIDATA");

    // cloud-init's own checks of the two documents.
    std::fs::write(dir.path().join("user-data"), &s.user_data).unwrap();
    std::fs::write(dir.path().join("network-config"), &s.network_config).unwrap();
    let schema = Command::new("cloud-init")
        .args(["schema", "--config-file"])
        .arg(dir.path().join("user-data"))
        .output()
        .unwrap();
    assert!(
        schema.status.success(),
        "cloud-init schema refused the user-data:\n{}{}\n{}",
        String::from_utf8_lossy(&schema.stdout),
        String::from_utf8_lossy(&schema.stderr),
        s.user_data
    );
    let render = |kind: &str| {
        let out = dir.path().join(format!("rendered-{kind}"));
        common::run_ok(
            "cloud-init",
            &[
                "devel",
                "net-convert",
                "--network-data",
                dir.path().join("network-config").to_str().unwrap(),
                "--kind",
                "yaml",
                "--output-kind",
                kind,
                "--distro",
                "debian",
                "--directory",
                out.to_str().unwrap(),
            ],
        );
        out
    };
    let networkd =
        std::fs::read_to_string(render("networkd").join("etc/systemd/network/10-cloud-init-nic0.network")).unwrap();
    for want in [
        "MACAddress=02:00:00:00:00:10",
        "Address=10.100.0.10/24",
        "Gateway=10.100.0.1",
        "DNS=10.100.0.1",
    ] {
        assert!(
            networkd.contains(want),
            "no {want} in what cloud-init renders:\n{networkd}"
        );
    }
    // ifupdown, what Debian's cloud images use: the default route must be ifupdown's own
    // `gateway`, not a `post-up route add` that needs net-tools (not installed there).
    let eni = std::fs::read_to_string(render("eni").join("etc/network/interfaces.d/50-cloud-init")).unwrap();
    assert!(
        eni.contains("address 10.100.0.10/24") && eni.contains("gateway 10.100.0.1"),
        "{eni}"
    );
    assert!(
        !eni.contains("route add"),
        "a default route that needs net-tools:\n{eni}"
    );

    // In the guest: found by label, mounted, read.
    let _dev = Loop::attach(&image);
    let found = nocloud_datasource(dir.path());
    assert_eq!(found["found"], true, "{found}");
    assert_eq!(found["metadata"]["local-hostname"], "web", "{found}");
    let iid = found["metadata"]["instance-id"].as_str().unwrap_or_default();
    assert!(iid.starts_with("keel-web-"), "{found}");
    assert_eq!(found["userdata"], s.user_data.as_str());
    let eth = &found["network"]["ethernets"]["nic0"];
    assert_eq!(
        eth["match"]["macaddress"], "02:00:00:00:00:10",
        "a MAC read as a number? {found}"
    );
    assert_eq!(eth["addresses"][0], "10.100.0.10/24", "{found}");
    for key in [&ed, &rsa] {
        assert!(s.user_data.contains(key.as_str()));
    }
}

#[test]
fn keys_from_ssh_keygen_pass_validation_and_mangled_ones_do_not() {
    require_tools();
    let dir = tempfile::tempdir().unwrap();
    let text = |key: &str| {
        format!(
            "version: 1\nguests:\n  - name: web\n    memory: 256MiB\n    cloud_init:\n      ssh_authorized_keys: [\"{key}\"]\n"
        )
    };
    for kind in ["ed25519", "rsa", "ecdsa"] {
        let key = ssh_public_key(dir.path(), kind);
        let loaded = keel_init::config::parse_str(&text(&key));
        assert!(loaded.is_ok(), "{kind}: {:?}", loaded.err());
        let mangled = key.replacen("AAAA", "AAAB", 1);
        let e = keel_init::config::parse_str(&text(&mangled)).expect_err(kind);
        assert!(
            e.render("keel.yaml").contains("keel.yaml:6:"),
            "{kind}: {}",
            e.render("keel.yaml")
        );
    }
}
