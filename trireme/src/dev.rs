//! `trireme dev up|status|down`: a development cluster of node processes on loopback.

use std::fs;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::json;

use crate::admin_client::AdminClient;
use crate::cluster::{
    ADMIN_PORT_OFFSET, ClusterDir, ClusterFile, NodeConfig, NodeEntry, write_atomic,
};

/// How long `dev up` waits for a node to answer.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long `dev down` waits for a node to stop after SIGTERM before SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);

const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// The pid of a node's process if it is alive (a zombie is dead).
pub fn running_pid(dir: &ClusterDir, node: &str) -> Option<u32> {
    let pid: u32 = fs::read_to_string(dir.pid_file(node))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let state = status
        .lines()
        .find_map(|l| l.strip_prefix("State:"))?
        .trim();
    if state.starts_with('Z') || state.starts_with('X') {
        return None;
    }
    // The pid may have been reused by another program after a crash.
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let config = fs::canonicalize(dir.node_config(node)).ok()?;
    let wanted = config.to_string_lossy();
    cmdline
        .split(|b| *b == 0)
        .any(|arg| String::from_utf8_lossy(arg) == wanted)
        .then_some(pid)
}

fn node_entry(i: u16, base_port: u16) -> Result<NodeEntry> {
    let nbd_port = base_port
        .checked_add(i - 1)
        .context("--base-port too high for this many nodes")?;
    let admin_port = nbd_port
        .checked_add(ADMIN_PORT_OFFSET)
        .context("--base-port too high: admin port overflows")?;
    Ok(NodeEntry {
        name: format!("node{i}"),
        datacenter: format!("dc{i}"),
        nbd: SocketAddr::new(LOOPBACK, nbd_port),
        admin: SocketAddr::new(LOOPBACK, admin_port),
    })
}

/// Start the cluster's nodes (creating the cluster folder if needed); running nodes
/// are left alone, stopped ones restarted.
pub fn up(dir: &ClusterDir, nodes: Option<u16>, base_port: Option<u16>) -> Result<()> {
    fs::create_dir_all(dir.root()).with_context(|| format!("creating {}", dir.root().display()))?;
    if engine::master_key::create_if_missing(&dir.master_key())? {
        println!("created master key {}", dir.master_key().display());
    }
    let mut cluster = if dir.cluster_file().exists() {
        dir.load()?
    } else {
        ClusterFile::default()
    };
    let wanted = nodes.unwrap_or_else(|| u16::try_from(cluster.nodes.len()).unwrap_or(1).max(1));
    if wanted == 0 {
        bail!("--nodes must be at least 1");
    }
    if wanted > 1 {
        bail!(
            "--nodes {wanted}: this build runs single-node clusters; replication across nodes is not built yet"
        );
    }
    let base = match (base_port, cluster.nodes.first()) {
        (Some(p), Some(first)) if p != first.nbd.port() => bail!(
            "cluster at {} already uses base port {}; `dev down` and remove the folder to change it",
            dir.root().display(),
            first.nbd.port()
        ),
        (Some(p), _) => p,
        (None, Some(first)) => first.nbd.port(),
        (None, None) => 10809,
    };
    let existing = u16::try_from(cluster.nodes.len()).unwrap_or(u16::MAX);
    for i in existing + 1..=wanted {
        cluster.nodes.push(node_entry(i, base)?);
    }
    dir.save(&cluster)?;

    let exe = std::env::current_exe().context("finding the trireme binary")?;
    let mut started = Vec::new();
    for node in &cluster.nodes {
        if let Some(pid) = running_pid(dir, &node.name) {
            println!("{} already running (pid {pid})", node.name);
            continue;
        }
        start_node(dir, node, &exe)?;
        started.push(node);
    }
    for node in started {
        wait_ready(dir, node)?;
        let pid = running_pid(dir, &node.name).unwrap_or(0);
        println!(
            "{} started (pid {pid}): nbd://{}/  admin http://{}",
            node.name, node.nbd, node.admin
        );
    }
    Ok(())
}

