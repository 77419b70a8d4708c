//! Suspension: why a peer's donated cores are not working right now.
//!
//! A volunteer's machine comes first. Several conditions may each stop donated work — the user
//! at the keyboard, the machine on battery, outside the hours the volunteer chose, a pause the
//! user asked for, other programs busy, the machine too hot — and several may hold at once; the
//! work resumes only when none does. [`Suspension`] is that set of reasons and when it began,
//! kept without IO: the work task of a node owns one, feeds it changes with the time, and does
//! what a change means (stop the unit hosts, advertise no free cores, decline offers).
//!
//! A pause the user asks for (`worker pause`) survives a restart: it is written to
//! [`PAUSE_FILE`] in the data directory, and the next `worker run` applies it again.

use std::collections::BTreeMap;
use std::fmt;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// Why donated work is suspended. Every suspension names at least one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// Someone uses the machine.
    UserActive,
    /// The machine runs on its battery.
    OnBattery,
    /// Outside the hours the volunteer allows work in.
    OutsideWindow,
    /// The volunteer paused the peer (`worker pause`).
    PausedByUser,
    /// Other programs keep the processor busy.
    CpuBusy,
    /// The machine is too hot.
    TooHot,
}

impl Reason {
    /// Every reason, in the order status output lists them.
    pub const ALL: [Reason; 6] = [
        Reason::UserActive,
        Reason::OnBattery,
        Reason::OutsideWindow,
        Reason::PausedByUser,
        Reason::CpuBusy,
        Reason::TooHot,
    ];

    /// The words status output uses.
    pub fn text(self) -> &'static str {
        match self {
            Reason::UserActive => "user active",
            Reason::OnBattery => "on battery",
            Reason::OutsideWindow => "outside window",
            Reason::PausedByUser => "paused by user",
            Reason::CpuBusy => "CPU busy",
            Reason::TooHot => "too hot",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.text())
    }
}

/// What a change of reasons did to the suspension as a whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// The first reason arrived: stop the work.
    Suspended,
    /// The last reason went: continue the work.
    Resumed,
    /// The work was and stays suspended, or was and stays running.
    Unchanged,
}

/// The reasons that hold now and since when. Sans-IO: the caller passes the time.
#[derive(Debug, Clone, Default)]
pub struct Suspension {
    reasons: BTreeMap<Reason, Instant>,
    since: Option<Instant>,
}

impl Suspension {
    pub fn new() -> Self {
        Self::default()
    }

    /// `reason` holds from `now` (a reason that holds already keeps its first time).
    pub fn suspend(&mut self, reason: Reason, now: Instant) -> Transition {
        let was = self.is_suspended();
        self.reasons.entry(reason).or_insert(now);
        if was {
            Transition::Unchanged
        } else {
            self.since = Some(now);
            Transition::Suspended
        }
    }

    /// `reason` no longer holds.
    pub fn clear(&mut self, reason: Reason) -> Transition {
        if self.reasons.remove(&reason).is_none() || !self.reasons.is_empty() {
            return Transition::Unchanged;
        }
        self.since = None;
        Transition::Resumed
    }

    /// `suspend` or `clear`, as `on` says.
    pub fn set(&mut self, reason: Reason, on: bool, now: Instant) -> Transition {
        if on {
            self.suspend(reason, now)
        } else {
            self.clear(reason)
        }
    }

    pub fn is_suspended(&self) -> bool {
        !self.reasons.is_empty()
    }

    pub fn holds(&self, reason: Reason) -> bool {
        self.reasons.contains_key(&reason)
    }

    /// The reasons that hold, in [`Reason::ALL`]'s order.
    pub fn reasons(&self) -> Vec<Reason> {
        self.reasons.keys().copied().collect()
    }

    /// When the current suspension began (the first of its reasons), if suspended.
    pub fn since(&self) -> Option<Instant> {
        self.since
    }

    /// How long the current suspension has lasted.
    pub fn lasted(&self, now: Instant) -> Duration {
        self.since
            .map_or(Duration::ZERO, |since| now.saturating_duration_since(since))
    }
}

/// The file in the data directory that records a pause.
pub const PAUSE_FILE: &str = "pause";
/// Longest pause file read: the format needs a few dozen bytes.
const MAX_PAUSE_FILE: u64 = 256;
/// Longest pause with an end: a year. Longer is a pause until `worker resume`.
pub const MAX_PAUSE: Duration = Duration::from_secs(366 * 86_400);

