//! qcow2 images (v2 and v3, zlib-compressed clusters) converted to sparse raw files.
//!
//! Reading the clusters is `imago`'s (Hanna Czenczek's qcow2 driver, the same author
//! as much of QEMU's block layer; used here through its `sync` feature, without an
//! async runtime). Keel reads the header itself first, for two reasons: an imported
//! file is untrusted, and the header's sizes decide how much memory and disk the
//! conversion may take (an L1 table of 2^31 entries would be 16 GiB of RAM in PID 1);
//! and the refusals an operator can act on (a backing file, encryption, zstd) get a
//! message that says what to do instead of a driver's error.

use std::io::Read;
use std::path::Path;

use imago::file::File as ImagoFile;
use imago::qcow2::Qcow2;
use imago::{DenyImplicitOpenGate, FormatAccess, FormatDriverBuilder, Mapping, Storage, StorageOpenOptions};

use super::ImageError;
use crate::storage::sparse::{OverBudget, SparseWriter};

pub const MAGIC: [u8; 4] = *b"QFI\xfb";
/// QEMU's own limit on an L1 table (`QCOW_MAX_L1_SIZE`, 32 MiB).
const MAX_L1_BYTES: u64 = 32 << 20;
/// The largest virtual size accepted (QEMU's limit for qcow2 is 2^61 with 2 MiB
/// clusters; Keel's volumes never need more than this).
pub const MAX_VIRTUAL_SIZE: u64 = 64 << 40;
/// Data read per step of the conversion.
const STEP: u64 = 4 << 20;

/// v3 incompatible feature bits.
const INCOMPAT_DIRTY: u64 = 1 << 0;
const INCOMPAT_CORRUPT: u64 = 1 << 1;
const INCOMPAT_DATA_FILE: u64 = 1 << 2;
const INCOMPAT_COMPRESSION: u64 = 1 << 3;
const INCOMPAT_EXTL2: u64 = 1 << 4;

/// What the header says, once it passed the checks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub version: u32,
    pub virtual_size: u64,
    pub cluster_bits: u32,
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn be64(b: &[u8], at: usize) -> u64 {
    (u64::from(be32(b, at)) << 32) | u64::from(be32(b, at + 4))
}

/// Reads and checks the header of the qcow2 file at `path`.
pub fn read_header(path: &Path) -> Result<Header, ImageError> {
    let bad = |why: String| ImageError::BadQcow2(why);
    let mut f = std::fs::File::open(path).map_err(|e| ImageError::io(path, "open", e))?;
    let file_len = f.metadata().map_err(|e| ImageError::io(path, "stat", e))?.len();
    let mut h = [0u8; 104];
    let n = crate::storage::read_up_to(&mut f, &mut h).map_err(|e| ImageError::io(path, "read", e))?;
    if n < 72 || h[..4] != MAGIC {
        return Err(bad(format!("the file is {n} bytes long and no qcow2 header")));
    }
    let version = be32(&h, 4);
    if version != 2 && version != 3 {
        return Err(bad(format!("qcow2 version {version}; Keel reads versions 2 and 3")));
    }
    let backing_offset = be64(&h, 8);
    if backing_offset != 0 {
        let len = be32(&h, 16).min(1023) as usize;
        let mut name = vec![0u8; len];
        let read = std::fs::File::open(path)
            .and_then(|mut f| {
                std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(backing_offset))?;
                crate::storage::read_up_to(&mut f, &mut name)
            })
            .unwrap_or(0);
        name.truncate(read);
        return Err(ImageError::BackingFile(String::from_utf8_lossy(&name).into_owned()));
    }
    let cluster_bits = be32(&h, 20);
    if !(9..=21).contains(&cluster_bits) {
        return Err(bad(format!("cluster_bits {cluster_bits} is outside 9-21")));
    }
    let virtual_size = be64(&h, 24);
    if virtual_size > MAX_VIRTUAL_SIZE {
        return Err(ImageError::TooLarge {
            virtual_size,
            limit: MAX_VIRTUAL_SIZE,
        });
    }
    if be32(&h, 32) != 0 {
        return Err(ImageError::Unsupported(
            "the image is encrypted; decrypt it first (qemu-img convert --object secret,... -O qcow2)".into(),
        ));
    }
    let l1_entries = u64::from(be32(&h, 36));
    let cluster = 1u64 << cluster_bits;
    let l2_entries = cluster / 8;
    let needed_l1 = virtual_size.div_ceil(cluster * l2_entries);
    if l1_entries * 8 > MAX_L1_BYTES || l1_entries < needed_l1 {
        return Err(bad(format!(
            "L1 table of {l1_entries} entries for a {virtual_size}-byte disk (needs {needed_l1}, at most {})",
            MAX_L1_BYTES / 8
        )));
    }
    let l1_offset = be64(&h, 40);
    if !l1_offset.is_multiple_of(cluster) || l1_offset.saturating_add(l1_entries * 8) > file_len {
        return Err(bad(format!(
            "L1 table at {l1_offset} lies outside the {file_len}-byte file (truncated?)"
        )));
    }
    check_l2_tables(&mut f, l1_offset, l1_entries, cluster, file_len)?;
    if version == 3 {
        let incompatible = be64(&h, 72);
        if incompatible & INCOMPAT_CORRUPT != 0 {
            return Err(bad(
                "the image is marked corrupt; repair it with qemu-img check -r all".into()
            ));
        }
        if incompatible & INCOMPAT_DATA_FILE != 0 {
            return Err(ImageError::Unsupported(
                "the image keeps its data in an external data file; convert it to a self-contained image with qemu-img convert -O qcow2".into(),
            ));
        }
        if incompatible & INCOMPAT_COMPRESSION != 0 {
            return Err(ImageError::Unsupported(
                "the image's clusters are zstd-compressed; Keel reads zlib ones: qemu-img convert -c -O qcow2 -o compression_type=zlib".into(),
            ));
        }
        let known = INCOMPAT_DIRTY | INCOMPAT_EXTL2;
        if incompatible & !known != 0 {
            return Err(ImageError::Unsupported(format!(
                "incompatible qcow2 features {:#x} that Keel does not know",
                incompatible & !known
            )));
        }
    }
    Ok(Header {
        version,
        virtual_size,
        cluster_bits,
    })
}

