//! `trireme node run`: one storage node — the engine, the NBD server (TCP and Unix
//! socket) and the admin API — until SIGTERM or SIGINT.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use engine::{Engine, master_key};
use nbd_server::{Catalog, ServerConfig, Shutdown, Tls};
use replica::StoreOptions;
use tokio::signal::unix::{SignalKind, signal};

use crate::admin_api::{self, AdminState};
use crate::cluster::{NodeConfig, write_atomic};
use crate::nbd_export::VolumeCatalog;

/// How long shutdown waits for connections to finish before giving up on them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Read a node config file.
pub fn load_config(path: &Path) -> Result<NodeConfig> {
    let bytes =
        std::fs::read(path).with_context(|| format!("reading node config {}", path.display()))?;
    serde_json::from_slice(&bytes)
        .with_context(|| format!("parsing node config {}", path.display()))
}

fn tls_config(cfg: &NodeConfig) -> Result<Option<Arc<rustls::ServerConfig>>> {
    let (Some(cert), Some(key)) = (&cfg.tls_cert, &cfg.tls_key) else {
        return Ok(None);
    };
    let certs = rustls_pemfile::certs(&mut std::io::BufReader::new(
        std::fs::File::open(cert).with_context(|| format!("opening {}", cert.display()))?,
    ))
    .collect::<Result<Vec<_>, _>>()
    .with_context(|| format!("reading certificates from {}", cert.display()))?;
    let key = rustls_pemfile::private_key(&mut std::io::BufReader::new(
        std::fs::File::open(key).with_context(|| format!("opening {}", key.display()))?,
    ))
    .with_context(|| format!("reading private key from {}", key.display()))?
    .with_context(|| format!("no private key in {}", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("loading the NBD TLS certificate")?;
    Ok(Some(Arc::new(config)))
}

/// Run a node until it is told to stop.
pub fn run(config_path: &Path) -> Result<()> {
    let cfg = load_config(config_path)?;
    let master = master_key::load(&cfg.master_key).context("loading the cluster master key")?;
    let options = StoreOptions {
        direct_io: cfg.direct_io,
        ..StoreOptions::default()
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("trireme-node")
        .build()?;
    // Opened inside the runtime: the store's io_uring is reaped by a task on it.
    let engine = {
        let _runtime = runtime.enter();
        Arc::new(
            Engine::open(&cfg.data_dir, master, options).with_context(|| {
                format!("opening the block store in {}", cfg.data_dir.display())
            })?,
        )
    };
    runtime.block_on(serve(cfg, config_path, engine))
}

async fn serve(cfg: NodeConfig, config_path: &Path, engine: Arc<Engine>) -> Result<()> {
    engine
        .reconcile()
        .await
        .context("reconciling the catalog with the block store")?;
    let tls = tls_config(&cfg)?;
    let nbd_config = Arc::new(ServerConfig {
        tls: match tls {
            Some(config) => Tls::Required(config),
            None => Tls::Disabled,
        },
        ..ServerConfig::default()
    });
    let catalog: Arc<dyn Catalog> = Arc::new(VolumeCatalog::new(engine.clone()));
    let shutdown = Shutdown::new();

    let tcp = tokio::net::TcpListener::bind(cfg.nbd_listen)
        .await
        .with_context(|| format!("listening for NBD on {}", cfg.nbd_listen))?;
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(nbd_server::serve_tcp(
        tcp,
        catalog.clone(),
        nbd_config.clone(),
        shutdown.clone(),
    ));
    if let Some(sock) = &cfg.nbd_unix_socket {
        let _ = std::fs::remove_file(sock);
        let unix = tokio::net::UnixListener::bind(sock)
            .with_context(|| format!("listening for NBD on {}", sock.display()))?;
        tasks.spawn(nbd_server::serve_unix(
            unix,
            catalog.clone(),
            nbd_config.clone(),
            shutdown.clone(),
        ));
    }

    let admin = tokio::net::TcpListener::bind(cfg.admin_listen)
        .await
        .with_context(|| format!("listening for the admin API on {}", cfg.admin_listen))?;
    let router = admin_api::router(AdminState {
        engine: engine.clone(),
        node: cfg.name.clone(),
        datacenter: cfg.datacenter.clone(),
    });
    let admin_shutdown = shutdown.clone();
    tasks.spawn(async move {
        axum::serve(admin, router)
            .with_graceful_shutdown(async move { admin_shutdown.wait().await })
            .await
    });

    let pid_file = config_path.with_file_name("node.pid");
    write_atomic(&pid_file, std::process::id().to_string().as_bytes())?;
    tracing::info!(node = %cfg.name, nbd = %cfg.nbd_listen, admin = %cfg.admin_listen, "node ready");

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
        Some(res) = tasks.join_next() => {
            tracing::error!(?res, "a listener stopped; shutting down");
        }
    }
    shutdown.trigger();
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while let Some(res) = tasks.join_next().await {
            if let Ok(Err(e)) = res {
                tracing::warn!(error = %e, "listener ended with an error");
            }
        }
    })
    .await;
    if drained.is_err() {
        tracing::warn!("connections still open after {SHUTDOWN_GRACE:?}; closing them");
        tasks.abort_all();
    }
    engine
        .store()
        .sync()
        .await
        .context("syncing the block store at shutdown")?;
    let _ = std::fs::remove_file(&pid_file);
    if let Some(sock) = &cfg.nbd_unix_socket {
        let _ = std::fs::remove_file(sock);
    }
    tracing::info!("node stopped");
    Ok(())
}
