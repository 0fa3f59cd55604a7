//! Read-only disk image readers used by `trireme volume import`.
//!
//! Every format is opened into a [`DiskImage`]: a virtual disk of `virtual_size()`
//! bytes that can say, for any offset, whether the bytes there are data or read as
//! zeros ([`DiskImage::segment`]), and read them ([`DiskImage::read_at`]). The importer
//! walks the segments and writes only data, so holes stay holes.
//!
//! Images are hostile input. Every header field is checked against a [`Limits`] value
//! before anything is allocated from it, and a path named inside an image (a backing
//! file, an external data file, a VMDK extent) is opened only when the caller allows
//! references and only inside the folder it names ([`OpenOptions::allow_references`]).

use std::fmt;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

pub mod qcow2;
pub mod qcow2_writer;
pub mod raw;
pub mod vmdk;

/// The formats `volume import` knows. The format is never guessed from the volume's
/// contents; [`Format::detect`] looks only at the image file's own magic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Qcow2,
    Vmdk,
    Raw,
    /// An ISO 9660 image: read as raw bytes, imported as a read-only volume.
    Iso,
}

impl Format {
    pub fn parse(name: &str) -> Option<Format> {
        match name {
            "qcow2" => Some(Format::Qcow2),
            "vmdk" => Some(Format::Vmdk),
            "raw" => Some(Format::Raw),
            "iso" => Some(Format::Iso),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Format::Qcow2 => "qcow2",
            Format::Vmdk => "vmdk",
            Format::Raw => "raw",
            Format::Iso => "iso",
        }
    }

    /// The format named by the file's magic bytes: QCOW2 (`QFI\xfb`), VMDK (a sparse
    /// header `KDMV`, a seSparse header, or a text descriptor), ISO 9660 (`CD001` at
    /// 32769), else raw.
    pub fn detect(path: &Path) -> Result<Format, ImageError> {
        let mut file = File::open(path).map_err(|source| ImageError::Open {
            path: path.to_owned(),
            source,
        })?;
        let mut head = vec![0u8; 32774];
        let mut filled = 0;
        while filled < head.len() {
            match file.read(&mut head[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(source) => {
                    return Err(ImageError::Read {
                        what: "the file's magic",
                        source,
                    });
                }
            }
        }
        let head = &head[..filled];
        if head.starts_with(b"QFI\xfb") {
            return Ok(Format::Qcow2);
        }
        if head.starts_with(b"KDMV")
            || head.starts_with(&vmdk::SESPARSE_MAGIC.to_le_bytes())
            || head.starts_with(b"COWD")
            || head.starts_with(b"# Disk DescriptorFile")
        {
            return Ok(Format::Vmdk);
        }
        if head.len() >= 32774 && &head[32769..32774] == b"CD001" {
            return Ok(Format::Iso);
        }
        Ok(Format::Raw)
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Caps on what an image may ask of us. Each is checked before allocating.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest virtual disk accepted.
    pub max_virtual_size: u64,
    /// Largest single metadata table (L1, refcount table, grain directory, one L2
    /// or grain table, descriptor) read into memory.
    pub max_table_bytes: u64,
    /// Total metadata cached at once across tables (L2 tables, grain tables).
    pub max_cache_bytes: u64,
    /// Deepest backing chain (the image itself is depth 1).
    pub max_chain_depth: u32,
    /// Most extents in a VMDK descriptor.
    pub max_extents: u32,
    /// Largest compressed cluster or grain accepted.
    pub max_compressed_bytes: u64,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_virtual_size: 64 << 40,
            max_table_bytes: 256 << 20,
            max_cache_bytes: 256 << 20,
            max_chain_depth: 16,
            max_extents: 4096,
            max_compressed_bytes: 4 << 20,
        }
    }
}

/// How to open an image.
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    /// The folder in which paths named inside an image may be opened. `None` refuses
    /// every such path. A named path is resolved relative to the image's folder,
    /// canonicalised, and must lie inside this folder (after canonicalisation).
    pub allow_references: Option<PathBuf>,
    /// QCOW2: read this internal snapshot (by name or id) instead of the active layer.
    pub snapshot: Option<String>,
    pub limits: Limits,
}

/// What a range of the virtual disk holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SegmentKind {
    /// Bytes stored in the image (or one of its backing files), which may be zero.
    Data,
    /// Bytes that read as zeros: unallocated with no backing data, zero clusters,
    /// zeroed grains.
    Zero,
}

/// A run of the virtual disk with one kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub offset: u64,
    pub length: u64,
    pub kind: SegmentKind,
}

/// A virtual disk read from an image file.
pub trait DiskImage: Send + fmt::Debug {
    /// Size of the virtual disk in bytes.
    fn virtual_size(&self) -> u64;

    /// The segment that starts at `offset` (< virtual_size), at most `max_len` bytes
    /// long (`max_len` > 0). Adjacent calls may return adjacent segments of the same
    /// kind; callers merge them.
    fn segment(&mut self, offset: u64, max_len: u64) -> Result<Segment, ImageError>;

    /// Fills `buf` with the virtual disk's bytes at `offset`; zeros where nothing is
    /// stored. `offset + buf.len()` must not pass `virtual_size()`.
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), ImageError>;

    /// Things the user should know that do not stop the import (a QCOW2 dirty bit,
    /// the corrupt bit, a VMDK unclean-shutdown flag).
    fn warnings(&self) -> Vec<String> {
        Vec::new()
    }
}

