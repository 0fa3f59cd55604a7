//! One node's engine: the catalog of tenants and volumes, their keys, and open volumes.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use parking_lot::{Mutex, RwLock};
use replica::{Store, StoreError, StoreOptions};
use serde::Serialize;

use crate::catalog::{
    MetaError, MetaKv, NEXT_ID_KEY, SnapshotRecord, StorageClass, TENANT_PREFIX, TenantRecord,
    VOLUME_PREFIX, VolumeRecord, from_hex, snapshot_key, split_snapshot_ref, to_hex, validate_name,
};
use crate::crypto::{BlockCipher, CryptoError, SecretKey};
use crate::sequence::VersionCounter;
use crate::volume::{BLOCK, Volume, VolumeIdentity};

/// The tenant used when none is named.
pub const DEFAULT_TENANT: &str = "default";
/// Default chunk size: 4 MiB.
pub const DEFAULT_CHUNK_SIZE: u64 = 4 << 20;
/// Largest volume: 256 TiB.
pub const MAX_VOLUME_SIZE: u64 = 256 << 40;
/// Sizes are whole sectors.
pub const SIZE_ALIGNMENT: u64 = 512;

/// Errors of catalog operations.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// No volume of that name.
    #[error("no such volume: {0}")]
    NoSuchVolume(String),
    /// The name is taken.
    #[error("volume {0} already exists")]
    VolumeExists(String),
    /// No tenant of that name.
    #[error("no such tenant: {0}")]
    NoSuchTenant(String),
    /// The name is taken.
    #[error("tenant {0} already exists")]
    TenantExists(String),
    /// No snapshot of that name (`VOLUME@NAME`).
    #[error("no such snapshot: {0}")]
    NoSuchSnapshot(String),
    /// The snapshot name is taken (`VOLUME@NAME`).
    #[error("snapshot {0} already exists")]
    SnapshotExists(String),
    /// Refused in the current state (attached, has clones, ...); the message says why
    /// and what to do.
    #[error("{0}")]
    Busy(String),
    /// A request that can never succeed as given (bad name, bad size, shrink, ...).
    #[error("{0}")]
    Invalid(String),
    /// Not available on this node yet.
    #[error("{0}")]
    Unsupported(String),
    /// The block store failed.
    #[error("block store: {0}")]
    Store(#[from] StoreError),
    /// The metadata store failed.
    #[error(transparent)]
    Meta(#[from] MetaError),
    /// A key could not be unwrapped or made.
    #[error("key hierarchy: {0}")]
    Crypto(#[from] CryptoError),
    /// A stored record is unreadable.
    #[error("catalog record {key} is malformed: {reason}")]
    Malformed {
        /// Record key.
        key: String,
        /// What is wrong.
        reason: String,
    },
}

/// What a new volume should be.
#[derive(Debug, Clone)]
pub struct VolumeSpec {
    /// Name.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Tenant name (None: the default tenant, created on first use).
    pub tenant: Option<String>,
    /// Storage class.
    pub class: StorageClass,
    /// Chunk size in bytes (None: 4 MiB).
    pub chunk_size: Option<u64>,
}

/// A volume as the admin API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct VolumeInfo {
    /// Name.
    pub name: String,
    /// Tenant.
    pub tenant: String,
    /// Size in bytes.
    pub size: u64,
    /// Storage class.
    pub class: StorageClass,
    /// Chunk size in bytes.
    pub chunk_size: u64,
    /// Block size in bytes.
    pub block_size: u64,
    /// Bytes of storage in use.
    pub allocated_bytes: u64,
    /// Creation time, seconds since the epoch.
    pub created: u64,
    /// Exported read-only.
    pub read_only: bool,
    /// For a clone, the snapshot it was cloned from (`VOLUME@SNAPSHOT`).
    pub origin: Option<String>,
    /// Number of snapshots.
    pub snapshots: usize,
}

/// A tenant as the admin API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct TenantInfo {
    /// Name.
    pub name: String,
    /// Number of volumes.
    pub volumes: usize,
    /// Creation time, seconds since the epoch.
    pub created: u64,
}

