//! QCOW2 images (versions 2 and 3), read-only, for import.
//!
//! Covers every cluster size qemu allows (512 B to 2 MiB), compressed clusters
//! (deflate and zstd), zero clusters, extended L2 entries with subclusters, external
//! data files, backing chains and internal snapshots. Encrypted images and unknown
//! incompatible features are refused.
//!
//! The file is hostile input: the header is checked against [`crate::Limits`] before
//! any table is read ([`header`]), every file named inside the image (backing file,
//! data file) goes through [`crate::resolve_reference`], and the backing chain is
//! bounded in depth and may not loop.
//!
//! Reading is built on one step, [`Qcow2::extent`]: the longest run from a guest
//! offset, inside one L2 table, that maps to one kind of thing (host-contiguous
//! data, one compressed cluster, zeros, or the backing file). `segment` merges those
//! runs by kind, and `read_at` turns host-contiguous runs into single reads.

mod compressed;
mod header;
mod mapping;
mod snapshot;

use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::raw::Raw;
use crate::{
    ByteSource, DiskImage, Format, ImageError, OpenOptions, Segment, SegmentKind, check_limit,
    check_range, read_exact_at_or_zero, resolve_reference,
};

use compressed::{Decompressor, compressed_extent};
use header::{Compression, FIXED_HEADER_BYTES, Header, INCOMPAT_DATA_FILE, check_l1};
use mapping::{L1E_OFFSET_MASK, L2Cache, Layout, Mapping, decode_table};

/// A QCOW2 image opened for reading.
pub struct Qcow2 {
    /// The image file.
    file: Box<dyn ByteSource>,
    file_size: u64,
    /// Where data clusters live when the image has an external data file.
    data_file: Option<Box<dyn ByteSource>>,
    layout: Layout,
    /// log2 of the entries per L2 table.
    l2_bits: u32,
    compression: Compression,
    /// Virtual size of the active layer, or of the selected snapshot.
    size: u64,
    /// The L1 table in use (active or the selected snapshot's).
    l1: Vec<u64>,
    l2_cache: L2Cache,
    /// The L2 table used last, to skip the cache lookup on sequential access.
    last_l2: Option<(u64, Arc<[u64]>)>,
    backing: Option<Box<dyn DiskImage>>,
    backing_size: u64,
    max_compressed_bytes: u64,
    decompressor: Option<Decompressor>,
    /// The last compressed cluster read: its L2 entry and its bytes, so reads of
    /// less than a cluster decompress it once.
    cluster_entry: Option<u64>,
    cluster: Vec<u8>,
    compressed_input: Vec<u8>,
    warnings: Vec<String>,
}

impl fmt::Debug for Qcow2 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Qcow2")
            .field("size", &self.size)
            .field("layout", &self.layout)
            .field("compression", &self.compression)
            .field("l1_entries", &self.l1.len())
            .field("external_data_file", &self.data_file.is_some())
            .field("backing", &self.backing)
            .finish_non_exhaustive()
    }
}

/// A run of guest bytes with one mapping (see [`Qcow2::extent`]).
#[derive(Debug, Clone, Copy)]
struct Extent {
    len: u64,
    mapping: Mapping,
}

/// What [`DiskImage::segment`] groups runs by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RunClass {
    Data,
    Zero,
    /// Unallocated here, inside the backing file: the backing file decides.
    Backing,
}

/// The image files already in the chain above an image (canonical paths), to refuse
/// loops and bound the depth.
type Chain = Vec<PathBuf>;

impl Qcow2 {
    /// Opens the QCOW2 image at `path`. Its backing file and external data file are
    /// opened only as [`OpenOptions::allow_references`] permits.
    pub fn open(path: &Path, options: &OpenOptions) -> Result<Qcow2, ImageError> {
        if options.limits.max_chain_depth < 1 {
            return Err(ImageError::ChainTooDeep {
                limit: options.limits.max_chain_depth,
            });
        }
        let canonical = path.canonicalize().unwrap_or_else(|_| path.to_owned());
        Qcow2::open_in_chain(path, options, vec![canonical])
    }

    /// Reads an image from `source` (memory, for fuzzing and tests). Nothing the image
    /// names is opened: a backing file or external data file is refused.
    pub fn from_source(
        source: Box<dyn ByteSource>,
        options: &OpenOptions,
    ) -> Result<Qcow2, ImageError> {
        Qcow2::build(source, None, options, &Chain::new())
    }

