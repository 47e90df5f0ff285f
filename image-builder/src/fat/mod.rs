//! FAT32 volumes written in one pass from a file tree that is known up front.
//!
//! Why Keel has its own writer instead of using `fatfs` for writing: the ESP needs long
//! file names (`EFI/systemd/systemd-bootx64.efi`, `EFI/Linux/keel-1.0.0.efi`), and
//! fatfs 0.3.6 only writes long names with its `alloc` feature, which also writes
//! long-name entries in front of every directory's `.` and `..`. `fsck.fat -n` then
//! reports "Expected a valid '.' entry in this slot" for every directory (measured on a
//! fatfs-formatted 256 MiB volume), and fixing that afterwards means moving directory
//! entries around behind fatfs' back. A build-once image is the easy case for a
//! writer: every file and its size are known before the first byte is written, so
//! clusters are assigned contiguously in sorted order, every timestamp is the one
//! given, and the result is bit-for-bit reproducible. `fatfs` is still used to *read*
//! volumes (inspect, tests), which doubles as an independent check of this writer.
//!
//! Only what a fresh volume needs is written: boot sector, FSInfo and their backups,
//! the used part of both FATs, directories and file data. The caller hands over a
//! zero-filled region (a freshly extended, sparse image file), so free space costs no
//! disk blocks.

use std::collections::{BTreeMap, HashSet};
use std::io::{Seek, SeekFrom, Write};

mod entry;

pub use entry::FatTime;
use entry::*;

const SECTOR: u64 = 512;
const RESERVED_SECTORS: u32 = 32;
const NUM_FATS: u32 = 2;
const ROOT_CLUSTER: u32 = 2;
/// Microsoft's FAT specification: a volume with fewer clusters is FAT16, whatever its
/// boot sector says (Linux and dosfstools use the same threshold).
pub const MIN_FAT32_CLUSTERS: u32 = 65_525;
const MAX_FAT32_CLUSTERS: u32 = 0x0FFF_FFF5;
const END_OF_CHAIN: u32 = 0x0FFF_FFFF;
const DIR_ENTRY: usize = 32;
const LFN_CHARS_PER_ENTRY: usize = 13;

const ATTR_VOLUME_ID: u8 = 0x08;
const ATTR_DIRECTORY: u8 = 0x10;
const ATTR_ARCHIVE: u8 = 0x20;
const ATTR_LONG_NAME: u8 = 0x0F;

#[derive(Debug, thiserror::Error)]
pub enum FatError {
    #[error("FAT path {path:?}: {reason}")]
    BadName { path: String, reason: &'static str },
    #[error("FAT path {0:?} is given twice (FAT names ignore case)")]
    Duplicate(String),
    #[error("FAT path {0:?}: one of its parents is a file, not a directory")]
    ParentIsFile(String),
    #[error("FAT volume label {0:?}: use 1 to 11 characters from A-Z, 0-9, '-' and '_'")]
    BadLabel(String),
    #[error(
        "a FAT32 volume of {size} bytes is too small: FAT32 needs {min_clusters} clusters, about {min_bytes} bytes at least"
    )]
    TooSmall {
        size: u64,
        min_clusters: u32,
        min_bytes: u64,
    },
    #[error("a FAT32 volume of {0} bytes is too large for 512-byte sectors (2 TiB at most)")]
    TooLarge(u64),
    #[error("the files need {needed} clusters but the {size}-byte volume has {available}")]
    Full { size: u64, needed: u64, available: u32 },
    #[error("FAT path {path:?} is {size} bytes; a FAT32 file ends at 4 GiB - 1")]
    FileTooLarge { path: String, size: u64 },
    #[error("timestamp {0} (seconds since 1970) is outside FAT's range 1980..2107")]
    BadTimestamp(i64),
    #[error("writing the FAT volume: {0}")]
    Io(#[from] std::io::Error),
}

/// The files and directories of a volume. Paths use `/`; directories are created for
/// every parent. Entries are written in byte order of their names.
#[derive(Default, Debug, Clone)]
pub struct FatTree {
    root: BTreeMap<String, Node>,
}

#[derive(Debug, Clone)]
enum Node {
    Dir(BTreeMap<String, Node>),
    File(Vec<u8>),
}

