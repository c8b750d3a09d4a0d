//! weir-store: the dedup store, which inputs are done and what to publish for them, as
//! weir-core's `DedupStore`.
//!
//! **Boundary:** the only crate of weir that imports rocksdb; it never depends on
//! weir-sandbox or weir-nats. Two column families:
//! - `done`: dedup key → commit time (8 bytes, big-endian Unix milliseconds) and the input's
//!   `DoneRecord` (its outputs or its dead letter). An input whose key is here, and younger
//!   than the retention, is never executed again. Older entries count as absent and are
//!   dropped by a compaction filter as RocksDB compacts: expiry never scans the store.
//! - `outbox`: dedup key → the messages of its record that JetStream has not acknowledged
//!   yet, in the same encoding. Written with the commit (the whole record), narrowed when a
//!   publish succeeds only in part (so that a retry, or a restart, never publishes again what
//!   JetStream already has: after its duplicate window that would be a duplicate), removed
//!   once everything is acknowledged. On start, every record still here is re-published. It
//!   holds its own copy so that retention, which drops old `done` entries, can never drop an
//!   output that was not yet published.
//!
//! - `state`: a stateful pipeline's state, one RocksDB key per entry: the state key's length
//!   (4 bytes, big-endian), the state key, the entry's name → its value. Written with the
//!   commit of the inputs that changed it, so that state and outputs never disagree.
//!
//! All of a batch's writes go into one `WriteBatch` written with sync on: one fsync per
//! batch, and either every input of the batch is committed or none is. A lock on the file
//! `weir.lock` in the directory (taken before RocksDB opens it) keeps a second process from
//! using the same store. The default column family
//! holds one key, the store's format: a store in another format is refused at open.

use std::path::{Path, PathBuf};
use std::sync::{PoisonError, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rocksdb::{
    BlockBasedIndexType, BlockBasedOptions, Cache, ColumnFamilyDescriptor, CompactionDecision, DB,
    IteratorMode, Options, WriteBatch, WriteOptions,
};

use weir_core::ports::{Committed, DedupStore, Fault};
use weir_core::record::{Disposition, DoneRecord, OutboundMessage};
use weir_core::state::{KeyState, StateChanges};

const DONE: &str = "done";
const OUTBOX: &str = "outbox";
const STATE: &str = "state";

/// A store failure. `Locked` and `Open` stop the host at start; `Io` and `Closed` at run
/// time are retried, after reopening the database (nothing is acked until a commit
/// succeeds); `Corrupt` and `Encode` stop the pipeline: retrying cannot heal them.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "store {path:?} is in use by another weir process: stop it, or give this pipeline its own store_dir"
    )]
    Locked { path: PathBuf },
    #[error(
        "cannot open store {path:?}: {source} (set the pipeline's `store_dir` to a directory weir can create and write, or to an existing weir store)"
    )]
    Open {
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("store {operation} failed: {source}")]
    Io {
        operation: &'static str,
        #[source]
        source: rocksdb::Error,
    },
    #[error("store {operation} failed: the store is closed after a failed reopen")]
    Closed { operation: &'static str },
    #[error("store record for key {key:?} is corrupt: {message}")]
    Corrupt { key: String, message: String },
    #[error("cannot encode the store record for key {key:?}: {source} (a bug in weir: report it)")]
    Encode {
        key: String,
        #[source]
        source: postcard::Error,
    },
}

impl Fault for StoreError {
    /// Only `Io` may heal (after reopening the store): a full disk, a failed write.
    fn is_transient(&self) -> bool {
        matches!(self, StoreError::Io { .. } | StoreError::Closed { .. })
    }
}

pub struct Store {
    /// `None` only between a failed reopen and the next successful one.
    db: RwLock<Option<DB>>,
    /// Held for the store's life: no other weir may open the directory meanwhile.
    _lock: std::fs::File,
    path: PathBuf,
    settings: StoreSettings,
}

/// How a store keeps its records and how much memory it may use.
#[derive(Debug, Clone, Copy)]
pub struct StoreSettings {
    /// How long a committed input is remembered.
    pub retention: Duration,
    /// The block cache (data, index and filter blocks of both column families): with the
    /// memtables, what bounds the store's memory however many ids it holds.
    pub cache_bytes: usize,
}

/// How big a store is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Done records (RocksDB's estimate; expired ones count until compaction drops them).
    pub estimated_keys: u64,
    /// The files of the store's directory: tables, write-ahead log, manifest.
    pub size_bytes: u64,
    pub block_cache_bytes: u64,
}

