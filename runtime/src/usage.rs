//! Usage records of served inference requests (issue 13 item 6; spec/api.md
//! API-USAGE-*): one record per request, in the node's own fjall database
//! under `data_dir/usage` (apart from the consensus store), queryable by the
//! API key that paid for it, kept for the seed's 30 days, and mirrored to
//! PostgreSQL when the node's configuration names a server.
//!
//! ```toml
//! [logs]                             # usage records (this module)
//! # postgres_url = "host=/run/postgresql user=blyan dbname=blyan"
//! #                                  # default: unset, no mirror; libpq key=value
//! #                                  # or postgresql:// URL; no TLS (local socket or 127.0.0.1)
//! retention_ms = 2592000000          # default: the seed's 30 days
//! ```
//!
//! Rules (the spec lists them):
//! - **API-USAGE-1** A record is checked before it is stored: `model` and
//!   `outcome` are 1..=[`MAX_TEXT_BYTES`] bytes of UTF-8, `route` has at most
//!   [`MAX_ROUTE_NODES`] addresses, and the token counts, latency and time
//!   are at most `i64::MAX` (PostgreSQL's `BIGINT`). A record that fails is
//!   refused with [`Error::UsageRecordInvalid`], never truncated. On disk a
//!   record is a versioned binary encoding ([`encode_record`], version
//!   [`RECORD_VERSION`]); a stored value that does not decode is
//!   [`Error::Corrupt`] naming its sequence number.
//! - **API-USAGE-2** [`UsageLog::append`] returns only after the record, its
//!   index entries and the next sequence number are one batch synced to disk.
//!   Sequence numbers strictly increase in commit order and are never reused,
//!   also after every record was pruned.
//! - **API-USAGE-3** [`UsageLog::query`] reads one key id's records through an
//!   index keyed by `key_id ‖ time_ms ‖ seq` (no scan of other keys' records),
//!   **newest first**, at most `limit` (1..=[`MAX_PAGE_LIMIT`]) per page, from
//!   one snapshot. A page that may have more carries `next_cursor`; following
//!   the cursors visits each record with `time_ms ≥ since_ms` once.
//! - **API-USAGE-4** [`UsageLog::prune`] removes every record with
//!   `time_ms < now_ms − retention_ms` (default 30 days, the seed's
//!   retention); the node runs it at start and every hour
//!   ([`run_pruning`]). A record pruned before the mirror sent it is counted
//!   (`blyan_usage_pruned_unmirrored_total`) and logged: the store is bounded
//!   by the retention, not by PostgreSQL's availability.
//! - **API-USAGE-5** The PostgreSQL mirror ([`mirror_to_postgres`]) is an
//!   outbox: it sends the records at or after a cursor persisted in the usage
//!   database, in sequence order, in batches of at most [`MIRROR_BATCH`] in
//!   one transaction, with `INSERT … ON CONFLICT DO NOTHING` on the primary
//!   key `(node, request_id)`, and moves the cursor only after the commit.
//!   Appends never wait for it. While PostgreSQL is unreachable it retries
//!   with a doubling backoff (100 ms up to 5 s); after it returns every
//!   record is in the table once (a batch re-sent after a crash between the
//!   commit and the cursor write is absorbed by the conflict clause).
//!   `/metrics`: `blyan_usage_mirror_lag_records`,
//!   `blyan_usage_mirror_up`, `blyan_usage_mirror_records_total`,
//!   `blyan_usage_mirror_failures_total`.
//!
//! The PostgreSQL table (created if missing, [`PG_CREATE_TABLE`]):
//! `blyan_usage (node BYTEA, request_id BYTEA, seq BIGINT, key_id BYTEA,
//! allowance BYTEA NULL, model TEXT, prompt_tokens BIGINT, completion_tokens
//! BIGINT, route BYTEA[], cost_base_units NUMERIC(39,0), latency_ms BIGINT,
//! outcome TEXT, time_ms BIGINT, PRIMARY KEY (node, request_id))` with an
//! index on `(key_id, time_ms)`.
//!
//! The mirror's cursor is one per data directory: pointed at a new, empty
//! database it does not resend what it sent before; [`UsageLog::rewind_mirror`]
//! (from 0) re-mirrors what the retention still holds.
//!
//! Key ids are SHA3-256 of the API key string ([`key_id_of`]); the key itself
//! is never stored. Keyless (free) use is filed under the all-zero key id,
//! which no key hashes to, so no key holder can read it.

use crate::Error;
use blyan_state_machine::types::{Address, Amount};
use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode, Readable};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha3::{Digest, Sha3_256};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Notify, watch};
use tracing::{Instrument, info, warn};

/// Version of the usage database's layout (meta key `schema`).
pub const SCHEMA_VERSION: u32 = 1;
/// First byte of every stored record.
pub const RECORD_VERSION: u8 = 1;
/// API-USAGE-1: bytes of `model` and of `outcome`.
pub const MAX_TEXT_BYTES: usize = 256;
/// API-USAGE-1: addresses in `route`.
pub const MAX_ROUTE_NODES: usize = 256;
/// The largest encoded record (API-USAGE-1's bounds).
pub const MAX_RECORD_BYTES: usize = 1
    + 32
    + 32
    + 1
    + 32
    + 8 * 4
    + 16
    + 2
    + MAX_TEXT_BYTES
    + 2
    + MAX_TEXT_BYTES
    + 2
    + 20 * MAX_ROUTE_NODES;