/// The node's engine.
pub struct Engine {
    store: Arc<Store>,
    meta: Arc<dyn MetaKv>,
    master: SecretKey,
    /// Serialises catalog changes (create, delete, resize); I/O never takes it. Held
    /// only for short synchronous steps, never across an await.
    pub(crate) admin: Mutex<()>,
    /// Serialises the snapshot operations (create, delete, rollback, clone), which
    /// wait for the store; taken before `admin`, never while holding it.
    pub(crate) snapshot_admin: tokio::sync::Mutex<()>,
    /// Open volumes and snapshot views (`VOLUME@SNAPSHOT`), by export name.
    pub(crate) open: RwLock<HashMap<String, Arc<Volume>>>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("open_volumes", &self.open.read().len())
            .finish_non_exhaustive()
    }
}

pub(crate) fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn tenant_context(name: &str, id: u64) -> String {
    format!("trireme tenant key v1 {id} {name}")
}

fn volume_context(name: &str, id: u64) -> String {
    format!("trireme volume key v1 {id} {name}")
}

impl Engine {
    /// Open the block store under `data_dir` with the cluster master key.
    pub fn open(
        data_dir: &Path,
        master: SecretKey,
        options: StoreOptions,
    ) -> Result<Self, EngineError> {
        let store = Arc::new(Store::open(data_dir, options)?);
        let meta: Arc<dyn MetaKv> = store.clone();
        Ok(Engine {
            store,
            meta,
            master,
            admin: Mutex::new(()),
            snapshot_admin: tokio::sync::Mutex::new(()),
            open: RwLock::new(HashMap::new()),
        })
    }

    /// The block store (for tests and the node's status).
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    pub(crate) fn meta_get(&self, key: &str) -> Result<Option<Vec<u8>>, EngineError> {
        Ok(self.meta.get(key)?)
    }

    pub(crate) fn meta_delete(&self, key: &str) -> Result<(), EngineError> {
        Ok(self.meta.delete(key)?)
    }

    pub(crate) fn get_record<T: serde::de::DeserializeOwned>(
        &self,
        key: &str,
    ) -> Result<Option<T>, EngineError> {
        match self.meta.get(key)? {
            None => Ok(None),
            Some(bytes) => {
                serde_json::from_slice(&bytes)
                    .map(Some)
                    .map_err(|e| EngineError::Malformed {
                        key: key.to_string(),
                        reason: e.to_string(),
                    })
            }
        }
    }

    pub(crate) fn put_record<T: Serialize>(
        &self,
        key: &str,
        record: &T,
    ) -> Result<(), EngineError> {
        let bytes = serde_json::to_vec(record).map_err(|e| EngineError::Malformed {
            key: key.to_string(),
            reason: e.to_string(),
        })?;
        Ok(self.meta.put(key, &bytes)?)
    }

    pub(crate) fn scan_records<T: serde::de::DeserializeOwned>(
        &self,
        prefix: &str,
    ) -> Result<Vec<T>, EngineError> {
        self.meta
            .scan(prefix)?
            .into_iter()
            .map(|(key, bytes)| {
                serde_json::from_slice(&bytes).map_err(|e| EngineError::Malformed {
                    key,
                    reason: e.to_string(),
                })
            })
            .collect()
    }

    fn next_id(&self) -> Result<u64, EngineError> {
        let id =
            match self.meta.get(NEXT_ID_KEY)? {
                None => 1,
                Some(v) => u64::from_be_bytes(v.as_slice().try_into().map_err(|_| {
                    EngineError::Malformed {
                        key: NEXT_ID_KEY.into(),
                        reason: "not 8 bytes".into(),
                    }
                })?),
            };
        self.meta.put(NEXT_ID_KEY, &(id + 1).to_be_bytes())?;
        Ok(id)
    }

    fn create_tenant_locked(&self, name: &str) -> Result<TenantRecord, EngineError> {
        validate_name("tenant", name).map_err(EngineError::Invalid)?;
        let key = format!("{TENANT_PREFIX}{name}");
        if self.meta.get(&key)?.is_some() {
            return Err(EngineError::TenantExists(name.to_string()));
        }
        let id = self.next_id()?;
        let tenant_key = SecretKey::generate()?;
        let wrapped = self.master.wrap(&tenant_key, &tenant_context(name, id))?;
        let record = TenantRecord {
            name: name.to_string(),
            id,
            wrapped_key: to_hex(&wrapped),
            created: now(),
        };
        self.put_record(&key, &record)?;
        tracing::info!(tenant = name, id, "tenant created");
        Ok(record)
    }

