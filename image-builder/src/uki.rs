//! Unified Kernel Images: systemd's EFI stub with the kernel, initramfs, command line
//! and os-release appended as PE sections.
//!
//! The stub (`linuxx64.efi.stub` from Debian's systemd-boot-efi) finds its payload by
//! section name. New sections go after the stub's last section: virtual addresses on the
//! stub's `SectionAlignment`, file data on its `FileAlignment`, the way systemd's
//! `ukify` places them. Their headers go into the free space between the stub's section
//! table and its first section's data, which must be large enough (it is checked).
//! `VirtualSize` is the exact payload length: the stub reads that many bytes, while
//! `SizeOfRawData` is padded. The PE checksum is recomputed so tools that check it agree.

use std::mem::offset_of;

use object::LittleEndian as LE;
use object::pe;
use object::read::pe::PeFile64;

/// The sections a UKI carries, in the order they are appended.
pub const SECTION_ORDER: [&str; 4] = [".osrel", ".cmdline", ".linux", ".initrd"];

const SECTION_HEADER_SIZE: usize = size_of::<pe::ImageSectionHeader>();
/// `IMAGE_SCN_CNT_INITIALIZED_DATA | IMAGE_SCN_MEM_READ`: read-only data, like ukify's.
const DATA_SECTION: u32 = pe::IMAGE_SCN_CNT_INITIALIZED_DATA.0 | pe::IMAGE_SCN_MEM_READ.0;

#[derive(Debug, thiserror::Error)]
pub enum UkiError {
    #[error("the EFI stub is not a 64-bit PE image: {0}")]
    NotPe64(object::read::Error),
    #[error(
        "the EFI stub has no room for {new} more section headers: they would end at byte {needed}, but its first section's data starts at byte {available}"
    )]
    NoRoomForSectionHeaders {
        new: usize,
        needed: usize,
        available: usize,
    },
    #[error("the EFI stub's header padding is not zero at byte {0}; refusing to overwrite it")]
    HeaderPaddingInUse(usize),
    #[error("the EFI stub already has a {0} section (is it a UKI already?)")]
    SectionExists(String),
    #[error("section name {0:?} is longer than 8 bytes")]
    SectionName(String),
    #[error("section {0} would be empty")]
    EmptySection(String),
    #[error("the UKI would be larger than 4 GiB")]
    TooLarge,
    #[error("UKI: {0}")]
    Parse(String),
}

/// The `.osrel` text. systemd-boot sorts UKIs by `IMAGE_VERSION` when `IMAGE_ID`/`ID`
/// is present (newest first) and ignores a UKI without a name field.
pub fn os_release(version: &str) -> String {
    format!(
        "NAME=\"Keel\"\nID=keel\nPRETTY_NAME=\"Keel {version}\"\nVERSION_ID={version}\nIMAGE_ID=keel\nIMAGE_VERSION={version}\n"
    )
}

/// Checks a version string for use in `.osrel` and in `keel-<version>[+N[-M]].efi`: the
/// update agent's rule, so an image never carries a version the appliance would refuse.
pub use keel_config::slots::validate_version;