/// API-USAGE-3: the most records on one page.
pub const MAX_PAGE_LIMIT: usize = 1000;
/// The page size when a query names none.
pub const DEFAULT_PAGE_LIMIT: usize = 100;
/// API-USAGE-4: the seed's retention of inference logs, 30 days.
pub const DEFAULT_RETENTION_MS: u64 = 30 * 24 * 60 * 60 * 1000;
/// API-USAGE-4: how often the node prunes.
pub const PRUNE_INTERVAL_MS: u64 = 60 * 60 * 1000;
/// Records removed per synced batch when pruning.
const PRUNE_BATCH: usize = 1024;
/// API-USAGE-5: records per PostgreSQL transaction.
pub const MIRROR_BATCH: usize = 256;
/// The PostgreSQL table the mirror writes.
pub const PG_TABLE: &str = "blyan_usage";
/// API-USAGE-5: the mirror's table, created if missing.
pub const PG_CREATE_TABLE: &str = "CREATE TABLE IF NOT EXISTS blyan_usage (
    node BYTEA NOT NULL,
    request_id BYTEA NOT NULL,
    seq BIGINT NOT NULL,
    key_id BYTEA NOT NULL,
    allowance BYTEA,
    model TEXT NOT NULL,
    prompt_tokens BIGINT NOT NULL,
    completion_tokens BIGINT NOT NULL,
    route BYTEA[] NOT NULL,
    cost_base_units NUMERIC(39, 0) NOT NULL,
    latency_ms BIGINT NOT NULL,
    outcome TEXT NOT NULL,
    time_ms BIGINT NOT NULL,
    PRIMARY KEY (node, request_id)
);
CREATE INDEX IF NOT EXISTS blyan_usage_key_time ON blyan_usage (key_id, time_ms);";
const PG_INSERT: &str = "INSERT INTO blyan_usage (node, request_id, seq, key_id, allowance, \
     model, prompt_tokens, completion_tokens, route, cost_base_units, latency_ms, outcome, time_ms) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, CAST($10 AS TEXT)::NUMERIC, $11, $12, $13) \
     ON CONFLICT (node, request_id) DO NOTHING";

const META_SCHEMA: &[u8] = b"schema";
const META_NEXT_SEQ: &[u8] = b"next_seq";
const META_MIRROR_CURSOR: &[u8] = b"mirror_cursor";

/// One served request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UsageRecord {
    /// The node's id for the request.
    pub request_id: [u8; 32],
    /// SHA3-256 of the API key string ([`key_id_of`]), never the key;
    /// all zero for keyless (free) use.
    pub key_id: [u8; 32],
    /// The on-chain allowance the key draws on.
    pub allowance: Option<[u8; 32]>,
    /// 1..=[`MAX_TEXT_BYTES`] bytes.
    pub model: String,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// The serving nodes, at most [`MAX_ROUTE_NODES`].
    pub route: Vec<Address>,
    /// Base units (1 BLY = 10^18).
    pub cost_base_units: Amount,
    pub latency_ms: u64,
    /// `stop`, `length`, `cap_reached`, `cancelled:<reason>`,
    /// `error:<kind>`: 1..=[`MAX_TEXT_BYTES`] bytes.
    pub outcome: String,
    /// Unix ms at completion (wall clock).
    pub time_ms: u64,
}

/// SHA3-256 of an API key string: the key id records are filed under.
pub fn key_id_of(api_key: &str) -> [u8; 32] {
    Sha3_256::digest(api_key.as_bytes()).into()
}

/// API-USAGE-1: the bounds a record must meet.
pub fn check_record(rec: &UsageRecord) -> Result<(), Error> {
    let bad = |m: String| Err(Error::UsageRecordInvalid(m));
    for (name, text) in [("model", &rec.model), ("outcome", &rec.outcome)] {
        if text.is_empty() || text.len() > MAX_TEXT_BYTES {
            return bad(format!(
                "{name} is {} bytes; 1..={MAX_TEXT_BYTES} allowed",
                text.len()
            ));
        }
    }
    if rec.route.len() > MAX_ROUTE_NODES {
        return bad(format!(
            "route has {} nodes; at most {MAX_ROUTE_NODES} allowed",
            rec.route.len()
        ));
    }
    for (name, v) in [
        ("prompt_tokens", rec.prompt_tokens),
        ("completion_tokens", rec.completion_tokens),
        ("latency_ms", rec.latency_ms),
        ("time_ms", rec.time_ms),
    ] {
        if v > i64::MAX as u64 {
            return bad(format!("{name} {v} exceeds {}", i64::MAX));
        }
    }
    Ok(())
}

/// The stored form (version [`RECORD_VERSION`]): `version ‖ request_id ‖
/// key_id ‖ has_allowance (0|1) ‖ [allowance] ‖ prompt_tokens ‖
/// completion_tokens ‖ latency_ms ‖ time_ms (u64 BE each) ‖ cost (u128 BE) ‖
/// len (u16 BE) ‖ model ‖ len ‖ outcome ‖ count (u16 BE) ‖ address × count`.
/// The record must pass [`check_record`].
pub fn encode_record(rec: &UsageRecord) -> Vec<u8> {
    let mut v =
        Vec::with_capacity(128 + rec.model.len() + rec.outcome.len() + 20 * rec.route.len());
    v.push(RECORD_VERSION);
    v.extend_from_slice(&rec.request_id);
    v.extend_from_slice(&rec.key_id);
    match &rec.allowance {
        Some(a) => {
            v.push(1);
            v.extend_from_slice(a);
        }
        None => v.push(0),
    }
    for n in [
        rec.prompt_tokens,
        rec.completion_tokens,
        rec.latency_ms,
        rec.time_ms,
    ] {
        v.extend_from_slice(&n.to_be_bytes());
    }
    v.extend_from_slice(&rec.cost_base_units.to_be_bytes());
    for text in [&rec.model, &rec.outcome] {
        v.extend_from_slice(&(text.len() as u16).to_be_bytes());
        v.extend_from_slice(text.as_bytes());
    }
    v.extend_from_slice(&(rec.route.len() as u16).to_be_bytes());
    for a in &rec.route {
        v.extend_from_slice(&a.0);
    }
    v
}

struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], String> {
        if self.bytes.len() < n {
            return Err(format!("truncated in {what}"));
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }
    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], String> {
        Ok(self.take(N, what)?.try_into().expect("length taken"))
    }
    fn u64(&mut self, what: &str) -> Result<u64, String> {
        Ok(u64::from_be_bytes(self.array(what)?))
    }
    fn u16(&mut self, what: &str) -> Result<u16, String> {
        Ok(u16::from_be_bytes(self.array(what)?))
    }
    fn text(&mut self, what: &str) -> Result<String, String> {
        let n = self.u16(what)? as usize;
        let b = self.take(n, what)?;
        String::from_utf8(b.to_vec()).map_err(|_| format!("{what} is not UTF-8"))
    }
}

/// Decodes [`encode_record`]'s form, refusing another version, trailing
/// bytes or a record outside API-USAGE-1's bounds. The error says what is
/// wrong; the log wraps it as [`Error::Corrupt`].
pub fn decode_record(bytes: &[u8]) -> Result<UsageRecord, String> {
    let mut r = Reader { bytes };
    let version = r.array::<1>("version")?[0];
    if version != RECORD_VERSION {
        return Err(format!(
            "record version {version}; this node reads {RECORD_VERSION}"
        ));
    }
    let request_id = r.array("request_id")?;
    let key_id = r.array("key_id")?;
    let allowance = match r.array::<1>("allowance flag")?[0] {
        0 => None,
        1 => Some(r.array("allowance")?),
        f => return Err(format!("allowance flag {f} is neither 0 nor 1")),
    };
    let prompt_tokens = r.u64("prompt_tokens")?;
    let completion_tokens = r.u64("completion_tokens")?;
    let latency_ms = r.u64("latency_ms")?;
    let time_ms = r.u64("time_ms")?;
    let cost_base_units = u128::from_be_bytes(r.array("cost")?);
    let model = r.text("model")?;
    let outcome = r.text("outcome")?;
    let count = r.u16("route count")? as usize;
    if count > MAX_ROUTE_NODES {
        return Err(format!("route count {count} exceeds {MAX_ROUTE_NODES}"));
    }
    let mut route = Vec::with_capacity(count);
    for _ in 0..count {
        route.push(Address(r.array("route")?));
    }
    if !r.bytes.is_empty() {
        return Err(format!("{} trailing bytes", r.bytes.len()));
    }
    let rec = UsageRecord {
        request_id,
        key_id,
        allowance,
        model,
        prompt_tokens,
        completion_tokens,
        route,
        cost_base_units,
        latency_ms,
        outcome,
        time_ms,
    };
    check_record(&rec).map_err(|e| e.to_string())?;
    Ok(rec)
}

/// `[logs]` in the node's TOML (see the module docs).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogsConfig {
    /// PostgreSQL connection string (libpq `key=value` or a
    /// `postgresql://` URL); unset: no mirror.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postgres_url: Option<String>,
    /// API-USAGE-4.
    #[serde(default = "default_retention")]
    pub retention_ms: u64,
}

fn default_retention() -> u64 {
    DEFAULT_RETENTION_MS
}

impl Default for LogsConfig {
    fn default() -> Self {
        LogsConfig {
            postgres_url: None,
            retention_ms: DEFAULT_RETENTION_MS,
        }
    }
}

impl LogsConfig {
    /// The configuration errors `FileConfig::parse` reports.
    pub fn validate(&self) -> Result<(), String> {
        if self.retention_ms == 0 {
            return Err("retention_ms must be positive".into());
        }
        if let Some(url) = &self.postgres_url {
            url.parse::<tokio_postgres::Config>()
                .map_err(|e| format!("postgres_url does not parse: {e}"))?;
        }
        Ok(())
    }

    pub fn usage_config(&self) -> UsageConfig {
        UsageConfig {
            retention_ms: self.retention_ms,
        }
    }
}

/// The log's settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UsageConfig {
    /// API-USAGE-4: records older than this are pruned.
    pub retention_ms: u64,
}

impl Default for UsageConfig {
    fn default() -> Self {
        UsageConfig {
            retention_ms: DEFAULT_RETENTION_MS,
        }
    }
}

/// Where a page ended (API-USAGE-3): the next page holds records strictly
/// older in `(time_ms, seq)` order. Its text form is 32 hex digits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UsageCursor {
    pub time_ms: u64,
    pub seq: u64,
}

impl std::fmt::Display for UsageCursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}{:016x}", self.time_ms, self.seq)
    }
}

impl std::str::FromStr for UsageCursor {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        let bad = || Error::BadRequest(format!("cursor {s:?} is not 32 hex digits"));
        if s.len() != 32 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad());
        }
        let time_ms = u64::from_str_radix(&s[..16], 16).map_err(|_| bad())?;
        let seq = u64::from_str_radix(&s[16..], 16).map_err(|_| bad())?;
        Ok(UsageCursor { time_ms, seq })
    }
}

/// A page of one key's records, newest first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UsagePage {
    /// `(seq, record)`.
    pub records: Vec<(u64, UsageRecord)>,
    /// Set when more records may follow.
    pub next_cursor: Option<UsageCursor>,
}

/// Counters for `/metrics` and for tests that wait on the mirror.
#[derive(Default)]
struct Stats {
    appended: AtomicU64,
    pruned: AtomicU64,
    pruned_unmirrored: AtomicU64,
    mirror_enabled: AtomicBool,
    mirror_up: AtomicBool,
    mirrored: AtomicU64,
    mirror_failures: AtomicU64,
    mirror_skipped_corrupt: AtomicU64,
}

