//! VMDK reader: a text descriptor (standalone, or embedded in a hosted sparse file)
//! lists extents — sparse (hosted `KDMV`, streamOptimized, ESX `COWD`, ESXi
//! seSparse), flat, or zero — laid end to end to make the virtual disk.
//!
//! Every extent file a descriptor names is opened through
//! [`resolve_reference`](crate::resolve_reference), so a standalone descriptor needs
//! `allow_references`; a monolithic sparse file names no other file. A delta disk
//! (`parentFileNameHint`, `parentCID` other than `ffffffff`) reads its unallocated
//! grains from its parent VMDK, opened the same way (a reference) and counted against
//! `max_chain_depth`; its CID must match the child's `parentCID`. Raw device mappings
//! are refused.

mod descriptor;
mod sparse;

use std::fs::File;
use std::path::Path;

use crate::raw::Raw;
use crate::{
    ByteSource, DiskImage, ImageError, OpenOptions, Segment, SegmentKind, check_limit, check_range,
    read_exact_at_or_zero, resolve_reference,
};

use descriptor::{AccessMode, Descriptor, ExtentType, MAX_DESCRIPTOR_BYTES};
use sparse::{Coverage, HostedHeader, ReadBelow, SparseExtent};

/// First 8 bytes of an ESXi seSparse extent (its constant header's magic),
/// little-endian.
pub const SESPARSE_MAGIC: u64 = 0x0000_0000_cafe_babe;

const SECTOR: u64 = 512;

/// Opens the VMDK at `path` (a descriptor, or a sparse extent).
pub fn open(path: &Path, options: &OpenOptions) -> Result<Box<dyn DiskImage>, ImageError> {
    Ok(Box::new(Vmdk::open(path, options)?))
}

/// A VMDK virtual disk: its extents end to end.
#[derive(Debug)]
pub struct Vmdk {
    extents: Vec<Extent>,
    size: u64,
    create_type: String,
    /// The content ID in the descriptor, which a child's `parentCID` names.
    cid: Option<u32>,
    /// The disk below a delta disk.
    parent: Option<Box<Vmdk>>,
    warnings: Vec<String>,
}

#[derive(Debug)]
struct Extent {
    /// Where the extent starts in the virtual disk.
    start: u64,
    len: u64,
    content: Content,
}

#[derive(Debug)]
enum Content {
    Zero,
    /// Raw bytes of `file` from `offset`; past the file's end they read as zeros.
    Flat {
        file: Raw,
        offset: u64,
    },
    Sparse(Box<SparseExtent>),
}

impl Vmdk {
    /// Opens a VMDK file: a descriptor (whose extents need `allow_references`), or a
    /// single sparse extent.
    pub fn open(path: &Path, options: &OpenOptions) -> Result<Vmdk, ImageError> {
        Vmdk::open_at_depth(path, options, 1)
    }

    /// Opens `path` as the `depth`th image of a chain (the top is 1).
    fn open_at_depth(path: &Path, options: &OpenOptions, depth: u32) -> Result<Vmdk, ImageError> {
        let file = File::open(path).map_err(|source| ImageError::Open {
            path: path.to_owned(),
            source,
        })?;
        Vmdk::from_source_at(Box::new(file), Some(path), options, depth)
    }

    /// Opens an in-memory (or any) single-file VMDK: a sparse or streamOptimized
    /// extent, or a descriptor. Nothing the image names is opened: a descriptor with
    /// file extents fails with [`ImageError::ReferenceNotAllowed`].
    pub fn from_source(
        source: Box<dyn ByteSource>,
        options: &OpenOptions,
    ) -> Result<Vmdk, ImageError> {
        Vmdk::from_source_at(source, None, options, 1)
    }

    /// The descriptor's createType (or the one the sparse header implies).
    pub fn create_type(&self) -> &str {
        &self.create_type
    }

