//! Cluster metadata store: node leases, volume placement and epochs, tenants' wrapped
//! keys. One small async trait, [`MetaStore`], with two backends that pass the same
//! conformance suite (`tests/conformance.rs`):
//!
//! - [`EtcdStore`]: etcd, for clusters spanning hosts;
//! - [`EmbeddedStore`]: one SQLite file in WAL mode shared by the node processes of a
//!   single host (as k3s does in place of etcd), so `dev up` needs nothing else.
//!
//! The model is etcd's: one global revision counter that every write bumps; each key
//! carries the revision of its last modification; compare-and-swap on that revision is
//! the only way to change a record safely (epochs change only this way, see
//! [`cluster`]); keys can be bound to a lease and disappear when it expires.
//!
//! Change notification is by polling, not a push watch: [`MetaStore::changes_since`]
//! returns the keys under a prefix whose state changed after a revision, with their
//! state now (level-triggered, what a reconcile loop wants: "node n2 is gone",
//! "placement of vol1 changed"). Both backends can answer it without a long-lived
//! stream, and a poller that falls behind the kept history is told to list again.

pub mod cluster;
mod embedded;
mod etcd;

use std::fmt;
use std::time::Duration;

pub use embedded::EmbeddedStore;
pub use etcd::EtcdStore;

/// A store revision. Every write bumps the store's revision by one; a key's revision is
/// the store revision of its last modification, so revisions only increase.
pub type Revision = u64;

/// A lease: keys written with it disappear when it expires or is revoked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LeaseId(pub i64);

impl fmt::Display for LeaseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:x}", self.0)
    }
}

/// A value and the revision of its last modification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned {
    /// The stored bytes.
    pub value: Vec<u8>,
    /// Revision of the last modification of this key.
    pub revision: Revision,
}

/// One key of a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The key.
    pub key: String,
    /// The stored bytes.
    pub value: Vec<u8>,
    /// Revision of the last modification of this key.
    pub revision: Revision,
}

/// What a compare-and-swap expects to find.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// The key does not exist.
    Absent,
    /// The key exists and was last modified at this revision.
    Revision(Revision),
}

/// The result of a compare-and-swap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CasOutcome {
    /// The expectation held and the change was applied at this store revision (for a
    /// delete of an already absent key: the current store revision, nothing changed).
    Done(Revision),
    /// The expectation did not hold; nothing changed. The key's current state.
    Conflict(Option<Versioned>),
}

/// A key whose state changed since the revision given to [`MetaStore::changes_since`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// The key.
    pub key: String,
    /// Its state now: `None` when it was deleted (or expired with its lease).
    pub current: Option<Versioned>,
}

/// The answer of [`MetaStore::changes_since`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Changes {
    /// The store revision this answer describes; pass it to the next call.
    pub revision: Revision,
    /// Changed keys in key order, each with its state at `revision`.
    pub changes: Vec<Change>,
}

