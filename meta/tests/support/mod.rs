//! Test backends: a fresh embedded store in a temporary directory, or a real etcd
//! started on loopback for the test and killed when it ends.
#![allow(dead_code, reason = "each test file uses part of this module")]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use trireme_meta::{EmbeddedStore, EtcdStore, MetaStore};

/// How long etcd may take to answer after it was started.
const ETCD_START_TIMEOUT: Duration = Duration::from_secs(30);

/// A store under test and what keeps it alive.
#[derive(Debug)]
pub struct Backend {
    pub store: Arc<dyn MetaStore>,
    kind: Kind,
}

#[derive(Debug)]
enum Kind {
    Embedded {
        path: PathBuf,
        _dir: tempfile::TempDir,
    },
    Etcd {
        etcd: LocalEtcd,
        namespace: String,
    },
}

impl Backend {
    /// A fresh SQLite store.
    pub async fn embedded() -> Backend {
        let dir = tempfile::tempdir().expect("creating a temporary directory");
        let path = dir.path().join("meta.sqlite");
        let store = EmbeddedStore::open(&path)
            .await
            .expect("opening the embedded store");
        Backend {
            store: Arc::new(store),
            kind: Kind::Embedded { path, _dir: dir },
        }
    }

    /// A store on a fresh etcd of its own.
    pub async fn etcd() -> Backend {
        let etcd = LocalEtcd::start().await;
        let namespace = "/trireme-test/".to_owned();
        let store = EtcdStore::connect(&[etcd.endpoint.as_str()], &namespace)
            .await
            .expect("connecting to the test etcd");
        Backend {
            store: Arc::new(store),
            kind: Kind::Etcd { etcd, namespace },
        }
    }

    /// A second, independent handle on the same data (another process's view: a
    /// second SQLite connection, or a second etcd client).
    pub async fn another_handle(&self) -> Arc<dyn MetaStore> {
        match &self.kind {
            Kind::Embedded { path, .. } => Arc::new(
                EmbeddedStore::open(path)
                    .await
                    .expect("opening the embedded store again"),
            ),
            Kind::Etcd { etcd, namespace } => Arc::new(
                EtcdStore::connect(&[etcd.endpoint.as_str()], namespace)
                    .await
                    .expect("connecting to the test etcd again"),
            ),
        }
    }

    /// Make the store forget the change history before its current revision: an etcd
    /// compaction, or a one-revision history for the embedded store.
    pub async fn compact_history(&self) {
        match &self.kind {
            Kind::Embedded { path, .. } => {
                let store = EmbeddedStore::open(path).await.expect("opening the store");
                store
                    .set_history_kept(1)
                    .await
                    .expect("setting the history kept");
                // The history is trimmed as writes go on.
                for _ in 0..2 {
                    store.put("compaction/tick", b"t").await.expect("put");
                }
            }
            Kind::Etcd { etcd, .. } => {
                let revision = self.store.current_revision().await.expect("revision");
                let mut client = etcd_client::Client::connect([etcd.endpoint.as_str()], None)
                    .await
                    .expect("connecting to the test etcd");
                client
                    .compact(i64::try_from(revision).expect("revision fits"), None)
                    .await
                    .expect("compacting etcd");
            }
        }
    }

    /// The SQLite file of an embedded backend.
    pub fn embedded_path(&self) -> Option<&Path> {
        match &self.kind {
            Kind::Embedded { path, .. } => Some(path),
            Kind::Etcd { .. } => None,
        }
    }

    /// The etcd of an etcd backend.
    pub fn etcd_endpoint(&self) -> Option<&str> {
        match &self.kind {
            Kind::Embedded { .. } => None,
            Kind::Etcd { etcd, .. } => Some(&etcd.endpoint),
        }
    }
}

/// A single-member etcd on loopback, in a temporary data directory, killed on drop.
#[derive(Debug)]
pub struct LocalEtcd {
    child: Child,
    pub endpoint: String,
    dir: tempfile::TempDir,
}

fn etcd_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("TRIREME_ETCD") {
        let path = PathBuf::from(path);
        assert!(
            path.is_file(),
            "TRIREME_ETCD names {}, which is not a file: the etcd backend tests need a \
             real etcd binary",
            path.display()
        );
        return path;
    }
    let candidates = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .unwrap_or_default();
    candidates
        .into_iter()
        .chain([PathBuf::from("/usr/bin")])
        .map(|dir| dir.join("etcd"))
        .find(|path| path.is_file())
        .unwrap_or_else(|| {
            panic!(
                "the etcd binary was not found on PATH or in /usr/bin: the etcd backend \
                 tests need a real etcd. Install Debian's etcd-server package \
                 (scripts/install-deps.sh does, and .ci/run runs it), or set TRIREME_ETCD."
            )
        })
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("finding a free loopback port")
        .port()
}

impl LocalEtcd {
    /// Start etcd and wait until it answers. Panics (fails the test) when it cannot.
    pub async fn start() -> LocalEtcd {
        let binary = etcd_binary();
        let mut last_log = String::new();
        // A port picked here may be taken by another test before etcd binds it: retry.
        for _ in 0..3 {
            let dir = tempfile::tempdir().expect("creating etcd's temporary directory");
            let (client, peer) = (free_port(), free_port());
            let endpoint = format!("http://127.0.0.1:{client}");
            let peer_url = format!("http://127.0.0.1:{peer}");
            let log = std::fs::File::create(dir.path().join("etcd.log"))
                .expect("creating etcd's log file");
            let child = Command::new(&binary)
                .arg("--data-dir")
                .arg(dir.path().join("data"))
                .args(["--name", "default"])
                .args(["--listen-client-urls", &endpoint])
                .args(["--advertise-client-urls", &endpoint])
                .args(["--listen-peer-urls", &peer_url])
                .args(["--initial-advertise-peer-urls", &peer_url])
                .args(["--initial-cluster", &format!("default={peer_url}")])
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("sharing etcd's log file"))
                .stderr(log)
                .spawn()
                .unwrap_or_else(|e| panic!("starting {}: {e}", binary.display()));
            let mut etcd = LocalEtcd {
                child,
                endpoint,
                dir,
            };
            if etcd.wait_until_ready().await {
                return etcd;
            }
            last_log = etcd.log();
        }
        panic!("etcd did not start; its last log:\n{last_log}");
    }

    /// Whether etcd answers before the timeout (false if it exited).
    async fn wait_until_ready(&mut self) -> bool {
        let deadline = Instant::now() + ETCD_START_TIMEOUT;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return false;
            }
            if let Ok(store) = EtcdStore::connect(&[self.endpoint.as_str()], "/").await
                && store.current_revision().await.is_ok()
            {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("etcd.log")).unwrap_or_default()
    }
}

impl Drop for LocalEtcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Poll `check` every 100 ms until it holds or `limit` passes; whether it held.
pub async fn eventually<F, Fut>(limit: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