    /// Create a tenant with a fresh key.
    pub fn create_tenant(&self, name: &str) -> Result<TenantInfo, EngineError> {
        let _g = self.admin.lock();
        let r = self.create_tenant_locked(name)?;
        Ok(TenantInfo {
            name: r.name,
            volumes: 0,
            created: r.created,
        })
    }

    /// Every tenant.
    pub fn list_tenants(&self) -> Result<Vec<TenantInfo>, EngineError> {
        let tenants: Vec<TenantRecord> = self.scan_records(TENANT_PREFIX)?;
        let volumes: Vec<VolumeRecord> = self.scan_records(VOLUME_PREFIX)?;
        Ok(tenants
            .into_iter()
            .map(|t| TenantInfo {
                volumes: volumes.iter().filter(|v| v.tenant == t.name).count(),
                name: t.name,
                created: t.created,
            })
            .collect())
    }

    /// Delete a tenant: its key is destroyed and its volumes with it. Returns the names
    /// of the deleted volumes.
    pub fn delete_tenant(&self, name: &str) -> Result<Vec<String>, EngineError> {
        let _g = self.admin.lock();
        let key = format!("{TENANT_PREFIX}{name}");
        if self.meta.get(&key)?.is_none() {
            return Err(EngineError::NoSuchTenant(name.to_string()));
        }
        // The key goes first: from here on the tenant's data is unreadable whatever
        // happens to the rest of the deletion (crypto-shredding).
        self.meta.delete(&key)?;
        let volumes: Vec<VolumeRecord> = self.scan_records(VOLUME_PREFIX)?;
        let mut deleted = Vec::new();
        // Clones before the volumes they read through to (clones never cross tenants),
        // so every deletion is allowed.
        let mut own: Vec<VolumeRecord> = volumes.into_iter().filter(|v| v.tenant == name).collect();
        while !own.is_empty() {
            let origins: Vec<u64> = own
                .iter()
                .filter_map(|v| v.origin.as_ref().map(|o| o.volume_id))
                .collect();
            let (leaves, rest): (Vec<VolumeRecord>, Vec<VolumeRecord>) =
                own.into_iter().partition(|v| !origins.contains(&v.id));
            if leaves.is_empty() {
                return Err(EngineError::Busy(format!(
                    "tenant {name}: its volumes' clone records form a loop; nothing more deleted"
                )));
            }
            for v in leaves {
                self.delete_volume_locked(&v)?;
                deleted.push(v.name);
            }
            own = rest;
        }
        tracing::info!(
            tenant = name,
            volumes = deleted.len(),
            "tenant deleted, key destroyed"
        );
        Ok(deleted)
    }

    pub(crate) fn tenant(&self, name: &str) -> Result<Option<TenantRecord>, EngineError> {
        self.get_record(&format!("{TENANT_PREFIX}{name}"))
    }

    pub(crate) fn volume_record(&self, name: &str) -> Result<VolumeRecord, EngineError> {
        self.get_record(&format!("{VOLUME_PREFIX}{name}"))?
            .ok_or_else(|| EngineError::NoSuchVolume(name.to_string()))
    }

    pub(crate) fn info(&self, r: &VolumeRecord) -> Result<VolumeInfo, EngineError> {
        let snapshots = self.meta.scan(&snapshot_key(&r.name, ""))?.len();
        Ok(VolumeInfo {
            name: r.name.clone(),
            tenant: r.tenant.clone(),
            size: r.size,
            class: r.class,
            chunk_size: r.chunk_size,
            block_size: BLOCK,
            allocated_bytes: self.store.allocated_blocks(r.id)?.saturating_mul(BLOCK),
            created: r.created,
            read_only: r.read_only,
            origin: r
                .origin
                .as_ref()
                .map(|o| format!("{}@{}", o.volume, o.snapshot)),
            snapshots,
        })
    }

