//! Sparse VMDK extents: hosted sparse (`KDMV`, versions 1 to 3, including
//! streamOptimized with compressed grains and the footer layout), ESX sparse
//! (`COWD`, vmfsSparse) and ESXi seSparse. All three map the extent through a grain
//! directory (GD) of grain tables (GT) of grain table entries (GTE); they differ in
//! header and entry encoding, which is decoded once when a GT is loaded.

use std::collections::{HashMap, VecDeque};

use flate2::{Decompress, FlushDecompress, Status};

use crate::{ByteSource, ImageError, Limits, check_limit, read_exact_at_or_zero};

use super::SESPARSE_MAGIC;

const SECTOR: u64 = 512;

/// qemu's bound on the grain size: 0x200000 sectors (1 GiB).
const MAX_GRAIN_SECTORS: u64 = 0x20_0000;
/// qemu's bound on entries per hosted grain table.
const MAX_HOSTED_GTES: u64 = 512;
/// `gdOffset` of a streamOptimized header whose real header is in the footer.
const GD_AT_END: u64 = u64::MAX;

const FLAG_NL_DETECT: u32 = 1;
const FLAG_REDUNDANT_GD: u32 = 1 << 1;
const FLAG_ZERO_GRAIN: u32 = 1 << 2;
const FLAG_MARKERS: u32 = 1 << 17;
const COMPRESSION_NONE: u16 = 0;
const COMPRESSION_DEFLATE: u16 = 1;

const MARKER_END_OF_STREAM: u32 = 0;
const MARKER_FOOTER: u32 = 3;

/// A GTE with no grain (reads as zeros, or from a parent).
const UNALLOCATED: u64 = u64::MAX;
/// A GTE marking a zeroed grain. Decoded grain offsets are sector multiples, so the
/// two sentinels never collide with one.
const ZEROED: u64 = u64::MAX - 1;
/// A GD entry with no grain table.
const NO_TABLE: u64 = u64::MAX;

/// The hosted sparse header (`SparseExtentHeader` in VMware's technote), little-endian.
#[derive(Debug, Clone)]
pub(super) struct HostedHeader {
    pub version: u32,
    pub flags: u32,
    pub capacity: u64,
    pub grain_sectors: u64,
    pub desc_offset: u64,
    pub desc_size: u64,
    pub gtes_per_gt: u32,
    pub rgd_offset: u64,
    pub gd_offset: u64,
    pub grain_offset: u64,
    pub unclean_shutdown: bool,
    pub newline_bytes: [u8; 4],
    pub compress_algorithm: u16,
}

fn le32(b: &[u8], at: usize) -> u32 {
    let mut v = [0u8; 4];
    v.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(v)
}

fn le64(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(v)
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

impl HostedHeader {
    /// Parses the 512-byte sector holding a header, magic included.
    pub fn parse(sector: &[u8; 512]) -> Result<HostedHeader, ImageError> {
        if &sector[..4] != b"KDMV" {
            return Err(ImageError::Invalid(
                "not a hosted sparse VMDK extent (no KDMV magic)".into(),
            ));
        }
        Ok(HostedHeader {
            version: le32(sector, 4),
            flags: le32(sector, 8),
            capacity: le64(sector, 12),
            grain_sectors: le64(sector, 20),
            desc_offset: le64(sector, 28),
            desc_size: le64(sector, 36),
            gtes_per_gt: le32(sector, 44),
            rgd_offset: le64(sector, 48),
            gd_offset: le64(sector, 56),
            grain_offset: le64(sector, 64),
            unclean_shutdown: sector[72] != 0,
            newline_bytes: [sector[73], sector[74], sector[75], sector[76]],
            compress_algorithm: le16(sector, 77),
        })
    }

    /// True for a file that is a descriptor with an empty sparse header in front.
    pub fn is_descriptor_only(&self) -> bool {
        self.capacity == 0 && self.desc_offset != 0
    }
}

/// How a grain table's entries are encoded.
#[derive(Debug, Clone, Copy)]
enum Encoding {
    /// 32-bit sector numbers; 1 means a zeroed grain when the header says so.
    Hosted { zeroed_grains: bool },
    /// 32-bit sector numbers (COWD).
    Cowd,
    /// 64-bit entries with a type in the top nibble; grains are numbered from
    /// `grains_offset` (sectors).
    SeSparse { grains_offset: u64 },
}

impl Encoding {
    fn entry_bytes(self) -> u64 {
        match self {
            Encoding::Hosted { .. } | Encoding::Cowd => 4,
            Encoding::SeSparse { .. } => 8,
        }
    }
}

/// Grain tables decoded to file byte offsets (or a sentinel), kept in a bounded FIFO.
#[derive(Debug)]
struct TableCache {
    tables: HashMap<u64, Box<[u64]>>,
    order: VecDeque<u64>,
    capacity: usize,
}

/// Fills the unallocated part of an extent at (extent offset, bytes): with zeros, or
/// with the parent disk's bytes.
pub(super) type ReadBelow<'a> = dyn FnMut(u64, &mut [u8]) -> Result<(), ImageError> + 'a;

/// What a run of the extent holds, as far as this extent knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Coverage {
    /// Stored in this extent.
    Data,
    /// Zeroed grains (or a ZERO extent, or a hole in a flat file): zeros, even over a
    /// parent.
    Zero,
    /// Not in this extent: zeros, or the parent's bytes in a delta disk.
    Unallocated,
}

