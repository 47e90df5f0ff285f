//! `guests:` — each guest: size, boot files, disks, NICs, restart policy and deadlines;
//! and what Keel derives from it (its kernel command line, its NICs' MACs).

use super::*;

// ------------------------------------------------------------------ guests

/// A virtual machine run by keel-vmm.
#[derive(Clone, Debug, PartialEq, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Guest {
    /// Guest name: lowercase letters, digits and `-`, at most 32 characters.
    pub name: Spanned<String>,
    /// Number of virtual CPUs (1-32, keel-vmm's limit).
    #[serde(default = "default_vcpus")]
    pub vcpus: Spanned<u32>,
    /// Guest RAM, e.g. 512MiB (at least 16MiB).
    pub memory: Spanned<ByteSize>,
    /// Where the kernel comes from: `kernel` (the `kernel:`/`initrd:` fields) or `disk`
    /// (what the guest's first disk would boot by itself).
    #[serde(default = "default_boot")]
    pub boot: Spanned<BootSource>,
    /// `default` (the appliance's bundled guest kernel) or a file in a pool.
    #[serde(default = "default_kernel")]
    pub kernel: Spanned<BootFile>,
    /// Initramfs: `default` (the appliance's bundled minimal guest userland) or a
    /// file in a pool. None when left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<Spanned<BootFile>>,
    /// Kernel command line (Keel adds the console and virtio-mmio devices).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<Spanned<String>>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<Disk>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nics: Vec<Nic>,
    /// A cloud-init NoCloud seed for the guest (see [`CloudInit`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloud_init: Option<CloudInit>,
    /// Start the guest when the appliance boots.
    #[serde(default = "default_true")]
    pub autostart: bool,
    #[serde(default)]
    pub restart: Restart,
    /// How long keel-vmm may take to report the guest running (devices attached,
    /// vCPUs started) before it is killed and the restart policy applies.
    #[serde(default = "default_guest_timeout")]
    pub start_timeout: Spanned<Duration>,
    /// How long a graceful stop (power button) waits before the VMM is killed, unless
    /// `keelctl stop --timeout` says otherwise.
    #[serde(default = "default_guest_timeout")]
    pub stop_timeout: Spanned<Duration>,
}

/// The default start and stop timeout (30 s).
pub const DEFAULT_GUEST_TIMEOUT: Duration = Duration::secs(30);
/// The longest start or stop timeout accepted.
pub const MAX_GUEST_TIMEOUT: Duration = Duration::secs(3600);

fn default_guest_timeout() -> Spanned<Duration> {
    Spanned::new(DEFAULT_GUEST_TIMEOUT, Default::default())
}

fn default_vcpus() -> Spanned<u32> {
    Spanned::new(1, Default::default())
}
fn default_boot() -> Spanned<BootSource> {
    Spanned::new(BootSource::Kernel, Default::default())
}
fn default_kernel() -> Spanned<BootFile> {
    Spanned::new(BootFile::Default, Default::default())
}
fn default_true() -> bool {
    true
}

impl Decode for Guest {
    fn decode(node: &Node, d: &mut Diagnostics) -> Option<Self> {
        let mut m = MapReader::new(node, "guest", d)?;
        let name = m.required("name");
        let vcpus = m.optional("vcpus").map(|v| v.unwrap_or_else(default_vcpus));
        let memory = m.required("memory");
        let boot = m.optional("boot").map(|v| v.unwrap_or_else(default_boot));
        let kernel = m.optional("kernel").map(|v| v.unwrap_or_else(default_kernel));
        let initrd = m.optional("initrd");
        let cmdline = m.optional("cmdline");
        let disks = m.or_default("disks");
        let nics = m.or_default("nics");
        let cloud_init = m.optional("cloud_init");
        let autostart = m.optional("autostart").map(|v| v.unwrap_or(true));
        let restart = m.or_default("restart");
        let start_timeout = m
            .optional("start_timeout")
            .map(|v| v.unwrap_or_else(default_guest_timeout));
        let stop_timeout = m
            .optional("stop_timeout")
            .map(|v| v.unwrap_or_else(default_guest_timeout));
        m.finish();
        build!(Guest {
            name,
            vcpus,
            memory,
            boot,
            kernel,
            initrd,
            cmdline,
            disks,
            nics,
            cloud_init,
            autostart,
            restart,
            start_timeout,
            stop_timeout
        })
    }
}

/// Where a guest's kernel, initramfs and command line come from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum BootSource {
    /// `kernel:` and `initrd:` (the appliance's bundled guest kernel unless they say
    /// otherwise) and Keel's command line plus `cmdline:`.
    #[default]
    Kernel,
    /// What the guest's first disk would boot by itself: its GRUB configuration's
    /// default entry, its Boot Loader Specification entries, or its `/vmlinuz` and
    /// `/initrd.img` links; read again at every start, so a guest that upgraded its
    /// kernel boots the new one. Keel's console settings and `cmdline:` are appended.
    Disk,
}

impl Decode for BootSource {
    fn decode(node: &Node, d: &mut Diagnostics) -> Option<Self> {
        one_of(node, &[("kernel", BootSource::Kernel), ("disk", BootSource::Disk)], d)
    }
}

