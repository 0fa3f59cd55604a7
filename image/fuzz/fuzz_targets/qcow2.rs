#![no_main]
//! Fuzzes the QCOW2 reader: the input is an image in memory (no file it names is ever
//! opened), read with small limits, active layer and snapshot "1". Opening may fail;
//! nothing may panic, and segments must tile the disk. Seeds: image/fuzz/seeds/qcow2,
//! made by qemu-img with 512-byte clusters.

use trireme_image::qcow2::Qcow2;
use trireme_image::{DiskImage, Limits, OpenOptions, SegmentKind};

/// Bytes read per input, at most.
const READ_BUDGET: u64 = 4 << 20;
/// Segments walked per input, at most.
const MAX_SEGMENTS: u32 = 512;

fn limits() -> Limits {
    Limits {
        max_virtual_size: 64 << 20,
        max_table_bytes: 2 << 20,
        max_cache_bytes: 4 << 20,
        max_chain_depth: 4,
        max_extents: 16,
        max_compressed_bytes: 4 << 20,
    }
}

fn walk(image: &mut Qcow2) {
    let _ = image.warnings();
    let size = image.virtual_size();
    let mut buf = vec![0u8; 256 << 10];
    let mut budget = READ_BUDGET;
    let mut offset = 0u64;
    let mut segments = 0;
    while offset < size && segments < MAX_SEGMENTS {
        let Ok(segment) = image.segment(offset, 1 << 20) else {
            break;
        };
        assert_eq!(segment.offset, offset);
        assert!(segment.length >= 1 && segment.length <= size - offset);
        if segment.kind == SegmentKind::Data && budget > 0 {
            let n = segment.length.min(buf.len() as u64).min(budget);
            let n = usize::try_from(n).unwrap_or(0);
            if image.read_at(offset, &mut buf[..n]).is_err() {
                break;
            }
            budget -= n as u64;
        }
        offset += segment.length;
        segments += 1;
    }
    // A read that straddles clusters near the end, and one past the end.
    if size > 0 {
        let len = size.min(3000);
        let n = usize::try_from(len).unwrap_or(0);
        let _ = image.read_at(size - len, &mut buf[..n]);
    }
    assert!(image.read_at(size, &mut buf[..1]).is_err());
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    for snapshot in [None, Some("1".to_owned())] {
        let options = OpenOptions {
            allow_references: None,
            snapshot,
            limits: limits(),
        };
        if let Ok(mut image) = Qcow2::from_source(Box::new(data.to_vec()), &options) {
            walk(&mut image);
        }
    }
});
