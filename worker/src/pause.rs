//! `worker pause` and `worker resume`: the volunteer takes the machine back, and gives it again.
//!
//! Both speak to the running peer of the data directory over its control socket; the peer
//! records the pause in the data directory, so it survives a restart. With no peer running,
//! `worker pause` records the pause itself and the next `worker run` starts paused.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use anyhow::{Context, anyhow};
use clap::Args;
use coordinator_free::control::{self, ControlError, StatusReport};
use coordinator_free::suspend::{self, MAX_PAUSE, Pause};

use crate::Failure;

#[derive(Args)]
pub struct PauseArgs {
    /// Pause for this long (`90s`, `15m`, `2h`, `1d`), then resume by itself; without it, until
    /// `worker resume`.
    #[arg(long = "for", value_name = "DURATION", value_parser = parse_duration)]
    length: Option<Duration>,
    /// The peer's data directory (default: ~/.local/share/coordinator-free).
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
}

#[derive(Args)]
pub struct ResumeArgs {
    /// The peer's data directory (default: ~/.local/share/coordinator-free).
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
}

/// A whole number followed by `s`, `m`, `h` or `d`, from one second up to [`MAX_PAUSE`].
pub(crate) fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let unit_at = text
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("{text:?} needs a unit: s, m, h or d (as in 90s, 15m, 2h, 1d)"))?;
    let (number, unit) = text.split_at(unit_at);
    let scale: u64 = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => {
            return Err(format!(
                "{text:?} is not a duration: a whole number and s, m, h or d (as in 90s, 15m, 2h, 1d)"
            ));
        }
    };
    let number: u64 = number.parse().map_err(|_| {
        format!("{text:?} is not a duration: it needs a whole number before {unit}")
    })?;
    let secs = number
        .checked_mul(scale)
        .filter(|&s| s <= MAX_PAUSE.as_secs())
        .ok_or_else(|| {
            format!(
                "a pause lasts at most {} days",
                MAX_PAUSE.as_secs() / 86_400
            )
        })?;
    if secs == 0 {
        return Err("a pause lasts at least a second".into());
    }
    Ok(Duration::from_secs(secs))
}

fn runtime() -> Result<tokio::runtime::Runtime, Failure> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
        .map_err(Failure::usage)
}

fn data_dir(explicit: Option<PathBuf>) -> Result<PathBuf, Failure> {
    crate::data_dir(explicit)
        .ok_or_else(|| Failure::usage(anyhow!("no data directory: pass --data-dir DIR")))
}

pub fn pause(args: PauseArgs) -> Result<ExitCode, Failure> {
    let dir = data_dir(args.data_dir)?;
    match runtime()?.block_on(control::pause(&dir, args.length)) {
        Ok(report) => {
            println!("{}", state_line(&report));
            Ok(ExitCode::SUCCESS)
        }
        Err(ControlError::NotRunning { .. }) => {
            let pause = Pause::lasting(args.length, SystemTime::now()).map_err(Failure::usage)?;
            suspend::write_pause(&dir, pause).map_err(Failure::usage)?;
            let until = match pause {
                Pause::Indefinite => "until `worker resume`".to_owned(),
                Pause::Until(at) => format!("until {}", crate::jobs::when(suspend::unix_ms(at))),
            };
            println!(
                "no peer is running with this data directory; the pause is recorded: `worker run` starts paused {until}"
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(err) => Err(Failure {
            error: err.into(),
            code: 1,
        }),
    }
}

pub fn resume(args: ResumeArgs) -> Result<ExitCode, Failure> {
    let dir = data_dir(args.data_dir)?;
    match runtime()?.block_on(control::resume(&dir)) {
        Ok(report) => {
            println!("{}", state_line(&report));
            Ok(ExitCode::SUCCESS)
        }
        Err(ControlError::NotRunning { .. }) => {
            let had = suspend::clear_pause(&dir).map_err(Failure::usage)?;
            if had {
                println!(
                    "no peer is running with this data directory; the recorded pause is removed: `worker run` starts working"
                );
            } else {
                println!("no peer is running with this data directory, and no pause was recorded");
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(err) => Err(Failure {
            error: err.into(),
            code: 1,
        }),
    }
}

/// What the peer's donated cores do now, in one line: `running`, or `suspended: REASONS` with
/// since when and when a pause ends.
pub(crate) fn state_line(report: &StatusReport) -> String {
    let Some(work) = &report.work else {
        return "this peer donates no cores".to_owned();
    };
    if work.suspended.is_empty() {
        return "running".to_owned();
    }
    let reasons: Vec<&str> = work.suspended.iter().map(|r| r.text()).collect();
    let mut line = format!("suspended: {}", reasons.join(", "));
    if let Some(since) = work.suspended_since_ms {
        line.push_str(&format!(" (since {})", crate::jobs::when(since)));
    }
    if work
        .suspended
        .contains(&coordinator_free::suspend::Reason::PausedByUser)
    {
        match work.pause_until_ms {
            Some(until) => line.push_str(&format!("; the pause ends {}", crate::jobs::when(until))),
            None => line.push_str("; paused until `worker resume`"),
        }
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_a_whole_number_and_a_unit() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration(" 1d "), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_duration("366d"), Ok(MAX_PAUSE));
        for bad in [
            "",
            "90",
            "s",
            "1.5h",
            "-1m",
            "0s",
            "2w",
            "1h30m",
            "367d",
            "99999999999999999999d",
            "1 h",
            "h1",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }
}
