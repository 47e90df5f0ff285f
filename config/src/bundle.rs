//! The update bundle format, shared by `keel-image bundle`/`verify` (which write and
//! check bundles) and keel-init (which installs them).
//!
//! A bundle is one stream, read front to back exactly once, so an appliance can
//! install it while it downloads without holding it in memory:
//!
//! ```text
//! offset      size  content
//! 0           8     magic "KEELBNDL"
//! 8           4     N: manifest length, u32 big-endian (at most 64 KiB)
//! 12          N     manifest, JSON (UTF-8), see `Manifest`
//! 12+N        64    ed25519 signature over bytes [0, 12+N): magic, length, manifest
//! 76+N        S     payload: the UKI, S = manifest.uki_size bytes
//! 76+N+S            end of stream (anything after is an error)
//! ```
//!
//! The reader checks the signature before it parses a byte of the JSON, and the
//! signed manifest carries the payload's sha256 and size, so the payload is
//! trusted only once all of it has been hashed: a caller writes it to a temporary
//! file and gives it a final name only when [`PayloadReader::finish`] says so.

use std::io::{self, Read, Write};

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::slots::validate_version;

/// The update keys inside the initramfs (from `update.trusted_keys` at build time).
/// Read only from here: never from KEEL-CONFIG, which is writable.
pub const TRUSTED_KEYS_FILE: &str = "/etc/keel/trusted_keys";

pub const MAGIC: [u8; 8] = *b"KEELBNDL";
/// The manifest format this code writes and reads.
pub const FORMAT: u32 = 1;
/// The `os` a Keel bundle's manifest names.
pub const OS: &str = "keel";
/// Upper bound on the manifest, so a hostile stream cannot make the reader allocate.
pub const MAX_MANIFEST_LEN: u32 = 64 * 1024;
pub const SIGNATURE_LEN: usize = 64;
/// Read buffer for streaming the payload.
const CHUNK: usize = 256 * 1024;

/// What a bundle says about its payload. Every field is covered by the signature.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// [`FORMAT`].
    pub format: u32,
    /// Always [`OS`]; guards against a bundle for some other product signed with
    /// the same key.
    pub os: String,
    /// The OS version inside (the UKI's `.osrel` `IMAGE_VERSION`).
    pub version: String,
    /// Appliances running an older version than this refuse the bundle.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_version: Option<String>,
    /// sha256 of the UKI, lower-case hex.
    pub uki_sha256: String,
    /// Size of the UKI in bytes.
    pub uki_size: u64,
    /// The UKI's kernel command line (informational: it is inside the UKI).
    #[serde(default)]
    pub cmdline: String,
    /// When the bundle was made (seconds since 1970; `SOURCE_DATE_EPOCH` if set).
    pub created: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("not a Keel update bundle (it does not start with {:?}); build one with `keel-image bundle`", String::from_utf8_lossy(&MAGIC))]
    BadMagic,
    #[error("the bundle ends early: {0}")]
    Truncated(String),
    #[error(
        "the bundle's manifest claims {0} bytes, more than the {MAX_MANIFEST_LEN} allowed: damaged or not a bundle"
    )]
    ManifestTooLarge(u32),
    #[error(
        "the bundle's signature does not match any of the {keys} trusted key(s): it was signed with another key, or the manifest was altered"
    )]
    BadSignature { keys: usize },
    #[error("no trusted update keys: this image was built without `update.trusted_keys`, so it accepts no bundle")]
    NoTrustedKeys,
    #[error("the bundle's manifest is signed but not valid: {0}")]
    BadManifest(String),
    #[error("the bundle's payload does not match its signed manifest: sha256 {actual}, expected {expected}")]
    HashMismatch { expected: String, actual: String },
    #[error("the bundle has data after its {expected}-byte payload: damaged or concatenated")]
    TrailingData { expected: u64 },
    #[error("reading the bundle: {0}")]
    Io(#[from] io::Error),
    #[error("writing the payload: {0}")]
    Write(io::Error),
}

impl Manifest {
    /// Checks what the signature cannot: that the fields make sense to this reader.
    pub fn check(&self) -> Result<(), BundleError> {
        let bad = |m: String| Err(BundleError::BadManifest(m));
        if self.format != FORMAT {
            return bad(format!(
                "format {} (this version of Keel reads format {FORMAT}; update in smaller steps)",
                self.format
            ));
        }
        if self.os != OS {
            return bad(format!("it is for `{}`, not `{OS}`", self.os));
        }
        validate_version(&self.version).map_err(BundleError::BadManifest)?;
        if let Some(min) = &self.min_version {
            validate_version(min).map_err(|e| BundleError::BadManifest(format!("min_version: {e}")))?;
        }
        if self.uki_sha256.len() != 64 || !self.uki_sha256.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')) {
            return bad(format!(
                "uki_sha256 {:?} is not 64 lower-case hex digits",
                self.uki_sha256
            ));
        }
        if self.uki_size == 0 {
            return bad("uki_size is 0".into());
        }
        Ok(())
    }
}

