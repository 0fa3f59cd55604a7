//! Tests of the protocol core and of the driver over real sockets.

mod client;
mod cves;
mod fuzz_smoke;
mod handshake;
mod server;
mod support;
mod transmission;