struct Inner {
    db: Database,
    meta: Keyspace,
    records: Keyspace,
    by_key: Keyspace,
    by_time: Keyspace,
    config: UsageConfig,
    /// The next sequence number; held while a record is committed so that
    /// commits happen in sequence order (API-USAGE-2, which the mirror's
    /// cursor relies on).
    next_seq: Mutex<u64>,
    /// Mirror of `next_seq` for lock-free reads.
    appended_seq: AtomicU64,
    mirror_cursor: AtomicU64,
    /// Serialises pruning and cursor moves.
    prune_lock: Mutex<()>,
    appended: Notify,
    stats: Stats,
    dir: PathBuf,
}

/// A stored record by sequence number, or why it does not decode.
type Stored = (u64, Result<UsageRecord, String>);

/// The usage log. Cheap to clone (one `Arc`).
#[derive(Clone)]
pub struct UsageLog {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for UsageLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UsageLog")
            .field("dir", &self.inner.dir)
            .finish_non_exhaustive()
    }
}

/// The same log (one database), as `ApiConfig`'s equality needs.
impl PartialEq for UsageLog {
    fn eq(&self, other: &UsageLog) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }
}

fn storage(e: fjall::Error) -> Error {
    Error::Storage(format!("usage log: {e}"))
}

fn index_key(key_id: &[u8; 32], time_ms: u64, seq: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(48);
    k.extend_from_slice(key_id);
    k.extend_from_slice(&time_ms.to_be_bytes());
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

fn time_key(time_ms: u64, seq: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(16);
    k.extend_from_slice(&time_ms.to_be_bytes());
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

fn be_u64(bytes: &[u8], what: &str) -> Result<u64, Error> {
    Ok(u64::from_be_bytes(bytes.try_into().map_err(|_| {
        Error::Corrupt(format!("usage log: {what} is {} bytes, not 8", bytes.len()))
    })?))
}

/// The usage database's folder under a node's data directory.
pub fn usage_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("usage")
}

/// Unix time in ms (the wall clock; records are stamped by the runtime).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl UsageLog {
    /// Opens (or creates) the log in `dir` (a node uses [`usage_dir`]).
    pub fn open(dir: &Path, config: UsageConfig) -> Result<UsageLog, Error> {
        if config.retention_ms == 0 {
            return Err(Error::Config("usage retention_ms must be positive".into()));
        }
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir.display(), e))?;
        // A small database beside the chain store's: fjall's smallest
        // journal bound, an 8 MiB block cache (default 32 MiB) and one
        // flush/compaction worker (default up to 4) for ~one append per
        // served request.
        let db = Database::builder(dir)
            .max_journaling_size(64 * 1024 * 1024)
            .cache_size(8 * 1024 * 1024)
            .worker_threads(1)
            .open()
            .map_err(storage)?;
        let ks = |name: &str| {
            db.keyspace(name, KeyspaceCreateOptions::default)
                .map_err(storage)
        };
        let (meta, records, by_key, by_time) =
            (ks("meta")?, ks("records")?, ks("by_key")?, ks("by_time")?);
        match meta.get(META_SCHEMA).map_err(storage)? {
            None => {
                let mut b = db.batch().durability(Some(PersistMode::SyncAll));
                b.insert(&meta, META_SCHEMA, SCHEMA_VERSION.to_be_bytes().to_vec());
                b.insert(&meta, META_NEXT_SEQ, 0u64.to_be_bytes().to_vec());
                b.insert(&meta, META_MIRROR_CURSOR, 0u64.to_be_bytes().to_vec());
                b.commit().map_err(storage)?;
            }
            Some(v) => {
                let found = u32::from_be_bytes(v.as_ref().try_into().map_err(|_| {
                    Error::Corrupt("usage log: schema version is not 4 bytes".into())
                })?);
                if found != SCHEMA_VERSION {
                    return Err(Error::UnsupportedSchema {
                        found,
                        supported: SCHEMA_VERSION,
                    });
                }
            }
        }
        let read = |k: &[u8]| -> Result<u64, Error> {
            let v = meta.get(k).map_err(storage)?.ok_or_else(|| {
                Error::Corrupt(format!(
                    "usage log: meta {} missing",
                    String::from_utf8_lossy(k)
                ))
            })?;
            be_u64(&v, &String::from_utf8_lossy(k))
        };
        let next_seq = read(META_NEXT_SEQ)?;
        let cursor = read(META_MIRROR_CURSOR)?;
        if let Some(kv) = records.last_key_value() {
            let last = be_u64(&kv.key().map_err(storage)?, "record key")?;
            if last >= next_seq {
                return Err(Error::Corrupt(format!(
                    "usage log: record {last} at or past next_seq {next_seq}"
                )));
            }
        }
        if cursor > next_seq {
            return Err(Error::Corrupt(format!(
                "usage log: mirror cursor {cursor} past next_seq {next_seq}"
            )));
        }
        Ok(UsageLog {
            inner: Arc::new(Inner {
                db,
                meta,
                records,
                by_key,
                by_time,
                config,
                next_seq: Mutex::new(next_seq),
                appended_seq: AtomicU64::new(next_seq),
                mirror_cursor: AtomicU64::new(cursor),
                prune_lock: Mutex::new(()),
                appended: Notify::new(),
                stats: Stats::default(),
                dir: dir.to_path_buf(),
            }),
        })
    }

    pub fn config(&self) -> &UsageConfig {
        &self.inner.config
    }

    /// API-USAGE-1/2: checks the record and stores it with its index entries,
    /// synced to disk before it returns; the record's sequence number.
    /// Blocking (an fsync): from async code use [`UsageLog::append_async`].
    pub fn append(&self, rec: &UsageRecord) -> Result<u64, Error> {
        check_record(rec)?;
        let value = encode_record(rec);
        let i = &*self.inner;
        let mut next = i.next_seq.lock().unwrap_or_else(|p| p.into_inner());
        let seq = *next;
        let mut b = i.db.batch().durability(Some(PersistMode::SyncAll));
        b.insert(&i.records, seq.to_be_bytes().to_vec(), value);
        b.insert(
            &i.by_key,
            index_key(&rec.key_id, rec.time_ms, seq),
            Vec::new(),
        );
        b.insert(&i.by_time, time_key(rec.time_ms, seq), rec.key_id.to_vec());
        b.insert(&i.meta, META_NEXT_SEQ, (seq + 1).to_be_bytes().to_vec());
        b.commit().map_err(storage)?;
        *next = seq + 1;
        i.appended_seq.store(seq + 1, Ordering::Release);
        drop(next);
        i.stats.appended.fetch_add(1, Ordering::Relaxed);
        i.appended.notify_one();
        Ok(seq)
    }

    /// [`UsageLog::append`] on the blocking pool.
    pub async fn append_async(&self, rec: UsageRecord) -> Result<u64, Error> {
        let log = self.clone();
        tokio::task::spawn_blocking(move || log.append(&rec))
            .await
            .map_err(|e| Error::Storage(format!("usage append task failed: {e}")))?
    }

    /// API-USAGE-3: `key_id`'s records with `time_ms ≥ since_ms`, newest
    /// first, strictly before `cursor`, at most `limit` (1..=[`MAX_PAGE_LIMIT`]).
    pub fn query(
        &self,
        key_id: &[u8; 32],
        since_ms: Option<u64>,
        cursor: Option<UsageCursor>,
        limit: usize,
    ) -> Result<UsagePage, Error> {
        if limit == 0 || limit > MAX_PAGE_LIMIT {
            return Err(Error::BadRequest(format!(
                "limit {limit}: must be between 1 and {MAX_PAGE_LIMIT}"
            )));
        }
        let i = &*self.inner;
        let snap = i.db.snapshot();
        let lo = index_key(key_id, since_ms.unwrap_or(0), 0);
        if let Some(c) = cursor
            && (c.time_ms, c.seq) <= (since_ms.unwrap_or(0), 0)
        {
            // The cursor is at or before the first record `since_ms` admits.
            return Ok(UsagePage {
                records: Vec::new(),
                next_cursor: None,
            });
        }
        let iter = match cursor {
            Some(c) => snap.range(&i.by_key, lo..index_key(key_id, c.time_ms, c.seq)),
            None => snap.range(&i.by_key, lo..=index_key(key_id, u64::MAX, u64::MAX)),
        };
        let mut records = Vec::new();
        let mut next_cursor = None;
        for kv in iter.rev() {
            let k = kv.key().map_err(storage)?;
            if k.len() != 48 || k[..32] != key_id[..] {
                return Err(Error::Corrupt(format!(
                    "usage log: index key {} out of place",
                    hex::encode(&k)
                )));
            }
            let time_ms = be_u64(&k[32..40], "index time")?;
            let seq = be_u64(&k[40..48], "index seq")?;
            if records.len() == limit {
                // One more exists: the page ends at its last record.
                let (seq, last): &(u64, UsageRecord) = records.last().expect("limit ≥ 1");
                next_cursor = Some(UsageCursor {
                    time_ms: last.time_ms,
                    seq: *seq,
                });
                break;
            }
            let v = snap
                .get(&i.records, seq.to_be_bytes())
                .map_err(storage)?
                .ok_or_else(|| {
                    Error::Corrupt(format!("usage log: index names missing record {seq}"))
                })?;
            let rec = decode_record(&v)
                .map_err(|e| Error::Corrupt(format!("usage log: record {seq}: {e}")))?;
            if rec.key_id != *key_id || rec.time_ms != time_ms {
                return Err(Error::Corrupt(format!(
                    "usage log: record {seq} disagrees with its index entry"
                )));
            }
            records.push((seq, rec));
        }
        Ok(UsagePage {
            records,
            next_cursor,
        })
    }

    /// API-USAGE-4: removes the records with `time_ms < now_ms −
    /// retention_ms`; how many.
    pub fn prune(&self, now_ms: u64) -> Result<u64, Error> {
        let i = &*self.inner;
        let _guard = i.prune_lock.lock().unwrap_or_else(|p| p.into_inner());
        let cutoff = now_ms.saturating_sub(i.config.retention_ms);
        let mut removed = 0u64;
        loop {
            let mut victims = Vec::new();
            for kv in i.by_time.range(..time_key(cutoff, 0)).take(PRUNE_BATCH) {
                let (k, v) = kv.into_inner().map_err(storage)?;
                if k.len() != 16 || v.len() != 32 {
                    return Err(Error::Corrupt(format!(
                        "usage log: time index entry {} malformed",
                        hex::encode(&k)
                    )));
                }
                let time_ms = be_u64(&k[..8], "time index time")?;
                let seq = be_u64(&k[8..], "time index seq")?;
                let key_id: [u8; 32] = v.as_ref().try_into().expect("length checked");
                victims.push((time_ms, seq, key_id));
            }
            if victims.is_empty() {
                break;
            }
            let cursor = i.mirror_cursor.load(Ordering::Acquire);
            let mut b = i.db.batch().durability(Some(PersistMode::SyncAll));
            let mut unmirrored = 0u64;
            for (time_ms, seq, key_id) in &victims {
                b.remove(&i.records, seq.to_be_bytes().to_vec());
                b.remove(&i.by_key, index_key(key_id, *time_ms, *seq));
                b.remove(&i.by_time, time_key(*time_ms, *seq));
                if i.stats.mirror_enabled.load(Ordering::Relaxed) && *seq >= cursor {
                    unmirrored += 1;
                }
            }
            b.commit().map_err(storage)?;
            removed += victims.len() as u64;
            if unmirrored > 0 {
                i.stats
                    .pruned_unmirrored
                    .fetch_add(unmirrored, Ordering::Relaxed);
                warn!(
                    unmirrored,
                    "usage records pruned before the PostgreSQL mirror sent them"
                );
            }
        }
        i.stats.pruned.fetch_add(removed, Ordering::Relaxed);
        Ok(removed)
    }

    /// Records with `seq ≥ from`, in sequence order, at most `max`; each
    /// decoded or the reason it does not decode.
    fn read_from(&self, from: u64, max: usize) -> Result<Vec<Stored>, Error> {
        let mut out = Vec::new();
        for kv in self
            .inner
            .records
            .range(from.to_be_bytes().to_vec()..)
            .take(max)
        {
            let (k, v) = kv.into_inner().map_err(storage)?;
            out.push((be_u64(&k, "record key")?, decode_record(&v)));
        }
        Ok(out)
    }

    /// The next sequence number (records appended so far, pruned or not).
    pub fn next_seq(&self) -> u64 {
        self.inner.appended_seq.load(Ordering::Acquire)
    }

    /// Every record with a smaller sequence number is in PostgreSQL (or was
    /// pruned).
    pub fn mirror_cursor(&self) -> u64 {
        self.inner.mirror_cursor.load(Ordering::Acquire)
    }

    /// Records appended but not yet mirrored (API-USAGE-5).
    pub fn mirror_lag(&self) -> u64 {
        self.next_seq().saturating_sub(self.mirror_cursor())
    }

    /// Records the mirror has written (this process).
    pub fn mirrored_total(&self) -> u64 {
        self.inner.stats.mirrored.load(Ordering::Relaxed)
    }

    /// Failed connections or batches (this process).
    pub fn mirror_failures_total(&self) -> u64 {
        self.inner.stats.mirror_failures.load(Ordering::Relaxed)
    }

    /// Whether the mirror is connected.
    pub fn mirror_up(&self) -> bool {
        self.inner.stats.mirror_up.load(Ordering::Relaxed)
    }

    fn set_mirror_cursor(&self, to: u64) -> Result<(), Error> {
        let i = &*self.inner;
        // A lost cursor write only re-sends records, which the conflict
        // clause absorbs (API-USAGE-5): no sync needed.
        let mut b = i.db.batch().durability(Some(PersistMode::Buffer));
        b.insert(&i.meta, META_MIRROR_CURSOR, to.to_be_bytes().to_vec());
        b.commit().map_err(storage)?;
        i.mirror_cursor.store(to, Ordering::Release);
        Ok(())
    }

    /// Moves the mirror's cursor back to `to_seq` so the records from there
    /// are sent again (to a new database, say); re-sent rows already present
    /// are skipped by the conflict clause. Refuses a cursor past the log.
    pub fn rewind_mirror(&self, to_seq: u64) -> Result<(), Error> {
        let _guard = self
            .inner
            .prune_lock
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if to_seq > self.next_seq() {
            return Err(Error::BadRequest(format!(
                "mirror cursor {to_seq} is past the log's next sequence number {}",
                self.next_seq()
            )));
        }
        let mut b = self.inner.db.batch().durability(Some(PersistMode::SyncAll));
        b.insert(
            &self.inner.meta,
            META_MIRROR_CURSOR,
            to_seq.to_be_bytes().to_vec(),
        );
        b.commit().map_err(storage)?;
        self.inner.mirror_cursor.store(to_seq, Ordering::Release);
        self.inner.appended.notify_one();
        Ok(())
    }

    /// Prometheus text for `/metrics`.
    pub fn metrics_text(&self) -> String {
        let s = &self.inner.stats;
        let mut t = String::new();
        let mut line = |name: &str, kind: &str, help: &str, v: u64| {
            t.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}\n"
            ));
        };
        line(
            "blyan_usage_records_appended_total",
            "counter",
            "Usage records appended (API-USAGE-2).",
            s.appended.load(Ordering::Relaxed),
        );
        line(
            "blyan_usage_records_pruned_total",
            "counter",
            "Usage records removed after the retention (API-USAGE-4).",
            s.pruned.load(Ordering::Relaxed),
        );
        if s.mirror_enabled.load(Ordering::Relaxed) {
            line(
                "blyan_usage_mirror_lag_records",
                "gauge",
                "Usage records not yet in PostgreSQL (API-USAGE-5).",
                self.mirror_lag(),
            );
            line(
                "blyan_usage_mirror_up",
                "gauge",
                "1 while the PostgreSQL mirror is connected.",
                s.mirror_up.load(Ordering::Relaxed) as u64,
            );
            line(
                "blyan_usage_mirror_records_total",
                "counter",
                "Usage records written to PostgreSQL.",
                s.mirrored.load(Ordering::Relaxed),
            );
            line(
                "blyan_usage_mirror_failures_total",
                "counter",
                "Failed PostgreSQL connections or batches.",
                s.mirror_failures.load(Ordering::Relaxed),
            );
            line(
                "blyan_usage_mirror_skipped_corrupt_total",
                "counter",
                "Stored usage records the mirror skipped because they do not decode.",
                s.mirror_skipped_corrupt.load(Ordering::Relaxed),
            );
            line(
                "blyan_usage_pruned_unmirrored_total",
                "counter",
                "Usage records pruned before the mirror sent them.",
                s.pruned_unmirrored.load(Ordering::Relaxed),
            );
        }
        t
    }
}

