//! The tokio driver of one client connection: runs the handshake core against the socket
//! (with a deadline and TLS upgrade), then reads requests, serves each in its own task and
//! writes replies from a single writer as they complete.
//!
//! Backpressure: a request is read only once a request slot and, for READ and WRITE, its
//! payload bytes are reserved; both are given back when its reply has been written, so a
//! client that stops reading replies stops being read from.

use std::io;
use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter, WriteHalf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::task::JoinSet;
use tracing::{Instrument, debug, info, warn};

use crate::config::{ServerConfig, Tls};
use crate::dispatch::execute;
use crate::export::Catalog;
use crate::handshake::{Handshake, HandshakeEvent, Negotiated, TlsPolicy};
use crate::reply::{Frame, ReplyEncoder};
use crate::request::{ParseEvent, RequestParser};
use crate::shutdown::Shutdown;

/// A byte stream a connection runs over (TCP, Unix socket, TLS over either).
pub(crate) trait Transport: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Transport for T {}

/// A boxed transport, so TLS can replace the plain stream mid-handshake.
pub(crate) type BoxedTransport = Box<dyn Transport>;

/// Size of one socket read.
const READ_CHUNK: usize = 64 * 1024;
/// Buffer of the reply writer; larger pieces bypass it.
const WRITE_BUFFER: usize = 64 * 1024;

