//! Behaviour of the block store through its public API, on real rocksdb and real
//! data files in temporary directories.

mod common;

use std::io::{Seek, SeekFrom, Write};

use common::{allocated_bytes, assert_block, open, payload, tempdir, write};
use trireme_replica::{BLOCK_SIZE, BlockMeta, BlockWrite, Extent, MAX_BLOCKS_PER_IO, StoreError};

const VOL: u64 = 0x1234_5678_9abc_def0;

fn ok<T>(result: Result<T, StoreError>) -> T {
    result.unwrap_or_else(|e| panic!("store error: {e:?}"))
}

#[tokio::test]
async fn write_read_round_trip() {
    let dir = tempdir();
    let store = open(dir.path());
    ok(store.create_volume(VOL));
    assert_eq!(store.volumes(), vec![VOL]);
    assert!(
        store
            .data_file_path(VOL)
            .ends_with("data/123456789abcdef0.dat")
    );

    ok(store
        .write_blocks(VOL, (0..10).map(|b| write(b, 1)).collect())
        .await);
    ok(store.write_blocks(VOL, vec![write(100, 7)]).await);

    let blocks = ok(store.read_blocks(VOL, 0..12).await);
    assert_eq!(blocks.len(), 12);
    for b in 0..10u64 {
        assert_block(blocks[usize::try_from(b).unwrap_or(0)].as_ref(), b, 1);
    }
    assert!(blocks[10].is_none() && blocks[11].is_none());
    assert_block(ok(store.read_block(VOL, 100).await).as_ref(), 100, 7);
    assert!(ok(store.read_block(VOL, 101).await).is_none());
    let meta = ok(store.block_meta(VOL, 100));
    assert_eq!(meta.map(|m| m.version), Some(7));
    assert_eq!(ok(store.block_meta(VOL, 99)), None);
    assert_eq!(ok(store.allocated_blocks(VOL)), 11);
    assert!(ok(store.read_blocks(VOL, 5..5).await).is_empty());
}

#[tokio::test]
async fn overwrite_keeps_newer_and_skips_stale() {
    let dir = tempdir();
    let store = open(dir.path());
    ok(store.create_volume(VOL));
    ok(store.write_blocks(VOL, vec![write(3, 5)]).await);
    // Older and equal versions are skipped.
    ok(store.write_blocks(VOL, vec![write(3, 4)]).await);
    ok(store.write_blocks(VOL, vec![write(3, 5)]).await);
    assert_block(ok(store.read_block(VOL, 3).await).as_ref(), 3, 5);
    // Newer wins; a batch mixing stale and fresh applies only the fresh part.
    ok(store
        .write_blocks(VOL, vec![write(3, 9), write(4, 1)])
        .await);
    ok(store
        .write_blocks(VOL, vec![write(3, 8), write(4, 2)])
        .await);
    assert_block(ok(store.read_block(VOL, 3).await).as_ref(), 3, 9);
    assert_block(ok(store.read_block(VOL, 4).await).as_ref(), 4, 2);
    // Duplicates in one batch: the highest version is applied.
    ok(store
        .write_blocks(VOL, vec![write(6, 3), write(6, 11), write(6, 10)])
        .await);
    assert_block(ok(store.read_block(VOL, 6).await).as_ref(), 6, 11);
    assert_eq!(ok(store.allocated_blocks(VOL)), 3);
}

#[tokio::test]
async fn bad_crc_writes_nothing() {
    let dir = tempdir();
    let store = open(dir.path());
    ok(store.create_volume(VOL));
    let mut bad = write(1, 1);
    bad.meta.crc ^= 1;
    let result = store.write_blocks(VOL, vec![write(0, 1), bad]).await;
    assert!(matches!(result, Err(StoreError::Failed(_))), "{result:?}");
    assert_eq!(ok(store.block_meta(VOL, 0)), None);
    assert_eq!(ok(store.allocated_blocks(VOL)), 0);
    let size = std::fs::metadata(store.data_file_path(VOL)).map(|m| m.len());
    assert_eq!(size.ok(), Some(0));
}