/// Where a part of the extent lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Place {
    /// Not in this extent: zeros.
    Unallocated,
    /// A zeroed grain.
    Zeroed,
    /// Raw bytes at this file offset.
    Stored(u64),
    /// A compressed grain whose marker or stream starts at this file offset.
    Compressed(u64),
}

/// One sparse extent, opened and checked.
#[derive(Debug)]
pub(super) struct SparseExtent {
    source: Box<dyn ByteSource>,
    file_size: u64,
    /// Virtual bytes in this extent.
    capacity: u64,
    grain: u64,
    /// Virtual bytes covered by one grain table.
    table_span: u64,
    gtes_per_gt: u64,
    encoding: Encoding,
    /// Byte offset of each grain table, or [`NO_TABLE`].
    directory: Vec<u64>,
    compressed: bool,
    markers: bool,
    max_compressed: u64,
    cache: TableCache,
    /// The last decompressed grain: (its virtual offset in the extent, bytes).
    grain_cache: Option<(u64, Vec<u8>)>,
    compressed_buf: Vec<u8>,
    inflater: Decompress,
    /// "monolithicSparse", "streamOptimized", "vmfsSparse" or "seSparse".
    pub kind_name: &'static str,
    pub warnings: Vec<String>,
}

/// Reads a whole sector-sized header at `offset`.
fn read_sector(
    source: &dyn ByteSource,
    offset: u64,
    what: &'static str,
) -> Result<[u8; 512], ImageError> {
    let mut sector = [0u8; 512];
    read_exact_at_or_zero(source, offset, &mut sector, what)?;
    Ok(sector)
}

fn overflow(what: &str) -> ImageError {
    ImageError::Invalid(format!("{what} overflows"))
}

fn sectors_to_bytes(sectors: u64, what: &str) -> Result<u64, ImageError> {
    sectors.checked_mul(SECTOR).ok_or_else(|| overflow(what))
}

/// What every layout hands to [`SparseExtent::build`] once its header is checked.
struct Geometry {
    capacity_sectors: u64,
    grain_sectors: u64,
    gtes_per_gt: u64,
    gd_offset: u64,
    /// Entries present in the GD on disk (None: exactly as many as the capacity needs).
    gd_entries_on_disk: Option<u64>,
    encoding: Encoding,
}

impl SparseExtent {
    /// Opens a sparse extent of any of the three layouts, by its magic. A hosted file
    /// that is only a descriptor is refused here (extents do not nest).
    pub fn open(source: Box<dyn ByteSource>, limits: &Limits) -> Result<SparseExtent, ImageError> {
        let head = read_sector(source.as_ref(), 0, "the VMDK extent header")?;
        if &head[..4] == b"KDMV" {
            let header = HostedHeader::parse(&head)?;
            if header.is_descriptor_only() {
                return Err(ImageError::Invalid(
                    "a VMDK extent is itself a descriptor (extents do not nest)".into(),
                ));
            }
            SparseExtent::hosted(source, header, limits)
        } else if &head[..4] == b"COWD" {
            SparseExtent::cowd(source, &head, limits)
        } else if head[..8] == SESPARSE_MAGIC.to_le_bytes() {
            SparseExtent::se_sparse(source, &head, limits)
        } else {
            Err(ImageError::Invalid(
                "the VMDK extent is not a sparse extent (no KDMV, COWD or seSparse magic)".into(),
            ))
        }
    }

