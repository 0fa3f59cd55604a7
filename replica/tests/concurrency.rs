//! Many tasks writing and reading the same and different blocks at once, with syncs
//! (which make freed slots reusable) in between: every read must return a whole block
//! of one version, and every block must end at the highest version written to it.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use common::{assert_block, consistent, open, tempdir, write};

const VOLUME: u64 = 42;
const BLOCKS: u64 = 96;
const WRITERS: u64 = 8;
const WRITES_PER_WRITER: u64 = 400;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writers_readers_and_syncs() {
    let dir = tempdir();
    let store = Arc::new(open(dir.path()));
    store
        .create_volume(VOLUME)
        .unwrap_or_else(|e| panic!("create: {e}"));
    let versions = Arc::new(AtomicU64::new(1));
    let highest = Arc::new(Highest::default());
    let done = Arc::new(AtomicBool::new(false));

    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let (store, versions, highest) = (
            Arc::clone(&store),
            Arc::clone(&versions),
            Arc::clone(&highest),
        );
        writers.push(tokio::spawn(async move {
            let mut x = w * 7 + 1;
            for i in 0..WRITES_PER_WRITER {
                x = (x * 1_103_515_245 + 12_345) % (1 << 31);
                // Half the writes go to a few hot blocks every writer hits.
                let first = if i % 2 == 0 { x % 4 } else { x % BLOCKS };
                let len = 1 + (x >> 8) % 4;
                let writes: Vec<_> = (first..(first + len).min(BLOCKS))
                    .map(|b| {
                        let v = versions.fetch_add(1, Ordering::Relaxed);
                        highest.record(b, v);
                        write(b, v)
                    })
                    .collect();
                store
                    .write_blocks(VOLUME, writes)
                    .await
                    .unwrap_or_else(|e| panic!("write: {e}"));
            }
        }));
    }
    let mut readers = Vec::new();
    for r in 0..4u64 {
        let (store, done) = (Arc::clone(&store), Arc::clone(&done));
        readers.push(tokio::spawn(async move {
            let mut reads = 0u64;
            while !done.load(Ordering::Relaxed) {
                let start = (reads * 13 + r * 31) % BLOCKS;
                let end = (start + 1 + reads % 24).min(BLOCKS);
                let blocks = store
                    .read_blocks(VOLUME, start..end)
                    .await
                    .unwrap_or_else(|e| panic!("read: {e}"));
                for (block, found) in (start..).zip(&blocks) {
                    if let Some((meta, data)) = found {
                        assert!(
                            consistent(block, meta, data),
                            "block {block} torn or misplaced"
                        );
                    }
                }
                if let Some((meta, data)) = store
                    .read_block(VOLUME, start)
                    .await
                    .unwrap_or_else(|e| panic!("read: {e}"))
                {
                    assert!(consistent(start, &meta, &data), "block {start} torn");
                }
                reads += 1;
                tokio::task::yield_now().await;
            }
            reads
        }));
    }
    let syncer = {
        let (store, done) = (Arc::clone(&store), Arc::clone(&done));
        tokio::spawn(async move {
            let mut syncs = 0u64;
            while !done.load(Ordering::Relaxed) {
                store.sync().await.unwrap_or_else(|e| panic!("sync: {e}"));
                syncs += 1;
                tokio::task::yield_now().await;
            }
            syncs
        })
    };
    for writer in writers {
        writer.await.unwrap_or_else(|e| panic!("writer: {e}"));
    }
    done.store(true, Ordering::Relaxed);
    let mut reads = 0;
    for reader in readers {
        reads += reader.await.unwrap_or_else(|e| panic!("reader: {e}"));
    }
    let syncs = syncer.await.unwrap_or_else(|e| panic!("syncer: {e}"));
    assert!(reads > 0 && syncs > 0);

    let expected = highest.snapshot();
    let check = |finals: &[Option<(trireme_replica::BlockMeta, Box<trireme_replica::Block>)>]| {
        for (block, found) in (0u64..).zip(finals) {
            match expected.get(&block) {
                Some(&v) => assert_block(found.as_ref(), block, v),
                None => assert!(found.is_none()),
            }
        }
    };
    let finals = store
        .read_blocks(VOLUME, 0..BLOCKS)
        .await
        .unwrap_or_else(|e| panic!("read: {e}"));
    check(&finals);
    let live = u64::try_from(expected.len()).unwrap_or(0);
    assert_eq!(store.allocated_blocks(VOLUME).unwrap_or(0), live);

    // The same after a sync and a reopen (free slots rebuilt from the index).
    store.sync().await.unwrap_or_else(|e| panic!("sync: {e}"));
    drop(store);
    let store = open(dir.path());
    let finals = store
        .read_blocks(VOLUME, 0..BLOCKS)
        .await
        .unwrap_or_else(|e| panic!("read: {e}"));
    check(&finals);
    assert_eq!(store.allocated_blocks(VOLUME).unwrap_or(0), live);
}

/// Highest version written per block.
#[derive(Default)]
struct Highest(std::sync::Mutex<HashMap<u64, u64>>);

impl Highest {
    fn record(&self, block: u64, version: u64) {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let entry = map.entry(block).or_insert(0);
        *entry = (*entry).max(version);
    }

    fn snapshot(&self) -> HashMap<u64, u64> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}
