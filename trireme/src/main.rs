//! `trireme`: the storage admin CLI and the node daemon.

mod admin_api;
mod admin_client;
mod cluster;
mod cluster_cmd;
mod dev;
mod image_cmd;
mod nbd_export;
mod node;
mod snapshot_cmd;
mod volume_cmd;

use std::path::PathBuf;

/// mimalloc instead of glibc's malloc: the I/O path allocates a 4 KiB-aligned block
/// buffer per block, where glibc spent about 12% of a node's CPU during an import
/// (`perf`); see the README's import benchmark.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use anyhow::Result;
use clap::{Parser, Subcommand};

use crate::cluster::ClusterDir;

/// Trireme: replicated, encrypted block storage for VM disks, served over NBD.
#[derive(Debug, Parser)]
#[command(name = "trireme", version, propagate_version = true)]
struct Cli {
    /// The cluster folder: cluster file, master key, and each node's data.
    #[arg(
        long,
        global = true,
        env = "TRIREME_CLUSTER",
        default_value = "./trireme-dev"
    )]
    cluster: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// A development cluster of node processes on loopback.
    #[command(subcommand)]
    Dev(DevCommand),
    /// The cluster's CA and node certificates, for clusters spanning hosts.
    #[command(subcommand)]
    Cluster(cluster_cmd::ClusterCommand),
    /// Run one storage node in the foreground.
    #[command(subcommand)]
    Node(NodeCommand),
    /// Create, list, inspect, resize, clone and delete volumes.
    #[command(subcommand)]
    Volume(volume_cmd::VolumeCommand),
    /// Create, list, delete and roll back to snapshots of volumes.
    #[command(subcommand)]
    Snapshot(snapshot_cmd::SnapshotCommand),
    /// Create, list and delete tenants (each has its own encryption key).
    #[command(subcommand)]
    Tenant(volume_cmd::TenantCommand),
}

#[derive(Debug, Subcommand)]
enum DevCommand {
    /// Create the cluster folder if needed and start its nodes in the background.
    /// Running nodes are left alone; stopped ones are restarted.
    Up {
        /// Number of nodes (node1…nodeN, in dc1…dcN).
        #[arg(long)]
        nodes: Option<u16>,
        /// NBD port of node1; node i listens on P+i-1, its admin API on P+i-1+1000.
        #[arg(long)]
        base_port: Option<u16>,
    },
    /// Show each node: datacenter, pid, NBD and admin addresses.
    Status {
        /// Print JSON: {"nodes":[{"name","datacenter","pid","nbd",…}]}.
        #[arg(long)]
        json: bool,
    },
    /// Stop every node (SIGTERM, then SIGKILL after 15 s).
    Down,
}

#[derive(Debug, Subcommand)]
enum NodeCommand {
    /// Run a node with the given config file until SIGTERM or SIGINT.
    Run {
        /// The node's config (JSON; `dev up` writes DIR/<node>/node.json).
        #[arg(long)]
        config: PathBuf,
    },
}

fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("TRIREME_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
}

fn run(cli: Cli) -> Result<()> {
    let dir = ClusterDir::new(&cli.cluster);
    match cli.command {
        Command::Dev(DevCommand::Up { nodes, base_port }) => dev::up(&dir, nodes, base_port),
        Command::Dev(DevCommand::Status { json }) => dev::status(&dir, json),
        Command::Dev(DevCommand::Down) => dev::down(&dir),
        Command::Node(NodeCommand::Run { config }) => {
            init_logging();
            node::run(&config)
        }
        Command::Cluster(cmd) => cluster_cmd::run(&dir, cmd),
        Command::Volume(cmd) => volume_cmd::volume(&dir, cmd),
        Command::Snapshot(cmd) => snapshot_cmd::snapshot(&dir, cmd),
        Command::Tenant(cmd) => volume_cmd::tenant(&dir, cmd),
    }
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        // One line naming the cause, then the chain of context on the same line.
        let chain: Vec<String> = e.chain().map(|c| c.to_string()).collect();
        eprintln!("error: {}", chain.join(": "));
        std::process::exit(1);
    }
}
