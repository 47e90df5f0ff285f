//! The entry GRUB would boot from a `grub.cfg` as `grub-mkconfig` writes it (Debian,
//! Ubuntu): its `set default=`, then that `menuentry` (by number, `N>M` into a submenu,
//! title or `--id`), and in it the `linux`, `initrd` and `search --set=root` lines.
//!
//! This reads GRUB's script as data, not as a program: `if`/`else` are not evaluated
//! (the last `set` of a variable at top level wins, which is what a generated config's
//! `else set default="0"` needs), `$var` takes values from those `set`s and from the
//! `grubenv` file (`load_env`), and an unknown variable is empty.

use std::collections::HashMap;

/// Entries and nesting read at most; a generated config has a few dozen.
const MAX_ENTRIES: usize = 1024;
const MAX_DEPTH: usize = 8;

/// What the default menu entry boots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct GrubEntry {
    pub title: String,
    /// The kernel's path, relative to the entry's root file system.
    pub linux: String,
    pub args: String,
    pub initrds: Vec<String>,
    /// Where GRUB's `root` points for this entry, when the entry says.
    pub root: Option<RootSpec>,
}

/// The file system GRUB's `root` variable names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum RootSpec {
    Uuid(String),
    Label(String),
    /// `(hd0,gptN)` or `set root='hd0,gptN'`.
    Partition(u32),
}

#[derive(Debug, Default)]
struct Menu {
    title: String,
    id: Option<String>,
    /// A submenu's entries; None for a menuentry.
    children: Option<Vec<Menu>>,
    linux: Option<(String, Vec<String>)>,
    initrds: Vec<String>,
    root: Option<RootSpec>,
}

/// The default entry of `cfg`, or why there is none. `env` is grubenv's text.
pub(crate) fn default_entry(cfg: &str, env: Option<&str>) -> Result<GrubEntry, String> {
    let mut vars: HashMap<String, String> = env.map(parse_env).unwrap_or_default();
    let mut top: Vec<Menu> = Vec::new();
    // The open menuentry/submenu blocks, innermost last, and other `{` blocks inside.
    let mut stack: Vec<Menu> = Vec::new();
    let mut count = 0usize;
    let mut default = None;
    for raw in cfg.lines() {
        let words = split_words(raw.trim(), &vars);
        let Some(cmd) = words.first().map(String::as_str) else {
            continue;
        };
        match cmd {
            "menuentry" | "submenu" => {
                count += 1;
                if count > MAX_ENTRIES || stack.len() >= MAX_DEPTH {
                    return Err(format!(
                        "more than {MAX_ENTRIES} entries or {MAX_DEPTH} levels of submenus"
                    ));
                }
                stack.push(Menu {
                    title: words.get(1).cloned().unwrap_or_default(),
                    id: option_value(&words, "--id"),
                    children: (cmd == "submenu").then(Vec::new),
                    ..Menu::default()
                });
            }
            "}" => {
                let Some(done) = stack.pop() else { continue };
                match stack.last_mut() {
                    Some(parent) => parent.children.get_or_insert_with(Vec::new).push(done),
                    None => top.push(done),
                }
            }
            _ => match stack.last_mut() {
                Some(entry) => entry_line(entry, &words),
                None => {
                    // `set k=v` or a bare `k=v`. An empty value is skipped: with if/else
                    // not evaluated it is nearly always a feature test's fallback (the
                    // `menuentry_id_option=""` branch for GRUBs older than 1.99).
                    let assignment = match (cmd, words.len()) {
                        ("set", 2) => words[1].split_once('='),
                        (_, 1) => cmd.split_once('='),
                        _ => None,
                    };
                    if let Some((k, v)) = assignment.filter(|(_, v)| !v.is_empty()) {
                        if k == "default" {
                            default = Some(v.to_string());
                        }
                        vars.insert(k.to_string(), v.to_string());
                    }
                }
            },
        }
    }
    if top.is_empty() {
        return Err("no menuentry".into());
    }
    let wanted = default.filter(|d| !d.is_empty()).unwrap_or_else(|| "0".into());
    let entry = select(&top, &wanted)
        .or_else(|| select(&top, "0"))
        .ok_or("no menuentry with a kernel")?;
    let (linux, args) = entry
        .linux
        .clone()
        .ok_or_else(|| format!("menu entry '{}' has no `linux` line", entry.title))?;
    Ok(GrubEntry {
        title: entry.title.clone(),
        linux,
        args: args.join(" "),
        initrds: entry.initrds.clone(),
        root: entry.root.clone(),
    })
}

