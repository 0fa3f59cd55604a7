//! Snapshots, rollback and clones through the public API: each snapshot reads exactly
//! the writes completed before it, against an in-memory model, across overwrites,
//! trims, deletions, rollbacks and reopens; clones read through to their origin without
//! changing it; the refusals name what is in the way.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use common::{assert_block, consistent, open, tempdir, write};
use trireme_replica::{Extent, SnapId, Store, StoreError, ViewBlock, VolumeId};

const VOL: VolumeId = 0x51;
const CLONE: VolumeId = 0x52;

fn ok<T>(result: Result<T, StoreError>) -> T {
    result.unwrap_or_else(|e| panic!("store error: {e:?}"))
}

/// Version of each block of a view (`None`: unallocated).
type Model = BTreeMap<u64, u64>;

/// Reads `blocks` blocks of a view and returns (block -> version), checking every
/// block's data is its own version's and that it came from `source`.
async fn view(
    store: &Store,
    vol: VolumeId,
    snap: Option<SnapId>,
    blocks: u64,
    source: VolumeId,
) -> Model {
    let found = ok(store.read_blocks_at(vol, snap, 0..blocks).await);
    let mut model = Model::new();
    for (block, found) in (0u64..).zip(found) {
        if let Some(ViewBlock {
            source: from,
            meta,
            data,
        }) = found
        {
            assert!(
                consistent(block, &meta, &data),
                "{vol:x}@{snap:?} block {block}: data is not its version {}",
                meta.version
            );
            assert_eq!(from, source, "{vol:x}@{snap:?} block {block}: source");
            model.insert(block, meta.version);
        }
    }
    model
}

/// The allocation map a model implies over `0..blocks`.
fn extents_of(model: &Model, blocks: u64) -> Vec<Extent> {
    let mut extents: Vec<Extent> = Vec::new();
    for block in 0..blocks {
        let allocated = model.contains_key(&block);
        match extents.last_mut() {
            Some(last) if last.allocated == allocated => last.count += 1,
            _ => extents.push(Extent {
                start: block,
                count: 1,
                allocated,
            }),
        }
    }
    extents
}