/// Opens `path` as `format`.
pub fn open(
    path: &Path,
    format: Format,
    options: &OpenOptions,
) -> Result<Box<dyn DiskImage>, ImageError> {
    match format {
        Format::Qcow2 => Ok(Box::new(qcow2::Qcow2::open(path, options)?)),
        Format::Vmdk => vmdk::open(path, options),
        Format::Raw | Format::Iso => Ok(Box::new(raw::Raw::open(path, options)?)),
    }
}

/// Resolves `name`, a path written inside the image at `image_path`, against the
/// folder the user allowed. Relative names are taken from the image's own folder.
pub fn resolve_reference(
    image_path: &Path,
    name: &str,
    options: &OpenOptions,
) -> Result<PathBuf, ImageError> {
    let Some(allowed) = &options.allow_references else {
        return Err(ImageError::ReferenceNotAllowed {
            name: name.to_owned(),
        });
    };
    if name.is_empty() || name.contains('\0') {
        return Err(ImageError::Invalid(format!(
            "the image names an invalid file {name:?}"
        )));
    }
    let named = Path::new(name);
    let candidate = if named.is_absolute() {
        named.to_owned()
    } else {
        image_path
            .parent()
            .unwrap_or_else(|| Path::new("."))
            .join(named)
    };
    let allowed = allowed.canonicalize().map_err(|source| ImageError::Open {
        path: allowed.clone(),
        source,
    })?;
    let resolved = candidate
        .canonicalize()
        .map_err(|source| ImageError::Open {
            path: candidate.clone(),
            source,
        })?;
    if !resolved.starts_with(&allowed) {
        return Err(ImageError::ReferenceOutside {
            name: name.to_owned(),
            allowed,
        });
    }
    Ok(resolved)
}

/// Why an image could not be read. Messages are one line, for the CLI.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("opening {}: {source}", path.display())]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("reading {what}: {source}")]
    Read {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("not a valid image: {0}")]
    Invalid(String),
    #[error("unsupported image: {0}")]
    Unsupported(String),
    #[error("{what} is {value}, above the limit of {limit}")]
    TooLarge {
        what: &'static str,
        value: u64,
        limit: u64,
    },
    #[error("the image refers to the file {name:?}; reading it needs --allow-references DIR")]
    ReferenceNotAllowed { name: String },
    #[error("the image refers to {name:?}, which is outside {}", allowed.display())]
    ReferenceOutside { name: String, allowed: PathBuf },
    #[error("the backing chain is deeper than {limit} images")]
    ChainTooDeep { limit: u32 },
    #[error("offset {offset} + {length} is past the end of the virtual disk ({size})")]
    OutOfRange { offset: u64, length: u64, size: u64 },
}

/// Checks `value <= limit`, naming the field in the error.
pub fn check_limit(what: &'static str, value: u64, limit: u64) -> Result<(), ImageError> {
    if value > limit {
        return Err(ImageError::TooLarge { what, value, limit });
    }
    Ok(())
}

/// Checks that `[offset, offset+length)` lies inside a disk of `size` bytes.
pub fn check_range(offset: u64, length: u64, size: u64) -> Result<(), ImageError> {
    match offset.checked_add(length) {
        Some(end) if end <= size => Ok(()),
        _ => Err(ImageError::OutOfRange {
            offset,
            length,
            size,
        }),
    }
}

/// Where an image's bytes come from: a file, or memory (fuzz targets and unit tests
/// parse images without touching the disk).
pub trait ByteSource: Send + Sync + fmt::Debug {
    /// Size in bytes.
    fn size(&self) -> std::io::Result<u64>;
    /// Reads at most `buf.len()` bytes at `offset`; 0 at or past the end.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize>;
}

impl ByteSource for File {
    fn size(&self) -> std::io::Result<u64> {
        Ok(self.metadata()?.len())
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        std::os::unix::fs::FileExt::read_at(self, buf, offset)
    }
}

impl ByteSource for Vec<u8> {
    fn size(&self) -> std::io::Result<u64> {
        Ok(self.as_slice().len() as u64)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        let Ok(start) = usize::try_from(offset) else {
            return Ok(0);
        };
        let Some(rest) = self.get(start..) else {
            return Ok(0);
        };
        let n = rest.len().min(buf.len());
        buf[..n].copy_from_slice(&rest[..n]);
        Ok(n)
    }
}

/// Reads exactly `buf.len()` bytes at `offset` of `source`; bytes past its end read
/// as zeros (images may be shorter than their last cluster).
pub fn read_exact_at_or_zero(
    source: &(impl ByteSource + ?Sized),
    offset: u64,
    buf: &mut [u8],
    what: &'static str,
) -> Result<(), ImageError> {
    let mut done = 0usize;
    while done < buf.len() {
        let at = offset
            .checked_add(done as u64)
            .ok_or_else(|| ImageError::Invalid(format!("{what}: offset overflows")))?;
        match source.read_at(&mut buf[done..], at) {
            Ok(0) => {
                buf[done..].fill(0);
                return Ok(());
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(source) => return Err(ImageError::Read { what, source }),
        }
    }
    Ok(())
}
