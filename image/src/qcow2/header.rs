//! The QCOW2 header (versions 2 and 3), its header extensions and the backing file
//! name, parsed from the image's first cluster. Every field that later sizes an
//! allocation or a loop is checked here, against the format's own bounds and the
//! caller's [`Limits`], before anything is read from it.

use crate::{ImageError, Limits, check_limit};

pub(super) const MAGIC: [u8; 4] = *b"QFI\xfb";
/// Smallest and largest cluster sizes qemu creates and opens (512 B and 2 MiB).
pub(super) const MIN_CLUSTER_BITS: u32 = 9;
pub(super) const MAX_CLUSTER_BITS: u32 = 21;
/// Extended L2 entries need at least 16 KiB clusters (32 subclusters of 512 B).
const MIN_EXTENDED_L2_CLUSTER_BITS: u32 = 14;
/// Bytes the fixed header takes in version 2, and at least in version 3.
const V2_HEADER_LENGTH: u32 = 72;
const V3_MIN_HEADER_LENGTH: u32 = 104;
/// Bytes of the fixed header this reader looks at (through `compression_type`).
pub(super) const FIXED_HEADER_BYTES: usize = 112;
/// The spec's bound on the backing file name.
const MAX_BACKING_NAME_BYTES: u32 = 1023;
/// qemu's bound on the number of internal snapshots.
pub(super) const MAX_SNAPSHOTS: u32 = 65536;
/// qemu keeps the backing format in a 16-byte buffer.
const MAX_BACKING_FORMAT_BYTES: u32 = 15;
/// An external data file name is a path.
const MAX_DATA_FILE_NAME_BYTES: u32 = 4096;

pub(super) const INCOMPAT_DIRTY: u64 = 1 << 0;
pub(super) const INCOMPAT_CORRUPT: u64 = 1 << 1;
pub(super) const INCOMPAT_DATA_FILE: u64 = 1 << 2;
pub(super) const INCOMPAT_COMPRESSION_TYPE: u64 = 1 << 3;
pub(super) const INCOMPAT_EXTENDED_L2: u64 = 1 << 4;
const INCOMPAT_KNOWN: u64 = INCOMPAT_DIRTY
    | INCOMPAT_CORRUPT
    | INCOMPAT_DATA_FILE
    | INCOMPAT_COMPRESSION_TYPE
    | INCOMPAT_EXTENDED_L2;

const EXT_END: u32 = 0;
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
const EXT_FEATURE_NAMES: u32 = 0x6803_f857;
const EXT_DATA_FILE: u32 = 0x4441_5441;
/// One feature name table entry: type, bit, 46 bytes of name.
const FEATURE_NAME_ENTRY_BYTES: usize = 48;

/// How compressed clusters are compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Compression {
    /// Raw deflate (qemu calls it zlib; there is no zlib header).
    Deflate,
    Zstd,
}

/// The header fields this reader uses, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Header {
    pub version: u32,
    pub backing_file_offset: u64,
    pub backing_file_size: u32,
    pub cluster_bits: u32,
    pub size: u64,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub nb_snapshots: u32,
    pub snapshots_offset: u64,
    pub incompatible: u64,
    pub autoclear: u64,
    pub header_length: u32,
    pub compression: Compression,
}

/// What the header extensions say.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Extensions {
    pub backing_format: Option<String>,
    pub data_file: Option<String>,
    /// (feature type, bit, name) from the feature name table.
    pub feature_names: Vec<(u8, u8, String)>,
}

fn be_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    if let Some(s) = b.get(at..at + 4) {
        a.copy_from_slice(s);
    }
    u32::from_be_bytes(a)
}

fn be_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    if let Some(s) = b.get(at..at + 8) {
        a.copy_from_slice(s);
    }
    u64::from_be_bytes(a)
}

pub(super) fn read_be_u32(b: &[u8], at: usize) -> u32 {
    be_u32(b, at)
}