impl Store {
    /// Opens (creating if needed) the store in `path`, and takes its lock.
    pub fn open(path: &Path, settings: StoreSettings) -> Result<Store, StoreError> {
        let lock = lock_dir(path)?;
        Ok(Store {
            db: RwLock::new(Some(open_db(path, settings)?)),
            _lock: lock,
            path: path.to_owned(),
            settings,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Closes and reopens the database. After a failed write (a full disk) RocksDB refuses
    /// every later write until it is reopened; reopening recovers from its log exactly what
    /// was committed, and the failed batch is simply committed again.
    pub fn reopen(&self) -> Result<(), StoreError> {
        let mut db = self.db.write().unwrap_or_else(PoisonError::into_inner);
        // The old handle must be gone (and its lock released) before the new one opens.
        db.take();
        *db = Some(open_db(&self.path, self.settings)?);
        Ok(())
    }

    /// The store's size, for the metrics: its keys and block cache as RocksDB estimates
    /// them (zeros while the database is closed, between a failed write and its
    /// reopening), and what its directory holds on disk.
    pub fn stats(&self) -> StoreStats {
        let stats = self
            .with_db("stats", |db| {
                let property = |name: &str, property: &str| -> u64 {
                    db.property_int_value_cf(family(db, name), property)
                        .ok()
                        .flatten()
                        .unwrap_or(0)
                };
                Ok(StoreStats {
                    estimated_keys: property(DONE, "rocksdb.estimate-num-keys"),
                    size_bytes: 0,
                    // Both families share one cache: read it through one of them.
                    block_cache_bytes: property(DONE, "rocksdb.block-cache-usage"),
                })
            })
            .unwrap_or_default();
        StoreStats {
            size_bytes: directory_bytes(&self.path),
            ..stats
        }
    }

    /// Where the store's memory goes, as RocksDB estimates it (for the benchmarks).
    pub fn memory_report(&self) -> String {
        let report = self.with_db("memory report", |db| {
            let sum = |property: &str| -> u64 {
                [DONE, OUTBOX]
                    .iter()
                    .filter_map(|name| db.property_int_value_cf(family(db, name), property).ok())
                    .flatten()
                    .sum()
            };
            let cache = |property: &str| -> u64 {
                db.property_int_value_cf(family(db, DONE), property)
                    .ok()
                    .flatten()
                    .unwrap_or(0)
            };
            let mib = |bytes: u64| bytes >> 20;
            Ok(format!(
                "memtables {} MiB, table readers {} MiB, block cache {} MiB ({} MiB pinned)",
                mib(sum("rocksdb.cur-size-all-mem-tables")),
                mib(sum("rocksdb.estimate-table-readers-mem")),
                // Both families share one cache: read it through one of them.
                mib(cache("rocksdb.block-cache-usage")),
                mib(cache("rocksdb.block-cache-pinned-usage")),
            ))
        });
        report.unwrap_or_else(|error| error.to_string())
    }

    fn with_db<T>(
        &self,
        operation: &'static str,
        work: impl FnOnce(&DB) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let db = self.db.read().unwrap_or_else(PoisonError::into_inner);
        match db.as_ref() {
            Some(db) => work(db),
            None => Err(StoreError::Closed { operation }),
        }
    }

    /// The committed records of `keys`, in order; `None` for keys never committed or
    /// committed longer ago than the retention.
    pub fn lookup(&self, keys: &[&str]) -> Result<Vec<Option<Committed>>, StoreError> {
        let oldest_ms = oldest_remembered_ms(self.settings.retention);
        self.with_db("lookup", |db| {
            let io = |e: rocksdb::Error| StoreError::Io {
                operation: "lookup",
                source: e,
            };
            let (done, outbox) = (family(db, DONE), family(db, OUTBOX));
            let mut found = Vec::with_capacity(keys.len());
            for (key, record) in keys.iter().zip(db.batched_multi_get_cf(
                done,
                keys.iter().map(|k| k.as_bytes()),
                false,
            )) {
                let committed = match record.map_err(io)? {
                    Some(bytes) => Some(decode(key, &bytes)?),
                    None => None,
                };
                found.push(committed.filter(|(committed_ms, _)| *committed_ms >= oldest_ms));
            }
            // Only committed inputs can have an outbox entry: new ones (the common case)
            // cost one read, not two.
            let committed_keys: Vec<&[u8]> = keys
                .iter()
                .zip(&found)
                .filter(|(_, committed)| committed.is_some())
                .map(|(key, _)| key.as_bytes())
                .collect();
            let mut pending = db
                .batched_multi_get_cf(outbox, committed_keys, false)
                .into_iter();
            found
                .into_iter()
                .zip(keys)
                .map(|(committed, key)| {
                    let Some((_, record)) = committed else {
                        return Ok(None);
                    };
                    let in_outbox = pending
                        .next()
                        .expect("one outbox read per committed input")
                        .map_err(io)?;
                    let unpublished = match in_outbox {
                        Some(bytes) => Some(decode(key, &bytes)?.1),
                        None => None,
                    };
                    Ok(Some(Committed {
                        record,
                        unpublished,
                    }))
                })
                .collect()
        })
    }

    /// Durably records a batch of done inputs and their outbox entries, and the state they
    /// changed, in one synced write.
    pub fn commit(
        &self,
        records: &[(&str, &DoneRecord)],
        state: &[(&str, &StateChanges)],
    ) -> Result<(), StoreError> {
        let committed_ms = unix_millis().to_be_bytes();
        self.with_db("commit", |db| {
            let mut batch = WriteBatch::default();
            for (key, record) in records {
                let value = encode(key, &committed_ms, record)?;
                batch.put_cf(family(db, DONE), key.as_bytes(), &value);
                batch.put_cf(family(db, OUTBOX), key.as_bytes(), value);
            }
            for (state_key, changes) in state {
                for (name, change) in changes.iter() {
                    let entry = state_entry_key(state_key, name);
                    match change {
                        Some(value) => batch.put_cf(family(db, STATE), entry, value),
                        None => batch.delete_cf(family(db, STATE), entry),
                    }
                }
            }
            let mut options = WriteOptions::default();
            options.set_sync(true);
            db.write_opt(batch, &options).map_err(|e| StoreError::Io {
                operation: "commit",
                source: e,
            })
        })
    }

    /// The entries of each state key, in order (none for a key never written).
    pub fn load_state(&self, keys: &[&str]) -> Result<Vec<KeyState>, StoreError> {
        self.with_db("state read", |db| {
            keys.iter()
                .map(|state_key| state_of(db, family(db, STATE), state_key))
                .collect()
        })
    }

    /// Narrows outbox entries to what JetStream has not acknowledged yet (`None`: nothing is
    /// left, and the entry goes). Not synced: an entry that survives a crash only causes a
    /// re-publish, which JetStream drops inside its duplicate window.
    pub fn narrow_outbox(&self, entries: &[(&str, Option<&DoneRecord>)]) -> Result<(), StoreError> {
        let committed_ms = unix_millis().to_be_bytes();
        self.with_db("outbox update", |db| {
            let mut batch = WriteBatch::default();
            for (key, remaining) in entries {
                match remaining {
                    Some(record) => batch.put_cf(
                        family(db, OUTBOX),
                        key.as_bytes(),
                        encode(key, &committed_ms, record)?,
                    ),
                    None => batch.delete_cf(family(db, OUTBOX), key.as_bytes()),
                }
            }
            db.write(batch).map_err(|e| StoreError::Io {
                operation: "outbox update",
                source: e,
            })
        })
    }

    /// Removes outbox entries whose messages JetStream has acknowledged. Not synced: an
    /// entry that survives a crash only causes a harmless re-publish.
    pub fn clear_outbox(&self, keys: &[&str]) -> Result<(), StoreError> {
        self.with_db("outbox clear", |db| {
            let mut batch = WriteBatch::default();
            for key in keys {
                batch.delete_cf(family(db, OUTBOX), key.as_bytes());
            }
            db.write(batch).map_err(|e| StoreError::Io {
                operation: "outbox clear",
                source: e,
            })
        })
    }

    /// Every input committed but not yet known to be published, with its record.
    pub fn pending_outbox(&self) -> Result<Vec<(String, DoneRecord)>, StoreError> {
        self.with_db("outbox scan", |db| {
            let mut pending = Vec::new();
            for entry in db.iterator_cf(family(db, OUTBOX), IteratorMode::Start) {
                let (key, value) = entry.map_err(|e| StoreError::Io {
                    operation: "outbox scan",
                    source: e,
                })?;
                let key = String::from_utf8_lossy(&key).into_owned();
                // Whatever its age, a record still in the outbox must be published.
                let (_, record) = decode(&key, &value)?;
                pending.push((key, record));
            }
            Ok(pending)
        })
    }
}

/// The store as the core's dedup port: the same calls, under the trait's names.
impl DedupStore for Store {
    type Error = StoreError;

    fn lookup(&self, keys: &[&str]) -> Result<Vec<Option<Committed>>, StoreError> {
        Store::lookup(self, keys)
    }

    fn commit(
        &self,
        records: &[(&str, &DoneRecord)],
        state: &[(&str, &StateChanges)],
    ) -> Result<(), StoreError> {
        Store::commit(self, records, state)
    }

    fn load_state(&self, keys: &[&str]) -> Result<Vec<KeyState>, StoreError> {
        Store::load_state(self, keys)
    }

    fn narrow_outbox(&self, entries: &[(&str, Option<&DoneRecord>)]) -> Result<(), StoreError> {
        Store::narrow_outbox(self, entries)
    }

    fn clear_outbox(&self, keys: &[&str]) -> Result<(), StoreError> {
        Store::clear_outbox(self, keys)
    }

    fn pending_outbox(&self) -> Result<Vec<(String, DoneRecord)>, StoreError> {
        Store::pending_outbox(self)
    }

    fn reopen(&self) -> Result<(), StoreError> {
        Store::reopen(self)
    }
}

/// Each memtable of each column family (RocksDB keeps up to two per family).
const MEMTABLE_BYTES: usize = 16 << 20;

/// The outbox (a batch or two at a time) and the state: tables read through the shared
/// cache, memtables as the `done` family's.
fn cached_options(cache: &Cache) -> Options {
    let mut table = BlockBasedOptions::default();
    table.set_block_cache(cache);
    let mut options = Options::default();
    options.set_block_based_table_factory(&table);
    options.set_write_buffer_size(MEMTABLE_BYTES);
    options
}

/// What the files directly in `dir` take on disk (a store has no subdirectories): the table
/// files, and the write-ahead log that holds what is not yet in them.
pub fn directory_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(|entry| entry.ok()?.metadata().ok())
        .filter(|metadata| metadata.is_file())
        .map(|metadata| metadata.len())
        .sum()
}

fn open_db(path: &Path, settings: StoreSettings) -> Result<DB, StoreError> {
    std::fs::create_dir_all(path).map_err(|e| StoreError::Open {
        path: path.to_owned(),
        source: e.into(),
    })?;
    let mut options = Options::default();
    options.create_if_missing(true);
    options.create_missing_column_families(true);
    let mut done_options = Options::default();
    let mut table = BlockBasedOptions::default();
    // Most lookups are for new keys: a bloom filter answers "absent" without a disk read.
    table.set_bloom_filter(10.0, false);
    // Memory stays bounded however many ids the store holds: index and filter blocks are
    // partitioned and live in the block cache with the data blocks (only their small top
    // levels are pinned), instead of growing with every table file.
    let cache = Cache::new_lru_cache(settings.cache_bytes);
    table.set_block_cache(&cache);
    table.set_cache_index_and_filter_blocks(true);
    table.set_cache_index_and_filter_blocks_with_high_priority(true);
    table.set_pin_top_level_index_and_filter(true);
    table.set_pin_l0_filter_and_index_blocks_in_cache(true);
    table.set_partition_filters(true);
    table.set_index_type(BlockBasedIndexType::TwoLevelIndexSearch);
    done_options.set_block_based_table_factory(&table);
    done_options.set_write_buffer_size(MEMTABLE_BYTES);
    let retention = settings.retention;
    done_options.set_compaction_filter(
        "weir-dedup-retention",
        move |_level, _key, value: &[u8]| match committed_millis(value) {
            Some(committed) if committed < oldest_remembered_ms(retention) => {
                CompactionDecision::Remove
            }
            _ => CompactionDecision::Keep,
        },
    );
    let families = [
        ColumnFamilyDescriptor::new(DONE, done_options),
        ColumnFamilyDescriptor::new(OUTBOX, cached_options(&cache)),
        // A store from before state gains the family when it opens.
        ColumnFamilyDescriptor::new(STATE, cached_options(&cache)),
    ];
    // weir.lock is held: RocksDB's own LOCK can only be contended by a process that is not
    // weir, and then its error says so.
    let db = DB::open_cf_descriptors(&options, path, families).map_err(|e| StoreError::Open {
        path: path.to_owned(),
        source: e.into(),
    })?;
    check_format(&db, path)?;
    Ok(db)
}

/// The layout of keys and values this weir reads and writes, recorded in every store.
const FORMAT: &[u8] = b"1";
const FORMAT_KEY: &[u8] = b"weir-store-format";

/// Refuses a store written in another format; marks a new one (or one from before the mark,
/// which has this format) with this one.
fn check_format(db: &DB, path: &Path) -> Result<(), StoreError> {
    let open_error = |message: String| StoreError::Open {
        path: path.to_owned(),
        source: message.into(),
    };
    match db.get(FORMAT_KEY) {
        Ok(Some(found)) if found == FORMAT => Ok(()),
        Ok(Some(found)) => Err(open_error(format!(
            "it is in store format {:?} and this weir reads format {:?}: run the weir that wrote it, or point store_dir at a new directory",
            String::from_utf8_lossy(&found),
            String::from_utf8_lossy(FORMAT)
        ))),
        Ok(None) => {
            let mut options = WriteOptions::default();
            options.set_sync(true);
            db.put_opt(FORMAT_KEY, FORMAT, &options)
                .map_err(|e| open_error(format!("cannot record its format: {e}")))
        }
        Err(e) => Err(open_error(format!("cannot read its format: {e}"))),
    }
}

fn family<'a>(db: &'a DB, name: &str) -> &'a rocksdb::ColumnFamily {
    // Both families are created by `open_db`; a missing one is a bug, not an input.
    db.cf_handle(name)
        .expect("open_db creates every column family")
}

