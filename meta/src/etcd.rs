//! etcd backend, for clusters spanning hosts. Every key lives under a configurable
//! namespace (for example `/trireme/`), so a cluster can share an etcd with others.
//!
//! Compare-and-swap is one etcd transaction: `create_revision == 0` for
//! [`Expect::Absent`], `mod_revision == r` (and the key exists) for
//! [`Expect::Revision`]; on failure the same transaction reads the key back, so the
//! conflict reports the state that beat us. Leases are etcd leases: etcd counts whole
//! seconds, so a time to live is rounded up (and etcd raises it to its minimum,
//! about 2 s with default election settings).
//!
//! `changes_since` compares the key set at `since` (a historical read, which fails once
//! etcd compacted that revision) with the key set now, and reads the keys modified
//! after `since`: cost proportional to the keys under the prefix, bounded by `limit`.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, GetResponse, PutOptions, Txn, TxnOp,
    TxnOpResponse,
};

use crate::{
    BackendError, CasOutcome, Change, Changes, Entry, Expect, LeaseId, MetaError, MetaStore,
    Revision, Versioned,
};

/// Per-request timeout (a dead etcd fails calls instead of hanging them).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A handle on an etcd cluster, with every key under `namespace`. Cheap to clone.
#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
    endpoints: Vec<String>,
    namespace: String,
}

impl fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdStore")
            .field("endpoints", &self.endpoints)
            .field("namespace", &self.namespace)
            .finish_non_exhaustive()
    }
}

fn backend(e: etcd_client::Error) -> BackendError {
    Box::new(e)
}

fn revision(stored: i64) -> Result<Revision, BackendError> {
    u64::try_from(stored).map_err(|_| format!("etcd returned negative revision {stored}").into())
}

fn header_revision(header: Option<&etcd_client::ResponseHeader>) -> Result<Revision, BackendError> {
    match header {
        Some(h) => revision(h.revision()),
        None => Err("etcd response without header".into()),
    }
}

fn limit_i64(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

/// Whether etcd refused because the lease does not exist (expired or revoked).
fn lease_gone(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(status) => status.message().contains("lease not found"),
        etcd_client::Error::LeaseKeepAliveError(_) => true,
        _ => false,
    }
}

fn compacted(e: &etcd_client::Error) -> bool {
    matches!(e, etcd_client::Error::GRpcStatus(status)
        if status.message().contains("compacted"))
}

impl EtcdStore {
    /// Connect to etcd at `endpoints` (`http://host:port`), keeping every key under
    /// `namespace`.
    pub async fn connect<S: AsRef<str>>(
        endpoints: &[S],
        namespace: &str,
    ) -> Result<Self, MetaError> {
        let endpoints: Vec<String> = endpoints.iter().map(|e| e.as_ref().to_owned()).collect();
        let options = ConnectOptions::new()
            .with_connect_timeout(CONNECT_TIMEOUT)
            .with_timeout(REQUEST_TIMEOUT);
        let client = Client::connect(&endpoints, Some(options))
            .await
            .map_err(|e| MetaError::Open {
                location: endpoints.join(","),
                source: backend(e),
            })?;
        Ok(EtcdStore {
            client,
            endpoints,
            namespace: namespace.to_owned(),
        })
    }

    /// The namespace every key lives under.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    fn full_key(&self, key: &str) -> Vec<u8> {
        let mut full = Vec::with_capacity(self.namespace.len() + key.len());
        full.extend_from_slice(self.namespace.as_bytes());
        full.extend_from_slice(key.as_bytes());
        full
    }

    fn short_key(&self, full: &[u8]) -> Result<String, BackendError> {
        let short = full
            .strip_prefix(self.namespace.as_bytes())
            .ok_or("etcd returned a key outside the namespace")?;
        Ok(String::from_utf8(short.to_vec())?)
    }

    fn versioned(kv: &etcd_client::KeyValue) -> Result<Versioned, BackendError> {
        Ok(Versioned {
            value: kv.value().to_vec(),
            revision: revision(kv.mod_revision())?,
        })
    }

    /// Keys (and mod revisions) under a full prefix at `at` (0: now), at most `limit`.
    async fn key_set(
        &self,
        full_prefix: &[u8],
        at: i64,
        limit: usize,
        prefix: &str,
    ) -> Result<Result<GetResponse, etcd_client::Error>, MetaError> {
        let mut options = GetOptions::new()
            .with_prefix()
            .with_keys_only()
            .with_limit(limit_i64(limit.saturating_add(1)));
        if at > 0 {
            options = options.with_revision(at);
        }
        let answer = self.client.clone().get(full_prefix, Some(options)).await;
        if let Ok(resp) = &answer
            && (resp.kvs().len() > limit || resp.more())
        {
            return Err(MetaError::TooManyChanges {
                prefix: prefix.to_owned(),
                limit,
            });
        }
        Ok(answer)
    }
}