    /// A hosted sparse extent whose first-sector header is `header`.
    pub fn hosted(
        source: Box<dyn ByteSource>,
        mut header: HostedHeader,
        limits: &Limits,
    ) -> Result<SparseExtent, ImageError> {
        let file_size = file_size(source.as_ref())?;
        let mut warnings = Vec::new();
        if header.gd_offset == GD_AT_END {
            header = footer_header(source.as_ref(), file_size)?;
            if header.gd_offset == GD_AT_END {
                return Err(ImageError::Invalid(
                    "the streamOptimized footer has no grain directory offset".into(),
                ));
            }
        }
        if !(1..=3).contains(&header.version) {
            return Err(ImageError::Unsupported(format!(
                "hosted sparse VMDK version {}",
                header.version
            )));
        }
        if header.flags & FLAG_NL_DETECT != 0 && header.newline_bytes != *b"\n \r\n" {
            return Err(ImageError::Invalid(
                "the VMDK header's newline check bytes are wrong (was the file copied in \
                 text mode?)"
                    .into(),
            ));
        }
        let compressed = match header.compress_algorithm {
            COMPRESSION_NONE => false,
            COMPRESSION_DEFLATE => true,
            other => {
                return Err(ImageError::Unsupported(format!(
                    "VMDK compression algorithm {other}"
                )));
            }
        };
        if header.capacity == 0 {
            return Err(ImageError::Invalid("the VMDK extent has 0 sectors".into()));
        }
        let gtes_per_gt = u64::from(header.gtes_per_gt);
        if gtes_per_gt == 0 || gtes_per_gt > MAX_HOSTED_GTES {
            return Err(ImageError::Invalid(format!(
                "numGTEsPerGT is {gtes_per_gt}; it must be 1..={MAX_HOSTED_GTES}"
            )));
        }
        let grain_offset = sectors_to_bytes(header.grain_offset, "grainOffset")?;
        if grain_offset > file_size {
            return Err(ImageError::Invalid(format!(
                "the VMDK file is truncated: it is {file_size} bytes, its grains start at \
                 {grain_offset}"
            )));
        }
        if header.unclean_shutdown {
            warnings.push("the VMDK extent was not closed cleanly (uncleanShutdown)".into());
        }
        // Reads go through the primary GD, as qemu's do; the redundant one stands in
        // only where the primary offset is missing.
        let mut gd_offset = header.gd_offset;
        if gd_offset == 0 && header.flags & FLAG_REDUNDANT_GD != 0 && header.rgd_offset != 0 {
            gd_offset = header.rgd_offset;
            warnings
                .push("the primary grain directory offset is 0; using the redundant one".into());
        }
        if gd_offset == 0 {
            return Err(ImageError::Invalid(
                "the VMDK header has no grain directory".into(),
            ));
        }
        let kind_name = if compressed {
            "streamOptimized"
        } else {
            "monolithicSparse"
        };
        let mut extent = SparseExtent::build(
            source,
            file_size,
            Geometry {
                capacity_sectors: header.capacity,
                grain_sectors: header.grain_sectors,
                gtes_per_gt,
                gd_offset,
                gd_entries_on_disk: None,
                encoding: Encoding::Hosted {
                    zeroed_grains: header.flags & FLAG_ZERO_GRAIN != 0,
                },
            },
            limits,
            kind_name,
        )?;
        extent.compressed = compressed;
        extent.markers = header.flags & FLAG_MARKERS != 0;
        if compressed {
            // One decompressed grain is held in memory.
            check_limit(
                "the grain size of a compressed VMDK",
                extent.grain,
                limits.max_cache_bytes,
            )?;
        }
        extent.warnings = warnings;
        Ok(extent)
    }

