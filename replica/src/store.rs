//! The block store: volumes of 4 KiB blocks written redirect-on-write to data files,
//! indexed in rocksdb.
//!
//! A write goes to freshly allocated slots first; only when the data is in the file
//! does one rocksdb batch switch the index entries to the new slots, so a block reads
//! as its old or its new version, never a mix. The slots the index stopped using are
//! reused only after the next [`Store::sync`], so a durable index entry never points at
//! a slot that was overwritten. See `slots.rs` for the life of a slot.
//!
//! Durability (see `design/DURABILITY.md`): rocksdb writes go to its WAL without a
//! sync; `sync` first fdatasyncs every data file written since the previous sync and
//! then syncs the WAL, so a synced index entry always points at synced data. A process
//! kill loses nothing that completed (the page cache survives it). A power cut loses
//! what was not synced, and may keep the index entry of a write whose data it lost (the
//! WAL reached the disk, the device cache holding the data did not). So that such a
//! block reads as its last durable version rather than failing its checksum:
//!
//! - Syncs are counted in *generations*. A sync closes the current generation `g`
//!   (entries committed from then on get `g + 1`), fdatasyncs the data files, and ends
//!   with a synced rocksdb write of the record `synced generation = g`, which also syncs
//!   the WAL. Every entry of generation `<= g` then has its index entry and its data on
//!   disk: its data was written before its entry was committed, hence before `g` was
//!   closed, hence before the fdatasync was issued.
//! - Each index entry records its generation and the older versions of the block that
//!   may be its last durable one (the newest version of generation `<= k` for every
//!   generation `k` that may still turn out to be the last completed sync; see
//!   `index.rs`). Their slots are not reused before that is settled: a slot freed by an
//!   overwrite is reused only after a sync that made the overwriting entry durable.
//! - `open` reads the data of every entry of a generation after the last completed
//!   sync and checks its CRC. An entry whose data did not land is replaced by its last
//!   durable version, or removed if it has none. The repairs are made durable with the
//!   data files and a new synced generation before the free slots are rebuilt, so every
//!   entry is then durable and the slots of the versions no longer needed are free.
//!
//! Snapshots and clones (`store/snapshots.rs`, lookups in `store/view.rs`):
//!
//! - Each volume has a *live generation* `c` (persisted as the volume record's next
//!   birth; never goes down). A version written now is *born* in `c`. Creating a
//!   snapshot takes `s = c` and moves `c` to `s + 1` under the volume's commit lock, so
//!   every write whose index commit finished is in it and none after. No data is copied:
//!   the snapshot is the set of versions with `birth <= s` alive at that moment.
//! - When an overwrite, trim or rollback replaces a version born in `b` and some
//!   snapshot lies in `[b, c)` — since every snapshot is below `c`, simply when the
//!   newest snapshot is `>= b`, an O(1) test against the in-memory snapshot list — the
//!   version moves, in the same rocksdb batch, to the `history` column family with death
//!   `c`, instead of having its slot freed. Snapshot `s` reads the history version with
//!   `birth <= s < death`, else the live entry if its `birth <= s`, else (a clone) the
//!   origin's snapshot, else nothing. Live reads and writes do no per-snapshot work.
//! - Invariant: every slot is referenced by at most one live entry or history entry.
//!   Rollback copies the data it restores to new slots (it is rare and its cost is the
//!   blocks changed since the snapshot) rather than sharing slots between the history
//!   and the live index, so freeing a version never needs reference counts, and `open`
//!   can keep treating a slot referenced twice as corruption.
//! - Invariant: every history version is durable (data and index): a version moves to
//!   the history only for a snapshot taken after it was written, whose creation synced
//!   before its record was written. A snapshot whose creation did not finish has no
//!   record; `open` drops the history versions no recorded snapshot reads.
//! - Power loss: when `open` puts back the last durable version `V` of a block whose
//!   unsynced overwrite lost its data, a history copy of `V` made by that overwrite is
//!   removed in the same repair batch, so `V`'s slot stays referenced once.
//! - Deleting a snapshot removes its record first (synced), then the history versions no
//!   other snapshot reads; their slots follow the normal freed-after-sync path. `open`
//!   finishes a deletion cut short. A snapshot that clones read through cannot be
//!   deleted, nor can a volume with clones: both are refused with the clones named.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::io;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::{Mutex, RwLock};
use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamily, ColumnFamilyDescriptor, DB, DBRawIterator, Options,
    ReadOptions, WriteBatch, WriteOptions,
};

use crate::block::{BLOCK_BYTES, Block, BlockMeta, BlockWrite, Extent, SnapId, VolumeId};
use crate::datafile::DataFile;
use crate::error::StoreError;
use crate::index::{self, HISTORY_CF, HistoryEntry, INDEX_CF, IndexEntry, META_CF, Version};
use crate::slots::{self, SlotMap, SlotRun};
use crate::uring::{IoPart, MAX_PART_BLOCKS, Ring};

/// Most blocks one `write_blocks` or `read_blocks` call may carry (32 MiB).
pub const MAX_BLOCKS_PER_IO: usize = 8192;

/// Runs of at least this many blocks are read into one contiguous buffer.
const SPAN_READ_MIN_BLOCKS: usize = 8;

/// Contiguous read buffers kept for reuse.
const SPAN_POOL: usize = 16;

/// Largest read buffer kept for reuse (1 MiB), which bounds the pool to 16 MiB.
const SPAN_POOL_MAX_BLOCKS: usize = 256;

/// Key of the metadata record holding the last completed sync generation (u64 LE).
/// Keys under `replica/` are reserved for the store.
const SYNCED_GENERATION_KEY: &str = "replica/synced-generation";

/// Prefix of the volume records: `replica/volume/<vol hex>` -> next birth (u64 LE), then
/// for a clone its origin volume and snapshot (u64 LE each).
const VOLUME_RECORD_PREFIX: &str = "replica/volume/";

/// Prefix of the snapshot records: `replica/snapshot/<vol hex>/<snap hex>` -> empty.
const SNAPSHOT_RECORD_PREFIX: &str = "replica/snapshot/";

/// Most snapshots a volume may have.
pub const MAX_SNAPSHOTS: usize = 4096;

/// Longest chain of clones (a clone of a clone ...) a read may follow.
pub const MAX_CLONE_DEPTH: usize = 16;

/// Prefix of the metadata keys reserved for the store itself.
const RESERVED_META_PREFIX: &str = "replica/";

/// Index entries a discard removes per rocksdb batch; bounds the memory and the time the
/// volume's commit lock is held for a discard of a whole disk.
const DISCARD_BATCH: u64 = 16384;

/// Blocks a view's allocation map looks up at a time (bounds its memory).
const EXTENT_WINDOW: u64 = 65536;

/// How the store is opened.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Try O_DIRECT for data files; fall back to buffered I/O if the filesystem
    /// refuses it (EINVAL).
    pub direct_io: bool,
    /// Submission queue entries of the io_uring (in-flight I/O beyond this waits).
    pub ring_entries: u32,
}

impl Default for StoreOptions {
    fn default() -> StoreOptions {
        StoreOptions {
            direct_io: true,
            ring_entries: 256,
        }
    }
}

/// One volume: its data file, slot map and live block count.
#[derive(Debug)]
struct Volume {
    id: VolumeId,
    file: DataFile,
    slots: Mutex<SlotMap>,
    /// Serialises index commits of the volume (their version checks read, compare and
    /// write) with each other, with snapshot creation and with deletion.
    commit: Mutex<VolumeState>,
    /// Blocks with an index entry holding data (tombstones are not counted).
    live: AtomicU64,
    /// For a clone: the volume and snapshot its unwritten blocks read through to.
    origin: Option<(VolumeId, SnapId)>,
    /// Serialises snapshot operations (create, delete, rollback, cloning from it).
    admin: tokio::sync::Mutex<()>,
}

impl Volume {
    fn new(
        id: VolumeId,
        file: DataFile,
        slots: SlotMap,
        live: u64,
        origin: Option<(VolumeId, SnapId)>,
        state: VolumeState,
    ) -> Volume {
        Volume {
            id,
            file,
            slots: Mutex::new(slots),
            commit: Mutex::new(state),
            live: AtomicU64::new(live),
            origin,
            admin: tokio::sync::Mutex::new(()),
        }
    }
}

/// What commits of a volume read and snapshot operations change, under its commit lock.
#[derive(Debug)]
struct VolumeState {
    /// The volume was deleted.
    deleted: bool,
    /// Live generation: the birth of versions written now; above every snapshot.
    birth: u64,
    /// Snapshots: `true` once recorded, `false` while being created. Writers keep the
    /// versions of both.
    snapshots: BTreeMap<SnapId, bool>,
}

