//! Typed cluster records on top of a [`MetaStore`]: nodes registered under a lease
//! (liveness), volume placement with its epoch, and tenants' wrapped keys. Values are
//! JSON. Key layout:
//!
//! - `nodes/{name}`: [`NodeRecord`], bound to the node's lease;
//! - `placement/{volume}`: [`VolumePlacement`];
//! - `tenant-keys/{tenant}`: [`TenantKeyRecord`].
//!
//! A placement's epoch only changes through [`Cluster::bump_epoch`], which only writes
//! through compare-and-swap: two nodes racing to attach the same volume cannot both
//! get the same new epoch, and the loser learns the epoch that won.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::{CasOutcome, Expect, LeaseId, MetaError, MetaStore, Revision};

const NODE_PREFIX: &str = "nodes/";
const PLACEMENT_PREFIX: &str = "placement/";
const TENANT_KEY_PREFIX: &str = "tenant-keys/";

/// Upper bound on records read by one listing here (nodes of a cluster).
pub const MAX_NODES: usize = 10_000;
/// Compare-and-swap retries of [`Cluster::bump_epoch`] when the record changed but
/// its epoch did not.
const BUMP_RETRIES: usize = 16;

/// A storage node, as it registers itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// Unique node name.
    pub name: String,
    /// Failure domain.
    pub datacenter: String,
    /// Where hypervisors reach its NBD exports.
    pub nbd_addr: SocketAddr,
    /// Its QUIC replication endpoint.
    pub peer_addr: SocketAddr,
    /// Its admin API.
    pub admin_addr: SocketAddr,
}

/// How a replica stands relative to the volume's writer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum ReplicaState {
    /// Has every acknowledged write.
    InSync,
    /// Catching up from a peer.
    Resyncing {
        /// Bytes still to copy.
        bytes_left: u64,
    },
    /// Missed writes; must resync before it counts again.
    OutOfSync,
}

/// One copy of a volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaRecord {
    /// Node holding the copy.
    pub node: String,
    /// Its state.
    pub state: ReplicaState,
}

/// Where a volume's copies are, who writes it, and the epoch that fences old writers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumePlacement {
    /// Volume name.
    pub volume: String,
    /// Fencing epoch: replicas refuse writes from older epochs.
    pub epoch: u64,
    /// The copies.
    pub replicas: Vec<ReplicaRecord>,
    /// Node that has the volume attached (its single writer), if any.
    pub attached_by: Option<String>,
}

/// A tenant's key, wrapped by the cluster master key. Opaque here: hex, as in the
/// engine's catalog (`engine/src/catalog.rs`, `TenantRecord::wrapped_key`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantKeyRecord {
    /// Tenant name.
    pub tenant: String,
    /// Wrapped tenant key (hex).
    pub wrapped_key: String,
}

/// A node's registration: keep it alive with [`Cluster::renew_node`] more often than
/// `ttl`, or the node drops out of [`Cluster::live_nodes`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeRegistration {
    /// The lease the node record is bound to.
    pub lease: LeaseId,
    /// Its time to live.
    pub ttl: Duration,
}

/// Errors of the typed cluster layer.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// Registering a node.
    #[error("registering node {node}")]
    RegisterNode {
        /// Node name.
        node: String,
        /// Store error.
        source: MetaError,
    },
    /// Renewing a node's lease (`LeaseExpired` inside: register again).
    #[error("renewing the registration of lease {lease}")]
    RenewNode {
        /// The lease.
        lease: LeaseId,
        /// Store error.
        source: MetaError,
    },
    /// Listing live nodes.
    #[error("listing live nodes")]
    ListNodes {
        /// Store error.
        source: MetaError,
    },
    /// Reading a volume's placement.
    #[error("reading the placement of volume {volume}")]
    ReadPlacement {
        /// Volume name.
        volume: String,
        /// Store error.
        source: MetaError,
    },
    /// Writing a volume's placement.
    #[error("writing the placement of volume {volume}")]
    WritePlacement {
        /// Volume name.
        volume: String,
        /// Store error.
        source: MetaError,
    },
    /// Creating a placement that already exists.
    #[error("volume {volume} already has a placement")]
    PlacementExists {
        /// Volume name.
        volume: String,
    },
    /// Bumping the epoch of a volume that has no placement.
    #[error("volume {volume} has no placement")]
    NoPlacement {
        /// Volume name.
        volume: String,
    },
    /// The epoch was not the one expected: someone else changed the placement.
    #[error("volume {volume}: expected epoch {expected}, found {}", current.epoch)]
    EpochConflict {
        /// Volume name.
        volume: String,
        /// Epoch the caller expected.
        expected: u64,
        /// The placement as it is now.
        current: Box<VolumePlacement>,
    },
    /// The epoch cannot grow any further.
    #[error("volume {volume}: epoch overflow")]
    EpochOverflow {
        /// Volume name.
        volume: String,
    },
    /// The record kept changing under `bump_epoch` without its epoch changing.
    #[error("volume {volume}: placement kept changing, gave up after {BUMP_RETRIES} tries")]
    PlacementContended {
        /// Volume name.
        volume: String,
    },
    /// Reading or writing a tenant key.
    #[error("accessing the key of tenant {tenant}")]
    TenantKey {
        /// Tenant name.
        tenant: String,
        /// Store error.
        source: MetaError,
    },
    /// Storing a tenant key that already exists.
    #[error("tenant {tenant} already has a key")]
    TenantKeyExists {
        /// Tenant name.
        tenant: String,
    },
    /// A stored record is not valid JSON of its type.
    #[error("decoding record {key}")]
    DecodeRecord {
        /// Store key.
        key: String,
        /// JSON error.
        source: serde_json::Error,
    },
    /// A record could not be encoded.
    #[error("encoding record {key}")]
    EncodeRecord {
        /// Store key.
        key: String,
        /// JSON error.
        source: serde_json::Error,
    },
}

