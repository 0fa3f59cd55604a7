//! Snapshots, rollback and clones at the engine level, over a real block store: views
//! read the right bytes through the right keys, refusals name the cause, and the
//! catalog and the store agree after a reopen.

mod common;

use trireme_engine as engine;

use common::{engine, flatten, spec};
use engine::{Engine, EngineError, VolumeError};

async fn read(e: &Engine, name: &str, offset: u64, len: u64) -> Vec<u8> {
    flatten(e.volume(name).unwrap().read(offset, len).await.unwrap())
}

async fn write(e: &Engine, name: &str, offset: u64, byte: u8, len: usize) {
    e.volume(name)
        .unwrap()
        .write(offset, &vec![byte; len], false)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn views_rollback_and_refusals() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(dir.path());
    e.create_volume(&spec("v", 1 << 20, None)).unwrap();
    // An unaligned write, so the snapshot holds partial blocks.
    write(&e, "v", 1000, 0xaa, 10_000).await;
    e.create_snapshot("v", "s1").await.unwrap();
    assert!(matches!(
        e.create_snapshot("v", "s1").await,
        Err(EngineError::SnapshotExists(_))
    ));
    assert!(matches!(
        e.create_snapshot("nope", "s1").await,
        Err(EngineError::NoSuchVolume(_))
    ));
    assert!(matches!(
        e.create_snapshot("v", "bad/name").await,
        Err(EngineError::Invalid(_))
    ));
    write(&e, "v", 4096, 0xbb, 4096).await;

    let mut expect = vec![0u8; 1 << 20];
    expect[1000..11_000].fill(0xaa);
    assert_eq!(read(&e, "v@s1", 0, 1 << 20).await, expect);
    let view = e.volume("v@s1").unwrap();
    assert!(view.read_only());
    assert!(matches!(
        view.write(0, &[1; 4096], false).await,
        Err(VolumeError::ReadOnly(_))
    ));
    assert!(matches!(
        e.volume("v@nope"),
        Err(EngineError::NoSuchSnapshot(_))
    ));
    let mut live = expect.clone();
    live[4096..8192].fill(0xbb);
    assert_eq!(read(&e, "v", 0, 1 << 20).await, live);

    // Refused while attached for writing, unless forced.
    let v = e.volume("v").unwrap();
    let guard = v.attach_writer();
    assert!(matches!(
        e.rollback_snapshot("v", "s1", false).await,
        Err(EngineError::Busy(_))
    ));
    let done = e.rollback_snapshot("v", "s1", true).await.unwrap();
    assert_eq!(done.attached_writers, 1);
    drop(guard);
    assert_eq!(read(&e, "v", 0, 1 << 20).await, expect);

    let list = e.list_snapshots(Some("v")).unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].name, "s1");
    // Deleting the snapshot ends its view.
    e.delete_snapshot("v", "s1").await.unwrap();
    assert!(matches!(
        view.read(0, 4096).await,
        Err(VolumeError::Deleted(_))
    ));
    assert!(e.list_snapshots(None).unwrap().is_empty());
    assert!(matches!(
        e.delete_snapshot("v", "s1").await,
        Err(EngineError::NoSuchSnapshot(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clones_read_through_with_their_origins_keys() {
    let dir = tempfile::tempdir().unwrap();
    {
        let e = engine(dir.path());
        e.create_tenant("t").unwrap();
        e.create_volume(&spec("base", 1 << 20, Some("t"))).unwrap();
        write(&e, "base", 0, 0x11, 65536).await;
        e.create_snapshot("base", "gold").await.unwrap();
        let info = e.clone_volume("base@gold", "c1", None).await.unwrap();
        assert_eq!(info.origin.as_deref(), Some("base@gold"));
        assert_eq!(info.tenant, "t");
        assert_eq!(info.allocated_bytes, 0);
        assert!(matches!(
            e.clone_volume("base@gold", "c1", None).await,
            Err(EngineError::VolumeExists(_))
        ));
        assert!(matches!(
            e.clone_volume("base@gold", "c2", Some("default")).await,
            Err(EngineError::Invalid(_))
        ));
        // A partial write to a shared block: read (origin's key), patch, seal (own key).
        write(&e, "c1", 100, 0x22, 10).await;
        e.create_snapshot("c1", "s").await.unwrap();
        e.clone_volume("c1@s", "c2", None).await.unwrap();
        write(&e, "c2", 8192, 0x33, 4096).await;
        assert!(matches!(
            e.delete_snapshot("base", "gold").await,
            Err(EngineError::Busy(_))
        ));
        assert!(matches!(e.delete_volume("base"), Err(EngineError::Busy(_))));
        e.volume("c2").unwrap().flush().await.unwrap();
    }
    // Reopened: the chain of keys is rebuilt from the catalog.
    let e = engine(dir.path());
    e.reconcile().await.unwrap();
    let mut want = vec![0u8; 1 << 20];
    want[..65536].fill(0x11);
    assert_eq!(read(&e, "base", 0, 1 << 20).await, want);
    want[100..110].fill(0x22);
    assert_eq!(read(&e, "c1", 0, 1 << 20).await, want);
    want[8192..12288].fill(0x33);
    assert_eq!(read(&e, "c2", 0, 1 << 20).await, want);
    // Deleting the tenant takes the clones first, then their origins.
    let mut deleted = e.delete_tenant("t").unwrap();
    deleted.sort();
    assert_eq!(deleted, ["base", "c1", "c2"]);
    assert!(e.store().volumes().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_drops_what_no_record_names() {
    let dir = tempfile::tempdir().unwrap();
    {
        let e = engine(dir.path());
        e.create_volume(&spec("v", 1 << 20, None)).unwrap();
        write(&e, "v", 0, 0x44, 4096).await;
        e.create_snapshot("v", "kept").await.unwrap();
        // A creation cut short after the store snapshot, before its record.
        let vol = e.store().volumes()[0];
        e.store().create_snapshot(vol).await.unwrap();
        // A clone cut short after the store volume, before its record.
        let snaps = e.store().snapshots(vol).unwrap();
        e.store()
            .create_clone(999_999, vol, snaps[0].id)
            .await
            .unwrap();
        assert_eq!(e.store().snapshots(vol).unwrap().len(), 2);
        assert_eq!(e.store().volumes().len(), 2);
    }
    let e = engine(dir.path());
    e.reconcile().await.unwrap();
    let vol = e.store().volumes();
    assert_eq!(vol.len(), 1);
    assert_eq!(e.store().snapshots(vol[0]).unwrap().len(), 1);
    assert_eq!(read(&e, "v@kept", 0, 4096).await, vec![0x44; 4096]);
}
