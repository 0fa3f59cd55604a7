//! Embedded single-host backend: one SQLite database in WAL mode, shared by every node
//! process of the host (each opens the same file), so a one-host cluster needs no etcd.
//!
//! The model copies etcd's: a global revision counter in the `store` table that every
//! writing transaction bumps once; each key keeps the revision of its last change; a
//! `history` table of (revision, key) feeds `changes_since` and is trimmed to the last
//! [`EmbeddedStore::DEFAULT_HISTORY_KEPT`] revisions (a setting stored in the
//! database, so every process agrees). Writes run in `BEGIN IMMEDIATE` transactions,
//! so two processes' compare-and-swaps serialize on SQLite's write lock (waiting up to
//! `BUSY_TIMEOUT`); `synchronous=FULL` makes a commit durable when it returns.
//!
//! Leases expire by wall clock (milliseconds since the Unix epoch, shared by the
//! processes of one host). There is no background sweeper: every operation first
//! deletes the keys of expired leases (one revision for all of them, as etcd does), so
//! no read ever returns an expired key except within the same millisecond. A wall
//! clock jump forward expires leases early; one backward keeps them longer.
//!
//! rusqlite is synchronous: each call runs on tokio's blocking pool, holding the
//! handle's single connection.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, OptionalExtension, Transaction, TransactionBehavior, params};

use crate::{
    BackendError, CasOutcome, Change, Changes, Entry, Expect, LeaseId, MetaError, MetaStore,
    Revision, Versioned,
};

