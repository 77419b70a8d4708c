//! What this peer has given: how long its donated cores ran units, units run, and units whose
//! result a submitter accepted, per local day, kept in the data directory across restarts.
//!
//! A small JSON file, rewritten whole (to a temporary file, then renamed) when the counts
//! changed and [`Ledger::save`] is called: `worker history` reads it whether or not the peer
//! runs, and a crash loses at most what changed since the last save.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

/// The ledger's file in the data directory.
pub const LEDGER_FILE: &str = "given.json";
/// Most days kept one by one; older days are folded into [`Ledger::earlier`].
const MAX_DAYS: usize = 3660;
/// Largest ledger file read: ten years of days is about 1 MB.
const MAX_FILE: u64 = 8 << 20;

/// One day's gifts, or a sum of days.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Totals {
    /// How long donated cores ran units, in seconds: each unit from its start to its answer
    /// (a unit stopped by a suspension counts the time it was stopped, too).
    pub unit_secs: f64,
    /// Units run to an answer (a result or the unit's own failure).
    pub units_run: u64,
    /// Units whose answer a submitter accepted.
    pub accepted: u64,
    /// Units whose answer a submitter found wrong.
    pub rejected: u64,
}

impl Totals {
    fn add(&mut self, other: &Totals) {
        self.unit_secs += other.unit_secs;
        self.units_run += other.units_run;
        self.accepted += other.accepted;
        self.rejected += other.rejected;
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default)]
struct Saved {
    /// Local date (`YYYY-MM-DD`) to that day's totals.
    days: BTreeMap<String, Totals>,
    earlier: Totals,
}

/// Why the ledger could not be kept.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The running totals and where they are kept.
#[derive(Debug)]
pub struct Ledger {
    path: PathBuf,
    saved: Saved,
    dirty: bool,
}

impl Ledger {
    /// The ledger of data directory `dir`. A missing file is an empty ledger; one that cannot
    /// be read as a ledger is set aside (renamed with `.unreadable`) and counting starts over,
    /// so a damaged file never stops the peer and is not overwritten.
    pub fn open(dir: &Path) -> Self {
        let path = dir.join(LEDGER_FILE);
        let saved = match read(&path) {
            Ok(saved) => saved,
            Err(Unreadable::Missing) => Saved::default(),
            Err(Unreadable::Damaged(why)) => {
                let aside = path.with_extension("json.unreadable");
                tracing::warn!(
                    file = %path.display(),
                    %why,
                    aside = %aside.display(),
                    "the record of what this peer gave cannot be read; set aside, counting starts over"
                );
                let _ = std::fs::rename(&path, &aside);
                Saved::default()
            }
        };
        Self {
            path,
            saved,
            dirty: false,
        }
    }

    /// Reads the ledger of `dir` without keeping it (`worker history`).
    pub fn read(dir: &Path) -> Result<Self, String> {
        let path = dir.join(LEDGER_FILE);
        let saved = match read(&path) {
            Ok(saved) => saved,
            Err(Unreadable::Missing) => Saved::default(),
            Err(Unreadable::Damaged(why)) => return Err(format!("{}: {why}", path.display())),
        };
        Ok(Self {
            path,
            saved,
            dirty: false,
        })
    }

    /// A unit ran to an answer on `day`, for `took`.
    pub fn ran(&mut self, day: &str, took: Duration) {
        let totals = self.day(day);
        totals.units_run += 1;
        totals.unit_secs += took.as_secs_f64();
    }

    /// A submitter judged one of our answers.
    pub fn judged(&mut self, day: &str, accepted: bool) {
        let totals = self.day(day);
        if accepted {
            totals.accepted += 1;
        } else {
            totals.rejected += 1;
        }
    }

    fn day(&mut self, day: &str) -> &mut Totals {
        self.dirty = true;
        if !self.saved.days.contains_key(day)
            && self.saved.days.len() >= MAX_DAYS
            && let Some((_, oldest)) = self.saved.days.pop_first()
        {
            self.saved.earlier.add(&oldest);
        }
        self.saved.days.entry(day.to_string()).or_default()
    }

    /// One day's totals (none on record: zero).
    pub fn on(&self, day: &str) -> Totals {
        self.saved.days.get(day).copied().unwrap_or_default()
    }

    /// Every day on record, oldest first.
    pub fn days(&self) -> impl DoubleEndedIterator<Item = (&str, &Totals)> {
        self.saved.days.iter().map(|(d, t)| (d.as_str(), t))
    }

    /// Days older than those kept one by one.
    pub fn earlier(&self) -> Totals {
        self.saved.earlier
    }

    /// Everything, all days together.
    pub fn total(&self) -> Totals {
        let mut total = self.saved.earlier;
        for t in self.saved.days.values() {
            total.add(t);
        }
        total
    }

