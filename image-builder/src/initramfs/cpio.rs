//! A reproducible writer for the "newc" cpio format (magic `070701`), the format the Linux
//! kernel unpacks an initramfs from.
//!
//! The archive is a function of its entries only: entries are sorted by path (so a
//! directory always precedes what it holds), inode numbers are assigned in that order
//! starting at 1, every entry carries the same mtime, owner and group are 0, and there are
//! no device nodes or hard links (the kernel's devtmpfs provides /dev).
//!
//! Layout of one entry: a 110-byte ASCII header of 13 eight-digit hex fields, the path
//! (without a leading `/`) with its NUL, padding to 4 bytes, the data, padding to 4 bytes.
//! The archive ends with the entry `TRAILER!!!`.

use std::collections::BTreeMap;
use std::io::{self, Write};

use super::InitramfsError;

const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;
const TRAILER: &str = "TRAILER!!!";

/// What a path in the archive is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    Dir { mode: u32 },
    File { mode: u32, data: Vec<u8> },
    Symlink { target: String },
}

/// An in-memory cpio archive, keyed by normalized path (`bin/busybox`, no leading `/`).
#[derive(Debug, Default, Clone)]
pub struct Archive {
    entries: BTreeMap<String, Entry>,
}

impl Archive {
    /// Adds an entry, creating missing parent directories (mode 0755).
    ///
    /// Adding the same path twice is accepted when the entry is identical (two binaries
    /// needing the same library) and an error otherwise; a directory may be re-added with
    /// a new mode.
    pub fn insert(&mut self, path: &str, entry: Entry) -> Result<(), InitramfsError> {
        let path = normalize(path)?;
        let mut parent = String::new();
        for component in path
            .split('/')
            .collect::<Vec<_>>()
            .split_last()
            .map_or(&[][..], |(_, p)| p)
        {
            if !parent.is_empty() {
                parent.push('/');
            }
            parent.push_str(component);
            match self.entries.get(&parent) {
                None => {
                    self.entries.insert(parent.clone(), Entry::Dir { mode: 0o755 });
                }
                Some(Entry::Dir { .. }) => {}
                Some(_) => {
                    return Err(InitramfsError::NotADirectory {
                        path: format!("/{parent}"),
                    });
                }
            }
        }
        match (self.entries.get(&path), &entry) {
            (None, _) => {}
            (Some(Entry::Dir { .. }), Entry::Dir { .. }) => {}
            (Some(old), new) if old == new => return Ok(()),
            (Some(_), _) => {
                return Err(InitramfsError::Conflict {
                    path: format!("/{path}"),
                });
            }
        }
        self.entries.insert(path, entry);
        Ok(())
    }

    /// The entry at `path`, if any.
    pub fn get(&self, path: &str) -> Option<&Entry> {
        normalize(path).ok().and_then(|p| self.entries.get(&p))
    }

    /// Paths in archive order.
    pub fn paths(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    /// Writes the archive with every entry's mtime set to `mtime` (seconds since 1970).
    pub fn write_to(&self, mut out: impl Write, mtime: u32) -> io::Result<()> {
        for (index, (path, entry)) in self.entries.iter().enumerate() {
            // Inode 0 is avoided; u32 wraps only past 4 billion entries.
            let ino = u32::try_from(index + 1).map_err(|_| io::Error::other("more than 2^32 cpio entries"))?;
            let (mode, nlink, data): (u32, u32, &[u8]) = match entry {
                Entry::Dir { mode } => (S_IFDIR | (mode & 0o7777), 2, &[]),
                Entry::File { mode, data } => (S_IFREG | (mode & 0o7777), 1, data),
                Entry::Symlink { target } => (S_IFLNK | 0o777, 1, target.as_bytes()),
            };
            write_entry(&mut out, path, ino, mode, nlink, mtime, data)?;
        }
        write_entry(&mut out, TRAILER, 0, 0, 1, 0, &[])
    }

    /// The archive as bytes. Fails only on what newc cannot represent (a file over 4 GiB).
    pub fn to_bytes(&self, mtime: u32) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        self.write_to(&mut out, mtime)?;
        Ok(out)
    }
}

