//! One conformance suite for every `MetaStore` backend: each property is a generic
//! `async fn` over a `Backend`, instantiated below for the embedded (SQLite) store and
//! for a real etcd started on loopback (the etcd tests fail, never skip, when etcd is
//! missing).

mod support;

use std::sync::Arc;
use std::time::Duration;

use support::{Backend, eventually};
use trireme_meta::{CasOutcome, Expect, MetaError, MetaStore, Versioned};

mod properties {
    use super::*;

    async fn value_of(store: &dyn MetaStore, key: &str) -> Option<Vec<u8>> {
        store.get(key).await.expect("get").map(|v| v.value)
    }

    pub async fn put_get_list(b: &Backend) {
        let s = &*b.store;
        assert_eq!(s.get("list/missing").await.expect("get"), None);
        // Written out of order, with neighbours that share a textual prefix.
        for key in [
            "list/c", "list/a", "list/é", "list/b", "lis", "list", "list0", "lisu/x",
        ] {
            s.put(key, key.as_bytes()).await.expect("put");
        }
        let all = s.list("list/", 100).await.expect("list");
        let keys: Vec<&str> = all.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(
            keys,
            ["list/a", "list/b", "list/c", "list/é"],
            "key order, prefix only"
        );
        for entry in &all {
            assert_eq!(entry.value, entry.key.as_bytes());
            let got = s
                .get(&entry.key)
                .await
                .expect("get")
                .expect("listed key exists");
            assert_eq!(got.revision, entry.revision);
        }
        let first_two = s.list("list/", 2).await.expect("list with limit");
        assert_eq!(first_two, all[..2]);
        assert!(s.list("list/", 0).await.expect("list, limit 0").is_empty());
        assert!(s.list("nothing/", 10).await.expect("list empty").is_empty());
        // Overwrite: new value, higher revision.
        let before = s.get("list/a").await.expect("get").expect("exists");
        let revision = s.put("list/a", b"new").await.expect("overwrite");
        assert!(revision > before.revision);
        assert_eq!(
            s.get("list/a").await.expect("get"),
            Some(Versioned {
                value: b"new".to_vec(),
                revision
            })
        );
        // Empty and binary values survive.
        s.put("list/empty", b"").await.expect("put empty");
        assert_eq!(value_of(s, "list/empty").await, Some(Vec::new()));
        s.put("list/bin", &[0, 255, 10]).await.expect("put binary");
        assert_eq!(value_of(s, "list/bin").await, Some(vec![0, 255, 10]));
    }

    pub async fn revisions_increase(b: &Backend) {
        let s = &*b.store;
        let start = s.current_revision().await.expect("revision");
        let mut last = start;
        for i in 0..10 {
            let r = s.put(&format!("rev/{}", i % 3), b"x").await.expect("put");
            assert!(r > last, "revision {r} after {last}");
            last = r;
        }
        assert_eq!(s.current_revision().await.expect("revision"), last);
        assert!(s.delete("rev/0").await.expect("delete"));
        let after_delete = s.current_revision().await.expect("revision");
        assert!(after_delete > last, "a delete is a change");
        assert!(!s.delete("rev/0").await.expect("delete again"));
        assert!(!s.delete("rev/never").await.expect("delete missing"));
        assert_eq!(
            s.current_revision().await.expect("revision"),
            after_delete,
            "deleting nothing changes nothing"
        );
    }

    pub async fn cas_success_and_conflict(b: &Backend) {
        let s = &*b.store;
        let r1 = s.put("cas/k", b"one").await.expect("put");
        let r2 = match s
            .compare_and_swap("cas/k", Expect::Revision(r1), Some(b"two"))
            .await
            .expect("cas")
        {
            CasOutcome::Done(r2) => r2,
            other => panic!("expected success, got {other:?}"),
        };
        assert!(r2 > r1);
        // The stale revision loses and learns the current state.
        let outcome = s
            .compare_and_swap("cas/k", Expect::Revision(r1), Some(b"three"))
            .await
            .expect("cas");
        assert_eq!(
            outcome,
            CasOutcome::Conflict(Some(Versioned {
                value: b"two".to_vec(),
                revision: r2
            }))
        );
        // Absent expected on an existing key conflicts too.
        assert!(matches!(
            s.compare_and_swap("cas/k", Expect::Absent, Some(b"four")).await.expect("cas"),
            CasOutcome::Conflict(Some(ref v)) if v.revision == r2
        ));
        assert_eq!(value_of(s, "cas/k").await, Some(b"two".to_vec()));
        // A conflict writes nothing.
        assert_eq!(
            s.current_revision().await.expect("revision"),
            r2,
            "a conflict must not bump the revision"
        );
    }