/// Checks the live view and every snapshot of `VOL` against the models, with reads,
/// extents and block metadata.
async fn check(store: &Store, live: &Model, snaps: &BTreeMap<SnapId, Model>, blocks: u64) {
    assert_eq!(
        &view(store, VOL, None, blocks, VOL).await,
        live,
        "live view"
    );
    let listed: Vec<SnapId> = ok(store.snapshots(VOL)).iter().map(|s| s.id).collect();
    assert_eq!(
        listed,
        snaps.keys().copied().collect::<Vec<_>>(),
        "snapshot list"
    );
    for (&snap, model) in snaps {
        assert_eq!(
            &view(store, VOL, Some(snap), blocks, VOL).await,
            model,
            "snapshot {snap}"
        );
        assert_eq!(
            ok(store.extents_at(VOL, Some(snap), 0..blocks)),
            extents_of(model, blocks),
            "extents of snapshot {snap}"
        );
        for block in [0, blocks / 2, blocks - 1] {
            assert_eq!(
                ok(store.block_meta_at(VOL, Some(snap), block)).map(|(v, m)| (v, m.version)),
                model.get(&block).map(|&version| (VOL, version)),
                "meta of block {block} in snapshot {snap}"
            );
        }
    }
    assert_eq!(
        ok(store.extents(VOL, 0..blocks)),
        extents_of(live, blocks),
        "live extents"
    );
    assert_eq!(ok(store.allocated_blocks(VOL)), live.len() as u64);
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[tokio::test]
async fn snapshot_holds_exactly_the_writes_before_it() {
    let dir = tempdir();
    let store = open(dir.path());
    ok(store.create_volume(VOL));
    ok(store
        .write_blocks(VOL, (0..8).map(|b| write(b, 1)).collect())
        .await);
    let s1 = ok(store.create_snapshot(VOL).await);
    ok(store
        .write_blocks(VOL, (4..12).map(|b| write(b, 2)).collect())
        .await);
    ok(store.discard_blocks(VOL, 0..2).await);
    let s2 = ok(store.create_snapshot(VOL).await);
    assert!(s2 > s1);
    ok(store.write_blocks(VOL, vec![write(5, 3)]).await);

    for (block, found) in (0u64..).zip(ok(store.read_blocks(VOL, 0..12).await)) {
        if block == 5 {
            assert_block(found.as_ref(), block, 3);
        }
    }
    let model1: Model = (0..8).map(|b| (b, 1)).collect();
    assert_eq!(view(&store, VOL, Some(s1), 12, VOL).await, model1);
    let model2: Model = (2..4)
        .map(|b| (b, 1))
        .chain((4..12).map(|b| (b, 2)))
        .collect();
    assert_eq!(view(&store, VOL, Some(s2), 12, VOL).await, model2);
    let mut live = model2.clone();
    live.insert(5, 3);
    assert_eq!(view(&store, VOL, None, 12, VOL).await, live);
    // Snapshot 1 alone holds blocks 0, 1 and 4..8 at version 1 except 5 (which snapshot 2
    // holds too): blocks 2, 3 are still live.
    let infos = ok(store.snapshots(VOL));
    assert_eq!(infos.len(), 2);
    assert_eq!(infos[0].exclusive_blocks, 6);
    assert_eq!(infos[1].exclusive_blocks, 1); // block 5 at version 2

    // Unknown snapshots are refused.
    assert!(matches!(
        store.read_blocks_at(VOL, Some(99), 0..1).await,
        Err(StoreError::NoSuchSnapshot { .. })
    ));
    assert!(matches!(
        store.delete_snapshot(VOL, 99).await,
        Err(StoreError::NoSuchSnapshot { .. })
    ));
    // Everything survives a reopen.
    drop(store);
    let store = open(dir.path());
    assert_eq!(view(&store, VOL, Some(s2), 12, VOL).await, model2);
    assert_eq!(view(&store, VOL, None, 12, VOL).await, live);
    let s3 = ok(store.create_snapshot(VOL).await);
    assert!(s3 > s2, "ids are never reused");
}

/// Random writes, trims, snapshots, deletions, rollbacks, syncs and reopens; after
/// every step the live view and every snapshot match the model.
#[tokio::test]
async fn snapshots_match_a_model_through_overwrites_trims_deletes_and_rollbacks() {
    const BLOCKS: u64 = 48;
    for seed in [0x1234_5678_u64, 0x9e37_79b9, 0xdead_beef] {
        let dir = tempdir();
        let mut store = open(dir.path());
        ok(store.create_volume(VOL));
        let mut rng = Rng(seed);
        let mut live = Model::new();
        let mut snaps: BTreeMap<SnapId, Model> = BTreeMap::new();
        let mut version = 0u64;
        for step in 0..400 {
            match rng.below(100) {
                0..55 => {
                    let n = 1 + rng.below(4);
                    let writes: Vec<_> = (0..n)
                        .map(|_| {
                            version += 1;
                            let block = rng.below(BLOCKS);
                            live.insert(block, version);
                            write(block, version)
                        })
                        .collect();
                    ok(store.write_blocks(VOL, writes).await);
                }
                55..65 => {
                    let start = rng.below(BLOCKS);
                    let end = (start + 1 + rng.below(8)).min(BLOCKS);
                    ok(store.discard_blocks(VOL, start..end).await);
                    live.retain(|b, _| !(start..end).contains(b));
                }
                65..77 => {
                    let snap = ok(store.create_snapshot(VOL).await);
                    snaps.insert(snap, live.clone());
                }
                77..85 if !snaps.is_empty() => {
                    let pick = usize::try_from(rng.below(snaps.len() as u64)).unwrap_or(0);
                    let snap = snaps.keys().nth(pick).copied().unwrap_or(0);
                    ok(store.delete_snapshot(VOL, snap).await);
                    snaps.remove(&snap);
                }
                85..90 if !snaps.is_empty() => {
                    let pick = usize::try_from(rng.below(snaps.len() as u64)).unwrap_or(0);
                    let (&snap, model) = snaps.iter().nth(pick).unwrap_or_else(|| panic!());
                    ok(store.rollback(VOL, snap).await);
                    live = model.clone();
                }
                90..95 => ok(store.sync().await),
                95..97 => {
                    drop(store);
                    store = open(dir.path());
                }
                _ => {}
            }
            if step % 8 == 0 {
                check(&store, &live, &snaps, BLOCKS).await;
            }
        }
        check(&store, &live, &snaps, BLOCKS).await;
        drop(store);
        let store = open(dir.path());
        check(&store, &live, &snaps, BLOCKS).await;
        // Deleting every snapshot leaves the live view, and only its blocks' space.
        for &snap in snaps.keys() {
            ok(store.delete_snapshot(VOL, snap).await);
        }
        check(&store, &live, &BTreeMap::new(), BLOCKS).await;
        println!("seed {seed:x}: {} live blocks", live.len());
    }
}

#[tokio::test]
async fn delete_reclaims_space_and_keeps_other_snapshots() {
    const N: u64 = 512;
    let dir = tempdir();
    let store = open(dir.path());
    ok(store.create_volume(VOL));
    ok(store
        .write_blocks(VOL, (0..N).map(|b| write(b, 1)).collect())
        .await);
    let s1 = ok(store.create_snapshot(VOL).await);
    ok(store
        .write_blocks(VOL, (0..N).map(|b| write(b, 2)).collect())
        .await);
    let s2 = ok(store.create_snapshot(VOL).await);
    ok(store
        .write_blocks(VOL, (0..N / 2).map(|b| write(b, 3)).collect())
        .await);
    ok(store.sync().await);
    let infos = ok(store.snapshots(VOL));
    assert_eq!(infos[0].exclusive_blocks, N);
    assert_eq!(infos[1].exclusive_blocks, N / 2);
    let path = store.data_file_path(VOL);
    let slots = |p: &std::path::Path| std::fs::metadata(p).map(|m| m.len() / 4096).unwrap_or(0);
    // 3 versions of the first half, 2 of the second.
    assert_eq!(slots(&path), N * 5 / 2);

    ok(store.delete_snapshot(VOL, s1).await);
    let infos = ok(store.snapshots(VOL));
    assert_eq!(infos.len(), 1);
    assert_eq!(infos[0].id, s2);
    let model2: Model = (0..N).map(|b| (b, 2)).collect();
    assert_eq!(view(&store, VOL, Some(s2), N, VOL).await, model2);
    // The N freed slots are reused by new writes: the file does not grow.
    ok(store
        .write_blocks(VOL, (N..2 * N).map(|b| write(b, 1)).collect())
        .await);
    ok(store.sync().await);
    assert_eq!(slots(&path), N * 5 / 2);
    assert_eq!(view(&store, VOL, Some(s2), N, VOL).await, model2);
    // Deleting the last snapshot gives back the versions the live view does not use.
    ok(store.delete_snapshot(VOL, s2).await);
    ok(store
        .write_blocks(VOL, (2 * N..2 * N + N / 2).map(|b| write(b, 1)).collect())
        .await);
    ok(store.sync().await);
    assert_eq!(slots(&path), N * 5 / 2);
    assert_eq!(ok(store.allocated_blocks(VOL)), 2 * N + N / 2);
}

/// Writers run while snapshots are taken: each snapshot holds every write acknowledged
/// before `create_snapshot` was called, and of each writer's sequential writes a prefix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_is_a_point_in_time_under_concurrent_writers() {
    const WRITERS: u64 = 4;
    const PER_WRITER: u64 = 300;
    let dir = tempdir();
    let store = Arc::new(open(dir.path()));
    ok(store.create_volume(VOL));
    let acked: Arc<Vec<AtomicU64>> = Arc::new((0..WRITERS).map(|_| AtomicU64::new(0)).collect());
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let store = Arc::clone(&store);
        let acked = Arc::clone(&acked);
        tasks.push(tokio::spawn(async move {
            for k in 0..PER_WRITER {
                // Writer w owns blocks w * PER_WRITER + k.
                let block = w * PER_WRITER + k;
                ok(store.write_blocks(VOL, vec![write(block, k + 1)]).await);
                acked[usize::try_from(w).unwrap_or(0)].store(k + 1, Ordering::SeqCst);
            }
        }));
    }
    let mut taken = Vec::new();
    for _ in 0..6 {
        tokio::time::sleep(std::time::Duration::from_millis(15)).await;
        let before: Vec<u64> = acked.iter().map(|a| a.load(Ordering::SeqCst)).collect();
        let snap = ok(store.create_snapshot(VOL).await);
        taken.push((snap, before));
    }
    for task in tasks {
        task.await.unwrap_or_else(|e| panic!("writer: {e}"));
    }
    for (snap, before) in taken {
        let model = view(&store, VOL, Some(snap), WRITERS * PER_WRITER, VOL).await;
        for w in 0..WRITERS {
            let held: Vec<u64> = (0..PER_WRITER)
                .filter(|k| model.contains_key(&(w * PER_WRITER + k)))
                .collect();
            let prefix = held.len() as u64;
            assert_eq!(
                held,
                (0..prefix).collect::<Vec<_>>(),
                "snapshot {snap}: no prefix"
            );
            assert!(
                prefix >= before[usize::try_from(w).unwrap_or(0)],
                "snapshot {snap}: writer {w} had {} acknowledged, snapshot holds {prefix}",
                before[usize::try_from(w).unwrap_or(0)]
            );
        }
    }
}

