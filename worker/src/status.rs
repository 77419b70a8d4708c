//! `worker status`: ask the peer running with a data directory what it knows.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, anyhow};
use clap::Args;
use coordinator_free::control::{self, StatusReport};

use crate::Failure;

#[derive(Args)]
pub struct StatusArgs {
    /// The running peer's data directory (default: ~/.local/share/coordinator-free).
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

pub fn run(args: StatusArgs) -> Result<ExitCode, Failure> {
    let dir = crate::data_dir(args.data_dir)
        .ok_or_else(|| Failure::usage(anyhow!("no data directory: pass --data-dir DIR")))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
        .map_err(Failure::usage)?;
    let report = runtime
        .block_on(control::status(&dir))
        .map_err(|err| Failure {
            error: err.into(),
            code: 1,
        })?;
    if args.json {
        let text = serde_json::to_string(&report)
            .context("cannot format the status")
            .map_err(Failure::usage)?;
        println!("{text}");
    } else {
        print!("{}", table(&report));
    }
    Ok(ExitCode::SUCCESS)
}

fn table(report: &StatusReport) -> String {
    let mut out = String::new();
    let addrs = |addrs: &[std::net::SocketAddr]| {
        addrs
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    };
    let _ = writeln!(out, "peer       {}", report.id);
    let _ = writeln!(out, "listening  {}", report.listen);
    let _ = writeln!(out, "advertised {}", addrs(&report.addrs));
    let _ = writeln!(
        out,
        "capacity   {}/{} cores free, {} MiB, engine profile {}",
        report.cores_free, report.cores_donated, report.memory_mb, report.profile
    );
    let _ = writeln!(
        out,
        "network    {} peers known, {} connected",
        report.peers.len(),
        report.connections
    );
    if !report.peers.is_empty() {
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "{:<52}  {:>9}  {:>8}  {:>7}  {:<4}  address",
            "peer", "free/cores", "MiB", "profile", "link"
        );
        for peer in &report.peers {
            let _ = writeln!(
                out,
                "{:<52}  {:>10}  {:>8}  {:>7}  {:<4}  {}",
                peer.id.to_string(),
                format!("{}/{}", peer.cores_free, peer.cores_donated),
                peer.memory_mb,
                peer.profile,
                if peer.connected { "yes" } else { "-" },
                addrs(&peer.addrs),
            );
        }
    }
    out
}