    /// An ESX sparse (`COWD`) extent, as written for vmfsSparse redo logs.
    fn cowd(
        source: Box<dyn ByteSource>,
        head: &[u8; 512],
        limits: &Limits,
    ) -> Result<SparseExtent, ImageError> {
        let file_size = file_size(source.as_ref())?;
        let version = le32(head, 4);
        if version != 1 {
            return Err(ImageError::Unsupported(format!(
                "COWD sparse VMDK version {version}"
            )));
        }
        let capacity_sectors = u64::from(le32(head, 12));
        if capacity_sectors == 0 {
            return Err(ImageError::Invalid("the VMDK extent has 0 sectors".into()));
        }
        SparseExtent::build(
            source,
            file_size,
            Geometry {
                capacity_sectors,
                grain_sectors: u64::from(le32(head, 16)),
                gtes_per_gt: 4096,
                gd_offset: u64::from(le32(head, 20)),
                gd_entries_on_disk: Some(u64::from(le32(head, 24))),
                encoding: Encoding::Cowd,
            },
            limits,
            "vmfsSparse",
        )
    }

    /// An ESXi seSparse extent. The format is undocumented; these are qemu's checks.
    fn se_sparse(
        source: Box<dyn ByteSource>,
        head: &[u8; 512],
        limits: &Limits,
    ) -> Result<SparseExtent, ImageError> {
        let file_size = file_size(source.as_ref())?;
        let field = |index: usize| le64(head, index * 8);
        let (version, capacity, grain_size, table_size, flags) =
            (field(1), field(2), field(3), field(4), field(5));
        if version != 0x0000_0002_0000_0001 {
            return Err(ImageError::Unsupported(format!(
                "seSparse version {version:#x}"
            )));
        }
        if grain_size != 8 || table_size != 64 {
            return Err(ImageError::Unsupported(format!(
                "seSparse grain size {grain_size} / grain table size {table_size} sectors \
                 (8 / 64 are read)"
            )));
        }
        if flags != 0 || (6..10).any(|i| field(i) != 0) || head[208..].iter().any(|&b| b != 0) {
            return Err(ImageError::Unsupported(
                "seSparse header with flags or reserved fields set".into(),
            ));
        }
        let volatile_offset = sectors_to_bytes(field(10), "the seSparse volatile header offset")?;
        let volatile = read_sector(
            source.as_ref(),
            volatile_offset,
            "the seSparse volatile header",
        )?;
        if le64(&volatile, 0) != 0xcafe_cafe {
            return Err(ImageError::Invalid(
                "bad seSparse volatile header magic".into(),
            ));
        }
        if le64(&volatile, 24) != 0 {
            return Err(ImageError::Unsupported(
                "the seSparse journal needs replaying (the disk was not closed cleanly)".into(),
            ));
        }
        if capacity == 0 {
            return Err(ImageError::Invalid("the VMDK extent has 0 sectors".into()));
        }
        let gd_sectors = field(17);
        let gd_entries = gd_sectors
            .checked_mul(SECTOR / 8)
            .ok_or_else(|| overflow("the seSparse grain directory size"))?;
        let tables_offset = field(18);
        let grains_offset = field(24);
        let mut extent = SparseExtent::build(
            source,
            file_size,
            Geometry {
                capacity_sectors: capacity,
                grain_sectors: grain_size,
                gtes_per_gt: table_size * SECTOR / 8,
                gd_offset: field(16),
                gd_entries_on_disk: Some(gd_entries),
                encoding: Encoding::SeSparse { grains_offset },
            },
            limits,
            "seSparse",
        )?;
        // A GD entry is 0x1000_0000_<table index>: turn it into the table's offset.
        let table_bytes = extent.gtes_per_gt * 8;
        for entry in &mut extent.directory {
            if *entry == 0 {
                *entry = NO_TABLE;
                continue;
            }
            if *entry >> 32 != 0x1000_0000 {
                return Err(ImageError::Invalid(format!(
                    "seSparse grain directory entry {entry:#x}"
                )));
            }
            let index = *entry & 0xffff_ffff;
            *entry = index
                .checked_mul(table_bytes)
                .and_then(|at| at.checked_add(tables_offset.checked_mul(SECTOR)?))
                .ok_or_else(|| overflow("a seSparse grain table offset"))?;
        }
        Ok(extent)
    }

