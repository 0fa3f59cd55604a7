//! Trireme's NBD server: a sans-I/O protocol core (handshake, request parser, reply
//! encoders) and a tokio driver serving it over TCP and Unix sockets, with optional TLS.
//!
//! The storage behind each export is reached only through the [`Export`] and [`Catalog`]
//! traits; the protocol core is usable on its own (fuzz targets drive it directly).

pub mod client;
pub mod config;
mod connection;
mod cursor;
pub mod dispatch;
mod export;
pub mod handshake;
pub mod reply;
pub mod request;
mod server;
mod shutdown;
mod wire;

#[cfg(any(test, feature = "testing"))]
pub mod testing;

#[cfg(test)]
mod tests;

pub use config::{ServerConfig, Tls};
pub use export::*;
pub use server::{serve_tcp, serve_unix};
pub use shutdown::Shutdown;
