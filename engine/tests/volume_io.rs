//! The engine over a real block store (rocksdb + data files in a temporary folder).

use std::sync::Arc;

mod common;

use trireme_engine as engine;

use common::{engine, flatten, spec};
use engine::VolumeError;
use replica::BlockWrite;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unaligned_io_matches_a_plain_buffer() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(dir.path());
    e.create_volume(&spec("v", 1 << 20, None)).unwrap();
    let v = e.volume("v").unwrap();
    let mut model = vec![0u8; 1 << 20];
    let mut x = 12345u64;
    for i in 0..300u64 {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let off = (x >> 20) % (1 << 20);
        let len = ((x >> 44) % 20000).min((1 << 20) - off);
        let (o, l) = (usize::try_from(off).unwrap(), usize::try_from(len).unwrap());
        match i % 5 {
            0 => {
                v.write_zeroes(off, len, true, false).await.unwrap();
                model[o..o + l].fill(0);
            }
            1 => {
                v.write_zeroes(off, len, false, i % 2 == 0).await.unwrap();
                model[o..o + l].fill(0);
            }
            _ => {
                let data: Vec<u8> = (0..l)
                    .map(|j| u8::try_from((j + usize::try_from(i).unwrap()) % 255).unwrap())
                    .collect();
                v.write(off, &data, i % 7 == 0).await.unwrap();
                model[o..o + l].copy_from_slice(&data);
            }
        }
        if i % 50 == 0 {
            assert_eq!(
                flatten(v.read(0, 1 << 20).await.unwrap()),
                model,
                "after op {i}"
            );
        }
    }
    v.flush().await.unwrap();
    assert_eq!(flatten(v.read(0, 1 << 20).await.unwrap()), model);
    // Zero-length and out-of-range requests.
    assert!(v.read(0, 0).await.unwrap().is_empty());
    assert!(matches!(
        v.read(1 << 20, 1).await,
        Err(VolumeError::OutOfRange { .. })
    ));
    assert!(matches!(
        v.write(u64::MAX, b"x", false).await,
        Err(VolumeError::OutOfRange { .. })
    ));

    // Reopen: everything is still there.
    drop(v);
    drop(e);
    let e = engine(dir.path());
    let v = e.volume("v").unwrap();
    assert_eq!(flatten(v.read(0, 1 << 20).await.unwrap()), model);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_partial_block_writes_lose_nothing() {
    // Eight writers each own a 512-byte slice of the same two blocks (a slice of one,
    // or straddling both) and rewrite it with increasing values. Each write is a
    // read-modify-write of a shared block; without the range lock one writer's update
    // would overwrite another's with stale bytes.
    let dir = tempfile::tempdir().unwrap();
    let e = engine(dir.path());
    e.create_volume(&spec("v", 64 << 10, None)).unwrap();
    let v = e.volume("v").unwrap();
    const ROUNDS: u8 = 40;
    let mut tasks = Vec::new();
    for t in 0..8u64 {
        let v = v.clone();
        tasks.push(tokio::spawn(async move {
            for i in 1..=ROUNDS {
                v.write(3584 + t * 512, &[i; 512], false).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let data = flatten(v.read(3584, 8 * 512).await.unwrap());
    assert!(
        data.iter().all(|&x| x == ROUNDS),
        "a partial-block update was lost: {:?}",
        &data[..16]
    );
}

#[tokio::test]
async fn extents_and_allocation_are_thin() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(dir.path());
    e.create_volume(&spec("v", 1 << 30, None)).unwrap();
    let v = e.volume("v").unwrap();
    assert_eq!(v.allocated_bytes().unwrap(), 0);
    v.write(8192, &[1; 100], false).await.unwrap();
    v.write(1 << 20, &[2; 8192], false).await.unwrap();
    assert_eq!(v.allocated_bytes().unwrap(), 3 * 4096);
    let ext = v.extents(0, 2 << 20).unwrap();
    let flat: Vec<(u64, bool)> = ext.iter().map(|e| (e.length, e.allocated)).collect();
    assert_eq!(
        flat,
        [
            (8192, false),
            (4096, true),
            ((1 << 20) - 12288, false),
            (8192, true),
            ((1 << 20) - 8192, false)
        ]
    );
    // Extents are clipped to the byte range asked for.
    let ext = v.extents(8200, 10).unwrap();
    assert_eq!(ext.len(), 1);
    assert_eq!((ext[0].length, ext[0].allocated), (10, true));
    v.write_zeroes(0, 2 << 20, true, false).await.unwrap();
    assert_eq!(v.allocated_bytes().unwrap(), 0);
    assert_eq!(e.volume_info("v").unwrap().allocated_bytes, 0);
}

#[tokio::test]
async fn another_tenants_key_fails_and_moved_blocks_fail() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(dir.path());
    e.create_tenant("a").unwrap();
    e.create_tenant("b").unwrap();
    e.create_volume(&spec("va", 1 << 20, Some("a"))).unwrap();
    e.create_volume(&spec("vb", 1 << 20, Some("b"))).unwrap();
    let va = e.volume("va").unwrap();
    va.write(0, &[0x5a; 8192], true).await.unwrap();

    // Tenant b's key on tenant a's blocks: authentication fails, nothing returned.
    let wrong = e.volume_with_foreign_key("va", "vb").unwrap();
    assert!(matches!(
        wrong.read(0, 4096).await,
        Err(VolumeError::Authentication { block: 0, .. })
    ));

    // Ciphertext moved to another block index fails its tag.
    let store = e.store().clone();
    let id = store.volumes().into_iter().min().unwrap();
    let (meta, data) = store.read_block(id, 0).await.unwrap().unwrap();
    store
        .write_blocks(
            id,
            vec![BlockWrite {
                block: 9,
                meta,
                data,
            }],
        )
        .await
        .unwrap();
    assert!(matches!(
        va.read(9 * 4096, 4096).await,
        Err(VolumeError::Authentication { block: 9, .. })
    ));
    assert_eq!(
        &flatten(va.read(0, 4096).await.unwrap())[..],
        &[0x5a; 4096][..]
    );
}

#[tokio::test]
async fn deleting_a_tenant_destroys_its_volumes() {
    let dir = tempfile::tempdir().unwrap();
    let e = Arc::new(engine(dir.path()));
    e.create_tenant("gone").unwrap();
    e.create_volume(&spec("g1", 1 << 20, Some("gone"))).unwrap();
    let v = e.volume("g1").unwrap();
    v.write(0, &[1; 4096], true).await.unwrap();
    assert_eq!(e.delete_tenant("gone").unwrap(), ["g1"]);
    assert!(matches!(
        v.read(0, 4096).await,
        Err(VolumeError::Deleted(_))
    ));
    assert!(e.volume("g1").is_err());
    assert!(e.list_tenants().unwrap().iter().all(|t| t.name != "gone"));
}

#[tokio::test]
async fn grow_yes_shrink_no() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(dir.path());
    e.create_volume(&spec("v", 1 << 20, None)).unwrap();
    let v = e.volume("v").unwrap();
    e.resize_volume("v", 2 << 20).unwrap();
    assert_eq!(v.size(), 2 << 20);
    v.write((2 << 20) - 4096, &[3; 4096], false).await.unwrap();
    let err = e.resize_volume("v", 1 << 20).unwrap_err();
    assert!(err.to_string().contains("shrinking"), "{err}");
}

#[tokio::test]
async fn read_only_volumes_refuse_changes() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(dir.path());
    e.create_volume(&spec("v", 1 << 20, None)).unwrap();
    let v = e.volume("v").unwrap();
    v.write(0, &[9; 4096], false).await.unwrap();
    assert!(e.set_read_only("v", true).unwrap().read_only);
    assert!(matches!(
        v.write(0, &[1; 10], false).await,
        Err(VolumeError::ReadOnly(_))
    ));
    assert!(matches!(
        v.write_zeroes(0, 4096, true, false).await,
        Err(VolumeError::ReadOnly(_))
    ));
    assert_eq!(&flatten(v.read(0, 4096).await.unwrap())[..], &[9; 4096][..]);
    // The flag is stored: a reopened engine still refuses writes.
    drop(v);
    drop(e);
    let e = engine(dir.path());
    let v = e.volume("v").unwrap();
    assert!(v.read_only());
    e.set_read_only("v", false).unwrap();
    v.write(0, &[1; 10], false).await.unwrap();
}
