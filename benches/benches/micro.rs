//! Criterion benches of the per-block hot path: AES-256-GCM per 4 KiB block, CRC32 of a
//! block, and block-store writes (data + index update) and reads.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use engine::crypto::{BlockAddress, BlockCipher, SecretKey};
use replica::{Block, BlockMeta, BlockWrite, Store, StoreOptions};

fn crypto(c: &mut Criterion) {
    let cipher = BlockCipher::new(&SecretKey::generate().unwrap());
    let mut g = c.benchmark_group("block");
    g.throughput(Throughput::Bytes(4096));
    let mut data = vec![0x42u8; 4096];
    let mut version = 0u64;
    g.bench_function("aes256gcm_seal_4k", |b| {
        b.iter(|| {
            version += 1;
            cipher.seal(
                &BlockAddress {
                    tenant: 1,
                    volume: 2,
                    block: 3,
                    version,
                },
                &mut data,
            )
        })
    });
    let addr = BlockAddress {
        tenant: 1,
        volume: 2,
        block: 3,
        version: 1,
    };
    let mut sealed = vec![0x42u8; 4096];
    let tag = cipher.seal(&addr, &mut sealed);
    g.bench_function("aes256gcm_open_4k", |b| {
        b.iter(|| {
            let mut d = sealed.clone();
            cipher.open(&addr, &mut d, &tag).unwrap();
            d
        })
    });
    // The portable RustCrypto implementation, for comparison (what the engine used
    // before these benches showed ring's assembly is several times faster).
    {
        use aes_gcm::aead::{AeadInPlace, KeyInit};
        let rc =
            aes_gcm::Aes256Gcm::new(aes_gcm::Key::<aes_gcm::Aes256Gcm>::from_slice(&[7u8; 32]));
        let nonce = aes_gcm::Nonce::from_slice(&[0u8; 12]);
        g.bench_function("rustcrypto_aes256gcm_seal_4k", |b| {
            b.iter(|| {
                rc.encrypt_in_place_detached(nonce, b"aad", &mut data)
                    .unwrap()
            })
        });
    }
    g.bench_function("crc32_4k", |b| b.iter(|| crc32fast::hash(&sealed)));
    g.finish();
}

fn store(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
    store.create_volume(1).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut g = c.benchmark_group("store");
    g.throughput(Throughput::Bytes(4096));
    let mut version = 0u64;
    let mut block = 0u64;
    g.bench_function("write_block_4k_index_update", |b| {
        b.iter(|| {
            version += 1;
            block = (block + 7919) % 65536;
            let data = Block::zeroed();
            let meta = BlockMeta {
                version,
                crc: crc32fast::hash(&data.0),
                tag: [0; 16],
            };
            rt.block_on(store.write_blocks(1, vec![BlockWrite { block, meta, data }]))
                .unwrap();
        })
    });
    g.bench_function("read_block_4k", |b| {
        b.iter(|| {
            block = (block + 7919) % 65536;
            rt.block_on(store.read_block(1, block)).unwrap()
        })
    });
    g.finish();
}

/// Live writes and reads of a volume with 0, 1 and 200 snapshots (A/B in one run): a
/// snapshot must cost the live path nothing per snapshot. With any snapshot, the first
/// overwrite of a block older than the newest snapshot also moves the old version to
/// the history (one more key in the same rocksdb batch).
fn store_snapshots(c: &mut Criterion) {
    const BLOCKS: u64 = 16384;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut g = c.benchmark_group("store_snapshots");
    g.throughput(Throughput::Bytes(4096));
    let write = |block: u64, version: u64| {
        let data = Block::zeroed();
        let meta = BlockMeta {
            version,
            crc: crc32fast::hash(&data.0),
            tag: [0; 16],
        };
        BlockWrite { block, meta, data }
    };
    for snapshots in [0u64, 1, 200] {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
        store.create_volume(1).unwrap();
        let mut version = 1u64;
        rt.block_on(async {
            for start in (0..BLOCKS).step_by(1024) {
                let writes = (start..start + 1024).map(|b| write(b, version)).collect();
                store.write_blocks(1, writes).await.unwrap();
            }
            // Each snapshot holds some blocks the others do not.
            for s in 0..snapshots {
                version += 1;
                let writes = (0..32).map(|i| write((s * 997 + i * 31) % BLOCKS, version));
                store.write_blocks(1, writes.collect()).await.unwrap();
                store.create_snapshot(1).await.unwrap();
            }
            store.sync().await.unwrap();
        });
        let mut block = 0u64;
        g.bench_function(format!("write_block_4k/{snapshots}_snapshots"), |b| {
            b.iter(|| {
                version += 1;
                block = (block + 7919) % BLOCKS;
                rt.block_on(store.write_blocks(1, vec![write(block, version)]))
                    .unwrap();
            })
        });
        g.bench_function(format!("read_block_4k/{snapshots}_snapshots"), |b| {
            b.iter(|| {
                block = (block + 7919) % BLOCKS;
                rt.block_on(store.read_block(1, block)).unwrap()
            })
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).measurement_time(std::time::Duration::from_secs(3));
    targets = crypto, store, store_snapshots
}
criterion_main!(benches);