/// The entries of `state_key` in the state family `state`.
fn state_of(
    db: &DB,
    state: &rocksdb::ColumnFamily,
    state_key: &str,
) -> Result<KeyState, StoreError> {
    let prefix = state_entry_key(state_key, "");
    let mut entries = Vec::new();
    let from = IteratorMode::From(&prefix, rocksdb::Direction::Forward);
    for entry in db.iterator_cf(state, from) {
        let (key, value) = entry.map_err(|e| StoreError::Io {
            operation: "state read",
            source: e,
        })?;
        let Some(name) = key.strip_prefix(prefix.as_slice()) else {
            break;
        };
        let name = String::from_utf8(name.to_vec()).map_err(|_| StoreError::Corrupt {
            key: state_key.to_owned(),
            message: "a state entry's name is not UTF-8".into(),
        })?;
        entries.push((name, value.into_vec()));
    }
    Ok(KeyState::from_entries(entries))
}

/// A store's state, read from another process while its weir runs (or not): RocksDB's
/// secondary instance, which reads what the primary has written, write-ahead log included,
/// and takes no lock. For `weir state`.
pub struct StateReader {
    db: DB,
    /// The secondary instance's own files (its info log), removed on drop.
    scratch: PathBuf,
}

impl StateReader {
    pub fn open(path: &Path) -> Result<StateReader, StoreError> {
        let open_error = |message: String| StoreError::Open {
            path: path.to_owned(),
            source: message.into(),
        };
        if !path.join("CURRENT").is_file() {
            return Err(open_error(
                "no weir store is there: has the pipeline run with this store_dir?".into(),
            ));
        }
        let mut options = Options::default();
        // A secondary instance must keep every table file open to follow the primary.
        options.set_max_open_files(-1);
        let families = DB::list_cf(&options, path).map_err(|e| open_error(e.to_string()))?;
        if !families.iter().any(|name| name == STATE) {
            return Err(open_error(
                "the store holds no state: a weir from before state wrote it".into(),
            ));
        }
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |elapsed| elapsed.as_nanos());
        let scratch =
            std::env::temp_dir().join(format!("weir-state-{}-{nanos}", std::process::id()));
        let db = DB::open_cf_as_secondary(&options, path, &scratch, &families)
            .map_err(|e| open_error(e.to_string()))?;
        db.try_catch_up_with_primary()
            .map_err(|e| open_error(format!("cannot catch up with the running weir: {e}")))?;
        Ok(StateReader { db, scratch })
    }

    /// The entries of `state_key`.
    pub fn entries(&self, state_key: &str) -> Result<KeyState, StoreError> {
        state_of(&self.db, family(&self.db, STATE), state_key)
    }

    /// Up to `limit` state keys after `after` (from the first, if empty), in the store's
    /// order (by length, then bytes), each with its entry count and bytes.
    pub fn keys(
        &self,
        after: &str,
        limit: usize,
    ) -> Result<Vec<(String, usize, usize)>, StoreError> {
        let start = if after.is_empty() {
            Vec::new()
        } else {
            // Past every entry of `after`: its prefix with the highest byte appended (an
            // entry name is UTF-8, which never holds 0xff).
            let mut past = state_entry_key(after, "");
            past.push(0xff);
            past
        };
        let mut keys: Vec<(String, usize, usize)> = Vec::new();
        let from = IteratorMode::From(&start, rocksdb::Direction::Forward);
        for entry in self.db.iterator_cf(family(&self.db, STATE), from) {
            let (key, value) = entry.map_err(|e| StoreError::Io {
                operation: "state read",
                source: e,
            })?;
            let corrupt = |message: &str| StoreError::Corrupt {
                key: String::from_utf8_lossy(&key).into_owned(),
                message: message.into(),
            };
            let len = key
                .get(..4)
                .map(|len| u32::from_be_bytes(len.try_into().expect("4 bytes")) as usize)
                .ok_or_else(|| corrupt("a state entry's key is shorter than its length"))?;
            let state_key = key
                .get(4..4 + len)
                .and_then(|bytes| std::str::from_utf8(bytes).ok())
                .ok_or_else(|| corrupt("a state key is cut short or not UTF-8"))?;
            let bytes = key.len() - 4 - len + value.len();
            if let Some((last, entries, total)) = keys.last_mut()
                && last == state_key
            {
                *entries += 1;
                *total += bytes;
            } else if keys.len() == limit {
                break;
            } else {
                keys.push((state_key.to_owned(), 1, bytes));
            }
        }
        Ok(keys)
    }
}