impl VolumeState {
    fn new(birth: u64, snapshots: impl IntoIterator<Item = SnapId>) -> VolumeState {
        VolumeState {
            deleted: false,
            birth: birth.max(1),
            snapshots: snapshots.into_iter().map(|s| (s, true)).collect(),
        }
    }

    /// Whether a version born in `birth`, replaced now, is read by a snapshot: one lies
    /// in `[birth, self.birth)`, and all of them are below `self.birth`.
    fn keeps(&self, birth: u64) -> bool {
        self.snapshots
            .last_key_value()
            .is_some_and(|(&newest, _)| newest >= birth)
    }

    /// Whether `snap` is a recorded snapshot.
    fn has(&self, snap: SnapId) -> bool {
        self.snapshots.get(&snap) == Some(&true)
    }

    /// A version the live entry of `block` stops pointing at (overwrite, trim,
    /// rollback): moved to the history in `batch` when a snapshot reads it, else its slot
    /// is to be freed after the next sync.
    fn retire(
        &self,
        history: &ColumnFamily,
        vol: VolumeId,
        block: u64,
        version: Version,
        batch: &mut WriteBatch,
        freed: &mut Vec<u64>,
    ) {
        if self.keeps(version.birth) {
            let entry = HistoryEntry {
                version,
                death: self.birth,
            };
            batch.put_cf(
                history,
                index::history_key(vol, block, version.birth),
                entry.encode(),
            );
        } else if let Some(slot) = version.data_slot() {
            freed.push(slot);
        }
    }
}

/// The durable record of a volume's snapshot state (see [`VOLUME_RECORD_PREFIX`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct VolumeRecord {
    next_birth: u64,
    origin: Option<(VolumeId, SnapId)>,
}

impl VolumeRecord {
    fn encode(&self) -> Vec<u8> {
        let mut value = self.next_birth.to_le_bytes().to_vec();
        if let Some((vol, snap)) = self.origin {
            value.extend_from_slice(&vol.to_le_bytes());
            value.extend_from_slice(&snap.to_le_bytes());
        }
        value
    }

    fn decode(value: &[u8]) -> Option<VolumeRecord> {
        let word = |i: usize| -> Option<u64> {
            Some(u64::from_le_bytes(
                value.get(i * 8..i * 8 + 8)?.try_into().ok()?,
            ))
        };
        match value.len() {
            8 => Some(VolumeRecord {
                next_birth: word(0)?,
                origin: None,
            }),
            24 => Some(VolumeRecord {
                next_birth: word(0)?,
                origin: Some((word(1)?, word(2)?)),
            }),
            _ => None,
        }
    }
}

fn volume_record_key(vol: VolumeId) -> String {
    format!("{VOLUME_RECORD_PREFIX}{vol:016x}")
}

fn snapshot_record_prefix(vol: VolumeId) -> String {
    format!("{SNAPSHOT_RECORD_PREFIX}{vol:016x}/")
}

fn snapshot_record_key(vol: VolumeId, snap: SnapId) -> String {
    format!("{SNAPSHOT_RECORD_PREFIX}{vol:016x}/{snap:016x}")
}

/// Parses `<vol hex>` or `<vol hex>/<snap hex>` after a record prefix.
fn parse_record_key(rest: &str) -> Option<(VolumeId, Option<SnapId>)> {
    let (vol, snap) = match rest.split_once('/') {
        Some((vol, snap)) => (vol, Some(snap)),
        None => (rest, None),
    };
    let vol = u64::from_str_radix(vol, 16).ok()?;
    let snap = match snap {
        Some(snap) => Some(u64::from_str_radix(snap, 16).ok()?),
        None => None,
    };
    Some((vol, snap))
}

/// Slots allocated to a write and not yet committed to the index. They are freed when
/// this is dropped — which, when it travels with an I/O, only happens once the I/O has
/// completed, so a slot is never handed out while an abandoned write to it is running.
#[derive(Debug)]
struct Reservation {
    volume: Arc<Volume>,
    runs: Vec<SlotRun>,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if !self.runs.is_empty() {
            self.volume.slots.lock().release_unused(&self.runs);
        }
    }
}

/// Registration of a read with its volume's slot map, so that slots it may have looked
/// up are not reused while it runs.
struct ReadPin<'a> {
    volume: &'a Volume,
    epoch: u64,
}

impl<'a> ReadPin<'a> {
    fn new(volume: &'a Volume) -> ReadPin<'a> {
        let epoch = volume.slots.lock().begin_read();
        ReadPin { volume, epoch }
    }
}

impl Drop for ReadPin<'_> {
    fn drop(&mut self) {
        self.volume.slots.lock().end_read(self.epoch);
    }
}

/// Sync generations: what a commit reads to stamp its entries.
#[derive(Debug, Clone, Copy)]
struct Generations {
    /// Generation of the entries committed now.
    current: u64,
    /// Last generation whose sync has completed (its record is on disk). A sync in
    /// flight has closed `current - 1`; otherwise `synced == current - 1`.
    synced: u64,
}

/// Blocks read back, one element per block of the range.
type ReadResult = Vec<Option<(BlockMeta, Box<Block>)>>;

/// Blocks to read: block, slot, metadata (sorted by block).
type ReadList = Vec<(u64, u64, BlockMeta)>;

/// The durable local block store of a storage node. `Send + Sync`; share it behind an
/// `Arc`.
pub struct Store {
    /// Declared first so it is dropped first: in-flight I/O completes before the rest
    /// of the store goes away.
    ring: Ring,
    db: DB,
    data_dir: PathBuf,
    options: StoreOptions,
    volumes: RwLock<HashMap<VolumeId, Arc<Volume>>>,
    /// Serialises volume creation and deletion.
    catalog: Mutex<()>,
    write_options: WriteOptions,
    /// Serialises syncs; `syncs_started` / `last_good_sync` let a waiting sync return
    /// at once when a sync that began after it was called has succeeded.
    sync_lock: tokio::sync::Mutex<()>,
    syncs_started: AtomicU64,
    last_good_sync: AtomicU64,
    /// Sync generations. Read by every commit and changed by syncs under this lock, so
    /// a commit's data write and `mark_dirty` happen before a sync that closes the
    /// generation it read takes the dirty flags.
    generations: Mutex<Generations>,
    /// Set when a data file or WAL sync failed: the store refuses further writes and
    /// syncs (the node must be rebuilt; a failed fsync cannot be retried).
    failure: Mutex<Option<String>>,
    /// Contiguous read buffers kept for reuse (saves zeroing them for every read).
    spans: Mutex<Vec<Vec<Block>>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.db.path())
            .field("volumes", &self.volumes.read().len())
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

fn data_file_name(vol: VolumeId) -> String {
    format!("{vol:016x}.dat")
}

fn parse_data_file_name(name: &str) -> Option<VolumeId> {
    let hex = name.strip_suffix(".dat")?;
    if hex.len() != 16 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u64::from_str_radix(hex, 16).ok()
}

/// Byte offset of a slot.
fn slot_offset(slot: u64) -> Result<u64, StoreError> {
    slot.checked_mul(BLOCK_BYTES).ok_or(StoreError::NoSpace)
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| StoreError::io("syncing the data directory", e))
}

fn rocksdb_options() -> (Options, Options, Options) {
    let mut db = Options::default();
    db.create_if_missing(true);
    db.create_missing_column_families(true);
    db.set_max_background_jobs(2);
    db.set_keep_log_file_num(4);
    db.set_max_log_file_size(16 << 20);
    // Index updates stay in rocksdb's WAL buffer until the next sync (whose synced
    // write flushes and syncs it): one write(2) fewer per block write (+20% 4k QD32
    // random write IOPS measured). A process kill may lose index updates made since the
    // last sync, which the contract allows: their old versions and slots are intact.
    db.set_manual_wal_flush(true);

    let cache = Cache::new_lru_cache(64 << 20);
    let mut table = BlockBasedOptions::default();
    table.set_block_cache(&cache);
    table.set_bloom_filter(10.0, false);
    table.set_cache_index_and_filter_blocks(true);
    let mut index_cf = Options::default();
    index_cf.set_block_based_table_factory(&table);
    index_cf.set_write_buffer_size(64 << 20);

    let meta_cf = Options::default();
    (db, index_cf, meta_cf)
}

/// Options of the history column family: like the index's, with a smaller write buffer
/// (it only grows on overwrites and trims of blocks a snapshot holds).
fn history_options() -> Options {
    let mut table = BlockBasedOptions::default();
    table.set_bloom_filter(10.0, false);
    let mut options = Options::default();
    options.set_block_based_table_factory(&table);
    options.set_write_buffer_size(16 << 20);
    options
}