fn start_node(dir: &ClusterDir, node: &NodeEntry, exe: &Path) -> Result<()> {
    let node_dir = dir.node_dir(&node.name);
    fs::create_dir_all(&node_dir).with_context(|| format!("creating {}", node_dir.display()))?;
    let root = fs::canonicalize(dir.root())?;
    let config = NodeConfig {
        name: node.name.clone(),
        datacenter: node.datacenter.clone(),
        nbd_listen: node.nbd,
        nbd_unix_socket: Some(root.join(&node.name).join("nbd.sock")),
        admin_listen: node.admin,
        data_dir: root.join(&node.name).join("store"),
        master_key: root.join("master.key"),
        tls_cert: None,
        tls_key: None,
        direct_io: true,
    };
    let config_path = root.join(&node.name).join("node.json");
    write_atomic(&config_path, &serde_json::to_vec_pretty(&config)?)?;
    let _ = fs::remove_file(dir.pid_file(&node.name));
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.log_file(&node.name))
        .with_context(|| format!("opening {}", dir.log_file(&node.name).display()))?;
    let mut cmd = Command::new(exe);
    cmd.arg("node")
        .arg("run")
        .arg("--config")
        .arg(&config_path)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        // Its own process group: the node outlives the shell that ran `dev up`, and a
        // Ctrl-C there does not reach it.
        .process_group(0);
    let child = cmd
        .spawn()
        .with_context(|| format!("starting {}", node.name))?;
    // Written here too so `dev status` sees the pid before the node writes it itself.
    write_atomic(&dir.pid_file(&node.name), child.id().to_string().as_bytes())?;
    Ok(())
}

fn wait_ready(dir: &ClusterDir, node: &NodeEntry) -> Result<()> {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if AdminClient::is_up(node.admin, Duration::from_secs(2)) {
            return Ok(());
        }
        if running_pid(dir, &node.name).is_none() {
            bail!(
                "{} exited during start; see {}:\n{}",
                node.name,
                dir.log_file(&node.name).display(),
                tail(&dir.log_file(&node.name), 10)
            );
        }
        if Instant::now() > deadline {
            bail!(
                "{} did not answer within {START_TIMEOUT:?}; see {}",
                node.name,
                dir.log_file(&node.name).display()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn tail(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Print each node's state.
pub fn status(dir: &ClusterDir, as_json: bool) -> Result<()> {
    let cluster = dir.load()?;
    let rows: Vec<_> = cluster
        .nodes
        .iter()
        .map(|n| {
            let pid = running_pid(dir, &n.name);
            json!({
                "name": n.name,
                "datacenter": n.datacenter,
                "pid": pid,
                "running": pid.is_some(),
                "nbd": n.nbd.to_string(),
                "nbd_uri": format!("nbd://{}/", n.nbd),
                "nbd_unix_socket": dir.node_dir(&n.name).join("nbd.sock"),
                "admin": n.admin.to_string(),
                "data": dir.node_dir(&n.name),
            })
        })
        .collect();
    if as_json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({ "nodes": rows }))?
        );
        return Ok(());
    }
    println!(
        "{:<8} {:<6} {:<9} {:<8} {:<22} ADMIN",
        "NODE", "DC", "STATE", "PID", "NBD"
    );
    for r in &rows {
        let pid = r["pid"]
            .as_u64()
            .map(|p| p.to_string())
            .unwrap_or_else(|| "-".into());
        let state = if r["running"].as_bool() == Some(true) {
            "running"
        } else {
            "stopped"
        };
        println!(
            "{:<8} {:<6} {:<9} {:<8} {:<22} {}",
            r["name"].as_str().unwrap_or(""),
            r["datacenter"].as_str().unwrap_or(""),
            state,
            pid,
            r["nbd"].as_str().unwrap_or(""),
            r["admin"].as_str().unwrap_or("")
        );
    }
    Ok(())
}

/// Stop every node: SIGTERM, then SIGKILL after a grace period.
pub fn down(dir: &ClusterDir) -> Result<()> {
    let cluster = dir.load()?;
    for n in &cluster.nodes {
        let Some(pid) = running_pid(dir, &n.name) else {
            println!("{} not running", n.name);
            continue;
        };
        let ipid = i32::try_from(pid).context("pid out of range")?;
        // SAFETY: kill(2) with a pid we read and checked belongs to this node's process;
        // it has no memory-safety preconditions.
        unsafe { libc::kill(ipid, libc::SIGTERM) };
        let deadline = Instant::now() + STOP_TIMEOUT;
        while running_pid(dir, &n.name).is_some() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        if running_pid(dir, &n.name).is_some() {
            // SAFETY: as above.
            unsafe { libc::kill(ipid, libc::SIGKILL) };
            println!("{} did not stop in {STOP_TIMEOUT:?}; killed", n.name);
        } else {
            println!("{} stopped", n.name);
        }
        let _ = fs::remove_file(dir.pid_file(&n.name));
    }
    Ok(())
}