#[tokio::test]
async fn discard_extents_and_allocated_count() {
    let dir = tempdir();
    let store = open(dir.path());
    ok(store.create_volume(VOL));
    ok(store
        .write_blocks(VOL, (0..8).map(|b| write(b, 1)).collect())
        .await);
    ok(store
        .write_blocks(VOL, (20..24).map(|b| write(b, 1)).collect())
        .await);
    assert_eq!(ok(store.allocated_blocks(VOL)), 12);

    ok(store.discard_blocks(VOL, 2..5).await);
    ok(store.discard_blocks(VOL, 30..40).await); // nothing there
    assert_eq!(ok(store.allocated_blocks(VOL)), 9);
    for b in 2..5 {
        assert!(ok(store.read_block(VOL, b).await).is_none());
    }
    assert_block(ok(store.read_block(VOL, 5).await).as_ref(), 5, 1);

    let extents = ok(store.extents(VOL, 0..30));
    let run = |start, count, allocated| Extent {
        start,
        count,
        allocated,
    };
    assert_eq!(
        extents,
        vec![
            run(0, 2, true),
            run(2, 3, false),
            run(5, 3, true),
            run(8, 12, false),
            run(20, 4, true),
            run(24, 6, false),
        ]
    );
    assert_eq!(ok(store.extents(VOL, 21..23)), vec![run(21, 2, true)]);
    assert_eq!(ok(store.extents(VOL, 9..12)), vec![run(9, 3, false)]);
    assert!(ok(store.extents(VOL, 4..4)).is_empty());

    // After a discard a block can be written again at any version.
    ok(store.write_blocks(VOL, vec![write(3, 1)]).await);
    assert_block(ok(store.read_block(VOL, 3).await).as_ref(), 3, 1);
    assert_eq!(ok(store.allocated_blocks(VOL)), 10);
}

#[tokio::test]
async fn large_discard_spans_batches() {
    let dir = tempdir();
    let store = open(dir.path());
    ok(store.create_volume(VOL));
    for chunk in 0..5u64 {
        let writes = (chunk * 8000..(chunk + 1) * 8000)
            .map(|b| write(b, 1))
            .collect();
        ok(store.write_blocks(VOL, writes).await);
    }
    assert_eq!(ok(store.allocated_blocks(VOL)), 40_000);
    ok(store.discard_blocks(VOL, 10..u64::MAX).await);
    assert_eq!(ok(store.allocated_blocks(VOL)), 10);
    assert_eq!(
        ok(store.extents(VOL, 0..40_000)),
        vec![
            Extent {
                start: 0,
                count: 10,
                allocated: true
            },
            Extent {
                start: 10,
                count: 39_990,
                allocated: false
            }
        ]
    );
    ok(store.sync().await);
    // Everything past the first 10 slots was at the end of the file: truncated.
    let size = std::fs::metadata(store.data_file_path(VOL)).map(|m| m.len());
    assert_eq!(size.ok(), Some(10 * 4096));
}

#[tokio::test]
async fn freed_space_is_given_back_after_sync() {
    let dir = tempdir();
    let store = open(dir.path());
    ok(store.create_volume(VOL));
    let path = store.data_file_path(VOL);
    ok(store
        .write_blocks(VOL, (0..256).map(|b| write(b, 1)).collect())
        .await);
    ok(store.sync().await);
    let before = allocated_bytes(&path);
    assert!(before >= 256 * 4096, "{before}");

    // A hole in the middle is punched, the tail is truncated; neither before a sync.
    ok(store.discard_blocks(VOL, 64..192).await);
    ok(store.discard_blocks(VOL, 224..256).await);
    assert_eq!(allocated_bytes(&path), before);
    ok(store.sync().await);
    let size = std::fs::metadata(&path).map(|m| m.len());
    assert_eq!(size.ok(), Some(224 * 4096));
    let after = allocated_bytes(&path);
    assert!(after <= 96 * 4096 + 64 * 1024, "du after punch: {after}");

    for b in (0..64).chain(192..224) {
        assert_block(ok(store.read_block(VOL, b).await).as_ref(), b, 1);
    }
}