    /// Create a volume.
    pub fn create_volume(&self, spec: &VolumeSpec) -> Result<VolumeInfo, EngineError> {
        validate_name("volume", &spec.name).map_err(EngineError::Invalid)?;
        validate_size(spec.size)?;
        if spec.class != StorageClass::Local {
            return Err(EngineError::Unsupported(format!(
                "storage class {} needs a cluster of three nodes; this node offers local",
                spec.class
            )));
        }
        let chunk_size = spec.chunk_size.unwrap_or(DEFAULT_CHUNK_SIZE);
        if chunk_size < BLOCK
            || !chunk_size.is_multiple_of(BLOCK)
            || !chunk_size.is_power_of_two()
            || chunk_size > 1 << 30
        {
            return Err(EngineError::Invalid(format!(
                "chunk size {chunk_size} must be a power of two between 4 KiB and 1 GiB"
            )));
        }
        let _g = self.admin.lock();
        let key = format!("{VOLUME_PREFIX}{}", spec.name);
        if self.meta.get(&key)?.is_some() {
            return Err(EngineError::VolumeExists(spec.name.clone()));
        }
        let tenant_name = spec.tenant.as_deref().unwrap_or(DEFAULT_TENANT);
        let tenant = match self.tenant(tenant_name)? {
            Some(t) => t,
            None if spec.tenant.is_none() => self.create_tenant_locked(DEFAULT_TENANT)?,
            None => return Err(EngineError::NoSuchTenant(tenant_name.to_string())),
        };
        let (id, wrapped_key) = self.new_volume_key(&tenant, &spec.name)?;
        let record = VolumeRecord {
            name: spec.name.clone(),
            id,
            tenant: tenant.name.clone(),
            tenant_id: tenant.id,
            size: spec.size,
            class: spec.class,
            chunk_size,
            wrapped_key,
            created: now(),
            read_only: false,
            origin: None,
        };
        self.store.create_volume(id)?;
        self.put_record(&key, &record)?;
        tracing::info!(volume = %spec.name, tenant = %tenant.name, size = spec.size, "volume created");
        self.info(&record)
    }

    /// Every volume.
    pub fn list_volumes(&self) -> Result<Vec<VolumeInfo>, EngineError> {
        let records: Vec<VolumeRecord> = self.scan_records(VOLUME_PREFIX)?;
        records.iter().map(|r| self.info(r)).collect()
    }

    /// One volume.
    pub fn volume_info(&self, name: &str) -> Result<VolumeInfo, EngineError> {
        let r = self.volume_record(name)?;
        self.info(&r)
    }

    /// Grow a volume; shrinking is refused.
    pub fn resize_volume(&self, name: &str, size: u64) -> Result<VolumeInfo, EngineError> {
        validate_size(size)?;
        let _g = self.admin.lock();
        let mut r = self.volume_record(name)?;
        if size < r.size {
            return Err(EngineError::Invalid(format!(
                "volume {name} is {} bytes; shrinking to {size} bytes is refused (it would destroy data)",
                r.size
            )));
        }
        r.size = size;
        self.put_record(&format!("{VOLUME_PREFIX}{name}"), &r)?;
        if let Some(v) = self.open.read().get(name) {
            v.set_size(size);
        }
        tracing::info!(volume = name, size, "volume resized");
        self.info(&r)
    }

    /// Make a volume read-only (or writable again). Connections opened before keep the
    /// flags they negotiated, but their writes are refused from now on.
    pub fn set_read_only(&self, name: &str, read_only: bool) -> Result<VolumeInfo, EngineError> {
        let _g = self.admin.lock();
        let mut r = self.volume_record(name)?;
        r.read_only = read_only;
        self.put_record(&format!("{VOLUME_PREFIX}{name}"), &r)?;
        if let Some(v) = self.open.read().get(name) {
            v.set_read_only(read_only);
        }
        tracing::info!(volume = name, read_only, "volume access changed");
        self.info(&r)
    }

    /// The names of the volumes cloned from a snapshot of volume `id` (from snapshot
    /// store id `snap` only, when given), sorted.
    pub(crate) fn clones_of(&self, id: u64, snap: Option<u64>) -> Result<Vec<String>, EngineError> {
        let volumes: Vec<VolumeRecord> = self.scan_records(VOLUME_PREFIX)?;
        let mut names: Vec<String> = volumes
            .into_iter()
            .filter(|v| {
                v.origin
                    .as_ref()
                    .is_some_and(|o| o.volume_id == id && snap.is_none_or(|s| s == o.snapshot_id))
            })
            .map(|v| v.name)
            .collect();
        names.sort();
        Ok(names)
    }

