//! Server configuration: TLS policy and the limits that keep one client from starving others.

use std::sync::Arc;
use std::time::Duration;

/// Largest READ or WRITE payload, and the advertised maximum block size (32 MiB, the
/// size the protocol says no client should consider a denial of service).
pub const MAX_PAYLOAD: u32 = 32 * 1024 * 1024;
/// Preferred block size advertised in NBD_INFO_BLOCK_SIZE.
pub const PREFERRED_BLOCK_SIZE: u32 = 4096;
/// Minimum block size advertised in NBD_INFO_BLOCK_SIZE.
pub const MINIMUM_BLOCK_SIZE: u32 = 1;
/// Largest option payload accepted during the handshake; a longer option is refused
/// with NBD_REP_ERR_TOO_BIG and the connection closed.
pub const MAX_OPTION_LEN: u32 = 64 * 1024;

/// Whether and how clients must upgrade to TLS with NBD_OPT_STARTTLS.
#[derive(Clone, Default)]
pub enum Tls {
    /// No TLS: NBD_OPT_STARTTLS is refused with NBD_REP_ERR_POLICY.
    #[default]
    Disabled,
    /// TLS is offered; clients may negotiate in plaintext ("SELECTIVETLS" with no
    /// TLS-only export).
    Optional(Arc<rustls::ServerConfig>),
    /// Every option but STARTTLS and ABORT is refused until TLS is up ("FORCEDTLS").
    Required(Arc<rustls::ServerConfig>),
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Tls::Disabled => "Disabled",
            Tls::Optional(_) => "Optional",
            Tls::Required(_) => "Required",
        })
    }
}

impl Tls {
    /// The rustls configuration, when TLS is offered at all.
    pub fn server_config(&self) -> Option<&Arc<rustls::ServerConfig>> {
        match self {
            Tls::Disabled => None,
            Tls::Optional(config) | Tls::Required(config) => Some(config),
        }
    }
}

/// How the server treats its clients.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// TLS policy.
    pub tls: Tls,
    /// Time a client has from connecting to entering the transmission phase.
    pub handshake_timeout: Duration,
    /// Connections served at once; further connections are closed on accept.
    pub max_connections: usize,
    /// Requests of one connection being served at once; the server stops reading
    /// from a client that has this many requests outstanding.
    pub max_inflight_requests: usize,
    /// READ and WRITE payload bytes of one connection held at once (requests being
    /// served plus replies not yet written); reading stops past it.
    pub max_inflight_bytes: usize,
    /// On shutdown or disconnect, how long outstanding requests may take to finish
    /// and their replies to be written before the connection is dropped.
    pub drain_timeout: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            tls: Tls::Disabled,
            handshake_timeout: Duration::from_secs(30),
            max_connections: 256,
            max_inflight_requests: 64,
            max_inflight_bytes: 128 * 1024 * 1024,
            drain_timeout: Duration::from_secs(10),
        }
    }
}

impl ServerConfig {
    /// Checks that the limits can be honoured (every permit count non-zero, room for
    /// at least one maximum-sized payload).
    pub fn validate(&self) -> Result<(), String> {
        if self.max_connections == 0 {
            return Err("max_connections must be at least 1".into());
        }
        if self.max_inflight_requests == 0 {
            return Err("max_inflight_requests must be at least 1".into());
        }
        // One maximum-sized request must always fit, or a client could wedge itself.
        let max_payload = usize::try_from(MAX_PAYLOAD).map_err(|e| e.to_string())?;
        if self.max_inflight_bytes < max_payload {
            return Err(format!(
                "max_inflight_bytes ({}) must be at least the maximum payload ({max_payload})",
                self.max_inflight_bytes
            ));
        }
        // tokio semaphores hold at most usize::MAX >> 3 permits.
        if self.max_inflight_bytes > usize::MAX >> 3 || self.max_inflight_requests > usize::MAX >> 3
        {
            return Err("in-flight limits are too large".into());
        }
        if self.max_connections > usize::MAX >> 3 {
            return Err("max_connections is too large".into());
        }
        Ok(())
    }
}