    fn open_in_chain(
        path: &Path,
        options: &OpenOptions,
        chain: Chain,
    ) -> Result<Qcow2, ImageError> {
        let file = File::open(path).map_err(|source| ImageError::Open {
            path: path.to_owned(),
            source,
        })?;
        Qcow2::build(Box::new(file), Some(path), options, &chain)
    }

    fn build(
        file: Box<dyn ByteSource>,
        path: Option<&Path>,
        options: &OpenOptions,
        chain: &Chain,
    ) -> Result<Qcow2, ImageError> {
        let limits = &options.limits;
        let file_size = file.size().map_err(|source| ImageError::Read {
            what: "the image's size",
            source,
        })?;
        let mut head = [0u8; FIXED_HEADER_BYTES];
        read_exact_at_or_zero(&*file, 0, &mut head, "the QCOW2 header")?;
        let head_len = usize::try_from(file_size).map_or(head.len(), |s| s.min(head.len()));
        let header = Header::parse(&head[..head_len], limits)?;

        // The first cluster holds the header extensions and the backing file name;
        // it is at most 2 MiB (checked by Header::parse).
        let first_len = usize::try_from(header.cluster_size().min(file_size))
            .map_err(|_| ImageError::Invalid("the first cluster is too large".into()))?;
        let mut first = vec![0u8; first_len];
        read_exact_at_or_zero(&*file, 0, &mut first, "the QCOW2 header cluster")?;
        let ext = header.extensions(&first)?;
        header.check_features(&ext)?;
        let backing_name = header.backing_file_name(&first)?;
        drop(first);
        let mut warnings = header.warnings();

        let layout = Layout {
            cluster_bits: header.cluster_bits,
            extended_l2: header.extended_l2(),
            external_data: header.incompatible & INCOMPAT_DATA_FILE != 0,
        };
        check_limit(
            "an L2 table's size",
            header.cluster_size(),
            limits.max_table_bytes,
        )?;

        // The L1 table: the active one, or the selected snapshot's.
        let (size, l1_size, l1_offset) = match &options.snapshot {
            None => (header.size, header.l1_size, header.l1_table_offset),
            Some(wanted) => {
                if layout.external_data {
                    return Err(ImageError::Unsupported(
                        "internal snapshots in an image with an external data file".into(),
                    ));
                }
                let table = snapshot::read_table(
                    |at, buf| read_exact_at_or_zero(&*file, at, buf, "the snapshot table"),
                    header.snapshots_offset,
                    header.nb_snapshots,
                    limits.max_table_bytes,
                )?;
                let chosen = snapshot::find(&table, wanted)?;
                let size = chosen.disk_size.unwrap_or(header.size);
                check_limit("the snapshot's virtual size", size, limits.max_virtual_size)?;
                check_l1(
                    &header,
                    chosen.l1_size,
                    chosen.l1_table_offset,
                    limits,
                    "the snapshot's",
                )?;
                (size, chosen.l1_size, chosen.l1_table_offset)
            }
        };
        // Bounded by max_table_bytes in check_l1.
        let mut l1_bytes = vec![
            0u8;
            usize::try_from(u64::from(l1_size) * 8).map_err(|_| {
                ImageError::Invalid("the L1 table is too large".into())
            })?
        ];
        // An L1 table of zeros may lie past the end of the file (qemu-img create
        // does not write it).
        read_exact_at_or_zero(&*file, l1_offset, &mut l1_bytes, "the L1 table")?;
        let l1 = decode_table(&l1_bytes);
        drop(l1_bytes);

        let data_file: Option<Box<dyn ByteSource>> = if layout.external_data {
            let Some(name) = &ext.data_file else {
                return Err(ImageError::Unsupported(
                    "an external data file whose name is not in the image".into(),
                ));
            };
            let resolved = reference(path, name, options)?;
            let file = File::open(&resolved).map_err(|source| ImageError::Open {
                path: resolved.clone(),
                source,
            })?;
            Some(Box::new(file))
        } else {
            None
        };

        // Split the cache budget: half here, half down the chain.
        let mut cache_bytes = limits.max_cache_bytes;
        let backing = match &backing_name {
            None => None,
            Some(name) => {
                cache_bytes /= 2;
                let backing =
                    open_backing(path, name, ext.backing_format.as_deref(), options, chain)?;
                warnings.extend(
                    backing
                        .warnings()
                        .into_iter()
                        .map(|w| format!("backing file {name}: {w}")),
                );
                Some(backing)
            }
        };
        let backing_size = backing.as_ref().map_or(0, |b| b.virtual_size());

        Ok(Qcow2 {
            file,
            file_size,
            data_file,
            layout,
            l2_bits: header.l2_bits(),
            compression: header.compression,
            size,
            l1,
            l2_cache: L2Cache::new(cache_bytes, header.cluster_size()),
            last_l2: None,
            backing,
            backing_size,
            max_compressed_bytes: limits.max_compressed_bytes,
            decompressor: None,
            cluster_entry: None,
            cluster: Vec::new(),
            compressed_input: Vec::new(),
            warnings,
        })
    }

