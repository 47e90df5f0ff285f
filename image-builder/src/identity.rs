//! Reproducible identities: every GUID, volume serial number and timestamp in an image
//! comes from the build's inputs, so the same inputs and `SOURCE_DATE_EPOCH` give the
//! same bytes (<https://reproducible-builds.org/specs/source-date-epoch/>).

use sha2::{Digest, Sha256};
use uuid::Uuid;

/// FAT cannot store dates before 1980-01-01 00:00:00 UTC.
pub const FAT_EPOCH: i64 = 315_532_800;

/// A digest of everything that goes into an image, from which its identifiers derive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BuildSeed([u8; 32]);

impl BuildSeed {
    /// Hashes named inputs. Each is framed by its name and length, so moving bytes
    /// from one input to the next changes the seed.
    pub fn from_inputs(inputs: &[(&str, &[u8])]) -> Self {
        let mut h = Sha256::new();
        h.update(b"keel-image seed v1\0");
        for (name, data) in inputs {
            h.update(name.as_bytes());
            h.update([0]);
            h.update((data.len() as u64).to_le_bytes());
            h.update(data);
        }
        Self(h.finalize().into())
    }

    fn derive(&self, purpose: &str) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(self.0);
        h.update(purpose.as_bytes());
        h.finalize().into()
    }

    /// A GUID for `purpose` (e.g. "disk", "partition KEEL-ESP"), shaped as a random
    /// (version 4) UUID like the ones systemd derives from hashes.
    pub fn uuid(&self, purpose: &str) -> Uuid {
        let d = self.derive(purpose);
        let mut b = [0u8; 16];
        b.copy_from_slice(&d[..16]);
        uuid::Builder::from_random_bytes(b).into_uuid()
    }

    /// A FAT volume serial number for `purpose`.
    pub fn volume_id(&self, purpose: &str) -> u32 {
        let d = self.derive(purpose);
        u32::from_le_bytes([d[0], d[1], d[2], d[3]])
    }
}

/// The build time: `SOURCE_DATE_EPOCH` when set (then builds are reproducible), else now.
/// Times before 1980 are raised to 1980-01-01, the earliest date FAT can store.
pub fn source_date_epoch() -> Result<i64, String> {
    let secs = match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(v) => v.trim().parse::<i64>().map_err(|_| {
            format!("SOURCE_DATE_EPOCH={v:?} is not a number of seconds since 1970 (e.g. $(git log -1 --format=%ct))")
        })?,
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(FAT_EPOCH),
    };
    Ok(secs.max(FAT_EPOCH))
}

/// Lower-case hex sha256 of `data`.
pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_depend_on_every_input_and_its_framing() {
        let a = BuildSeed::from_inputs(&[("x", b"ab"), ("y", b"c")]);
        assert_eq!(a, BuildSeed::from_inputs(&[("x", b"ab"), ("y", b"c")]));
        assert_ne!(a, BuildSeed::from_inputs(&[("x", b"a"), ("y", b"bc")]));
        assert_ne!(a, BuildSeed::from_inputs(&[("x", b"ab"), ("y", b"d")]));
    }

    #[test]
    fn derived_ids_differ_by_purpose_and_are_v4() {
        let s = BuildSeed::from_inputs(&[("x", b"1")]);
        assert_ne!(s.uuid("disk"), s.uuid("partition KEEL-ESP"));
        assert_eq!(s.uuid("disk").get_version_num(), 4);
        assert_eq!(s.uuid("disk"), s.uuid("disk"));
        assert_ne!(s.volume_id("KEEL-ESP"), s.volume_id("KEEL-CONFIG"));
    }
}
