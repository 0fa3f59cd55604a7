//! The cluster folder: which nodes exist, where they listen, where their data lives.
//!
//! ```text
//! DIR/cluster.json      nodes: name, datacenter, NBD and admin addresses
//! DIR/master.key        the cluster master key (mode 0600)
//! DIR/<node>/node.json  the node's own config (what `node run --config` reads)
//! DIR/<node>/store/     the node's block store
//! DIR/<node>/node.pid   pid of the running node process
//! DIR/<node>/node.log   its log
//! DIR/<node>/nbd.sock   NBD on a Unix socket
//! ```

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// Offset of a node's admin port from its NBD port.
pub const ADMIN_PORT_OFFSET: u16 = 1000;

/// A node as the cluster file lists it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeEntry {
    /// Name (`node1`, ...).
    pub name: String,
    /// Datacenter label.
    pub datacenter: String,
    /// NBD listen address.
    pub nbd: SocketAddr,
    /// Admin API listen address.
    pub admin: SocketAddr,
}

/// The cluster file.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ClusterFile {
    /// Nodes in order.
    pub nodes: Vec<NodeEntry>,
}

/// A node's own configuration, read by `trireme node run --config FILE`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeConfig {
    /// Name.
    pub name: String,
    /// Datacenter label.
    pub datacenter: String,
    /// NBD TCP listen address.
    pub nbd_listen: SocketAddr,
    /// NBD Unix socket path (optional).
    #[serde(default)]
    pub nbd_unix_socket: Option<PathBuf>,
    /// Admin API listen address (loopback).
    pub admin_listen: SocketAddr,
    /// Block store folder.
    pub data_dir: PathBuf,
    /// Cluster master key file.
    pub master_key: PathBuf,
    /// NBD TLS: certificate chain (PEM). With `tls_key`, exports require TLS.
    #[serde(default)]
    pub tls_cert: Option<PathBuf>,
    /// NBD TLS: private key (PEM).
    #[serde(default)]
    pub tls_key: Option<PathBuf>,
    /// Use O_DIRECT for data files where the filesystem allows it.
    #[serde(default = "default_true")]
    pub direct_io: bool,
}

fn default_true() -> bool {
    true
}

/// Paths inside a cluster folder.
#[derive(Debug, Clone)]
pub struct ClusterDir {
    root: PathBuf,
}

impl ClusterDir {
    /// The cluster folder at `root` (it may not exist yet).
    pub fn new(root: &Path) -> Self {
        ClusterDir {
            root: root.to_path_buf(),
        }
    }

    /// The folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The cluster file.
    pub fn cluster_file(&self) -> PathBuf {
        self.root.join("cluster.json")
    }

    /// The master key file.
    pub fn master_key(&self) -> PathBuf {
        self.root.join("master.key")
    }

    /// A node's folder.
    pub fn node_dir(&self, node: &str) -> PathBuf {
        self.root.join(node)
    }

    /// A node's pid file.
    pub fn pid_file(&self, node: &str) -> PathBuf {
        self.node_dir(node).join("node.pid")
    }

    /// A node's log.
    pub fn log_file(&self, node: &str) -> PathBuf {
        self.node_dir(node).join("node.log")
    }

    /// A node's config file.
    pub fn node_config(&self, node: &str) -> PathBuf {
        self.node_dir(node).join("node.json")
    }

    /// Read the cluster file; a clear error when the folder holds no cluster.
    pub fn load(&self) -> Result<ClusterFile> {
        let path = self.cluster_file();
        let bytes = fs::read(&path).with_context(|| {
            format!(
                "no cluster at {} (run `trireme --cluster {} dev up` first)",
                self.root.display(),
                self.root.display()
            )
        })?;
        serde_json::from_slice(&bytes).with_context(|| format!("reading {}", path.display()))
    }

    /// Write the cluster file crash-safely.
    pub fn save(&self, cluster: &ClusterFile) -> Result<()> {
        write_atomic(&self.cluster_file(), &serde_json::to_vec_pretty(cluster)?)
    }
}

/// Write a file crash-safely (temporary file, fsync, rename, fsync of the folder).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    engine::crashsafe::write_file(path, bytes, 0o644)
        .with_context(|| format!("writing {}", path.display()))
}
