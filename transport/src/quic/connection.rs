//! A verified connection to a peer node and the request/response exchange on it: each
//! request gets its own bidirectional stream carrying one request frame and one
//! response frame, so any number of requests (up to the peer's stream limit) are in
//! flight at once and a slow one holds up no other.
//!
//! Incoming streams are read by one task per stream (bounded by the stream limit and
//! by the request timeout) and only complete, well-formed request frames reach
//! [`PeerConnection::next_request`].

use std::fmt;
use std::sync::Arc;

use quinn::{RecvStream, SendStream};
use tokio::sync::{Mutex, mpsc};
use tokio::task::AbortHandle;

use super::{Shared, TransportError, close_code};
use crate::fault::{Direction, FaultAction};
use crate::frame::{self, FrameError, code};

/// Complete requests read but not yet taken by the application.
const REQUEST_QUEUE: usize = 64;

type IncomingRequest = (Vec<u8>, Responder);

/// A connection to a registered peer node. Clones share the connection; it closes when
/// the last clone is dropped.
#[derive(Clone)]
pub struct PeerConnection {
    inner: Arc<Inner>,
}

struct Inner {
    conn: quinn::Connection,
    peer: String,
    shared: Arc<Shared>,
    requests: Mutex<mpsc::Receiver<IncomingRequest>>,
    stream_acceptor: AbortHandle,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.stream_acceptor.abort();
        self.conn.close(close_code::NORMAL, b"closed");
    }
}

impl fmt::Debug for PeerConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeerConnection")
            .field("peer", &self.inner.peer)
            .field("remote", &self.inner.conn.remote_address())
            .finish_non_exhaustive()
    }
}

impl PeerConnection {
    /// Wrap a connection whose peer was verified to be registered node `peer`, and
    /// start reading the requests it sends.
    pub(super) fn new(conn: quinn::Connection, peer: String, shared: Arc<Shared>) -> Self {
        let (tx, rx) = mpsc::channel(REQUEST_QUEUE);
        let stream_acceptor = tokio::spawn(accept_streams(
            conn.clone(),
            peer.clone(),
            shared.clone(),
            tx,
        ))
        .abort_handle();
        Self {
            inner: Arc::new(Inner {
                conn,
                peer,
                shared,
                requests: Mutex::new(rx),
                stream_acceptor,
            }),
        }
    }

    /// The peer's node name, as its certificate states.
    pub fn peer(&self) -> &str {
        &self.inner.peer
    }

    /// The peer's UDP address.
    pub fn remote_address(&self) -> std::net::SocketAddr {
        self.inner.conn.remote_address()
    }

    /// Send one request and wait for its response, within the request timeout.
    pub async fn request(&self, payload: &[u8]) -> Result<Vec<u8>, TransportError> {
        let config = &self.inner.shared.config;
        let peer = &self.inner.peer;
        check_len(payload, config.max_frame_len)?;
        let timeout = config.request_timeout;
        if let Some(plan) = &config.fault_plan {
            match plan.decide(peer, Direction::Outgoing) {
                FaultAction::Deliver => {}
                FaultAction::Drop => {
                    tokio::time::sleep(timeout).await;
                    return Err(TransportError::RequestTimeout {
                        peer: peer.clone(),
                        after: timeout,
                    });
                }
                FaultAction::Delay(delay) => tokio::time::sleep(delay).await,
                FaultAction::Fail => {
                    return Err(TransportError::FaultInjected { peer: peer.clone() });
                }
            }
        }
        tokio::time::timeout(timeout, self.exchange(payload))
            .await
            .map_err(|_| TransportError::RequestTimeout {
                peer: peer.clone(),
                after: timeout,
            })?
    }

    async fn exchange(&self, payload: &[u8]) -> Result<Vec<u8>, TransportError> {
        let frame_err = |source| TransportError::Frame {
            peer: self.inner.peer.clone(),
            source,
        };
        let (mut send, mut recv) =
            self.inner
                .conn
                .open_bi()
                .await
                .map_err(|source| TransportError::ConnectionClosed {
                    peer: self.inner.peer.clone(),
                    source: Some(source),
                })?;
        frame::write_frame(&mut send, payload)
            .await
            .map_err(frame_err)?;
        let response = frame::read_frame(&mut recv, self.inner.shared.config.max_frame_len).await;
        if let Err(FrameError::TooLarge { .. }) = response {
            let _ = recv.stop(code::FRAME_TOO_LARGE);
        }
        response.map_err(frame_err)
    }