/// Appends `sections` (name, data) to `stub` and returns the new PE image.
pub fn assemble(stub: &[u8], sections: &[(&str, &[u8])]) -> Result<Vec<u8>, UkiError> {
    let pe = PeFile64::parse(stub).map_err(UkiError::NotPe64)?;
    let nt_offset = pe.dos_header().nt_headers_offset() as usize;
    let nt = pe.nt_headers();
    let file_header_offset = nt_offset + 4;
    let optional_offset = file_header_offset + size_of::<pe::ImageFileHeader>();
    let table_offset = optional_offset + nt.file_header.size_of_optional_header.get(LE) as usize;
    let opt = &nt.optional_header;
    let section_alignment = opt.section_alignment.get(LE).max(1);
    let file_alignment = opt.file_alignment.get(LE).max(1);
    let size_of_headers = opt.size_of_headers.get(LE) as usize;

    let existing = pe.section_table();
    for (name, data) in sections {
        if name.len() > 8 {
            return Err(UkiError::SectionName((*name).into()));
        }
        if data.is_empty() {
            return Err(UkiError::EmptySection((*name).into()));
        }
        if existing.iter().any(|s| s.raw_name() == name.as_bytes()) {
            return Err(UkiError::SectionExists((*name).into()));
        }
    }

    // Room for the new headers: up to the first section's data and within SizeOfHeaders
    // (the loader copies only that much of the file's start).
    let first_data = existing
        .iter()
        .filter(|s| s.size_of_raw_data.get(LE) > 0)
        .map(|s| s.pointer_to_raw_data.get(LE) as usize)
        .min()
        .unwrap_or(stub.len());
    let available = first_data.min(size_of_headers);
    let old_end = table_offset + existing.len() * SECTION_HEADER_SIZE;
    let new_end = old_end + sections.len() * SECTION_HEADER_SIZE;
    if new_end > available {
        return Err(UkiError::NoRoomForSectionHeaders {
            new: sections.len(),
            needed: new_end,
            available,
        });
    }
    if let Some(pos) = stub[old_end..new_end].iter().position(|&b| b != 0) {
        return Err(UkiError::HeaderPaddingInUse(old_end + pos));
    }

    let image_end = existing
        .iter()
        .map(|s| {
            let size = s.virtual_size.get(LE).max(s.size_of_raw_data.get(LE));
            u64::from(s.virtual_address.get(LE)) + u64::from(size)
        })
        .max()
        .unwrap_or(u64::from(opt.size_of_headers.get(LE)));
    let mut next_va = align_up(image_end, u64::from(section_alignment));

    // Everything in the stub file stays where it is (including a trailing COFF symbol
    // table); the payload goes after it.
    let mut out = stub.to_vec();
    out.resize(align_up(out.len() as u64, u64::from(file_alignment)) as usize, 0);
    let mut headers = Vec::with_capacity(sections.len() * SECTION_HEADER_SIZE);
    let mut added_raw = 0u64;
    for (name, data) in sections {
        let len = u32::try_from(data.len()).map_err(|_| UkiError::TooLarge)?;
        let raw_size = align_up(u64::from(len), u64::from(file_alignment));
        let raw_offset = out.len() as u64;
        let mut h = [0u8; SECTION_HEADER_SIZE];
        h[..name.len()].copy_from_slice(name.as_bytes());
        put_u32(&mut h, offset_of!(pe::ImageSectionHeader, virtual_size), len);
        put_u32(
            &mut h,
            offset_of!(pe::ImageSectionHeader, virtual_address),
            to_u32(next_va)?,
        );
        put_u32(
            &mut h,
            offset_of!(pe::ImageSectionHeader, size_of_raw_data),
            to_u32(raw_size)?,
        );
        put_u32(
            &mut h,
            offset_of!(pe::ImageSectionHeader, pointer_to_raw_data),
            to_u32(raw_offset)?,
        );
        put_u32(
            &mut h,
            offset_of!(pe::ImageSectionHeader, characteristics),
            DATA_SECTION,
        );
        headers.extend_from_slice(&h);
        out.extend_from_slice(data);
        out.resize((raw_offset + raw_size) as usize, 0);
        added_raw += raw_size;
        next_va = align_up(next_va + u64::from(len), u64::from(section_alignment));
    }
    to_u32(out.len() as u64)?;
    out[old_end..new_end].copy_from_slice(&headers);

    let sections_count = nt.file_header.number_of_sections.get(LE) as usize + sections.len();
    let count_at = file_header_offset + offset_of!(pe::ImageFileHeader, number_of_sections);
    out[count_at..count_at + 2].copy_from_slice(&(sections_count as u16).to_le_bytes());
    let image_size_at = optional_offset + offset_of!(pe::ImageOptionalHeader64, size_of_image);
    put_u32(&mut out, image_size_at, to_u32(next_va)?);
    let init_at = optional_offset + offset_of!(pe::ImageOptionalHeader64, size_of_initialized_data);
    let init = u64::from(opt.size_of_initialized_data.get(LE)) + added_raw;
    put_u32(&mut out, init_at, to_u32(init)?);
    let checksum_at = optional_offset + offset_of!(pe::ImageOptionalHeader64, check_sum);
    let checksum = pe_checksum(&out, checksum_at);
    put_u32(&mut out, checksum_at, checksum);
    Ok(out)
}

/// One section of a parsed PE image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SectionInfo {
    pub name: String,
    pub virtual_address: u32,
    pub virtual_size: u32,
    pub raw_offset: u32,
    pub raw_size: u32,
}

/// A UKI read back: its alignments, sections, and the fields tools look at.
#[derive(Debug, Clone)]
pub struct UkiInfo {
    pub section_alignment: u32,
    pub file_alignment: u32,
    pub size_of_image: u32,
    pub checksum: u32,
    pub sections: Vec<SectionInfo>,
}