/// The signed part of a bundle: magic, length, manifest JSON and the signature.
pub fn encode_header(manifest: &Manifest, key: &SigningKey) -> Result<Vec<u8>, BundleError> {
    manifest.check()?;
    let json = serde_json::to_vec(manifest).map_err(|e| BundleError::BadManifest(e.to_string()))?;
    let len = u32::try_from(json.len())
        .ok()
        .filter(|l| *l <= MAX_MANIFEST_LEN)
        .ok_or_else(|| BundleError::BadManifest(format!("{} bytes of manifest is too large", json.len())))?;
    let mut out = Vec::with_capacity(12 + json.len() + SIGNATURE_LEN);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&json);
    let signature = key.sign(&out);
    out.extend_from_slice(&signature.to_bytes());
    Ok(out)
}

/// Reads and verifies a bundle's header: the signature first (against every trusted
/// key), then the manifest it covers. Returns a reader for the payload.
pub fn read_header<R: Read>(mut reader: R, trusted: &[VerifyingKey]) -> Result<PayloadReader<R>, BundleError> {
    if trusted.is_empty() {
        return Err(BundleError::NoTrustedKeys);
    }
    let mut fixed = [0u8; 12];
    read_exact(&mut reader, &mut fixed, "in its header")?;
    if fixed[..8] != MAGIC {
        return Err(BundleError::BadMagic);
    }
    let len = u32::from_be_bytes([fixed[8], fixed[9], fixed[10], fixed[11]]);
    if len > MAX_MANIFEST_LEN {
        return Err(BundleError::ManifestTooLarge(len));
    }
    let mut signed = Vec::with_capacity(12 + len as usize);
    signed.extend_from_slice(&fixed);
    signed.resize(12 + len as usize, 0);
    read_exact(&mut reader, &mut signed[12..], "in its manifest")?;
    let mut sig = [0u8; SIGNATURE_LEN];
    read_exact(&mut reader, &mut sig, "in its signature")?;
    let signature = Signature::from_bytes(&sig);
    // verify_strict rejects small-order keys and non-canonical signatures.
    if !trusted.iter().any(|k| k.verify_strict(&signed, &signature).is_ok()) {
        return Err(BundleError::BadSignature { keys: trusted.len() });
    }
    let manifest: Manifest =
        serde_json::from_slice(&signed[12..]).map_err(|e| BundleError::BadManifest(e.to_string()))?;
    manifest.check()?;
    Ok(PayloadReader {
        reader,
        manifest,
        hasher: Sha256::new(),
        read: 0,
    })
}

fn read_exact<R: Read>(reader: &mut R, buf: &mut [u8], part: &str) -> Result<(), BundleError> {
    reader.read_exact(buf).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => BundleError::Truncated(format!("it stops {part}")),
        _ => BundleError::Io(e),
    })
}

/// The payload of a bundle whose header verified. The bytes it hands out are not
/// trusted until [`PayloadReader::finish`] returns `Ok`.
pub struct PayloadReader<R> {
    reader: R,
    manifest: Manifest,
    hasher: Sha256,
    read: u64,
}

impl<R: Read> PayloadReader<R> {
    /// The verified manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Copies the whole payload to `out`, hashing it, and calls `progress` with the
    /// bytes copied so far. Then checks the end of the stream and the hash.
    pub fn copy_to<W: Write>(mut self, out: &mut W, mut progress: impl FnMut(u64)) -> Result<Manifest, BundleError> {
        let mut buf = vec![0u8; CHUNK];
        let size = self.manifest.uki_size;
        while self.read < size {
            let want = usize::try_from(size - self.read).unwrap_or(usize::MAX).min(CHUNK);
            let n = match self.reader.read(&mut buf[..want]) {
                Ok(0) => {
                    return Err(BundleError::Truncated(format!(
                        "after {} of its {size} payload bytes",
                        self.read
                    )));
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(BundleError::Io(e)),
            };
            self.hasher.update(&buf[..n]);
            out.write_all(&buf[..n]).map_err(BundleError::Write)?;
            self.read += n as u64;
            progress(self.read);
        }
        self.finish()
    }

    /// Checks that the stream ends right after the payload and that the payload's
    /// sha256 is the signed one.
    pub fn finish(mut self) -> Result<Manifest, BundleError> {
        let size = self.manifest.uki_size;
        if self.read < size {
            return Err(BundleError::Truncated(format!(
                "after {} of its {size} payload bytes",
                self.read
            )));
        }
        let mut probe = [0u8; 1];
        loop {
            match self.reader.read(&mut probe) {
                Ok(0) => break,
                Ok(_) => return Err(BundleError::TrailingData { expected: size }),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(BundleError::Io(e)),
            }
        }
        let actual = hex_lower(&self.hasher.finalize());
        if actual != self.manifest.uki_sha256 {
            return Err(BundleError::HashMismatch {
                expected: self.manifest.uki_sha256,
                actual,
            });
        }
        Ok(self.manifest)
    }
}

/// Reads a whole bundle, checking signature, hash, size and end, writing nothing.
pub fn verify_stream<R: Read>(reader: R, trusted: &[VerifyingKey]) -> Result<Manifest, BundleError> {
    read_header(reader, trusted)?.copy_to(&mut io::sink(), |_| {})
}

/// Lower-case hex (sha2 0.11's digests do not format with `{:x}`).
pub fn hex_lower(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 0xf)] as char);
    }
    s
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex_lower(&Sha256::digest(bytes))
}

