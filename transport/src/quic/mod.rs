//! The QUIC endpoint of a node: listens on one UDP address, dials peers, and hands the
//! application only connections whose peer proved (mutual TLS, cluster CA) to be a
//! registered node. See [`tls`] for what is verified, [`connection`] for the
//! request/response exchange on a connection.
//!
//! Every node both listens and dials, so an endpoint is a server and a client at once,
//! with the same certificate. Either side of a [`PeerConnection`] may send requests.

mod connection;
mod tls;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use std::{fmt, io};

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{IdleTimeout, TransportConfig, VarInt};
use tokio::sync::{Mutex, Semaphore, mpsc};
use tokio::task::JoinHandle;

pub use connection::{PeerConnection, Responder};

use crate::ca::{CaCertificate, NodeIdentity};
use crate::fault::FaultPlan;
use crate::frame::{DEFAULT_MAX_FRAME_LEN, FrameError};
use crate::node_name::{self, NodeNameError};
use crate::registry::NodeRegistry;

/// Connection close codes (QUIC application error codes on `CONNECTION_CLOSE`).
pub mod close_code {
    use quinn::VarInt;

    /// Closed by its owner (handle dropped or endpoint closed).
    pub const NORMAL: VarInt = VarInt::from_u32(0);
    /// The peer is not the node that was dialled, or not registered.
    pub const REFUSED_PEER: VarInt = VarInt::from_u32(1);
}

/// Handshakes in progress at once; further incoming connections are refused until one
/// finishes (a flood of half-open handshakes cannot pile up tasks).
const MAX_PENDING_HANDSHAKES: usize = 64;

/// Established connections waiting for [`Endpoint::accept`].
const ACCEPT_QUEUE: usize = 64;

/// Settings of an endpoint.
#[derive(Clone, Debug)]
pub struct EndpointConfig {
    /// A connection that hears nothing from its peer for this long is closed (then
    /// every request on it fails). Must be well above `keep_alive`.
    pub idle_timeout: Duration,
    /// Interval of keep-alive packets on a quiet connection.
    pub keep_alive: Duration,
    /// Bound on a handshake (dial or accept).
    pub handshake_timeout: Duration,
    /// Bound on one request, from sending it to reading its whole response; on the
    /// serving side, bound on reading one request frame.
    pub request_timeout: Duration,
    /// Cap on a frame's payload, requests and responses alike.
    pub max_frame_len: u32,
    /// Requests a peer may have in flight on one connection (bidirectional streams);
    /// more wait for a slot.
    pub max_concurrent_requests: u32,
    /// Test only: faults to inject per request. `None` in production.
    pub fault_plan: Option<Arc<FaultPlan>>,
}

impl Default for EndpointConfig {
    fn default() -> Self {
        Self {
            idle_timeout: Duration::from_secs(10),
            keep_alive: Duration::from_secs(2),
            handshake_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            max_frame_len: DEFAULT_MAX_FRAME_LEN,
            max_concurrent_requests: 256,
            fault_plan: None,
        }
    }
}

/// Errors of the QUIC transport.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// Binding the endpoint: called outside a Tokio runtime.
    #[error("binding the endpoint: no Tokio runtime")]
    NoRuntime,
    /// Binding the endpoint's UDP socket.
    #[error("binding UDP socket {addr}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why the socket could not be bound.
        #[source]
        source: io::Error,
    },
    /// Binding the endpoint: the node's own certificate does not verify against the
    /// cluster CA (wrong cluster, expired, wrong key usages).
    #[error("the certificate of node {node} does not verify against the cluster CA")]
    Identity {
        /// The node named by the certificate.
        node: String,
        /// What rustls found.
        #[source]
        source: rustls::Error,
    },
    /// Building the TLS configuration.
    #[error("building the TLS configuration")]
    Tls(#[source] rustls::Error),
    /// Building the QUIC configuration.
    #[error("building the QUIC configuration: {0}")]
    QuicConfig(String),
    /// Checking a node name.
    #[error(transparent)]
    NodeName(#[from] NodeNameError),
    /// Dialling a node that is not registered.
    #[error("node {0} is not registered")]
    NotRegistered(String),
    /// Dialling a node.
    #[error("dialling node {node} at {addr}")]
    Connect {
        /// The node.
        node: String,
        /// Its address.
        addr: SocketAddr,
        /// Why quinn refused to start.
        #[source]
        source: quinn::ConnectError,
    },
    /// A handshake failed (certificate refused by either side, peer unreachable).
    #[error("handshake with {peer}")]
    Handshake {
        /// The node dialled, or the address of an incoming connection.
        peer: String,
        /// Why it failed.
        #[source]
        source: quinn::ConnectionError,
    },
    /// A handshake did not finish in time.
    #[error("handshake with {peer} timed out after {after:?}")]
    HandshakeTimeout {
        /// The node dialled, or the address of an incoming connection.
        peer: String,
        /// The bound.
        after: Duration,
    },
    /// The peer's verified certificate names another node than the one dialled.
    #[error("dialled node {expected} but the peer is {actual}")]
    WrongPeer {
        /// The node dialled.
        expected: String,
        /// The node the certificate names.
        actual: String,
    },
    /// Accepting on an endpoint that was closed.
    #[error("the endpoint is closed")]
    EndpointClosed,
    /// Using a connection that is closed (by either side, or idle timeout).
    #[error("connection to {peer} closed")]
    ConnectionClosed {
        /// The peer node.
        peer: String,
        /// Why, when known.
        #[source]
        source: Option<quinn::ConnectionError>,
    },
    /// Sending a request or a response larger than the frame cap.
    #[error("frame of {len} bytes exceeds the cap of {max} bytes")]
    FrameTooLarge {
        /// The payload length.
        len: usize,
        /// The cap.
        max: u32,
    },
    /// Exchanging a request or response frame with a peer.
    #[error("exchanging a frame with {peer}")]
    Frame {
        /// The peer node.
        peer: String,
        /// What went wrong on the stream.
        #[source]
        source: FrameError,
    },
    /// A request got no complete response in time.
    #[error("request to {peer} timed out after {after:?}")]
    RequestTimeout {
        /// The peer node.
        peer: String,
        /// The bound.
        after: Duration,
    },
    /// A fault plan failed the request (tests only).
    #[error("request to {peer} failed by the fault plan")]
    FaultInjected {
        /// The peer node.
        peer: String,
    },
}

/// What the accept loop, the dialler and every connection share.
struct Shared {
    node: String,
    registry: Arc<dyn NodeRegistry>,
    config: EndpointConfig,
    refused: AtomicU64,
}

/// A node's QUIC endpoint.
pub struct Endpoint {
    quic: quinn::Endpoint,
    shared: Arc<Shared>,
    accepted: Mutex<mpsc::Receiver<(String, PeerConnection)>>,
    accept_loop: JoinHandle<()>,
}

impl fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Endpoint")
            .field("node", &self.shared.node)
            .field("local_addr", &self.quic.local_addr().ok())
            .finish_non_exhaustive()
    }
}