/// One command inside a menu entry.
fn entry_line(entry: &mut Menu, words: &[String]) {
    match words[0].as_str() {
        "linux" | "linuxefi" | "linux16" => {
            if let Some(path) = words.get(1) {
                let (dev, path) = strip_device(path);
                if let Some(n) = dev {
                    entry.root = Some(RootSpec::Partition(n));
                }
                entry.linux = Some((path, words[2..].to_vec()));
            }
        }
        "initrd" | "initrdefi" | "initrd16" => {
            entry.initrds = words[1..].iter().map(|p| strip_device(p).1).collect();
        }
        "search" | "search.fs_uuid" | "search.fs_label" => {
            if !words.iter().any(|w| w == "--set=root" || w == "--set") && words[0] == "search" {
                return;
            }
            let value = words[1..].iter().rev().find(|w| !w.starts_with('-')).cloned();
            let label = words[0] == "search.fs_label" || words.iter().any(|w| w == "--label" || w == "-l");
            let uuid = words[0] == "search.fs_uuid" || words.iter().any(|w| w == "--fs-uuid" || w == "-u");
            entry.root = match value {
                Some(v) if uuid => Some(RootSpec::Uuid(v)),
                Some(v) if label => Some(RootSpec::Label(v)),
                _ => entry.root.take(),
            };
        }
        "set" => {
            if let Some(dev) = words.get(1).and_then(|a| a.strip_prefix("root="))
                && let Some(n) = gpt_number(dev)
            {
                entry.root = Some(RootSpec::Partition(n));
            }
        }
        _ => {}
    }
}

/// The entry `wanted` names: `2`, `1>0`, a title or an id, per level.
fn select<'m>(menus: &'m [Menu], wanted: &str) -> Option<&'m Menu> {
    let (head, rest) = match wanted.split_once('>') {
        Some((h, r)) => (h, Some(r)),
        None => (wanted, None),
    };
    let found = match head.parse::<usize>() {
        Ok(i) => menus.get(i),
        Err(_) => menus.iter().find(|m| m.title == head || m.id.as_deref() == Some(head)),
    }?;
    match (&found.children, rest) {
        (Some(children), Some(rest)) => select(children, rest),
        // GRUB boots a submenu named alone through its first entry.
        (Some(children), None) => select(children, "0"),
        (None, None) => Some(found),
        (None, Some(_)) => None,
    }
}

/// `(hd0,gpt16)/vmlinuz` → (Some(16), "/vmlinuz"); `($root)/x` → (None, "/x").
fn strip_device(path: &str) -> (Option<u32>, String) {
    if let Some(rest) = path.strip_prefix('(')
        && let Some((dev, p)) = rest.split_once(')')
    {
        return (gpt_number(dev), p.to_string());
    }
    (None, path.to_string())
}

/// `hd0,gpt16` or `hd0,msdos1` → 16 / 1.
fn gpt_number(dev: &str) -> Option<u32> {
    let part = dev.rsplit(',').next()?;
    part.trim_start_matches("gpt")
        .trim_start_matches("msdos")
        .parse()
        .ok()
        .filter(|_| dev.contains(','))
}

/// `--id VALUE` anywhere among the words.
fn option_value(words: &[String], flag: &str) -> Option<String> {
    words
        .iter()
        .position(|w| w == flag)
        .and_then(|i| words.get(i + 1))
        .cloned()
}