    /// The next request the peer sent, with the [`Responder`] to answer it. Fails once
    /// the connection is closed and every request read before is taken.
    pub async fn next_request(&self) -> Result<(Vec<u8>, Responder), TransportError> {
        let next = self.inner.requests.lock().await.recv().await;
        next.ok_or_else(|| TransportError::ConnectionClosed {
            peer: self.inner.peer.clone(),
            source: self.inner.conn.close_reason(),
        })
    }

    /// Close the connection now; requests in flight on either side fail.
    pub fn close(&self) {
        self.inner.conn.close(close_code::NORMAL, b"closed");
    }

    /// The underlying QUIC connection, for tests and diagnostics that need to go below
    /// the frame protocol (e.g. to send a malformed frame). Not part of the stable API.
    #[doc(hidden)]
    pub fn quic_connection(&self) -> &quinn::Connection {
        &self.inner.conn
    }
}

/// The way to answer one request. Dropping it unanswered resets the stream, so the
/// requester fails at once instead of waiting for its timeout.
pub struct Responder {
    send: Option<SendStream>,
    peer: String,
    max_frame_len: u32,
}

impl fmt::Debug for Responder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Responder")
            .field("peer", &self.peer)
            .finish_non_exhaustive()
    }
}

impl Responder {
    /// Send the response.
    pub async fn respond(mut self, payload: &[u8]) -> Result<(), TransportError> {
        let Some(mut send) = self.send.take() else {
            // Only `respond` takes the stream, and it consumes `self`.
            return Ok(());
        };
        if let Err(e) = check_len(payload, self.max_frame_len) {
            let _ = send.reset(code::FRAME_TOO_LARGE);
            return Err(e);
        }
        frame::write_frame(&mut send, payload)
            .await
            .map_err(|source| TransportError::Frame {
                peer: self.peer.clone(),
                source,
            })
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        if let Some(mut send) = self.send.take() {
            let _ = send.reset(code::NO_RESPONSE);
        }
    }
}

fn check_len(payload: &[u8], max: u32) -> Result<(), TransportError> {
    if u32::try_from(payload.len()).is_ok_and(|len| len <= max) {
        Ok(())
    } else {
        Err(TransportError::FrameTooLarge {
            len: payload.len(),
            max,
        })
    }
}

/// Accept the peer's request streams, one reading task each, until the connection
/// closes.
async fn accept_streams(
    conn: quinn::Connection,
    peer: String,
    shared: Arc<Shared>,
    requests: mpsc::Sender<IncomingRequest>,
) {
    loop {
        let (send, recv) = match conn.accept_bi().await {
            Ok(streams) => streams,
            Err(e) => {
                tracing::debug!(%peer, error = %e, "connection closed");
                return;
            }
        };
        tokio::spawn(read_request(
            send,
            recv,
            peer.clone(),
            shared.clone(),
            requests.clone(),
        ));
    }
}

/// Read one request frame and queue it for the application; a stream that does not
/// carry a valid frame in time is reset and never reaches it.
async fn read_request(
    mut send: SendStream,
    mut recv: RecvStream,
    peer: String,
    shared: Arc<Shared>,
    requests: mpsc::Sender<IncomingRequest>,
) {
    let config = &shared.config;
    let read = tokio::time::timeout(
        config.request_timeout,
        frame::read_frame(&mut recv, config.max_frame_len),
    )
    .await;
    let payload = match read {
        Ok(Ok(payload)) => payload,
        Ok(Err(e)) => {
            let stream_code = match e {
                FrameError::TooLarge { .. } => code::FRAME_TOO_LARGE,
                _ => code::BAD_REQUEST,
            };
            tracing::warn!(%peer, error = %e, "refusing a request stream");
            let _ = recv.stop(stream_code);
            let _ = send.reset(stream_code);
            return;
        }
        Err(_) => {
            tracing::warn!(%peer, "request frame not received in time");
            let _ = recv.stop(code::BAD_REQUEST);
            let _ = send.reset(code::BAD_REQUEST);
            return;
        }
    };
    if let Some(plan) = &config.fault_plan {
        match plan.decide(&peer, Direction::Incoming) {
            FaultAction::Deliver => {}
            FaultAction::Drop => {
                // Lost: keep the stream open and silent until the requester gives up.
                let _ = tokio::time::timeout(config.request_timeout, send.stopped()).await;
                return;
            }
            FaultAction::Delay(delay) => tokio::time::sleep(delay).await,
            FaultAction::Fail => {
                let _ = send.reset(code::FAULT_INJECTED);
                return;
            }
        }
    }
    let responder = Responder {
        send: Some(send),
        peer,
        max_frame_len: config.max_frame_len,
    };
    // A closed queue means the connection handle is gone; the responder's drop resets.
    let _ = requests.send((payload, responder)).await;
}