/// API-USAGE-4: prunes at once and then every `interval_ms` until
/// `shutdown` turns true. Errors are logged; the next round retries.
pub async fn run_pruning(log: UsageLog, interval_ms: u64, mut shutdown: watch::Receiver<bool>) {
    loop {
        let l = log.clone();
        match tokio::task::spawn_blocking(move || l.prune(now_ms())).await {
            Ok(Ok(n)) if n > 0 => info!(removed = n, "usage records pruned"),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => warn!(error = %e, "usage pruning failed"),
            Err(e) => warn!(error = %e, "usage pruning task failed"),
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(interval_ms)) => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
    }
}

/// The PostgreSQL mirror's settings.
#[derive(Clone, Debug)]
pub struct MirrorOptions {
    /// A libpq connection string or `postgresql://` URL.
    pub url: String,
    /// The `node` column: this node's address.
    pub node: Address,
    /// API-USAGE-5: first retry delay, doubled per failure up to
    /// `retry_max_ms`.
    pub retry_min_ms: u64,
    pub retry_max_ms: u64,
    /// Bound on one connection attempt or one batch.
    pub op_timeout_ms: u64,
}

impl MirrorOptions {
    pub fn new(url: String, node: Address) -> MirrorOptions {
        MirrorOptions {
            url,
            node,
            retry_min_ms: 100,
            retry_max_ms: 5_000,
            op_timeout_ms: 10_000,
        }
    }
}

