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

// Power cuts between syncs: the index entry of a write survives, its data does not.
// The lost data write is simulated by zeroing the slot in the data file after the store
// is dropped (its index entry is in the WAL, written to the OS but never synced).

fn open_dir(dir: &Path) -> Store {
    Store::open(dir, StoreOptions::default()).unwrap_or_else(|e| panic!("open: {e}"))
}

/// Zeroes a slot of a closed store's data file: the data write to it never landed.
fn lose_slot(path: &Path, slot: u64) {
    use std::os::unix::fs::FileExt;
    let file = fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open data file: {e}"));
    let offset = slot * BLOCK_BYTES;
    file.write_all_at(&[0u8; BLOCK_SIZE_USIZE], offset)
        .unwrap_or_else(|e| panic!("zero slot {slot}: {e}"));
    file.sync_all().unwrap_or_else(|e| panic!("sync: {e}"));
}

const BLOCK_SIZE_USIZE: usize = crate::block::BLOCK_SIZE;

/// Asserts that a block reads as the one `block_write(block, version, fill)` wrote.
async fn assert_reads(store: &Store, vol: VolumeId, block: u64, version: u64, fill: u8) {
    let found = store.read_block(vol, block).await;
    let expected = block_write(block, version, fill);
    match found {
        Ok(Some((meta, data))) => {
            assert_eq!(meta, expected.meta, "block {block}: meta");
            assert!(
                data.0.iter().all(|&b| b == fill),
                "block {block}: data of version {version}"
            );
        }
        other => panic!("block {block}: expected version {version}, got {other:?}"),
    }
}

async fn assert_absent(store: &Store, vol: VolumeId, block: u64) {
    let found = store.read_block(vol, block).await;
    assert!(
        matches!(found, Ok(None)),
        "block {block}: expected unallocated, got {found:?}"
    );
}

fn slot(store: &Store, vol: VolumeId, block: u64) -> u64 {
    store
        .slot_of(vol, block)
        .unwrap_or_else(|| panic!("block {block} has no index entry"))
}

#[tokio::test]
async fn lost_unsynced_overwrite_reads_the_synced_version() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let (path, lost) = {
        let store = open_dir(dir.path());
        ok(store.create_volume(1));
        ok(store.write_blocks(1, vec![block_write(0, 1, 0x11)]).await);
        ok(store.sync().await);
        ok(store.write_blocks(1, vec![block_write(0, 2, 0x22)]).await);
        (store.data_file_path(1), slot(&store, 1, 0))
    };
    lose_slot(&path, lost);
    {
        let store = open_dir(dir.path());
        assert_reads(&store, 1, 0, 1, 0x11).await;
        assert_eq!(ok(store.allocated_blocks(1)), 1);
        // The restored version's slot is in use.
        assert!(!store.slot_is_free(1, slot(&store, 1, 0)));
    }
    // The repair is durable: a second open finds nothing to repair.
    let store = open_dir(dir.path());
    assert_reads(&store, 1, 0, 1, 0x11).await;
    let (current, synced) = store.generations();
    assert_eq!(current, synced + 1);
    assert!(
        store
            .index_entry(1, 0)
            .is_some_and(|e| e.generation <= synced)
    );
}

#[tokio::test]
async fn lost_first_write_reads_as_unallocated() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let (path, lost) = {
        let store = open_dir(dir.path());
        ok(store.create_volume(1));
        ok(store.write_blocks(1, vec![block_write(0, 1, 0x10)]).await);
        ok(store.sync().await);
        ok(store.write_blocks(1, vec![block_write(5, 1, 0x15)]).await);
        (store.data_file_path(1), slot(&store, 1, 5))
    };
    lose_slot(&path, lost);
    let store = open_dir(dir.path());
    assert_absent(&store, 1, 5).await;
    assert_reads(&store, 1, 0, 1, 0x10).await;
    assert_eq!(ok(store.allocated_blocks(1)), 1);
    assert_eq!(store.raw_index(1, 5), None);
    // The slot is free again (or cut off the end of the file).
    assert!(store.slot_is_free(1, lost) || ok(store.volume(1)).slots.lock().len() <= lost);
}

#[tokio::test]
async fn lost_write_of_a_never_synced_store_reads_as_unallocated() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let (path, lost) = {
        let store = open_dir(dir.path());
        ok(store.create_volume(1));
        ok(store
            .write_blocks(1, vec![block_write(0, 1, 0x10), block_write(1, 1, 0x11)])
            .await);
        ok(store.write_blocks(1, vec![block_write(1, 2, 0x12)]).await);
        (store.data_file_path(1), slot(&store, 1, 1))
    };
    lose_slot(&path, lost);
    let store = open_dir(dir.path());
    // Block 0's data landed: kept. Block 1's last version was lost and no version of it
    // was ever synced.
    assert_reads(&store, 1, 0, 1, 0x10).await;
    assert_absent(&store, 1, 1).await;
    assert_eq!(ok(store.allocated_blocks(1)), 1);
}