    pub async fn cas_from_absent(b: &Backend) {
        let s = &*b.store;
        let r = match s
            .compare_and_swap("absent/k", Expect::Absent, Some(b"first"))
            .await
            .expect("cas")
        {
            CasOutcome::Done(r) => r,
            other => panic!("create from absent failed: {other:?}"),
        };
        assert_eq!(
            s.get("absent/k").await.expect("get"),
            Some(Versioned {
                value: b"first".to_vec(),
                revision: r
            })
        );
        assert!(matches!(
            s.compare_and_swap("absent/k", Expect::Absent, Some(b"second"))
                .await
                .expect("cas"),
            CasOutcome::Conflict(Some(_))
        ));
        // Expecting a revision of a key that does not exist conflicts with None.
        for revision in [0, 1, r] {
            assert_eq!(
                s.compare_and_swap("absent/other", Expect::Revision(revision), Some(b"x"))
                    .await
                    .expect("cas"),
                CasOutcome::Conflict(None),
                "revision {revision} on a missing key"
            );
        }
        assert_eq!(s.get("absent/other").await.expect("get"), None);
    }

    pub async fn cas_delete(b: &Backend) {
        let s = &*b.store;
        let r = s.put("del/k", b"v").await.expect("put");
        let stale = r.saturating_sub(1);
        assert!(matches!(
            s.compare_and_swap("del/k", Expect::Revision(stale), None)
                .await
                .expect("cas"),
            CasOutcome::Conflict(Some(_))
        ));
        assert!(s.get("del/k").await.expect("get").is_some());
        let deleted_at = match s
            .compare_and_swap("del/k", Expect::Revision(r), None)
            .await
            .expect("cas delete")
        {
            CasOutcome::Done(at) => at,
            other => panic!("delete by cas failed: {other:?}"),
        };
        assert!(deleted_at > r);
        assert_eq!(s.get("del/k").await.expect("get"), None);
        assert_eq!(
            s.compare_and_swap("del/k", Expect::Revision(r), None)
                .await
                .expect("cas"),
            CasOutcome::Conflict(None)
        );
        // Deleting what is expected absent is a no-op success.
        assert!(matches!(
            s.compare_and_swap("del/k", Expect::Absent, None)
                .await
                .expect("cas"),
            CasOutcome::Done(_)
        ));
        // And it can be created again from absent.
        assert!(matches!(
            s.compare_and_swap("del/k", Expect::Absent, Some(b"again"))
                .await
                .expect("cas"),
            CasOutcome::Done(_)
        ));
    }

    /// Many tasks, on two handles, read the same revision and race a
    /// compare-and-swap on it: exactly one wins each round.
    pub async fn concurrent_cas_one_winner_per_round(b: &Backend) {
        const TASKS: usize = 8;
        const ROUNDS: u64 = 8;
        let handles = [Arc::clone(&b.store), b.another_handle().await];
        b.store.put("race/k", b"0").await.expect("put");
        let start = Arc::new(tokio::sync::Barrier::new(TASKS));
        let mut tasks = Vec::new();
        for t in 0..TASKS {
            let store = Arc::clone(&handles[t % 2]);
            let start = Arc::clone(&start);
            tasks.push(tokio::spawn(async move {
                let mut wins = Vec::new();
                for round in 0..ROUNDS {
                    let seen = store.get("race/k").await.expect("get").expect("exists");
                    // Everyone has read before anyone writes.
                    start.wait().await;
                    let value = format!("{}", round + 1);
                    let outcome = store
                        .compare_and_swap(
                            "race/k",
                            Expect::Revision(seen.revision),
                            Some(value.as_bytes()),
                        )
                        .await
                        .expect("cas");
                    if matches!(outcome, CasOutcome::Done(_)) {
                        wins.push(round);
                    }
                    // Everyone has written before the next round's read.
                    start.wait().await;
                }
                wins
            }));
        }
        let mut wins_per_round = vec![0; usize::try_from(ROUNDS).expect("small")];
        for task in tasks {
            for round in task.await.expect("task") {
                wins_per_round[usize::try_from(round).expect("small")] += 1;
            }
        }
        assert_eq!(wins_per_round, vec![1; wins_per_round.len()]);
        assert_eq!(
            value_of(&*b.store, "race/k").await,
            Some(ROUNDS.to_string().into_bytes())
        );
    }