/// `/usr/bin/x`, `usr/bin/x` and `./usr//bin/x` all become `usr/bin/x`; `..` and the
/// empty path are refused because the kernel would unpack them outside the root.
fn normalize(path: &str) -> Result<String, InitramfsError> {
    let mut parts = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                return Err(InitramfsError::BadPath { path: path.to_owned() });
            }
            p => parts.push(p),
        }
    }
    if parts.is_empty() || path.contains('\0') {
        return Err(InitramfsError::BadPath { path: path.to_owned() });
    }
    Ok(parts.join("/"))
}

fn write_entry(
    out: &mut impl Write,
    name: &str,
    ino: u32,
    mode: u32,
    nlink: u32,
    mtime: u32,
    data: &[u8],
) -> io::Result<()> {
    let filesize = u32::try_from(data.len())
        .map_err(|_| io::Error::other(format!("{name}: larger than 4 GiB, newc cannot hold it")))?;
    let namesize = name.len() + 1;
    let header = format!(
        "070701{ino:08x}{mode:08x}{uid:08x}{gid:08x}{nlink:08x}{mtime:08x}{filesize:08x}\
         {devmajor:08x}{devminor:08x}{rdevmajor:08x}{rdevminor:08x}{namesize:08x}{check:08x}",
        uid = 0,
        gid = 0,
        devmajor = 0,
        devminor = 0,
        rdevmajor = 0,
        rdevminor = 0,
        check = 0,
    );
    out.write_all(header.as_bytes())?;
    out.write_all(name.as_bytes())?;
    out.write_all(&[0])?;
    let name_pad = pad4(header.len() + namesize);
    out.write_all(&[0; 3][..name_pad])?;
    out.write_all(data)?;
    let data_pad = pad4(data.len());
    out.write_all(&[0; 3][..data_pad])
}