/// The typed view of the cluster metadata.
#[derive(Debug, Clone)]
pub struct Cluster {
    store: Arc<dyn MetaStore>,
}

fn encode<T: Serialize>(key: &str, record: &T) -> Result<Vec<u8>, ClusterError> {
    serde_json::to_vec(record).map_err(|source| ClusterError::EncodeRecord {
        key: key.to_owned(),
        source,
    })
}

fn decode<T: for<'de> Deserialize<'de>>(key: &str, bytes: &[u8]) -> Result<T, ClusterError> {
    serde_json::from_slice(bytes).map_err(|source| ClusterError::DecodeRecord {
        key: key.to_owned(),
        source,
    })
}

fn placement_key(volume: &str) -> String {
    format!("{PLACEMENT_PREFIX}{volume}")
}

impl Cluster {
    /// Typed access to `store`.
    pub fn new(store: Arc<dyn MetaStore>) -> Self {
        Cluster { store }
    }

    /// The underlying store.
    pub fn store(&self) -> &Arc<dyn MetaStore> {
        &self.store
    }

    /// Register `node` under a new lease of `ttl`: it is live until the lease expires.
    /// Registering again under the same name replaces the record (and its lease).
    pub async fn register_node(
        &self,
        node: &NodeRecord,
        ttl: Duration,
    ) -> Result<NodeRegistration, ClusterError> {
        let key = format!("{NODE_PREFIX}{}", node.name);
        let value = encode(&key, node)?;
        let context = |source| ClusterError::RegisterNode {
            node: node.name.clone(),
            source,
        };
        let lease = self.store.grant_lease(ttl).await.map_err(context)?;
        self.store
            .put_with_lease(&key, &value, lease)
            .await
            .map_err(context)?;
        Ok(NodeRegistration { lease, ttl })
    }

    /// Keep a node's registration alive.
    pub async fn renew_node(&self, registration: &NodeRegistration) -> Result<(), ClusterError> {
        self.store
            .keep_alive(registration.lease)
            .await
            .map_err(|source| ClusterError::RenewNode {
                lease: registration.lease,
                source,
            })
    }

    /// Withdraw a node's registration now (clean shutdown).
    pub async fn deregister_node(
        &self,
        registration: &NodeRegistration,
    ) -> Result<(), ClusterError> {
        self.store
            .revoke_lease(registration.lease)
            .await
            .map_err(|source| ClusterError::RenewNode {
                lease: registration.lease,
                source,
            })
    }

    /// The nodes whose lease is alive, by name.
    pub async fn live_nodes(&self) -> Result<Vec<NodeRecord>, ClusterError> {
        let entries = self
            .store
            .list(NODE_PREFIX, MAX_NODES)
            .await
            .map_err(|source| ClusterError::ListNodes { source })?;
        entries
            .iter()
            .map(|entry| decode(&entry.key, &entry.value))
            .collect()
    }

    /// Store a new volume's placement; fails if the volume already has one.
    pub async fn create_placement(
        &self,
        placement: &VolumePlacement,
    ) -> Result<Revision, ClusterError> {
        let key = placement_key(&placement.volume);
        let value = encode(&key, placement)?;
        let outcome = self
            .store
            .compare_and_swap(&key, Expect::Absent, Some(&value))
            .await
            .map_err(|source| ClusterError::WritePlacement {
                volume: placement.volume.clone(),
                source,
            })?;
        match outcome {
            CasOutcome::Done(revision) => Ok(revision),
            CasOutcome::Conflict(_) => Err(ClusterError::PlacementExists {
                volume: placement.volume.clone(),
            }),
        }
    }