#[tokio::test]
async fn lost_overwrites_roll_back_to_the_synced_version() {
    for lose in [true, false] {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        let (path, v3_slot) = {
            let store = open_dir(dir.path());
            ok(store.create_volume(1));
            ok(store.write_blocks(1, vec![block_write(0, 1, 0x01)]).await);
            ok(store.sync().await);
            ok(store.write_blocks(1, vec![block_write(0, 2, 0x02)]).await);
            ok(store.write_blocks(1, vec![block_write(0, 3, 0x03)]).await);
            (store.data_file_path(1), slot(&store, 1, 0))
        };
        if lose {
            lose_slot(&path, v3_slot);
        }
        let store = open_dir(dir.path());
        if lose {
            assert_reads(&store, 1, 0, 1, 0x01).await;
        } else {
            assert_reads(&store, 1, 0, 3, 0x03).await;
            assert_eq!(store.slot_of(1, 0), Some(v3_slot));
        }
        assert_eq!(ok(store.allocated_blocks(1)), 1);
    }
}

/// Overwrites while a sync is in flight keep both candidates: the version the sync
/// makes durable if it completes, and the one durable before it.
#[tokio::test]
async fn lost_overwrite_during_a_sync_rolls_back_to_what_that_sync_left() {
    for completed in [false, true] {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        let (path, v2_slot, v3_slot) = {
            let store = open_dir(dir.path());
            ok(store.create_volume(1));
            ok(store.write_blocks(1, vec![block_write(0, 1, 0x01)]).await);
            ok(store.sync().await);
            ok(store.write_blocks(1, vec![block_write(0, 2, 0x02)]).await);
            let v2_slot = slot(&store, 1, 0);
            // A sync starts: it closes v2's generation...
            let closing = store.close_generation();
            // ...v3 is written while it runs...
            ok(store.write_blocks(1, vec![block_write(0, 3, 0x03)]).await);
            let entry = store.index_entry(1, 0);
            assert!(entry.is_some_and(|e| e.prev.iter().flatten().count() == 2));
            // ...and it completes (its data files were synced: the test does not cut
            // the power on v2's data), or the power is cut before it does.
            if completed {
                store.record_synced(closing);
            }
            (store.data_file_path(1), v2_slot, slot(&store, 1, 0))
        };
        lose_slot(&path, v3_slot);
        if !completed {
            // v2 was not synced either: its data may be lost too.
            lose_slot(&path, v2_slot);
        }
        let store = open_dir(dir.path());
        if completed {
            assert_reads(&store, 1, 0, 2, 0x02).await;
        } else {
            assert_reads(&store, 1, 0, 1, 0x01).await;
        }
    }
}

#[tokio::test]
async fn lost_discard_brings_back_a_whole_version() {
    for lose_data in [true, false] {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        let (path, v2_slot) = {
            let store = open_dir(dir.path());
            ok(store.create_volume(1));
            ok(store.write_blocks(1, vec![block_write(0, 1, 0x01)]).await);
            ok(store.sync().await);
            ok(store.write_blocks(1, vec![block_write(0, 2, 0x02)]).await);
            let raw = store
                .raw_index(1, 0)
                .unwrap_or_else(|| panic!("no entry for block 0"));
            let v2_slot = slot(&store, 1, 0);
            ok(store.discard_blocks(1, 0..1).await);
            assert_absent(&store, 1, 0).await;
            // The power cut loses the discard's delete but keeps the entry.
            store.put_raw_index(1, 0, &raw);
            (store.data_file_path(1), v2_slot)
        };
        if lose_data {
            lose_slot(&path, v2_slot);
        }
        let store = open_dir(dir.path());
        if lose_data {
            assert_reads(&store, 1, 0, 1, 0x01).await;
        } else {
            assert_reads(&store, 1, 0, 2, 0x02).await;
        }
    }
}

/// Expected content of a block in `recovery_keeps_referenced_slots_out_of_use`.
fn expected_after_recovery(block: u64) -> Option<(u64, u8)> {
    let fill = |version: u64| u8::try_from((block * 7 + version * 31) % 251).unwrap_or(0);
    match block {
        // Overwritten after the sync; the even ones lost their data.
        0..32 if block.is_multiple_of(2) => Some((1, fill(1))),
        0..32 => Some((2, fill(2))),
        32..64 => Some((1, fill(1))),
        // First written after the sync; the even ones lost their data.
        64..74 if block.is_multiple_of(2) => None,
        64..74 => Some((1, fill(1))),
        _ => None,
    }
}