/// grubenv: `name=value` lines after a `# GRUB Environment Block` header, `#` padding.
fn parse_env(text: &str) -> HashMap<String, String> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Splits a script line into words the way GRUB's lexer does for these commands: blanks
/// separate, '…' is literal, "…" and bare words expand `$name` and `${name}`, `\` escapes
/// one character, `#` at a word's start begins a comment, `;` ends the command (the rest
/// of `if …; then` is ignored). A word that expands to nothing is dropped.
fn split_words(line: &str, vars: &HashMap<String, String>) -> Vec<String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut has_word = false;
    let mut chars = line.chars().peekable();
    let mut quote: Option<char> = None;
    while let Some(c) = chars.next() {
        match (quote, c) {
            (Some('\''), '\'') | (Some('"'), '"') => quote = None,
            (Some('\''), _) => cur.push(c),
            (None, '\'' | '"') => {
                quote = Some(c);
                has_word = true;
            }
            (_, '\\') => {
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
                has_word = true;
            }
            (_, '$') => {
                let name: String = if chars.peek() == Some(&'{') {
                    chars.next();
                    chars.by_ref().take_while(|&c| c != '}').collect()
                } else {
                    let mut n = String::new();
                    while let Some(&c) = chars.peek().filter(|c| c.is_ascii_alphanumeric() || **c == '_') {
                        n.push(c);
                        chars.next();
                    }
                    n
                };
                cur.push_str(vars.get(&name).map_or("", String::as_str));
            }
            (None, '#') if cur.is_empty() && !has_word => break,
            (None, ';') => break,
            (None, c) if c.is_whitespace() => {
                if !cur.is_empty() {
                    words.push(std::mem::take(&mut cur));
                }
                has_word = false;
            }
            (_, c) => {
                cur.push(c);
                has_word = true;
            }
        }
    }
    if !cur.is_empty() {
        words.push(cur);
    }
    words
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shape of Debian 12 genericcloud's generated /boot/grub/grub.cfg.
    pub(crate) const DEBIAN: &str = r#"
if [ -s $prefix/grubenv ]; then
  set have_grubenv=true
  load_env
fi
if [ "${next_entry}" ] ; then
   set default="${next_entry}"
   set next_entry=
   save_env next_entry
   set boot_once=true
else
   set default="0"
fi
if [ x"${feature_menuentry_id}" = xy ]; then
  menuentry_id_option="--id"
else
  menuentry_id_option=""
