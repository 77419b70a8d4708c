//! Every example unit, built to wasm by `example-artifacts`, run in the sandbox: its output bytes
//! equal the same computation done natively, and stay identical across repeated runs, cache hits
//! and misses, and fuel metering on or off.

use std::time::Duration;

use coordinator_free::sandbox::{
    Executor, Limits, Metering, ModuleSource, OutcomeClass, Sandbox, SandboxConfig, UnitError,
    UnitReport, UnitRequest,
};
use example_artifacts as artifacts;

fn sandbox() -> Sandbox {
    Sandbox::new(SandboxConfig::default()).expect("sandbox starts")
}

fn run_on(sandbox: &Sandbox, wasm: &[u8], input: &[u8], limits: Limits) -> UnitReport {
    let metering = if limits.fuel.is_some() {
        Metering::Fuel
    } else {
        Metering::Off
    };
    let module = sandbox
        .prepare(wasm, metering)
        .unwrap_or_else(|e| panic!("example module refused: {e}"));
    let executor = Executor::new(sandbox.clone(), 1, 1).expect("executor starts");
    let mut request = UnitRequest::new(input.to_vec());
    request.limits = limits;
    executor.run(module, request)
}

fn output(report: UnitReport) -> Vec<u8> {
    match report.result {
        Ok(bytes) => bytes,
        Err(e) => panic!("unit failed: {e}; logs: {:?}", report.logs),
    }
}

fn json<T: serde::Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("serializes")
}

/// Runs `wasm` on `input` and checks the bytes against the native computation.
fn agrees_with_native(wasm: &[u8], input: Vec<u8>, native: Vec<u8>) -> Vec<u8> {
    let out = output(run_on(&sandbox(), wasm, &input, Limits::default()));
    assert_eq!(
        String::from_utf8_lossy(&out),
        String::from_utf8_lossy(&native),
        "sandbox and native disagree"
    );
    out
}

#[test]
fn pi_matches_native() {
    let input = example_pi::Input {
        samples: 300_000,
        seed: 7,
    };
    let out = agrees_with_native(
        artifacts::PI_BYTES,
        json(&input),
        json(&example_pi::compute(&input)),
    );
    let parsed: example_pi::Output = serde_json::from_slice(&out).unwrap();
    assert!(
        (parsed.pi - std::f64::consts::PI).abs() < 0.02,
        "{}",
        parsed.pi
    );
}

#[test]
fn mandelbrot_matches_native() {
    let input = example_mandelbrot::Input {
        x0: -2.0,
        y0: -1.25,
        x1: 0.5,
        y1: 1.25,
        width: 64,
        height: 48,
        max_iter: 200,
    };
    agrees_with_native(
        artifacts::MANDELBROT_BYTES,
        json(&input),
        json(&example_mandelbrot::compute(&input)),
    );
}

#[test]
fn primes_match_native_and_the_known_count() {
    let input = example_primes::Input {
        start: 0,
        end: 1_000_000,
    };
    let out = agrees_with_native(
        artifacts::PRIMES_BYTES,
        json(&input),
        json(&example_primes::compute(&input)),
    );
    let parsed: example_primes::Output = serde_json::from_slice(&out).unwrap();
    assert_eq!(parsed.count, 78_498);
}

#[test]
fn sir_sweep_points_match_native() {
    for (beta, gamma) in [(0.3, 0.1), (0.5, 0.25), (0.12, 0.1)] {
        let input = example_sir::Input {
            beta,
            gamma,
            population: 1_000_000.0,
            initial_infected: 10.0,
            days: 200,
            steps_per_day: 10,
        };
        agrees_with_native(
            artifacts::SIR_BYTES,
            json(&input),
            json(&example_sir::compute(&input)),
        );
    }
}

#[test]
fn hand_written_wat_module_runs() {
    let sandbox = sandbox();
    let wasm = coordinator_free::sandbox::module_from_file_bytes(artifacts::REVERSE_WAT_BYTES)
        .expect("the WAT example converts");
    let report = run_on(&sandbox, &wasm, b"stressed", Limits::default());
    assert!(!report.logs.is_empty(), "it logs a line");
    assert!(report.progress.is_some(), "it reports progress");
    assert_eq!(output(report), b"desserts");

    let report = run_on(&sandbox, &wasm, b"", Limits::default());
    assert_eq!(
        report.result,
        Err(UnitError::GuestFailure {
            code: 7,
            message: "empty input".into()
        })
    );

    let noop = coordinator_free::sandbox::module_from_file_bytes(artifacts::NOOP_WAT_BYTES)
        .expect("the no-op converts");
    assert_eq!(output(run_on(&sandbox, &noop, b"", Limits::default())), b"");
}

