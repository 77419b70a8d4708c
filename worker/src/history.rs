//! `worker history`: what this peer has given, day by day — how long its cores ran units,
//! units run, and the verdicts submitters returned on its answers. Read from the data directory, so it works
//! whether or not the peer runs.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::anyhow;
use clap::Args;
use coordinator_free::ledger::{Ledger, Totals};

use crate::Failure;

#[derive(Args)]
pub struct HistoryArgs {
    /// The peer's data directory (default: ~/.local/share/coordinator-free).
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// One JSON document instead of the table.
    #[arg(long)]
    json: bool,
}

pub fn run(args: HistoryArgs) -> Result<ExitCode, Failure> {
    let dir = crate::data_dir(args.data_dir)
        .ok_or_else(|| Failure::usage(anyhow!("no data directory: pass --data-dir DIR")))?;
    let ledger = Ledger::read(&dir).map_err(|why| Failure::usage(anyhow!("{why}")))?;
    if args.json {
        let days: serde_json::Map<String, serde_json::Value> = ledger
            .days()
            .map(|(day, t)| (day.to_string(), totals_json(t)))
            .collect();
        let doc = serde_json::json!({
            "days": days,
            "earlier": totals_json(&ledger.earlier()),
            "total": totals_json(&ledger.total()),
        });
        println!("{doc}");
        return Ok(ExitCode::SUCCESS);
    }
    if ledger.total().units_run == 0 {
        println!("nothing given yet from {}", dir.display());
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<12} {:>12} {:>10} {:>10} {:>10}",
        "day", "unit time", "units run", "accepted", "rejected"
    );
    let earlier = ledger.earlier();
    if earlier.units_run > 0 {
        println!("{}", row("earlier", &earlier));
    }
    for (day, totals) in ledger.days() {
        println!("{}", row(day, totals));
    }
    println!("{}", row("total", &ledger.total()));
    Ok(ExitCode::SUCCESS)
}

fn totals_json(t: &Totals) -> serde_json::Value {
    serde_json::json!({
        "unit_secs": t.unit_secs,
        "units_run": t.units_run,
        "accepted": t.accepted,
        "rejected": t.rejected,
    })
}

fn row(label: &str, t: &Totals) -> String {
    format!(
        "{label:<12} {:>12} {:>10} {:>10} {:>10}",
        unit_time(t.unit_secs),
        t.units_run,
        t.accepted,
        t.rejected
    )
}

/// `2 h 05 min`, `4 min 10 s`, `12.3 s`.
pub(crate) fn unit_time(secs: f64) -> String {
    let secs = secs.max(0.0);
    let whole = secs as u64;
    if whole >= 3600 {
        format!("{} h {:02} min", whole / 3600, whole % 3600 / 60)
    } else if whole >= 60 {
        format!("{} min {:02} s", whole / 60, whole % 60)
    } else {
        format!("{secs:.1} s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_time_reads_as_hours_minutes_or_seconds() {
        assert_eq!(unit_time(12.34), "12.3 s");
        assert_eq!(unit_time(250.0), "4 min 10 s");
        assert_eq!(unit_time(7500.0), "2 h 05 min");
        assert_eq!(unit_time(-1.0), "0.0 s");
    }
}