/// A guest's kernel or initramfs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BootFile {
    /// The one bundled in the appliance image.
    Default,
    /// A file in a storage pool.
    Pool(PoolPath),
}

impl std::fmt::Display for BootFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BootFile::Default => f.write_str("default"),
            BootFile::Pool(p) => p.fmt(f),
        }
    }
}

impl Serialize for BootFile {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl JsonSchema for BootFile {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "BootFile".into()
    }
    fn json_schema(g: &mut schemars::SchemaGenerator) -> schemars::Schema {
        let path = g.subschema_for::<PoolPath>();
        schemars::json_schema!({
            "description": "`default` (bundled in the appliance) or POOL/FILE",
            "anyOf": [{ "const": "default" }, path]
        })
    }
}

impl Decode for BootFile {
    fn decode(node: &Node, d: &mut Diagnostics) -> Option<Self> {
        let text = scalar(node, "`default` or a pool path such as images/vmlinuz", d)?;
        if text == "default" {
            return Some(BootFile::Default);
        }
        match text.parse() {
            Ok(p) => Some(BootFile::Pool(p)),
            Err(msg) => {
                d.error(node.pos, format!("{msg}, or `default`"));
                None
            }
        }
    }
}

/// A virtio-blk disk backed by a volume (a sparse raw file) in a pool.
#[derive(Clone, Debug, PartialEq, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Disk {
    /// The volume, POOL/NAME. Created on first use; never deleted by Keel.
    pub volume: Spanned<PoolPath>,
    /// Size of the volume when Keel creates it.
    pub size: Spanned<ByteSize>,
    /// Attach read-only.
    #[serde(default)]
    pub readonly: bool,
    /// Seed a new volume from this file (POOL/FILE): a clone (reflink, else a sparse copy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<Spanned<PoolPath>>,
    /// Seed a new volume from an imported image (POOL/NAME, from `keelctl image
    /// import`): the same as `source: POOL/images/NAME.raw`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<Spanned<PoolPath>>,
}

impl Disk {
    /// The file a new volume is seeded from: `source`, or the file of `image`.
    pub fn seed_source(&self) -> Option<PoolPath> {
        match (&self.source, &self.image) {
            (Some(s), _) => Some(s.value.clone()),
            (None, Some(i)) => Some(PoolPath {
                pool: i.pool.clone(),
                path: format!("images/{}.raw", i.path),
            }),
            (None, None) => None,
        }
    }
}

impl Decode for Disk {
    fn decode(node: &Node, d: &mut Diagnostics) -> Option<Self> {
        let mut m = MapReader::new(node, "disk", d)?;
        let volume = m.required("volume");
        let size = m.required("size");
        let readonly = m.optional("readonly").map(|v| v.unwrap_or(false));
        let source = m.optional("source");
        let image = m.optional("image");
        m.finish();
        build!(Disk {
            volume,
            size,
            readonly,
            source,
            image
        })
    }
}

/// A virtio-net NIC on a bridge.
#[derive(Clone, Debug, PartialEq, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Nic {
    /// Name of a bridge declared under network.bridges.
    pub bridge: Spanned<String>,
    /// `auto` (stable, derived from the guest name and NIC index, locally
    /// administered) or a fixed unicast MAC.
    #[serde(default = "default_mac")]
    pub mac: Spanned<MacSpec>,
}

fn default_mac() -> Spanned<MacSpec> {
    Spanned::new(MacSpec::Auto, Default::default())
}

impl Decode for Nic {
    fn decode(node: &Node, d: &mut Diagnostics) -> Option<Self> {
        let mut m = MapReader::new(node, "nic", d)?;
        let bridge = m.required("bridge");
        let mac = m.optional("mac").map(|v| v.unwrap_or_else(default_mac));
        m.finish();
        build!(Nic { bridge, mac })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MacSpec {
    Auto,
    Fixed(MacAddr),
}

impl std::fmt::Display for MacSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MacSpec::Auto => f.write_str("auto"),
            MacSpec::Fixed(m) => m.fmt(f),
        }
    }
}

impl Serialize for MacSpec {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl JsonSchema for MacSpec {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "MacSpec".into()
    }
    fn json_schema(g: &mut schemars::SchemaGenerator) -> schemars::Schema {
        let mac = g.subschema_for::<MacAddr>();
        schemars::json_schema!({ "anyOf": [{ "const": "auto" }, mac] })
    }
}

impl Decode for MacSpec {
    fn decode(node: &Node, d: &mut Diagnostics) -> Option<Self> {
        let text = scalar(node, "`auto` or a MAC address", d)?;
        if text == "auto" {
            return Some(MacSpec::Auto);
        }
        match text.parse() {
            Ok(m) => Some(MacSpec::Fixed(m)),
            Err(msg) => {
                d.error(node.pos, format!("{msg}, or `auto`"));
                None
            }
        }
    }
}