/// Index entries of one volume seen while scanning the index at open.
struct VolumeScan {
    /// The data file, opened again (buffered) to check the data of unsynced entries.
    reader: fs::File,
    file_slots: u64,
    /// One bit per slot of the file.
    referenced: Vec<u64>,
    /// Referenced slots past the end of the file (lost data; the reads fail their
    /// checksum), kept so the slots are never allocated to another block.
    beyond: BTreeSet<u64>,
    live: u64,
    duplicates: u64,
    malformed: u64,
    /// Unsynced entries whose data was checked, and those that were repaired.
    checked: u64,
    restored: u64,
    removed: u64,
    /// Highest birth of a version found (live or history).
    max_birth: u64,
    /// Versions put back by the power-loss repair, by block: a history copy of one of
    /// them was made by the lost overwrite and goes.
    restored_versions: HashMap<u64, Version>,
    /// History versions kept, and dropped (no recorded snapshot reads them, or a
    /// restored live version is the same).
    history: u64,
    history_dropped: u64,
}

impl VolumeScan {
    fn new(reader: fs::File, file_slots: u64) -> VolumeScan {
        let words = usize::try_from(file_slots.div_ceil(64)).unwrap_or(usize::MAX);
        VolumeScan {
            reader,
            file_slots,
            referenced: vec![0; words],
            beyond: BTreeSet::new(),
            live: 0,
            duplicates: 0,
            malformed: 0,
            checked: 0,
            restored: 0,
            removed: 0,
            max_birth: 0,
            restored_versions: HashMap::new(),
            history: 0,
            history_dropped: 0,
        }
    }

    /// Whether the data in `slot` matches `crc`. A slot that cannot be read (past the
    /// end of the file, an I/O error) does not.
    fn verify(&self, slot: u64, crc: u32, buf: &mut Block) -> bool {
        use std::os::unix::fs::FileExt;
        let Ok(offset) = slot_offset(slot) else {
            return false;
        };
        match self.reader.read_exact_at(&mut buf.0, offset) {
            Ok(()) => buf.crc() == crc,
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => false,
            Err(e) => {
                tracing::warn!(slot, error = %e, "reading unsynced block data at open");
                false
            }
        }
    }

    /// Counts a live entry that cannot be decoded.
    fn add_malformed(&mut self) {
        self.live += 1;
        self.malformed += 1;
    }

    /// Counts a live version and the slot it references (none for a tombstone).
    fn add(&mut self, version: &Version) {
        self.max_birth = self.max_birth.max(version.birth);
        if let Some(slot) = version.data_slot() {
            self.live += 1;
            self.reference(slot);
        }
    }

    /// Counts a slot as referenced.
    fn reference(&mut self, slot: u64) {
        let fresh = if slot < self.file_slots {
            let word = usize::try_from(slot / 64).unwrap_or(usize::MAX);
            let bit = 1u64 << (slot % 64);
            match self.referenced.get_mut(word) {
                Some(w) => {
                    let fresh = *w & bit == 0;
                    *w |= bit;
                    fresh
                }
                None => false,
            }
        } else if slot < slots::MAX_SLOTS {
            self.beyond.insert(slot)
        } else {
            self.malformed += 1;
            return;
        };
        if !fresh {
            self.duplicates += 1;
        }
    }

    fn referenced_slots(&self) -> impl Iterator<Item = u64> + '_ {
        let in_file = self.referenced.iter().enumerate().flat_map(|(i, &word)| {
            let base = u64::try_from(i).unwrap_or(u64::MAX).saturating_mul(64);
            (0..64u64)
                .filter(move |bit| word & (1u64 << bit) != 0)
                .map(move |bit| base + bit)
        });
        in_file.chain(self.beyond.iter().copied())
    }
}

impl Store {
    /// Opens (creating if needed) the store in `dir`: the rocksdb index in `dir/index`,
    /// data files in `dir/data`. Checks the data of every write after the last completed
    /// sync, putting back the last durable version of blocks whose data was lost (power
    /// cut), and makes the result durable. Then rebuilds every volume's free slots from
    /// its index and cuts off unreferenced slots at the end of each data file.
    pub fn open(dir: &Path, opts: StoreOptions) -> Result<Store, StoreError> {
        let data_dir = dir.join("data");
        fs::create_dir_all(&data_dir)
            .map_err(|e| StoreError::io("creating the store directory", e))?;
        let (db_options, index_options, meta_options) = rocksdb_options();
        let db = DB::open_cf_descriptors(
            &db_options,
            dir.join("index"),
            [
                ColumnFamilyDescriptor::new(INDEX_CF, index_options),
                ColumnFamilyDescriptor::new(META_CF, meta_options),
                ColumnFamilyDescriptor::new(HISTORY_CF, history_options()),
            ],
        )?;
        let ring = Ring::start(opts.ring_entries)
            .map_err(|e| StoreError::io("starting the io_uring worker", e))?;

        let mut files = HashMap::new();
        let entries =
            fs::read_dir(&data_dir).map_err(|e| StoreError::io("listing data files", e))?;
        for entry in entries {
            let entry = entry.map_err(|e| StoreError::io("listing data files", e))?;
            let name = entry.file_name();
            let Some(vol) = name.to_str().and_then(parse_data_file_name) else {
                tracing::warn!(file = ?name, "ignoring unknown file in the data directory");
                continue;
            };
            let file = DataFile::open(&entry.path(), opts.direct_io)
                .map_err(|e| StoreError::io("opening a data file", e))?;
            files.insert(vol, file);
        }

        let mut store = Store {
            ring,
            db,
            data_dir,
            options: opts,
            volumes: RwLock::new(HashMap::new()),
            catalog: Mutex::new(()),
            write_options: WriteOptions::default(),
            sync_lock: tokio::sync::Mutex::new(()),
            syncs_started: AtomicU64::new(0),
            last_good_sync: AtomicU64::new(0),
            generations: Mutex::new(Generations {
                current: 1,
                synced: 0,
            }),
            failure: Mutex::new(None),
            spans: Mutex::new(Vec::new()),
        };
        store.load_volumes(files)?;
        Ok(store)
    }