impl FatTree {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a file, creating its parent directories.
    pub fn add_file(&mut self, path: &str, data: Vec<u8>) -> Result<(), FatError> {
        if data.len() as u64 > u64::from(u32::MAX) {
            return Err(FatError::FileTooLarge {
                path: path.into(),
                size: data.len() as u64,
            });
        }
        let (dir, name) = self.parent_dir(path)?;
        insert_unique(dir, path, name, Node::File(data))
    }

    /// Adds an empty directory (and its parents). Adding an existing directory is fine.
    pub fn add_dir(&mut self, path: &str) -> Result<(), FatError> {
        let (dir, name) = self.parent_dir(path)?;
        match find_ignore_case(dir, name) {
            Some(key) => match dir.get(&key) {
                Some(Node::Dir(_)) if key == name => Ok(()),
                _ => Err(FatError::Duplicate(path.into())),
            },
            None => insert_unique(dir, path, name, Node::Dir(BTreeMap::new())),
        }
    }

    /// The directory that holds `path`'s last component, created as needed.
    fn parent_dir<'a>(&mut self, path: &'a str) -> Result<(&mut BTreeMap<String, Node>, &'a str), FatError> {
        let parts: Vec<&str> = path.split('/').collect();
        for part in &parts {
            validate_long_name(part).map_err(|reason| FatError::BadName {
                path: path.into(),
                reason,
            })?;
        }
        let (name, parents) = parts.split_last().ok_or(FatError::BadName {
            path: path.into(),
            reason: "empty path",
        })?;
        let mut dir = &mut self.root;
        for part in parents {
            let key = match find_ignore_case(dir, part) {
                Some(key) if key == *part => key,
                Some(_) => return Err(FatError::Duplicate(path.into())),
                None => {
                    dir.insert((*part).to_owned(), Node::Dir(BTreeMap::new()));
                    (*part).to_owned()
                }
            };
            dir = match dir.get_mut(&key) {
                Some(Node::Dir(children)) => children,
                _ => return Err(FatError::ParentIsFile(path.into())),
            };
        }
        Ok((dir, name))
    }
}

fn find_ignore_case(dir: &BTreeMap<String, Node>, name: &str) -> Option<String> {
    dir.keys()
        .find(|k| k.eq_ignore_ascii_case(name) || k.to_uppercase() == name.to_uppercase())
        .cloned()
}

fn insert_unique(dir: &mut BTreeMap<String, Node>, path: &str, name: &str, node: Node) -> Result<(), FatError> {
    if find_ignore_case(dir, name).is_some() {
        return Err(FatError::Duplicate(path.into()));
    }
    dir.insert(name.to_owned(), node);
    Ok(())
}

/// What identifies and sizes a volume.
#[derive(Debug, Clone)]
pub struct VolumeParams {
    /// Size of the volume in bytes (whole sectors are used).
    pub size: u64,
    /// Volume label, up to 11 characters (A-Z 0-9 - _).
    pub label: String,
    /// The 32-bit serial number ("volume ID") that Linux shows as the filesystem UUID.
    pub volume_id: u32,
    /// Creation/modification time of every entry, seconds since 1970 (UTC).
    pub timestamp: i64,
    /// Sectors before the volume on its disk (its partition's first LBA); the BPB records it.
    pub hidden_sectors: u32,
}

/// Facts about a written volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VolumeStats {
    pub cluster_size: u32,
    pub clusters: u32,
    pub used_clusters: u32,
}

impl VolumeStats {
    pub fn free_bytes(&self) -> u64 {
        u64::from(self.clusters - self.used_clusters) * u64::from(self.cluster_size)
    }
}

/// Sizes of the regions of a FAT32 volume.
#[derive(Debug, Clone, Copy)]
struct Geometry {
    total_sectors: u32,
    sectors_per_cluster: u32,
    reserved_sectors: u32,
    fat_sectors: u32,
    clusters: u32,
}