    /// Read-modify-CAS increments with retries from many tasks lose no update.
    pub async fn concurrent_increments_lose_nothing(b: &Backend) {
        const TASKS: u64 = 6;
        const EACH: u64 = 8;
        let handles = [Arc::clone(&b.store), b.another_handle().await];
        let mut tasks = Vec::new();
        for t in 0..TASKS {
            let store = Arc::clone(&handles[usize::try_from(t % 2).expect("small")]);
            tasks.push(tokio::spawn(async move {
                for _ in 0..EACH {
                    loop {
                        let current = store.get("counter").await.expect("get");
                        let (expected, n) = match &current {
                            None => (Expect::Absent, 0u64),
                            Some(v) => (
                                Expect::Revision(v.revision),
                                std::str::from_utf8(&v.value)
                                    .expect("utf-8")
                                    .parse()
                                    .expect("number"),
                            ),
                        };
                        let next = (n + 1).to_string();
                        match store
                            .compare_and_swap("counter", expected, Some(next.as_bytes()))
                            .await
                            .expect("cas")
                        {
                            CasOutcome::Done(_) => break,
                            CasOutcome::Conflict(_) => continue,
                        }
                    }
                }
            }));
        }
        for task in tasks {
            task.await.expect("task");
        }
        assert_eq!(
            value_of(&*b.store, "counter").await,
            Some((TASKS * EACH).to_string().into_bytes())
        );
    }

    pub async fn lease_expiry_removes_keys(b: &Backend) {
        let s = &*b.store;
        let lease = s.grant_lease(Duration::from_secs(2)).await.expect("grant");
        s.put_with_lease("live/a", b"a", lease)
            .await
            .expect("put a");
        s.put_with_lease("live/b", b"b", lease)
            .await
            .expect("put b");
        s.put("live/plain", b"p").await.expect("put plain");
        let before = s.current_revision().await.expect("revision");
        assert_eq!(s.list("live/", 10).await.expect("list").len(), 3);
        let gone = eventually(Duration::from_secs(20), || async {
            s.list("live/", 10).await.expect("list").len() == 1
        })
        .await;
        assert!(gone, "keys of an expired lease must disappear");
        assert_eq!(s.get("live/a").await.expect("get"), None);
        assert_eq!(value_of(s, "live/plain").await, Some(b"p".to_vec()));
        assert!(matches!(
            s.keep_alive(lease).await,
            Err(MetaError::LeaseExpired(l)) if l == lease
        ));
        assert!(matches!(
            s.put_with_lease("live/c", b"c", lease).await,
            Err(MetaError::LeaseExpired(_))
        ));
        assert_eq!(s.get("live/c").await.expect("get"), None);
        // The expiry is a change that pollers see.
        let changes = s.changes_since("live/", before, 10).await.expect("changes");
        let deleted: Vec<&str> = changes
            .changes
            .iter()
            .filter(|c| c.current.is_none())
            .map(|c| c.key.as_str())
            .collect();
        assert_eq!(deleted, ["live/a", "live/b"]);
    }