impl Endpoint {
    /// Bind with [`EndpointConfig::default`]. See [`Self::bind_with`].
    pub fn bind(
        addr: SocketAddr,
        identity: &NodeIdentity,
        ca: &CaCertificate,
        registry: Arc<dyn NodeRegistry>,
    ) -> Result<Self, TransportError> {
        Self::bind_with(addr, identity, ca, registry, EndpointConfig::default())
    }

    /// Listen on `addr` (port 0 picks one) as the node of `identity`, trusting only
    /// certificates issued by `ca` to nodes that `registry` knows. Must be called
    /// within a Tokio runtime.
    pub fn bind_with(
        addr: SocketAddr,
        identity: &NodeIdentity,
        ca: &CaCertificate,
        registry: Arc<dyn NodeRegistry>,
        config: EndpointConfig,
    ) -> Result<Self, TransportError> {
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(TransportError::NoRuntime);
        }
        tls::check_identity(identity, ca).map_err(|source| TransportError::Identity {
            node: identity.node().to_owned(),
            source,
        })?;
        let transport = Arc::new(transport_config(&config)?);
        let server_tls =
            tls::server_config(identity, ca, registry.clone()).map_err(TransportError::Tls)?;
        let server_tls = QuicServerConfig::try_from(server_tls)
            .map_err(|e| TransportError::QuicConfig(e.to_string()))?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(server_tls));
        server.transport_config(transport.clone());
        // Nodes have fixed addresses; a peer changing address is not a use case.
        server.migration(false);
        let client_tls =
            tls::client_config(identity, ca, registry.clone()).map_err(TransportError::Tls)?;
        let client_tls = QuicClientConfig::try_from(client_tls)
            .map_err(|e| TransportError::QuicConfig(e.to_string()))?;
        let mut client = quinn::ClientConfig::new(Arc::new(client_tls));
        client.transport_config(transport);

        let mut quic = quinn::Endpoint::server(server, addr)
            .map_err(|source| TransportError::Bind { addr, source })?;
        quic.set_default_client_config(client);

        let shared = Arc::new(Shared {
            node: identity.node().to_owned(),
            registry,
            config,
            refused: AtomicU64::new(0),
        });
        let (tx, rx) = mpsc::channel(ACCEPT_QUEUE);
        let accept_loop = tokio::spawn(accept_loop(quic.clone(), shared.clone(), tx));
        Ok(Self {
            quic,
            shared,
            accepted: Mutex::new(rx),
            accept_loop,
        })
    }

    /// The UDP address the endpoint listens on.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.quic.local_addr()
    }

    /// This node's name.
    pub fn node(&self) -> &str {
        &self.shared.node
    }

    /// Incoming connections refused so far (handshake failed or timed out, certificate
    /// not from the cluster CA, node not registered).
    pub fn refused_connections(&self) -> u64 {
        self.shared.refused.load(Ordering::Relaxed)
    }

    /// Dial node `node` at `addr`. Fails unless the peer proves to be that node, with a
    /// certificate from the cluster CA, and the node is registered.
    ///
    /// In TLS 1.3 the client finishes its handshake before the server has judged the
    /// client's certificate, so a server that refuses *this* node shows up as an error
    /// on the first request, not here.
    pub async fn connect(
        &self,
        addr: SocketAddr,
        node: &str,
    ) -> Result<PeerConnection, TransportError> {
        let server_name = node_name::dns_name(node)?;
        if !self.shared.registry.is_registered(node) {
            return Err(TransportError::NotRegistered(node.to_owned()));
        }
        let connecting =
            self.quic
                .connect(addr, &server_name)
                .map_err(|source| TransportError::Connect {
                    node: node.to_owned(),
                    addr,
                    source,
                })?;
        let after = self.shared.config.handshake_timeout;
        let conn = tokio::time::timeout(after, connecting)
            .await
            .map_err(|_| TransportError::HandshakeTimeout {
                peer: node.to_owned(),
                after,
            })?
            .map_err(|source| TransportError::Handshake {
                peer: node.to_owned(),
                source,
            })?;
        // The verifier already matched the SAN against `server_name`; this is the
        // same check on the far side of the handshake, against the identity quinn kept.
        let actual = tls::peer_node(&conn)?;
        if actual != node {
            conn.close(close_code::REFUSED_PEER, b"wrong node");
            return Err(TransportError::WrongPeer {
                expected: node.to_owned(),
                actual,
            });
        }
        Ok(PeerConnection::new(conn, actual, self.shared.clone()))
    }

    /// The next incoming connection from a registered node, with that node's name.
    pub async fn accept(&self) -> Result<(String, PeerConnection), TransportError> {
        self.accepted
            .lock()
            .await
            .recv()
            .await
            .ok_or(TransportError::EndpointClosed)
    }

    /// Close every connection and stop listening.
    pub fn close(&self) {
        self.accept_loop.abort();
        self.quic.close(close_code::NORMAL, b"endpoint closed");
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        self.close();
    }
}