/// Failure source of a backend (SQLite, etcd, the blocking pool).
pub type BackendError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Errors of the metadata store. Variants name the operation that failed; the
/// backend's own error is the source.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    /// Opening or connecting to the store.
    #[error("opening the metadata store at {location}")]
    Open {
        /// Path or endpoints.
        location: String,
        /// Backend error.
        source: BackendError,
    },
    /// Reading one key.
    #[error("reading metadata key {key:?}")]
    Get {
        /// The key.
        key: String,
        /// Backend error.
        source: BackendError,
    },
    /// Listing a prefix.
    #[error("listing metadata prefix {prefix:?}")]
    List {
        /// The prefix.
        prefix: String,
        /// Backend error.
        source: BackendError,
    },
    /// Writing one key.
    #[error("writing metadata key {key:?}")]
    Put {
        /// The key.
        key: String,
        /// Backend error.
        source: BackendError,
    },
    /// Deleting one key.
    #[error("deleting metadata key {key:?}")]
    Delete {
        /// The key.
        key: String,
        /// Backend error.
        source: BackendError,
    },
    /// A compare-and-swap that could not be evaluated (a conflict is not an error).
    #[error("compare-and-swap on metadata key {key:?}")]
    CompareAndSwap {
        /// The key.
        key: String,
        /// Backend error.
        source: BackendError,
    },
    /// Granting a lease.
    #[error("granting a lease of {ttl:?}")]
    GrantLease {
        /// Requested time to live.
        ttl: Duration,
        /// Backend error.
        source: BackendError,
    },
    /// Renewing a lease.
    #[error("renewing lease {lease}")]
    KeepAlive {
        /// The lease.
        lease: LeaseId,
        /// Backend error.
        source: BackendError,
    },
    /// Revoking a lease.
    #[error("revoking lease {lease}")]
    RevokeLease {
        /// The lease.
        lease: LeaseId,
        /// Backend error.
        source: BackendError,
    },
    /// Reading the changes under a prefix.
    #[error("reading changes under {prefix:?} since revision {since}")]
    ChangesSince {
        /// The prefix.
        prefix: String,
        /// The revision asked for.
        since: Revision,
        /// Backend error.
        source: BackendError,
    },
    /// Reading the store's current revision.
    #[error("reading the metadata store's revision")]
    CurrentRevision {
        /// Backend error.
        source: BackendError,
    },
    /// The lease expired or was revoked (from `keep_alive` and `put_with_lease`).
    #[error("lease {0} has expired or was revoked")]
    LeaseExpired(LeaseId),
    /// The history needed by `changes_since` was compacted: list the prefix again.
    #[error("history since revision {since} was compacted")]
    Compacted {
        /// The revision asked for.
        since: Revision,
    },
    /// More keys than the caller's limit are involved in `changes_since`: list again.
    #[error("more than {limit} keys changed under {prefix:?}")]
    TooManyChanges {
        /// The prefix.
        prefix: String,
        /// The caller's limit.
        limit: usize,
    },
    /// A lease time to live of zero or beyond what the backend can represent.
    #[error("invalid lease time to live {0:?}")]
    InvalidTtl(Duration),
}

/// The cluster metadata store. Keys are strings, compared as bytes (UTF-8 order);
/// values are bytes. Every call that writes is durable when it returns.
#[async_trait::async_trait]
pub trait MetaStore: Send + Sync + fmt::Debug {
    /// The value of `key` and the revision of its last modification.
    async fn get(&self, key: &str) -> Result<Option<Versioned>, MetaError>;

    /// The first `limit` keys starting with `prefix`, in key order.
    async fn list(&self, prefix: &str, limit: usize) -> Result<Vec<Entry>, MetaError>;

    /// Write `key` unconditionally (detaching it from any lease); the new revision.
    async fn put(&self, key: &str, value: &[u8]) -> Result<Revision, MetaError>;

    /// Delete `key` unconditionally; whether it existed.
    async fn delete(&self, key: &str) -> Result<bool, MetaError>;

    /// Write (`Some`) or delete (`None`) `key` only if it is as `expected`. A write
    /// made this way is not bound to any lease.
    async fn compare_and_swap(
        &self,
        key: &str,
        expected: Expect,
        new: Option<&[u8]>,
    ) -> Result<CasOutcome, MetaError>;

    /// A new lease that expires `ttl` after its last renewal. Backends may round the
    /// time to live up (etcd counts whole seconds and has a minimum).
    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, MetaError>;

    /// Renew a lease for its full time to live; [`MetaError::LeaseExpired`] once it
    /// has expired or was revoked.
    async fn keep_alive(&self, lease: LeaseId) -> Result<(), MetaError>;

    /// Revoke a lease now, deleting its keys. Revoking an expired or unknown lease is
    /// not an error.
    async fn revoke_lease(&self, lease: LeaseId) -> Result<(), MetaError>;

    /// Write `key` bound to `lease`: it disappears when the lease expires or is
    /// revoked. [`MetaError::LeaseExpired`] when the lease is already gone.
    async fn put_with_lease(
        &self,
        key: &str,
        value: &[u8],
        lease: LeaseId,
    ) -> Result<Revision, MetaError>;

    /// The keys under `prefix` whose state changed after revision `since` (written,
    /// deleted, or expired with their lease), each with its state now: net changes,
    /// for a polling loop that starts from a [`list`](Self::list) and then passes the
    /// returned revision back. A key created and deleted in between may be reported
    /// as deleted or not at all. [`MetaError::Compacted`] when the history is gone and
    /// [`MetaError::TooManyChanges`] when more than `limit` keys are involved: list
    /// the prefix again.
    async fn changes_since(
        &self,
        prefix: &str,
        since: Revision,
        limit: usize,
    ) -> Result<Changes, MetaError>;

    /// The store's current revision.
    async fn current_revision(&self) -> Result<Revision, MetaError>;
}