    fn from_source_at(
        source: Box<dyn ByteSource>,
        path: Option<&Path>,
        options: &OpenOptions,
        depth: u32,
    ) -> Result<Vmdk, ImageError> {
        let size = source.size().map_err(|source| ImageError::Read {
            what: "the VMDK file's size",
            source,
        })?;
        let mut head = [0u8; 512];
        read_exact_at_or_zero(source.as_ref(), 0, &mut head, "the VMDK header")?;
        if &head[..4] == b"KDMV" {
            let header = HostedHeader::parse(&head)?;
            if header.is_descriptor_only() {
                let text = embedded_descriptor(source.as_ref(), &header)?.unwrap_or_default();
                return Vmdk::from_descriptor(&text, path, options, depth);
            }
            let mut warnings = Vec::new();
            let mut desc = None;
            let embedded = embedded_descriptor(source.as_ref(), &header).unwrap_or_else(|e| {
                warnings.push(format!("ignoring the embedded descriptor: {e}"));
                None
            });
            if let Some(text) = embedded {
                // The embedded descriptor's extent line names this very file; only its
                // parent and createType matter.
                match descriptor::parse(&text, options.limits.max_extents) {
                    Ok(parsed) => desc = Some(parsed),
                    Err(e) => warnings.push(format!("ignoring the embedded descriptor: {e}")),
                }
            }
            let extent = SparseExtent::hosted(source, header, &options.limits)?;
            let create_type = desc.as_ref().and_then(|d| d.create_type.clone());
            let mut vmdk = Vmdk::single(extent, create_type, warnings);
            if let Some(desc) = desc {
                vmdk.attach_parent(&desc, path, options, depth)?;
            }
            return Ok(vmdk);
        }
        if &head[..4] == b"COWD" || head[..8] == SESPARSE_MAGIC.to_le_bytes() {
            let extent = SparseExtent::open(source, &options.limits)?;
            return Ok(Vmdk::single(extent, None, Vec::new()));
        }
        check_limit("the VMDK descriptor", size, MAX_DESCRIPTOR_BYTES)?;
        let mut text = vec![0u8; usize::try_from(size).unwrap_or(0)];
        read_exact_at_or_zero(source.as_ref(), 0, &mut text, "the VMDK descriptor")?;
        Vmdk::from_descriptor(&text, path, options, depth)
    }

    fn single(extent: SparseExtent, create_type: Option<String>, warnings: Vec<String>) -> Vmdk {
        let mut warnings = warnings;
        warnings.extend(extent.warnings.iter().cloned());
        let size = extent.capacity();
        Vmdk {
            create_type: create_type.unwrap_or_else(|| extent.kind_name.to_owned()),
            extents: vec![Extent {
                start: 0,
                len: size,
                content: Content::Sparse(Box::new(extent)),
            }],
            size,
            cid: None,
            parent: None,
            warnings,
        }
    }

    /// Opens the extents a descriptor lists. `path` is the descriptor's file, against
    /// which extent names resolve; without one no extent file is opened.
    fn from_descriptor(
        text: &[u8],
        path: Option<&Path>,
        options: &OpenOptions,
        depth: u32,
    ) -> Result<Vmdk, ImageError> {
        let limits = &options.limits;
        let desc = descriptor::parse(text, limits.max_extents)?;
        let create_type = desc
            .create_type
            .clone()
            .ok_or_else(|| ImageError::Invalid("the VMDK descriptor has no createType".into()))?;
        descriptor::check_create_type(&create_type)?;
        if desc.extents.is_empty() {
            return Err(ImageError::Invalid(
                "the VMDK descriptor lists no extents".into(),
            ));
        }
        // The declared size is checked before any extent file is opened.
        let mut declared = 0u64;
        for line in &desc.extents {
            declared = line
                .sectors
                .checked_mul(SECTOR)
                .and_then(|bytes| declared.checked_add(bytes))
                .ok_or(ImageError::TooLarge {
                    what: "the virtual size",
                    value: u64::MAX,
                    limit: limits.max_virtual_size,
                })?;
            check_limit("the virtual size", declared, limits.max_virtual_size)?;
            if line.access == AccessMode::NoAccess {
                return Err(ImageError::Unsupported(
                    "the VMDK has a NOACCESS extent, whose contents cannot be read".into(),
                ));
            }
        }
        let mut extents = Vec::with_capacity(desc.extents.len());
        let mut warnings = Vec::new();
        let mut start = 0u64;
        for line in &desc.extents {
            let declared_len = line.sectors * SECTOR;
            let (content, len) = match (line.kind, &line.file) {
                (ExtentType::Zero, _) | (_, None) => (Content::Zero, declared_len),
                (kind, Some(name)) => {
                    let Some(path) = path else {
                        return Err(ImageError::ReferenceNotAllowed { name: name.clone() });
                    };
                    let resolved = resolve_reference(path, name, options)?;
                    let file = File::open(&resolved).map_err(|source| ImageError::Open {
                        path: resolved.clone(),
                        source,
                    })?;
                    match kind {
                        ExtentType::Flat | ExtentType::Vmfs => {
                            let offset =
                                line.offset_sectors.checked_mul(SECTOR).ok_or_else(|| {
                                    ImageError::Invalid("a flat extent offset overflows".into())
                                })?;
                            let file = Raw::from_file(file, options)?;
                            (Content::Flat { file, offset }, declared_len)
                        }
                        _ => {
                            let extent = SparseExtent::open(Box::new(file), limits)?;
                            // The sparse header's capacity sizes the extent, as in qemu.
                            let len = extent.capacity();
                            if len != declared_len {
                                warnings.push(format!(
                                    "extent {name:?} holds {len} bytes, its descriptor line \
                                     says {declared_len}"
                                ));
                            }
                            warnings.extend(extent.warnings.iter().cloned());
                            (Content::Sparse(Box::new(extent)), len)
                        }
                    }
                }
            };
            extents.push(Extent {
                start,
                len,
                content,
            });
            start = start
                .checked_add(len)
                .ok_or_else(|| ImageError::Invalid("the extents' sizes overflow".into()))?;
            check_limit("the virtual size", start, limits.max_virtual_size)?;
        }
        let mut vmdk = Vmdk {
            extents,
            size: start,
            create_type,
            cid: None,
            parent: None,
            warnings,
        };
        vmdk.attach_parent(&desc, path, options, depth)?;
        Ok(vmdk)
    }