    fn delete_volume_locked(&self, r: &VolumeRecord) -> Result<(), EngineError> {
        let clones = self.clones_of(r.id, None)?;
        if !clones.is_empty() {
            return Err(EngineError::Busy(format!(
                "volume {} has clones ({}) reading its snapshots; delete them first",
                r.name,
                clones.join(", ")
            )));
        }
        self.meta.delete(&format!("{VOLUME_PREFIX}{}", r.name))?;
        let snapshots = self.meta.scan(&snapshot_key(&r.name, ""))?;
        {
            let mut open = self.open.write();
            if let Some(v) = open.remove(&r.name) {
                v.mark_deleted();
            }
            let views: Vec<String> = open
                .keys()
                .filter(|k| split_snapshot_ref(k).is_some_and(|(vol, _)| vol == r.name))
                .cloned()
                .collect();
            for view in views {
                if let Some(v) = open.remove(&view) {
                    v.mark_deleted();
                }
            }
        }
        VersionCounter::remove(self.meta.as_ref(), r.id)?;
        self.store.delete_volume(r.id)?;
        // The store dropped the snapshots with the volume; their records follow.
        for (key, _) in snapshots {
            self.meta.delete(&key)?;
        }
        tracing::info!(volume = %r.name, "volume deleted");
        Ok(())
    }

    /// Delete a volume and its data.
    pub fn delete_volume(&self, name: &str) -> Result<(), EngineError> {
        let _g = self.admin.lock();
        let r = self.volume_record(name)?;
        self.delete_volume_locked(&r)
    }

    fn unwrap_tenant_key(&self, t: &TenantRecord) -> Result<SecretKey, EngineError> {
        let wrapped = from_hex(&t.wrapped_key).ok_or_else(|| EngineError::Malformed {
            key: format!("{TENANT_PREFIX}{}", t.name),
            reason: "wrapped key is not hex".into(),
        })?;
        Ok(self
            .master
            .unwrap_key(&wrapped, &tenant_context(&t.name, t.id))?)
    }

    /// A new volume id and a fresh data key for volume `name` of `tenant`, wrapped by
    /// the tenant key (hex, as the volume record keeps it).
    pub(crate) fn new_volume_key(
        &self,
        tenant: &TenantRecord,
        name: &str,
    ) -> Result<(u64, String), EngineError> {
        let tenant_key = self.unwrap_tenant_key(tenant)?;
        let id = self.next_id()?;
        let volume_key = SecretKey::generate()?;
        let wrapped = tenant_key.wrap(&volume_key, &volume_context(name, id))?;
        Ok((id, to_hex(&wrapped)))
    }

    /// The volume's data key, unwrapped through its tenant key.
    fn volume_key(&self, r: &VolumeRecord) -> Result<SecretKey, EngineError> {
        let tenant = self
            .tenant(&r.tenant)?
            .ok_or_else(|| EngineError::NoSuchTenant(r.tenant.clone()))?;
        let tenant_key = self.unwrap_tenant_key(&tenant)?;
        let wrapped = from_hex(&r.wrapped_key).ok_or_else(|| EngineError::Malformed {
            key: format!("{VOLUME_PREFIX}{}", r.name),
            reason: "wrapped key is not hex".into(),
        })?;
        Ok(tenant_key.unwrap_key(&wrapped, &volume_context(&r.name, r.id))?)
    }

    /// Open a volume for I/O (shared by every connection to it), or, for a name
    /// `VOLUME@SNAPSHOT`, a read-only view of that snapshot.
    pub fn volume(&self, name: &str) -> Result<Arc<Volume>, EngineError> {
        if let Some(v) = self.open.read().get(name) {
            return Ok(v.clone());
        }
        let _g = self.admin.lock();
        if let Some(v) = self.open.read().get(name) {
            return Ok(v.clone());
        }
        let v = match split_snapshot_ref(name) {
            None => {
                let r = self.volume_record(name)?;
                let key = self.volume_key(&r)?;
                Arc::new(self.open_volume(&r, &key)?)
            }
            Some((volume, snapshot)) => {
                let r = self.volume_record(volume)?;
                let snap: SnapshotRecord = self
                    .get_record(&snapshot_key(volume, snapshot))?
                    .ok_or_else(|| EngineError::NoSuchSnapshot(name.to_string()))?;
                Arc::new(self.open_view(&r, &snap)?)
            }
        };
        self.open.write().insert(name.to_string(), v.clone());
        Ok(v)
    }