impl Drop for StateReader {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.scratch);
    }
}

/// The RocksDB key of entry `name` of `state_key`: the state key's length first, so that
/// no key's entries run into another's.
fn state_entry_key(state_key: &str, name: &str) -> Vec<u8> {
    let mut entry = Vec::with_capacity(4 + state_key.len() + name.len());
    entry.extend_from_slice(&(state_key.len() as u32).to_be_bytes());
    entry.extend_from_slice(state_key.as_bytes());
    entry.extend_from_slice(name.as_bytes());
    entry
}

/// The commit time at the front of a `done` value.
fn committed_millis(value: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(value.get(..8)?.try_into().ok()?))
}

/// The byte after a record's commit time that says it has lineage. A record written before
/// has its disposition there, which postcard writes as 0 or 1.
const WITH_LINEAGE: u8 = 2;

/// A record as weir wrote it before it recorded lineage: a store keeps such records until
/// their retention ends.
#[derive(serde::Deserialize)]
struct DoneRecordWithoutLineage {
    disposition: Disposition,
    messages: Vec<OutboundMessage>,
}

fn encode(key: &str, committed_ms: &[u8; 8], record: &DoneRecord) -> Result<Vec<u8>, StoreError> {
    let mut header = committed_ms.to_vec();
    header.push(WITH_LINEAGE);
    postcard::to_extend(record, header).map_err(|source| StoreError::Encode {
        key: key.to_owned(),
        source,
    })
}

