//! The embedded store shared by real processes, as the node processes of one host
//! share it: this test re-runs its own binary as children that race compare-and-swap
//! increments on one SQLite file with the parent.

use std::process::{Command, Stdio};
use std::time::Duration;

use trireme_meta::{CasOutcome, EmbeddedStore, Expect, MetaStore};

/// Set in a child: the database to work on, and the child's number.
const CHILD_DB: &str = "TRIREME_META_TEST_CHILD_DB";
const CHILD_ID: &str = "TRIREME_META_TEST_CHILD_ID";
const CHILDREN: usize = 3;
const INCREMENTS: u64 = 20;

async fn increment(store: &EmbeddedStore) {
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
        if let CasOutcome::Done(_) = store
            .compare_and_swap("counter", expected, Some(next.as_bytes()))
            .await
            .expect("cas")
        {
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_store_shared_by_processes() {
    if let Some(path) = std::env::var_os(CHILD_DB) {
        // Child: increments, then registers itself under a lease it leaves behind.
        let id = std::env::var(CHILD_ID).expect("child id");
        let store = EmbeddedStore::open(&path).await.expect("child opens");
        for _ in 0..INCREMENTS {
            increment(&store).await;
        }
        let lease = store
            .grant_lease(Duration::from_secs(60))
            .await
            .expect("grant");
        store
            .put_with_lease(&format!("proc/{id}"), id.as_bytes(), lease)
            .await
            .expect("register");
        return;
    }

    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("shared.sqlite");
    let store = EmbeddedStore::open(&path).await.expect("open");
    let exe = std::env::current_exe().expect("test binary");
    let mut children = Vec::new();
    for id in 0..CHILDREN {
        children.push(
            Command::new(&exe)
                .args([
                    "--exact",
                    "embedded_store_shared_by_processes",
                    "--test-threads=1",
                ])
                .env(CHILD_DB, &path)
                .env(CHILD_ID, id.to_string())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("starting a child process"),
        );
    }
    for _ in 0..INCREMENTS {
        increment(&store).await;
    }
    for child in children {
        let output = tokio::task::spawn_blocking(move || child.wait_with_output())
            .await
            .expect("join")
            .expect("waiting for a child");
        assert!(
            output.status.success(),
            "child failed: {}\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let total = INCREMENTS * u64::try_from(CHILDREN + 1).expect("small");
    assert_eq!(
        store.get("counter").await.expect("get").map(|v| v.value),
        Some(total.to_string().into_bytes()),
        "no increment lost across processes"
    );
    let registered = store.list("proc/", 10).await.expect("list");
    assert_eq!(registered.len(), CHILDREN);
}
