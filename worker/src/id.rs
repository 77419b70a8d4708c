//! `worker id`: print this data directory's peer id (creating the key on first use), for
//! allow-lists and `ID@ADDR` bootstrap entries.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::anyhow;
use clap::Args;
use coordinator_free::identity::Identity;

use crate::Failure;

#[derive(Args)]
pub struct IdArgs {
    /// The peer's data directory (default: ~/.local/share/coordinator-free).
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
}

pub fn run(args: IdArgs) -> Result<ExitCode, Failure> {
    let dir = crate::data_dir(args.data_dir)
        .ok_or_else(|| Failure::usage(anyhow!("no data directory: pass --data-dir DIR")))?;
    let identity = Identity::load_or_create(&dir).map_err(Failure::usage)?;
    println!("{}", identity.id());
    Ok(ExitCode::SUCCESS)
}