/// Why a connection ended.
#[derive(Debug, thiserror::Error)]
enum ConnectionError {
    #[error("handshake timed out")]
    HandshakeTimeout,
    #[error("server shutting down")]
    Shutdown,
    #[error("client closed the connection during the handshake")]
    ClosedInHandshake,
    #[error("handshake ended: {0}")]
    HandshakeClosed(crate::handshake::CloseReason),
    #[error("TLS handshake failed: {0}")]
    Tls(io::Error),
    #[error("socket error: {0}")]
    Io(#[from] io::Error),
}

/// How the transmission phase ended.
#[derive(Debug)]
enum End {
    Disconnect,
    PeerClosed { truncated: usize },
    WriterGone,
    Violation(crate::request::Violation),
    Shutdown,
    ReadError(io::Error),
}

/// One reply on its way to the socket, with the reservations it releases once written.
struct Outgoing {
    frame: Frame,
    _slot: OwnedSemaphorePermit,
    _bytes: Option<OwnedSemaphorePermit>,
}

/// Serves one client until it leaves, breaks the protocol or the server shuts down.
pub(crate) async fn serve_connection(
    stream: BoxedTransport,
    peer: String,
    catalog: Arc<dyn Catalog>,
    config: Arc<ServerConfig>,
    shutdown: Shutdown,
) {
    let span = tracing::info_span!("nbd_connection", peer = %peer);
    async move {
        info!("connection opened");
        let negotiated = tokio::select! {
            r = negotiate(stream, catalog.as_ref(), &config) => r,
            () = tokio::time::sleep(config.handshake_timeout) => Err(ConnectionError::HandshakeTimeout),
            () = shutdown.wait() => Err(ConnectionError::Shutdown),
        };
        let (stream, negotiated, leftover) = match negotiated {
            Ok(ready) => ready,
            Err(ConnectionError::HandshakeClosed(reason)) if !reason.is_violation() => {
                info!(%reason, "connection closed");
                return;
            }
            Err(ConnectionError::ClosedInHandshake) | Err(ConnectionError::Shutdown) => {
                info!("connection closed during handshake");
                return;
            }
            Err(e) => {
                warn!(error = %e, "connection closed during handshake");
                return;
            }
        };
        info!(
            export = %negotiated.export.name,
            mode = ?negotiated.mode,
            tls = negotiated.tls,
            "transmission started"
        );
        let end = transmit(stream, &negotiated, leftover, &config, &shutdown).await;
        match end {
            End::Disconnect => info!("connection closed: client disconnected"),
            End::PeerClosed { truncated: 0 } => info!("connection closed by client"),
            End::PeerClosed { truncated } => {
                warn!(truncated, "connection closed by client mid-request")
            }
            End::WriterGone => info!("connection closed: replies could not be sent"),
            End::Shutdown => info!("connection closed: server shutting down"),
            End::Violation(v) => warn!(violation = %v, "connection closed: protocol violation"),
            End::ReadError(e) => info!(error = %e, "connection closed: read failed"),
        }
    }
    .instrument(span)
    .await
}

/// Runs the option haggling; returns the stream (TLS-wrapped if upgraded), what was
/// agreed and the bytes already received for the transmission phase.
async fn negotiate(
    mut stream: BoxedTransport,
    catalog: &dyn Catalog,
    config: &ServerConfig,
) -> Result<(BoxedTransport, Negotiated, BytesMut), ConnectionError> {
    let policy = match config.tls {
        Tls::Disabled => TlsPolicy::Disabled,
        Tls::Optional(_) => TlsPolicy::Optional,
        Tls::Required(_) => TlsPolicy::Required,
    };
    let mut handshake = Handshake::new(policy);
    let mut buf = vec![0u8; READ_CHUNK];
    loop {
        let event = handshake.poll(catalog);
        let output = handshake.take_output();
        if !output.is_empty() {
            stream.write_all(&output).await?;
            stream.flush().await?;
        }
        match event {
            HandshakeEvent::Continue => {}
            HandshakeEvent::NeedInput => {
                let n = stream.read(&mut buf).await?;
                if n == 0 {
                    return Err(ConnectionError::ClosedInHandshake);
                }
                handshake.receive(&buf[..n]);
            }
            HandshakeEvent::StartTls => {
                let Some(tls_config) = config.tls.server_config() else {
                    // The core only asks for TLS when the policy offers it.
                    return Err(ConnectionError::Tls(io::Error::other("TLS not configured")));
                };
                let acceptor = tokio_rustls::TlsAcceptor::from(Arc::clone(tls_config));
                let tls = acceptor
                    .accept(stream)
                    .await
                    .map_err(ConnectionError::Tls)?;
                stream = Box::new(tls);
                handshake.tls_established();
                debug!("TLS established");
            }
            HandshakeEvent::Close(reason) => {
                let _ = stream.shutdown().await;
                return Err(ConnectionError::HandshakeClosed(reason));
            }
            HandshakeEvent::Transmission {
                negotiated,
                leftover,
            } => return Ok((stream, *negotiated, leftover)),
        }
    }
}

/// Serves requests until the client disconnects, then lets outstanding requests finish
/// (within the drain timeout) and closes.
async fn transmit(
    stream: BoxedTransport,
    negotiated: &Negotiated,
    leftover: BytesMut,
    config: &ServerConfig,
    shutdown: &Shutdown,
) -> End {
    let (mut reader, writer) = tokio::io::split(stream);
    let mut parser = RequestParser::new(negotiated, leftover);
    let encoder = ReplyEncoder::new(negotiated.mode);
    let export = Arc::clone(&negotiated.export.export);
    let (tx, rx) = mpsc::unbounded_channel::<Outgoing>();
    let writer = tokio::spawn(write_replies(writer, rx).in_current_span());
    let slots = Arc::new(Semaphore::new(config.max_inflight_requests));
    let byte_budget = Arc::new(Semaphore::new(config.max_inflight_bytes));
    let budget_max = u32::try_from(config.max_inflight_bytes).unwrap_or(u32::MAX);
    let mut tasks = JoinSet::new();

    let end = loop {
        while let Some(done) = tasks.try_join_next() {
            if let Err(e) = done {
                tracing::error!(error = %e, "request task failed");
            }
        }
        match parser.poll() {
            Some(ParseEvent::Request(request)) => {
                let cost = u32::try_from(request.payload_bytes())
                    .unwrap_or(u32::MAX)
                    .min(budget_max);
                let reserve = async {
                    let slot = Arc::clone(&slots).acquire_owned().await.ok()?;
                    let bytes = if cost > 0 {
                        Some(
                            Arc::clone(&byte_budget)
                                .acquire_many_owned(cost)
                                .await
                                .ok()?,
                        )
                    } else {
                        None
                    };
                    Some((slot, bytes))
                };
                let (slot, bytes) = tokio::select! {
                    r = reserve => match r {
                        Some(permits) => permits,
                        None => break End::WriterGone,
                    },
                    () = shutdown.wait() => break End::Shutdown,
                    () = tx.closed() => break End::WriterGone,
                };
                let tx = tx.clone();
                let export = Arc::clone(&export);
                tasks.spawn(
                    async move {
                        let frame = execute(export.as_ref(), &encoder, request).await;
                        // Fails only when the writer is gone; the reply is then moot.
                        let _ = tx.send(Outgoing {
                            frame,
                            _slot: slot,
                            _bytes: bytes,
                        });
                    }
                    .in_current_span(),
                );
            }
            Some(ParseEvent::Reject {
                cookie,
                offset,
                errno,
                message,
            }) => {
                debug!(cookie, errno, %message, "request refused");
                let slot = tokio::select! {
                    r = Arc::clone(&slots).acquire_owned() => match r {
                        Ok(slot) => slot,
                        Err(_) => break End::WriterGone,
                    },
                    () = shutdown.wait() => break End::Shutdown,
                    () = tx.closed() => break End::WriterGone,
                };
                let frame = encoder.error(cookie, offset, errno, &message);
                if tx
                    .send(Outgoing {
                        frame,
                        _slot: slot,
                        _bytes: None,
                    })
                    .is_err()
                {
                    break End::WriterGone;
                }
            }
            Some(ParseEvent::Disconnect) => break End::Disconnect,
            Some(ParseEvent::Violation(v)) => break End::Violation(v),
            None => {
                // Straight into the parser's buffer: a write's payload is read once
                // and handed to the export as it is.
                let n = tokio::select! {
                    r = reader.read_buf(parser.read_buffer(READ_CHUNK)) => match r {
                        Ok(n) => n,
                        Err(e) => break End::ReadError(e),
                    },
                    () = shutdown.wait() => break End::Shutdown,
                    () = tx.closed() => break End::WriterGone,
                };
                if n == 0 {
                    break End::PeerClosed {
                        truncated: parser.buffered(),
                    };
                }
            }
        }
    };

    // No new requests from here on. Outstanding ones finish and their replies go out;
    // the writer ends once every sender is gone and then closes the stream.
    drop(tx);
    let drain = async {
        while let Some(done) = tasks.join_next().await {
            if let Err(e) = done {
                tracing::error!(error = %e, "request task failed");
            }
        }
    };
    if tokio::time::timeout(config.drain_timeout, drain)
        .await
        .is_err()
    {
        warn!("outstanding requests did not finish in time; dropping them");
        tasks.abort_all();
    }
    let mut writer = writer;
    match tokio::time::timeout(config.drain_timeout, &mut writer).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => debug!(error = %e, "writing replies failed"),
        Ok(Err(e)) => tracing::error!(error = %e, "reply writer failed"),
        Err(_) => {
            warn!("client is not reading replies; dropping the connection");
            writer.abort();
        }
    }
    end
}

/// Writes replies in completion order; flushes whenever no further reply is queued.
async fn write_replies(
    writer: WriteHalf<BoxedTransport>,
    mut rx: mpsc::UnboundedReceiver<Outgoing>,
) -> io::Result<()> {
    let mut writer = BufWriter::with_capacity(WRITE_BUFFER, writer);
    while let Some(outgoing) = rx.recv().await {
        for part in &outgoing.frame.parts {
            writer.write_all(part).await?;
        }
        // The reservations go back once the reply is in the socket's hands.
        drop(outgoing);
        if rx.is_empty() {
            writer.flush().await?;
        }
    }
    writer.flush().await?;
    writer.shutdown().await
}
