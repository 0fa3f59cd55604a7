//! Node-to-node transport of Trireme: QUIC (quinn, rustls on ring) with mutual TLS from
//! the cluster CA.
//!
//! - [`ca`]: the cluster CA and the node certificates it issues (PEM in and out).
//! - [`quic`]: a node's [`Endpoint`]: listens, dials, and hands the application only
//!   connections whose peer proved to be a registered node of this cluster; on a
//!   [`PeerConnection`], request/response exchanges of opaque frames.
//! - [`frame`]: the length-prefixed frame format and its cap.
//! - [`registry`]: the set of registered nodes the endpoint consults.
//! - [`fault`]: test-only fault injection (drop, delay, fail requests).
//! - [`node_name`]: how a node's name is carried in its certificate.
//!
//! Trust rule (scenario X1 of `design/DURABILITY.md`): a peer with no certificate, a
//! self-signed one, one from another cluster's CA, or a valid one naming a node that is
//! not registered fails the TLS handshake; its connection never reaches
//! [`Endpoint::accept`] and none of its streams is read.

pub mod ca;
pub mod fault;
pub mod frame;
pub mod node_name;
pub mod quic;
pub mod registry;

pub use ca::{CaCertificate, CaError, ClusterCa, NodeIdentity};
pub use fault::{Direction, FaultAction, FaultPlan, FaultRule};
pub use quic::{Endpoint, EndpointConfig, PeerConnection, Responder, TransportError};
pub use registry::NodeRegistry;