/// A pause the user asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pause {
    /// Until `worker resume`.
    Indefinite,
    /// Until this time, then work resumes by itself.
    Until(SystemTime),
}

/// Why a pause could not be read, parsed or recorded.
#[derive(Debug, thiserror::Error)]
pub enum PauseError {
    #[error("cannot read the pause file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot record the pause in {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the pause file is longer than {MAX_PAUSE_FILE} bytes")]
    TooLong,
    #[error("the pause file says {text:?}, not `indefinite` or `until SECONDS`")]
    Malformed { text: String },
    #[error("a pause may last at most {} days", MAX_PAUSE.as_secs() / 86_400)]
    TooFar,
}

/// Longest part of a malformed pause file echoed in the error.
const MAX_ECHOED_CHARS: usize = 40;

impl Pause {
    /// A pause of `length` from `now`, or until resumed when `None`.
    pub fn lasting(length: Option<Duration>, now: SystemTime) -> Result<Self, PauseError> {
        match length {
            None => Ok(Pause::Indefinite),
            Some(length) if length > MAX_PAUSE => Err(PauseError::TooFar),
            Some(length) => now
                .checked_add(length)
                .map(Pause::Until)
                .ok_or(PauseError::TooFar),
        }
    }

    /// Whether the pause has ended by `now`.
    pub fn is_over(&self, now: SystemTime) -> bool {
        match self {
            Pause::Indefinite => false,
            Pause::Until(until) => *until <= now,
        }
    }

    /// The end as milliseconds since the Unix epoch, if the pause has one.
    pub fn until_ms(&self) -> Option<u64> {
        match self {
            Pause::Indefinite => None,
            Pause::Until(until) => Some(unix_ms(*until)),
        }
    }

    /// The file's text: `indefinite`, or `until SECONDS` since the Unix epoch.
    pub fn to_text(&self) -> String {
        match self {
            Pause::Indefinite => "indefinite\n".to_owned(),
            Pause::Until(until) => format!("until {}\n", unix_ms(*until).div_ceil(1000)),
        }
    }

    /// Reads the file's text. Anything else is an error, never a guess.
    pub fn parse(text: &str) -> Result<Self, PauseError> {
        let malformed = || PauseError::Malformed {
            text: text.trim().chars().take(MAX_ECHOED_CHARS).collect(),
        };
        let mut words = text.split_ascii_whitespace();
        let pause = match (words.next(), words.next()) {
            (Some("indefinite"), None) => Pause::Indefinite,
            (Some("until"), Some(secs)) => {
                let secs: u64 = secs.parse().map_err(|_| malformed())?;
                UNIX_EPOCH
                    .checked_add(Duration::from_secs(secs))
                    .map(Pause::Until)
                    .ok_or_else(malformed)?
            }
            _ => return Err(malformed()),
        };
        if words.next().is_some() {
            return Err(malformed());
        }
        Ok(pause)
    }
}

