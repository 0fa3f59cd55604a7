//! Listeners: accept loops for TCP and Unix sockets, the connection limit, and a prompt,
//! orderly stop on shutdown whatever the connected clients are doing.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, UnixListener};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tracing::{info, warn};

use crate::config::ServerConfig;
use crate::connection::{BoxedTransport, serve_connection};
use crate::export::Catalog;
use crate::shutdown::Shutdown;

/// Pause after an accept error that may clear by itself (out of file descriptors).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// Extra time, beyond each connection's own drain timeout, before connections are cut.
const STOP_MARGIN: Duration = Duration::from_secs(1);

enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, u64),
}

impl Listener {
    async fn accept(&mut self) -> io::Result<(BoxedTransport, String)> {
        match self {
            Listener::Tcp(listener) => {
                let (stream, peer) = listener.accept().await?;
                // Replies are written whole; Nagle would only delay them.
                if let Err(e) = stream.set_nodelay(true) {
                    warn!(%peer, error = %e, "cannot set TCP_NODELAY");
                }
                Ok((Box::new(stream), peer.to_string()))
            }
            Listener::Unix(listener, next_id) => {
                let (stream, _) = listener.accept().await?;
                *next_id += 1;
                Ok((Box::new(stream), format!("unix#{next_id}")))
            }
        }
    }
}

/// Serves NBD on a TCP listener until `shutdown` is triggered, then stops accepting,
/// lets connections finish outstanding requests (bounded by the drain timeout) and
/// returns. Fails at once if `config` is inconsistent, or if accepting fails for a reason
/// that will not clear by itself.
pub async fn serve_tcp(
    listener: TcpListener,
    catalog: Arc<dyn Catalog>,
    config: Arc<ServerConfig>,
    shutdown: Shutdown,
) -> io::Result<()> {
    serve(Listener::Tcp(listener), catalog, config, shutdown).await
}

/// Serves NBD on a Unix socket listener; see [`serve_tcp`].
pub async fn serve_unix(
    listener: UnixListener,
    catalog: Arc<dyn Catalog>,
    config: Arc<ServerConfig>,
    shutdown: Shutdown,
) -> io::Result<()> {
    serve(Listener::Unix(listener, 0), catalog, config, shutdown).await
}

async fn serve(
    mut listener: Listener,
    catalog: Arc<dyn Catalog>,
    config: Arc<ServerConfig>,
    shutdown: Shutdown,
) -> io::Result<()> {
    config
        .validate()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // Connections watch their own signal so a fatal accept error can stop them too.
    let stop_connections = Shutdown::new();
    let slots = Arc::new(Semaphore::new(config.max_connections));
    let mut connections = JoinSet::new();
    let result = loop {
        tokio::select! {
            () = shutdown.wait() => break Ok(()),
            Some(done) = connections.join_next(), if !connections.is_empty() => {
                if let Err(e) = done {
                    tracing::error!(error = %e, "connection task failed");
                }
            }
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
                        warn!(%peer, limit = config.max_connections, "connection limit reached; refusing client");
                        continue;
                    };
                    let catalog = Arc::clone(&catalog);
                    let config = Arc::clone(&config);
                    let stop = stop_connections.clone();
                    connections.spawn(async move {
                        serve_connection(stream, peer, catalog, config, stop).await;
                        drop(slot);
                    });
                }
                Err(e) if is_transient(&e) => {
                    warn!(error = %e, "accept failed; retrying");
                    tokio::select! {
                        () = shutdown.wait() => break Ok(()),
                        () = tokio::time::sleep(ACCEPT_BACKOFF) => {}
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "accept failed; stopping");
                    break Err(e);
                }
            },
        }
    };
    drop(listener);
    info!(connections = connections.len(), "stopping NBD server");
    stop_connections.trigger();
    let all_done = async { while connections.join_next().await.is_some() {} };
    // Each connection bounds its own drain; this is the backstop.
    let limit = config
        .drain_timeout
        .saturating_mul(2)
        .saturating_add(STOP_MARGIN);
    if tokio::time::timeout(limit, all_done).await.is_err() {
        warn!("connections did not stop in time; cutting them");
        connections.shutdown().await;
    }
    result
}

/// Accept errors that concern one connection or a passing resource shortage.
fn is_transient(e: &io::Error) -> bool {
    use io::ErrorKind::*;
    if matches!(
        e.kind(),
        ConnectionAborted | ConnectionReset | Interrupted | WouldBlock | TimedOut
    ) {
        return true;
    }
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM | libc::EPROTO)
    )
}