/// Takes the store directory's lock file, or says who holds it.
fn lock_dir(path: &Path) -> Result<std::fs::File, StoreError> {
    std::fs::create_dir_all(path).map_err(|e| StoreError::Open {
        path: path.to_owned(),
        source: e.into(),
    })?;
    let lock_path = path.join("weir.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| StoreError::Open {
            path: path.to_owned(),
            source: format!("cannot open its lock file {lock_path:?}: {e}").into(),
        })?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(StoreError::Locked {
            path: path.to_owned(),
        }),
        Err(std::fs::TryLockError::Error(e)) => Err(StoreError::Open {
            path: path.to_owned(),
            source: format!("cannot lock {lock_path:?}: {e}").into(),
        }),
    }
}

fn decode(key: &str, bytes: &[u8]) -> Result<(u64, DoneRecord), StoreError> {
    let corrupt = |message: String| StoreError::Corrupt {
        key: key.to_owned(),
        message,
    };
    let committed =
        committed_millis(bytes).ok_or_else(|| corrupt("shorter than its header".into()))?;
    let record = match bytes[8..] {
        [WITH_LINEAGE, ref record @ ..] => {
            postcard::from_bytes(record).map_err(|e| corrupt(e.to_string()))?
        }
        [0 | 1, ..] => {
            let old: DoneRecordWithoutLineage =
                postcard::from_bytes(&bytes[8..]).map_err(|e| corrupt(e.to_string()))?;
            DoneRecord {
                disposition: old.disposition,
                messages: old.messages,
                lineage: None,
            }
        }
        _ => return Err(corrupt("of an unknown layout".into())),
    };
    Ok((committed, record))
}