    /// Writes the ledger if it changed since the last save.
    pub fn save(&mut self) -> Result<(), LedgerError> {
        if !self.dirty {
            return Ok(());
        }
        let write_err = |source| LedgerError::Write {
            path: self.path.clone(),
            source,
        };
        let bytes = serde_json::to_vec_pretty(&self.saved)
            .map_err(|e| write_err(std::io::Error::other(e.to_string())))?;
        let tmp = self.path.with_extension("json.tmp");
        let mut file = std::fs::File::create(&tmp).map_err(write_err)?;
        file.write_all(&bytes).map_err(write_err)?;
        file.sync_all().map_err(write_err)?;
        std::fs::rename(&tmp, &self.path).map_err(write_err)?;
        self.dirty = false;
        Ok(())
    }
}

enum Unreadable {
    Missing,
    Damaged(String),
}

fn read(path: &Path) -> Result<Saved, Unreadable> {
    use std::io::Read;
    let file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(Unreadable::Missing),
        Err(e) => return Err(Unreadable::Damaged(e.to_string())),
    };
    let mut bytes = Vec::new();
    file.take(MAX_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| Unreadable::Damaged(e.to_string()))?;
    if bytes.len() as u64 > MAX_FILE {
        return Err(Unreadable::Damaged(format!("larger than {MAX_FILE} bytes")));
    }
    let saved: Saved =
        serde_json::from_slice(&bytes).map_err(|e| Unreadable::Damaged(e.to_string()))?;
    if saved.days.keys().any(|d| !is_date(d)) || saved.days.len() > MAX_DAYS {
        return Err(Unreadable::Damaged("not a ledger of days".into()));
    }
    Ok(saved)
}

fn is_date(text: &str) -> bool {
    let b = text.as_bytes();
    b.len() == 10
        && b[4] == b'-'
        && b[7] == b'-'
        && b.iter()
            .enumerate()
            .all(|(i, c)| i == 4 || i == 7 || c.is_ascii_digit())
}

/// Today's local date, `YYYY-MM-DD`.
pub fn today() -> String {
    date_of(SystemTime::now())
}

fn date_of(now: SystemTime) -> String {
    match crate::conditions::probe::local_tm(now) {
        Some(tm) => format!(
            "{:04}-{:02}-{:02}",
            tm.tm_year + 1900,
            tm.tm_mon + 1,
            tm.tm_mday
        ),
        None => "1970-01-01".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_survive_a_restart_per_day() {
        let dir = tempfile::tempdir().expect("dir");
        let mut ledger = Ledger::open(dir.path());
        ledger.ran("2026-12-05", Duration::from_millis(1500));
        ledger.ran("2026-12-06", Duration::from_secs(2));
        ledger.ran("2026-12-06", Duration::from_secs(1));
        ledger.judged("2026-12-06", true);
        ledger.judged("2026-12-06", false);
        ledger.save().expect("saved");

        let again = Ledger::open(dir.path());
        let days: Vec<_> = again.days().map(|(d, t)| (d.to_string(), *t)).collect();
        assert_eq!(days.len(), 2);
        assert_eq!(days[1].0, "2026-12-06");
        assert_eq!(days[1].1.units_run, 2);
        assert_eq!(days[1].1.accepted, 1);
        assert_eq!(days[1].1.rejected, 1);
        let total = again.total();
        assert_eq!(total.units_run, 3);
        assert!((total.unit_secs - 4.5).abs() < 1e-9);
        assert_eq!(Ledger::read(dir.path()).expect("reads").total(), total);
    }

    #[test]
    fn a_damaged_ledger_is_set_aside_not_overwritten() {
        let dir = tempfile::tempdir().expect("dir");
        std::fs::write(
            dir.path().join(LEDGER_FILE),
            b"{\"days\": {\"tuesday\": {}}}",
        )
        .expect("write");
        assert!(Ledger::read(dir.path()).is_err());
        let mut ledger = Ledger::open(dir.path());
        assert_eq!(ledger.total(), Totals::default());
        assert!(dir.path().join("given.json.unreadable").exists());
        ledger.ran("2026-12-06", Duration::from_secs(1));
        ledger.save().expect("saved");
        assert_eq!(
            Ledger::read(dir.path()).expect("reads").total().units_run,
            1
        );
    }

    #[test]
    fn old_days_fold_into_earlier_and_dates_are_local_days() {
        let dir = tempfile::tempdir().expect("dir");
        let mut ledger = Ledger::open(dir.path());
        for i in 0..MAX_DAYS + 2 {
            let day = format!("{:04}-01-01", 1000 + i);
            ledger.ran(&day, Duration::from_secs(1));
        }
        assert_eq!(ledger.days().count(), MAX_DAYS);
        assert_eq!(ledger.earlier().units_run, 2);
        assert_eq!(ledger.total().units_run, MAX_DAYS as u64 + 2);
        assert!(is_date(&today()));
        assert!(!is_date("2026-1-061") && !is_date("2026/12/06"));
    }
}