fi
menuentry 'Debian GNU/Linux' --class debian --class gnu-linux $menuentry_id_option 'gnulinux-simple-0f3d' {
	load_video
	insmod gzio
	if [ x$grub_platform = xxen ]; then insmod xzio; insmod lzopio; fi
	insmod part_gpt
	insmod ext2
	search --no-floppy --fs-uuid --set=root 0f3d2c1a-1111-2222-3333-444455556666
	echo	'Loading Linux 6.1.0-28-cloud-amd64 ...'
	linux	/boot/vmlinuz-6.1.0-28-cloud-amd64 root=PARTUUID=aa-bb ro  console=tty0 console=ttyS0,115200 earlyprintk=ttyS0,115200 consoleblank=0
	echo	'Loading initial ramdisk ...'
	initrd	/boot/initrd.img-6.1.0-28-cloud-amd64
}
submenu 'Advanced options for Debian GNU/Linux' $menuentry_id_option 'gnulinux-advanced-0f3d' {
	menuentry 'Debian GNU/Linux, with Linux 6.1.0-28-cloud-amd64' --class debian $menuentry_id_option 'gnulinux-6.1.0-28-advanced-0f3d' {
		linux	/boot/vmlinuz-6.1.0-28-cloud-amd64 root=PARTUUID=aa-bb ro
		initrd	/boot/initrd.img-6.1.0-28-cloud-amd64
	}
	menuentry 'Debian GNU/Linux, with Linux 6.1.0-27-cloud-amd64' --class debian $menuentry_id_option 'gnulinux-6.1.0-27-advanced-0f3d' {
		linux	/boot/vmlinuz-6.1.0-27-cloud-amd64 root=PARTUUID=aa-bb ro single
		initrd	/boot/intel-ucode.img /boot/initrd.img-6.1.0-27-cloud-amd64
	}
}
"#;

    #[test]
    fn debian_default_entry() {
        let e = default_entry(DEBIAN, None).expect("entry");
        assert_eq!(e.title, "Debian GNU/Linux");
        assert_eq!(e.linux, "/boot/vmlinuz-6.1.0-28-cloud-amd64");
        assert_eq!(
            e.args,
            "root=PARTUUID=aa-bb ro console=tty0 console=ttyS0,115200 earlyprintk=ttyS0,115200 consoleblank=0"
        );
        assert_eq!(e.initrds, ["/boot/initrd.img-6.1.0-28-cloud-amd64"]);
        assert_eq!(
            e.root,
            Some(RootSpec::Uuid("0f3d2c1a-1111-2222-3333-444455556666".into()))
        );
    }

    #[test]
    fn next_entry_and_saved_entry_come_from_grubenv() {
        let env = "# GRUB Environment Block\nnext_entry=1>1\n#######";
        let e = default_entry(DEBIAN, Some(env)).expect("entry");
        // The last `set default` wins: a generated config's else branch sets "0".
        assert_eq!(e.title, "Debian GNU/Linux");
        let saved = DEBIAN.replace("set default=\"0\"", "set default=\"${saved_entry}\"");
        let env = "# GRUB Environment Block\nsaved_entry=gnulinux-advanced-0f3d>gnulinux-6.1.0-27-advanced-0f3d\n";
        let e = default_entry(&saved, Some(env)).expect("entry");
        assert_eq!(e.linux, "/boot/vmlinuz-6.1.0-27-cloud-amd64");
        assert_eq!(e.args, "root=PARTUUID=aa-bb ro single");
        assert_eq!(
            e.initrds,
            ["/boot/intel-ucode.img", "/boot/initrd.img-6.1.0-27-cloud-amd64"]
        );
        assert_eq!(e.root, None, "this entry has no search line");
    }

    #[test]
    fn default_by_number_title_and_submenu_path() {
        for (default, kernel) in [
            ("1>1", "/boot/vmlinuz-6.1.0-27-cloud-amd64"),
            (
                "Advanced options for Debian GNU/Linux>Debian GNU/Linux, with Linux 6.1.0-27-cloud-amd64",
                "/boot/vmlinuz-6.1.0-27-cloud-amd64",
            ),
            ("1", "/boot/vmlinuz-6.1.0-28-cloud-amd64"),
            ("gnulinux-simple-0f3d", "/boot/vmlinuz-6.1.0-28-cloud-amd64"),
            // GRUB falls back to the first entry when the default names nothing.
            ("no-such-entry", "/boot/vmlinuz-6.1.0-28-cloud-amd64"),
        ] {
            let cfg = DEBIAN.replace("set default=\"0\"", &format!("set default=\"{default}\""));
            assert_eq!(
                default_entry(&cfg, None).expect("entry").linux,
                kernel,
                "default {default}"
            );
        }
    }

    #[test]
    fn ubuntu_separate_boot_partition_and_device_paths() {
        let cfg = "set default=0\nset vt_handoff=vt.handoff=7\nmenuentry 'Ubuntu' {\n\tsearch --no-floppy --fs-uuid --set=root 5c2e\n\tlinux\t/vmlinuz-6.8.0-31-generic root=LABEL=cloudimg-rootfs ro console=tty1 console=ttyS0 $vt_handoff\n\tinitrd\t/initrd.img-6.8.0-31-generic\n}\nmenuentry 'other' {\n\tlinux (hd0,gpt2)/vmlinuz\n}\n";
        let e = default_entry(cfg, None).expect("entry");
        assert_eq!(e.linux, "/vmlinuz-6.8.0-31-generic");
        assert!(e.args.ends_with("console=ttyS0 vt.handoff=7"), "{}", e.args);
        assert_eq!(e.root, Some(RootSpec::Uuid("5c2e".into())));
        let e = default_entry(&cfg.replace("default=0", "default=1"), None).expect("entry");
        assert_eq!((e.linux.as_str(), e.root), ("/vmlinuz", Some(RootSpec::Partition(2))));
    }

    #[test]
    fn configs_without_a_kernel_are_errors() {
        assert_eq!(default_entry("set timeout=5\n", None).unwrap_err(), "no menuentry");
        let err = default_entry("menuentry 'x' {\n chainloader +1\n}\n", None).unwrap_err();
        assert!(err.contains("no `linux` line"), "{err}");
        let deep = "submenu a {\n".repeat(20);
        assert!(default_entry(&deep, None).unwrap_err().contains("levels"));
    }

    #[test]
    fn words_follow_grub_quoting() {
        let vars = HashMap::from([("a".to_string(), "x y".to_string())]);
        assert_eq!(
            split_words(r#"linux '/b c' "$a" ${a}z \$a # no"#, &vars),
            ["linux", "/b c", "x y", "x yz", "$a"]
        );
        assert_eq!(split_words("# comment", &vars), Vec::<String>::new());
        assert_eq!(split_words("if [ x ]; then insmod y; fi", &vars), ["if", "[", "x", "]"]);
    }
}