#[tokio::test]
async fn recovery_keeps_referenced_slots_out_of_use() {
    let fill =
        |block: u64, version: u64| u8::try_from((block * 7 + version * 31) % 251).unwrap_or(0);
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let (path, lost) = {
        let store = open_dir(dir.path());
        ok(store.create_volume(1));
        ok(store
            .write_blocks(1, (0..64).map(|b| block_write(b, 1, fill(b, 1))).collect())
            .await);
        ok(store.sync().await);
        // Overwrites one by one (slots scattered) and new blocks, none synced.
        for b in 0..32 {
            ok(store
                .write_blocks(1, vec![block_write(b, 2, fill(b, 2))])
                .await);
        }
        ok(store
            .write_blocks(1, (64..74).map(|b| block_write(b, 1, fill(b, 1))).collect())
            .await);
        let lost: Vec<u64> = (0..32)
            .chain(64..74)
            .filter(|b: &u64| b.is_multiple_of(2))
            .map(|b| slot(&store, 1, b))
            .collect();
        (store.data_file_path(1), lost)
    };
    for &s in &lost {
        lose_slot(&path, s);
    }
    let store = open_dir(dir.path());
    let check = |blocks: Vec<Option<(BlockMeta, Box<Block>)>>, upto: u64| {
        for (b, found) in (0u64..upto).zip(blocks) {
            match (expected_after_recovery(b), found) {
                (None, None) => {}
                (Some((version, fill)), Some((meta, data))) => {
                    assert_eq!(meta, block_write(b, version, fill).meta, "block {b}");
                    assert!(data.0.iter().all(|&x| x == fill), "block {b} data");
                }
                (want, got) => panic!("block {b}: expected {want:?}, got {:?}", got.map(|g| g.0)),
            }
        }
    };
    check(ok(store.read_blocks(1, 0..80).await), 80);
    // Every slot referenced now is in use.
    for b in 0..80 {
        if let Some(s) = store.slot_of(1, b) {
            assert!(!store.slot_is_free(1, s), "block {b}'s slot {s} is free");
        }
    }
    // Writes after the recovery, syncs, more overwrites: nothing referenced is reused.
    ok(store
        .write_blocks(
            1,
            (100..300).map(|b| block_write(b, 1, fill(b, 1))).collect(),
        )
        .await);
    ok(store.sync().await);
    for b in (300..340).step_by(3) {
        ok(store
            .write_blocks(1, vec![block_write(b, 1, fill(b, 1))])
            .await);
    }
    ok(store.sync().await);
    check(ok(store.read_blocks(1, 0..80).await), 80);
    for b in (100..300).chain((300..340).step_by(3)) {
        assert_reads(&store, 1, b, 1, fill(b, 1)).await;
    }
    drop(store);
    let store = open_dir(dir.path());
    check(ok(store.read_blocks(1, 0..80).await), 80);
    for b in (100..300).chain((300..340).step_by(3)) {
        assert_reads(&store, 1, b, 1, fill(b, 1)).await;
    }
    let mut slots: Vec<u64> = (0..400).filter_map(|b| store.slot_of(1, b)).collect();
    let count = slots.len();
    slots.sort_unstable();
    slots.dedup();
    assert_eq!(slots.len(), count, "two blocks share a slot");
}

#[test]
fn reserved_meta_keys_are_refused() {
    let (_dir, store) = open_temp();
    assert!(
        store
            .put_meta("replica/synced-generation", b"x", true)
            .is_err()
    );
    assert!(
        store
            .delete_meta("replica/synced-generation", true)
            .is_err()
    );
    ok(store.put_meta("volume/1", b"x", false));
    // The store's own record is not listed.
    assert_eq!(ok(store.scan_meta("")).len(), 1);
    assert!(ok(store.get_meta("replica/synced-generation")).is_some());
}

// Snapshots and the power-loss repair at open.

/// Live blocks plus history versions with data: what the data file must hold.
fn referenced(store: &Store, vol: VolumeId) -> u64 {
    let history = store
        .history_entries(vol)
        .iter()
        .filter(|(_, e)| !e.version.is_tombstone())
        .count();
    ok(store.allocated_blocks(vol)) + u64::try_from(history).unwrap_or(0)
}

