//! VMDK reader (placeholder until the parser lands).

use std::path::Path;

use crate::{DiskImage, ImageError, OpenOptions};

/// First 8 bytes of an ESXi seSparse extent, little-endian.
pub const SESPARSE_MAGIC: u64 = 0x0000_0000_cafe_babe;

pub fn open(_path: &Path, _options: &OpenOptions) -> Result<Box<dyn DiskImage>, ImageError> {
    Err(ImageError::Unsupported("vmdk is not readable yet".into()))
}