/// Aborts the connection task when the session ends.
struct AbortOnDrop(tokio::task::JoinHandle<()>);
impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn within<T, E: std::fmt::Display>(
    ms: u64,
    what: &str,
    f: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, Error> {
    match tokio::time::timeout(Duration::from_millis(ms), f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(Error::Postgres(format!("{what}: {e}"))),
        Err(_) => Err(Error::Postgres(format!("{what}: no answer within {ms} ms"))),
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Error> + Send + 'static,
) -> Result<T, Error> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Storage(format!("usage log task failed: {e}")))?
}

/// One connection's life: connect, create the table, send batches until an
/// error (returned) or `shutdown` (`Ok`). Once the table exists the
/// backoff is reset to `opts.retry_min_ms`.
async fn mirror_session(
    log: &UsageLog,
    config: &tokio_postgres::Config,
    opts: &MirrorOptions,
    shutdown: &mut watch::Receiver<bool>,
    backoff_ms: &mut u64,
) -> Result<(), Error> {
    let t = opts.op_timeout_ms;
    let (mut client, connection) =
        within(t, "connect", config.connect(tokio_postgres::NoTls)).await?;
    let _conn = AbortOnDrop(tokio::spawn(
        async move {
            if let Err(e) = connection.await {
                warn!(error = %e, "PostgreSQL connection closed");
            }
        }
        .in_current_span(),
    ));
    within(t, "create table", client.batch_execute(PG_CREATE_TABLE)).await?;
    let insert = within(t, "prepare insert", client.prepare(PG_INSERT)).await?;
    log.inner.stats.mirror_up.store(true, Ordering::Relaxed);
    *backoff_ms = opts.retry_min_ms.max(1);
    info!(
        lag = log.mirror_lag(),
        "usage mirror connected to PostgreSQL"
    );
    loop {
        if *shutdown.borrow() {
            return Ok(());
        }
        let from = log.mirror_cursor();
        let l = log.clone();
        let batch = blocking(move || l.read_from(from, MIRROR_BATCH)).await?;
        let Some(last) = batch.last().map(|(s, _)| *s) else {
            // Wait for an append (or check again in a second: a wake-up
            // lost to a race costs at most that).
            tokio::select! {
                _ = log.inner.appended.notified() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = shutdown.wait_for(|s| *s) => return Ok(()),
            }
            continue;
        };
        let node = opts.node.0;
        let rows: Vec<(u64, UsageRecord)> = batch
            .into_iter()
            .filter_map(|(seq, r)| match r {
                Ok(r) => Some((seq, r)),
                Err(e) => {
                    log.inner
                        .stats
                        .mirror_skipped_corrupt
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::error!(seq, error = %e, "stored usage record does not decode; not mirrored");
                    None
                }
            })
            .collect();
        within(t, "insert batch", async {
            let tx = client.transaction().await?;
            let costs: Vec<String> = rows
                .iter()
                .map(|(_, r)| r.cost_base_units.to_string())
                .collect();
            let routes: Vec<Vec<&[u8]>> = rows
                .iter()
                .map(|(_, r)| r.route.iter().map(|a| &a.0[..]).collect())
                .collect();
            let mut pending = Vec::with_capacity(rows.len());
            let (tx_ref, insert) = (&tx, &insert);
            for (((seq, r), cost), route) in rows.iter().zip(&costs).zip(&routes) {
                let (seq, prompt, completion, latency, time) = (
                    *seq as i64,
                    r.prompt_tokens as i64,
                    r.completion_tokens as i64,
                    r.latency_ms as i64,
                    r.time_ms as i64,
                );
                let allowance = r.allowance.as_ref().map(|a| &a[..]);
                pending.push(async move {
                    tx_ref
                        .execute(
                            insert,
                            &[
                                &&node[..],
                                &&r.request_id[..],
                                &seq,
                                &&r.key_id[..],
                                &allowance,
                                &r.model,
                                &prompt,
                                &completion,
                                route,
                                cost,
                                &latency,
                                &r.outcome,
                                &time,
                            ],
                        )
                        .await
                });
            }
            futures_util::future::try_join_all(pending).await?;
            tx.commit().await
        })
        .await?;
        let l = log.clone();
        blocking(move || {
            let _guard = l.inner.prune_lock.lock().unwrap_or_else(|p| p.into_inner());
            // A rewind while the batch was in flight wins.
            if l.mirror_cursor() == from {
                l.set_mirror_cursor(last + 1)?;
            }
            Ok(())
        })
        .await?;
        log.inner
            .stats
            .mirrored
            .fetch_add(rows.len() as u64, Ordering::Relaxed);
    }
}