/// Milliseconds since the Unix epoch (0 before it, the maximum past what fits).
pub fn unix_ms(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The pause recorded in the data directory `dir`, if any.
pub fn read_pause(dir: &Path) -> Result<Option<Pause>, PauseError> {
    let path = dir.join(PAUSE_FILE);
    let read_err = |source| PauseError::Read {
        path: path.clone(),
        source,
    };
    let file = match std::fs::File::open(&path) {
        Ok(file) => file,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(err) => return Err(read_err(err)),
    };
    let mut bytes = Vec::new();
    file.take(MAX_PAUSE_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(read_err)?;
    if bytes.len() as u64 > MAX_PAUSE_FILE {
        return Err(PauseError::TooLong);
    }
    let text = String::from_utf8_lossy(&bytes);
    Pause::parse(&text).map(Some)
}

/// Records `pause` in the data directory `dir`, replacing any earlier one. The file is written
/// beside its place and renamed over it, so a crash leaves the old pause or the new one, never
/// half of either.
pub fn write_pause(dir: &Path, pause: Pause) -> Result<(), PauseError> {
    let path = dir.join(PAUSE_FILE);
    let write_err = |source| PauseError::Write {
        path: path.clone(),
        source,
    };
    create_private_dir(dir).map_err(write_err)?;
    let partial = dir.join(format!("{PAUSE_FILE}.partial"));
    let mut file = std::fs::File::create(&partial).map_err(write_err)?;
    file.write_all(pause.to_text().as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(write_err)?;
    drop(file);
    std::fs::rename(&partial, &path).map_err(write_err)
}

/// Forgets the pause recorded in `dir`; `true` if there was one.
pub fn clear_pause(dir: &Path) -> Result<bool, PauseError> {
    let path = dir.join(PAUSE_FILE);
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(true),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(source) => Err(PauseError::Write { path, source }),
    }
}

/// The data directory, made 0700 like the identity's when it does not exist yet: `worker pause`
/// may come before the first `worker run`.
fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder.create(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn work_resumes_only_when_every_reason_is_gone() {
        let start = Instant::now();
        let later = start + Duration::from_secs(5);
        let mut s = Suspension::new();
        assert!(!s.is_suspended());
        assert_eq!(s.clear(Reason::TooHot), Transition::Unchanged);
        assert_eq!(
            s.suspend(Reason::PausedByUser, start),
            Transition::Suspended
        );
        assert_eq!(s.suspend(Reason::CpuBusy, later), Transition::Unchanged);
        assert_eq!(
            s.suspend(Reason::PausedByUser, later),
            Transition::Unchanged
        );
        assert_eq!(s.reasons(), vec![Reason::PausedByUser, Reason::CpuBusy]);
        assert_eq!(s.since(), Some(start));
        assert_eq!(s.lasted(later), Duration::from_secs(5));
        assert_eq!(s.clear(Reason::PausedByUser), Transition::Unchanged);
        assert!(s.is_suspended() && s.holds(Reason::CpuBusy));
        assert_eq!(s.set(Reason::CpuBusy, false, later), Transition::Resumed);
        assert_eq!(s.since(), None);
        assert_eq!(s.lasted(later), Duration::ZERO);
        assert_eq!(
            Reason::ALL.map(Reason::text),
            [
                "user active",
                "on battery",
                "outside window",
                "paused by user",
                "CPU busy",
                "too hot"
            ]
        );
    }

    #[test]
    fn a_pause_reads_back_as_written_and_nothing_else_passes() {
        let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        for pause in [
            Pause::Indefinite,
            Pause::lasting(Some(Duration::from_secs(90)), now).expect("a pause"),
        ] {
            assert_eq!(Pause::parse(&pause.to_text()).expect("parses"), pause);
        }
        assert_eq!(
            Pause::lasting(None, now).expect("a pause"),
            Pause::Indefinite
        );
        assert!(matches!(
            Pause::lasting(Some(MAX_PAUSE * 2), now),
            Err(PauseError::TooFar)
        ));
        assert!(Pause::Until(now).is_over(now));
        assert!(!Pause::Indefinite.is_over(now));
        for bad in [
            "",
            "forever",
            "until",
            "until -5",
            "until 1e9",
            "until 99999999999999999999999",
            "indefinite please",
            "until 5 6",
            "\u{0}\u{1}",
        ] {
            assert!(
                matches!(Pause::parse(bad), Err(PauseError::Malformed { .. })),
                "{bad:?}"
            );
        }
        let long = format!("until {}", "9".repeat(500));
        match Pause::parse(&long) {
            Err(PauseError::Malformed { text }) => assert!(text.chars().count() <= 40),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_pause_file_is_written_whole_and_read_with_a_cap() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("fresh");
        assert!(read_pause(&dir).expect("no file is no pause").is_none());
        let until = Pause::Until(UNIX_EPOCH + Duration::from_secs(2_000_000_000));
        write_pause(&dir, until).expect("written");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&dir).expect("dir").permissions().mode();
            assert_eq!(mode & 0o777, 0o700);
        }
        assert_eq!(read_pause(&dir).expect("reads"), Some(until));
        write_pause(&dir, Pause::Indefinite).expect("replaced");
        assert_eq!(read_pause(&dir).expect("reads"), Some(Pause::Indefinite));
        assert!(!dir.join(format!("{PAUSE_FILE}.partial")).exists());
        std::fs::write(dir.join(PAUSE_FILE), vec![b'x'; 10_000]).expect("write");
        assert!(matches!(read_pause(&dir), Err(PauseError::TooLong)));
        std::fs::write(dir.join(PAUSE_FILE), b"\xff\xfe until").expect("write");
        assert!(matches!(
            read_pause(&dir),
            Err(PauseError::Malformed { .. })
        ));
        assert!(clear_pause(&dir).expect("cleared"));
        assert!(!clear_pause(&dir).expect("nothing to clear"));
        assert!(read_pause(&dir).expect("gone").is_none());
    }
}
