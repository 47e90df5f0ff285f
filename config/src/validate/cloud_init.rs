//! `cloud_init:` on guests: what cloud-init in the guest would trip over, found here at
//! line:col instead — a user-data document that is not `#cloud-config` YAML, SSH keys
//! that are not OpenSSH public keys, user names Linux refuses.

use super::*;
use crate::schema::CloudInit;
use crate::yaml::Value;

/// The most a user-data document may hold (a `user_data_file` is read up to this).
pub const MAX_USER_DATA: usize = 1 << 20;

pub(super) fn check_cloud_init(cfg: &Config, g: &Guest, c: &CloudInit, d: &mut Diagnostics) {
    let own_document = c
        .user_data
        .as_ref()
        .map(|u| u.pos)
        .or(c.user_data_file.as_ref().map(|u| u.pos));
    if let (Some(_), Some(file)) = (&c.user_data, &c.user_data_file) {
        d.error(file.pos, "give `user_data` or `user_data_file`, not both");
    }
    if let Some(at) = own_document
        && c.has_generated_fields()
    {
        d.error(
            at,
            "a whole user-data document replaces the one Keel makes from ssh_authorized_keys, users, packages and runcmd; put those into the document, or leave the document out",
        );
    }
    if let Some(u) = &c.user_data
        && let Err(msg) = check_cloud_config(u)
    {
        d.error(u.pos, format!("user_data: {msg}"));
    }
    if let Some(f) = &c.user_data_file {
        check_pool_ref(cfg, f, "user_data_file", d);
    }
    check_keys(&c.ssh_authorized_keys, d);
    let mut seen: HashMap<&str, Pos> = HashMap::new();
    for u in &c.users {
        if let Err(msg) = check_user_name(&u.name) {
            d.error(u.name.pos, format!("user `{}`: {msg}", u.name.value));
        } else if let Some(first) = seen.insert(u.name.as_str(), u.name.pos) {
            d.error(
                u.name.pos,
                format!(
                    "user `{}` is declared twice (first at line {})",
                    u.name.value, first.line
                ),
            );
        }
        check_keys(&u.ssh_authorized_keys, d);
        for grp in &u.groups {
            if let Err(msg) = check_user_name(grp) {
                d.error(grp.pos, format!("group `{}`: {msg}", grp.value));
            }
        }
        if let Some(sh) = &u.shell
            && (!sh.starts_with('/') || sh.contains(char::is_whitespace))
        {
            d.error(
                sh.pos,
                format!("shell `{}` is not an absolute path such as /bin/bash", sh.value),
            );
        }
    }
    for p in &c.packages {
        if p.is_empty() || p.contains(char::is_whitespace) {
            d.error(
                p.pos,
                format!("package `{}` is not a package name (one name per entry)", p.value),
            );
        }
    }
    for r in &c.runcmd {
        if r.trim().is_empty() {
            d.error(r.pos, "an empty runcmd entry; remove it");
        }
    }
    let bundled_userland =
        g.boot.value == BootSource::Kernel && matches!(g.initrd.as_ref().map(|i| &i.value), Some(BootFile::Default));
    if bundled_userland {
        d.warning(
            g.name.pos,
            format!(
                "guest `{}` runs Keel's bundled busybox userland, which has no cloud-init: the seed is attached but nothing reads it (use `boot: disk` with a cloud image)",
                g.name.value
            ),
        );
    }
}

/// Checks a whole user-data document: `#cloud-config` on its first line, then YAML
/// whose top level is a mapping. Shared with keel-init, which checks a
/// `user_data_file` this way at every start.
pub fn check_cloud_config(text: &str) -> Result<(), String> {
    if text.len() > MAX_USER_DATA {
        return Err(format!(
            "the document is {} bytes; at most {MAX_USER_DATA} (1 MiB)",
            text.len()
        ));
    }
    let first = text.lines().next().unwrap_or("").trim_end();
    if first != "#cloud-config" {
        return Err(format!(
            "the document starts with `{}`; a cloud-config document starts with the line `#cloud-config`",
            first.chars().take(40).collect::<String>()
        ));
    }
    let node = crate::yaml::parse(text).map_err(|e| {
        format!(
            "line {} column {} of the document: YAML syntax: {}",
            e.pos.line, e.pos.col, e.message
        )
    })?;
    match &node.value {
        Value::Map(_) => Ok(()),
        Value::Scalar(s) if s.is_null() => Ok(()),
        _ => Err(format!(
            "the document is {}; cloud-config is a mapping (`key: value` lines)",
            node.kind()
        )),
    }
}

fn check_keys(keys: &[Spanned<String>], d: &mut Diagnostics) {
    for k in keys {
        if let Err(e) = ssh_key::PublicKey::from_openssh(k.trim()) {
            d.error(
                k.pos,
                format!(
                    "not an OpenSSH public key ({e}); paste the one line of a .pub file, e.g. ~/.ssh/id_ed25519.pub: `ssh-ed25519 AAAA... you@host`"
                ),
            );
        }
    }
}

/// Debian's default NAME_REGEX for users and groups, and useradd's 32-character limit.
fn check_user_name(name: &str) -> Result<(), &'static str> {
    let mut bytes = name.bytes();
    let first_ok = matches!(bytes.next(), Some(b'a'..=b'z' | b'_'));
    let rest_ok = bytes.all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-'));
    if name.is_empty() || name.len() > 32 {
        Err("a user or group name has 1 to 32 characters")
    } else if !first_ok || !rest_ok {
        Err("use lowercase letters, digits, `_` and `-`, starting with a letter or `_`")
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cloud_config_documents() {
        assert!(check_cloud_config("#cloud-config\nruncmd: [echo hi]\n").is_ok());
        assert!(check_cloud_config("#cloud-config\n").is_ok());
        let e = check_cloud_config("#!/bin/sh\necho hi\n").unwrap_err();
        assert!(e.contains("starts with `#!/bin/sh`"), "{e}");
        let e = check_cloud_config("#cloud-config\nruncmd: [echo\n").unwrap_err();
        assert!(e.starts_with("line "), "{e}");
        let e = check_cloud_config("#cloud-config\n- a\n- b\n").unwrap_err();
        assert!(e.contains("a list"), "{e}");
    }

    #[test]
    fn user_names() {
        for ok in ["debian", "_svc", "a-b_c9"] {
            assert!(check_user_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "Alice", "9lives", "a b", &"x".repeat(33)] {
            assert!(check_user_name(bad).is_err(), "{bad}");
        }
    }
}