    /// Scans the whole index once, in key order (volume by volume), rebuilding each
    /// volume's slot map, and removes index entries of volumes without a data file
    /// (left by a crash during `delete_volume`).
    fn load_volumes(&mut self, mut files: HashMap<VolumeId, DataFile>) -> Result<(), StoreError> {
        let synced = self.stored_synced_generation()?;
        let (records, snapshots) = self.load_records()?;
        let mut scans: HashMap<VolumeId, VolumeScan> = HashMap::new();
        for (&vol, file) in &files {
            let slots = file
                .slots()
                .map_err(|e| StoreError::io("reading a data file's size", e))?;
            let reader = fs::File::open(self.data_file_path(vol))
                .map_err(|e| StoreError::io("opening a data file", e))?;
            scans.insert(vol, VolumeScan::new(reader, slots));
        }
        let mut orphans = BTreeSet::new();
        let mut bad_keys = 0u64;
        // Repairs of unsynced entries whose data did not land, and the highest
        // generation of the entries kept.
        let mut repairs = WriteBatch::default();
        let mut newest = synced;
        {
            let cf = self.cf(INDEX_CF)?;
            let mut buf = Block::zeroed();
            let mut iter = self.db.raw_iterator_cf(cf);
            iter.seek_to_first();
            while iter.valid() {
                let (Some(key), Some(value)) = (iter.key(), iter.value()) else {
                    break;
                };
                match index::decode_key(key) {
                    None => bad_keys += 1,
                    Some((vol, block)) => match scans.get_mut(&vol) {
                        Some(scan) => match IndexEntry::decode(value) {
                            None => scan.add_malformed(),
                            Some(entry) => match check_entry(scan, synced, &entry, &mut buf) {
                                Kept::Current => {
                                    newest = newest.max(entry.generation);
                                    scan.add(&entry.current());
                                }
                                Kept::Restored(version) => {
                                    newest = newest.max(version.generation);
                                    scan.add(&version);
                                    scan.restored_versions.insert(block, version);
                                    repairs.put_cf(cf, key, IndexEntry::new(version).encode());
                                    tracing::warn!(
                                        volume = format_args!("{vol:016x}"),
                                        block,
                                        lost = entry.meta.version,
                                        restored = version.meta.version,
                                        "data of an unsynced write was lost; \
                                             restored the last durable version"
                                    );
                                }
                                Kept::Nothing => {
                                    repairs.delete_cf(cf, key);
                                    tracing::warn!(
                                        volume = format_args!("{vol:016x}"),
                                        block,
                                        lost = entry.meta.version,
                                        "data of an unsynced write was lost; the \
                                             block had no durable version, removed"
                                    );
                                }
                            },
                        },
                        None => {
                            orphans.insert(vol);
                        }
                    },
                }
                iter.next();
            }
            iter.status()?;
        }
        self.load_history(&mut scans, &snapshots, &mut repairs, &mut orphans)?;
        for &vol in records.keys().chain(snapshots.keys()) {
            if !scans.contains_key(&vol) {
                orphans.insert(vol);
            }
        }
        if bad_keys > 0 {
            tracing::error!(bad_keys, "index holds keys of the wrong length; ignored");
        }
        for vol in orphans {
            tracing::warn!(
                volume = format_args!("{vol:016x}"),
                "removing index entries and records of a volume without a data file"
            );
            self.delete_volume_index(vol)?;
        }
        // Every entry left is made durable before any slot is freed or cut off: the
        // data files (unsynced entries whose data verified may still be in a volatile
        // cache), then the repairs together with a new synced generation above every
        // entry's, in one synced write. From then on no entry needs an older version,
        // so the slots referenced only as older versions are free.
        for file in files.values() {
            file.sync_data()
                .map_err(|e| StoreError::io("syncing a data file at open", e))?;
        }
        let synced = newest.saturating_add(1);
        repairs.put_cf(
            self.cf(META_CF)?,
            SYNCED_GENERATION_KEY,
            synced.to_le_bytes(),
        );
        let mut options = WriteOptions::default();
        options.set_sync(true);
        self.db.write_opt(repairs, &options)?;
        *self.generations.lock() = Generations {
            current: synced.saturating_add(1),
            synced,
        };

        let mut volumes = HashMap::new();
        for (vol, file) in files.drain() {
            let Some(scan) = scans.remove(&vol) else {
                continue;
            };
            if scan.history_dropped > 0 {
                tracing::info!(
                    volume = format_args!("{vol:016x}"),
                    kept = scan.history,
                    dropped = scan.history_dropped,
                    "dropped history versions no snapshot reads (a snapshot creation or \
                     deletion was cut short, or a lost overwrite was undone)"
                );
            }
            if scan.checked > 0 {
                tracing::info!(
                    volume = format_args!("{vol:016x}"),
                    checked = scan.checked,
                    restored = scan.restored,
                    removed = scan.removed,
                    "checked the data of writes after the last sync"
                );
            }
            if scan.duplicates > 0 || scan.malformed > 0 || !scan.beyond.is_empty() {
                tracing::error!(
                    volume = format_args!("{vol:016x}"),
                    duplicates = scan.duplicates,
                    malformed = scan.malformed,
                    past_end_of_file = scan.beyond.len(),
                    "index entries that do not match the data file; their reads will fail"
                );
            }
            let map = SlotMap::rebuild(scan.referenced_slots());
            if map.len() < scan.file_slots {
                file.truncate(map.len())
                    .map_err(|e| StoreError::io("truncating a data file", e))?;
            }
            tracing::debug!(
                volume = format_args!("{vol:016x}"),
                live = scan.live,
                slots = map.len(),
                free = map.free_count(),
                direct = file.is_direct(),
                "volume loaded"
            );
            let record = records.get(&vol).copied().unwrap_or_default();
            let state = VolumeState::new(
                record.next_birth.max(scan.max_birth),
                snapshots.get(&vol).into_iter().flatten().copied(),
            );
            volumes.insert(
                vol,
                Arc::new(Volume::new(vol, file, map, scan.live, record.origin, state)),
            );
        }
        *self.volumes.write() = volumes;
        Ok(())
    }

    /// Reads the volume records and the snapshot records.
    #[allow(clippy::type_complexity)]
    fn load_records(
        &self,
    ) -> Result<
        (
            HashMap<VolumeId, VolumeRecord>,
            HashMap<VolumeId, BTreeSet<SnapId>>,
        ),
        StoreError,
    > {
        let mut records = HashMap::new();
        let mut snapshots: HashMap<VolumeId, BTreeSet<SnapId>> = HashMap::new();
        for (prefix, is_volume) in [
            (VOLUME_RECORD_PREFIX, true),
            (SNAPSHOT_RECORD_PREFIX, false),
        ] {
            for (key, value) in self.scan_meta_raw(prefix)? {
                let parsed = key.strip_prefix(prefix).and_then(parse_record_key);
                match (parsed, is_volume) {
                    (Some((vol, None)), true) => match VolumeRecord::decode(&value) {
                        Some(record) => {
                            records.insert(vol, record);
                        }
                        None => {
                            return Err(StoreError::Failed(format!(
                                "malformed volume record {key:?}"
                            )));
                        }
                    },
                    (Some((vol, Some(snap))), false) => {
                        snapshots.entry(vol).or_default().insert(snap);
                    }
                    _ => tracing::error!(key, "ignoring a malformed store record key"),
                }
            }
        }
        Ok((records, snapshots))
    }

    /// Scans the history at open: keeps the versions a recorded snapshot reads, counting
    /// their slots as referenced; drops the others (a snapshot creation or deletion cut
    /// short) and the copies of versions the power-loss repair put back live.
    fn load_history(
        &self,
        scans: &mut HashMap<VolumeId, VolumeScan>,
        snapshots: &HashMap<VolumeId, BTreeSet<SnapId>>,
        repairs: &mut WriteBatch,
        orphans: &mut BTreeSet<VolumeId>,
    ) -> Result<(), StoreError> {
        let cf = self.cf(HISTORY_CF)?;
        let none = BTreeSet::new();
        let mut iter = self.db.raw_iterator_cf(cf);
        iter.seek_to_first();
        while iter.valid() {
            let (Some(key), Some(value)) = (iter.key(), iter.value()) else {
                break;
            };
            let Some((vol, block, birth)) = index::decode_history_key(key) else {
                tracing::error!("history key of the wrong length; removed");
                repairs.delete_cf(cf, key);
                iter.next();
                continue;
            };
            let Some(scan) = scans.get_mut(&vol) else {
                orphans.insert(vol);
                iter.next();
                continue;
            };
            let snaps = snapshots.get(&vol).unwrap_or(&none);
            let keep = match HistoryEntry::decode(value) {
                Some(entry) if entry.version.birth == birth => {
                    let read = snaps.range(birth..entry.death).next().is_some();
                    let restored = scan.restored_versions.get(&block).is_some_and(|v| {
                        v.birth == entry.version.birth && v.slot == entry.version.slot
                    });
                    (read && !restored).then_some(entry)
                }
                _ => {
                    tracing::error!(
                        volume = format_args!("{vol:016x}"),
                        block,
                        "malformed history entry; removed"
                    );
                    None
                }
            };
            match keep {
                Some(entry) => {
                    scan.history += 1;
                    scan.max_birth = scan.max_birth.max(entry.death);
                    if let Some(slot) = entry.version.data_slot() {
                        scan.reference(slot);
                    }
                }
                None => {
                    scan.history_dropped += 1;
                    repairs.delete_cf(cf, key);
                }
            }
            iter.next();
        }
        iter.status()?;
        Ok(())
    }

    /// The last completed sync generation recorded in the index (0 for a new store).
    fn stored_synced_generation(&self) -> Result<u64, StoreError> {
        match self.db.get_cf(self.cf(META_CF)?, SYNCED_GENERATION_KEY)? {
            None => Ok(0),
            Some(value) => {
                let bytes: [u8; 8] = value.as_slice().try_into().map_err(|_| {
                    StoreError::Failed(format!(
                        "malformed synced generation record ({} bytes)",
                        value.len()
                    ))
                })?;
                Ok(u64::from_le_bytes(bytes))
            }
        }
    }

    fn cf(&self, name: &str) -> Result<&ColumnFamily, StoreError> {
        self.db
            .cf_handle(name)
            .ok_or_else(|| StoreError::Failed(format!("column family {name} missing")))
    }

    fn volume(&self, vol: VolumeId) -> Result<Arc<Volume>, StoreError> {
        self.volumes
            .read()
            .get(&vol)
            .cloned()
            .ok_or(StoreError::NoSuchVolume(vol))
    }

    fn check_healthy(&self) -> Result<(), StoreError> {
        match &*self.failure.lock() {
            None => Ok(()),
            Some(why) => Err(StoreError::Failed(format!("store has failed: {why}"))),
        }
    }

    fn fail(&self, why: String) {
        tracing::error!(%why, "block store failed; refusing further writes");
        self.failure.lock().get_or_insert(why);
    }