impl Geometry {
    /// The largest cluster size up to 4 KiB that still gives FAT32's minimum cluster
    /// count: large clusters keep the FAT small, small ones make small volumes FAT32.
    fn for_size(size: u64) -> Result<Self, FatError> {
        let total = size / SECTOR;
        let total_sectors = u32::try_from(total).map_err(|_| FatError::TooLarge(size))?;
        for sectors_per_cluster in [8u32, 4, 2, 1] {
            let Some(g) = Self::with_cluster(total_sectors, sectors_per_cluster) else {
                continue;
            };
            if g.clusters >= MIN_FAT32_CLUSTERS {
                return Ok(Self {
                    clusters: g.clusters.min(MAX_FAT32_CLUSTERS - 1),
                    ..g
                });
            }
        }
        let min_bytes = (u64::from(RESERVED_SECTORS) + u64::from(MIN_FAT32_CLUSTERS) + 2 * 513) * SECTOR;
        Err(FatError::TooSmall {
            size,
            min_clusters: MIN_FAT32_CLUSTERS,
            min_bytes,
        })
    }

    fn with_cluster(total_sectors: u32, sectors_per_cluster: u32) -> Option<Self> {
        // The FAT must hold an entry for every cluster (plus the two reserved entries), and
        // its own size shrinks the data region: iterate to the fixed point.
        let mut fat_sectors = 1u32;
        let mut reserved_sectors;
        let mut clusters;
        loop {
            // Pad the reserved region so data starts on a cluster boundary (flash media
            // and 4K-sector disks like aligned clusters).
            let meta = RESERVED_SECTORS + NUM_FATS * fat_sectors;
            reserved_sectors =
                RESERVED_SECTORS + (sectors_per_cluster - meta % sectors_per_cluster) % sectors_per_cluster;
            let data = total_sectors.checked_sub(reserved_sectors + NUM_FATS * fat_sectors)?;
            clusters = data / sectors_per_cluster;
            let needed = (u64::from(clusters) + 2) * 4;
            let needed_sectors = u32::try_from(needed.div_ceil(SECTOR)).ok()?;
            if needed_sectors <= fat_sectors {
                break;
            }
            fat_sectors = needed_sectors;
        }
        Some(Self {
            total_sectors,
            sectors_per_cluster,
            reserved_sectors,
            fat_sectors,
            clusters,
        })
    }

    fn cluster_bytes(&self) -> u32 {
        self.sectors_per_cluster * SECTOR as u32
    }

    fn fat_offset(&self, copy: u32) -> u64 {
        u64::from(self.reserved_sectors + copy * self.fat_sectors) * SECTOR
    }

    fn cluster_offset(&self, cluster: u32) -> u64 {
        let data_start = u64::from(self.reserved_sectors + NUM_FATS * self.fat_sectors);
        (data_start + u64::from(cluster - 2) * u64::from(self.sectors_per_cluster)) * SECTOR
    }
}

/// One directory entry to be written, in the order of the tree.
struct Planned<'t> {
    name: String,
    short: [u8; 11],
    long_name: bool,
    parent: usize,
    children: Vec<usize>,
    data: Option<&'t [u8]>,
    first_cluster: u32,
    clusters: u32,
}

impl Planned<'_> {
    fn is_dir(&self) -> bool {
        self.data.is_none()
    }

    /// Directory entries this node takes in its parent: its long-name entries and one 8.3 entry.
    fn slots(&self) -> usize {
        if self.long_name {
            self.name.encode_utf16().count().div_ceil(LFN_CHARS_PER_ENTRY) + 1
        } else {
            1
        }
    }
}