#[async_trait::async_trait]
impl MetaStore for EtcdStore {
    async fn get(&self, key: &str) -> Result<Option<Versioned>, MetaError> {
        let context = |source| MetaError::Get {
            key: key.to_owned(),
            source,
        };
        let resp = self
            .client
            .clone()
            .get(self.full_key(key), None)
            .await
            .map_err(|e| context(backend(e)))?;
        resp.kvs()
            .first()
            .map(Self::versioned)
            .transpose()
            .map_err(context)
    }

    async fn list(&self, prefix: &str, limit: usize) -> Result<Vec<Entry>, MetaError> {
        if limit == 0 {
            // etcd reads a limit of 0 as "no limit".
            return Ok(Vec::new());
        }
        let context = |source| MetaError::List {
            prefix: prefix.to_owned(),
            source,
        };
        let options = GetOptions::new().with_prefix().with_limit(limit_i64(limit));
        let resp = self
            .client
            .clone()
            .get(self.full_key(prefix), Some(options))
            .await
            .map_err(|e| context(backend(e)))?;
        resp.kvs()
            .iter()
            .map(|kv| {
                Ok(Entry {
                    key: self.short_key(kv.key())?,
                    value: kv.value().to_vec(),
                    revision: revision(kv.mod_revision())?,
                })
            })
            .collect::<Result<_, BackendError>>()
            .map_err(context)
    }

    async fn put(&self, key: &str, value: &[u8]) -> Result<Revision, MetaError> {
        let context = |source| MetaError::Put {
            key: key.to_owned(),
            source,
        };
        let resp = self
            .client
            .clone()
            .put(self.full_key(key), value, None)
            .await
            .map_err(|e| context(backend(e)))?;
        header_revision(resp.header()).map_err(context)
    }

    async fn delete(&self, key: &str) -> Result<bool, MetaError> {
        let resp = self
            .client
            .clone()
            .delete(self.full_key(key), None)
            .await
            .map_err(|e| MetaError::Delete {
                key: key.to_owned(),
                source: backend(e),
            })?;
        Ok(resp.deleted() > 0)
    }