    pub async fn keep_alive_extends(b: &Backend) {
        let s = &*b.store;
        let lease = s.grant_lease(Duration::from_secs(2)).await.expect("grant");
        s.put_with_lease("kept/k", b"v", lease).await.expect("put");
        // Renew for well over the time to live.
        for _ in 0..12 {
            tokio::time::sleep(Duration::from_millis(500)).await;
            s.keep_alive(lease).await.expect("keep alive");
            assert!(
                s.get("kept/k").await.expect("get").is_some(),
                "renewed key vanished"
            );
        }
        // Then stop renewing: it expires.
        let gone = eventually(Duration::from_secs(20), || async {
            s.get("kept/k").await.expect("get").is_none()
        })
        .await;
        assert!(gone, "key must expire once renewals stop");
    }

    pub async fn revoke_removes(b: &Backend) {
        let s = &*b.store;
        let lease = s.grant_lease(Duration::from_secs(60)).await.expect("grant");
        let other = s.grant_lease(Duration::from_secs(60)).await.expect("grant");
        assert_ne!(lease, other);
        s.put_with_lease("rv/a", b"a", lease).await.expect("put");
        s.put_with_lease("rv/b", b"b", other).await.expect("put");
        let before = s.current_revision().await.expect("revision");
        s.revoke_lease(lease).await.expect("revoke");
        assert_eq!(s.get("rv/a").await.expect("get"), None);
        assert!(
            s.get("rv/b").await.expect("get").is_some(),
            "other lease untouched"
        );
        assert!(s.current_revision().await.expect("revision") > before);
        assert!(matches!(
            s.keep_alive(lease).await,
            Err(MetaError::LeaseExpired(_))
        ));
        s.revoke_lease(lease).await.expect("revoking twice is fine");
        s.keep_alive(other).await.expect("other lease alive");
        // A plain put detaches a key from its lease.
        s.put("rv/b", b"plain").await.expect("put");
        s.revoke_lease(other).await.expect("revoke");
        assert_eq!(value_of(s, "rv/b").await, Some(b"plain".to_vec()));
    }

    pub async fn changes_since_reports_net_changes(b: &Backend) {
        let s = &*b.store;
        s.put("ch/a", b"a").await.expect("put");
        s.put("ch/b", b"b").await.expect("put");
        s.put("ch/untouched", b"u").await.expect("put");
        let since = s.current_revision().await.expect("revision");
        s.put("ch/b", b"b2").await.expect("put");
        s.put("ch/b", b"b3").await.expect("put");
        s.put("ch/c", b"c").await.expect("put");
        assert!(s.delete("ch/a").await.expect("delete"));
        s.put("other/x", b"x").await.expect("put");
        let changes = s.changes_since("ch/", since, 10).await.expect("changes");
        assert_eq!(
            changes.revision,
            s.current_revision().await.expect("revision")
        );
        let summary: Vec<(&str, Option<&[u8]>)> = changes
            .changes
            .iter()
            .map(|c| {
                (
                    c.key.as_str(),
                    c.current.as_ref().map(|v| v.value.as_slice()),
                )
            })
            .collect();
        assert_eq!(
            summary,
            [
                ("ch/a", None),
                ("ch/b", Some(&b"b3"[..])),
                ("ch/c", Some(&b"c"[..]))
            ]
        );
        let again = s
            .changes_since("ch/", changes.revision, 10)
            .await
            .expect("changes");
        assert!(again.changes.is_empty());
        assert_eq!(again.revision, changes.revision);
        // From revision 0: everything there is.
        let all = s.changes_since("ch/", 0, 10).await.expect("changes");
        assert!(all.changes.iter().any(|c| c.key == "ch/untouched"));
        assert!(matches!(
            s.changes_since("ch/", since, 1).await,
            Err(MetaError::TooManyChanges { limit: 1, .. })
        ));
    }

    /// A poller that fell behind the kept history is told to list again; one that
    /// is current goes on.
    pub async fn compacted_history_is_reported(b: &Backend) {
        let s = &*b.store;
        let first = s.put("cp/a", b"1").await.expect("put");
        s.put("cp/a", b"2").await.expect("put");
        s.put("cp/b", b"3").await.expect("put");
        b.compact_history().await;
        assert!(matches!(
            s.changes_since("cp/", first - 1, 10).await,
            Err(MetaError::Compacted { .. })
        ));
        let now = s.current_revision().await.expect("revision");
        s.put("cp/c", b"4").await.expect("put");
        let changes = s.changes_since("cp/", now, 10).await.expect("changes");
        let keys: Vec<&str> = changes.changes.iter().map(|c| c.key.as_str()).collect();
        assert_eq!(keys, ["cp/c"]);
        assert_eq!(s.list("cp/", 10).await.expect("list").len(), 3);
    }