    /// Checks the geometry against the limits, then reads the grain directory.
    fn build(
        source: Box<dyn ByteSource>,
        file_size: u64,
        geometry: Geometry,
        limits: &Limits,
        kind_name: &'static str,
    ) -> Result<SparseExtent, ImageError> {
        let Geometry {
            capacity_sectors,
            grain_sectors,
            gtes_per_gt,
            gd_offset,
            gd_entries_on_disk,
            encoding,
        } = geometry;
        let capacity = capacity_sectors
            .checked_mul(SECTOR)
            .ok_or(ImageError::TooLarge {
                what: "the VMDK capacity in sectors",
                value: capacity_sectors,
                limit: limits.max_virtual_size / SECTOR,
            })?;
        check_limit("the virtual size", capacity, limits.max_virtual_size)?;
        if grain_sectors == 0 || grain_sectors > MAX_GRAIN_SECTORS {
            return Err(ImageError::Invalid(format!(
                "the grain size is {grain_sectors} sectors; it must be 1..={MAX_GRAIN_SECTORS}"
            )));
        }
        let grain = grain_sectors * SECTOR;
        let table_span = grain
            .checked_mul(gtes_per_gt)
            .ok_or_else(|| overflow("the span of a grain table"))?;
        let table_bytes = gtes_per_gt * encoding.entry_bytes();
        check_limit("a VMDK grain table", table_bytes, limits.max_table_bytes)?;
        check_limit("a VMDK grain table", table_bytes, limits.max_cache_bytes)?;
        let needed = capacity.div_ceil(table_span);
        let entries = match gd_entries_on_disk {
            Some(on_disk) if on_disk < needed => {
                return Err(ImageError::Invalid(format!(
                    "the grain directory has {on_disk} entries; the capacity needs {needed}"
                )));
            }
            _ => needed,
        };
        let gd_bytes = entries
            .checked_mul(encoding.entry_bytes())
            .ok_or_else(|| overflow("the grain directory size"))?;
        check_limit("the VMDK grain directory", gd_bytes, limits.max_table_bytes)?;
        let gd_offset = sectors_to_bytes(gd_offset, "the grain directory offset")?;
        match gd_offset.checked_add(gd_bytes) {
            Some(end) if end <= file_size => {}
            _ => {
                return Err(ImageError::Invalid(format!(
                    "the grain directory ({gd_bytes} bytes at {gd_offset}) passes the end of \
                     the {file_size}-byte file"
                )));
            }
        }
        // Bounded by the file size just checked, and by max_table_bytes.
        let mut raw = vec![0u8; usize::try_from(gd_bytes).map_err(|_| overflow("the GD"))?];
        read_exact_at_or_zero(
            source.as_ref(),
            gd_offset,
            &mut raw,
            "the VMDK grain directory",
        )?;
        let directory: Vec<u64> = match encoding {
            Encoding::SeSparse { .. } => raw.chunks_exact(8).map(|c| le64(c, 0)).collect(),
            Encoding::Hosted { .. } | Encoding::Cowd => raw
                .chunks_exact(4)
                .map(|c| match le32(c, 0) {
                    0 => NO_TABLE,
                    sector => u64::from(sector) * SECTOR,
                })
                .collect(),
        };
        let cache_tables = (limits.max_cache_bytes / (gtes_per_gt * 8)).max(1);
        Ok(SparseExtent {
            source,
            file_size,
            capacity,
            grain,
            table_span,
            gtes_per_gt,
            encoding,
            directory,
            compressed: false,
            markers: false,
            max_compressed: limits.max_compressed_bytes,
            cache: TableCache {
                tables: HashMap::new(),
                order: VecDeque::new(),
                capacity: usize::try_from(cache_tables).unwrap_or(usize::MAX),
            },
            grain_cache: None,
            compressed_buf: Vec::new(),
            inflater: Decompress::new(true),
            kind_name,
            warnings: Vec::new(),
        })
    }

