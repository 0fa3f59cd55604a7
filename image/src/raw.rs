//! Raw images (and ISO 9660 images, which are raw bytes): the file is the disk.
//! Holes in a sparse file are found with SEEK_DATA / SEEK_HOLE, so importing a sparse
//! raw file writes only its data.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;

use crate::{
    DiskImage, ImageError, OpenOptions, Segment, SegmentKind, check_limit, check_range,
    read_exact_at_or_zero,
};

#[derive(Debug)]
pub struct Raw {
    file: File,
    size: u64,
}

impl Raw {
    pub fn open(path: &Path, options: &OpenOptions) -> Result<Raw, ImageError> {
        let file = File::open(path).map_err(|source| ImageError::Open {
            path: path.to_owned(),
            source,
        })?;
        Raw::from_file(file, options)
    }

    /// A raw disk over an already open file (also used for flat VMDK extents and raw
    /// backing files).
    pub fn from_file(file: File, options: &OpenOptions) -> Result<Raw, ImageError> {
        let size = file
            .metadata()
            .map_err(|source| ImageError::Read {
                what: "the file's size",
                source,
            })?
            .len();
        check_limit("the virtual size", size, options.limits.max_virtual_size)?;
        Ok(Raw { file, size })
    }

    /// lseek with SEEK_DATA/SEEK_HOLE; `None` when the filesystem cannot tell (then
    /// everything is data) or there is no data after `offset`.
    fn seek(&self, offset: u64, whence: libc::c_int) -> Option<u64> {
        let off = libc::off_t::try_from(offset).ok()?;
        // SAFETY: lseek on a file descriptor we own; it reads no memory of ours.
        let r = unsafe { libc::lseek(self.file.as_raw_fd(), off, whence) };
        u64::try_from(r).ok()
    }
}

impl DiskImage for Raw {
    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn segment(&mut self, offset: u64, max_len: u64) -> Result<Segment, ImageError> {
        check_range(offset, 1, self.size)?;
        let limit = max_len.min(self.size - offset);
        let (kind, end) = match self.seek(offset, libc::SEEK_DATA) {
            // No data from here to the end of the file.
            None => (SegmentKind::Zero, self.size),
            Some(data) if data > offset => (SegmentKind::Zero, data),
            Some(_) => (
                SegmentKind::Data,
                self.seek(offset, libc::SEEK_HOLE).unwrap_or(self.size),
            ),
        };
        let length = end.saturating_sub(offset).clamp(1, limit);
        Ok(Segment {
            offset,
            length,
            kind,
        })
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), ImageError> {
        check_range(offset, buf.len() as u64, self.size)?;
        read_exact_at_or_zero(&self.file, offset, buf, "the raw image")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn sparse_file_segments_and_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.raw");
        let file = File::create(&path).unwrap();
        file.set_len(8 << 20).unwrap();
        file.write_all_at(&[0xab; 65536], 4 << 20).unwrap();
        drop(file);
        let mut raw = Raw::open(&path, &OpenOptions::default()).unwrap();
        assert_eq!(raw.virtual_size(), 8 << 20);
        let first = raw.segment(0, u64::MAX).unwrap();
        assert_eq!(first.offset, 0);
        // tmpfs and ext4 report the hole; a filesystem without SEEK_HOLE says data.
        if first.kind == SegmentKind::Zero {
            assert_eq!(first.length, 4 << 20);
            let data = raw.segment(4 << 20, u64::MAX).unwrap();
            assert_eq!(data.kind, SegmentKind::Data);
            assert!(data.length >= 65536);
        }
        let mut buf = vec![0u8; 8192];
        raw.read_at((4 << 20) + 65536 - 4096, &mut buf).unwrap();
        assert_eq!(&buf[..4096], &[0xab; 4096][..]);
        assert_eq!(&buf[4096..], &[0; 4096][..]);
        assert!(raw.read_at((8 << 20) - 10, &mut buf).is_err());
        assert!(raw.segment(8 << 20, 1).is_err());
    }
}
