//! `trireme cluster …`: the cluster's trust material for clusters spanning hosts.
//!
//! `cluster init` creates the cluster CA (DIR/ca.crt, DIR/ca.key) and the master key;
//! `cluster issue-cert NODE` signs a node's certificate with that CA. The CA key and the
//! master key stay on the admin host; a node gets its own certificate and key and the
//! CA certificate (to verify its peers), never the CA key.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use transport::ClusterCa;

use crate::cluster::ClusterDir;

#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Create the cluster CA (DIR/ca.crt, DIR/ca.key) and the master key
    /// (DIR/master.key). Refused if a CA already exists.
    Init,
    /// Issue a node's certificate (signed by the cluster CA): writes NODE.crt, NODE.key
    /// and ca.crt into the output folder.
    IssueCert {
        /// Node name (lowercase letters, digits and '-'; at most 63).
        node: String,
        /// Folder to write into (default DIR/<node>/tls).
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

fn ca_cert(dir: &ClusterDir) -> PathBuf {
    dir.root().join("ca.crt")
}

fn ca_key(dir: &ClusterDir) -> PathBuf {
    dir.root().join("ca.key")
}

pub fn run(dir: &ClusterDir, cmd: ClusterCommand) -> Result<()> {
    match cmd {
        ClusterCommand::Init => init(dir),
        ClusterCommand::IssueCert { node, out } => {
            let out = out.unwrap_or_else(|| dir.node_dir(&node).join("tls"));
            issue(dir, &node, &out)
        }
    }
}

fn init(dir: &ClusterDir) -> Result<()> {
    if ca_cert(dir).exists() || ca_key(dir).exists() {
        bail!(
            "cluster at {} already has a CA ({}); refusing to replace it",
            dir.root().display(),
            ca_cert(dir).display()
        );
    }
    std::fs::create_dir_all(dir.root())
        .with_context(|| format!("creating {}", dir.root().display()))?;
    if engine::master_key::create_if_missing(&dir.master_key())? {
        println!("created master key {}", dir.master_key().display());
    }
    let ca = ClusterCa::create().context("creating the cluster CA")?;
    // The key first: a CA certificate without its key would block a retry.
    write(&ca_key(dir), ca.key_pem().as_bytes(), 0o600)?;
    write(&ca_cert(dir), ca.cert_pem().as_bytes(), 0o644)?;
    println!(
        "created cluster CA {} (key {}, mode 0600)",
        ca_cert(dir).display(),
        ca_key(dir).display()
    );
    Ok(())
}

fn issue(dir: &ClusterDir, node: &str, out: &Path) -> Result<()> {
    let read = |p: PathBuf| {
        std::fs::read(&p).with_context(|| {
            format!(
                "reading {} (run `trireme --cluster {} cluster init` first)",
                p.display(),
                dir.root().display()
            )
        })
    };
    let ca = ClusterCa::load(&read(ca_cert(dir))?, &read(ca_key(dir))?)
        .context("loading the cluster CA")?;
    let identity = ca
        .issue_node(node)
        .with_context(|| format!("issuing a certificate for node {node:?}"))?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let cert = out.join(format!("{node}.crt"));
    let key = out.join(format!("{node}.key"));
    write(&key, identity.key_pem().as_bytes(), 0o600)?;
    write(&cert, identity.cert_pem().as_bytes(), 0o644)?;
    write(&out.join("ca.crt"), ca.cert_pem().as_bytes(), 0o644)?;
    println!(
        "issued certificate for node {node}: {} (key {}, CA {})",
        cert.display(),
        key.display(),
        out.join("ca.crt").display()
    );
    Ok(())
}

fn write(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    engine::crashsafe::write_file(path, bytes, mode)
        .with_context(|| format!("writing {}", path.display()))
}