    /// Creates an empty volume.
    pub fn create_volume(&self, vol: VolumeId) -> Result<(), StoreError> {
        let _catalog = self.catalog.lock();
        if self.volumes.read().contains_key(&vol) {
            return Err(StoreError::VolumeExists(vol));
        }
        let file = match DataFile::create(&self.data_file_path(vol), self.options.direct_io) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Err(StoreError::VolumeExists(vol));
            }
            Err(e) => return Err(StoreError::io("creating a data file", e)),
        };
        sync_dir(&self.data_dir)?;
        let volume = Volume::new(
            vol,
            file,
            SlotMap::default(),
            0,
            None,
            VolumeState::new(1, []),
        );
        self.volumes.write().insert(vol, Arc::new(volume));
        Ok(())
    }

    /// Deletes a volume with its snapshots: its data file, then its index entries,
    /// history and records. A crash in between leaves index entries without a file,
    /// which the next `open` removes. Refused with [`StoreError::VolumeHasClones`] while
    /// clones read through to one of its snapshots.
    pub fn delete_volume(&self, vol: VolumeId) -> Result<(), StoreError> {
        let _catalog = self.catalog.lock();
        let volume = self.volume(vol)?;
        let clones = self.clones_of(vol, None);
        if !clones.is_empty() {
            return Err(StoreError::VolumeHasClones {
                volume: vol,
                clones,
            });
        }
        let mut state = volume.commit.lock();
        match fs::remove_file(self.data_file_path(vol)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(StoreError::io("removing a data file", e)),
        }
        state.deleted = true;
        self.volumes.write().remove(&vol);
        sync_dir(&self.data_dir)?;
        self.delete_volume_index(vol)
    }

    /// Removes every index entry, history version and record of a volume, in one
    /// synced batch.
    fn delete_volume_index(&self, vol: VolumeId) -> Result<(), StoreError> {
        let mut batch = WriteBatch::default();
        let cf = self.cf(INDEX_CF)?;
        match index::volume_end(vol) {
            Some(end) => batch.delete_range_cf(cf, index::key(vol, 0), end),
            None => {
                batch.delete_range_cf(cf, index::key(vol, 0), index::key(vol, u64::MAX));
                batch.delete_cf(cf, index::key(vol, u64::MAX));
            }
        }
        let history = self.cf(HISTORY_CF)?;
        let start = index::history_key(vol, 0, 0);
        match vol.checked_add(1) {
            Some(next) => batch.delete_range_cf(history, start, index::history_key(next, 0, 0)),
            None => {
                let last = index::history_key(vol, u64::MAX, u64::MAX);
                batch.delete_range_cf(history, start, last);
                batch.delete_cf(history, last);
            }
        }
        let meta = self.cf(META_CF)?;
        batch.delete_cf(meta, volume_record_key(vol));
        for (key, _) in self.scan_meta_raw(&snapshot_record_prefix(vol))? {
            batch.delete_cf(meta, key);
        }
        let mut options = WriteOptions::default();
        options.set_sync(true);
        self.db.write_opt(batch, &options)?;
        Ok(())
    }

    /// Volumes cloned from a snapshot of `vol` (from `snap` only, when given), sorted.
    fn clones_of(&self, vol: VolumeId, snap: Option<SnapId>) -> Vec<VolumeId> {
        let mut clones: Vec<VolumeId> = self
            .volumes
            .read()
            .values()
            .filter(|v| {
                v.origin
                    .is_some_and(|(o, s)| o == vol && snap.is_none_or(|snap| snap == s))
            })
            .map(|v| v.id)
            .collect();
        clones.sort_unstable();
        clones
    }

    /// Volumes on this store, sorted.
    pub fn volumes(&self) -> Vec<VolumeId> {
        let mut vols: Vec<VolumeId> = self.volumes.read().keys().copied().collect();
        vols.sort_unstable();
        vols
    }

    /// Writes ciphertext blocks; all index changes land in one atomic batch after the
    /// data is written. A write whose version is not newer than the stored one is
    /// skipped. Each block's CRC is checked against its data before anything is written.
    pub async fn write_blocks(
        &self,
        vol: VolumeId,
        writes: Vec<BlockWrite>,
    ) -> Result<(), StoreError> {
        self.check_healthy()?;
        let volume = self.volume(vol)?;
        if writes.is_empty() {
            return Ok(());
        }
        if writes.len() > MAX_BLOCKS_PER_IO {
            return Err(StoreError::Failed(format!(
                "{} blocks in one write (at most {MAX_BLOCKS_PER_IO})",
                writes.len()
            )));
        }
        for write in &writes {
            let crc = write.data.crc();
            if crc != write.meta.crc {
                return Err(StoreError::Failed(format!(
                    "block {} of volume {vol:016x}: data has crc {crc:08x}, metadata says {:08x}",
                    write.block, write.meta.crc
                )));
            }
        }
        let (placed, reservation) = self.write_data(&volume, newest_per_block(writes)).await?;
        self.commit_writes(&volume, &placed, reservation)
    }

    /// Writes the data of `writes` (sorted by block, one per block) to newly allocated
    /// slots and marks the file dirty; returns (block, meta, slot) of each and the
    /// reservation of the slots, for the index commit.
    async fn write_data(
        &self,
        volume: &Arc<Volume>,
        writes: Vec<BlockWrite>,
    ) -> Result<(Vec<(u64, BlockMeta, u64)>, Reservation), StoreError> {
        let count = u64::try_from(writes.len()).map_err(|_| StoreError::NoSpace)?;
        let runs = volume
            .slots
            .lock()
            .allocate(count)
            .ok_or(StoreError::NoSpace)?;
        let reservation = Reservation {
            volume: Arc::clone(volume),
            runs: runs.clone(),
        };

        if let Some(end) = runs.iter().map(SlotRun::end).max() {
            volume.file.preallocate(end);
        }
        // Blocks go to the reserved slots in order, one part per run of slots.
        let fd = volume.file.fd();
        let mut placed = Vec::with_capacity(writes.len());
        let mut parts = Vec::new();
        let mut writes = writes.into_iter();
        for run in &runs {
            let mut slot = run.start;
            while slot < run.end() {
                let mut bufs = Vec::new();
                let first = slot;
                while slot < run.end() && bufs.len() < MAX_PART_BLOCKS {
                    let Some(write) = writes.next() else {
                        return Err(StoreError::Failed("slot allocation mismatch".to_owned()));
                    };
                    placed.push((write.block, write.meta, slot));
                    bufs.push(write.data);
                    slot += 1;
                }
                parts.push(IoPart::write(Arc::clone(&fd), slot_offset(first)?, bufs));
            }
        }
        let (parts, reservation) = volume.file.run(&self.ring, parts, reservation).await?;
        for part in parts {
            part.result
                .map_err(|e| StoreError::io("writing block data", e))?;
        }
        // Before the index points at the new data, so the next sync covers it.
        volume.file.mark_dirty();
        Ok((placed, reservation))
    }

    /// Switches the index to the newly written slots in one batch, skipping writes that
    /// are not newer than what is stored.
    fn commit_writes(
        &self,
        volume: &Volume,
        placed: &[(u64, BlockMeta, u64)],
        mut reservation: Reservation,
    ) -> Result<(), StoreError> {
        let cf = self.cf(INDEX_CF)?;
        let history = self.cf(HISTORY_CF)?;
        let state = volume.commit.lock();
        if state.deleted {
            return Err(StoreError::NoSuchVolume(volume.id));
        }
        let keys: Vec<[u8; index::KEY_LEN]> = placed
            .iter()
            .map(|&(block, _, _)| index::key(volume.id, block))
            .collect();
        // Keys are sorted: `newest_per_block` sorts the writes by block.
        let olds = self.db.batched_multi_get_cf(cf, keys.iter(), true);
        // After the data was written and marked dirty: a sync that closes this
        // generation fdatasyncs it. Before the old slots are freed: a sync that takes
        // them closes this generation or a later one, so it makes these entries durable.
        let generations = *self.generations.lock();
        let mut batch = WriteBatch::default();
        let mut freed = Vec::new();
        let mut skipped = Vec::new();
        let mut added = 0u64;
        for ((&(block, meta, slot), key), old) in placed.iter().zip(&keys).zip(olds) {
            let old = match old? {
                None => {
                    added += 1;
                    None
                }
                Some(value) => match IndexEntry::decode(&value) {
                    Some(old) if !old.is_tombstone() && old.meta.version >= meta.version => {
                        skipped.push(slot);
                        continue;
                    }
                    Some(old) => {
                        if old.is_tombstone() {
                            added += 1;
                        }
                        state.retire(
                            history,
                            volume.id,
                            block,
                            old.current(),
                            &mut batch,
                            &mut freed,
                        );
                        Some(old)
                    }
                    None => {
                        // Overwriting repairs the entry; its old slot is unknown and
                        // stays out of use until the next open rebuilds the free set.
                        tracing::error!(
                            volume = format_args!("{:016x}", volume.id),
                            block,
                            "malformed index entry overwritten"
                        );
                        None
                    }
                },
            };
            let new = Version {
                slot,
                meta,
                generation: generations.current,
                birth: state.birth,
            };
            let entry = IndexEntry::successor(old.as_ref(), new, generations.synced);
            batch.put_cf(cf, key, entry.encode());
        }
        if !batch.is_empty() {
            self.db.write_opt(batch, &self.write_options)?;
        }
        volume.live.fetch_add(added, Ordering::Relaxed);
        let mut slots = volume.slots.lock();
        slots.free_after_sync(freed);
        slots.release_unused(&slots::into_runs(skipped));
        // Every reserved slot is now either referenced by the index or free again.
        reservation.runs.clear();
        drop(slots);
        drop(state);
        Ok(())
    }

    /// Reads one block; `None` when it is not allocated. Data that fails its checksum
    /// is [`StoreError::Corrupt`]. For a clone, blocks it never wrote come from its
    /// origin ([`Store::read_blocks_at`] says from which volume).
    pub async fn read_block(
        &self,
        vol: VolumeId,
        block: u64,
    ) -> Result<Option<(BlockMeta, Box<Block>)>, StoreError> {
        let mut found = self.read_view(vol, None, block, 1).await?;
        Ok(found.pop().flatten().map(|b| (b.meta, b.data)))
    }

    /// Reads a range of blocks (at most [`MAX_BLOCKS_PER_IO`]) as one io_uring batch;
    /// one element per block, `None` for unallocated ones. Any block failing its
    /// checksum fails the whole read with [`StoreError::Corrupt`].
    pub async fn read_blocks(
        &self,
        vol: VolumeId,
        blocks: Range<u64>,
    ) -> Result<Vec<Option<(BlockMeta, Box<Block>)>>, StoreError> {
        let found = self.read_blocks_at(vol, None, blocks).await?;
        Ok(found
            .into_iter()
            .map(|b| b.map(|b| (b.meta, b.data)))
            .collect())
    }

    /// Reads the data of `entries` (sorted by block, all within `count` blocks from
    /// `first`) and checks each block's checksum.
    async fn read_entries(
        &self,
        volume: &Volume,
        count: usize,
        first: u64,
        entries: ReadList,
    ) -> Result<ReadResult, StoreError> {
        let mut out: ReadResult = Vec::with_capacity(count);
        out.resize_with(count, || None);
        if entries.is_empty() {
            return Ok(out);
        }
        // Blocks whose slots follow each other share one part.
        let fd = volume.file.fd();
        let mut runs: Vec<(u64, Vec<(u64, BlockMeta)>)> = Vec::new();
        let mut next_slot = None;
        for (block, slot, meta) in entries {
            match runs.last_mut() {
                Some((_, owner)) if next_slot == Some(slot) && owner.len() < MAX_PART_BLOCKS => {
                    owner.push((block, meta));
                }
                _ => runs.push((slot, vec![(block, meta)])),
            }
            next_slot = slot.checked_add(1);
        }
        let mut parts: Vec<IoPart> = Vec::with_capacity(runs.len());
        let mut owners: Vec<Vec<(u64, BlockMeta)>> = Vec::with_capacity(runs.len());
        for (slot, owner) in runs {
            let offset = slot_offset(slot)?;
            // A longer run is read into one contiguous buffer and copied out: one
            // iovec is much cheaper for the kernel than one per block.
            parts.push(if owner.len() >= SPAN_READ_MIN_BLOCKS {
                IoPart::read_span(Arc::clone(&fd), offset, self.take_span(owner.len()))
            } else {
                IoPart::read(
                    Arc::clone(&fd),
                    offset,
                    owner.iter().map(|_| Block::zeroed()).collect(),
                )
            });
            owners.push(owner);
        }
        let (parts, ()) = volume.file.run(&self.ring, parts, ()).await?;
        for (part, owner) in parts.into_iter().zip(owners) {
            part.result
                .map_err(|e| StoreError::io("reading block data", e))?;
            let mut bufs = part.bufs;
            if !part.span.is_empty() {
                bufs = part.span.iter().map(Block::boxed_copy).collect();
                self.give_span(part.span);
            }
            for (data, (block, meta)) in bufs.into_iter().zip(owner) {
                if data.crc() != meta.crc {
                    tracing::error!(
                        volume = format_args!("{:016x}", volume.id),
                        block,
                        version = meta.version,
                        "block data fails its checksum"
                    );
                    return Err(StoreError::Corrupt {
                        volume: volume.id,
                        block,
                    });
                }
                let index = usize::try_from(block - first)
                    .ok()
                    .and_then(|i| out.get_mut(i));
                if let Some(slot) = index {
                    *slot = Some((meta, data));
                }
            }
        }
        Ok(out)
    }

    /// A contiguous buffer of `blocks` blocks (its content is to be overwritten).
    fn take_span(&self, blocks: usize) -> Vec<Block> {
        let mut spans = self.spans.lock();
        match spans.iter().position(|span| span.len() == blocks) {
            Some(i) => spans.swap_remove(i),
            None => {
                drop(spans);
                Block::zeroed_vec(blocks)
            }
        }
    }

    /// Keeps a buffer from [`Store::take_span`] for reuse.
    fn give_span(&self, span: Vec<Block>) {
        if span.len() > SPAN_POOL_MAX_BLOCKS {
            return;
        }
        let mut spans = self.spans.lock();
        if spans.len() >= SPAN_POOL {
            // Replace the oldest, so the pool follows the sizes in use.
            spans.remove(0);
        }
        spans.push(span);
    }

    /// Index entry only, no data read (for a clone, the origin's for blocks it never
    /// wrote).
    pub fn block_meta(&self, vol: VolumeId, block: u64) -> Result<Option<BlockMeta>, StoreError> {
        Ok(self.block_meta_at(vol, None, block)?.map(|(_, meta)| meta))
    }

    /// Removes the blocks in `blocks`: they read as unallocated (zeros) afterwards. Their
    /// slots are reused (and their space punched out of the file) after the next sync,
    /// unless a snapshot still reads them. In a clone, blocks its origin holds get a
    /// tombstone so they do not read through. Large ranges are removed in batches of
    /// bounded size; each block is removed atomically.
    pub async fn discard_blocks(
        &self,
        vol: VolumeId,
        blocks: Range<u64>,
    ) -> Result<(), StoreError> {
        self.check_healthy()?;
        let volume = self.volume(vol)?;
        let cf = self.cf(INDEX_CF)?;
        let history = self.cf(HISTORY_CF)?;
        let batch_limit = usize::try_from(DISCARD_BATCH).unwrap_or(usize::MAX);
        let mut cursor = blocks.start;
        while cursor < blocks.end {
            // A clone works in windows: the origin's blocks in the window need
            // tombstones. The origin's snapshot never changes, so it is read unlocked.
            let (window_end, hidden) = match volume.origin {
                None => (blocks.end, Vec::new()),
                Some((origin, snap)) => {
                    let end = cursor.saturating_add(DISCARD_BATCH).min(blocks.end);
                    let seen = self.view_versions(origin, Some(snap), cursor, end - cursor)?;
                    (end, seen.into_iter().map(|s| s.block).collect::<Vec<u64>>())
                }
            };
            // The commit lock is a parking_lot guard: scope it so it is never held
            // across the await below (the future must stay Send).
            let next = {
                let state = volume.commit.lock();
                if state.deleted {
                    return Err(StoreError::NoSuchVolume(vol));
                }
                let generations = *self.generations.lock();
                let tombstone = Version::tombstone(generations.current, state.birth);
                let mut batch = WriteBatch::default();
                let mut freed = Vec::new();
                let mut own = Vec::new();
                let mut removed = 0u64;
                let mut next = window_end;
                self.scan_index(vol, cursor..window_end, |block, value| {
                    if own.len() >= batch_limit {
                        next = block;
                        return Ok(false);
                    }
                    own.push(block);
                    let hide = hidden.binary_search(&block).is_ok();
                    let key = index::key(vol, block);
                    match IndexEntry::decode(value) {
                        // Already hidden.
                        Some(entry) if entry.is_tombstone() && hide => {}
                        Some(entry) => {
                            let old = entry.current();
                            state.retire(history, vol, block, old, &mut batch, &mut freed);
                            if !entry.is_tombstone() {
                                removed += 1;
                            }
                            if hide {
                                let entry = IndexEntry::successor(
                                    Some(&entry),
                                    tombstone,
                                    generations.synced,
                                );
                                batch.put_cf(cf, key, entry.encode());
                            } else {
                                batch.delete_cf(cf, key);
                            }
                        }
                        None => {
                            tracing::error!(
                                volume = format_args!("{vol:016x}"),
                                block,
                                "discarding a malformed index entry"
                            );
                            removed += 1;
                            batch.delete_cf(cf, key);
                        }
                    }
                    Ok(true)
                })?;
                // Blocks the clone never wrote but its origin holds.
                for &block in hidden.iter().filter(|&&b| b < next) {
                    if own.binary_search(&block).is_err() {
                        let entry = IndexEntry::new(tombstone);
                        batch.put_cf(cf, index::key(vol, block), entry.encode());
                    }
                }
                if !batch.is_empty() {
                    self.db.write_opt(batch, &self.write_options)?;
                }
                volume.live.fetch_sub(removed, Ordering::Relaxed);
                volume.slots.lock().free_after_sync(freed);
                drop(state);
                next
            };
            cursor = next;
            if cursor < blocks.end {
                tokio::task::yield_now().await;
            }
        }
        Ok(())
    }

    /// Makes every write and discard completed before the call durable: closes the
    /// current sync generation, fdatasyncs every data file written since the previous
    /// sync, then records the generation as synced in a synced rocksdb write (which
    /// syncs the WAL).
    /// Then slots freed before the call become reusable, their space given back to the
    /// filesystem. A failed sync fails the store (it refuses writes from then on).
    pub async fn sync(&self) -> Result<(), StoreError> {
        self.check_healthy()?;
        let called_after = self.syncs_started.load(Ordering::Acquire);
        let _serial = self.sync_lock.lock().await;
        if self.last_good_sync.load(Ordering::Acquire) > called_after {
            // A sync that started after this call has finished: it covered everything.
            return Ok(());
        }
        self.check_healthy()?;
        let id = self.syncs_started.fetch_add(1, Ordering::AcqRel) + 1;
        self.sync_serialised().await?;
        self.last_good_sync.store(id, Ordering::Release);
        Ok(())
    }

    async fn sync_serialised(&self) -> Result<(), StoreError> {
        let volumes: Vec<Arc<Volume>> = self.volumes.read().values().cloned().collect();
        // Slots freed by index changes made so far: those changes were committed in the
        // generation closed below or an earlier one, so they are durable once it is.
        let mut taken = Vec::with_capacity(volumes.len());
        for volume in &volumes {
            taken.push(volume.slots.lock().take_freed());
        }
        // Close the current generation: entries committed from now on get the next.
        let closing = {
            let mut generations = self.generations.lock();
            let closing = generations.current;
            generations.current = closing.saturating_add(1);
            closing
        };
        // Data of every entry of the closed generation was written and marked dirty
        // before the entry was committed, so before the generation was closed. The
        // volumes are listed again: one created since the first list may hold such
        // entries.
        let mut parts = Vec::new();
        let dirty: Vec<Arc<Volume>> = self.volumes.read().values().cloned().collect();
        for volume in &dirty {
            if volume.file.take_dirty() {
                parts.push(IoPart::data_sync(volume.file.fd()));
            }
        }
        let restore = |taken: Vec<Vec<u64>>| {
            for (volume, freed) in volumes.iter().zip(taken) {
                volume.slots.lock().untake_freed(freed);
            }
        };
        if !parts.is_empty() {
            let synced = self.ring.run(parts, ()).await;
            let failure = match synced {
                Err(e) => Some(e),
                Ok((parts, ())) => parts.into_iter().find_map(|p| p.result.err()),
            };
            if let Some(e) = failure {
                restore(taken);
                self.fail(format!("fdatasync of a data file failed: {e}"));
                return Err(StoreError::io("syncing data files", e));
            }
        }
        // The synced write of the record syncs the WAL, and every index change before it.
        let mut options = WriteOptions::default();
        options.set_sync(true);
        let recorded = self.cf(META_CF).and_then(|cf| {
            self.db
                .put_cf_opt(cf, SYNCED_GENERATION_KEY, closing.to_le_bytes(), &options)
                .map_err(StoreError::Index)
        });
        if let Err(e) = recorded {
            restore(taken);
            self.fail(format!("syncing the rocksdb WAL failed: {e}"));
            return Err(e);
        }
        self.generations.lock().synced = closing;
        for (volume, freed) in volumes.iter().zip(taken) {
            volume.slots.lock().retire(freed);
        }
        self.reclaim(&volumes).await;
        Ok(())
    }

    /// Gives the space of reclaimable slots back to the filesystem — truncating the
    /// file when they are at its end, punching holes otherwise — and then frees them.
    async fn reclaim(&self, volumes: &[Arc<Volume>]) {
        let mut parts = Vec::new();
        let mut punched = Vec::new();
        for volume in volumes {
            let plan = {
                let mut slots = volume.slots.lock();
                let plan = slots.plan_reclaim();
                if let Some(len) = plan.truncate_to {
                    // Under the lock: no slot past `len` can be allocated (and written)
                    // before the file is cut.
                    match volume.file.truncate(len) {
                        Ok(()) => slots.truncated(len),
                        Err(e) => {
                            tracing::warn!(error = %e, "truncating a data file");
                            slots.release_unused(&plan.tail);
                        }
                    }
                }
                plan
            };
            if plan.punch.is_empty() {
                continue;
            }
            let fd = volume.file.fd();
            for run in &plan.punch {
                if let (Ok(offset), Ok(len)) = (slot_offset(run.start), slot_offset(run.len)) {
                    parts.push(IoPart::punch_hole(Arc::clone(&fd), offset, len));
                }
            }
            // Freed when dropped, which is after the punches have completed.
            punched.push(Reservation {
                volume: Arc::clone(volume),
                runs: plan.punch,
            });
        }
        if parts.is_empty() {
            return;
        }
        match self.ring.run(parts, punched).await {
            Ok((parts, _punched)) => {
                for part in parts {
                    if let Err(e) = part.result
                        && e.raw_os_error() != Some(libc::EOPNOTSUPP)
                    {
                        tracing::warn!(error = %e, "punching a hole in a data file");
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "punching holes in data files"),
        }
    }

    /// Allocated (live) blocks of a volume: those stored in it, so neither the blocks a
    /// clone reads through to its origin nor the versions only snapshots hold
    /// ([`Store::snapshots`] counts those). O(1).
    pub fn allocated_blocks(&self, vol: VolumeId) -> Result<u64, StoreError> {
        Ok(self.volume(vol)?.live.load(Ordering::Relaxed))
    }

    /// Allocation map of a block range, merged into runs of allocated and unallocated
    /// blocks covering the whole range. For a clone, blocks its origin holds (and it
    /// did not trim) are allocated.
    pub fn extents(&self, vol: VolumeId, blocks: Range<u64>) -> Result<Vec<Extent>, StoreError> {
        self.extents_at(vol, None, blocks)
    }

    /// [`Store::extents`] of a view: the live volume (`snap` `None`) or a snapshot.
    pub fn extents_at(
        &self,
        vol: VolumeId,
        snap: Option<SnapId>,
        blocks: Range<u64>,
    ) -> Result<Vec<Extent>, StoreError> {
        let volume = self.volume(vol)?;
        if let Some(snap) = snap {
            check_snapshot(&volume, snap)?;
        }
        let mut extents: Vec<Extent> = Vec::new();
        let mut push = |start: u64, count: u64, allocated: bool| match extents.last_mut() {
            Some(last) if last.allocated == allocated && last.start + last.count == start => {
                last.count += count;
            }
            _ => extents.push(Extent {
                start,
                count,
                allocated,
            }),
        };
        let mut cursor = blocks.start;
        let mut allocated = |block: u64| {
            if block > cursor {
                push(cursor, block - cursor, false);
            }
            push(block, 1, true);
            cursor = block + 1;
        };
        if snap.is_none() && volume.origin.is_none() {
            // The live view of a volume that is no clone: its index entries, in one
            // scan however sparse the range.
            let tombstone = index::TOMBSTONE.to_le_bytes();
            self.scan_index(vol, blocks.clone(), |block, value| {
                if value.get(..8) != Some(&tombstone[..]) {
                    allocated(block);
                }
                Ok(true)
            })?;
        } else {
            let mut start = blocks.start;
            while start < blocks.end {
                let end = start.saturating_add(EXTENT_WINDOW).min(blocks.end);
                for seen in self.view_versions(vol, snap, start, end - start)? {
                    allocated(seen.block);
                }
                start = end;
            }
        }
        if cursor < blocks.end {
            push(cursor, blocks.end - cursor, false);
        }
        if let Some(snap) = snap {
            check_snapshot(&volume, snap)?;
        }
        Ok(extents)
    }

    /// Calls `f(block, value)` for every index entry of `vol` in `blocks`, in block
    /// order, until it returns `Ok(false)`.
    fn scan_index(
        &self,
        vol: VolumeId,
        blocks: Range<u64>,
        mut f: impl FnMut(u64, &[u8]) -> Result<bool, StoreError>,
    ) -> Result<(), StoreError> {
        if blocks.is_empty() {
            return Ok(());
        }
        let cf = self.cf(INDEX_CF)?;
        let mut options = ReadOptions::default();
        options.set_iterate_upper_bound(index::key(vol, blocks.end).to_vec());
        let mut iter: DBRawIterator<'_> = self.db.raw_iterator_cf_opt(cf, options);
        iter.seek(index::key(vol, blocks.start));
        while iter.valid() {
            let (Some(key), Some(value)) = (iter.key(), iter.value()) else {
                break;
            };
            let Some((key_vol, block)) = index::decode_key(key) else {
                return Err(StoreError::Failed(
                    "index key of the wrong length".to_owned(),
                ));
            };
            if key_vol != vol || !blocks.contains(&block) {
                break;
            }
            if !f(block, value)? {
                return Ok(());
            }
            iter.next();
        }
        iter.status()?;
        Ok(())
    }

    /// Stores a small metadata record (the node's catalog) in its own column family.
    /// With `sync`, returns once the WAL holding it is on disk. Keys under `replica/` are
    /// reserved for the store and refused.
    pub fn put_meta(&self, key: &str, value: &[u8], sync: bool) -> Result<(), StoreError> {
        check_meta_key(key)?;
        let mut options = WriteOptions::default();
        options.set_sync(sync);
        self.db
            .put_cf_opt(self.cf(META_CF)?, key, value, &options)?;
        Ok(())
    }

    /// Reads a metadata record.
    pub fn get_meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.db.get_cf(self.cf(META_CF)?, key)?)
    }

    /// Deletes a metadata record (absent is fine).
    pub fn delete_meta(&self, key: &str, sync: bool) -> Result<(), StoreError> {
        check_meta_key(key)?;
        let mut options = WriteOptions::default();
        options.set_sync(sync);
        self.db.delete_cf_opt(self.cf(META_CF)?, key, &options)?;
        Ok(())
    }

    /// Every metadata record whose key starts with `prefix`, sorted by key (except the
    /// store's own, under `replica/`).
    pub fn scan_meta(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let mut records = self.scan_meta_raw(prefix)?;
        // The store's own records are not the caller's.
        records.retain(|(key, _)| !key.starts_with(RESERVED_META_PREFIX));
        Ok(records)
    }

    /// Every metadata record whose key starts with `prefix`, the store's own included.
    fn scan_meta_raw(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let mut iter = self.db.raw_iterator_cf(self.cf(META_CF)?);
        iter.seek(prefix);
        let mut records = Vec::new();
        while iter.valid() {
            let (Some(key), Some(value)) = (iter.key(), iter.value()) else {
                break;
            };
            if !key.starts_with(prefix.as_bytes()) {
                break;
            }
            let key = std::str::from_utf8(key)
                .map_err(|_| StoreError::Failed("metadata key is not UTF-8".to_owned()))?;
            records.push((key.to_owned(), value.to_vec()));
            iter.next();
        }
        iter.status()?;
        Ok(records)
    }

    /// Path of a volume's data file (tests look for plaintext in it).
    pub fn data_file_path(&self, vol: VolumeId) -> PathBuf {
        self.data_dir.join(data_file_name(vol))
    }
}