#[tokio::test]
async fn rollback_then_writes_keeps_older_and_newer_snapshots() {
    let dir = tempdir();
    let store = open(dir.path());
    ok(store.create_volume(VOL));
    ok(store
        .write_blocks(VOL, (0..6).map(|b| write(b, 1)).collect())
        .await);
    let old = ok(store.create_snapshot(VOL).await);
    ok(store
        .write_blocks(VOL, (2..8).map(|b| write(b, 2)).collect())
        .await);
    ok(store.discard_blocks(VOL, 0..1).await);
    let target = ok(store.create_snapshot(VOL).await);
    ok(store
        .write_blocks(VOL, (0..4).map(|b| write(b, 3)).collect())
        .await);
    ok(store.discard_blocks(VOL, 6..8).await);
    let newer = ok(store.create_snapshot(VOL).await);
    ok(store.write_blocks(VOL, vec![write(9, 4)]).await);

    let m_old: Model = (0..6).map(|b| (b, 1)).collect();
    let m_target: Model = (1..2)
        .map(|b| (b, 1))
        .chain((2..8).map(|b| (b, 2)))
        .collect();
    let m_newer: Model = (0..4)
        .map(|b| (b, 3))
        .chain((4..6).map(|b| (b, 2)))
        .collect();

    ok(store.rollback(VOL, target).await);
    assert_eq!(view(&store, VOL, None, 10, VOL).await, m_target);
    assert_eq!(ok(store.allocated_blocks(VOL)), m_target.len() as u64);
    // Writes after the rollback, and a snapshot of them.
    ok(store
        .write_blocks(VOL, vec![write(1, 5), write(8, 5)])
        .await);
    ok(store.discard_blocks(VOL, 7..8).await);
    let after = ok(store.create_snapshot(VOL).await);
    let mut m_after = m_target.clone();
    m_after.insert(1, 5);
    m_after.insert(8, 5);
    m_after.remove(&7);
    let mut store = Some(store);
    for _ in 0..2 {
        let store = store.take().unwrap_or_else(|| open(dir.path()));
        assert_eq!(view(&store, VOL, Some(old), 10, VOL).await, m_old);
        assert_eq!(view(&store, VOL, Some(target), 10, VOL).await, m_target);
        assert_eq!(view(&store, VOL, Some(newer), 10, VOL).await, m_newer);
        assert_eq!(view(&store, VOL, Some(after), 10, VOL).await, m_after);
        assert_eq!(view(&store, VOL, None, 10, VOL).await, m_after);
        // Rolling back to the newer snapshot brings its blocks back too.
        ok(store.rollback(VOL, newer).await);
        assert_eq!(view(&store, VOL, None, 10, VOL).await, m_newer);
        ok(store.rollback(VOL, after).await);
        drop(store);
    }
}

