//! `cloud_init:` on a guest — what Keel writes to the guest's NoCloud seed (a small
//! read-only disk labelled `CIDATA`): either the usual settings, from which Keel makes
//! the `#cloud-config` document, or a whole document of the operator's own.

use super::*;

/// cloud-init settings for a guest. keel-init attaches a NoCloud seed disk (vfat,
/// label `CIDATA`, after the guest's own disks) with `meta-data` (instance-id changes
/// when these settings change; local-hostname is the guest's name), `user-data` and
/// `network-config` (version 2: the static lease of each NIC's MAC, else DHCP).
#[derive(Clone, Debug, Default, PartialEq, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CloudInit {
    /// OpenSSH public keys for the image's default user (`debian` on Debian's cloud
    /// images, `ubuntu` on Ubuntu's).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ssh_authorized_keys: Vec<Spanned<String>>,
    /// Further users to create.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub users: Vec<CloudUser>,
    /// Packages to install on first boot (needs the guest to reach a mirror).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub packages: Vec<Spanned<String>>,
    /// Shell commands run once, on first boot, after everything else.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub runcmd: Vec<Spanned<String>>,
    /// A whole user-data document instead of the fields above; starts with
    /// `#cloud-config`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_data: Option<Spanned<String>>,
    /// The same, from a file in a pool (POOL/FILE), read at every start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_data_file: Option<Spanned<PoolPath>>,
}

impl Decode for CloudInit {
    fn decode(node: &Node, d: &mut Diagnostics) -> Option<Self> {
        let mut m = MapReader::new(node, "cloud_init", d)?;
        let ssh_authorized_keys = m.or_default("ssh_authorized_keys");
        let users = m.or_default("users");
        let packages = m.or_default("packages");
        let runcmd = m.or_default("runcmd");
        let user_data = m.optional("user_data");
        let user_data_file = m.optional("user_data_file");
        m.finish();
        build!(CloudInit {
            ssh_authorized_keys,
            users,
            packages,
            runcmd,
            user_data,
            user_data_file
        })
    }
}

impl CloudInit {
    /// Whether any of the fields Keel turns into a `#cloud-config` document is set.
    pub fn has_generated_fields(&self) -> bool {
        !(self.ssh_authorized_keys.is_empty()
            && self.users.is_empty()
            && self.packages.is_empty()
            && self.runcmd.is_empty())
    }
}

/// A user cloud-init creates in the guest.
#[derive(Clone, Debug, PartialEq, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CloudUser {
    /// A Linux user name: lowercase letters, digits, `_` and `-`, at most 32.
    pub name: Spanned<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ssh_authorized_keys: Vec<Spanned<String>>,
    /// Passwordless sudo.
    #[serde(default)]
    pub sudo: bool,
    /// Supplementary groups (created by cloud-init if missing).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<Spanned<String>>,
    /// Login shell, default /bin/bash.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shell: Option<Spanned<String>>,
}

impl Decode for CloudUser {
    fn decode(node: &Node, d: &mut Diagnostics) -> Option<Self> {
        let mut m = MapReader::new(node, "cloud_init user", d)?;
        let name = m.required("name");
        let ssh_authorized_keys = m.or_default("ssh_authorized_keys");
        let sudo = m.optional("sudo").map(|v| v.unwrap_or(false));
        let groups = m.or_default("groups");
        let shell = m.optional("shell");
        m.finish();
        build!(CloudUser {
            name,
            ssh_authorized_keys,
            sudo,
            groups,
            shell
        })
    }
}