    /// Virtual bytes in the extent.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Loads (or finds) the decoded grain table at `table_offset`. Tables are keyed by
    /// offset, so a directory that points many entries at one table reads it once.
    fn table(&mut self, table_offset: u64) -> Result<&[u64], ImageError> {
        if !self.cache.tables.contains_key(&table_offset) {
            let entry_bytes = self.encoding.entry_bytes();
            let bytes = self.gtes_per_gt * entry_bytes;
            // Bounded by max_table_bytes when the extent was opened.
            let mut raw = vec![0u8; usize::try_from(bytes).map_err(|_| overflow("a GT"))?];
            read_exact_at_or_zero(
                self.source.as_ref(),
                table_offset,
                &mut raw,
                "a VMDK grain table",
            )?;
            let decoded = match self.encoding {
                Encoding::Hosted { zeroed_grains } => raw
                    .chunks_exact(4)
                    .map(|c| match le32(c, 0) {
                        0 => UNALLOCATED,
                        1 if zeroed_grains => ZEROED,
                        sector => u64::from(sector) * SECTOR,
                    })
                    .collect::<Box<[u64]>>(),
                Encoding::Cowd => raw
                    .chunks_exact(4)
                    .map(|c| match le32(c, 0) {
                        0 => UNALLOCATED,
                        sector => u64::from(sector) * SECTOR,
                    })
                    .collect(),
                Encoding::SeSparse { grains_offset } => raw
                    .chunks_exact(8)
                    .map(|c| se_sparse_entry(le64(c, 0), grains_offset, self.grain))
                    .collect::<Result<Box<[u64]>, ImageError>>()?,
            };
            if self.cache.order.len() >= self.cache.capacity
                && let Some(oldest) = self.cache.order.pop_front()
            {
                self.cache.tables.remove(&oldest);
            }
            self.cache.tables.insert(table_offset, decoded);
            self.cache.order.push_back(table_offset);
        }
        self.cache
            .tables
            .get(&table_offset)
            .map(|t| &t[..])
            .ok_or_else(|| ImageError::Invalid("grain table cache lost an entry".into()))
    }

    /// Where the byte at `offset` (inside the extent) lives, and the end of the run
    /// that surely shares its place (its grain, or its whole table if it has none).
    fn locate(&mut self, offset: u64) -> Result<(Place, u64), ImageError> {
        let index = offset / self.table_span;
        let table_offset = *usize::try_from(index)
            .ok()
            .and_then(|i| self.directory.get(i))
            .ok_or_else(|| ImageError::Invalid("offset past the grain directory".into()))?;
        if table_offset == NO_TABLE {
            let end = (index + 1)
                .saturating_mul(self.table_span)
                .min(self.capacity);
            return Ok((Place::Unallocated, end));
        }
        let within = offset % self.table_span;
        let grain_index = within / self.grain;
        let (grain, compressed) = (self.grain, self.compressed);
        let table = self.table(table_offset)?;
        let entry = *usize::try_from(grain_index)
            .ok()
            .and_then(|i| table.get(i))
            .ok_or_else(|| ImageError::Invalid("grain index past its table".into()))?;
        let grain_start = offset - offset % grain;
        let end = grain_start.saturating_add(grain).min(self.capacity);
        let place = match entry {
            UNALLOCATED => Place::Unallocated,
            ZEROED => Place::Zeroed,
            at if compressed => Place::Compressed(at),
            at => Place::Stored(
                at.checked_add(offset % grain)
                    .ok_or_else(|| overflow("a grain offset"))?,
            ),
        };
        Ok((place, end))
    }

    /// The longest run from `offset` (at most `max_len`) whose grains all have the same
    /// [`Coverage`]. Walks a bounded number of grains per call.
    pub fn segment(&mut self, offset: u64, max_len: u64) -> Result<(Coverage, u64), ImageError> {
        const MAX_STEPS: u32 = 1 << 16;
        let end = offset.saturating_add(max_len).min(self.capacity);
        let mut pos = offset;
        let mut coverage = None;
        for _ in 0..MAX_STEPS {
            if pos >= end {
                break;
            }
            let (place, run_end) = self.locate(pos)?;
            let this = match place {
                Place::Stored(_) | Place::Compressed(_) => Coverage::Data,
                Place::Zeroed => Coverage::Zero,
                Place::Unallocated => Coverage::Unallocated,
            };
            if coverage.is_some_and(|c| c != this) {
                break;
            }
            coverage = Some(this);
            pos = run_end.min(end);
        }
        Ok((coverage.unwrap_or(Coverage::Unallocated), pos - offset))
    }

