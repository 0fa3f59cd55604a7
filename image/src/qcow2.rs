//! QCOW2 reader (placeholder until the parser lands).

use std::path::Path;

use crate::{DiskImage, ImageError, OpenOptions, Segment};

#[derive(Debug)]
pub struct Qcow2 {}

impl Qcow2 {
    pub fn open(_path: &Path, _options: &OpenOptions) -> Result<Qcow2, ImageError> {
        Err(ImageError::Unsupported("qcow2 is not readable yet".into()))
    }
}

impl DiskImage for Qcow2 {
    fn virtual_size(&self) -> u64 {
        0
    }
    fn segment(&mut self, _offset: u64, _max_len: u64) -> Result<Segment, ImageError> {
        Err(ImageError::Unsupported("qcow2".into()))
    }
    fn read_at(&mut self, _offset: u64, _buf: &mut [u8]) -> Result<(), ImageError> {
        Err(ImageError::Unsupported("qcow2".into()))
    }
}