#[tokio::test]
async fn corrupted_data_is_detected() {
    let dir = tempdir();
    let store = open(dir.path());
    ok(store.create_volume(VOL));
    ok(store
        .write_blocks(VOL, vec![write(0, 1), write(1, 1), write(2, 1)])
        .await);
    ok(store.sync().await);
    // Blocks 0..3 went to slots 0..3 in one run; flip a byte of block 1's slot.
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(store.data_file_path(VOL))
        .unwrap_or_else(|e| panic!("open data file: {e}"));
    let offset = 4096 + 1234;
    let mut byte = [0u8; 1];
    use std::io::Read;
    file.seek(SeekFrom::Start(offset))
        .unwrap_or_else(|e| panic!("{e}"));
    file.read_exact(&mut byte).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(byte[0], payload(1, 1).0[1234], "block 1 is in slot 1");
    byte[0] ^= 0x40;
    file.seek(SeekFrom::Start(offset))
        .unwrap_or_else(|e| panic!("{e}"));
    file.write_all(&byte).unwrap_or_else(|e| panic!("{e}"));
    file.sync_all().unwrap_or_else(|e| panic!("{e}"));

    let single = store.read_block(VOL, 1).await;
    assert!(
        matches!(
            single,
            Err(StoreError::Corrupt {
                volume: VOL,
                block: 1
            })
        ),
        "{single:?}"
    );
    let range = store.read_blocks(VOL, 0..3).await;
    assert!(
        matches!(
            range,
            Err(StoreError::Corrupt {
                volume: VOL,
                block: 1
            })
        ),
        "{:?}",
        range.map(|r| r.len())
    );
    assert_block(ok(store.read_block(VOL, 0).await).as_ref(), 0, 1);
    assert_block(ok(store.read_block(VOL, 2).await).as_ref(), 2, 1);
    // Writing a newer version repairs the block.
    ok(store.write_blocks(VOL, vec![write(1, 2)]).await);
    assert_block(ok(store.read_block(VOL, 1).await).as_ref(), 1, 2);
}

#[tokio::test]
async fn truncated_data_file_reads_as_corrupt() {
    let dir = tempdir();
    let store = open(dir.path());
    ok(store.create_volume(VOL));
    ok(store
        .write_blocks(VOL, vec![write(0, 1), write(1, 1)])
        .await);
    ok(store.sync().await);
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(store.data_file_path(VOL))
        .unwrap_or_else(|e| panic!("{e}"));
    file.set_len(4096).unwrap_or_else(|e| panic!("{e}"));
    assert_block(ok(store.read_block(VOL, 0).await).as_ref(), 0, 1);
    let lost = store.read_block(VOL, 1).await;
    assert!(
        matches!(lost, Err(StoreError::Corrupt { block: 1, .. })),
        "{lost:?}"
    );
}

#[tokio::test]
async fn reopen_keeps_data_and_rebuilds_free_slots() {
    let dir = tempdir();
    {
        let store = open(dir.path());
        ok(store.create_volume(VOL));
        ok(store.create_volume(7));
        ok(store
            .write_blocks(VOL, (0..64).map(|b| write(b, 1)).collect())
            .await);
        // Overwrites and a discard leave holes in the file.
        ok(store
            .write_blocks(VOL, (0..64).step_by(2).map(|b| write(b, 2)).collect())
            .await);
        ok(store.discard_blocks(VOL, 10..20).await);
        ok(store.write_blocks(7, vec![write(5, 1)]).await);
        ok(store.sync().await);
        ok(store.write_blocks(VOL, vec![write(1, 3)]).await);
        ok(store.sync().await);
    }
    let expected = |b: u64| -> Option<u64> {
        match b {
            10..20 => None,
            1 => Some(3),
            b if b % 2 == 0 => Some(2),
            _ => Some(1),
        }
    };
    let check = |blocks: &[Option<(BlockMeta, Box<trireme_replica::Block>)>]| {
        for (b, found) in (0u64..).zip(blocks) {
            match expected(b) {
                None => assert!(found.is_none(), "block {b} should be unallocated"),
                Some(v) => assert_block(found.as_ref(), b, v),
            }
        }
    };
    let store = open(dir.path());
    assert_eq!(store.volumes(), vec![7, VOL]);
    assert_eq!(ok(store.allocated_blocks(VOL)), 54);
    assert_eq!(ok(store.allocated_blocks(7)), 1);
    check(&ok(store.read_blocks(VOL, 0..64).await));
    // New writes after reopen must go to free slots, never over live data.
    ok(store
        .write_blocks(VOL, (100..300).map(|b| write(b, 1)).collect())
        .await);
    ok(store
        .write_blocks(VOL, (64..70).map(|b| write(b, 1)).collect())
        .await);
    check(&ok(store.read_blocks(VOL, 0..64).await));
    for b in (100..300).chain(64..70) {
        assert_block(ok(store.read_block(VOL, b).await).as_ref(), b, 1);
    }
    assert_block(ok(store.read_block(7, 5).await).as_ref(), 5, 1);
}