    /// Reads `buf.len()` bytes at `offset` inside the extent (caller checked the range).
    /// Unallocated parts are filled by `below(extent offset, part)`: zeros, or the
    /// parent disk's bytes.
    pub fn read(
        &mut self,
        offset: u64,
        buf: &mut [u8],
        below: &mut ReadBelow<'_>,
    ) -> Result<(), ImageError> {
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let rest = buf.len() - done;
            let (place, run_end) = self.locate(pos)?;
            let mut len = usize::try_from(run_end - pos)
                .unwrap_or(usize::MAX)
                .min(rest);
            match place {
                Place::Unallocated => below(pos, &mut buf[done..done + len])?,
                Place::Zeroed => buf[done..done + len].fill(0),
                Place::Stored(at) => {
                    // Grains stored one after the other are read in one call.
                    while done + len < buf.len() {
                        let next = pos + len as u64;
                        match self.locate(next)? {
                            (Place::Stored(next_at), next_end)
                                if Some(next_at) == at.checked_add(len as u64) =>
                            {
                                let more = usize::try_from(next_end - next).unwrap_or(usize::MAX);
                                len = len.saturating_add(more).min(rest);
                            }
                            _ => break,
                        }
                    }
                    read_exact_at_or_zero(
                        self.source.as_ref(),
                        at,
                        &mut buf[done..done + len],
                        "a VMDK grain",
                    )?;
                }
                Place::Compressed(at)
                    if pos.is_multiple_of(self.grain) && len as u64 == self.grain =>
                {
                    // A whole grain inflates straight into the caller's buffer.
                    self.inflate_into(pos, at, &mut buf[done..done + len])?;
                }
                Place::Compressed(at) => {
                    let grain_start = pos - pos % self.grain;
                    let bytes = self.inflate(grain_start, at)?;
                    let from = usize::try_from(pos - grain_start)
                        .map_err(|_| overflow("a grain offset"))?;
                    buf[done..done + len].copy_from_slice(&bytes[from..from + len]);
                }
            }
            done += len;
        }
        Ok(())
    }

    /// The decompressed grain that starts at `grain_start` (extent offset), whose
    /// marker (or bare zlib stream) is at file offset `at`.
    fn inflate(&mut self, grain_start: u64, at: u64) -> Result<&[u8], ImageError> {
        if self
            .grain_cache
            .as_ref()
            .is_none_or(|(start, _)| *start != grain_start)
        {
            let grain_len = usize::try_from(self.grain).map_err(|_| overflow("a grain"))?;
            let mut out = match self.grain_cache.take() {
                Some((_, old)) => old,
                None => vec![0u8; grain_len],
            };
            self.inflate_into(grain_start, at, &mut out)?;
            self.grain_cache = Some((grain_start, out));
        }
        self.grain_cache
            .as_ref()
            .map(|(_, bytes)| &bytes[..])
            .ok_or_else(|| ImageError::Invalid("grain cache lost its grain".into()))
    }

    /// Decompresses the grain at `grain_start` (marker or stream at file offset `at`)
    /// into `out`, one grain long.
    fn inflate_into(
        &mut self,
        grain_start: u64,
        at: u64,
        out: &mut [u8],
    ) -> Result<(), ImageError> {
        let (stream_at, stream_len) = if self.markers {
            let mut marker = [0u8; 12];
            read_exact_at_or_zero(self.source.as_ref(), at, &mut marker, "a grain marker")?;
            let lba = le64(&marker, 0);
            let size = u64::from(le32(&marker, 8));
            if lba != grain_start / SECTOR {
                return Err(ImageError::Invalid(format!(
                    "the grain marker at {at} says sector {lba}, its table says {}",
                    grain_start / SECTOR
                )));
            }
            if size == 0 {
                return Err(ImageError::Invalid(format!(
                    "the grain marker at {at} has size 0"
                )));
            }
            check_limit("a compressed grain", size, self.max_compressed)?;
            check_limit("a compressed grain", size, self.grain.saturating_mul(2))?;
            (at.checked_add(12).ok_or_else(|| overflow("a grain"))?, size)
        } else {
            let left = self.file_size.saturating_sub(at);
            let len = left
                .min(self.max_compressed)
                .min(self.grain.saturating_mul(2));
            (at, len)
        };
        let stream_len = usize::try_from(stream_len).map_err(|_| overflow("a compressed grain"))?;
        self.compressed_buf.resize(stream_len, 0);
        read_exact_at_or_zero(
            self.source.as_ref(),
            stream_at,
            &mut self.compressed_buf,
            "a compressed grain",
        )?;
        self.inflater.reset(true);
        let status = self
            .inflater
            .decompress(&self.compressed_buf, out, FlushDecompress::Finish)
            .map_err(|e| {
                ImageError::Invalid(format!("the compressed grain at {at} is corrupt: {e}"))
            })?;
        let produced = self.inflater.total_out();
        if status != Status::StreamEnd {
            return Err(ImageError::Invalid(format!(
                "the compressed grain at {at} {}",
                if produced >= self.grain {
                    "inflates to more than a grain"
                } else {
                    "is truncated"
                }
            )));
        }
        // The last grain may pass the capacity; only the part inside must be there.
        let needed = self.grain.min(self.capacity - grain_start);
        if produced < needed {
            return Err(ImageError::Invalid(format!(
                "the compressed grain at {at} inflates to {produced} bytes, not {needed}"
            )));
        }
        let produced = usize::try_from(produced).map_err(|_| overflow("a grain"))?;
        out[produced..].fill(0);
        Ok(())
    }
}