/// Writes `tree` as a FAT32 volume at byte `offset` of `out`, which must read as zeros
/// over the whole volume (free space is not written).
pub fn write_volume<W: Write + Seek>(
    out: &mut W,
    offset: u64,
    params: &VolumeParams,
    tree: &FatTree,
) -> Result<VolumeStats, FatError> {
    let label = label_bytes(&params.label)?;
    let stamp = FatTime::from_unix(params.timestamp)?;
    let geo = Geometry::for_size(params.size)?;

    // Flatten the tree: node 0 is the root, children in name order.
    let mut nodes = vec![Planned {
        name: String::new(),
        short: [b' '; 11],
        long_name: false,
        parent: 0,
        children: Vec::new(),
        data: None,
        first_cluster: ROOT_CLUSTER,
        clusters: 0,
    }];
    flatten(&tree.root, 0, &mut nodes);

    // Clusters: all directories first (root at cluster 2), then all files, both in tree
    // order, each contiguous.
    let cluster_bytes = u64::from(geo.cluster_bytes());
    let mut next = ROOT_CLUSTER;
    let mut chains: Vec<(u32, u32)> = Vec::new();
    for pass_dirs in [true, false] {
        for i in 0..nodes.len() {
            if nodes[i].is_dir() != pass_dirs {
                continue;
            }
            let bytes = match nodes[i].data {
                None => dir_entry_count(&nodes, i) as u64 * DIR_ENTRY as u64,
                Some(data) => data.len() as u64,
            };
            let count = bytes.div_ceil(cluster_bytes);
            let count = if nodes[i].is_dir() { count.max(1) } else { count };
            if count == 0 {
                nodes[i].first_cluster = 0;
                continue;
            }
            let end = u64::from(next) + count;
            if end - 2 > u64::from(geo.clusters) {
                return Err(FatError::Full {
                    size: params.size,
                    needed: end - 2,
                    available: geo.clusters,
                });
            }
            nodes[i].first_cluster = next;
            nodes[i].clusters = count as u32;
            chains.push((next, count as u32));
            next = end as u32;
        }
    }
    let used_clusters = next - ROOT_CLUSTER;

    // The used part of the FAT; the rest of it is zero (free).
    let mut fat = vec![0u32; next as usize];
    fat[0] = 0x0FFF_FFF8; // media descriptor F8 in the low byte
    fat[1] = END_OF_CHAIN; // clean shutdown, no I/O errors
    for (first, count) in chains {
        for c in first..first + count - 1 {
            fat[c as usize] = c + 1;
        }
        fat[(first + count - 1) as usize] = END_OF_CHAIN;
    }
    let fat_bytes: Vec<u8> = fat.iter().flat_map(|e| e.to_le_bytes()).collect();

    let boot = boot_sector(&geo, params, &label);
    let info = fsinfo_sector(geo.clusters - used_clusters, next);
    write_at(out, offset, &boot)?;
    write_at(out, offset + SECTOR, &info)?;
    write_at(out, offset + 6 * SECTOR, &boot)?; // backup boot sector
    write_at(out, offset + 7 * SECTOR, &info)?; // backup FSInfo
    for copy in 0..NUM_FATS {
        write_at(out, offset + geo.fat_offset(copy), &fat_bytes)?;
    }

    for i in 0..nodes.len() {
        let node = &nodes[i];
        if node.first_cluster == 0 {
            continue;
        }
        let at = offset + geo.cluster_offset(node.first_cluster);
        match node.data {
            Some(data) => write_at(out, at, data)?,
            None => write_at(out, at, &directory_bytes(&nodes, i, &label, stamp))?,
        }
    }
    out.flush()?;
    Ok(VolumeStats {
        cluster_size: geo.cluster_bytes(),
        clusters: geo.clusters,
        used_clusters,
    })
}

fn flatten<'t>(dir: &'t BTreeMap<String, Node>, parent: usize, nodes: &mut Vec<Planned<'t>>) {
    let mut taken: HashSet<[u8; 11]> = HashSet::new();
    let names: Vec<&String> = dir.keys().collect();
    // Names that are valid 8.3 names as they stand keep them; generated `~N` names must
    // not collide with those, so they are assigned second.
    let mut shorts: Vec<Option<[u8; 11]>> = names.iter().map(|n| exact_short_name(n)).collect();
    for s in shorts.iter().flatten() {
        taken.insert(*s);
    }
    let mut long: Vec<bool> = vec![false; names.len()];
    for (i, name) in names.iter().enumerate() {
        if shorts[i].is_none() {
            shorts[i] = Some(generated_short_name(name, &mut taken));
            long[i] = true;
        }
    }
    let mut ids = Vec::new();
    for (i, (name, node)) in dir.iter().enumerate() {
        let id = nodes.len();
        ids.push(id);
        nodes.push(Planned {
            name: name.clone(),
            short: shorts[i].unwrap_or([b'_'; 11]),
            long_name: long[i],
            parent,
            children: Vec::new(),
            data: match node {
                Node::File(data) => Some(data.as_slice()),
                Node::Dir(_) => None,
            },
            first_cluster: 0,
            clusters: 0,
        });
        if let Node::Dir(children) = node {
            flatten(children, id, nodes);
        }
    }
    nodes[parent].children = ids;
}