#[tokio::test]
async fn delete_volume_removes_file_and_index() {
    let dir = tempdir();
    let store = open(dir.path());
    ok(store.create_volume(VOL));
    ok(store.create_volume(VOL + 1));
    ok(store
        .write_blocks(VOL, (0..16).map(|b| write(b, 1)).collect())
        .await);
    ok(store.write_blocks(VOL + 1, vec![write(0, 1)]).await);
    let path = store.data_file_path(VOL);
    assert!(path.exists());
    ok(store.delete_volume(VOL));
    assert!(!path.exists());
    assert_eq!(store.volumes(), vec![VOL + 1]);
    assert!(matches!(
        store.read_block(VOL, 0).await,
        Err(StoreError::NoSuchVolume(VOL))
    ));
    assert!(matches!(
        store.allocated_blocks(VOL),
        Err(StoreError::NoSuchVolume(VOL))
    ));
    assert!(matches!(
        store.delete_volume(VOL),
        Err(StoreError::NoSuchVolume(VOL))
    ));
    assert!(matches!(
        store.write_blocks(VOL, vec![write(0, 2)]).await,
        Err(StoreError::NoSuchVolume(VOL))
    ));
    // A new volume with the same id starts empty; the neighbour is untouched.
    ok(store.create_volume(VOL));
    assert_eq!(ok(store.allocated_blocks(VOL)), 0);
    assert!(ok(store.read_block(VOL, 0).await).is_none());
    assert_eq!(ok(store.extents(VOL, 0..16)).len(), 1);
    assert_block(ok(store.read_block(VOL + 1, 0).await).as_ref(), 0, 1);
    assert!(matches!(
        store.create_volume(VOL),
        Err(StoreError::VolumeExists(VOL))
    ));
    drop(store);
    let store = open(dir.path());
    assert_eq!(ok(store.allocated_blocks(VOL)), 0);
    assert_eq!(ok(store.allocated_blocks(VOL + 1)), 1);
}

#[tokio::test]
async fn index_entries_without_data_file_are_removed_at_open() {
    let dir = tempdir();
    {
        let store = open(dir.path());
        ok(store.create_volume(VOL));
        ok(store
            .write_blocks(VOL, (0..4).map(|b| write(b, 1)).collect())
            .await);
        ok(store.sync().await);
        // As if delete_volume crashed right after removing the file.
        std::fs::remove_file(store.data_file_path(VOL)).unwrap_or_else(|e| panic!("{e}"));
    }
    let store = open(dir.path());
    assert!(store.volumes().is_empty());
    ok(store.create_volume(VOL));
    assert_eq!(ok(store.allocated_blocks(VOL)), 0);
    assert!(ok(store.read_block(VOL, 0).await).is_none());
}

