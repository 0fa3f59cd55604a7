//! Unit tests of the store that look at its slots and index directly.

use super::*;

#[test]
fn data_file_names_round_trip() {
    assert_eq!(data_file_name(0xab), "00000000000000ab.dat");
    assert_eq!(parse_data_file_name("00000000000000ab.dat"), Some(0xab));
    assert_eq!(parse_data_file_name("ffffffffffffffff.dat"), Some(u64::MAX));
    assert_eq!(parse_data_file_name("ab.dat"), None);
    assert_eq!(parse_data_file_name("00000000000000ab.tmp"), None);
    assert_eq!(parse_data_file_name("+000000000000000.dat"), None);
}

#[test]
fn newest_per_block_keeps_highest_version() {
    let write = |block, version| BlockWrite {
        block,
        meta: BlockMeta {
            version,
            crc: 0,
            tag: [u8::try_from(version).unwrap_or(0); 16],
        },
        data: Block::zeroed(),
    };
    let kept = newest_per_block(vec![write(5, 1), write(2, 1), write(5, 3), write(5, 2)]);
    let kept: Vec<(u64, u64)> = kept.iter().map(|w| (w.block, w.meta.version)).collect();
    assert_eq!(kept, vec![(2, 1), (5, 3)]);
}

fn open_temp() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let store =
        Store::open(dir.path(), StoreOptions::default()).unwrap_or_else(|e| panic!("open: {e}"));
    (dir, store)
}

fn block_write(block: u64, version: u64, fill: u8) -> BlockWrite {
    let mut data = Block::zeroed();
    data.0.fill(fill);
    BlockWrite {
        block,
        meta: BlockMeta {
            version,
            crc: data.crc(),
            tag: [fill; 16],
        },
        data,
    }
}

fn ok<T>(result: Result<T, StoreError>) -> T {
    result.unwrap_or_else(|e| panic!("store error: {e:?}"))
}

#[tokio::test]
async fn freed_slot_is_reused_only_after_sync() {
    let (_dir, store) = open_temp();
    ok(store.create_volume(1));
    ok(store.write_blocks(1, vec![block_write(0, 1, 0xa0)]).await);
    ok(store.write_blocks(1, vec![block_write(1, 1, 0xa1)]).await);
    ok(store.sync().await);
    assert_eq!(store.slot_of(1, 0), Some(0));
    assert_eq!(store.slot_of(1, 1), Some(1));

    // Overwrite block 0: new slot 2, slot 0 freed but not reusable yet.
    ok(store.write_blocks(1, vec![block_write(0, 2, 0xb0)]).await);
    assert_eq!(store.slot_of(1, 0), Some(2));
    assert!(!store.slot_is_free(1, 0));
    // A new block must not land on slot 0 before the sync.
    ok(store.write_blocks(1, vec![block_write(5, 1, 0xc5)]).await);
    assert_eq!(store.slot_of(1, 5), Some(3));
    // A stale write is skipped; its slot (4) is free at once, as it was never used.
    ok(store.write_blocks(1, vec![block_write(0, 1, 0xdd)]).await);
    assert_eq!(store.slot_of(1, 0), Some(2));
    assert!(store.slot_is_free(1, 4));
    ok(store.sync().await);
    assert!(store.slot_is_free(1, 0));
    // After the sync the lowest free slot is reused.
    ok(store.write_blocks(1, vec![block_write(6, 1, 0xc6)]).await);
    assert_eq!(store.slot_of(1, 6), Some(0));
    for (block, fill) in [(0u64, 0xb0u8), (1, 0xa1), (5, 0xc5), (6, 0xc6)] {
        let found = ok(store.read_block(1, block).await);
        let Some((_, data)) = found else {
            panic!("block {block} missing");
        };
        assert!(data.0.iter().all(|&b| b == fill), "block {block}");
    }
}