impl UkiInfo {
    pub fn parse(image: &[u8]) -> Result<Self, UkiError> {
        let pe = PeFile64::parse(image).map_err(UkiError::NotPe64)?;
        let opt = &pe.nt_headers().optional_header;
        let sections = pe
            .section_table()
            .iter()
            .map(|s| SectionInfo {
                name: String::from_utf8_lossy(s.raw_name()).into_owned(),
                virtual_address: s.virtual_address.get(LE),
                virtual_size: s.virtual_size.get(LE),
                raw_offset: s.pointer_to_raw_data.get(LE),
                raw_size: s.size_of_raw_data.get(LE),
            })
            .collect();
        Ok(Self {
            section_alignment: opt.section_alignment.get(LE),
            file_alignment: opt.file_alignment.get(LE),
            size_of_image: opt.size_of_image.get(LE),
            checksum: opt.check_sum.get(LE),
            sections,
        })
    }

    pub fn section(&self, name: &str) -> Option<&SectionInfo> {
        self.sections.iter().find(|s| s.name == name)
    }
}

/// The payload of section `name` (its `VirtualSize` bytes), if the image has it.
pub fn section_data<'a>(image: &'a [u8], name: &str) -> Result<Option<&'a [u8]>, UkiError> {
    let info = UkiInfo::parse(image)?;
    let Some(s) = info.section(name) else { return Ok(None) };
    let start = s.raw_offset as usize;
    let len = s.virtual_size.min(s.raw_size) as usize;
    image
        .get(start..start + len)
        .map(Some)
        .ok_or_else(|| UkiError::Parse(format!("section {name} points past the end of the file")))
}

/// Parses `.osrel` text into (key, value) pairs, unquoting values.
pub fn parse_os_release(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|line| {
            let line = line.trim();
            if line.starts_with('#') {
                return None;
            }
            let (k, v) = line.split_once('=')?;
            let v = v.trim();
            let v = v.strip_prefix('"').and_then(|v| v.strip_suffix('"')).unwrap_or(v);
            Some((k.trim().to_owned(), v.to_owned()))
        })
        .collect()
}

/// The PE image checksum (as computed by Windows' `CheckSumMappedFile`): a 16-bit
/// one's-complement-style sum of the file with the checksum field taken as zero, plus
/// the file length.
pub fn pe_checksum(image: &[u8], checksum_offset: usize) -> u32 {
    let word = |at: usize| u64::from(u16::from_le_bytes([image[at], image.get(at + 1).copied().unwrap_or(0)]));
    // Sum all 16-bit words without folding (a u64 cannot overflow for files under 4 GiB),
    // take the checksum field's two words out, then fold the carries in.
    let mut sum: u64 = image
        .chunks_exact(2)
        .map(|w| u64::from(u16::from_le_bytes([w[0], w[1]])))
        .sum();
    if image.len() % 2 == 1 {
        sum += word(image.len() - 1);
    }
    if checksum_offset + 4 <= image.len() {
        sum -= word(checksum_offset) + word(checksum_offset + 2);
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xFFFF) + (sum >> 16);
    }
    (sum as u32).wrapping_add(image.len() as u32)
}

fn put_u32(buf: &mut [u8], at: usize, v: u32) {
    buf[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn to_u32(v: u64) -> Result<u32, UkiError> {
    u32::try_from(v).map_err(|_| UkiError::TooLarge)
}

fn align_up(v: u64, align: u64) -> u64 {
    v.div_ceil(align) * align
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_checked() {
        assert!(validate_version("1.0.0").is_ok());
        assert!(validate_version("2024.11.1-rc1").is_ok());
        assert!(validate_version("1.0.0+3").is_err(), "+ is the boot counter separator");
        assert!(validate_version("1.0 beta").is_err());
        assert!(validate_version("").is_err());
        assert!(validate_version("V1").is_err());
    }

    #[test]
    fn os_release_has_the_fields_systemd_boot_sorts_by() {
        let fields = parse_os_release(&os_release("1.2.0"));
        let get = |k: &str| fields.iter().find(|(key, _)| key == k).map(|(_, v)| v.as_str());
        assert_eq!(get("NAME"), Some("Keel"));
        assert_eq!(get("ID"), Some("keel"));
        assert_eq!(get("IMAGE_ID"), Some("keel"));
        assert_eq!(get("IMAGE_VERSION"), Some("1.2.0"));
        assert_eq!(get("PRETTY_NAME"), Some("Keel 1.2.0"));
    }

    #[test]
    fn checksum_skips_its_own_field() {
        let mut a = vec![1u8, 0, 2, 0, 0xff, 0xff, 0xff, 0xff, 3, 0];
        let sum = pe_checksum(&a, 4);
        a[4..8].copy_from_slice(&[9, 9, 9, 9]);
        assert_eq!(pe_checksum(&a, 4), sum);
        assert_eq!(sum, 1 + 2 + 3 + 10);
    }

    #[test]
    fn garbage_is_not_a_stub() {
        assert!(matches!(
            assemble(b"MZ nonsense", &[(".osrel", b"x")]),
            Err(UkiError::NotPe64(_))
        ));
    }
}