    /// The L2 table at host offset `offset`, from the cache or the file.
    fn l2_table(&mut self, offset: u64) -> Result<Arc<[u64]>, ImageError> {
        if let Some((at, table)) = &self.last_l2
            && *at == offset
        {
            return Ok(Arc::clone(table));
        }
        let cluster_size = self.layout.cluster_size();
        if offset & (cluster_size - 1) != 0 {
            return Err(ImageError::Invalid(format!(
                "the L2 table offset {offset:#x} is not cluster aligned"
            )));
        }
        let table = match self.l2_cache.get(offset) {
            Some(table) => table,
            None => {
                if offset >= self.file_size {
                    return Err(ImageError::Invalid(format!(
                        "an L2 table at {offset:#x} is past the end of the image file ({} bytes)",
                        self.file_size
                    )));
                }
                // One cluster, at most 2 MiB and within max_table_bytes.
                let mut bytes = vec![
                    0u8;
                    usize::try_from(cluster_size).map_err(|_| {
                        ImageError::Invalid("the cluster size is too large".into())
                    })?
                ];
                read_exact_at_or_zero(&*self.file, offset, &mut bytes, "an L2 table")?;
                let table: Arc<[u64]> = decode_table(&bytes).into();
                self.l2_cache.insert(offset, Arc::clone(&table));
                table
            }
        };
        self.last_l2 = Some((offset, Arc::clone(&table)));
        Ok(table)
    }

    /// The longest run from `guest` (at most `max_len` bytes, inside one L2 table)
    /// with one mapping: host-contiguous data, one compressed cluster, zeros, or
    /// unallocated. `guest` < size and `max_len` > 0.
    fn extent(&mut self, guest: u64, max_len: u64) -> Result<Extent, ImageError> {
        let cluster_bits = self.layout.cluster_bits;
        let table_shift = cluster_bits + self.l2_bits;
        let l1_index = guest >> table_shift;
        let table_end = (l1_index + 1).saturating_mul(1u64 << table_shift);
        let end = guest + max_len.min(table_end - guest);
        let l1_entry = usize::try_from(l1_index)
            .ok()
            .and_then(|i| self.l1.get(i))
            .copied()
            .unwrap_or(0);
        let l2_offset = l1_entry & L1E_OFFSET_MASK;
        if l2_offset == 0 {
            return Ok(Extent {
                len: end - guest,
                mapping: Mapping::Unallocated,
            });
        }
        let table = self.l2_table(l2_offset)?;
        let words = self.layout.entry_words();
        let index_mask = (1u64 << self.l2_bits) - 1;
        let cluster_mask = self.layout.cluster_size() - 1;
        let mut pos = guest;
        let mut first: Option<Mapping> = None;
        let mut next_host = 0u64;
        while pos < end {
            let index = usize::try_from((pos >> cluster_bits) & index_mask)
                .map_err(|_| ImageError::Invalid("an L2 index is too large".into()))?;
            let entry = table.get(index * words).copied().unwrap_or(0);
            let bitmap = if words == 2 {
                table.get(index * 2 + 1).copied().unwrap_or(0)
            } else {
                0
            };
            let (mapping, len) = self.layout.classify(entry, bitmap, pos & cluster_mask)?;
            let len = len.min(end - pos);
            let same = match (first, mapping) {
                (None, _) => true,
                (Some(Mapping::Host(_)), Mapping::Host(host)) => host == next_host,
                (Some(Mapping::Zero), Mapping::Zero)
                | (Some(Mapping::Unallocated), Mapping::Unallocated) => true,
                _ => false,
            };
            if !same {
                break;
            }
            first.get_or_insert(mapping);
            pos += len;
            match mapping {
                Mapping::Host(host) => next_host = host.saturating_add(len),
                // A compressed cluster is decompressed alone.
                Mapping::Compressed(_) => break,
                Mapping::Zero | Mapping::Unallocated => {}
            }
        }
        Ok(Extent {
            len: pos - guest,
            mapping: first.unwrap_or(Mapping::Unallocated),
        })
    }