/// The data-path benchmark's unit sums an input's 64-bit little-endian words, then its last
/// bytes, as native code does: checked on inputs of every tail length and on 10 MiB.
#[test]
fn the_checksum_unit_matches_native() {
    let sandbox = sandbox();
    let wasm = coordinator_free::sandbox::module_from_file_bytes(artifacts::CHECKSUM_WAT_BYTES)
        .expect("the checksum converts");
    let native = |input: &[u8]| {
        let words = input.chunks_exact(8);
        let tail: u64 = words.remainder().iter().map(|b| u64::from(*b)).sum();
        words
            .map(|w| u64::from_le_bytes(w.try_into().unwrap()))
            .fold(tail, u64::wrapping_add)
            .to_le_bytes()
    };
    let mut state = 1u64;
    let mut bytes = |n: usize| -> Vec<u8> {
        (0..n)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (state >> 56) as u8
            })
            .collect()
    };
    for n in [0, 1, 7, 8, 9, 15, 16, 1000, 10 << 20] {
        let input = bytes(n);
        let limits = Limits {
            memory_bytes: 64 << 20,
            ..Limits::default()
        };
        assert_eq!(
            output(run_on(&sandbox, &wasm, &input, limits)),
            native(&input),
            "{n} bytes"
        );
    }
}

#[test]
fn outputs_are_identical_across_runs_caches_and_metering() {
    let dir = tempfile::tempdir().unwrap();
    let config = SandboxConfig {
        cache_dir: Some(dir.path().to_owned()),
        ..SandboxConfig::default()
    };
    let cases: Vec<(&[u8], Vec<u8>)> = vec![
        (
            artifacts::PI_BYTES,
            br#"{"samples":100000,"seed":3}"#.to_vec(),
        ),
        (
            artifacts::MANDELBROT_BYTES,
            br#"{"x0":-0.75,"y0":0.05,"x1":-0.7,"y1":0.1,"width":32,"height":32,"max_iter":500}"#
                .to_vec(),
        ),
        (
            artifacts::SIR_BYTES,
            br#"{"beta":0.4,"gamma":0.2,"population":50000.0,"initial_infected":5.0,"days":120,"steps_per_day":8}"#
                .to_vec(),
        ),
        (
            artifacts::PRIMES_BYTES,
            br#"{"start":1000000000,"end":1000100000}"#.to_vec(),
        ),
    ];
    for (wasm, input) in cases {
        let first = Sandbox::new(config.clone()).unwrap();
        let (_, source) = first.prepare_traced(wasm, Metering::Off).unwrap();
        assert_eq!(source, ModuleSource::Compiled, "a fresh cache misses");
        let reference = output(run_on(&first, wasm, &input, Limits::default()));
        for _ in 0..3 {
            assert_eq!(
                output(run_on(&first, wasm, &input, Limits::default())),
                reference
            );
        }
        // A new sandbox loads the artifact from disk.
        let second = Sandbox::new(config.clone()).unwrap();
        let (_, source) = second.prepare_traced(wasm, Metering::Off).unwrap();
        assert_eq!(source, ModuleSource::Disk);
        assert_eq!(
            output(run_on(&second, wasm, &input, Limits::default())),
            reference
        );
        // Fuel metering changes the machine code, never the result; fuel use is reproducible.
        let fueled = Limits {
            fuel: Some(u64::MAX / 2),
            ..Limits::default()
        };
        let a = run_on(&first, wasm, &input, fueled.clone());
        let b = run_on(&second, wasm, &input, fueled);
        assert_eq!(a.fuel_consumed, b.fuel_consumed);
        assert_eq!(output(a), reference);
        assert_eq!(output(b), reference);
    }
}