/// Decodes one seSparse GTE (qemu's `get_cluster_offset`): the top nibble is the
/// type; an allocated grain's number is split across the low 60 bits.
fn se_sparse_entry(entry: u64, grains_offset: u64, grain: u64) -> Result<u64, ImageError> {
    match entry >> 60 {
        0 if entry == 0 => Ok(UNALLOCATED),
        // Unmapped (1) and zeroed (2) grains read as zeros.
        1 | 2 => Ok(ZEROED),
        3 => {
            let number =
                ((entry & 0x0fff_0000_0000_0000) >> 48) | ((entry & 0x0000_ffff_ffff_ffff) << 12);
            number
                .checked_mul(grain)
                .and_then(|at| at.checked_add(grains_offset.checked_mul(SECTOR)?))
                .filter(|at| *at < ZEROED)
                .ok_or_else(|| overflow("a seSparse grain offset"))
        }
        _ => Err(ImageError::Invalid(format!(
            "seSparse grain table entry {entry:#x}"
        ))),
    }
}

fn file_size(source: &dyn ByteSource) -> Result<u64, ImageError> {
    source.size().map_err(|source| ImageError::Read {
        what: "the VMDK file's size",
        source,
    })
}

/// The header in a streamOptimized footer: the last 1536 bytes of the file are a
/// footer marker, the header (magic included) and an end-of-stream marker.
fn footer_header(source: &dyn ByteSource, file_size: u64) -> Result<HostedHeader, ImageError> {
    let end = file_size - file_size % SECTOR;
    let start = end.checked_sub(3 * SECTOR).ok_or_else(|| {
        ImageError::Invalid("the streamOptimized file is too short for its footer".into())
    })?;
    let marker = read_sector(source, start, "the streamOptimized footer marker")?;
    let header = read_sector(source, start + SECTOR, "the streamOptimized footer")?;
    let eos = read_sector(source, start + 2 * SECTOR, "the end-of-stream marker")?;
    if le32(&marker, 8) != 0
        || le32(&marker, 12) != MARKER_FOOTER
        || &header[..4] != b"KDMV"
        || le64(&eos, 0) != 0
        || le32(&eos, 8) != 0
        || le32(&eos, 12) != MARKER_END_OF_STREAM
    {
        return Err(ImageError::Invalid(
            "the streamOptimized header says its grain directory is in the footer, but the \
             file does not end in a footer marker, footer and end-of-stream marker"
                .into(),
        ));
    }
    HostedHeader::parse(&header)
}