pub(super) fn read_be_u64(b: &[u8], at: usize) -> u64 {
    be_u64(b, at)
}

fn invalid(msg: String) -> ImageError {
    ImageError::Invalid(msg)
}

impl Header {
    /// Parses the fixed header from the image's first bytes (`head`, at least the
    /// 72 bytes of a version 2 header; shorter files are not QCOW2 images).
    pub(super) fn parse(head: &[u8], limits: &Limits) -> Result<Header, ImageError> {
        if head.len() < 8 || head[..4] != MAGIC {
            return Err(invalid("no QCOW magic (QFI\\xfb) at the start".into()));
        }
        let version = be_u32(head, 4);
        match version {
            2 | 3 => {}
            1 => {
                return Err(ImageError::Unsupported(
                    "QCOW version 1 images (convert with qemu-img first)".into(),
                ));
            }
            v => return Err(ImageError::Unsupported(format!("QCOW2 version {v}"))),
        }
        if head.len() < V2_HEADER_LENGTH as usize {
            return Err(invalid(format!(
                "the file is {} bytes, shorter than a QCOW2 header",
                head.len()
            )));
        }
        let cluster_bits = be_u32(head, 20);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(invalid(format!(
                "cluster_bits is {cluster_bits}, outside {MIN_CLUSTER_BITS}..={MAX_CLUSTER_BITS}"
            )));
        }
        let cluster_size = 1u64 << cluster_bits;
        let (incompatible, autoclear, refcount_order, header_length) = if version == 2 {
            (0, 0, 4, V2_HEADER_LENGTH)
        } else {
            if head.len() < V3_MIN_HEADER_LENGTH as usize {
                return Err(invalid("the version 3 header is truncated".into()));
            }
            (
                be_u64(head, 72),
                be_u64(head, 88),
                be_u32(head, 96),
                be_u32(head, 100),
            )
        };
        if version == 3 {
            if header_length < V3_MIN_HEADER_LENGTH {
                return Err(invalid(format!(
                    "header_length is {header_length}, below {V3_MIN_HEADER_LENGTH}"
                )));
            }
            check_limit("the header length", u64::from(header_length), cluster_size)?;
            if refcount_order > 6 {
                return Err(invalid(format!(
                    "refcount_order is {refcount_order}, above 6"
                )));
            }
        }
        let crypt_method = be_u32(head, 32);
        match crypt_method {
            0 => {}
            1 => {
                return Err(ImageError::Unsupported(
                    "AES-encrypted QCOW2 images (decrypt with qemu-img convert first)".into(),
                ));
            }
            2 => {
                return Err(ImageError::Unsupported(
                    "LUKS-encrypted QCOW2 images (decrypt with qemu-img convert first)".into(),
                ));
            }
            m => {
                return Err(ImageError::Unsupported(format!(
                    "QCOW2 encryption method {m}"
                )));
            }
        }
        // compression_type is present only when the header is long enough for it.
        let compression_type = if header_length > V3_MIN_HEADER_LENGTH {
            head.get(104).copied().unwrap_or(0)
        } else {
            0
        };
        let compression = if incompatible & INCOMPAT_COMPRESSION_TYPE != 0 {
            match compression_type {
                0 => {
                    return Err(invalid(
                        "the compression type bit is set but compression_type is 0".into(),
                    ));
                }
                1 => Compression::Zstd,
                t => {
                    return Err(ImageError::Unsupported(format!(
                        "QCOW2 compression type {t}"
                    )));
                }
            }
        } else if compression_type != 0 {
            return Err(invalid(format!(
                "compression_type is {compression_type} but the compression type bit is clear"
            )));
        } else {
            Compression::Deflate
        };
        if incompatible & INCOMPAT_EXTENDED_L2 != 0 && cluster_bits < MIN_EXTENDED_L2_CLUSTER_BITS {
            return Err(invalid(format!(
                "extended L2 entries need clusters of at least 16 KiB, not {cluster_size} bytes"
            )));
        }