#[tokio::test]
async fn two_hundred_snapshots_read_back_and_cost_little() {
    const BLOCKS: u64 = 256;
    let dir = tempdir();
    let store = open(dir.path());
    ok(store.create_volume(VOL));
    let mut live = Model::new();
    let mut snaps = BTreeMap::new();
    let mut version = 0;
    let mut rng = Rng(77);
    for _ in 0..200 {
        let writes: Vec<_> = (0..4)
            .map(|_| {
                version += 1;
                let block = rng.below(BLOCKS);
                live.insert(block, version);
                write(block, version)
            })
            .collect();
        ok(store.write_blocks(VOL, writes).await);
        let snap = ok(store.create_snapshot(VOL).await);
        snaps.insert(snap, live.clone());
    }
    assert_eq!(ok(store.snapshots(VOL)).len(), 200);
    for (&snap, model) in snaps.iter().step_by(7) {
        assert_eq!(&view(&store, VOL, Some(snap), BLOCKS, VOL).await, model);
    }
    drop(store);
    let store = open(dir.path());
    check(&store, &live, &snaps, BLOCKS).await;
}

/// Live write and read speed of a volume with 0 and with 200 snapshots (A/B in the
/// same run; printed, not asserted against a threshold).
#[tokio::test]
async fn live_io_speed_with_0_and_200_snapshots() {
    const BLOCKS: u64 = 4096;
    const OPS: u64 = 4000;
    for snapshots in [0u64, 200] {
        let dir = tempdir();
        let store = open(dir.path());
        ok(store.create_volume(VOL));
        ok(store
            .write_blocks(VOL, (0..BLOCKS).map(|b| write(b, 1)).collect())
            .await);
        let mut version = 1;
        let mut rng = Rng(5);
        for _ in 0..snapshots {
            for _ in 0..8 {
                version += 1;
                ok(store
                    .write_blocks(VOL, vec![write(rng.below(BLOCKS), version)])
                    .await);
            }
            ok(store.create_snapshot(VOL).await);
        }
        ok(store.sync().await);
        let started = Instant::now();
        for _ in 0..OPS {
            version += 1;
            ok(store
                .write_blocks(VOL, vec![write(rng.below(BLOCKS), version)])
                .await);
        }
        let write_rate =
            f64::from(u32::try_from(OPS).unwrap_or(0)) / started.elapsed().as_secs_f64();
        let started = Instant::now();
        for _ in 0..OPS {
            let found = ok(store.read_block(VOL, rng.below(BLOCKS)).await);
            assert!(found.is_some());
        }
        let read_rate =
            f64::from(u32::try_from(OPS).unwrap_or(0)) / started.elapsed().as_secs_f64();
        println!(
            "{snapshots} snapshots: {write_rate:.0} writes/s, {read_rate:.0} reads/s (4 KiB, \
             one at a time)"
        );
    }
}