fn dir_entry_count(nodes: &[Planned], i: usize) -> usize {
    // The root holds the volume label entry; every other directory `.` and `..`.
    let fixed = if i == 0 { 1 } else { 2 };
    fixed + nodes[i].children.iter().map(|&c| nodes[c].slots()).sum::<usize>()
}

fn directory_bytes(nodes: &[Planned], i: usize, label: &[u8; 11], stamp: FatTime) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(dir_entry_count(nodes, i) * DIR_ENTRY);
    if i == 0 {
        bytes.extend_from_slice(&short_entry(label, ATTR_VOLUME_ID, 0, 0, stamp));
    } else {
        let dot = *b".          ";
        let dotdot = *b"..         ";
        // `..` of a directory in the root points to cluster 0, not the root's cluster.
        let parent = nodes[i].parent;
        let parent_cluster = if parent == 0 { 0 } else { nodes[parent].first_cluster };
        bytes.extend_from_slice(&short_entry(&dot, ATTR_DIRECTORY, nodes[i].first_cluster, 0, stamp));
        bytes.extend_from_slice(&short_entry(&dotdot, ATTR_DIRECTORY, parent_cluster, 0, stamp));
    }
    for &c in &nodes[i].children {
        let child = &nodes[c];
        if child.long_name {
            for entry in long_name_entries(&child.name, &child.short) {
                bytes.extend_from_slice(&entry);
            }
        }
        let (attr, size) = match child.data {
            Some(data) => (ATTR_ARCHIVE, data.len() as u32),
            None => (ATTR_DIRECTORY, 0),
        };
        bytes.extend_from_slice(&short_entry(&child.short, attr, child.first_cluster, size, stamp));
    }
    bytes
}

fn write_at<W: Write + Seek>(out: &mut W, at: u64, bytes: &[u8]) -> std::io::Result<()> {
    out.seek(SeekFrom::Start(at))?;
    out.write_all(bytes)
}

fn boot_sector(geo: &Geometry, params: &VolumeParams, label: &[u8; 11]) -> [u8; 512] {
    let mut b = [0u8; 512];
    // A jump over the BPB to a `cli; hlt; jmp $-1` loop: this volume is not bootable
    // from BIOS, and a CPU that jumps here stops instead of running zeros.
    b[0..3].copy_from_slice(&[0xEB, 0x58, 0x90]);
    b[0x5A..0x5E].copy_from_slice(&[0xFA, 0xF4, 0xEB, 0xFD]);
    b[3..11].copy_from_slice(b"MSWIN4.1"); // the OEM name most drivers expect
    b[11..13].copy_from_slice(&(SECTOR as u16).to_le_bytes());
    b[13] = geo.sectors_per_cluster as u8;
    b[14..16].copy_from_slice(&(geo.reserved_sectors as u16).to_le_bytes());
    b[16] = NUM_FATS as u8;
    // 17..19 root entries and 19..21 16-bit total sectors: 0 on FAT32.
    b[21] = 0xF8; // media: fixed disk
    // 22..24 16-bit FAT size: 0 on FAT32.
    b[24..26].copy_from_slice(&32u16.to_le_bytes()); // sectors per track (CHS, cosmetic)
    b[26..28].copy_from_slice(&64u16.to_le_bytes()); // heads (CHS, cosmetic)
    b[28..32].copy_from_slice(&params.hidden_sectors.to_le_bytes());
    b[32..36].copy_from_slice(&geo.total_sectors.to_le_bytes());
    b[36..40].copy_from_slice(&geo.fat_sectors.to_le_bytes());
    // 40..42 ext flags 0 (FATs mirrored), 42..44 version 0.0.
    b[44..48].copy_from_slice(&ROOT_CLUSTER.to_le_bytes());
    b[48..50].copy_from_slice(&1u16.to_le_bytes()); // FSInfo sector
    b[50..52].copy_from_slice(&6u16.to_le_bytes()); // backup boot sector
    b[64] = 0x80; // drive number
    b[66] = 0x29; // extended boot signature: the next three fields are valid
    b[67..71].copy_from_slice(&params.volume_id.to_le_bytes());
    b[71..82].copy_from_slice(label);
    b[82..90].copy_from_slice(b"FAT32   ");
    b[510] = 0x55;
    b[511] = 0xAA;
    b
}

