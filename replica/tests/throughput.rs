//! A quick 4 KiB random write / read loop that prints rough throughput (run with
//! `--nocapture`). Not a benchmark with thresholds: it checks the data it reads and
//! reports numbers for an A/B look on the same host.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{consistent, open, tempdir, write};

const VOLUME: u64 = 1;
const BLOCKS: u64 = 16_384; // 64 MiB of address space
const RUN: Duration = Duration::from_millis(1500);

fn next(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_4k_write_read_throughput() {
    let dir = tempdir();
    let store = Arc::new(open(dir.path()));
    store
        .create_volume(VOLUME)
        .unwrap_or_else(|e| panic!("create: {e}"));
    // Fill the volume so reads hit data.
    for chunk in 0..(BLOCKS / 4096) {
        let writes = (chunk * 4096..(chunk + 1) * 4096)
            .map(|b| write(b, 1))
            .collect();
        store
            .write_blocks(VOLUME, writes)
            .await
            .unwrap_or_else(|e| panic!("fill: {e}"));
    }
    store.sync().await.unwrap_or_else(|e| panic!("sync: {e}"));

    let version = Arc::new(AtomicU64::new(2));
    for depth in [1u64, 32] {
        let ops = Arc::new(AtomicU64::new(0));
        let start = Instant::now();
        let tasks: Vec<_> = (0..depth)
            .map(|t| {
                let (store, ops, version) =
                    (Arc::clone(&store), Arc::clone(&ops), Arc::clone(&version));
                tokio::spawn(async move {
                    let mut x = 0x1234_5678 + t;
                    while start.elapsed() < RUN {
                        let block = next(&mut x) % BLOCKS;
                        let v = version.fetch_add(1, Ordering::Relaxed);
                        store
                            .write_blocks(VOLUME, vec![write(block, v)])
                            .await
                            .unwrap_or_else(|e| panic!("write: {e}"));
                        ops.fetch_add(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap_or_else(|e| panic!("task: {e}"));
        }
        let secs = start.elapsed().as_secs_f64();
        let n = ops.load(Ordering::Relaxed) as f64;
        println!(
            "randwrite 4k QD{depth}: {:.0} IOPS ({:.1} MiB/s)",
            n / secs,
            n * 4096.0 / secs / 1048576.0
        );
        let sync_start = Instant::now();
        store.sync().await.unwrap_or_else(|e| panic!("sync: {e}"));
        println!("  sync after it: {:?}", sync_start.elapsed());
    }

    for depth in [1u64, 32] {
        let ops = Arc::new(AtomicU64::new(0));
        let start = Instant::now();
        let tasks: Vec<_> = (0..depth)
            .map(|t| {
                let (store, ops) = (Arc::clone(&store), Arc::clone(&ops));
                tokio::spawn(async move {
                    let mut x = 0x8765_4321 + t;
                    while start.elapsed() < RUN {
                        let block = next(&mut x) % BLOCKS;
                        let found = store
                            .read_block(VOLUME, block)
                            .await
                            .unwrap_or_else(|e| panic!("read: {e}"));
                        let Some((meta, data)) = found else {
                            panic!("block {block} missing");
                        };
                        assert!(consistent(block, &meta, &data));
                        ops.fetch_add(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap_or_else(|e| panic!("task: {e}"));
        }
        let secs = start.elapsed().as_secs_f64();
        let n = ops.load(Ordering::Relaxed) as f64;
        println!(
            "randread 4k QD{depth}: {:.0} IOPS ({:.1} MiB/s)",
            n / secs,
            n * 4096.0 / secs / 1048576.0
        );
    }

    // Sequential 1 MiB reads (256-block batches).
    let start = Instant::now();
    let mut bytes = 0u64;
    let mut first = 0;
    while start.elapsed() < RUN {
        let blocks = store
            .read_blocks(VOLUME, first..first + 256)
            .await
            .unwrap_or_else(|e| panic!("read: {e}"));
        assert_eq!(blocks.len(), 256);
        bytes += 256 * 4096;
        first = (first + 256) % BLOCKS;
    }
    println!(
        "seqread 1 MiB QD1: {:.1} MiB/s",
        bytes as f64 / start.elapsed().as_secs_f64() / 1048576.0
    );
}