#[tokio::test]
async fn clones_read_through_and_stay_apart_from_their_origin() {
    let dir = tempdir();
    let store = open(dir.path());
    ok(store.create_volume(VOL));
    ok(store
        .write_blocks(VOL, (0..8).map(|b| write(b, 1)).collect())
        .await);
    let snap = ok(store.create_snapshot(VOL).await);
    // Origin changes after the snapshot are not seen by the clone.
    ok(store
        .write_blocks(VOL, vec![write(0, 2), write(9, 2)])
        .await);
    ok(store.create_clone(CLONE, VOL, snap).await);
    assert_eq!(ok(store.clone_origin(CLONE)), Some((VOL, snap)));
    assert_eq!(ok(store.clone_origin(VOL)), None);
    let origin: Model = (0..8).map(|b| (b, 1)).collect();
    assert_eq!(view(&store, CLONE, None, 12, VOL).await, origin);
    assert_eq!(
        ok(store.extents(CLONE, 0..12)),
        extents_of(&origin, 12),
        "a clone's extents show its origin's blocks"
    );
    assert_eq!(ok(store.allocated_blocks(CLONE)), 0);
    assert_eq!(
        ok(store.block_meta_at(CLONE, None, 3)).map(|(v, m)| (v, m.version)),
        Some((VOL, 1))
    );

    // Clone writes and trims: the trim hides the origin's block.
    ok(store
        .write_blocks(CLONE, vec![write(1, 7), write(10, 7)])
        .await);
    ok(store.discard_blocks(CLONE, 2..4).await);
    ok(store.discard_blocks(CLONE, 10..11).await);
    let found = ok(store.read_blocks_at(CLONE, None, 0..12).await);
    let sources: Vec<Option<VolumeId>> =
        found.iter().map(|f| f.as_ref().map(|b| b.source)).collect();
    let mut expect = vec![Some(VOL); 8];
    expect[1] = Some(CLONE);
    expect[2] = None;
    expect[3] = None;
    expect.extend([None, None, None, None]);
    assert_eq!(sources, expect);
    assert_eq!(ok(store.allocated_blocks(CLONE)), 1);
    assert_eq!(
        ok(store.extents(CLONE, 0..12)),
        vec![
            Extent {
                start: 0,
                count: 2,
                allocated: true
            },
            Extent {
                start: 2,
                count: 2,
                allocated: false
            },
            Extent {
                start: 4,
                count: 4,
                allocated: true
            },
            Extent {
                start: 8,
                count: 4,
                allocated: false
            },
        ]
    );
    // The origin is untouched.
    let mut origin_live = origin.clone();
    origin_live.insert(0, 2);
    origin_live.insert(9, 2);
    assert_eq!(view(&store, VOL, None, 12, VOL).await, origin_live);
    assert_eq!(view(&store, VOL, Some(snap), 12, VOL).await, origin);

    // A snapshot of the clone, a clone of that (a chain), and a write over a trim.
    let csnap = ok(store.create_snapshot(CLONE).await);
    ok(store.write_blocks(CLONE, vec![write(2, 8)]).await);
    ok(store.discard_blocks(CLONE, 4..5).await);
    const GRANDCHILD: VolumeId = 0x53;
    ok(store.create_clone(GRANDCHILD, CLONE, csnap).await);
    let mut store = Some(store);
    for _ in 0..2 {
        let store = store.take().unwrap_or_else(|| open(dir.path()));
        let found = ok(store.read_blocks_at(GRANDCHILD, None, 0..8).await);
        let got: Vec<Option<(VolumeId, u64)>> = found
            .iter()
            .map(|f| f.as_ref().map(|b| (b.source, b.meta.version)))
            .collect();
        assert_eq!(
            got,
            vec![
                Some((VOL, 1)),
                Some((CLONE, 7)),
                None,
                None,
                Some((VOL, 1)),
                Some((VOL, 1)),
                Some((VOL, 1)),
                Some((VOL, 1)),
            ]
        );
        let at = ok(store.read_blocks_at(CLONE, Some(csnap), 0..8).await);
        assert!(at[2].is_none() && at[4].as_ref().is_some_and(|b| b.source == VOL));
        let live = ok(store.read_blocks_at(CLONE, None, 0..8).await);
        assert!(
            live[2]
                .as_ref()
                .is_some_and(|b| b.source == CLONE && b.meta.version == 8)
        );
        assert!(live[4].is_none());
        drop(store);
    }
}

