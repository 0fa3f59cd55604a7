//! Which node names may talk to this node: the set of registered nodes, supplied by
//! the caller (typically a cache of the metadata store's `nodes/` kept fresh by a
//! watch). It is consulted synchronously inside the TLS handshake, so it must answer
//! from memory.

/// The registered nodes of the cluster.
pub trait NodeRegistry: Send + Sync + 'static {
    /// Whether `node` is a registered node of this cluster.
    fn is_registered(&self, node: &str) -> bool;
}

impl<F> NodeRegistry for F
where
    F: Fn(&str) -> bool + Send + Sync + 'static,
{
    fn is_registered(&self, node: &str) -> bool {
        self(node)
    }
}