    /// Fills `out` from the compressed cluster with L2 entry `entry`, starting
    /// `in_cluster` bytes into it.
    fn read_compressed(
        &mut self,
        entry: u64,
        in_cluster: u64,
        out: &mut [u8],
    ) -> Result<(), ImageError> {
        let cluster_size = usize::try_from(self.layout.cluster_size())
            .map_err(|_| ImageError::Invalid("the cluster size is too large".into()))?;
        if self.cluster_entry != Some(entry) {
            self.load_compressed(entry)?;
            let decompressor = match &mut self.decompressor {
                Some(d) => d,
                None => self
                    .decompressor
                    .insert(Decompressor::new(self.compression)?),
            };
            // A whole cluster goes straight to the caller's buffer.
            if in_cluster == 0 && out.len() == cluster_size {
                return decompressor.decompress(&self.compressed_input, out);
            }
            self.cluster.resize(cluster_size, 0);
            decompressor.decompress(&self.compressed_input, &mut self.cluster)?;
            self.cluster_entry = Some(entry);
        }
        let start = usize::try_from(in_cluster)
            .map_err(|_| ImageError::Invalid("an offset in a cluster is too large".into()))?;
        let Some(bytes) = self.cluster.get(start..start + out.len()) else {
            return Err(ImageError::Invalid(
                "a read runs past a compressed cluster".into(),
            ));
        };
        out.copy_from_slice(bytes);
        Ok(())
    }

    /// Reads the compressed bytes of the cluster with L2 entry `entry` into
    /// `compressed_input`, after checking them against the limits.
    fn load_compressed(&mut self, entry: u64) -> Result<(), ImageError> {
        self.cluster_entry = None;
        let at = compressed_extent(entry, self.layout.cluster_bits);
        check_limit(
            "a compressed cluster's size",
            at.size,
            self.max_compressed_bytes,
        )?;
        if at.offset >= self.file_size {
            return Err(ImageError::Invalid(format!(
                "a compressed cluster at {:#x} starts past the end of the image file ({} bytes)",
                at.offset, self.file_size
            )));
        }
        // The last sectors named may lie past the end of the file: read what exists.
        let available = usize::try_from(at.size.min(self.file_size - at.offset))
            .map_err(|_| ImageError::Invalid("a compressed cluster is too large".into()))?;
        self.compressed_input.resize(available, 0);
        read_exact_at_or_zero(
            &*self.file,
            at.offset,
            &mut self.compressed_input,
            "a compressed cluster",
        )
    }

    /// Fills `out` with what the backing file holds at `guest`: zeros past its end,
    /// or everywhere when there is none.
    fn read_backing(&mut self, guest: u64, out: &mut [u8]) -> Result<(), ImageError> {
        let Some(backing) = &mut self.backing else {
            out.fill(0);
            return Ok(());
        };
        let inside = usize::try_from(self.backing_size.saturating_sub(guest))
            .map_or(out.len(), |n| n.min(out.len()));
        if inside > 0 {
            backing.read_at(guest, &mut out[..inside])?;
        }
        out[inside..].fill(0);
        Ok(())
    }

    /// Reads host bytes for a run of data clusters.
    fn read_host(&self, host: u64, out: &mut [u8]) -> Result<(), ImageError> {
        let source = self.data_file.as_deref().unwrap_or(&*self.file);
        // Clusters past the end of the file read as zeros, as in qemu.
        read_exact_at_or_zero(source, host, out, "a data cluster")
    }
}

/// Resolves a file named inside the image; an image read from memory may name none.
fn reference(
    path: Option<&Path>,
    name: &str,
    options: &OpenOptions,
) -> Result<PathBuf, ImageError> {
    match path {
        Some(path) => resolve_reference(path, name, options),
        None => Err(ImageError::ReferenceNotAllowed {
            name: name.to_owned(),
        }),
    }
}