#[tokio::test]
async fn lost_overwrite_after_a_snapshot_drops_its_history_copy() {
    for lose in [true, false] {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        let (path, v1_slot, v2_slot, snap) = {
            let store = open_dir(dir.path());
            ok(store.create_volume(1));
            ok(store
                .write_blocks(1, vec![block_write(0, 1, 0x01), block_write(1, 1, 0x11)])
                .await);
            let v1_slot = slot(&store, 1, 0);
            let snap = ok(store.create_snapshot(1).await);
            // The overwrite moves version 1 to the history; it is never synced.
            ok(store.write_blocks(1, vec![block_write(0, 2, 0x02)]).await);
            assert_eq!(store.history_entries(1).len(), 1);
            (store.data_file_path(1), v1_slot, slot(&store, 1, 0), snap)
        };
        if lose {
            lose_slot(&path, v2_slot);
        }
        let store = open_dir(dir.path());
        let at_snap = ok(store.read_blocks_at(1, Some(snap), 0..1).await);
        assert!(at_snap[0].as_ref().is_some_and(|b| b.meta.version == 1));
        if lose {
            assert_reads(&store, 1, 0, 1, 0x01).await;
            // Version 1 is live again: its history copy went, its slot is used once.
            assert!(store.history_entries(1).is_empty());
            assert_eq!(slot(&store, 1, 0), v1_slot);
        } else {
            assert_reads(&store, 1, 0, 2, 0x02).await;
            assert_eq!(store.history_entries(1).len(), 1);
        }
        assert!(!store.slot_is_free(1, v1_slot));
        assert_eq!(store.used_slots(1), referenced(&store, 1));
        // Deleting the snapshot frees only what nothing reads.
        ok(store.delete_snapshot(1, snap).await);
        ok(store.sync().await);
        assert!(store.history_entries(1).is_empty());
        assert_eq!(store.used_slots(1), 2);
        if lose {
            assert!(!store.slot_is_free(1, v1_slot));
            assert_reads(&store, 1, 0, 1, 0x01).await;
        } else {
            assert_reads(&store, 1, 0, 2, 0x02).await;
        }
        assert_reads(&store, 1, 1, 1, 0x11).await;
    }
}

#[tokio::test]
async fn snapshot_creation_cut_short_leaves_no_history() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    {
        let store = open_dir(dir.path());
        ok(store.create_volume(1));
        ok(store
            .write_blocks(1, (0..4).map(|b| block_write(b, 1, 0x01)).collect())
            .await);
        ok(store.sync().await);
        let _ = store.begin_unrecorded_snapshot(1);
        ok(store
            .write_blocks(1, (0..4).map(|b| block_write(b, 2, 0x02)).collect())
            .await);
        ok(store.discard_blocks(1, 3..4).await);
        assert_eq!(store.history_entries(1).len(), 4);
        ok(store.sync().await);
    }
    let store = open_dir(dir.path());
    assert!(ok(store.snapshots(1)).is_empty());
    assert!(store.history_entries(1).is_empty());
    assert_eq!(store.used_slots(1), 3);
    for b in 0..3 {
        assert_reads(&store, 1, b, 2, 0x02).await;
    }
    assert_absent(&store, 1, 3).await;
    // The live generation never goes back: a new snapshot gets a fresh id.
    let snap = ok(store.create_snapshot(1).await);
    assert!(snap >= 2);
}

#[tokio::test]
async fn snapshot_deletion_cut_short_is_finished_at_open() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let (kept, gone) = {
        let store = open_dir(dir.path());
        ok(store.create_volume(1));
        ok(store
            .write_blocks(1, (0..8).map(|b| block_write(b, 1, 0x01)).collect())
            .await);
        let gone = ok(store.create_snapshot(1).await);
        ok(store
            .write_blocks(1, (0..4).map(|b| block_write(b, 2, 0x02)).collect())
            .await);
        let kept = ok(store.create_snapshot(1).await);
        ok(store
            .write_blocks(1, (0..8).map(|b| block_write(b, 3, 0x03)).collect())
            .await);
        ok(store.sync().await);
        assert_eq!(store.history_entries(1).len(), 12);
        assert_eq!(store.used_slots(1), 20);
        // The record goes, the history deletion never happens.
        store.delete_snapshot_record(1, gone);
        (kept, gone)
    };
    let store = open_dir(dir.path());
    let ids: Vec<SnapId> = ok(store.snapshots(1)).iter().map(|s| s.id).collect();
    assert_eq!(ids, vec![kept]);
    assert!(gone < kept);
    // Versions 2 of 0..4 and 1 of 4..8 stay for `kept`; versions 1 of 0..4 went.
    assert_eq!(store.history_entries(1).len(), 8);
    assert_eq!(store.used_slots(1), 16);
    assert_eq!(store.used_slots(1), referenced(&store, 1));
    let at = ok(store.read_blocks_at(1, Some(kept), 0..8).await);
    for (b, found) in (0u64..).zip(at) {
        let want = if b < 4 { 2 } else { 1 };
        assert!(found.is_some_and(|f| f.meta.version == want), "block {b}");
    }
}