#[test]
fn interrupted_unit_resumes_from_its_checkpoint_with_identical_output() {
    let sandbox = sandbox();
    // Five checkpointed batches of 16 Mi numbers each.
    let input = br#"{"start":0,"end":80000000}"#;
    let through = output(run_on(
        &sandbox,
        artifacts::PRIMES_BYTES,
        input,
        Limits::default(),
    ));

    // Measure the whole run's fuel, then stop a run at 60 % of it, after some checkpoints.
    let full = run_on(
        &sandbox,
        artifacts::PRIMES_BYTES,
        input,
        Limits {
            fuel: Some(u64::MAX / 2),
            ..Limits::default()
        },
    );
    let needed = full.fuel_consumed.expect("metered");
    let interrupted = run_on(
        &sandbox,
        artifacts::PRIMES_BYTES,
        input,
        Limits {
            fuel: Some(needed / 10 * 6),
            ..Limits::default()
        },
    );
    assert!(matches!(
        interrupted.result,
        Err(UnitError::OutOfFuel { .. })
    ));
    let checkpoint = interrupted
        .checkpoint
        .expect("the unit saved a checkpoint before running out");

    let mut request = UnitRequest::new(input.to_vec());
    request.checkpoint = Some(checkpoint);
    let module = sandbox
        .prepare(artifacts::PRIMES_BYTES, Metering::Fuel)
        .unwrap();
    request.limits.fuel = Some(u64::MAX / 2);
    let executor = Executor::new(sandbox.clone(), 1, 1).unwrap();
    let resumed = executor.run(module, request);
    let resumed_fuel = resumed.fuel_consumed.unwrap();
    assert!(
        resumed_fuel < needed,
        "resuming did less work ({resumed_fuel} < {needed})"
    );
    assert_eq!(output(resumed), through);
}

fn faults(sandbox: &Sandbox, input: &str, limits: Limits) -> UnitReport {
    run_on(sandbox, artifacts::FAULTS_BYTES, input.as_bytes(), limits)
}

#[test]
fn misbehaving_rust_units_end_in_their_typed_outcomes() {
    let sandbox = sandbox();
    // A generous clock: on a loaded machine even a flood of log lines takes a while; only the
    // spinning unit is meant to hit it.
    let short = Limits {
        timeout: Duration::from_secs(30),
        memory_bytes: 64 << 20,
        output_bytes: 1 << 20,
        log_bytes: 8 << 10,
        ..Limits::default()
    };
    for round in 0..3 {
        let report = faults(
            &sandbox,
            r#"{"panic":"the reactor is on fire"}"#,
            short.clone(),
        );
        match &report.result {
            Err(UnitError::GuestFailure { code: 3, message }) => {
                assert!(message.contains("the reactor is on fire"), "{message}")
            }
            other => panic!("expected a panic failure, got {other:?}"),
        }
        let report = faults(
            &sandbox,
            r#"{"fail":{"code":17,"message":"no convergence"}}"#,
            short.clone(),
        );
        assert_eq!(
            report.result,
            Err(UnitError::GuestFailure {
                code: 17,
                message: "no convergence".into()
            })
        );
        let report = faults(&sandbox, r#"{"recurse":100000000}"#, short.clone());
        assert_eq!(report.result, Err(UnitError::StackOverflow));
        let report = faults(&sandbox, r#"{"alloc_mb":512}"#, short.clone());
        let err = report.result.unwrap_err();
        assert!(matches!(err, UnitError::MemoryLimit { .. }), "{err}");
        assert_eq!(err.class(), OutcomeClass::Deterministic);
        let report = faults(&sandbox, r#"{"output_mb":8}"#, short.clone());
        assert_eq!(
            report.result,
            Err(UnitError::OutputTooLarge { cap: 1 << 20 })
        );
        let report = faults(&sandbox, r#"{"log_lines":100000}"#, short.clone());
        assert!(report.result.is_ok(), "{:?}", report.result);
        assert!(report.logs_dropped > 0);
        let spin = Limits {
            timeout: Duration::from_millis(300),
            ..short.clone()
        };
        let report = faults(&sandbox, r#"{"spin":true}"#, spin);
        assert!(matches!(report.result, Err(UnitError::Timeout { .. })));
        let report = faults(&sandbox, r#"{"not json"#, short.clone());
        assert!(
            matches!(&report.result, Err(UnitError::GuestFailure { code: 2, .. })),
            "round {round}: {:?}",
            report.result
        );
        let report = faults(&sandbox, r#"{"ok":true}"#, short.clone());
        assert_eq!(output(report), br#"{"ok":true}"#);
    }
}