    /// Two handles (two processes' worth) see each other's writes and conflicts.
    pub async fn two_handles_share_state(b: &Backend) {
        let one = &*b.store;
        let other_handle = b.another_handle().await;
        let two = &*other_handle;
        let r1 = one.put("shared/k", b"from one").await.expect("put");
        assert_eq!(
            two.get("shared/k").await.expect("get"),
            Some(Versioned {
                value: b"from one".to_vec(),
                revision: r1
            })
        );
        let r2 = two.put("shared/k", b"from two").await.expect("put");
        assert!(r2 > r1);
        assert_eq!(
            one.compare_and_swap("shared/k", Expect::Revision(r1), Some(b"stale"))
                .await
                .expect("cas"),
            CasOutcome::Conflict(Some(Versioned {
                value: b"from two".to_vec(),
                revision: r2
            }))
        );
        assert!(matches!(
            one.compare_and_swap("shared/k", Expect::Revision(r2), Some(b"fresh"))
                .await
                .expect("cas"),
            CasOutcome::Done(_)
        ));
        assert_eq!(value_of(two, "shared/k").await, Some(b"fresh".to_vec()));
        // A lease granted on one handle can be used and revoked on the other.
        let lease = one
            .grant_lease(Duration::from_secs(60))
            .await
            .expect("grant");
        two.put_with_lease("shared/leased", b"x", lease)
            .await
            .expect("put with lease");
        two.keep_alive(lease).await.expect("keep alive");
        one.revoke_lease(lease).await.expect("revoke");
        assert_eq!(two.get("shared/leased").await.expect("get"), None);
    }
}

/// Instantiate every property for one backend.
macro_rules! conformance {
    ($backend:ident, $open:path) => {
        mod $backend {
            conformance!(@tests $open;
                put_get_list,
                revisions_increase,
                cas_success_and_conflict,
                cas_from_absent,
                cas_delete,
                concurrent_cas_one_winner_per_round,
                concurrent_increments_lose_nothing,
                lease_expiry_removes_keys,
                keep_alive_extends,
                revoke_removes,
                changes_since_reports_net_changes,
                compacted_history_is_reported,
                two_handles_share_state,
            );
        }
    };
    (@tests $open:path; $($property:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $property() {
                let backend = $open().await;
                crate::properties::$property(&backend).await;
            }
        )*
    };
}

conformance!(embedded, crate::support::Backend::embedded);
conformance!(etcd, crate::support::Backend::etcd);

/// Embedded only: everything written is there after the store is closed and opened
/// again (a node process restart), revisions and leases included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_durable_across_reopen() {
    let backend = Backend::embedded().await;
    let path = backend.embedded_path().expect("embedded").to_path_buf();
    let store = &backend.store;
    store.put("d/plain", b"p").await.expect("put");
    let created = store
        .compare_and_swap("d/cas", Expect::Absent, Some(b"c"))
        .await
        .expect("cas");
    assert!(matches!(created, CasOutcome::Done(_)));
    let lease = store
        .grant_lease(Duration::from_secs(60))
        .await
        .expect("grant");
    store
        .put_with_lease("d/leased", b"l", lease)
        .await
        .expect("put with lease");
    let revision = store.current_revision().await.expect("revision");
    let listing = store.list("d/", 10).await.expect("list");
    drop(backend.store);

    let reopened = trireme_meta::EmbeddedStore::open(&path)
        .await
        .expect("reopen");
    assert_eq!(
        reopened.current_revision().await.expect("revision"),
        revision
    );
    assert_eq!(reopened.list("d/", 10).await.expect("list"), listing);
    reopened.keep_alive(lease).await.expect("lease survives");
    let next = reopened.put("d/after", b"a").await.expect("put");
    assert!(next > revision, "revisions keep increasing across reopen");
}