        let size = be_u64(head, 24);
        check_limit("the virtual size", size, limits.max_virtual_size)?;
        let l1_size = be_u32(head, 36);
        let l1_table_offset = be_u64(head, 40);
        let header = Header {
            version,
            backing_file_offset: be_u64(head, 8),
            backing_file_size: be_u32(head, 16),
            cluster_bits,
            size,
            l1_size,
            l1_table_offset,
            nb_snapshots: be_u32(head, 60),
            snapshots_offset: be_u64(head, 64),
            incompatible,
            autoclear,
            header_length,
            compression,
        };
        check_l1(&header, l1_size, l1_table_offset, limits, "the active")?;
        if l1_size < header.l1_entries_for(size)? {
            return Err(invalid(format!(
                "the L1 table has {l1_size} entries, too few for a virtual size of {size}"
            )));
        }
        let refcount_table_clusters = be_u32(head, 56);
        check_limit(
            "the refcount table size",
            u64::from(refcount_table_clusters) << cluster_bits,
            limits.max_table_bytes,
        )?;
        check_limit(
            "the number of snapshots",
            u64::from(header.nb_snapshots),
            u64::from(MAX_SNAPSHOTS),
        )?;
        if header.nb_snapshots > 0 && !header.snapshots_offset.is_multiple_of(cluster_size) {
            return Err(invalid(format!(
                "the snapshot table offset {} is not cluster aligned",
                header.snapshots_offset
            )));
        }
        if header.backing_file_offset != 0 {
            check_limit(
                "the backing file name length",
                u64::from(header.backing_file_size),
                u64::from(MAX_BACKING_NAME_BYTES),
            )?;
            let end = header
                .backing_file_offset
                .checked_add(u64::from(header.backing_file_size));
            if end.is_none_or(|end| end > cluster_size) {
                return Err(invalid(format!(
                    "the backing file name at {} runs past the first cluster",
                    header.backing_file_offset
                )));
            }
        }
        Ok(header)
    }

    pub(super) fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    pub(super) fn extended_l2(&self) -> bool {
        self.incompatible & INCOMPAT_EXTENDED_L2 != 0
    }

    /// log2 of the number of entries in one L2 table.
    pub(super) fn l2_bits(&self) -> u32 {
        if self.extended_l2() {
            self.cluster_bits - 4
        } else {
            self.cluster_bits - 3
        }
    }

    /// L1 entries needed to map `size` bytes of virtual disk.
    pub(super) fn l1_entries_for(&self, size: u64) -> Result<u32, ImageError> {
        let shift = self.cluster_bits + self.l2_bits();
        let entries = size.div_ceil(1u64 << shift);
        u32::try_from(entries).map_err(|_| {
            invalid(format!(
                "a virtual size of {size} needs too many L1 entries"
            ))
        })
    }

    /// Where the header extensions end: at the backing file name if there is one,
    /// else at the end of the first cluster.
    fn extensions_end(&self) -> u64 {
        if self.backing_file_offset != 0 {
            self.backing_file_offset
        } else {
            self.cluster_size()
        }
    }

    /// Reads the header extensions from `cluster`, the image's first cluster (or the
    /// whole file if it is shorter).
    pub(super) fn extensions(&self, cluster: &[u8]) -> Result<Extensions, ImageError> {
        let mut ext = Extensions::default();
        let end = usize::try_from(self.extensions_end())
            .map_err(|_| invalid("the header extension area is too large".into()))?;
        let mut at = usize::try_from(self.header_length)
            .map_err(|_| invalid("header_length is too large".into()))?;
        if at > end {
            return Err(invalid(format!(
                "the backing file name at {end} overlaps the {at}-byte header"
            )));
        }
        // Each extension takes at least 8 bytes, so this loop ends.
        while at < end {
            if end - at < 8 {
                return Err(invalid(format!(
                    "a header extension at {at} runs past byte {end}"
                )));
            }
            let kind = be_u32(cluster, at);
            let len = be_u32(cluster, at + 4);
            at += 8;
            if kind == EXT_END {
                break;
            }
            let len = usize::try_from(len).unwrap_or(usize::MAX);
            if len > end - at {
                return Err(invalid(format!(
                    "header extension {kind:#x} is {len} bytes, past byte {end}"
                )));
            }
            // Bytes past the end of a short file read as zeros.
            let data_end = at + len;
            let data = cluster.get(at..data_end.min(cluster.len())).unwrap_or(&[]);
            match kind {
                EXT_BACKING_FORMAT => {
                    check_limit(
                        "the backing format name length",
                        len as u64,
                        u64::from(MAX_BACKING_FORMAT_BYTES),
                    )?;
                    ext.backing_format = Some(ext_string(data, "backing format")?);
                }
                EXT_DATA_FILE => {
                    check_limit(
                        "the external data file name length",
                        len as u64,
                        u64::from(MAX_DATA_FILE_NAME_BYTES),
                    )?;
                    ext.data_file = Some(ext_string(data, "external data file name")?);
                }
                EXT_FEATURE_NAMES => {
                    for entry in data.chunks_exact(FEATURE_NAME_ENTRY_BYTES) {
                        let name = &entry[2..];
                        let name_len = name.iter().position(|&b| b == 0).unwrap_or(name.len());
                        ext.feature_names.push((
                            entry[0],
                            entry[1],
                            String::from_utf8_lossy(&name[..name_len]).into_owned(),
                        ));
                    }
                }
                // Bitmaps, the encryption header pointer, and extensions from later
                // versions do not change what the disk reads as.
                _ => {}
            }
            // Data is padded to a multiple of 8 bytes.
            at = data_end.saturating_add(7) & !7;
        }
        Ok(ext)
    }

    /// Refuses incompatible features this reader does not know, naming them from the
    /// feature name table when the image has one.
    pub(super) fn check_features(&self, ext: &Extensions) -> Result<(), ImageError> {
        let unknown = self.incompatible & !INCOMPAT_KNOWN;
        if unknown == 0 {
            return Ok(());
        }
        let names: Vec<String> = (0..64u8)
            .filter(|bit| unknown & (1u64 << bit) != 0)
            .map(|bit| {
                match ext
                    .feature_names
                    .iter()
                    .find(|(kind, b, _)| *kind == 0 && *b == bit)
                {
                    Some((_, _, name)) if !name.is_empty() => format!("bit {bit} ({name})"),
                    _ => format!("bit {bit}"),
                }
            })
            .collect();
        Err(ImageError::Unsupported(format!(
            "QCOW2 incompatible features {}",
            names.join(", ")
        )))
    }

    /// The backing file name, from the first cluster.
    pub(super) fn backing_file_name(&self, cluster: &[u8]) -> Result<Option<String>, ImageError> {
        if self.backing_file_offset == 0 {
            return Ok(None);
        }
        // Parse checked that the name lies inside the first cluster.
        let start = usize::try_from(self.backing_file_offset)
            .map_err(|_| invalid("the backing file offset is too large".into()))?;
        let len = usize::try_from(self.backing_file_size)
            .map_err(|_| invalid("the backing file name is too long".into()))?;
        let Some(bytes) = cluster.get(start..start + len) else {
            return Err(invalid(
                "the backing file name is past the end of the file".into(),
            ));
        };
        if bytes.is_empty() {
            return Ok(None);
        }
        Ok(Some(ext_string(bytes, "backing file name")?))
    }

    /// Things worth telling the user that do not stop reading.
    pub(super) fn warnings(&self) -> Vec<String> {
        let mut w = Vec::new();
        if self.incompatible & INCOMPAT_DIRTY != 0 {
            w.push(
                "the QCOW2 dirty bit is set: the image was not closed cleanly \
                 (its refcounts may be stale; the data mapping is used as is)"
                    .to_owned(),
            );
        }
        if self.incompatible & INCOMPAT_CORRUPT != 0 {
            w.push(
                "the QCOW2 corrupt bit is set: qemu found inconsistent metadata in this \
                 image; check it with qemu-img check"
                    .to_owned(),
            );
        }
        w
    }
}

