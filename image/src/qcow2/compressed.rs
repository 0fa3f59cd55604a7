//! Compressed clusters: the L2 descriptor (whose field widths depend on the cluster
//! size) and decompression with raw deflate or zstd into exactly one cluster.

use std::fmt;

use flate2::{Decompress, FlushDecompress, Status};
use zstd::zstd_safe::{self, DCtx};

use super::header::Compression;
use crate::ImageError;

/// Where a compressed cluster's bytes are in the image file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct CompressedExtent {
    pub offset: u64,
    /// Bytes from `offset` to the end of the last 512-byte sector the descriptor
    /// names; the compressed stream ends somewhere inside.
    pub size: u64,
}

/// Decodes a compressed cluster descriptor (bits 0..=61 of the L2 entry).
/// `cluster_bits` is 9..=21, so the shifts below stay inside 64 bits.
pub(super) fn compressed_extent(entry: u64, cluster_bits: u32) -> CompressedExtent {
    let shift = 62 - (cluster_bits - 8);
    let offset = entry & ((1u64 << shift) - 1);
    let sectors = ((entry >> shift) & ((1u64 << (cluster_bits - 8)) - 1)) + 1;
    CompressedExtent {
        offset,
        size: sectors * 512 - (offset & 511),
    }
}

fn corrupt(what: String) -> ImageError {
    ImageError::Invalid(format!("a compressed cluster {what}"))
}

/// A reusable decompressor for one image's compression type.
pub(super) enum Decompressor {
    Deflate(Box<Decompress>),
    Zstd(Box<DCtx<'static>>),
}

impl fmt::Debug for Decompressor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Decompressor::Deflate(_) => f.write_str("Decompressor::Deflate"),
            Decompressor::Zstd(_) => f.write_str("Decompressor::Zstd"),
        }
    }
}

impl Decompressor {
    pub(super) fn new(kind: Compression) -> Result<Decompressor, ImageError> {
        Ok(match kind {
            Compression::Deflate => Decompressor::Deflate(Box::new(Decompress::new(false))),
            Compression::Zstd => Decompressor::Zstd(Box::new(DCtx::create())),
        })
    }

    /// Decompresses `input` into all of `out` (one cluster). Bytes of `input` past
    /// the end of the stream are ignored; a stream that yields less than a cluster,
    /// or more, is an error.
    pub(super) fn decompress(&mut self, input: &[u8], out: &mut [u8]) -> Result<(), ImageError> {
        match self {
            Decompressor::Deflate(d) => inflate(d, input, out),
            Decompressor::Zstd(d) => unzstd(d, input, out),
        }
    }
}

fn inflate(d: &mut Decompress, input: &[u8], out: &mut [u8]) -> Result<(), ImageError> {
    d.reset(false);
    let mut read = 0usize;
    let mut written = 0usize;
    loop {
        let (in_before, out_before) = (d.total_in(), d.total_out());
        let status = d
            .decompress(&input[read..], &mut out[written..], FlushDecompress::Finish)
            .map_err(|e| corrupt(format!("does not inflate: {e}")))?;
        let consumed = usize::try_from(d.total_in() - in_before)
            .map_err(|_| corrupt("consumed too much".into()))?;
        let produced = usize::try_from(d.total_out() - out_before)
            .map_err(|_| corrupt("produced too much".into()))?;
        read += consumed;
        written += produced;
        if written == out.len() {
            return Ok(());
        }
        if status == Status::StreamEnd {
            return Err(corrupt(format!(
                "inflates to {written} bytes, not {}",
                out.len()
            )));
        }
        if consumed == 0 && produced == 0 {
            return Err(corrupt(format!(
                "is truncated: it inflates to {written} of {} bytes",
                out.len()
            )));
        }
    }
}

/// One-shot decompression of the first frame straight into `out` (faster than
/// streaming, which goes through zstd's window buffer); bytes after the frame are
/// padding to the sector.
fn unzstd(d: &mut DCtx<'static>, input: &[u8], out: &mut [u8]) -> Result<(), ImageError> {
    let zstd_error =
        |what: &str, code: usize| corrupt(format!("{what}: {}", zstd_safe::get_error_name(code)));
    let frame = zstd_safe::find_frame_compressed_size(input)
        .map_err(|code| zstd_error("is not a whole zstd frame", code))?;
    let Some(frame) = input.get(..frame) else {
        return Err(corrupt("has a zstd frame longer than its data".into()));
    };
    let written = d
        .decompress(out, frame)
        .map_err(|code| zstd_error("does not decompress with zstd", code))?;
    if written != out.len() {
        return Err(corrupt(format!(
            "decompresses to {written} bytes, not {}",
            out.len()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn descriptor_fields_depend_on_cluster_bits() {
        // 64 KiB clusters: offset in bits 0..=53, sector count in 54..=61.
        let e = (3u64 << 54) | 0x1_0234;
        assert_eq!(
            compressed_extent(e, 16),
            CompressedExtent {
                offset: 0x1_0234,
                size: 4 * 512 - 0x34
            }
        );
        // 512-byte clusters: offset in bits 0..=60, one count bit (61).
        let e = (1u64 << 61) | 0x400;
        assert_eq!(
            compressed_extent(e, 9),
            CompressedExtent {
                offset: 0x400,
                size: 1024
            }
        );
        // 2 MiB clusters: offset in bits 0..=48.
        let e = (0x1fffu64 << 49) | 0x200;
        assert_eq!(compressed_extent(e, 21).size, 0x2000 * 512);
    }

    #[test]
    fn deflate_round_trip_with_trailing_bytes() {
        let data: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
        let mut enc = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(&data).unwrap();
        let mut packed = enc.finish().unwrap();
        packed.extend_from_slice(&[0xaa; 300]);
        let mut d = Decompressor::new(Compression::Deflate).unwrap();
        let mut out = vec![0u8; 65536];
        d.decompress(&packed, &mut out).unwrap();
        assert_eq!(out, data);
        // Truncated input, and a stream that is too short for the cluster.
        assert!(d.decompress(&packed[..packed.len() / 3], &mut out).is_err());
        let mut big = vec![0u8; 131072];
        assert!(d.decompress(&packed, &mut big).is_err());
        assert!(d.decompress(&[0xff; 64], &mut out).is_err());
    }

    #[test]
    fn zstd_round_trip_with_trailing_bytes() {
        let data: Vec<u8> = (0..65536u32).map(|i| (i % 13) as u8).collect();
        let mut packed = zstd::bulk::compress(&data, 1).unwrap();
        packed.extend_from_slice(&[0x55; 300]);
        let mut d = Decompressor::new(Compression::Zstd).unwrap();
        let mut out = vec![0u8; 65536];
        d.decompress(&packed, &mut out).unwrap();
        assert_eq!(out, data);
        let mut small = vec![0u8; 4096];
        assert!(d.decompress(&packed, &mut small).is_err());
        assert!(d.decompress(&packed[..20], &mut out).is_err());
    }
}