/// Converts the qcow2 image at `src` to a sparse raw file `dst` (created), allocating
/// at most `budget` bytes. Returns the virtual size.
pub fn convert(src: &Path, dst: &Path, budget: u64) -> Result<u64, ImageError> {
    let header = read_header(src)?;
    let size = header.virtual_size;
    let file_len = std::fs::metadata(src)
        .map_err(|e| ImageError::io(src, "stat", e))?
        .len();
    // The raw file grows to the whole virtual size as the guest writes: refuse a disk
    // the pool could never hold, before anything is written.
    if size > budget {
        return Err(ImageError::NoSpace {
            needed: size,
            available: budget,
        });
    }
    // Opened here, so the gate can deny every file the image itself names.
    let storage =
        ImagoFile::open(StorageOpenOptions::new().filename(src)).map_err(|e| ImageError::io(src, "open", e))?;
    let qcow2 = Qcow2::<ImagoFile>::builder(storage)
        .open(DenyImplicitOpenGate::default())
        .map_err(|e| ImageError::BadQcow2(e.to_string()))?;
    let image = FormatAccess::new(qcow2);
    let out = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(dst)
        .map_err(|e| ImageError::io(dst, "create", e))?;
    let mut w = SparseWriter::new(out, budget);
    let mut buf: Vec<u8> = Vec::new();
    let mut offset = 0u64;
    while offset < size {
        let (mapping, len) = image
            .get_mapping(offset, STEP.min(size - offset))
            .map_err(|e| ImageError::BadQcow2(format!("at guest offset {offset}: {e}")))?;
        let len = len.min(size - offset);
        match mapping {
            Mapping::Zero { .. } => w.skip(len),
            Mapping::Eof { .. } => break,
            // A short file reads as zeros past its end; a cut-off image must not
            // import as a disk with holes where its data was.
            Mapping::Raw { offset: host, .. } if host.saturating_add(len) > file_len => {
                return Err(ImageError::BadQcow2(format!(
                    "guest offset {offset} is stored at {host}, past the end of the {file_len}-byte file (truncated?)"
                )));
            }
            _ if len == 0 => return Err(ImageError::BadQcow2(format!("no progress at guest offset {offset}"))),
            _ => {
                buf.resize(len as usize, 0);
                image
                    .read(&mut buf, offset)
                    .map_err(|e| ImageError::BadQcow2(format!("reading guest offset {offset}: {e}")))?;
                if let Err(OverBudget { needed, budget }) =
                    w.write(&buf).map_err(|e| ImageError::io(dst, "write", e))?
                {
                    return Err(ImageError::NoSpace {
                        needed,
                        available: budget,
                    });
                }
            }
        }
        offset += len;
    }
    w.finish(size).map_err(|e| ImageError::io(dst, "finish", e))?;
    Ok(size)
}

/// Every L2 table the L1 table points to lies inside the file: past its end a
/// cut-off file reads as zeros, and the disk would import as empty instead of failing.
fn check_l2_tables(
    f: &mut std::fs::File,
    l1_offset: u64,
    l1_entries: u64,
    cluster: u64,
    file_len: u64,
) -> Result<(), ImageError> {
    use std::io::{Seek, SeekFrom};
    /// Bits 9-55 of an L1 entry: the L2 table's host offset.
    const L1_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
    f.seek(SeekFrom::Start(l1_offset))
        .map_err(|e| ImageError::BadQcow2(format!("seeking to the L1 table: {e}")))?;
    let mut r = std::io::BufReader::new(f.take(l1_entries * 8));
    let mut entry = [0u8; 8];
    for i in 0..l1_entries {
        r.read_exact(&mut entry)
            .map_err(|e| ImageError::BadQcow2(format!("reading L1 entry {i}: {e}")))?;
        let l2 = u64::from_be_bytes(entry) & L1_OFFSET_MASK;
        if l2 != 0 && l2.saturating_add(cluster) > file_len {
            return Err(ImageError::BadQcow2(format!(
                "L2 table {i} at {l2} lies past the end of the {file_len}-byte file (truncated?)"
            )));
        }
    }
    Ok(())
}