    /// Records the descriptor's CID and, for a delta disk, opens its parent (a
    /// reference, one level deeper in the chain) and checks the parent's CID.
    fn attach_parent(
        &mut self,
        desc: &Descriptor,
        path: Option<&Path>,
        options: &OpenOptions,
        depth: u32,
    ) -> Result<(), ImageError> {
        self.cid = desc.cid.as_deref().and_then(parse_cid);
        if desc.parent().is_none() {
            return Ok(());
        }
        let Some(hint) = desc
            .parent_file_name_hint
            .as_deref()
            .filter(|hint| !hint.is_empty())
        else {
            return Err(ImageError::Unsupported(
                "the VMDK is a delta disk whose descriptor names no parentFileNameHint".into(),
            ));
        };
        if depth >= options.limits.max_chain_depth {
            return Err(ImageError::ChainTooDeep {
                limit: options.limits.max_chain_depth,
            });
        }
        let Some(path) = path else {
            return Err(ImageError::ReferenceNotAllowed {
                name: hint.to_owned(),
            });
        };
        let resolved = resolve_reference(path, hint, options)?;
        let parent = Vmdk::open_at_depth(&resolved, options, depth + 1)?;
        let wanted = desc.parent_cid.as_deref().and_then(parse_cid);
        if let (Some(wanted), Some(found)) = (wanted, parent.cid)
            && wanted != found
        {
            return Err(ImageError::Invalid(format!(
                "the parent {hint:?} has CID {found:08x}, the delta disk expects {wanted:08x} \
                 (the parent changed after the delta was made)"
            )));
        }
        self.parent = Some(Box::new(parent));
        Ok(())
    }

    /// The coverage of the run at `offset` (< size), merged across extents. Without a
    /// parent, unallocated and zero runs are the same thing.
    fn coverage(&mut self, offset: u64, max_len: u64) -> Result<(Coverage, u64), ImageError> {
        let end = offset.saturating_add(max_len).min(self.size);
        let mut index = self.extent_at(offset);
        let mut pos = offset;
        let mut coverage = None;
        let flatten = self.parent.is_none();
        while pos < end && index < self.extents.len() {
            let extent = &mut self.extents[index];
            let (mut this, len) = extent.segment(pos - extent.start, end - pos)?;
            if flatten && this == Coverage::Unallocated {
                this = Coverage::Zero;
            }
            if coverage.is_some_and(|c| c != this) || len == 0 {
                break;
            }
            coverage = Some(this);
            pos += len;
            if pos < extent.start + extent.len {
                break;
            }
            index += 1;
        }
        Ok((
            coverage.unwrap_or(Coverage::Zero),
            (pos - offset).max(1).min(self.size - offset),
        ))
    }

    /// The index of the extent holding `offset` (< size).
    fn extent_at(&self, offset: u64) -> usize {
        self.extents
            .partition_point(|e| e.start + e.len <= offset)
            .min(self.extents.len().saturating_sub(1))
    }
}

/// Reads the descriptor embedded in a hosted sparse file, if it has one.
fn embedded_descriptor(
    source: &dyn ByteSource,
    header: &HostedHeader,
) -> Result<Option<Vec<u8>>, ImageError> {
    if header.desc_offset == 0 || header.desc_size == 0 {
        return Ok(None);
    }
    let bytes = header.desc_size.saturating_mul(SECTOR);
    check_limit("the embedded VMDK descriptor", bytes, MAX_DESCRIPTOR_BYTES)?;
    let offset = header
        .desc_offset
        .checked_mul(SECTOR)
        .ok_or_else(|| ImageError::Invalid("the descriptor offset overflows".into()))?;
    let mut text = vec![0u8; usize::try_from(bytes).unwrap_or(0)];
    read_exact_at_or_zero(source, offset, &mut text, "the embedded VMDK descriptor")?;
    Ok(Some(text))
}

