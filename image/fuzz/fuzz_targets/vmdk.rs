#![no_main]
//! Fuzzes the VMDK reader on an in-memory file: a hosted sparse or streamOptimized
//! extent, a seSparse or COWD extent, or a descriptor (whose file extents must be
//! refused). Small limits; walks the segments and reads a bounded amount. Any error
//! is fine; a panic, a hang or a large allocation is not.

use trireme_image::vmdk::Vmdk;
use trireme_image::{DiskImage, Limits, OpenOptions, SegmentKind};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let options = OpenOptions {
        allow_references: None,
        snapshot: None,
        limits: Limits {
            max_virtual_size: 1 << 30,
            max_table_bytes: 1 << 20,
            max_cache_bytes: 1 << 20,
            max_chain_depth: 2,
            max_extents: 64,
            max_compressed_bytes: 256 << 10,
        },
    };
    let Ok(mut image) = Vmdk::from_source(Box::new(data.to_vec()), &options) else {
        return;
    };
    let size = image.virtual_size();
    let mut buf = vec![0u8; 64 << 10];
    let mut budget = 1usize << 20;
    let mut pos = 0u64;
    for _ in 0..256 {
        if pos >= size {
            break;
        }
        let Ok(seg) = image.segment(pos, 1 << 20) else {
            return;
        };
        assert_eq!(seg.offset, pos);
        assert!(seg.length > 0 && seg.length <= size - pos);
        let n = usize::try_from(seg.length)
            .unwrap_or(usize::MAX)
            .min(buf.len())
            .min(budget);
        if n > 0 {
            match image.read_at(pos, &mut buf[..n]) {
                Ok(()) if seg.kind == SegmentKind::Zero => {
                    assert!(buf[..n].iter().all(|&b| b == 0), "a Zero segment read data");
                }
                Ok(()) => {}
                Err(_) => return,
            }
            budget -= n;
        }
        pos += seg.length;
    }
    let _ = image.warnings();
});