    /// A volume's placement and the revision it was read at.
    pub async fn placement(
        &self,
        volume: &str,
    ) -> Result<Option<(VolumePlacement, Revision)>, ClusterError> {
        let key = placement_key(volume);
        let found = self
            .store
            .get(&key)
            .await
            .map_err(|source| ClusterError::ReadPlacement {
                volume: volume.to_owned(),
                source,
            })?;
        found
            .map(|v| Ok((decode(&key, &v.value)?, v.revision)))
            .transpose()
    }

    /// Apply `change` to the placement of `volume` and move it to the next epoch, only
    /// if its epoch is still `expected_epoch`. The write is a compare-and-swap on the
    /// revision read, so exactly one of several racing callers wins each epoch; the
    /// others get [`ClusterError::EpochConflict`] with the placement that won. `change`
    /// may run more than once (when the record changed without an epoch change) and
    /// must not touch the epoch.
    pub async fn bump_epoch(
        &self,
        volume: &str,
        expected_epoch: u64,
        mut change: impl FnMut(&mut VolumePlacement) + Send,
    ) -> Result<VolumePlacement, ClusterError> {
        let key = placement_key(volume);
        let write_error = |source| ClusterError::WritePlacement {
            volume: volume.to_owned(),
            source,
        };
        let Some((mut current, mut revision)) = self.placement(volume).await? else {
            return Err(ClusterError::NoPlacement {
                volume: volume.to_owned(),
            });
        };
        for _ in 0..BUMP_RETRIES {
            if current.epoch != expected_epoch {
                return Err(ClusterError::EpochConflict {
                    volume: volume.to_owned(),
                    expected: expected_epoch,
                    current: Box::new(current),
                });
            }
            let Some(next_epoch) = expected_epoch.checked_add(1) else {
                return Err(ClusterError::EpochOverflow {
                    volume: volume.to_owned(),
                });
            };
            let mut next = current.clone();
            change(&mut next);
            next.volume = volume.to_owned();
            next.epoch = next_epoch;
            let value = encode(&key, &next)?;
            let outcome = self
                .store
                .compare_and_swap(&key, Expect::Revision(revision), Some(&value))
                .await
                .map_err(write_error)?;
            match outcome {
                CasOutcome::Done(_) => return Ok(next),
                CasOutcome::Conflict(None) => {
                    return Err(ClusterError::NoPlacement {
                        volume: volume.to_owned(),
                    });
                }
                CasOutcome::Conflict(Some(found)) => {
                    current = decode(&key, &found.value)?;
                    revision = found.revision;
                }
            }
        }
        Err(ClusterError::PlacementContended {
            volume: volume.to_owned(),
        })
    }

    /// Store a tenant's wrapped key; fails if the tenant already has one (a key is
    /// never silently replaced: that would make the tenant's data unreadable).
    pub async fn create_tenant_key(&self, record: &TenantKeyRecord) -> Result<(), ClusterError> {
        let key = format!("{TENANT_KEY_PREFIX}{}", record.tenant);
        let value = encode(&key, record)?;
        let outcome = self
            .store
            .compare_and_swap(&key, Expect::Absent, Some(&value))
            .await
            .map_err(|source| ClusterError::TenantKey {
                tenant: record.tenant.clone(),
                source,
            })?;
        match outcome {
            CasOutcome::Done(_) => Ok(()),
            CasOutcome::Conflict(_) => Err(ClusterError::TenantKeyExists {
                tenant: record.tenant.clone(),
            }),
        }
    }

    /// A tenant's wrapped key.
    pub async fn tenant_key(&self, tenant: &str) -> Result<Option<TenantKeyRecord>, ClusterError> {
        let key = format!("{TENANT_KEY_PREFIX}{tenant}");
        let found = self
            .store
            .get(&key)
            .await
            .map_err(|source| ClusterError::TenantKey {
                tenant: tenant.to_owned(),
                source,
            })?;
        found.map(|v| decode(&key, &v.value)).transpose()
    }

    /// Delete a tenant's key (crypto-shredding: its data becomes unreadable); whether
    /// it existed.
    pub async fn delete_tenant_key(&self, tenant: &str) -> Result<bool, ClusterError> {
        let key = format!("{TENANT_KEY_PREFIX}{tenant}");
        self.store
            .delete(&key)
            .await
            .map_err(|source| ClusterError::TenantKey {
                tenant: tenant.to_owned(),
                source,
            })
    }
}