#[tokio::test]
async fn requests_outside_limits_are_refused() {
    let dir = tempdir();
    let store = open(dir.path());
    assert!(matches!(
        store.read_block(1, 0).await,
        Err(StoreError::NoSuchVolume(1))
    ));
    assert!(matches!(
        store.extents(1, 0..1),
        Err(StoreError::NoSuchVolume(1))
    ));
    ok(store.create_volume(1));
    let too_many = u64::try_from(MAX_BLOCKS_PER_IO).unwrap_or(0) + 1;
    assert!(matches!(
        store.read_blocks(1, 0..too_many).await,
        Err(StoreError::Failed(_))
    ));
    let writes: Vec<BlockWrite> = (0..too_many).map(|b| write(b, 1)).collect();
    assert!(matches!(
        store.write_blocks(1, writes).await,
        Err(StoreError::Failed(_))
    ));
    // The last block index of the address space works.
    ok(store.write_blocks(1, vec![write(u64::MAX, 1)]).await);
    assert_block(
        ok(store.read_block(1, u64::MAX).await).as_ref(),
        u64::MAX,
        1,
    );
    assert_eq!(
        ok(store.read_blocks(1, u64::MAX - 1..u64::MAX).await).len(),
        1
    );
    assert_eq!(BLOCK_SIZE, 4096);
}

#[tokio::test]
async fn meta_records() {
    let dir = tempdir();
    {
        let store = open(dir.path());
        ok(store.put_meta("tenant/a", b"one", false));
        ok(store.put_meta("tenant/b", b"two", true));
        ok(store.put_meta("tenantx", b"other", false));
        ok(store.put_meta("volume/1", b"v", false));
        assert_eq!(ok(store.get_meta("tenant/a")), Some(b"one".to_vec()));
        assert_eq!(ok(store.get_meta("tenant/c")), None);
        let scanned = ok(store.scan_meta("tenant/"));
        assert_eq!(
            scanned,
            vec![
                ("tenant/a".to_owned(), b"one".to_vec()),
                ("tenant/b".to_owned(), b"two".to_vec())
            ]
        );
        ok(store.delete_meta("tenant/a", true));
        ok(store.delete_meta("absent", false));
        assert_eq!(ok(store.get_meta("tenant/a")), None);
        assert_eq!(ok(store.scan_meta("")).len(), 3);
    }
    let store = open(dir.path());
    assert_eq!(ok(store.get_meta("tenant/b")), Some(b"two".to_vec()));
    assert_eq!(ok(store.get_meta("tenant/a")), None);
    assert_eq!(ok(store.scan_meta("volume/")).len(), 1);
}

/// A fresh volume's data file is preallocated ahead of its writes (so direct writes
/// never extend the file), in steps that grow with it, and cut back to the slots in
/// use when the store is opened again.
#[tokio::test]
async fn data_files_grow_ahead_of_writes_and_are_cut_back_at_open() {
    let dir = tempdir();
    let path;
    {
        let store = open(dir.path());
        ok(store.create_volume(VOL));
        path = store.data_file_path(VOL);
        ok(store.write_blocks(VOL, vec![write(0, 1)]).await);
        let size = || std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        // The first write makes room for 1 MiB (256 slots).
        assert_eq!(size(), 256 * 4096);
        ok(store
            .write_blocks(VOL, (1..256).map(|b| write(b, 1)).collect())
            .await);
        assert_eq!(size(), 256 * 4096, "256 slots fit in the first step");
        ok(store.write_blocks(VOL, vec![write(256, 1)]).await);
        assert_eq!(size(), 512 * 4096, "then it grows by at least 1 MiB");
        // Large batches grow it by a quarter of its size, or what they need.
        for round in 0..8u64 {
            let first = 257 + round * 1024;
            ok(store
                .write_blocks(VOL, (first..first + 1024).map(|b| write(b, 1)).collect())
                .await);
        }
        let slots = 257 + 8 * 1024;
        assert!(size() >= slots * 4096);
        assert!(
            size() <= slots * 4096 * 5 / 4 + 256 * 4096,
            "size {}",
            size()
        );
        ok(store.sync().await);
        let blocks = ok(store.read_blocks(VOL, 0..1024).await);
        for (b, found) in (0u64..).zip(&blocks) {
            assert_block(found.as_ref(), b, 1);
        }
    }
    let store = open(dir.path());
    let slots = 257 + 8 * 1024;
    assert_eq!(
        std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0),
        slots * 4096
    );
    let blocks = ok(store.read_blocks(VOL, slots - 1024..slots).await);
    for (b, found) in (slots - 1024..).zip(&blocks) {
        assert_block(found.as_ref(), b, 1);
    }
}