/// Opens the backing file `name` of the image at `path` (whose chain is `chain`),
/// in the format the image names, or else the one its magic says.
fn open_backing(
    path: Option<&Path>,
    name: &str,
    format_name: Option<&str>,
    options: &OpenOptions,
    chain: &Chain,
) -> Result<Box<dyn DiskImage>, ImageError> {
    let resolved = reference(path, name, options)?;
    if chain.contains(&resolved) {
        return Err(ImageError::Invalid(format!(
            "the backing chain loops: {name:?} ({}) is already in it",
            resolved.display()
        )));
    }
    let limit = options.limits.max_chain_depth;
    let depth = u32::try_from(chain.len() + 1).unwrap_or(u32::MAX);
    if depth > limit {
        return Err(ImageError::ChainTooDeep { limit });
    }
    let format = match format_name {
        Some("qcow2") => Format::Qcow2,
        Some("raw" | "file") => Format::Raw,
        Some("vmdk") => Format::Vmdk,
        Some(other) => {
            return Err(ImageError::Unsupported(format!(
                "backing file {name:?} in format {other:?}"
            )));
        }
        None => match Format::detect(&resolved)? {
            Format::Qcow2 => Format::Qcow2,
            Format::Vmdk => Format::Vmdk,
            Format::Raw | Format::Iso => Format::Raw,
        },
    };
    let mut backing_options = OpenOptions {
        snapshot: None,
        ..options.clone()
    };
    backing_options.limits.max_cache_bytes /= 2;
    Ok(match format {
        Format::Qcow2 => {
            let mut chain = chain.clone();
            chain.push(resolved.clone());
            Box::new(Qcow2::open_in_chain(&resolved, &backing_options, chain)?)
        }
        Format::Vmdk => {
            // The VMDK reader bounds its own chain: give it what is left of ours.
            backing_options.limits.max_chain_depth = limit - depth + 1;
            crate::open(&resolved, Format::Vmdk, &backing_options)?
        }
        Format::Raw | Format::Iso => Box::new(Raw::open(&resolved, &backing_options)?),
    })
}

impl DiskImage for Qcow2 {
    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn segment(&mut self, offset: u64, max_len: u64) -> Result<Segment, ImageError> {
        check_range(offset, 1, self.size)?;
        let limit = max_len.max(1).min(self.size - offset);
        let mut len = 0u64;
        let mut class = None;
        while len < limit {
            let guest = offset + len;
            let extent = self.extent(guest, limit - len)?;
            let (this, n) = match extent.mapping {
                Mapping::Host(_) | Mapping::Compressed(_) => (RunClass::Data, extent.len),
                Mapping::Zero => (RunClass::Zero, extent.len),
                Mapping::Unallocated if self.backing.is_some() && guest < self.backing_size => {
                    (RunClass::Backing, extent.len.min(self.backing_size - guest))
                }
                Mapping::Unallocated => (RunClass::Zero, extent.len),
            };
            if class.is_some_and(|c| c != this) {
                break;
            }
            class = Some(this);
            len += n;
        }
        let kind = match class {
            Some(RunClass::Backing) => {
                let Some(backing) = &mut self.backing else {
                    return Err(ImageError::Invalid("lost the backing file".into()));
                };
                let segment = backing.segment(offset, len)?;
                return Ok(Segment {
                    offset,
                    length: segment.length.clamp(1, len),
                    kind: segment.kind,
                });
            }
            Some(RunClass::Data) => SegmentKind::Data,
            Some(RunClass::Zero) | None => SegmentKind::Zero,
        };
        Ok(Segment {
            offset,
            length: len,
            kind,
        })
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), ImageError> {
        check_range(offset, buf.len() as u64, self.size)?;
        let mut done = 0usize;
        // A host-contiguous run not read yet: (host offset, start in buf, length).
        let mut pending: Option<(u64, usize, usize)> = None;
        while done < buf.len() {
            let guest = offset + done as u64;
            let extent = self.extent(guest, (buf.len() - done) as u64)?;
            // extent.len <= buf.len() - done.
            let n = usize::try_from(extent.len)
                .map_err(|_| ImageError::Invalid("a run is too long".into()))?;
            if let Mapping::Host(host) = extent.mapping {
                match &mut pending {
                    Some((start, _, len)) if *start + *len as u64 == host => *len += n,
                    _ => {
                        if let Some((start, at, len)) = pending.take() {
                            self.read_host(start, &mut buf[at..at + len])?;
                        }
                        pending = Some((host, done, n));
                    }
                }
                done += n;
                continue;
            }
            if let Some((start, at, len)) = pending.take() {
                self.read_host(start, &mut buf[at..at + len])?;
            }
            let out = &mut buf[done..done + n];
            match extent.mapping {
                Mapping::Zero => out.fill(0),
                Mapping::Compressed(entry) => {
                    let in_cluster = guest & (self.layout.cluster_size() - 1);
                    self.read_compressed(entry, in_cluster, out)?;
                }
                Mapping::Unallocated => self.read_backing(guest, out)?,
                Mapping::Host(_) => {}
            }
            done += n;
        }
        if let Some((start, at, len)) = pending {
            self.read_host(start, &mut buf[at..at + len])?;
        }
        Ok(())
    }

    fn warnings(&self) -> Vec<String> {
        self.warnings.clone()
    }
}