/// Checks an L1 table's size and offset (the active one or a snapshot's).
pub(super) fn check_l1(
    header: &Header,
    l1_size: u32,
    l1_table_offset: u64,
    limits: &Limits,
    which: &str,
) -> Result<(), ImageError> {
    check_limit(
        "the L1 table size",
        u64::from(l1_size) * 8,
        limits.max_table_bytes,
    )?;
    if l1_size > 0 && !l1_table_offset.is_multiple_of(header.cluster_size()) {
        return Err(invalid(format!(
            "{which} L1 table offset {l1_table_offset} is not cluster aligned"
        )));
    }
    if l1_table_offset
        .checked_add(u64::from(l1_size) * 8)
        .is_none()
    {
        return Err(invalid(format!(
            "{which} L1 table at {l1_table_offset} runs past the largest offset"
        )));
    }
    Ok(())
}

fn ext_string(data: &[u8], what: &str) -> Result<String, ImageError> {
    String::from_utf8(data.to_vec()).map_err(|_| invalid(format!("the {what} is not UTF-8")))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal version 3 header with 64 KiB clusters and a 1 MiB disk.
    fn v3() -> Vec<u8> {
        let mut h = vec![0u8; 65536];
        h[..4].copy_from_slice(&MAGIC);
        h[4..8].copy_from_slice(&3u32.to_be_bytes());
        h[20..24].copy_from_slice(&16u32.to_be_bytes());
        h[24..32].copy_from_slice(&(1u64 << 20).to_be_bytes());
        h[36..40].copy_from_slice(&1u32.to_be_bytes());
        h[40..48].copy_from_slice(&(3u64 << 16).to_be_bytes());
        h[56..60].copy_from_slice(&1u32.to_be_bytes());
        h[96..100].copy_from_slice(&4u32.to_be_bytes());
        h[100..104].copy_from_slice(&112u32.to_be_bytes());
        h
    }

    fn put_ext(h: &mut [u8], at: usize, kind: u32, data: &[u8]) -> usize {
        h[at..at + 4].copy_from_slice(&kind.to_be_bytes());
        h[at + 4..at + 8].copy_from_slice(&u32::try_from(data.len()).unwrap().to_be_bytes());
        h[at + 8..at + 8 + data.len()].copy_from_slice(data);
        (at + 8 + data.len() + 7) & !7
    }

    #[test]
    fn parses_a_plain_v3_header() {
        let h = v3();
        let header = Header::parse(&h, &Limits::default()).unwrap();
        assert_eq!(header.cluster_size(), 65536);
        assert_eq!(header.l2_bits(), 13);
        assert_eq!(header.compression, Compression::Deflate);
        assert_eq!(header.extensions(&h).unwrap(), Extensions::default());
        assert!(header.warnings().is_empty());
    }

    #[test]
    fn refuses_bad_magic_v1_and_encryption() {
        let mut h = v3();
        h[0] = b'X';
        assert!(matches!(
            Header::parse(&h, &Limits::default()),
            Err(ImageError::Invalid(_))
        ));
        let mut h = v3();
        h[4..8].copy_from_slice(&1u32.to_be_bytes());
        let e = Header::parse(&h, &Limits::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("version 1"), "{e}");
        for (m, word) in [(1u32, "AES"), (2, "LUKS")] {
            let mut h = v3();
            h[32..36].copy_from_slice(&m.to_be_bytes());
            let e = Header::parse(&h, &Limits::default())
                .unwrap_err()
                .to_string();
            assert!(e.contains(word), "{e}");
        }
    }

    #[test]
    fn checks_cluster_bits_and_sizes() {
        for bits in [8u32, 22, 63] {
            let mut h = v3();
            h[20..24].copy_from_slice(&bits.to_be_bytes());
            assert!(Header::parse(&h, &Limits::default()).is_err());
        }
        let mut h = v3();
        h[24..32].copy_from_slice(&u64::MAX.to_be_bytes());
        assert!(matches!(
            Header::parse(&h, &Limits::default()),
            Err(ImageError::TooLarge { .. })
        ));
        let mut h = v3();
        h[36..40].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(
            Header::parse(&h, &Limits::default()),
            Err(ImageError::TooLarge { .. })
        ));
        // Too few L1 entries for the virtual size.
        let mut h = v3();
        h[24..32].copy_from_slice(&(1u64 << 40).to_be_bytes());
        assert!(Header::parse(&h, &Limits::default()).is_err());
        let mut h = v3();
        h[60..64].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(
            Header::parse(&h, &Limits::default()),
            Err(ImageError::TooLarge { .. })
        ));
    }

    #[test]
    fn names_unknown_incompatible_features() {
        let mut h = v3();
        h[72..80].copy_from_slice(&(1u64 << 9 | 1).to_be_bytes());
        let mut entry = [0u8; 48];
        entry[1] = 9;
        entry[2..7].copy_from_slice(b"shiny");
        put_ext(&mut h, 112, EXT_FEATURE_NAMES, &entry);
        let header = Header::parse(&h, &Limits::default()).unwrap();
        let ext = header.extensions(&h).unwrap();
        let e = header.check_features(&ext).unwrap_err().to_string();
        assert!(e.contains("bit 9 (shiny)"), "{e}");
        assert_eq!(header.warnings().len(), 1);
    }

    #[test]
    fn reads_string_extensions_and_skips_unknown_ones() {
        let mut h = v3();
        let at = put_ext(&mut h, 112, 0x1234_5678, &[0xee; 13]);
        let at = put_ext(&mut h, at, EXT_BACKING_FORMAT, b"qcow2");
        put_ext(&mut h, at, EXT_DATA_FILE, b"disk.data");
        let header = Header::parse(&h, &Limits::default()).unwrap();
        let ext = header.extensions(&h).unwrap();
        assert_eq!(ext.backing_format.as_deref(), Some("qcow2"));
        assert_eq!(ext.data_file.as_deref(), Some("disk.data"));
    }

    #[test]
    fn refuses_extensions_past_their_area() {
        let mut h = v3();
        h[112..116].copy_from_slice(&0x1234u32.to_be_bytes());
        h[116..120].copy_from_slice(&u32::MAX.to_be_bytes());
        let header = Header::parse(&h, &Limits::default()).unwrap();
        assert!(header.extensions(&h).is_err());
    }

    #[test]
    fn backing_file_name_is_bounded() {
        let mut h = v3();
        h[8..16].copy_from_slice(&512u64.to_be_bytes());
        h[16..20].copy_from_slice(&1024u32.to_be_bytes());
        assert!(matches!(
            Header::parse(&h, &Limits::default()),
            Err(ImageError::TooLarge { .. })
        ));
        h[16..20].copy_from_slice(&4u32.to_be_bytes());
        h[512..516].copy_from_slice(b"base");
        let header = Header::parse(&h, &Limits::default()).unwrap();
        assert_eq!(
            header.backing_file_name(&h).unwrap().as_deref(),
            Some("base")
        );
        h[8..16].copy_from_slice(&65534u64.to_be_bytes());
        assert!(Header::parse(&h, &Limits::default()).is_err());
    }

    #[test]
    fn compression_type_field() {
        let mut h = v3();
        h[72..80].copy_from_slice(&INCOMPAT_COMPRESSION_TYPE.to_be_bytes());
        h[104] = 1;
        let header = Header::parse(&h, &Limits::default()).unwrap();
        assert_eq!(header.compression, Compression::Zstd);
        h[104] = 7;
        assert!(Header::parse(&h, &Limits::default()).is_err());
        h[72..80].copy_from_slice(&0u64.to_be_bytes());
        h[104] = 1;
        assert!(Header::parse(&h, &Limits::default()).is_err());
    }
}
