//! `worker demo`: the example units on this machine. Every unit runs twice, on separate unit
//! threads, and is accepted only when both runs return identical bytes — the validation rule of
//! the network, shown locally.

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::mpsc::sync_channel;
use std::time::Instant;

use anyhow::anyhow;
use clap::Args;
use coordinator_free::digest::Digest;
use coordinator_free::sandbox::{
    Executor, Metering, PreparedModule, Sandbox, SandboxConfig, UnitRequest,
};

use crate::{Failure, exit};

#[derive(Args)]
pub struct DemoArgs {
    /// Unit threads to use (default: the machine's cores).
    #[arg(long, value_name = "N")]
    cpus: Option<usize>,
}

const REPLICAS: usize = 2;

struct Unit {
    label: String,
    module: Arc<PreparedModule>,
    input: Vec<u8>,
}

pub fn run(args: DemoArgs) -> Result<ExitCode, Failure> {
    let cpus = args
        .cpus
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .clamp(1, 64);
    let host = |e: anyhow::Error| Failure {
        error: e,
        code: exit::HOST_FAILURE,
    };
    let sandbox = Sandbox::new(SandboxConfig {
        max_concurrent_units: cpus as u32,
        ..SandboxConfig::default()
    })
    .map_err(|e| host(e.into()))?;
    let prepare = |bytes: &[u8]| {
        sandbox
            .prepare(bytes, Metering::Off)
            .map_err(|e| host(anyhow!("example module refused: {e}")))
    };
    let sir = prepare(example_artifacts::SIR_BYTES)?;
    let pi = prepare(example_artifacts::PI_BYTES)?;

    let mut units = Vec::new();
    for beta in [0.2, 0.3, 0.4, 0.5] {
        for gamma in [0.1, 0.15, 0.25] {
            units.push(Unit {
                label: format!("sir beta={beta:<4} gamma={gamma:<4}"),
                module: sir.clone(),
                input: format!(
                    r#"{{"beta":{beta},"gamma":{gamma},"population":1000000.0,"initial_infected":10.0,"days":365,"steps_per_day":24}}"#
                )
                .into_bytes(),
            });
        }
    }
    for seed in 1..=4u64 {
        units.push(Unit {
            label: format!("pi  seed={seed}"),
            module: pi.clone(),
            input: format!(r#"{{"samples":2000000,"seed":{seed}}}"#).into_bytes(),
        });
    }

    println!(
        "coordinator-free demo: {} units x {REPLICAS} replicas on {cpus} unit threads",
        units.len()
    );
    let executor =
        Executor::new(sandbox, cpus, units.len() * REPLICAS).map_err(|e| host(e.into()))?;
    let started = Instant::now();
    let (send, receive) = sync_channel(units.len() * REPLICAS);
    for (index, unit) in units.iter().enumerate() {
        for _ in 0..REPLICAS {
            let send = send.clone();
            executor
                .try_submit(
                    unit.module.clone(),
                    UnitRequest::new(unit.input.clone()),
                    move |report| {
                        let _ = send.send((index, report));
                    },
                )
                .map_err(|e| host(e.into()))?;
        }
    }
    drop(send);
    let mut results: Vec<Vec<Result<Vec<u8>, String>>> = vec![Vec::new(); units.len()];
    for (index, report) in receive.iter() {
        results[index].push(report.result.map_err(|e| e.to_string()));
    }
    let wall = started.elapsed();

    let mut accepted = 0;
    for (unit, replicas) in units.iter().zip(&results) {
        let agree = replicas.len() == REPLICAS && replicas.windows(2).all(|w| w[0] == w[1]);
        match (&replicas[0], agree) {
            (Ok(bytes), true) => {
                accepted += 1;
                println!(
                    "  {}  accepted  {}  {}",
                    unit.label,
                    &Digest::of(bytes).to_hex()[..12],
                    String::from_utf8_lossy(bytes)
                );
            }
            (Err(e), true) => println!("  {}  failed    {e}", unit.label),
            (_, false) => println!("  {}  DISAGREE  {replicas:?}", unit.label),
        }
    }
    println!(
        "{accepted}/{} units accepted: every replica returned identical bytes ({:.2} s)",
        units.len(),
        wall.as_secs_f64()
    );
    if accepted == units.len() {
        Ok(ExitCode::SUCCESS)
    } else {
        Err(Failure {
            error: anyhow!("{} units were not accepted", units.len() - accepted),
            code: exit::UNIT_FAILED,
        })
    }
}