/// What the supervisor does when the guest's VMM exits.
#[derive(Clone, Debug, PartialEq, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Restart {
    #[serde(default)]
    pub policy: RestartPolicy,
    /// Delay before the first restart; it doubles on each further restart.
    #[serde(default = "default_backoff")]
    pub backoff: Spanned<Duration>,
    /// Upper bound of the delay.
    #[serde(default = "default_max_backoff")]
    pub max_backoff: Spanned<Duration>,
    /// Crash-loop limit: after this many restarts within `window`, the guest
    /// stays `crashed` until an operator starts it.
    #[serde(default = "default_max_restarts")]
    pub max_restarts: Spanned<u32>,
    #[serde(default = "default_window")]
    pub window: Spanned<Duration>,
}

fn default_backoff() -> Spanned<Duration> {
    Spanned::new(Duration::secs(1), Default::default())
}
fn default_max_backoff() -> Spanned<Duration> {
    Spanned::new(Duration::secs(300), Default::default())
}
fn default_max_restarts() -> Spanned<u32> {
    Spanned::new(10, Default::default())
}
fn default_window() -> Spanned<Duration> {
    Spanned::new(Duration::secs(600), Default::default())
}

impl Default for Restart {
    fn default() -> Self {
        Restart {
            policy: RestartPolicy::default(),
            backoff: default_backoff(),
            max_backoff: default_max_backoff(),
            max_restarts: default_max_restarts(),
            window: default_window(),
        }
    }
}

impl Decode for Restart {
    fn decode(node: &Node, d: &mut Diagnostics) -> Option<Self> {
        let mut m = MapReader::new(node, "restart", d)?;
        let policy = m.or_default("policy");
        let backoff = m.optional("backoff").map(|v| v.unwrap_or_else(default_backoff));
        let max_backoff = m.optional("max_backoff").map(|v| v.unwrap_or_else(default_max_backoff));
        let max_restarts = m
            .optional("max_restarts")
            .map(|v| v.unwrap_or_else(default_max_restarts));
        let window = m.optional("window").map(|v| v.unwrap_or_else(default_window));
        m.finish();
        build!(Restart {
            policy,
            backoff,
            max_backoff,
            max_restarts,
            window
        })
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    /// Restart whenever the guest stops, even after a clean poweroff.
    Always,
    /// Restart when the VMM fails or the guest crashes; a guest poweroff stays off.
    #[default]
    OnFailure,
    /// Never restart.
    Never,
}

impl Decode for RestartPolicy {
    fn decode(node: &Node, d: &mut Diagnostics) -> Option<Self> {
        use RestartPolicy::*;
        one_of(
            node,
            &[("always", Always), ("on-failure", OnFailure), ("never", Never)],
            d,
        )
    }
}

impl Guest {
    /// The kernel command line keel-vmm is given: Keel's part, then the operator's.
    /// keel-vmm appends one `virtio_mmio.device=` entry per device after it.
    pub fn kernel_cmdline(&self) -> String {
        self.kernel_cmdline_after(None)
    }

    /// The same, after the command line a `boot: disk` image gives its kernel: the
    /// image's part first, so Keel's `console=ttyS0` is the last console (the one
    /// `/dev/console` is) even when the image names `console=tty0`.
    pub fn kernel_cmdline_after(&self, image: Option<&str>) -> String {
        let mut cmdline = match image.map(str::trim).filter(|i| !i.is_empty()) {
            Some(i) => format!("{i} {}", base_cmdline(&self.name)),
            None => base_cmdline(&self.name),
        };
        if let Some(extra) = &self.cmdline {
            cmdline.push(' ');
            cmdline.push_str(extra);
        }
        cmdline
    }

    /// The virtio devices keel-vmm gives this guest (disks, the cloud-init seed, then
    /// NICs): what counts against its device limit.
    pub fn virtio_devices(&self) -> usize {
        self.disks.len() + usize::from(self.cloud_init.is_some()) + self.nics.len()
    }

    /// The MAC of NIC `index`: the fixed one, or for `auto` one derived from the
    /// guest's name and the index, so it stays the same across reboots and
    /// re-applies. Locally administered (bit 1) and unicast (bit 0 clear).
    pub fn nic_mac(&self, index: usize) -> MacAddr {
        match self.nics.get(index).map(|n| n.mac.value) {
            Some(MacSpec::Fixed(m)) => m,
            _ => auto_mac(&self.name, index),
        }
    }
}

/// What Keel puts on every guest's command line before the operator's part:
/// the serial console, reboot through the i8042 (which ends keel-vmm with its
/// reboot code), no PCI probing (devices are virtio-mmio), and the guest's name
/// for its own init to read.
pub fn base_cmdline(guest: &str) -> String {
    format!("console=ttyS0 reboot=k panic=1 pci=off keel.guest={guest}")
}

/// The stable `auto` MAC for a guest's NIC.
pub fn auto_mac(guest: &str, index: usize) -> MacAddr {
    use sha2::{Digest, Sha256};
    let h = Sha256::digest(format!("keel-nic-mac\0{guest}\0{index}").as_bytes());
    MacAddr([(h[0] & 0xfc) | 0x02, h[1], h[2], h[3], h[4], h[5]])
}