// ------------------------------------------------------------------ keys

/// The prefix of a secret key file's single line (`keel-image keygen`).
pub const SECRET_KEY_PREFIX: &str = "keel-ed25519-secret:";

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{0}")]
    Format(String),
    #[error("{0}: not a valid ed25519 public key (not a curve point)")]
    NotAPoint(String),
}

/// A public key as `update.trusted_keys` and `.pub` files hold it: `ed25519:BASE64`.
pub fn format_public_key(key: &VerifyingKey) -> String {
    use base64::Engine;
    format!(
        "ed25519:{}",
        base64::engine::general_purpose::STANDARD.encode(key.to_bytes())
    )
}

/// Parses `ed25519:BASE64` (the config's rules, `config::parse_public_key`) into a key
/// that can verify.
pub fn parse_public_key(text: &str) -> Result<VerifyingKey, KeyError> {
    let bytes = crate::parse_public_key(text).map_err(KeyError::Format)?;
    VerifyingKey::from_bytes(&bytes).map_err(|_| KeyError::NotAPoint(text.trim().to_owned()))
}

/// A secret key file's content: one line, [`SECRET_KEY_PREFIX`] + base64 of the 32-byte seed.
pub fn format_secret_key(key: &SigningKey) -> String {
    use base64::Engine;
    format!(
        "{SECRET_KEY_PREFIX}{}\n",
        base64::engine::general_purpose::STANDARD.encode(key.to_bytes())
    )
}

pub fn parse_secret_key(text: &str) -> Result<SigningKey, KeyError> {
    use base64::Engine;
    let b64 = text.trim().strip_prefix(SECRET_KEY_PREFIX).ok_or_else(|| {
        KeyError::Format(format!(
            "not a Keel secret key: it starts with `{SECRET_KEY_PREFIX}` (the .key file `keel-image keygen` writes, not the .pub)"
        ))
    })?;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map_err(|e| KeyError::Format(format!("secret key is not valid base64: {e}")))?;
    let seed: [u8; 32] = bytes.try_into().map_err(|b: Vec<u8>| {
        KeyError::Format(format!("an ed25519 secret key is 32 bytes, this one has {}", b.len()))
    })?;
    Ok(SigningKey::from_bytes(&seed))
}

/// The trusted-keys file baked into the initramfs: one `ed25519:BASE64` per line;
/// blank lines and `#` comments are skipped.
pub fn parse_trusted_keys(text: &str) -> Result<Vec<VerifyingKey>, KeyError> {
    text.lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l.trim()))
        .filter(|(_, l)| !l.is_empty() && !l.starts_with('#'))
        .map(|(n, l)| parse_public_key(l).map_err(|e| KeyError::Format(format!("line {n}: {e}"))))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_through_their_text_forms() {
        let key = SigningKey::from_bytes(&[9; 32]);
        let public = format_public_key(&key.verifying_key());
        assert!(public.starts_with("ed25519:"));
        assert_eq!(parse_public_key(&public).expect("parses"), key.verifying_key());
        // The config validator accepts exactly what keygen writes.
        assert!(crate::parse_public_key(&public).is_ok());
        let secret = format_secret_key(&key);
        assert_eq!(parse_secret_key(&secret).expect("parses").to_bytes(), key.to_bytes());
        assert!(parse_secret_key(&public).is_err(), "a .pub is not a secret key");
    }

    #[test]
    fn hex_is_lower_case() {
        assert_eq!(hex_lower(&[0x00, 0xab, 0x7f]), "00ab7f");
    }
}