/// A CID is 8 hex digits; `ffffffff` in `parentCID` means "no parent".
fn parse_cid(text: &str) -> Option<u32> {
    u32::from_str_radix(text.trim(), 16).ok()
}

/// Fills `out` with the parent's bytes at `offset` (zeros past its end, or with no
/// parent).
fn read_below(
    parent: &mut Option<Box<Vmdk>>,
    offset: u64,
    out: &mut [u8],
) -> Result<(), ImageError> {
    let Some(parent) = parent else {
        out.fill(0);
        return Ok(());
    };
    let inside = usize::try_from(parent.size.saturating_sub(offset))
        .unwrap_or(usize::MAX)
        .min(out.len());
    let (stored, past_end) = out.split_at_mut(inside);
    if !stored.is_empty() {
        parent.read_at(offset, stored)?;
    }
    past_end.fill(0);
    Ok(())
}

impl Extent {
    /// The coverage and length of the run at `rel` inside this extent.
    fn segment(&mut self, rel: u64, max_len: u64) -> Result<(Coverage, u64), ImageError> {
        let max_len = max_len.min(self.len - rel);
        match &mut self.content {
            Content::Zero => Ok((Coverage::Zero, max_len)),
            Content::Flat { file, offset } => {
                let file_size = file.virtual_size();
                let at = offset.saturating_add(rel);
                if at >= file_size {
                    return Ok((Coverage::Zero, max_len));
                }
                let seg = file.segment(at, max_len.min(file_size - at))?;
                let coverage = match seg.kind {
                    SegmentKind::Data => Coverage::Data,
                    SegmentKind::Zero => Coverage::Zero,
                };
                Ok((coverage, seg.length))
            }
            Content::Sparse(sparse) => sparse.segment(rel, max_len),
        }
    }

    /// Reads at `rel`; unallocated parts of a sparse extent come from `below`.
    fn read(
        &mut self,
        rel: u64,
        buf: &mut [u8],
        below: &mut ReadBelow<'_>,
    ) -> Result<(), ImageError> {
        match &mut self.content {
            Content::Zero => {
                buf.fill(0);
                Ok(())
            }
            Content::Flat { file, offset } => {
                let file_size = file.virtual_size();
                let at = offset.saturating_add(rel);
                let inside = usize::try_from(file_size.saturating_sub(at))
                    .unwrap_or(usize::MAX)
                    .min(buf.len());
                let (stored, past_end) = buf.split_at_mut(inside);
                if !stored.is_empty() {
                    file.read_at(at, stored)?;
                }
                past_end.fill(0);
                Ok(())
            }
            Content::Sparse(sparse) => sparse.read(rel, buf, below),
        }
    }
}

impl DiskImage for Vmdk {
    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn segment(&mut self, offset: u64, max_len: u64) -> Result<Segment, ImageError> {
        check_range(offset, 1, self.size)?;
        let (coverage, length) = self.coverage(offset, max_len)?;
        let kind = match coverage {
            Coverage::Data => SegmentKind::Data,
            Coverage::Zero => SegmentKind::Zero,
            Coverage::Unallocated => match &mut self.parent {
                Some(parent) if offset < parent.size => {
                    let below = parent.segment(offset, length.min(parent.size - offset))?;
                    return Ok(Segment { offset, ..below });
                }
                _ => SegmentKind::Zero,
            },
        };
        Ok(Segment {
            offset,
            length,
            kind,
        })
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), ImageError> {
        check_range(offset, buf.len() as u64, self.size)?;
        let mut done = 0usize;
        let mut index = self.extent_at(offset);
        let Vmdk {
            extents, parent, ..
        } = self;
        while done < buf.len() {
            let pos = offset + done as u64;
            let extent = extents
                .get_mut(index)
                .ok_or_else(|| ImageError::Invalid("read past the last extent".into()))?;
            let start = extent.start;
            let rel = pos - start;
            let n = usize::try_from(extent.len - rel)
                .unwrap_or(usize::MAX)
                .min(buf.len() - done);
            extent.read(rel, &mut buf[done..done + n], &mut |at, out| {
                read_below(parent, start + at, out)
            })?;
            done += n;
            index += 1;
        }
        Ok(())
    }

    fn warnings(&self) -> Vec<String> {
        let mut warnings = self.warnings.clone();
        if let Some(parent) = &self.parent {
            warnings.extend(
                parent
                    .warnings()
                    .into_iter()
                    .map(|w| format!("parent: {w}")),
            );
        }
        warnings
    }
}
