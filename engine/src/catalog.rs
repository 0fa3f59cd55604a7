//! The node's catalog: tenants and volumes with their wrapped keys, kept as JSON records
//! in a small key-value store (`MetaKv`). Issue "three copies" moves this behind the
//! cluster metadata store (etcd / embedded); the records stay the same.

use serde::{Deserialize, Serialize};

/// Errors of the metadata key-value store.
#[derive(Debug, thiserror::Error)]
#[error("metadata store: {0}")]
pub struct MetaError(pub String);

/// A small durable key-value store for catalog records. `put` and `delete` are durable
/// when they return.
pub trait MetaKv: Send + Sync {
    /// Read a record.
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, MetaError>;
    /// Write a record durably.
    fn put(&self, key: &str, value: &[u8]) -> Result<(), MetaError>;
    /// Delete a record durably.
    fn delete(&self, key: &str) -> Result<(), MetaError>;
    /// Every record whose key starts with `prefix`, in key order.
    fn scan(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, MetaError>;
}

impl MetaKv for replica::Store {
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, MetaError> {
        self.get_meta(key).map_err(|e| MetaError(e.to_string()))
    }
    fn put(&self, key: &str, value: &[u8]) -> Result<(), MetaError> {
        self.put_meta(key, value, true)
            .map_err(|e| MetaError(e.to_string()))
    }
    fn delete(&self, key: &str) -> Result<(), MetaError> {
        self.delete_meta(key, true)
            .map_err(|e| MetaError(e.to_string()))
    }
    fn scan(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, MetaError> {
        self.scan_meta(prefix).map_err(|e| MetaError(e.to_string()))
    }
}

/// How a volume is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StorageClass {
    /// One fast copy on the node that serves it.
    Local,
    /// Three copies in three datacenters (not available on a single node yet).
    Replicated,
}

impl std::str::FromStr for StorageClass {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "local" => Ok(StorageClass::Local),
            "replicated" => Ok(StorageClass::Replicated),
            other => Err(format!(
                "unknown storage class {other:?} (expected local or replicated)"
            )),
        }
    }
}

impl std::fmt::Display for StorageClass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            StorageClass::Local => "local",
            StorageClass::Replicated => "replicated",
        })
    }
}

/// A tenant and its key, wrapped by the master key.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TenantRecord {
    /// Name.
    pub name: String,
    /// Numeric id, bound into every block tag.
    pub id: u64,
    /// Tenant key wrapped by the master key (hex).
    pub wrapped_key: String,
    /// Creation time, seconds since the epoch.
    pub created: u64,
}

/// A volume and its key, wrapped by its tenant's key.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VolumeRecord {
    /// Name (also the NBD export name).
    pub name: String,
    /// Numeric id: the block store's volume id, bound into every block tag.
    pub id: u64,
    /// Owning tenant's name.
    pub tenant: String,
    /// Owning tenant's id.
    pub tenant_id: u64,
    /// Size in bytes.
    pub size: u64,
    /// Storage class.
    pub class: StorageClass,
    /// Chunk size in bytes (a multiple of the block size).
    pub chunk_size: u64,
    /// Volume key wrapped by the tenant key (hex).
    pub wrapped_key: String,
    /// Creation time, seconds since the epoch.
    pub created: u64,
    /// Exported read-only: writes, trims and zeroing are refused.
    #[serde(default)]
    pub read_only: bool,
    /// For a clone: the snapshot it was cloned from (it reads its unwritten blocks
    /// there, sealed with the origin volume's key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<CloneOrigin>,
}

/// The snapshot a clone reads through to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloneOrigin {
    /// Origin volume's name.
    pub volume: String,
    /// Origin volume's id.
    pub volume_id: u64,
    /// Snapshot name.
    pub snapshot: String,
    /// The block store's snapshot id.
    pub snapshot_id: u64,
}

/// A snapshot of a volume: a read-only point-in-time view kept by the block store.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SnapshotRecord {
    /// Volume name.
    pub volume: String,
    /// Volume id.
    pub volume_id: u64,
    /// Snapshot name (unique per volume).
    pub name: String,
    /// The block store's snapshot id.
    pub id: u64,
    /// The volume's size when the snapshot was taken.
    pub size: u64,
    /// Creation time, seconds since the epoch.
    pub created: u64,
}

pub(crate) const TENANT_PREFIX: &str = "tenant/";
pub(crate) const VOLUME_PREFIX: &str = "volume/";
pub(crate) const NEXT_ID_KEY: &str = "counter/next-id";
pub(crate) const SNAPSHOT_PREFIX: &str = "snapshot/";

/// The record key of snapshot `name` of volume `volume` (volume names hold no `@`, so
/// `snapshot/<volume>@` prefixes exactly that volume's snapshots).
pub(crate) fn snapshot_key(volume: &str, name: &str) -> String {
    format!("{SNAPSHOT_PREFIX}{volume}@{name}")
}

/// Splits `VOLUME@SNAPSHOT`; `None` when there is no `@`.
pub fn split_snapshot_ref(s: &str) -> Option<(&str, &str)> {
    s.split_once('@')
}

/// The record key of a volume's version reservation.
pub(crate) fn sequence_key(volume_id: u64) -> String {
    format!("sequence/{volume_id:016x}")
}

/// Hex encoding for wrapped keys in JSON.
pub(crate) fn to_hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// Decode hex; None when malformed.
pub(crate) fn from_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| s.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()))
        .collect()
}

/// Validate a tenant or volume name: 1 to 128 characters of `[A-Za-z0-9._-]`, not
/// starting with a dot or dash.
pub fn validate_name(kind: &str, name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 128 {
        return Err(format!("{kind} name must be 1 to 128 characters"));
    }
    if name.starts_with(['.', '-']) {
        return Err(format!(
            "{kind} name {name:?} must not start with '.' or '-'"
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "{kind} name {name:?} contains {c:?}; use letters, digits, '.', '_' and '-'"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip_and_rejects_garbage() {
        assert_eq!(
            from_hex(&to_hex(&[0, 1, 0xab, 0xff])).unwrap(),
            vec![0, 1, 0xab, 0xff]
        );
        assert!(from_hex("abc").is_none());
        assert!(from_hex("zz").is_none());
    }

    #[test]
    fn names() {
        assert!(validate_name("volume", "vm-1.disk_0").is_ok());
        assert!(validate_name("volume", "").is_err());
        assert!(validate_name("volume", "-x").is_err());
        assert!(validate_name("volume", "a/b").is_err());
        assert!(validate_name("volume", &"a".repeat(129)).is_err());
    }
}