#[tokio::test]
async fn slot_read_in_progress_is_not_reused() {
    let (_dir, store) = open_temp();
    ok(store.create_volume(1));
    ok(store.write_blocks(1, vec![block_write(0, 1, 1)]).await);
    let volume = ok(store.volume(1));
    // A read that looked up block 0 (slot 0) and is still running...
    let pin = ReadPin::new(&volume);
    ok(store.write_blocks(1, vec![block_write(0, 2, 2)]).await);
    ok(store.sync().await);
    // ...keeps slot 0 out of use, even after the sync.
    assert!(!store.slot_is_free(1, 0));
    ok(store.write_blocks(1, vec![block_write(1, 1, 3)]).await);
    assert_ne!(store.slot_of(1, 1), Some(0));
    drop(pin);
    // Reclaimed by the next sync.
    ok(store.sync().await);
    assert!(store.slot_is_free(1, 0));
}

#[tokio::test]
async fn malformed_index_entry_is_corrupt_not_a_panic() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    {
        let store = Store::open(dir.path(), StoreOptions::default())
            .unwrap_or_else(|e| panic!("open: {e}"));
        ok(store.create_volume(3));
        ok(store.write_blocks(3, vec![block_write(0, 1, 7)]).await);
        store.put_raw_index(3, 9, b"short");
        let read = store.read_block(3, 9).await;
        assert!(
            matches!(
                read,
                Err(StoreError::Corrupt {
                    volume: 3,
                    block: 9
                })
            ),
            "{read:?}"
        );
        let meta = store.block_meta(3, 9);
        assert!(
            matches!(
                meta,
                Err(StoreError::Corrupt {
                    volume: 3,
                    block: 9
                })
            ),
            "{meta:?}"
        );
        let range = store.read_blocks(3, 0..16).await;
        assert!(matches!(range, Err(StoreError::Corrupt { block: 9, .. })));
        ok(store.sync().await);
    }
    // Open survives it; a write of the block repairs it.
    let store =
        Store::open(dir.path(), StoreOptions::default()).unwrap_or_else(|e| panic!("open: {e}"));
    assert_eq!(ok(store.allocated_blocks(3)), 2);
    ok(store.write_blocks(3, vec![block_write(9, 1, 9)]).await);
    let found = ok(store.read_block(3, 9).await);
    assert!(found.is_some_and(|(meta, data)| meta.version == 1 && data.0[0] == 9));
    assert_eq!(ok(store.allocated_blocks(3)), 2);
    let first = ok(store.read_block(3, 0).await);
    assert!(first.is_some_and(|(_, data)| data.0.iter().all(|&b| b == 7)));
}

#[tokio::test]
async fn buffered_store_works_too() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let options = StoreOptions {
        direct_io: false,
        ring_entries: 8,
    };
    let store = Store::open(dir.path(), options).unwrap_or_else(|e| panic!("open: {e}"));
    ok(store.create_volume(2));
    assert!(!ok(store.volume(2)).file.is_direct());
    let writes = (0..100)
        .map(|b| block_write(b, 1, u8::try_from(b).unwrap_or(0)))
        .collect();
    ok(store.write_blocks(2, writes).await);
    ok(store.sync().await);
    let blocks = ok(store.read_blocks(2, 0..100).await);
    for (b, found) in blocks.iter().enumerate() {
        let Some((_, data)) = found else {
            panic!("block {b} missing");
        };
        assert!(data.0.iter().all(|&x| usize::from(x) == b));
    }
}

/// The store is shared behind an `Arc` and its futures are spawned on tokio.
#[test]
fn store_and_its_futures_are_send() {
    fn send_sync<T: Send + Sync>(_: &T) {}
    fn send<T: Send>(_: T) {}
    let (_dir, store) = open_temp();
    send_sync(&store);
    send(store.write_blocks(1, Vec::new()));
    send(store.read_block(1, 0));
    send(store.read_blocks(1, 0..1));
    send(store.discard_blocks(1, 0..1));
    send(store.sync());
}