/// API-USAGE-5: mirrors the log to PostgreSQL until `shutdown` turns true,
/// reconnecting with a doubling backoff; never blocks [`UsageLog::append`].
/// Refuses a connection string that does not parse.
pub fn mirror_to_postgres(
    log: UsageLog,
    opts: MirrorOptions,
    mut shutdown: watch::Receiver<bool>,
) -> Result<impl std::future::Future<Output = ()> + Send + 'static, Error> {
    let config: tokio_postgres::Config = opts
        .url
        .parse()
        .map_err(|e| Error::Config(format!("logs.postgres_url does not parse: {e}")))?;
    log.inner
        .stats
        .mirror_enabled
        .store(true, Ordering::Relaxed);
    Ok(async move {
        let mut backoff_ms = opts.retry_min_ms.max(1);
        loop {
            if *shutdown.borrow() {
                return;
            }
            let result = mirror_session(&log, &config, &opts, &mut shutdown, &mut backoff_ms).await;
            log.inner.stats.mirror_up.store(false, Ordering::Relaxed);
            match result {
                Ok(()) => return,
                Err(e) => {
                    log.inner
                        .stats
                        .mirror_failures
                        .fetch_add(1, Ordering::Relaxed);
                    warn!(error = %e, lag = log.mirror_lag(), retry_in_ms = backoff_ms,
                        "usage mirror to PostgreSQL failed; appends continue locally");
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(backoff_ms)) => {}
                _ = shutdown.wait_for(|s| *s) => return,
            }
            backoff_ms = (backoff_ms * 2).min(opts.retry_max_ms.max(1));
        }
    })
}