fn transport_config(config: &EndpointConfig) -> Result<TransportConfig, TransportError> {
    if config.keep_alive >= config.idle_timeout {
        return Err(TransportError::QuicConfig(format!(
            "keep-alive {:?} must be shorter than the idle timeout {:?}",
            config.keep_alive, config.idle_timeout
        )));
    }
    if config.max_concurrent_requests == 0 {
        return Err(TransportError::QuicConfig(
            "max_concurrent_requests must be at least 1".to_owned(),
        ));
    }
    let mut transport = TransportConfig::default();
    let idle = IdleTimeout::try_from(config.idle_timeout)
        .map_err(|e| TransportError::QuicConfig(format!("idle timeout: {e}")))?;
    transport
        .max_idle_timeout(Some(idle))
        .keep_alive_interval(Some(config.keep_alive))
        .max_concurrent_bidi_streams(VarInt::from_u32(config.max_concurrent_requests))
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .datagram_receive_buffer_size(None);
    Ok(transport)
}

/// Hand every incoming connection to its own handshake task; queue the ones that
/// turn out to be registered nodes of this cluster.
async fn accept_loop(
    quic: quinn::Endpoint,
    shared: Arc<Shared>,
    accepted: mpsc::Sender<(String, PeerConnection)>,
) {
    let handshakes = Arc::new(Semaphore::new(MAX_PENDING_HANDSHAKES));
    while let Some(incoming) = quic.accept().await {
        let Ok(permit) = handshakes.clone().try_acquire_owned() else {
            shared.refused.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(remote = %incoming.remote_address(), "too many handshakes in progress; refusing");
            incoming.refuse();
            continue;
        };
        let shared = shared.clone();
        let accepted = accepted.clone();
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            let result = handshake(incoming, &shared).await;
            drop(permit);
            match result {
                Ok((node, conn)) => {
                    tracing::debug!(%remote, %node, "accepted peer");
                    // A closed queue means the endpoint is gone: the connection
                    // closes when dropped.
                    let _ = accepted.send((node, conn)).await;
                }
                Err(e) => {
                    shared.refused.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(%remote, error = %error_chain(&e), "refused connection");
                }
            }
        });
    }
}

async fn handshake(
    incoming: quinn::Incoming,
    shared: &Arc<Shared>,
) -> Result<(String, PeerConnection), TransportError> {
    let peer = incoming.remote_address().to_string();
    let connecting = incoming
        .accept()
        .map_err(|source| TransportError::Handshake {
            peer: peer.clone(),
            source,
        })?;
    let after = shared.config.handshake_timeout;
    let conn = tokio::time::timeout(after, connecting)
        .await
        .map_err(|_| TransportError::HandshakeTimeout {
            peer: peer.clone(),
            after,
        })?
        .map_err(|source| TransportError::Handshake { peer, source })?;
    // The client verifier refused unregistered nodes during the handshake; check again
    // on the identity quinn kept, before any stream of this connection is read.
    let node = tls::peer_node(&conn)?;
    if !shared.registry.is_registered(&node) {
        conn.close(close_code::REFUSED_PEER, b"node not registered");
        return Err(TransportError::NotRegistered(node));
    }
    let connection = PeerConnection::new(conn, node.clone(), shared.clone());
    Ok((node, connection))
}

/// An error with its sources, for one log line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}