    async fn compare_and_swap(
        &self,
        key: &str,
        expected: Expect,
        new: Option<&[u8]>,
    ) -> Result<CasOutcome, MetaError> {
        let context = |source| MetaError::CompareAndSwap {
            key: key.to_owned(),
            source,
        };
        let full = self.full_key(key);
        let conditions = match expected {
            Expect::Absent => vec![Compare::create_revision(full.clone(), CompareOp::Equal, 0)],
            // An absent key has mod_revision 0: require existence too.
            Expect::Revision(want) => vec![
                Compare::create_revision(full.clone(), CompareOp::Greater, 0),
                Compare::mod_revision(
                    full.clone(),
                    CompareOp::Equal,
                    i64::try_from(want).unwrap_or(i64::MAX),
                ),
            ],
        };
        let change = match new {
            Some(value) => TxnOp::put(full.clone(), value, None),
            None => TxnOp::delete(full.clone(), None),
        };
        let txn = Txn::new()
            .when(conditions)
            .and_then(vec![change])
            .or_else(vec![TxnOp::get(full, None)]);
        let resp = self
            .client
            .clone()
            .txn(txn)
            .await
            .map_err(|e| context(backend(e)))?;
        if resp.succeeded() {
            return Ok(CasOutcome::Done(
                header_revision(resp.header()).map_err(context)?,
            ));
        }
        let current = match resp.op_responses().first() {
            Some(TxnOpResponse::Get(get)) => get
                .kvs()
                .first()
                .map(Self::versioned)
                .transpose()
                .map_err(context)?,
            _ => return Err(context("etcd transaction failed without its read".into())),
        };
        Ok(CasOutcome::Conflict(current))
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, MetaError> {
        let seconds = ttl
            .as_secs()
            .saturating_add(u64::from(ttl.subsec_nanos() > 0));
        let seconds = match i64::try_from(seconds) {
            Ok(s) if s > 0 => s,
            _ => return Err(MetaError::InvalidTtl(ttl)),
        };
        let resp = self
            .client
            .clone()
            .lease_grant(seconds, None)
            .await
            .map_err(|e| MetaError::GrantLease {
                ttl,
                source: backend(e),
            })?;
        Ok(LeaseId(resp.id()))
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<(), MetaError> {
        // One request on a fresh keep-alive stream: the client library already
        // checks the answer's TTL (0 once the lease is gone).
        match self.client.clone().lease_keep_alive(lease.0).await {
            Ok(_) => Ok(()),
            Err(e) if lease_gone(&e) => Err(MetaError::LeaseExpired(lease)),
            Err(e) => Err(MetaError::KeepAlive {
                lease,
                source: backend(e),
            }),
        }
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<(), MetaError> {
        match self.client.clone().lease_revoke(lease.0).await {
            Ok(_) => Ok(()),
            Err(e) if lease_gone(&e) => Ok(()),
            Err(e) => Err(MetaError::RevokeLease {
                lease,
                source: backend(e),
            }),
        }
    }

    async fn put_with_lease(
        &self,
        key: &str,
        value: &[u8],
        lease: LeaseId,
    ) -> Result<Revision, MetaError> {
        let context = |source| MetaError::Put {
            key: key.to_owned(),
            source,
        };
        let options = PutOptions::new().with_lease(lease.0);
        let resp = match self
            .client
            .clone()
            .put(self.full_key(key), value, Some(options))
            .await
        {
            Ok(resp) => resp,
            Err(e) if lease_gone(&e) => return Err(MetaError::LeaseExpired(lease)),
            Err(e) => return Err(context(backend(e))),
        };
        header_revision(resp.header()).map_err(context)
    }

    async fn changes_since(
        &self,
        prefix: &str,
        since: Revision,
        limit: usize,
    ) -> Result<Changes, MetaError> {
        let context = |source| MetaError::ChangesSince {
            prefix: prefix.to_owned(),
            since,
            source,
        };
        let full_prefix = self.full_key(prefix);
        let now = self
            .key_set(&full_prefix, 0, limit, prefix)
            .await?
            .map_err(|e| context(backend(e)))?;
        let at = header_revision(now.header()).map_err(context)?;
        if since >= at {
            return Ok(Changes {
                revision: at,
                changes: Vec::new(),
            });
        }
        let since_i64 = i64::try_from(since).map_err(|e| context(Box::new(e)))?;
        let at_i64 = i64::try_from(at).map_err(|e| context(Box::new(e)))?;
        let mut changes: BTreeMap<Vec<u8>, Option<Versioned>> = BTreeMap::new();
        // Keys that existed at `since` and are gone now. Revision 0 means "now" to
        // etcd, and nothing existed before revision 1.
        if since > 0 {
            let before = match self.key_set(&full_prefix, since_i64, limit, prefix).await? {
                Ok(resp) => resp,
                Err(e) if compacted(&e) => return Err(MetaError::Compacted { since }),
                Err(e) => return Err(context(backend(e))),
            };
            let present: std::collections::BTreeSet<&[u8]> =
                now.kvs().iter().map(|kv| kv.key()).collect();
            for kv in before.kvs() {
                if !present.contains(kv.key()) {
                    changes.insert(kv.key().to_vec(), None);
                }
            }
        }
        // Keys written after `since`, with their values, from the same snapshot.
        if now.kvs().iter().any(|kv| kv.mod_revision() > since_i64) {
            let options = GetOptions::new()
                .with_prefix()
                .with_revision(at_i64)
                .with_min_mod_revision(since_i64.saturating_add(1));
            let written = match self.client.clone().get(full_prefix, Some(options)).await {
                Ok(resp) => resp,
                Err(e) if compacted(&e) => return Err(MetaError::Compacted { since }),
                Err(e) => return Err(context(backend(e))),
            };
            for kv in written.kvs() {
                changes.insert(
                    kv.key().to_vec(),
                    Some(Self::versioned(kv).map_err(context)?),
                );
            }
        }
        let changes = changes
            .into_iter()
            .map(|(key, current)| {
                Ok(Change {
                    key: self.short_key(&key)?,
                    current,
                })
            })
            .collect::<Result<_, BackendError>>()
            .map_err(context)?;
        Ok(Changes {
            revision: at,
            changes,
        })
    }

    async fn current_revision(&self) -> Result<Revision, MetaError> {
        let context = |source| MetaError::CurrentRevision { source };
        let options = GetOptions::new().with_keys_only().with_limit(1);
        let resp = self
            .client
            .clone()
            .get(self.full_key(""), Some(options))
            .await
            .map_err(|e| context(backend(e)))?;
        header_revision(resp.header()).map_err(context)
    }
}