/// How long a write waits for another process's write transaction.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);
/// Trim the history at most once every this many revisions.
const TRIM_EVERY_MAX: u64 = 256;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS store (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO store (name, value)
    VALUES ('revision', 0), ('compacted', 0), ('history_kept', 10000);
CREATE TABLE IF NOT EXISTS kv (
    key BLOB PRIMARY KEY,
    value BLOB NOT NULL,
    revision INTEGER NOT NULL,
    lease INTEGER
);
CREATE INDEX IF NOT EXISTS kv_by_lease ON kv (lease) WHERE lease IS NOT NULL;
CREATE TABLE IF NOT EXISTS leases (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ttl_ms INTEGER NOT NULL,
    expires_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS leases_by_expiry ON leases (expires_ms);
CREATE TABLE IF NOT EXISTS history (
    revision INTEGER NOT NULL,
    key BLOB NOT NULL,
    PRIMARY KEY (revision, key)
) WITHOUT ROWID;
";

/// The embedded metadata store: a handle on one SQLite file. Open the same file from
/// several processes (or twice in one) to share it.
#[derive(Debug, Clone)]
pub struct EmbeddedStore {
    inner: Arc<Handle>,
}

#[derive(Debug)]
struct Handle {
    path: PathBuf,
    conn: Mutex<Connection>,
}

/// Why a unit of work on the connection failed, before the operation's context is
/// attached.
enum Failure {
    Sqlite(rusqlite::Error),
    Corrupt(String),
    Meta(MetaError),
}

impl From<rusqlite::Error> for Failure {
    fn from(e: rusqlite::Error) -> Self {
        Failure::Sqlite(e)
    }
}

impl EmbeddedStore {
    /// Revisions of change history kept for `changes_since` in a new database, unless
    /// set otherwise with [`EmbeddedStore::set_history_kept`].
    pub const DEFAULT_HISTORY_KEPT: u64 = 10_000;

    /// Open (creating if needed) the store at `path`.
    pub async fn open(path: impl AsRef<Path>) -> Result<Self, MetaError> {
        let path = path.as_ref().to_path_buf();
        let location = path.display().to_string();
        let opened = tokio::task::spawn_blocking({
            let path = path.clone();
            move || open_connection(&path)
        })
        .await;
        let conn = match opened {
            Ok(Ok(conn)) => conn,
            Ok(Err(e)) => {
                return Err(MetaError::Open {
                    location,
                    source: Box::new(e),
                });
            }
            Err(e) => {
                return Err(MetaError::Open {
                    location,
                    source: Box::new(e),
                });
            }
        };
        Ok(EmbeddedStore {
            inner: Arc::new(Handle {
                path,
                conn: Mutex::new(conn),
            }),
        })
    }

    /// Keep the change history of the last `revisions` revisions (at least 1) for
    /// `changes_since`, for every process sharing this database. Older history is
    /// dropped as writes go on; pollers that fall further behind get
    /// [`MetaError::Compacted`].
    pub async fn set_history_kept(&self, revisions: u64) -> Result<(), MetaError> {
        let kept = to_sql(revisions.max(1));
        self.run(
            move |conn| {
                write(conn, |tx, _| {
                    tx.prepare_cached("UPDATE store SET value = ?1 WHERE name = 'history_kept'")?
                        .execute([kept])?;
                    Ok(())
                })
            },
            |source| MetaError::Put {
                key: "(history_kept setting)".to_owned(),
                source,
            },
        )
        .await
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Run `work` on the connection in the blocking pool; `context` turns a backend
    /// failure into the operation's error.
    async fn run<T, F, C>(&self, work: F, context: C) -> Result<T, MetaError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, Failure> + Send + 'static,
        C: FnOnce(BackendError) -> MetaError + Send,
    {
        let handle = Arc::clone(&self.inner);
        let joined = tokio::task::spawn_blocking(move || {
            // A panic in an earlier call cannot leave a transaction open (the
            // transaction rolls back when dropped), so a poisoned lock is usable.
            let mut conn = handle.conn.lock().unwrap_or_else(PoisonError::into_inner);
            work(&mut conn)
        })
        .await;
        match joined {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(Failure::Meta(e))) => Err(e),
            Ok(Err(Failure::Sqlite(e))) => Err(context(Box::new(e))),
            Ok(Err(Failure::Corrupt(what))) => Err(context(what.into())),
            Err(e) => Err(context(Box::new(e))),
        }
    }
}

fn open_connection(path: &Path) -> Result<Connection, rusqlite::Error> {
    let mut conn = Connection::open(path)?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    let mode: String =
        conn.pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(rusqlite::Error::InvalidParameterName(format!(
            "journal_mode stayed {mode} instead of wal"
        )));
    }
    // In WAL mode, NORMAL may lose the last commits on power loss; FULL syncs the
    // WAL at every commit, which is what "durable when the call returns" needs.
    conn.pragma_update(None, "synchronous", "FULL")?;
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    tx.execute_batch(SCHEMA)?;
    tx.commit()?;
    Ok(conn)
}

/// Milliseconds since the Unix epoch (0 before it, saturating far after it).
fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// The first key after every key that starts with `prefix`, or None when no such
/// bound exists (empty prefix or all 0xff).
fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

fn to_revision(stored: i64) -> Result<Revision, Failure> {
    u64::try_from(stored).map_err(|_| Failure::Corrupt(format!("negative revision {stored}")))
}

fn to_key(stored: Vec<u8>) -> Result<String, Failure> {
    String::from_utf8(stored).map_err(|e| Failure::Corrupt(format!("key is not UTF-8: {e}")))
}

fn to_sql(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn sql_limit(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

/// A writing transaction: takes the write lock first (so a compare-and-swap reads
/// what it will overwrite) and deletes the keys of expired leases.
fn write<T>(
    conn: &mut Connection,
    work: impl FnOnce(&Transaction<'_>, i64) -> Result<T, Failure>,
) -> Result<T, Failure> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let now = now_ms();
    sweep_expired(&tx, now)?;
    let out = work(&tx, now)?;
    tx.commit()?;
    Ok(out)
}

/// A reading transaction (one snapshot), after sweeping expired leases if any.
fn read<T>(
    conn: &mut Connection,
    work: impl FnOnce(&Transaction<'_>) -> Result<T, Failure>,
) -> Result<T, Failure> {
    let due: bool = conn
        .prepare_cached("SELECT EXISTS (SELECT 1 FROM leases WHERE expires_ms <= ?1)")?
        .query_row([now_ms()], |row| row.get(0))?;
    if due {
        write(conn, |_, _| Ok(()))?;
    }
    let tx = conn.transaction_with_behavior(TransactionBehavior::Deferred)?;
    let out = work(&tx)?;
    tx.commit()?;
    Ok(out)
}

fn current_revision(tx: &Transaction<'_>) -> Result<Revision, Failure> {
    let stored: i64 = tx
        .prepare_cached("SELECT value FROM store WHERE name = 'revision'")?
        .query_row([], |row| row.get(0))?;
    to_revision(stored)
}

/// Take the next revision for this transaction's changes.
fn bump_revision(tx: &Transaction<'_>) -> Result<Revision, Failure> {
    let stored: i64 = tx
        .prepare_cached(
            "UPDATE store SET value = value + 1 WHERE name = 'revision' RETURNING value",
        )?
        .query_row([], |row| row.get(0))?;
    let revision = to_revision(stored)?;
    let kept: i64 = tx
        .prepare_cached("SELECT value FROM store WHERE name = 'history_kept'")?
        .query_row([], |row| row.get(0))?;
    let kept = to_revision(kept)?;
    let trim_every = (kept / 4).clamp(1, TRIM_EVERY_MAX);
    if revision.is_multiple_of(trim_every) && revision > kept {
        let floor = to_sql(revision - kept);
        tx.prepare_cached("DELETE FROM history WHERE revision <= ?1")?
            .execute([floor])?;
        tx.prepare_cached("UPDATE store SET value = max(value, ?1) WHERE name = 'compacted'")?
            .execute([floor])?;
    }
    Ok(revision)
}

fn read_key(tx: &Transaction<'_>, key: &[u8]) -> Result<Option<Versioned>, Failure> {
    let row: Option<(Vec<u8>, i64)> = tx
        .prepare_cached("SELECT value, revision FROM kv WHERE key = ?1")?
        .query_row([key], |row| Ok((row.get(0)?, row.get(1)?)))
        .optional()?;
    row.map(|(value, revision)| {
        Ok(Versioned {
            value,
            revision: to_revision(revision)?,
        })
    })
    .transpose()
}

fn write_key(
    tx: &Transaction<'_>,
    key: &[u8],
    value: &[u8],
    lease: Option<i64>,
) -> Result<Revision, Failure> {
    let revision = bump_revision(tx)?;
    tx.prepare_cached(
        "INSERT INTO kv (key, value, revision, lease) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (key) DO UPDATE SET
             value = excluded.value, revision = excluded.revision, lease = excluded.lease",
    )?
    .execute(params![key, value, to_sql(revision), lease])?;
    tx.prepare_cached("INSERT OR IGNORE INTO history (revision, key) VALUES (?1, ?2)")?
        .execute(params![to_sql(revision), key])?;
    Ok(revision)
}

/// Delete one key; the revision of the deletion, None when it did not exist.
fn delete_key(tx: &Transaction<'_>, key: &[u8]) -> Result<Option<Revision>, Failure> {
    let deleted = tx
        .prepare_cached("DELETE FROM kv WHERE key = ?1")?
        .execute([key])?;
    if deleted == 0 {
        return Ok(None);
    }
    let revision = bump_revision(tx)?;
    tx.prepare_cached("INSERT OR IGNORE INTO history (revision, key) VALUES (?1, ?2)")?
        .execute(params![to_sql(revision), key])?;
    Ok(Some(revision))
}

/// Delete a lease and its keys, all at one revision (taken on first need).
fn end_lease(
    tx: &Transaction<'_>,
    lease: i64,
    revision: &mut Option<Revision>,
) -> Result<(), Failure> {
    let keys: Vec<Vec<u8>> = tx
        .prepare_cached("SELECT key FROM kv WHERE lease = ?1")?
        .query_map([lease], |row| row.get(0))?
        .collect::<Result<_, _>>()?;
    if !keys.is_empty() {
        let at = match *revision {
            Some(at) => at,
            None => {
                let at = bump_revision(tx)?;
                *revision = Some(at);
                at
            }
        };
        let mut log =
            tx.prepare_cached("INSERT OR IGNORE INTO history (revision, key) VALUES (?1, ?2)")?;
        for key in &keys {
            log.execute(params![to_sql(at), key])?;
        }
        tx.prepare_cached("DELETE FROM kv WHERE lease = ?1")?
            .execute([lease])?;
    }
    tx.prepare_cached("DELETE FROM leases WHERE id = ?1")?
        .execute([lease])?;
    Ok(())
}

fn sweep_expired(tx: &Transaction<'_>, now: i64) -> Result<(), Failure> {
    let expired: Vec<i64> = tx
        .prepare_cached("SELECT id FROM leases WHERE expires_ms <= ?1")?
        .query_map([now], |row| row.get(0))?
        .collect::<Result<_, _>>()?;
    let mut revision = None;
    for lease in expired {
        end_lease(tx, lease, &mut revision)?;
    }
    Ok(())
}

fn lease_is_live(tx: &Transaction<'_>, lease: i64) -> Result<bool, Failure> {
    Ok(tx
        .prepare_cached("SELECT EXISTS (SELECT 1 FROM leases WHERE id = ?1)")?
        .query_row([lease], |row| row.get(0))?)
}

#[async_trait::async_trait]
impl MetaStore for EmbeddedStore {
    async fn get(&self, key: &str) -> Result<Option<Versioned>, MetaError> {
        let owned = key.to_owned();
        self.run(
            move |conn| read(conn, |tx| read_key(tx, owned.as_bytes())),
            |source| MetaError::Get {
                key: key.to_owned(),
                source,
            },
        )
        .await
    }

    async fn list(&self, prefix: &str, limit: usize) -> Result<Vec<Entry>, MetaError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let owned = prefix.to_owned();
        self.run(
            move |conn| {
                read(conn, |tx| {
                    let start = owned.as_bytes();
                    let end = prefix_end(start);
                    let rows: Vec<(Vec<u8>, Vec<u8>, i64)> = tx
                        .prepare_cached(
                            "SELECT key, value, revision FROM kv
                             WHERE key >= ?1 AND (?2 IS NULL OR key < ?2)
                             ORDER BY key LIMIT ?3",
                        )?
                        .query_map(params![start, end, sql_limit(limit)], |row| {
                            Ok((row.get(0)?, row.get(1)?, row.get(2)?))
                        })?
                        .collect::<Result<_, _>>()?;
                    rows.into_iter()
                        .map(|(key, value, revision)| {
                            Ok(Entry {
                                key: to_key(key)?,
                                value,
                                revision: to_revision(revision)?,
                            })
                        })
                        .collect()
                })
            },
            |source| MetaError::List {
                prefix: prefix.to_owned(),
                source,
            },
        )
        .await
    }

    async fn put(&self, key: &str, value: &[u8]) -> Result<Revision, MetaError> {
        let (owned, value) = (key.to_owned(), value.to_vec());
        self.run(
            move |conn| write(conn, |tx, _| write_key(tx, owned.as_bytes(), &value, None)),
            |source| MetaError::Put {
                key: key.to_owned(),
                source,
            },
        )
        .await
    }

    async fn delete(&self, key: &str) -> Result<bool, MetaError> {
        let owned = key.to_owned();
        self.run(
            move |conn| {
                write(
                    conn,
                    |tx, _| Ok(delete_key(tx, owned.as_bytes())?.is_some()),
                )
            },
            |source| MetaError::Delete {
                key: key.to_owned(),
                source,
            },
        )
        .await
    }

    async fn compare_and_swap(
        &self,
        key: &str,
        expected: Expect,
        new: Option<&[u8]>,
    ) -> Result<CasOutcome, MetaError> {
        let (owned, new) = (key.to_owned(), new.map(<[u8]>::to_vec));
        self.run(
            move |conn| {
                write(conn, |tx, _| {
                    let key = owned.as_bytes();
                    let current = read_key(tx, key)?;
                    let holds = match (expected, &current) {
                        (Expect::Absent, None) => true,
                        (Expect::Revision(want), Some(found)) => found.revision == want,
                        _ => false,
                    };
                    if !holds {
                        return Ok(CasOutcome::Conflict(current));
                    }
                    let revision = match new {
                        Some(value) => write_key(tx, key, &value, None)?,
                        None => match delete_key(tx, key)? {
                            Some(revision) => revision,
                            None => current_revision(tx)?,
                        },
                    };
                    Ok(CasOutcome::Done(revision))
                })
            },
            |source| MetaError::CompareAndSwap {
                key: key.to_owned(),
                source,
            },
        )
        .await
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, MetaError> {
        let ttl_ms = match i64::try_from(ttl.as_millis()) {
            Ok(ms) if ms > 0 => ms,
            _ => return Err(MetaError::InvalidTtl(ttl)),
        };
        self.run(
            move |conn| {
                write(conn, |tx, now| {
                    let id: i64 = tx
                        .prepare_cached(
                            "INSERT INTO leases (ttl_ms, expires_ms) VALUES (?1, ?2) RETURNING id",
                        )?
                        .query_row(params![ttl_ms, now.saturating_add(ttl_ms)], |row| {
                            row.get(0)
                        })?;
                    Ok(LeaseId(id))
                })
            },
            |source| MetaError::GrantLease { ttl, source },
        )
        .await
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<(), MetaError> {
        self.run(
            move |conn| {
                write(conn, |tx, now| {
                    let renewed = tx
                        .prepare_cached("UPDATE leases SET expires_ms = ?1 + ttl_ms WHERE id = ?2")?
                        .execute(params![now, lease.0])?;
                    if renewed == 0 {
                        return Err(Failure::Meta(MetaError::LeaseExpired(lease)));
                    }
                    Ok(())
                })
            },
            |source| MetaError::KeepAlive { lease, source },
        )
        .await
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<(), MetaError> {
        self.run(
            move |conn| write(conn, |tx, _| end_lease(tx, lease.0, &mut None)),
            |source| MetaError::RevokeLease { lease, source },
        )
        .await
    }

    async fn put_with_lease(
        &self,
        key: &str,
        value: &[u8],
        lease: LeaseId,
    ) -> Result<Revision, MetaError> {
        let (owned, value) = (key.to_owned(), value.to_vec());
        self.run(
            move |conn| {
                write(conn, |tx, _| {
                    if !lease_is_live(tx, lease.0)? {
                        return Err(Failure::Meta(MetaError::LeaseExpired(lease)));
                    }
                    write_key(tx, owned.as_bytes(), &value, Some(lease.0))
                })
            },
            |source| MetaError::Put {
                key: key.to_owned(),
                source,
            },
        )
        .await
    }

    async fn changes_since(
        &self,
        prefix: &str,
        since: Revision,
        limit: usize,
    ) -> Result<Changes, MetaError> {
        let owned = prefix.to_owned();
        self.run(
            move |conn| {
                read(conn, |tx| {
                    let compacted: i64 = tx
                        .prepare_cached("SELECT value FROM store WHERE name = 'compacted'")?
                        .query_row([], |row| row.get(0))?;
                    if since < to_revision(compacted)? {
                        return Err(Failure::Meta(MetaError::Compacted { since }));
                    }
                    let revision = current_revision(tx)?;
                    if since >= revision {
                        return Ok(Changes {
                            revision,
                            changes: Vec::new(),
                        });
                    }
                    let start = owned.as_bytes();
                    let end = prefix_end(start);
                    let keys: Vec<Vec<u8>> = tx
                        .prepare_cached(
                            "SELECT DISTINCT key FROM history
                             WHERE revision > ?1 AND key >= ?2 AND (?3 IS NULL OR key < ?3)
                             ORDER BY key LIMIT ?4",
                        )?
                        .query_map(
                            params![
                                to_sql(since),
                                start,
                                end,
                                sql_limit(limit.saturating_add(1))
                            ],
                            |row| row.get(0),
                        )?
                        .collect::<Result<_, _>>()?;
                    if keys.len() > limit {
                        return Err(Failure::Meta(MetaError::TooManyChanges {
                            prefix: owned.clone(),
                            limit,
                        }));
                    }
                    let changes = keys
                        .into_iter()
                        .map(|key| {
                            let current = read_key(tx, &key)?;
                            Ok(Change {
                                key: to_key(key)?,
                                current,
                            })
                        })
                        .collect::<Result<_, Failure>>()?;
                    Ok(Changes { revision, changes })
                })
            },
            |source| MetaError::ChangesSince {
                prefix: prefix.to_owned(),
                since,
                source,
            },
        )
        .await
    }

    async fn current_revision(&self) -> Result<Revision, MetaError> {
        self.run(
            |conn| read(conn, current_revision),
            |source| MetaError::CurrentRevision { source },
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::{EmbeddedStore, SCHEMA, prefix_end};

    #[test]
    fn schema_default_history_matches_the_constant() {
        assert!(SCHEMA.contains(&format!(
            "('history_kept', {})",
            EmbeddedStore::DEFAULT_HISTORY_KEPT
        )));
    }

    #[test]
    fn prefix_end_bounds_the_prefix() {
        assert_eq!(prefix_end(b"nodes/"), Some(b"nodes0".to_vec()));
        assert_eq!(prefix_end(b"a\xff"), Some(b"b".to_vec()));
        assert_eq!(prefix_end(b"\xff\xff"), None);
        assert_eq!(prefix_end(b""), None);
    }
}
