//! The submitter's durable state: jobs, per-unit results, peer reputations and content-addressed
//! blobs in one embedded, crash-safe database (redb: copy-on-write B-trees, a commit is durable
//! once it returns). A submitter killed at any moment reopens the file with every committed
//! record intact and none half-written.

use std::path::{Path, PathBuf};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::host::Host;
use crate::peer_id::PeerId;
use crate::validate::trust::{MAX_TRUSTED, Standing, Trust, TrustChanges, TrustConfig};

/// Job id → [`JobRecord`] (postcard).
const JOBS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("jobs");
/// Job id ++ unit index (big-endian) → the caller's unit record.
const UNITS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("units");
/// Peer id → [`Reputation`] (postcard).
const REPUTATION: TableDefinition<&[u8], &[u8]> = TableDefinition::new("reputation");
/// Digest → bytes.
const BLOBS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("blobs");
/// Peer id → its trust [`Standing`] with this submitter (postcard).
const TRUST_PEERS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("trust-peers");
/// Host (postcard) → its trust [`Standing`] with this submitter (postcard).
const TRUST_HOSTS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("trust-hosts");
/// `alert` → the alone results still to spot-check at the raised rate after a catch (u32,
/// postcard).
const TRUST_META: TableDefinition<&[u8], &[u8]> = TableDefinition::new("trust-meta");
const ALERT_KEY: &[u8] = b"alert";
/// What determines a unit's result — its content context (engine profile, module, limits, where
/// it ran) ++ its input digest, 64 bytes (see `job::driver::ContentKey`) → job id ++ unit index of
/// a journaled unit that holds it: how a later job finds results it can reuse.
const RESULTS_BY_CONTENT: TableDefinition<&[u8], &[u8]> =
    TableDefinition::new("results-by-content-2");
/// Job id → its [`JobTimes`] (postcard).
const JOB_TIMES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("job-times");
/// Job id → the [`JobSource`] it was submitted from (postcard).
const SOURCES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("job-sources");

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database file could not be opened or is damaged.
    #[error("cannot open the job store {path}: {detail}")]
    Open {
        /// The file.
        path: PathBuf,
        /// What the database reported.
        detail: String,
    },
    /// A read or write failed.
    #[error("job store: {0}")]
    Database(String),
    /// A stored record does not decode (a damaged file or another version's format).
    #[error("job store: a stored {what} does not decode: {detail}")]
    Corrupt {
        /// Which kind of record.
        what: &'static str,
        /// The decoder's message.
        detail: String,
    },
}

/// Journal records read per transaction by [`JobStore::each_unit`].
pub const UNIT_BATCH: usize = 4096;

impl From<StoreError> for std::io::Error {
    fn from(e: StoreError) -> Self {
        std::io::Error::other(e)
    }
}

fn db_error(e: impl std::fmt::Display) -> StoreError {
    StoreError::Database(e.to_string())
}

/// What the store keeps about a job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobRecord {
    /// The manifest's name.
    pub name: String,
    /// The module's digest.
    pub module: Digest,
    /// How many units the job has.
    pub units: u64,
    /// Copies started per unit.
    pub replicas: u32,
    /// Identical results needed.
    pub quorum: u32,
    /// Most executions per unit.
    pub max_attempts: u32,
    /// The engine profile the job's results are produced under.
    pub profile: String,
}

/// Where a job was submitted from: its manifest and results directory, as absolute paths.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobSource {
    pub manifest: PathBuf,
    pub out: PathBuf,
}

/// When a job was run, and whether its user cancelled it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobTimes {
    /// When it was first submitted (milliseconds since the Unix epoch).
    pub started_ms: u64,
    /// When its latest run ended with every unit decided, if it did.
    pub finished_ms: Option<u64>,
    /// Cancelled by its user (`worker cancel`); submitting it again resumes it.
    pub cancelled: bool,
}

/// A peer's record with this submitter: consecutive agreeing results, and totals.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reputation {
    /// Results in a row that agreed with the accepted quorum; a disagreement resets it.
    pub consecutive_agreements: u64,
    /// All results that agreed.
    pub agreements: u64,
    /// All results that disagreed with an accepted quorum.
    pub disagreements: u64,
    /// When a result of the peer was last counted (seconds since the Unix epoch): the table
    /// keeps the peers seen most recently.
    pub last_seen: u64,
    /// The host its last counted result came from.
    pub host: Option<crate::host::Host>,
}