/// The oldest commit time, in Unix milliseconds, that is still remembered: a record
/// committed before it counts as absent, and compaction drops it.
fn oldest_remembered_ms(retention: Duration) -> u64 {
    let retention_ms = u64::try_from(retention.as_millis()).unwrap_or(u64::MAX);
    unix_millis().saturating_sub(retention_ms)
}

/// Now, in Unix milliseconds (0 if the clock is before 1970).
fn unix_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;
    use weir_core::record::Lineage;

    fn settings(retention: Duration) -> StoreSettings {
        StoreSettings {
            retention,
            cache_bytes: 8 << 20,
        }
    }

    fn record(payload: &[u8]) -> DoneRecord {
        DoneRecord {
            disposition: Disposition::Transformed,
            messages: vec![OutboundMessage {
                subject: "out.a".into(),
                msg_id: "weir:p:k:0".into(),
                headers: vec![("h".into(), "v".into())],
                payload: payload.to_vec(),
            }],
            lineage: Some(Lineage {
                sha256: "ab".repeat(32),
                contract: "weir:transform/transformer@0.2.0".into(),
            }),
        }
    }

    #[test]
    fn a_record_written_before_lineage_reads_with_none() {
        let now = record(b"p");
        let mut bytes = 1_700_000_000_000u64.to_be_bytes().to_vec();
        // postcard writes a struct as the tuple of its fields: these are the bytes of the
        // record before its `lineage` field.
        bytes.extend(postcard::to_allocvec(&(now.disposition, now.messages.clone())).unwrap());
        let (_, read) = decode("k", &bytes).unwrap();
        assert_eq!(read.messages, now.messages);
        assert_eq!(read.lineage, None);
        // A record of today reads back whole; one cut anywhere, even where the older
        // layout would end, is corrupt.
        let today = encode("k", &1u64.to_be_bytes(), &now).unwrap();
        assert_eq!(decode("k", &today).unwrap().1, now);
        for cut in 9..today.len() {
            assert!(
                matches!(decode("k", &today[..cut]), Err(StoreError::Corrupt { .. })),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn a_store_in_another_format_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        drop(Store::open(dir.path(), settings(Duration::from_secs(3600))).unwrap());
        {
            let db = open_db(dir.path(), settings(Duration::from_secs(3600))).unwrap();
            db.put(FORMAT_KEY, b"2").unwrap();
        }
        match Store::open(dir.path(), settings(Duration::from_secs(3600))) {
            Err(error @ StoreError::Open { .. }) => {
                let message = error.to_string();
                assert!(message.contains("store format \"2\""), "{message}")
            }
            Err(other) => panic!("expected a format error, got {other}"),
            Ok(_) => panic!("a store in format 2 was opened"),
        }
    }

    #[test]
    fn committed_records_survive_reopen_and_outbox_clears() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path(), settings(Duration::from_secs(3600))).unwrap();
            let (a, b) = (record(b"a"), record(b"b"));
            store.commit(&[("k1", &a), ("k2", &b)], &[]).unwrap();
            store.clear_outbox(&["k1"]).unwrap();
        }
        let store = Store::open(dir.path(), settings(Duration::from_secs(3600))).unwrap();
        let found = store.lookup(&["k1", "k2", "k3"]).unwrap();
        let committed = |payload: &[u8], published: bool| {
            Some(Committed {
                record: record(payload),
                unpublished: (!published).then(|| record(payload)),
            })
        };
        assert_eq!(found[0], committed(b"a", true));
        assert_eq!(
            found[1],
            committed(b"b", false),
            "k2 is still in the outbox"
        );
        assert_eq!(found[2], None);
        let pending = store.pending_outbox().unwrap();
        assert_eq!(pending, vec![("k2".to_owned(), record(b"b"))]);
    }

    #[test]
    fn state_commits_with_its_records_per_key_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let changes = |entries: &[(&str, Option<&str>)]| -> StateChanges {
            entries
                .iter()
                .map(|&(name, value)| (name.to_owned(), value.map(|v| v.as_bytes().to_vec())))
                .collect()
        };
        {
            let store = Store::open(dir.path(), settings(Duration::from_secs(3600))).unwrap();
            let first = changes(&[("balance", Some("10")), ("seen", Some("1"))]);
            // Key "a" and key "ab" must not read each other's entries.
            let other = changes(&[("balance", Some("99"))]);
            store
                .commit(&[("k1", &record(b"a"))], &[("a", &first), ("ab", &other)])
                .unwrap();
            let second = changes(&[("balance", Some("6")), ("seen", None)]);
            store
                .commit(&[("k2", &record(b"b"))], &[("a", &second)])
                .unwrap();
        }
        let store = Store::open(dir.path(), settings(Duration::from_secs(3600))).unwrap();
        let loaded = store.load_state(&["a", "ab", "never"]).unwrap();
        assert_eq!(
            loaded,
            [
                KeyState::from_entries([("balance".to_owned(), b"6".to_vec())]),
                KeyState::from_entries([("balance".to_owned(), b"99".to_vec())]),
                KeyState::default(),
            ]
        );
    }

    #[test]
    fn a_state_reader_reads_a_store_in_use_and_pages_its_keys() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), settings(Duration::from_secs(3600))).unwrap();
        let changes: StateChanges = [
            ("balance".to_owned(), Some(b"10".to_vec())),
            ("seen".to_owned(), Some(b"1".to_vec())),
        ]
        .into_iter()
        .collect();
        let keys = ["a", "b", "c"];
        let state: Vec<(&str, &StateChanges)> = keys.iter().map(|key| (*key, &changes)).collect();
        store.commit(&[("k1", &record(b"a"))], &state).unwrap();
        // The store stays open, locked, as a running weir holds it.
        let reader = StateReader::open(dir.path()).unwrap();
        assert_eq!(
            reader.entries("b").unwrap(),
            KeyState::from_entries([
                ("balance".to_owned(), b"10".to_vec()),
                ("seen".to_owned(), b"1".to_vec()),
            ])
        );
        let page = reader.keys("", 2).unwrap();
        assert_eq!(page, [("a".into(), 2, 14), ("b".into(), 2, 14)]);
        assert_eq!(reader.keys("b", 2).unwrap(), [("c".into(), 2, 14)]);
        let missing = StateReader::open(&dir.path().join("nothing"))
            .err()
            .unwrap();
        assert!(
            missing.to_string().contains("no weir store is there"),
            "{missing}"
        );
    }

    #[test]
    fn records_older_than_the_retention_count_as_absent_and_compact_away() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), settings(Duration::from_millis(300))).unwrap();
        let (old, published) = (record(b"old"), record(b"published"));
        store
            .commit(&[("old", &old), ("published", &published)], &[])
            .unwrap();
        store.clear_outbox(&["published"]).unwrap();
        assert!(
            store.lookup(&["old"]).unwrap()[0].is_some(),
            "live within the retention"
        );
        std::thread::sleep(Duration::from_millis(400));
        let young = record(b"young");
        store.commit(&[("young", &young)], &[]).unwrap();
        let found = store.lookup(&["old", "published", "young"]).unwrap();
        assert_eq!(found[0], None, "expired");
        assert_eq!(found[1], None, "expired");
        assert!(found[2].is_some(), "committed within the retention");
        // An expired record still in the outbox is still published.
        let pending: Vec<String> = store
            .pending_outbox()
            .unwrap()
            .into_iter()
            .map(|(key, _)| key)
            .collect();
        assert_eq!(pending, ["old", "young"]);
        // Compaction drops expired records for good, without a scan by weir.
        store
            .with_db("compact", |db| {
                db.compact_range_cf(family(db, DONE), None::<&[u8]>, None::<&[u8]>);
                Ok(())
            })
            .unwrap();
        let stored = |key: &str| {
            store
                .with_db("get", |db| Ok(db.get_cf(family(db, DONE), key).unwrap()))
                .unwrap()
                .is_some()
        };
        assert!(!stored("old") && !stored("published"));
        assert!(stored("young"));
    }

    #[test]
    fn a_narrowed_outbox_entry_keeps_only_what_is_left_to_publish() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), settings(Duration::from_secs(3600))).unwrap();
        let mut two = record(b"a");
        two.messages.push(OutboundMessage {
            msg_id: "weir:p:k:1".into(),
            ..two.messages[0].clone()
        });
        store.commit(&[("k", &two), ("done", &two)], &[]).unwrap();
        let rest = DoneRecord {
            disposition: two.disposition,
            messages: two.messages[1..].to_vec(),
            lineage: two.lineage.clone(),
        };
        store
            .narrow_outbox(&[("k", Some(&rest)), ("done", None)])
            .unwrap();
        let found = store.lookup(&["k", "done"]).unwrap();
        assert_eq!(
            found[0].as_ref().unwrap().record,
            two,
            "done keeps the whole record"
        );
        assert_eq!(found[0].as_ref().unwrap().unpublished, Some(rest.clone()));
        assert_eq!(found[1].as_ref().unwrap().unpublished, None);
        assert_eq!(
            store.pending_outbox().unwrap(),
            vec![("k".to_owned(), rest)]
        );
    }

    #[test]
    fn second_open_of_the_same_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let _first = Store::open(dir.path(), settings(Duration::from_secs(3600))).unwrap();
        match Store::open(dir.path(), settings(Duration::from_secs(3600))) {
            Err(StoreError::Locked { .. }) => {}
            Err(other) => panic!("expected Locked, got {other}"),
            Ok(_) => panic!("a second open of a locked store succeeded"),
        }
    }
}