/// Refuses metadata keys reserved for the store.
fn check_meta_key(key: &str) -> Result<(), StoreError> {
    if key.starts_with(RESERVED_META_PREFIX) {
        return Err(StoreError::Failed(format!(
            "metadata key {key:?} is reserved for the block store"
        )));
    }
    Ok(())
}

/// What `open` keeps of an index entry.
#[derive(Debug, Clone, Copy)]
enum Kept {
    /// The entry as it is: durable, or its data verifies.
    Current,
    /// Its data was lost: the block's last durable version.
    Restored(Version),
    /// Its data was lost and the block had no durable version.
    Nothing,
}

/// Decides what to keep of an entry found at open when generation `synced` was the last
/// completed sync: an entry of a later generation is kept only if its data landed.
fn check_entry(scan: &mut VolumeScan, synced: u64, entry: &IndexEntry, buf: &mut Block) -> Kept {
    if entry.generation <= synced || entry.is_tombstone() {
        // Durable, or no data to lose.
        return Kept::Current;
    }
    scan.checked += 1;
    if scan.verify(entry.slot, entry.meta.crc, buf) {
        return Kept::Current;
    }
    match entry.durable_at(synced) {
        Some(version) => {
            scan.restored += 1;
            Kept::Restored(version)
        }
        None => {
            scan.removed += 1;
            Kept::Nothing
        }
    }
}