/// The record as stores made before `last_seen` hold it.
#[derive(Deserialize)]
struct ReputationV1 {
    consecutive_agreements: u64,
    agreements: u64,
    disagreements: u64,
}

fn decode_reputation(bytes: &[u8]) -> Result<Reputation, StoreError> {
    decode("reputation", bytes).or_else(|e| {
        let old: ReputationV1 = postcard::from_bytes(bytes).map_err(|_| e)?;
        Ok(Reputation {
            consecutive_agreements: old.consecutive_agreements,
            agreements: old.agreements,
            disagreements: old.disagreements,
            last_seen: 0,
            host: None,
        })
    })
}

/// Most peers whose reputation a store keeps; past it, the least recently seen go.
pub const MAX_REPUTATIONS: u64 = 65_536;

/// The durable store of one peer.
#[derive(Debug)]
pub struct JobStore {
    db: Database,
}

fn unit_key(job: &Digest, index: u64) -> [u8; 40] {
    let mut key = [0u8; 40];
    key[..32].copy_from_slice(&job.0);
    key[32..].copy_from_slice(&index.to_be_bytes());
    key
}

fn decode<T: for<'de> Deserialize<'de>>(what: &'static str, bytes: &[u8]) -> Result<T, StoreError> {
    postcard::from_bytes(bytes).map_err(|e| StoreError::Corrupt {
        what,
        detail: e.to_string(),
    })
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, StoreError> {
    postcard::to_stdvec(value).map_err(db_error)
}

/// Memory the journal keeps of its pages.
const CACHE_BYTES: usize = 32 << 20;

impl JobStore {
    /// Opens the store at `path`, creating it (and its directory) if needed.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let open_error = |detail: String| StoreError::Open {
            path: path.to_owned(),
            detail,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| open_error(e.to_string()))?;
        }
        // redb caches up to 1 GiB of pages by default, which a long job's journal fills: the
        // submitter's memory would grow with the journal.
        let db = Database::builder()
            .set_cache_size(CACHE_BYTES)
            .create(path)
            .map_err(|e| open_error(e.to_string()))?;
        // Create every table once, so readers never meet a missing one.
        let txn = db.begin_write().map_err(db_error)?;
        for table in [
            JOBS,
            UNITS,
            REPUTATION,
            BLOBS,
            TRUST_PEERS,
            TRUST_HOSTS,
            TRUST_META,
            SOURCES,
            JOB_TIMES,
            RESULTS_BY_CONTENT,
        ] {
            txn.open_table(table).map_err(db_error)?;
        }
        txn.commit().map_err(db_error)?;
        Ok(Self { db })
    }

    fn put(
        &self,
        table: TableDefinition<&[u8], &[u8]>,
        entries: &[(&[u8], &[u8])],
    ) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(db_error)?;
        {
            let mut t = txn.open_table(table).map_err(db_error)?;
            for (key, value) in entries {
                t.insert(*key, *value).map_err(db_error)?;
            }
        }
        txn.commit().map_err(db_error)
    }

    fn get(
        &self,
        table: TableDefinition<&[u8], &[u8]>,
        key: &[u8],
    ) -> Result<Option<Vec<u8>>, StoreError> {
        let txn = self.db.begin_read().map_err(db_error)?;
        let t = txn.open_table(table).map_err(db_error)?;
        Ok(t.get(key).map_err(db_error)?.map(|v| v.value().to_vec()))
    }

    /// Whether any result was journaled under this content context (its first 32 bytes of
    /// key): when none was, no unit of a job with that context can be reused, and the job
    /// need not look.
    pub fn has_content(&self, context: &Digest) -> Result<bool, StoreError> {
        let txn = self.db.begin_read().map_err(db_error)?;
        let content = txn.open_table(RESULTS_BY_CONTENT).map_err(db_error)?;
        let mut end = [0xffu8; 64];
        end[..32].copy_from_slice(&context.0);
        let mut start = [0u8; 64];
        start[..32].copy_from_slice(&context.0);
        let found = content
            .range(start.as_slice()..=end.as_slice())
            .map_err(db_error)?
            .next()
            .is_some();
        Ok(found)
    }

    /// The journaled records holding the results of `wanted` (unit index, content key) that
    /// `suitable` accepts, read in one transaction; a key whose record is gone is skipped.
    pub fn reusable(
        &self,
        wanted: &[(u64, [u8; 64])],
        mut suitable: impl FnMut(&[u8]) -> bool,
    ) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let txn = self.db.begin_read().map_err(db_error)?;
        let content = txn.open_table(RESULTS_BY_CONTENT).map_err(db_error)?;
        let units = txn.open_table(UNITS).map_err(db_error)?;
        let mut out = Vec::new();
        for (index, key) in wanted {
            let Some(at) = content.get(key.as_slice()).map_err(db_error)? else {
                continue;
            };
            if let Some(record) = units.get(at.value()).map_err(db_error)?
                && suitable(record.value())
            {
                out.push((*index, record.value().to_vec()));
            }
        }
        Ok(out)
    }

    /// Records a job (replacing an earlier record of the same id).
    pub fn put_job(&self, id: &Digest, job: &JobRecord) -> Result<(), StoreError> {
        self.put(JOBS, &[(&id.0, &encode(job)?)])
    }

    /// Records where a job was submitted from, so that it can be run again without its user.
    pub fn put_source(&self, id: &Digest, source: &JobSource) -> Result<(), StoreError> {
        self.put(SOURCES, &[(&id.0, &encode(source)?)])
    }

    /// Records when a job ran.
    pub fn put_times(&self, id: &Digest, times: &JobTimes) -> Result<(), StoreError> {
        self.put(JOB_TIMES, &[(&id.0, &encode(times)?)])
    }

    /// When the job with this id ran, if recorded (jobs of older journals have no record).
    pub fn times(&self, id: &Digest) -> Result<Option<JobTimes>, StoreError> {
        self.get(JOB_TIMES, &id.0)?
            .map(|bytes| decode("job times", &bytes))
            .transpose()
    }

    /// Removes everything kept about a job: its record, units, times and source. Returns the
    /// number of unit records removed.
    pub fn forget(&self, id: &Digest) -> Result<u64, StoreError> {
        let txn = self.db.begin_write().map_err(db_error)?;
        let removed;
        {
            let mut t = txn.open_table(UNITS).map_err(db_error)?;
            let start = unit_key(id, 0);
            let end = unit_key(id, u64::MAX);
            let before = redb::ReadableTableMetadata::len(&t).map_err(db_error)?;
            t.retain_in(start.as_slice()..=end.as_slice(), |_, _| false)
                .map_err(db_error)?;
            removed = before - redb::ReadableTableMetadata::len(&t).map_err(db_error)?;
            for table in [JOBS, JOB_TIMES, SOURCES] {
                let mut t = txn.open_table(table).map_err(db_error)?;
                t.remove(id.0.as_slice()).map_err(db_error)?;
            }
            let mut t = txn.open_table(RESULTS_BY_CONTENT).map_err(db_error)?;
            t.retain(|_, unit| !unit.starts_with(&id.0))
                .map_err(db_error)?;
        }
        txn.commit().map_err(db_error)?;
        Ok(removed)
    }

    /// Where the job with this id was last submitted from, if recorded.
    pub fn source(&self, id: &Digest) -> Result<Option<JobSource>, StoreError> {
        self.get(SOURCES, &id.0)?
            .map(|bytes| decode("job source", &bytes))
            .transpose()
    }

    /// The job with this id.
    pub fn job(&self, id: &Digest) -> Result<Option<JobRecord>, StoreError> {
        self.get(JOBS, &id.0)?
            .map(|bytes| decode("job", &bytes))
            .transpose()
    }

    /// Every job the store holds, by id.
    pub fn jobs(&self) -> Result<Vec<(Digest, JobRecord)>, StoreError> {
        let txn = self.db.begin_read().map_err(db_error)?;
        let t = txn.open_table(JOBS).map_err(db_error)?;
        let mut out = Vec::new();
        for entry in t.iter().map_err(db_error)? {
            let (key, value) = entry.map_err(db_error)?;
            let bytes: [u8; 32] = key.value().try_into().map_err(|_| StoreError::Corrupt {
                what: "job key",
                detail: format!("{} bytes", key.value().len()),
            })?;
            out.push((Digest(bytes), decode("job", value.value())?));
        }
        Ok(out)
    }

    /// Records finished units of a job in one durable transaction: after this returns, all of
    /// them survive a crash; if the process dies before, none of them is stored.
    pub fn put_units(&self, job: &Digest, units: &[(u64, Vec<u8>)]) -> Result<(), StoreError> {
        let keys: Vec<[u8; 40]> = units.iter().map(|(i, _)| unit_key(job, *i)).collect();
        let entries: Vec<(&[u8], &[u8])> = keys
            .iter()
            .zip(units)
            .map(|(k, (_, v))| (k.as_slice(), v.as_slice()))
            .collect();
        self.put(UNITS, &entries)
    }

    /// Journals decided units and the reputation changes they bring in one durable
    /// transaction, so a crash keeps both or neither. Each change is added to the peer's
    /// stored record (`consecutive_agreements` continues the stored run unless the change
    /// holds a disagreement) and stamped `now` (seconds since the epoch); the table then keeps
    /// at most `max_peers` records, dropping those seen longest ago.
    pub fn commit(
        &self,
        job: &Digest,
        units: &[(u64, Vec<u8>)],
        changes: &[(PeerId, Reputation)],
        now: u64,
        max_peers: u64,
    ) -> Result<(), StoreError> {
        self.commit_with_content(job, units, &[], changes, now, max_peers)
    }

    /// [`JobStore::commit`], also recording for each `(content key, unit index)` that the unit
    /// holds the result of that content, for later jobs to reuse.
    pub fn commit_with_content(
        &self,
        job: &Digest,
        units: &[(u64, Vec<u8>)],
        content: &[([u8; 64], u64)],
        changes: &[(PeerId, Reputation)],
        now: u64,
        max_peers: u64,
    ) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(db_error)?;
        {
            let mut t = txn.open_table(UNITS).map_err(db_error)?;
            for (index, bytes) in units {
                t.insert(unit_key(job, *index).as_slice(), bytes.as_slice())
                    .map_err(db_error)?;
            }
            let mut t = txn.open_table(RESULTS_BY_CONTENT).map_err(db_error)?;
            for (key, index) in content {
                t.insert(key.as_slice(), unit_key(job, *index).as_slice())
                    .map_err(db_error)?;
            }
        }
        if !changes.is_empty() {
            let mut t = txn.open_table(REPUTATION).map_err(db_error)?;
            for (peer, delta) in changes {
                let stored = t
                    .get(peer.as_bytes().as_slice())
                    .map_err(db_error)?
                    .map(|v| decode_reputation(v.value()))
                    .transpose()?
                    .unwrap_or_default();
                let merged = Reputation {
                    agreements: stored.agreements + delta.agreements,
                    disagreements: stored.disagreements + delta.disagreements,
                    consecutive_agreements: if delta.disagreements > 0 {
                        delta.consecutive_agreements
                    } else {
                        stored.consecutive_agreements + delta.consecutive_agreements
                    },
                    last_seen: now,
                    host: delta.host.or(stored.host),
                };
                t.insert(peer.as_bytes().as_slice(), encode(&merged)?.as_slice())
                    .map_err(db_error)?;
            }
            let len = redb::ReadableTableMetadata::len(&t).map_err(db_error)?;
            if len > max_peers {
                // Drop a little more than the excess, so this scan is not made at every commit.
                let excess = (len - max_peers + max_peers / 64) as usize;
                let mut seen: Vec<(u64, Vec<u8>)> = Vec::with_capacity(len as usize);
                for entry in t.iter().map_err(db_error)? {
                    let (key, value) = entry.map_err(db_error)?;
                    let last = decode_reputation(value.value()).map_or(0, |r| r.last_seen);
                    seen.push((last, key.value().to_vec()));
                }
                seen.sort_unstable();
                for (_, key) in seen.into_iter().take(excess) {
                    t.remove(key.as_slice()).map_err(db_error)?;
                }
            }
        }
        txn.commit().map_err(db_error)
    }

    /// Writes what a job taught the trust table, in its own transaction (the scheduler's
    /// trust is the truth while a job runs; a crash loses at most the last commit's lessons,
    /// which only makes peers less trusted). Past [`MAX_TRUSTED`] entries per table, those
    /// with the shortest streak and no catch go first.
    pub fn put_trust(&self, changes: &TrustChanges) -> Result<(), StoreError> {
        if changes.is_empty() {
            return Ok(());
        }
        let txn = self.db.begin_write().map_err(db_error)?;
        {
            let mut t = txn.open_table(TRUST_PEERS).map_err(db_error)?;
            for (peer, standing) in &changes.peers {
                t.insert(peer.as_bytes().as_slice(), encode(standing)?.as_slice())
                    .map_err(db_error)?;
            }
            trim_trust(&mut t)?;
            let mut t = txn.open_table(TRUST_HOSTS).map_err(db_error)?;
            for (host, standing) in &changes.hosts {
                t.insert(encode(host)?.as_slice(), encode(standing)?.as_slice())
                    .map_err(db_error)?;
            }
            trim_trust(&mut t)?;
            if let Some(alert) = changes.alert {
                let mut t = txn.open_table(TRUST_META).map_err(db_error)?;
                t.insert(ALERT_KEY, encode(&alert)?.as_slice())
                    .map_err(db_error)?;
            }
        }
        txn.commit().map_err(db_error)
    }

    /// The trust table kept here, under `config`.
    pub fn trust(&self, config: TrustConfig) -> Result<Trust, StoreError> {
        let mut trust = Trust::new(config);
        let txn = self.db.begin_read().map_err(db_error)?;
        let t = txn.open_table(TRUST_PEERS).map_err(db_error)?;
        for entry in t.iter().map_err(db_error)? {
            let (key, value) = entry.map_err(db_error)?;
            let bytes: [u8; 32] = key.value().try_into().map_err(|_| StoreError::Corrupt {
                what: "trust key",
                detail: format!("{} bytes", key.value().len()),
            })?;
            trust.restore_peer(PeerId::from_bytes(bytes), decode("trust", value.value())?);
        }
        let t = txn.open_table(TRUST_HOSTS).map_err(db_error)?;
        for entry in t.iter().map_err(db_error)? {
            let (key, value) = entry.map_err(db_error)?;
            let host: Host = decode("trust host", key.value())?;
            trust.restore_host(host, decode("trust", value.value())?);
        }
        let t = txn.open_table(TRUST_META).map_err(db_error)?;
        if let Some(value) = t.get(ALERT_KEY).map_err(db_error)? {
            trust.restore_alert(decode("trust alert", value.value())?);
        }
        Ok(trust)
    }

    /// The record of one unit, if it finished.
    pub fn unit(&self, job: &Digest, index: u64) -> Result<Option<Vec<u8>>, StoreError> {
        self.get(UNITS, &unit_key(job, index))
    }

    /// Every finished unit of a job, by index, read at once (tests; the code walks the
    /// journal with [`JobStore::each_unit`]).
    #[cfg(test)]
    pub fn units(&self, job: &Digest) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let mut out = Vec::new();
        self.each_unit(job, |index, bytes| {
            out.push((index, bytes.to_vec()));
            Ok::<_, StoreError>(())
        })?;
        Ok(out)
    }

    /// Calls `f` with every finished unit of a job, in unit order, reading the journal
    /// [`UNIT_BATCH`] records per transaction: a job may hold a hundred million, never all in
    /// memory at once.
    pub fn each_unit<E: From<StoreError>>(
        &self,
        job: &Digest,
        mut f: impl FnMut(u64, &[u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        let mut from = 0u64;
        loop {
            let batch = self.units_from(job, from, UNIT_BATCH)?;
            let Some(&(last, _)) = batch.last() else {
                return Ok(());
            };
            for (index, bytes) in &batch {
                f(*index, bytes)?;
            }
            match last.checked_add(1) {
                Some(next) => from = next,
                None => return Ok(()),
            }
        }
    }

    /// At most `limit` finished units of a job, by index, from unit `from` on.
    pub fn units_from(
        &self,
        job: &Digest,
        from: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let txn = self.db.begin_read().map_err(db_error)?;
        let t = txn.open_table(UNITS).map_err(db_error)?;
        let start = unit_key(job, from);
        let end = unit_key(job, u64::MAX);
        let mut out = Vec::new();
        for entry in t
            .range(start.as_slice()..=end.as_slice())
            .map_err(db_error)?
            .take(limit)
        {
            let (key, value) = entry.map_err(db_error)?;
            let key = key.value();
            let index = key
                .get(32..40)
                .and_then(|b| <[u8; 8]>::try_from(b).ok())
                .map(u64::from_be_bytes)
                .ok_or(StoreError::Corrupt {
                    what: "unit key",
                    detail: format!("{} bytes", key.len()),
                })?;
            out.push((index, value.value().to_vec()));
        }
        Ok(out)
    }

    /// Records a peer's reputation.
    pub fn put_reputation(&self, peer: &PeerId, reputation: &Reputation) -> Result<(), StoreError> {
        self.put(REPUTATION, &[(peer.as_bytes(), &encode(reputation)?)])
    }

    /// A peer's reputation (zero for a peer never seen).
    pub fn reputation(&self, peer: &PeerId) -> Result<Reputation, StoreError> {
        Ok(self
            .get(REPUTATION, peer.as_bytes())?
            .map(|bytes| decode_reputation(&bytes))
            .transpose()?
            .unwrap_or_default())
    }

    /// Every peer's reputation, by peer id.
    pub fn reputations(&self) -> Result<Vec<(PeerId, Reputation)>, StoreError> {
        let txn = self.db.begin_read().map_err(db_error)?;
        let t = txn.open_table(REPUTATION).map_err(db_error)?;
        let mut out = Vec::new();
        for entry in t.iter().map_err(db_error)? {
            let (key, value) = entry.map_err(db_error)?;
            let bytes: [u8; 32] = key.value().try_into().map_err(|_| StoreError::Corrupt {
                what: "reputation key",
                detail: format!("{} bytes", key.value().len()),
            })?;
            out.push((PeerId::from_bytes(bytes), decode_reputation(value.value())?));
        }
        Ok(out)
    }

    /// Stores a blob under its digest.
    pub fn put_blob(&self, bytes: &[u8]) -> Result<Digest, StoreError> {
        let digest = Digest::of(bytes);
        self.put(BLOBS, &[(&digest.0, bytes)])?;
        Ok(digest)
    }

    /// The blob with this digest, checked against it (a damaged one is an error, not data).
    pub fn blob(&self, digest: &Digest) -> Result<Option<Vec<u8>>, StoreError> {
        match self.get(BLOBS, &digest.0)? {
            Some(bytes) if Digest::of(&bytes) != *digest => Err(StoreError::Corrupt {
                what: "blob",
                detail: format!("{digest} does not match its contents"),
            }),
            other => Ok(other),
        }
    }
}

/// Keeps a trust table within [`MAX_TRUSTED`] entries.
fn trim_trust(t: &mut redb::Table<&[u8], &[u8]>) -> Result<(), StoreError> {
    let len = redb::ReadableTableMetadata::len(t).map_err(db_error)?;
    let max = MAX_TRUSTED as u64;
    if len <= max {
        return Ok(());
    }
    let excess = (len - max + max / 64) as usize;
    let mut all: Vec<((u32, u32), Vec<u8>)> = Vec::with_capacity(len as usize);
    for entry in t.iter().map_err(db_error)? {
        let (key, value) = entry.map_err(db_error)?;
        let s: Standing = decode("trust", value.value()).unwrap_or_default();
        all.push(((s.caught.min(1), s.streak), key.value().to_vec()));
    }
    all.sort_unstable();
    for (_, key) in all.into_iter().take(excess) {
        t.remove(key.as_slice()).map_err(db_error)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};

    fn record(index: u64) -> Vec<u8> {
        format!(
            "unit {index} accepted with digest {}",
            Digest::of(&index.to_le_bytes())
        )
        .into_bytes()
    }

    #[test]
    fn the_trust_table_and_its_alert_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal.redb");
        let config = crate::validate::trust::TrustConfig::default();
        let peer = PeerId::from_bytes([7; 32]);
        let host = Host::of("192.0.2.7".parse().unwrap());
        {
            let store = JobStore::open(&path).unwrap();
            let mut trust = store.trust(config).unwrap();
            assert_eq!(trust.alert(), 0);
            for _ in 0..10 {
                trust.agreed(peer, host);
            }
            assert!(trust.dissented(peer, host));
            trust.spend_alert();
            store.put_trust(&trust.take_changes()).unwrap();
        }
        let store = JobStore::open(&path).unwrap();
        let trust = store.trust(config).unwrap();
        assert_eq!(trust.alert(), config.alert_span - 1);
        assert_eq!(
            trust.peer(&peer),
            Standing {
                streak: 0,
                caught: 1
            }
        );
        assert_eq!(trust.host(&host).caught, 1);
    }

    #[test]
    fn results_are_found_by_content_until_their_job_is_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let store = JobStore::open(&dir.path().join("journal.redb")).unwrap();
        let job = Digest::of(b"job");
        let (context, elsewhere) = (Digest::of(b"module"), Digest::of(b"other module"));
        let key_of = |context: &Digest, input: &[u8]| {
            let mut key = [0; 64];
            key[..32].copy_from_slice(&context.0);
            key[32..].copy_from_slice(&Digest::of(input).0);
            key
        };
        let (key, other) = (key_of(&context, b"content"), key_of(&context, b"x"));
        assert!(store.reusable(&[(0, key)], |_| true).unwrap().is_empty());
        assert!(!store.has_content(&context).unwrap());
        store
            .commit_with_content(&job, &[(3, record(3))], &[(key, 3)], &[], 0, 10)
            .unwrap();
        assert!(store.has_content(&context).unwrap());
        assert!(!store.has_content(&elsewhere).unwrap());
        let wanted = [(7, key), (8, other), (9, key_of(&elsewhere, b"content"))];
        assert_eq!(
            store.reusable(&wanted, |_| true).unwrap(),
            vec![(7, record(3))]
        );
        assert!(store.reusable(&wanted, |_| false).unwrap().is_empty());
        store.put_times(&job, &JobTimes::default()).unwrap();
        assert_eq!(store.forget(&job).unwrap(), 1);
        assert!(store.units(&job).unwrap().is_empty());
        assert_eq!(store.times(&job).unwrap(), None);
        assert!(store.reusable(&wanted, |_| true).unwrap().is_empty());
        assert!(!store.has_content(&context).unwrap());
    }

    #[test]
    fn a_jobs_source_is_kept_and_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jobs.redb");
        let job = Digest::of(b"job");
        let first = JobSource {
            manifest: "/lab/sweep.toml".into(),
            out: "/lab/sweep-results".into(),
        };
        {
            let store = JobStore::open(&path).unwrap();
            assert_eq!(store.source(&job).unwrap(), None);
            store.put_source(&job, &first).unwrap();
        }
        let store = JobStore::open(&path).unwrap();
        assert_eq!(store.source(&job).unwrap(), Some(first));
        let moved = JobSource {
            manifest: "/lab/v2/sweep.toml".into(),
            out: "/lab/v2/out".into(),
        };
        store.put_source(&job, &moved).unwrap();
        assert_eq!(store.source(&job).unwrap(), Some(moved));
        assert_eq!(store.source(&Digest::of(b"other")).unwrap(), None);
    }

    #[test]
    fn records_round_trip_and_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jobs.redb");
        let job = Digest::of(b"job");
        let other = Digest::of(b"other job");
        let peer = PeerId::from_bytes([7; 32]);
        {
            let store = JobStore::open(&path).unwrap();
            let rec = JobRecord {
                name: "sweep".into(),
                module: Digest::of(b"module"),
                units: 3,
                replicas: 2,
                quorum: 2,
                max_attempts: 4,
                profile: "p".into(),
            };
            store.put_job(&job, &rec).unwrap();
            store
                .put_units(&job, &[(2, record(2)), (0, record(0))])
                .unwrap();
            store.put_units(&other, &[(1, b"x".to_vec())]).unwrap();
            let rep = Reputation {
                consecutive_agreements: 5,
                agreements: 9,
                disagreements: 1,
                last_seen: 7,
                host: None,
            };
            store.put_reputation(&peer, &rep).unwrap();
            let blob = store.put_blob(b"module bytes").unwrap();
            assert_eq!(
                store.blob(&blob).unwrap().as_deref(),
                Some(&b"module bytes"[..])
            );
        }
        let store = JobStore::open(&path).unwrap();
        assert_eq!(store.job(&job).unwrap().unwrap().units, 3);
        assert_eq!(store.job(&Digest::of(b"none")).unwrap(), None);
        assert_eq!(
            store.units(&job).unwrap(),
            vec![(0, record(0)), (2, record(2))],
            "only this job's units, by index"
        );
        assert_eq!(store.unit(&job, 1).unwrap(), None);
        // Walked a batch at a time across batch boundaries, every unit once, in order.
        let many: Vec<(u64, Vec<u8>)> = (0..2 * UNIT_BATCH as u64 + 7)
            .map(|i| (i * 3, i.to_le_bytes().to_vec()))
            .collect();
        store.put_units(&other, &many[1..]).unwrap();
        let mut seen = Vec::new();
        store
            .each_unit(&other, |index, bytes| {
                seen.push((index, bytes.to_vec()));
                Ok::<_, StoreError>(())
            })
            .unwrap();
        let mut expected = many[1..].to_vec();
        expected.insert(0, (1, b"x".to_vec()));
        expected.sort();
        assert_eq!(seen, expected);
        assert_eq!(store.reputation(&peer).unwrap().consecutive_agreements, 5);
        assert_eq!(
            store.reputation(&PeerId::from_bytes([1; 32])).unwrap(),
            Reputation::default()
        );
    }

    #[test]
    fn a_damaged_file_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jobs.redb");
        std::fs::write(&path, vec![0xA5; 10_000]).unwrap();
        assert!(matches!(
            JobStore::open(&path),
            Err(StoreError::Open { .. })
        ));
    }

    const CHILD: &str = "CF_STORE_CRASH_WRITER";
    const BATCH: u64 = 7;

    /// The writer half of the crash test: commits batches of units forever (bounded), saying
    /// how many are committed after each commit, until it is killed.
    fn crash_writer(path: &Path) {
        let store = JobStore::open(path).unwrap();
        let job = Digest::of(b"crash");
        for batch in 0..100_000u64 {
            let units: Vec<(u64, Vec<u8>)> = (batch * BATCH..(batch + 1) * BATCH)
                .map(|i| (i, record(i)))
                .collect();
            store.put_units(&job, &units).unwrap();
            println!("committed {}", (batch + 1) * BATCH);
        }
    }

    #[test]
    fn a_writer_killed_mid_job_loses_no_committed_unit() {
        if let Some(path) = std::env::var_os(CHILD) {
            crash_writer(Path::new(&path));
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jobs.redb");
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "store::tests::a_writer_killed_mid_job_loses_no_committed_unit",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD, &path)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let started = Instant::now();
        let mut committed = 0;
        while committed < 200 && started.elapsed() < Duration::from_secs(60) {
            match lines.next() {
                Some(Ok(line)) => {
                    if let Some(n) = line.strip_prefix("committed ") {
                        committed = n.trim().parse().unwrap();
                    }
                }
                _ => break,
            }
        }
        // SIGKILL: no destructor, no flush, possibly in the middle of a commit.
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(committed >= 200, "the writer committed {committed} units");

        let store = JobStore::open(&path).unwrap();
        let units = store.units(&Digest::of(b"crash")).unwrap();
        assert!(
            units.len() as u64 >= committed,
            "{} of {committed} committed units survived",
            units.len()
        );
        assert_eq!(
            units.len() as u64 % BATCH,
            0,
            "a batch is all there or not at all"
        );
        for (i, (index, bytes)) in units.iter().enumerate() {
            assert_eq!(*index, i as u64);
            assert_eq!(bytes, &record(*index));
        }
    }

    #[test]
    fn units_and_reputations_commit_together_and_the_table_keeps_the_recent() {
        let dir = tempfile::tempdir().unwrap();
        let store = JobStore::open(&dir.path().join("s.redb")).unwrap();
        let job = Digest::of(b"job");
        let peer = |n: u8| PeerId::from_bytes([n; 32]);
        let agreed = |n: u64| Reputation {
            consecutive_agreements: n,
            agreements: n,
            ..Reputation::default()
        };
        // A record written before `last_seen` existed still reads, and merges.
        #[derive(Serialize)]
        struct Old(u64, u64, u64);
        store
            .put(
                REPUTATION,
                &[(
                    peer(1).as_bytes(),
                    &postcard::to_stdvec(&Old(2, 3, 0)).unwrap(),
                )],
            )
            .unwrap();
        store
            .commit(
                &job,
                &[(0, b"u0".to_vec())],
                &[(peer(1), agreed(4))],
                100,
                8,
            )
            .unwrap();
        assert_eq!(store.unit(&job, 0).unwrap().as_deref(), Some(&b"u0"[..]));
        assert_eq!(
            store.reputation(&peer(1)).unwrap(),
            Reputation {
                consecutive_agreements: 6,
                agreements: 7,
                disagreements: 0,
                last_seen: 100,
                host: None,
            }
        );
        // Over the cap, the peers seen longest ago go; the recent stay.
        for n in 2..=12u8 {
            store
                .commit(&job, &[], &[(peer(n), agreed(1))], 100 + u64::from(n), 8)
                .unwrap();
        }
        let kept: Vec<PeerId> = store
            .reputations()
            .unwrap()
            .into_iter()
            .map(|(p, _)| p)
            .collect();
        assert!(kept.len() <= 8, "{}", kept.len());
        assert!(kept.contains(&peer(12)) && kept.contains(&peer(11)));
        assert!(!kept.contains(&peer(1)) && !kept.contains(&peer(2)));
    }
}