/// [`mirror_to_postgres`] spawned on the current runtime.
pub fn spawn_postgres_mirror(
    log: UsageLog,
    opts: MirrorOptions,
    shutdown: watch::Receiver<bool>,
) -> Result<tokio::task::JoinHandle<()>, Error> {
    Ok(tokio::spawn(mirror_to_postgres(log, opts, shutdown)?))
}

/// `GET /v1/usage` query parameters (API-USAGE-3).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsageQuery {
    /// Only records with `time_ms ≥ since_ms`.
    pub since_ms: Option<u64>,
    /// A previous page's `next_cursor`.
    pub cursor: Option<String>,
    /// 1..=1000, default 100.
    pub limit: Option<usize>,
}

fn hex0x(b: &[u8]) -> String {
    format!("0x{}", hex::encode(b))
}

/// A record as the API shows it (amounts as decimal strings of base units).
pub fn record_json(seq: u64, r: &UsageRecord) -> Value {
    json!({
        "seq": seq,
        "request_id": hex0x(&r.request_id),
        "key_id": hex0x(&r.key_id),
        "allowance": r.allowance.as_ref().map(|a| hex0x(a)),
        "model": r.model,
        "prompt_tokens": r.prompt_tokens,
        "completion_tokens": r.completion_tokens,
        "total_tokens": r.prompt_tokens.saturating_add(r.completion_tokens),
        "route": r.route.iter().map(|a| hex0x(&a.0)).collect::<Vec<_>>(),
        "cost": r.cost_base_units.to_string(),
        "latency_ms": r.latency_ms,
        "outcome": r.outcome,
        "time_ms": r.time_ms,
    })
}

/// The usage page of an authenticated key id: `{"object": "list", "data":
/// [records newest first], "has_more", "next_cursor"}`. Bad parameters are
/// `400 bad_query`. Blocking (reads the store): from a handler use
/// [`list_usage`].
pub fn usage_page_json(
    log: &UsageLog,
    key_id: &[u8; 32],
    query: UsageQuery,
) -> Result<Value, crate::api::ApiError> {
    use crate::api::{ApiError, code};
    use axum::http::StatusCode;
    let bad = |m: String| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            code::VALIDATION_FAILED,
            "bad_query",
            m,
        )
    };
    let cursor = match &query.cursor {
        Some(c) => Some(c.parse::<UsageCursor>().map_err(|e| bad(e.to_string()))?),
        None => None,
    };
    let limit = query.limit.unwrap_or(DEFAULT_PAGE_LIMIT);
    let page = log
        .query(key_id, query.since_ms, cursor, limit)
        .map_err(|e| match e {
            Error::BadRequest(m) => bad(m),
            e => ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                code::NODE_OFFLINE,
                "usage_log_failed",
                e.to_string(),
            ),
        })?;
    Ok(json!({
        "object": "list",
        "data": page.records.iter().map(|(s, r)| record_json(*s, r)).collect::<Vec<_>>(),
        "has_more": page.next_cursor.is_some(),
        "next_cursor": page.next_cursor.map(|c| c.to_string()),
    }))
}

/// [`usage_page_json`] on the blocking pool, as a response.
pub async fn list_usage(
    log: UsageLog,
    key_id: [u8; 32],
    query: UsageQuery,
) -> Result<axum::response::Response, crate::api::ApiError> {
    use axum::response::IntoResponse;
    let v = tokio::task::spawn_blocking(move || usage_page_json(&log, &key_id, query))
        .await
        .map_err(|e| crate::api::ApiError::offline(format!("usage query task failed: {e}")))??;
    Ok(axum::Json(v).into_response())
}