    fn identity(r: &VolumeRecord) -> VolumeIdentity {
        VolumeIdentity {
            name: r.name.clone(),
            id: r.id,
            tenant_id: r.tenant_id,
            class: r.class,
            chunk_size: r.chunk_size,
        }
    }

    /// The ciphers of the volumes a clone reads through to, nearest first (empty for a
    /// volume that is no clone).
    fn origin_ciphers(&self, r: &VolumeRecord) -> Result<Vec<(u64, BlockCipher)>, EngineError> {
        let mut ciphers = Vec::new();
        let mut next = r.origin.clone();
        while let Some(origin) = next {
            if ciphers.len() > 64 {
                return Err(EngineError::Malformed {
                    key: format!("{VOLUME_PREFIX}{}", r.name),
                    reason: "clone origins form a chain longer than 64".into(),
                });
            }
            let o = self.volume_record(&origin.volume)?;
            if o.id != origin.volume_id {
                return Err(EngineError::Malformed {
                    key: format!("{VOLUME_PREFIX}{}", r.name),
                    reason: format!("origin volume {} has another id", origin.volume),
                });
            }
            ciphers.push((o.id, BlockCipher::new(&self.volume_key(&o)?)));
            next = o.origin.clone();
        }
        Ok(ciphers)
    }

    /// A volume over the store, its blocks sealed and opened with `key` (and, for a
    /// clone, the blocks it reads through to opened with its origins' keys).
    fn open_volume(&self, r: &VolumeRecord, key: &SecretKey) -> Result<Volume, EngineError> {
        let versions = VersionCounter::open(self.meta.clone(), r.id)?;
        let mut ciphers = vec![(r.id, BlockCipher::new(key))];
        ciphers.extend(self.origin_ciphers(r)?);
        let v = Volume::with_sources(
            Self::identity(r),
            r.size,
            self.store.clone(),
            ciphers,
            Some(versions),
            None,
        );
        v.set_read_only(r.read_only);
        Ok(v)
    }

    /// A read-only view of snapshot `snap` of volume `r`, exported as `VOLUME@NAME`.
    fn open_view(&self, r: &VolumeRecord, snap: &SnapshotRecord) -> Result<Volume, EngineError> {
        let mut ident = Self::identity(r);
        ident.name = format!("{}@{}", r.name, snap.name);
        let mut ciphers = vec![(r.id, BlockCipher::new(&self.volume_key(r)?))];
        ciphers.extend(self.origin_ciphers(r)?);
        Ok(Volume::with_sources(
            ident,
            snap.size,
            self.store.clone(),
            ciphers,
            None,
            Some(snap.id),
        ))
    }

    /// Test hook: a volume opened with another volume's key, to prove that one
    /// tenant's key fails on another's blocks.
    #[doc(hidden)]
    pub fn volume_with_foreign_key(&self, name: &str, key_of: &str) -> Result<Volume, EngineError> {
        let r = self.volume_record(name)?;
        let foreign = self.volume_key(&self.volume_record(key_of)?)?;
        self.open_volume(&r, &foreign)
    }
}

fn validate_size(size: u64) -> Result<(), EngineError> {
    if size == 0 || !size.is_multiple_of(SIZE_ALIGNMENT) || size > MAX_VOLUME_SIZE {
        return Err(EngineError::Invalid(format!(
            "size {size} must be a positive multiple of {SIZE_ALIGNMENT} bytes, at most {MAX_VOLUME_SIZE}"
        )));
    }
    Ok(())
}

/// Parse a size such as `10G`, `512MiB`, `4096` (binary units: K, M, G, T = 1024^n).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| {
        format!("bad size {s:?}: expected a number with an optional unit (K, M, G, T)")
    })?;
    let shift = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        other => {
            return Err(format!(
                "bad size {s:?}: unknown unit {other:?} (use K, M, G or T)"
            ));
        }
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("bad size {s:?}: too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_units() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("64M").unwrap(), 64 << 20);
        assert_eq!(parse_size("10GiB").unwrap(), 10 << 30);
        assert_eq!(parse_size("1t").unwrap(), 1 << 40);
        assert!(parse_size("ten").is_err());
        assert!(parse_size("5X").is_err());
        assert!(parse_size("99999999999999T").is_err());
    }

    #[test]
    fn engine_and_volume_are_shareable() {
        fn check<T: Send + Sync>() {}
        check::<Engine>();
        check::<Volume>();
    }
}