fn pad4(len: usize) -> usize {
    (4 - len % 4) % 4
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(data: &[u8]) -> Entry {
        Entry::File {
            mode: 0o644,
            data: data.to_vec(),
        }
    }

    /// Parses a newc archive back into (name, mode, ino, mtime, data) tuples.
    fn parse(bytes: &[u8]) -> Vec<(String, u32, u32, u32, Vec<u8>)> {
        let mut out = Vec::new();
        let mut pos = 0;
        loop {
            let header = std::str::from_utf8(&bytes[pos..pos + 110]).unwrap();
            assert_eq!(&header[..6], "070701", "bad magic at {pos}");
            let field = |i: usize| u32::from_str_radix(&header[6 + 8 * i..14 + 8 * i], 16).unwrap();
            let (ino, mode, mtime, size, namesize) =
                (field(0), field(1), field(5), field(6) as usize, field(11) as usize);
            let name = std::str::from_utf8(&bytes[pos + 110..pos + 110 + namesize - 1])
                .unwrap()
                .to_owned();
            assert_eq!(bytes[pos + 110 + namesize - 1], 0, "name of {name} not NUL-terminated");
            pos += 110 + namesize;
            pos += pad4(pos);
            let data = bytes[pos..pos + size].to_vec();
            pos += size;
            pos += pad4(pos);
            if name == TRAILER {
                assert_eq!(pos, bytes.len(), "bytes after the trailer");
                return out;
            }
            out.push((name, mode, ino, mtime, data));
        }
    }

    #[test]
    fn entries_are_sorted_with_implicit_parents_and_sequential_inodes() {
        let mut a = Archive::default();
        a.insert("/usr/bin/tool", file(b"tool")).unwrap();
        a.insert(
            "/init",
            Entry::File {
                mode: 0o755,
                data: b"#!/bin/sh\n".to_vec(),
            },
        )
        .unwrap();
        a.insert(
            "/bin/sh",
            Entry::Symlink {
                target: "busybox".into(),
            },
        )
        .unwrap();
        let parsed = parse(&a.to_bytes(1_700_000_000).unwrap());
        let names: Vec<_> = parsed.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(names, ["bin", "bin/sh", "init", "usr", "usr/bin", "usr/bin/tool"]);
        let inos: Vec<_> = parsed.iter().map(|e| e.2).collect();
        assert_eq!(inos, [1, 2, 3, 4, 5, 6]);
        assert!(parsed.iter().all(|e| e.3 == 1_700_000_000));
        assert_eq!(parsed[0].1, S_IFDIR | 0o755);
        assert_eq!(
            (parsed[1].1, parsed[1].4.as_slice()),
            (S_IFLNK | 0o777, &b"busybox"[..])
        );
        assert_eq!(
            (parsed[2].1, parsed[2].4.as_slice()),
            (S_IFREG | 0o755, &b"#!/bin/sh\n"[..])
        );
    }

    #[test]
    fn output_depends_only_on_content_not_insertion_order() {
        let mut a = Archive::default();
        a.insert("b/x", file(b"1")).unwrap();
        a.insert("a", file(b"22")).unwrap();
        let mut b = Archive::default();
        b.insert("a", file(b"22")).unwrap();
        b.insert("/b/x", file(b"1")).unwrap();
        assert_eq!(a.to_bytes(5).unwrap(), b.to_bytes(5).unwrap());
        assert_ne!(
            a.to_bytes(5).unwrap(),
            a.to_bytes(6).unwrap(),
            "mtime must be in the archive"
        );
    }

    #[test]
    fn every_entry_is_aligned_to_four_bytes() {
        for len in 0..9 {
            let mut a = Archive::default();
            a.insert(&"n".repeat(len + 1), file(&vec![7u8; len])).unwrap();
            let bytes = a.to_bytes(0).unwrap();
            assert_eq!(bytes.len() % 4, 0);
            assert_eq!(parse(&bytes)[0].4, vec![7u8; len]);
        }
    }

    #[test]
    fn conflicting_and_bad_paths_are_refused() {
        let mut a = Archive::default();
        a.insert("lib/x.so", file(b"x")).unwrap();
        a.insert("lib/x.so", file(b"x"))
            .expect("an identical entry is accepted again");
        assert!(matches!(
            a.insert("lib/x.so", file(b"y")),
            Err(InitramfsError::Conflict { .. })
        ));
        assert!(matches!(
            a.insert("lib/x.so/z", file(b"z")),
            Err(InitramfsError::NotADirectory { .. })
        ));
        assert!(matches!(
            a.insert("lib", file(b"z")),
            Err(InitramfsError::Conflict { .. })
        ));
        a.insert("lib", Entry::Dir { mode: 0o700 }).unwrap();
        assert_eq!(a.get("/lib"), Some(&Entry::Dir { mode: 0o700 }));
        for bad in ["", "/", "a/../b", "..", "a\0b"] {
            assert!(
                matches!(a.insert(bad, file(b"")), Err(InitramfsError::BadPath { .. })),
                "{bad:?}"
            );
        }
    }

    /// GNU cpio (installed by ci/setup) must read what we write: an independent check of
    /// the format beyond our own parser.
    #[test]
    fn gnu_cpio_extracts_the_archive() {
        let mut a = Archive::default();
        a.insert("etc/hello", file(b"hello\n")).unwrap();
        a.insert(
            "bin/run",
            Entry::File {
                mode: 0o755,
                data: b"#!/bin/sh\necho hi\n".to_vec(),
            },
        )
        .unwrap();
        a.insert("bin/link", Entry::Symlink { target: "run".into() }).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut child = std::process::Command::new("cpio")
            .args(["-i", "--make-directories", "--quiet", "--no-absolute-filenames"])
            .current_dir(dir.path())
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("cpio not found: run ci/setup (Debian package cpio)");
        child.stdin.take().unwrap().write_all(&a.to_bytes(0).unwrap()).unwrap();
        assert!(child.wait().unwrap().success());
        assert_eq!(std::fs::read(dir.path().join("etc/hello")).unwrap(), b"hello\n");
        assert_eq!(
            std::fs::read_link(dir.path().join("bin/link")).unwrap(),
            std::path::Path::new("run")
        );
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(dir.path().join("bin/run"))
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o755
        );
    }
}