fn fsinfo_sector(free_clusters: u32, next_free: u32) -> [u8; 512] {
    let mut s = [0u8; 512];
    s[0..4].copy_from_slice(&0x4161_5252u32.to_le_bytes());
    s[484..488].copy_from_slice(&0x6141_7272u32.to_le_bytes());
    s[488..492].copy_from_slice(&free_clusters.to_le_bytes());
    s[492..496].copy_from_slice(&next_free.to_le_bytes());
    s[508..512].copy_from_slice(&0xAA55_0000u32.to_le_bytes());
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry_picks_fat32_cluster_counts() {
        let esp = Geometry::for_size(256 << 20).expect("256 MiB");
        assert_eq!(esp.sectors_per_cluster, 4, "4 KiB clusters would give < 65525 clusters");
        assert!(esp.clusters >= MIN_FAT32_CLUSTERS);
        let small = Geometry::for_size(40 << 20).expect("40 MiB");
        assert_eq!(small.sectors_per_cluster, 1);
        assert!(u64::from(small.fat_sectors) * SECTOR >= (u64::from(small.clusters) + 2) * 4);
        assert_eq!(
            (small.reserved_sectors + 2 * small.fat_sectors) % small.sectors_per_cluster,
            0
        );
        assert!(matches!(Geometry::for_size(16 << 20), Err(FatError::TooSmall { .. })));
    }

    #[test]
    fn short_names_follow_8_3_rules() {
        assert_eq!(&exact_short_name("BOOTX64.EFI").expect("8.3"), b"BOOTX64 EFI");
        assert_eq!(&exact_short_name("EFI").expect("8.3"), b"EFI        ");
        assert!(exact_short_name("loader").is_none(), "lower case needs a long name");
        assert!(exact_short_name("systemd-bootx64.efi").is_none());
        let mut taken = HashSet::new();
        assert_eq!(&generated_short_name("systemd-bootx64.efi", &mut taken), b"SYSTEM~1EFI");
        assert_eq!(
            &generated_short_name("systemd-bootia32.efi", &mut taken),
            b"SYSTEM~2EFI"
        );
        assert_eq!(&generated_short_name("loader", &mut taken), b"LOADER     ");
        assert_eq!(&generated_short_name("keel-1.0.0+3.efi", &mut taken), b"KEEL-1~1EFI");
        assert_eq!(&generated_short_name("keel.yaml", &mut taken), b"KEEL~1  YAM");
    }

    #[test]
    fn long_name_entries_hold_the_name_and_checksum() {
        let short = *b"SYSTEM~1EFI";
        let entries = long_name_entries("systemd-bootx64.efi", &short);
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0][0], 0x42, "last part first, with the 0x40 flag");
        assert_eq!(entries[1][0], 0x01);
        assert!(
            entries
                .iter()
                .all(|e| e[11] == ATTR_LONG_NAME && e[13] == entries[0][13])
        );
    }

    #[test]
    fn tree_rejects_bad_and_duplicate_names() {
        let mut t = FatTree::new();
        t.add_file("EFI/BOOT/BOOTX64.EFI", vec![1]).expect("ok");
        assert!(matches!(
            t.add_file("efi/boot/bootx64.efi", vec![2]),
            Err(FatError::Duplicate(_))
        ));
        assert!(matches!(
            t.add_file("EFI/BOOT/BOOTX64.EFI/x", vec![2]),
            Err(FatError::ParentIsFile(_))
        ));
        assert!(matches!(t.add_file("a:b", vec![]), Err(FatError::BadName { .. })));
        assert!(matches!(t.add_file("dir//x", vec![]), Err(FatError::BadName { .. })));
        t.add_dir("EFI/Linux").expect("new dir");
        t.add_dir("EFI/Linux").expect("existing dir is fine");
    }

    /// A tree with what trips FAT writers up: an empty file, a directory whose entries
    /// span several clusters, long, Unicode, case-only-lossy and colliding 8.3 names, deep
    /// nesting. fsck.fat must find nothing, and fatfs must read back every byte.
    #[test]
    fn written_volume_passes_fsck_and_reads_back() {
        let mut tree = FatTree::new();
        let mut expected: Vec<(String, Vec<u8>)> = Vec::new();
        let mut add = |tree: &mut FatTree, path: String, data: Vec<u8>| {
            tree.add_file(&path, data.clone()).expect("add");
            expected.push((path, data));
        };
        add(&mut tree, "empty.txt".into(), Vec::new());
        add(&mut tree, "README.TXT".into(), b"plain 8.3".to_vec());
        add(&mut tree, "Grüße aus Köln.txt".into(), b"unicode".to_vec());
        add(&mut tree, "a/b/c/d/e/deep file.bin".into(), vec![7; 5000]);
        for i in 0..150 {
            add(
                &mut tree,
                format!("many/keel-1.0.{i}+3-0.efi"),
                format!("file {i}").into_bytes(),
            );
        }
        tree.add_dir("empty-dir").expect("dir");
        let size = 40u64 << 20;
        let mut disk = std::io::Cursor::new(vec![0u8; size as usize]);
        let params = VolumeParams {
            size,
            label: "TEST".into(),
            volume_id: 0x1234_5678,
            timestamp: 1_700_000_000,
            hidden_sectors: 0,
        };
        let stats = write_volume(&mut disk, 0, &params, &tree).expect("write");
        assert!(stats.used_clusters > 150);

        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("vol.img");
        std::fs::write(&path, disk.get_ref()).expect("write image");
        let out = std::process::Command::new("fsck.vfat")
            .args(["-n", "-v"])
            .arg(&path)
            .output()
            .expect("fsck.vfat is missing: install dosfstools (ci/setup does)");
        let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "fsck.vfat: {text}");
        assert!(
            text.contains(&format!("{} files", expected.len() + 8)),
            "file count (with 7 directories and the label): {text}"
        );

        disk.set_position(0);
        let fs = fatfs::FileSystem::new(&mut disk, fatfs::FsOptions::new()).expect("fatfs mounts it");
        assert_eq!(fs.fat_type(), fatfs::FatType::Fat32);
        assert_eq!(fs.volume_id(), 0x1234_5678);
        for (path, data) in &expected {
            let mut f = fs.root_dir().open_file(path).unwrap_or_else(|e| panic!("{path}: {e}"));
            let mut got = Vec::new();
            std::io::Read::read_to_end(&mut f, &mut got).expect("read");
            assert_eq!(&got, data, "{path}");
        }
        let names: Vec<String> = fs
            .root_dir()
            .open_dir("many")
            .expect("many")
            .iter()
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names.len(), 152, "150 files plus . and ..");
        assert!(names.contains(&"keel-1.0.149+3-0.efi".to_owned()));
        let e = fs
            .root_dir()
            .iter()
            .map(|e| e.expect("entry"))
            .find(|e| e.file_name() == "README.TXT")
            .expect("found");
        assert_eq!(e.modified().date.year, 2023, "SOURCE_DATE_EPOCH 1700000000 is in 2023");
    }

    #[test]
    fn full_volume_is_an_error() {
        let mut tree = FatTree::new();
        tree.add_file("big", vec![1; 40 << 20]).expect("add");
        let size = 40u64 << 20;
        let mut disk = std::io::Cursor::new(vec![0u8; size as usize]);
        let params = VolumeParams {
            size,
            label: "X".into(),
            volume_id: 1,
            timestamp: 1_700_000_000,
            hidden_sectors: 0,
        };
        assert!(matches!(
            write_volume(&mut disk, 0, &params, &tree),
            Err(FatError::Full { .. })
        ));
    }

    #[test]
    fn fat_time_encodes_utc() {
        // 2024-02-29 13:45:58 UTC
        let t = FatTime::from_unix(1_709_214_358).expect("in range");
        assert_eq!(t.date, ((2024 - 1980) << 9) | (2 << 5) | 29);
        assert_eq!(t.time, (13 << 11) | (45 << 5) | 29);
        assert!(FatTime::from_unix(0).is_err(), "1970 is before FAT's epoch");
    }
}
