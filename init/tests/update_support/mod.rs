//! Shared by the `update_*` tests: keys, bundles, a temporary ESP, fake efivarfs,
//! and a model of systemd-boot 252's boot counting (as measured in LAB-NOTES.md).
#![allow(dead_code)] // each test crate uses a different part

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use ed25519_dalek::SigningKey;
use keel_init::update::bless::{BOOT_COUNT_PATH_VAR, LOADER_VENDOR_GUID};
use keel_init::update::bundle::{self, Manifest};
use keel_init::update::slots::{self, EFI_LINUX, SlotName};

pub fn key(seed: u8) -> SigningKey {
    SigningKey::from_bytes(&[seed; 32])
}

/// Deterministic pseudo-random payload bytes (a stand-in UKI).
pub fn payload(len: usize, seed: u8) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ u64::from(seed);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

pub fn manifest(version: &str, min_version: Option<&str>, uki: &[u8]) -> Manifest {
    Manifest {
        format: bundle::FORMAT,
        os: bundle::OS.into(),
        version: version.into(),
        min_version: min_version.map(Into::into),
        uki_sha256: bundle::sha256_hex(uki),
        uki_size: uki.len() as u64,
        cmdline: "console=ttyS0".into(),
        created: 1_700_000_000,
    }
}

pub fn make_bundle(key: &SigningKey, version: &str, min_version: Option<&str>, uki: &[u8]) -> Vec<u8> {
    let mut out = bundle::encode_header(&manifest(version, min_version, uki), key).expect("encode header");
    out.extend_from_slice(uki);
    out
}

/// Offset of the payload in a bundle made by `make_bundle`.
pub fn payload_offset(bundle: &[u8]) -> usize {
    let len = u32::from_be_bytes([bundle[8], bundle[9], bundle[10], bundle[11]]) as usize;
    12 + len + bundle::SIGNATURE_LEN
}

/// A temporary ESP with `EFI/Linux` holding the named UKIs (content: the name).
pub struct Esp {
    pub dir: tempfile::TempDir,
    pub efivars: PathBuf,
}

impl Esp {
    pub fn new(ukis: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let esp = dir.path().join("esp");
        fs::create_dir_all(esp.join(EFI_LINUX)).expect("EFI/Linux");
        fs::create_dir_all(esp.join("EFI/BOOT")).expect("EFI/BOOT");
        fs::write(esp.join("EFI/BOOT/BOOTX64.EFI"), b"systemd-boot").expect("boot loader");
        let efivars = dir.path().join("efivars");
        fs::create_dir_all(&efivars).expect("efivars");
        for name in ukis {
            fs::write(esp.join(EFI_LINUX).join(name), name.as_bytes()).expect("uki");
        }
        Self { dir, efivars }
    }

    pub fn root(&self) -> PathBuf {
        self.dir.path().join("esp")
    }

    pub fn linux(&self) -> PathBuf {
        self.root().join(EFI_LINUX)
    }

    /// Every file on the ESP with its content, to compare before and after.
    pub fn snapshot(&self) -> BTreeMap<String, Vec<u8>> {
        snapshot(&self.root())
    }

    /// File names in EFI/Linux, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(self.linux())
            .expect("read EFI/Linux")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    /// Which file systemd-boot would boot next.
    pub fn boots_next(&self) -> String {
        slots::list(&self.root()).expect("list")[0].file.clone()
    }

    /// Sets an efivarfs variable of systemd-boot: 4 attribute bytes, UTF-16LE, NUL.
    pub fn set_var(&self, name: &str, value: &str) {
        let mut bytes = vec![0x06, 0, 0, 0];
        for unit in value.encode_utf16().chain([0]) {
            bytes.extend_from_slice(&unit.to_le_bytes());
        }
        fs::write(self.var_path(name), bytes).expect("write efivar");
    }

    pub fn clear_var(&self, name: &str) {
        let _ = fs::remove_file(self.var_path(name));
    }

    fn var_path(&self, name: &str) -> PathBuf {
        self.efivars.join(format!("{name}-{LOADER_VENDOR_GUID}"))
    }

    /// One boot by a model of systemd-boot 252 (LAB-NOTES): it picks the first entry
    /// in its order; a counted entry is renamed `+L-D` → `+(L-1)-(D+1)` before the
    /// try (an entry at `+0` stays at 0 and counts one more done), and
    /// `LoaderBootCountPath` names the renamed file; an uncounted entry leaves the
    /// variable unset. Returns the version booted.
    pub fn boot(&self) -> String {
        let all = slots::list(&self.root()).expect("list");
        let first = all.first().expect("something to boot").clone();
        match first.name.tries_left {
            None => {
                self.clear_var(BOOT_COUNT_PATH_VAR);
            }
            Some(left) => {
                let next = SlotName {
                    version: first.name.version.clone(),
                    tries_left: Some(left.saturating_sub(1)),
                    tries_done: Some(first.name.tries_done.unwrap_or(0) + 1),
                };
                let to = next.file_name();
                fs::rename(self.linux().join(&first.file), self.linux().join(&to)).expect("counter rename");
                self.set_var(BOOT_COUNT_PATH_VAR, &format!("\\EFI\\Linux\\{to}"));
            }
        }
        first.name.version
    }
}

pub fn snapshot(root: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in fs::read_dir(&dir).expect("read_dir") {
            let p = e.expect("entry").path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let rel = p.strip_prefix(root).expect("under root").to_string_lossy().into_owned();
                out.insert(rel, fs::read(&p).expect("read"));
            }
        }
    }
    out
}

/// A reader over `data` that, when `at` bytes have been read, calls `on_cut` (to
/// look at the ESP as a power cut would leave it) and then fails or ends.
pub struct CutReader<'a, F: FnMut()> {
    pub data: &'a [u8],
    pub pos: usize,
    pub at: usize,
    pub on_cut: F,
    pub cut: bool,
    /// End of stream (a closed connection) instead of an I/O error.
    pub eof: bool,
}

impl<F: FnMut()> Read for CutReader<'_, F> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.pos >= self.at {
            if !self.cut {
                self.cut = true;
                (self.on_cut)();
            }
            if self.eof {
                return Ok(0);
            }
            return Err(std::io::Error::new(std::io::ErrorKind::ConnectionReset, "power cut"));
        }
        let n = buf.len().min(self.at - self.pos).min(self.data.len() - self.pos);
        buf[..n].copy_from_slice(&self.data[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}