#[tokio::test]
async fn deleting_what_clones_read_is_refused() {
    let dir = tempdir();
    let store = open(dir.path());
    ok(store.create_volume(VOL));
    ok(store.write_blocks(VOL, vec![write(0, 1)]).await);
    let snap = ok(store.create_snapshot(VOL).await);
    let other = ok(store.create_snapshot(VOL).await);
    ok(store.create_clone(CLONE, VOL, snap).await);
    match store.delete_snapshot(VOL, snap).await {
        Err(StoreError::SnapshotHasClones { clones, .. }) => assert_eq!(clones, vec![CLONE]),
        other => panic!("expected SnapshotHasClones, got {other:?}"),
    }
    match store.delete_volume(VOL) {
        Err(e @ StoreError::VolumeHasClones { .. }) => {
            assert!(e.to_string().contains("0000000000000052"), "{e}");
        }
        other => panic!("expected VolumeHasClones, got {other:?}"),
    }
    assert!(matches!(
        store.create_clone(CLONE, VOL, snap).await,
        Err(StoreError::VolumeExists(_))
    ));
    assert!(matches!(
        store.create_clone(0x99, VOL, 12345).await,
        Err(StoreError::NoSuchSnapshot { .. })
    ));
    // Another snapshot can go; after the clone is gone, everything can.
    ok(store.delete_snapshot(VOL, other).await);
    drop(store);
    let store = open(dir.path());
    assert!(store.delete_snapshot(VOL, snap).await.is_err());
    ok(store.delete_volume(CLONE));
    ok(store.delete_snapshot(VOL, snap).await);
    ok(store.create_snapshot(VOL).await);
    ok(store.delete_volume(VOL));
    drop(store);
    let store = open(dir.path());
    assert!(store.volumes().is_empty());
}