fn decode_entry(vol: VolumeId, block: u64, value: &[u8]) -> Result<IndexEntry, StoreError> {
    IndexEntry::decode(value).ok_or_else(|| {
        tracing::error!(
            volume = format_args!("{vol:016x}"),
            block,
            len = value.len(),
            "malformed index entry"
        );
        StoreError::Corrupt { volume: vol, block }
    })
}

/// Sorts writes by block and keeps one per block: the highest version, the first of
/// equal ones (the later would be skipped as not newer).
fn newest_per_block(mut writes: Vec<BlockWrite>) -> Vec<BlockWrite> {
    writes.sort_by_key(|w| (w.block, std::cmp::Reverse(w.meta.version)));
    writes.dedup_by_key(|w| w.block);
    writes
}

#[cfg(test)]
impl Store {
    /// Slot holding a block's data, for tests of slot reuse.
    pub(crate) fn slot_of(&self, vol: VolumeId, block: u64) -> Option<u64> {
        let cf = self.cf(INDEX_CF).ok()?;
        let value = self.db.get_cf(cf, index::key(vol, block)).ok()??;
        IndexEntry::decode(&value).map(|e| e.slot)
    }

    /// Whether a slot of a volume is free (reusable now).
    pub(crate) fn slot_is_free(&self, vol: VolumeId, slot: u64) -> bool {
        self.volume(vol)
            .map(|v| v.slots.lock().is_free(slot))
            .unwrap_or(false)
    }

