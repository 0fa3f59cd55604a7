//! Serves one 64 MiB in-memory export over NBD, for checking the server with real clients:
//! `cargo run --release -p trireme-nbd --features testing --example memserver -- NAME PORT`
//! (add `--tls CERT_DIR` with `server-cert.pem`/`server-key.pem` to require TLS).

use std::sync::Arc;

use trireme_nbd::testing::{MemCatalog, MemExport};
use trireme_nbd::{ServerConfig, Shutdown, Tls, serve_tcp};

const SIZE: u64 = 64 * 1024 * 1024;

fn usage() -> ! {
    eprintln!("usage: memserver NAME PORT [--tls CERT_DIR] [--read-only]");
    std::process::exit(2);
}

fn tls_config(dir: &str) -> Result<Arc<rustls::ServerConfig>, String> {
    let cert_pem = std::fs::read(format!("{dir}/server-cert.pem"))
        .map_err(|e| format!("reading {dir}/server-cert.pem: {e}"))?;
    let key_pem = std::fs::read(format!("{dir}/server-key.pem"))
        .map_err(|e| format!("reading {dir}/server-key.pem: {e}"))?;
    let certs = rustls_pemfile::certs(&mut cert_pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("parsing certificate: {e}"))?;
    let key = rustls_pemfile::private_key(&mut key_pem.as_slice())
        .map_err(|e| format!("parsing key: {e}"))?
        .ok_or("no private key found")?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("loading certificate: {e}"))?;
    Ok(Arc::new(config))
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(name), Some(port)) = (args.first(), args.get(1)) else {
        usage()
    };
    let Ok(port) = port.parse::<u16>() else {
        usage()
    };
    let mut config = ServerConfig::default();
    let mut read_only = false;
    let mut rest = args[2..].iter();
    while let Some(arg) = rest.next() {
        match arg.as_str() {
            "--tls" => {
                let Some(dir) = rest.next() else { usage() };
                match tls_config(dir) {
                    Ok(tls) => config.tls = Tls::Required(tls),
                    Err(e) => {
                        eprintln!("memserver: {e}");
                        std::process::exit(1);
                    }
                }
            }
            "--read-only" => read_only = true,
            _ => usage(),
        }
    }
    let export = if read_only {
        MemExport::new(SIZE).read_only()
    } else {
        MemExport::new(SIZE)
    };
    let catalog = MemCatalog::new().with(name, "in-memory test export", Arc::new(export));
    let listener = match tokio::net::TcpListener::bind(("127.0.0.1", port)).await {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("memserver: binding 127.0.0.1:{port}: {e}");
            std::process::exit(1);
        }
    };
    let shutdown = Shutdown::new();
    let stopper = shutdown.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        stopper.trigger();
    });
    if let Err(e) = serve_tcp(listener, Arc::new(catalog), Arc::new(config), shutdown).await {
        eprintln!("memserver: {e}");
        std::process::exit(1);
    }
}