    /// The raw index value of a block.
    pub(crate) fn raw_index(&self, vol: VolumeId, block: u64) -> Option<Vec<u8>> {
        let cf = self.cf(INDEX_CF).ok()?;
        self.db.get_cf(cf, index::key(vol, block)).ok()?
    }

    /// The decoded index entry of a block.
    pub(crate) fn index_entry(&self, vol: VolumeId, block: u64) -> Option<IndexEntry> {
        IndexEntry::decode(&self.raw_index(vol, block)?)
    }

    /// Closes the current generation as a sync starting now would (tests of a sync in
    /// flight when the power is cut); returns it.
    pub(crate) fn close_generation(&self) -> u64 {
        let mut generations = self.generations.lock();
        let closing = generations.current;
        generations.current += 1;
        closing
    }

    /// Records `generation` as synced, as the end of a sync would (without syncing).
    pub(crate) fn record_synced(&self, generation: u64) {
        if let Ok(cf) = self.cf(META_CF) {
            let _ = self
                .db
                .put_cf(cf, SYNCED_GENERATION_KEY, generation.to_le_bytes());
        }
        self.generations.lock().synced = generation;
    }

    /// Current and last synced generation.
    pub(crate) fn generations(&self) -> (u64, u64) {
        let generations = *self.generations.lock();
        (generations.current, generations.synced)
    }

    /// The history versions of a volume, by block.
    pub(crate) fn history_entries(&self, vol: VolumeId) -> Vec<(u64, HistoryEntry)> {
        let mut entries = Vec::new();
        let _ = self.scan_history(vol, |block, _, entry| {
            entries.push((block, entry));
            Ok(())
        });
        entries
    }

    /// Slots of a volume's data file in use (not free), once freed slots were reclaimed.
    pub(crate) fn used_slots(&self, vol: VolumeId) -> u64 {
        self.volume(vol)
            .map(|v| {
                let slots = v.slots.lock();
                slots.len() - slots.free_count()
            })
            .unwrap_or(0)
    }

    /// Starts a snapshot as `create_snapshot` does, but never records it (a creation
    /// cut short by a crash).
    pub(crate) fn begin_unrecorded_snapshot(&self, vol: VolumeId) -> SnapId {
        let volume = self.volume(vol).unwrap_or_else(|e| panic!("{e}"));
        let mut state = volume.commit.lock();
        let snap = state.birth;
        state.birth += 1;
        state.snapshots.insert(snap, false);
        snap
    }

    /// Deletes a snapshot's record only (a deletion cut short by a crash).
    pub(crate) fn delete_snapshot_record(&self, vol: VolumeId, snap: SnapId) {
        if let Ok(cf) = self.cf(META_CF) {
            let _ = self.db.delete_cf(cf, snapshot_record_key(vol, snap));
        }
    }

    /// Writes a raw value into the index, for tests of malformed entries.
    pub(crate) fn put_raw_index(&self, vol: VolumeId, block: u64, value: &[u8]) {
        if let Ok(cf) = self.cf(INDEX_CF) {
            let _ = self.db.put_cf(cf, index::key(vol, block), value);
        }
    }
}

/// Fails unless `snap` is a recorded snapshot of `volume`.
fn check_snapshot(volume: &Volume, snap: SnapId) -> Result<(), StoreError> {
    if volume.commit.lock().has(snap) {
        Ok(())
    } else {
        Err(StoreError::NoSuchSnapshot {
            volume: volume.id,
            snapshot: snap,
        })
    }
}

mod snapshots;
mod view;

#[cfg(test)]
mod tests;
