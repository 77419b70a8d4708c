//! Hostile and malformed modules against the sandbox: every one ends in its typed outcome, in
//! bounded time, and the process survives all of them, many times over.

use std::sync::Arc;
use std::time::{Duration, Instant};

use coordinator_free::sandbox::{
    Abort, Executor, ExecutorBusy, Limits, Metering, ModuleSource, OutcomeClass, PROGRESS_INTERVAL,
    Sandbox, SandboxConfig, TrapKind, UnitError, UnitReport, UnitRequest, aborted_error,
    check_imports,
};

fn sandbox() -> Sandbox {
    Sandbox::new(SandboxConfig::default()).expect("sandbox starts")
}

fn wasm(text: &str) -> Vec<u8> {
    wat::parse_str(text).expect("test module is valid text")
}

fn limits() -> Limits {
    Limits {
        timeout: Duration::from_secs(10),
        ..Limits::default()
    }
}

/// Runs `text` with `input` and `limits` on a unit thread (big stack), returning the report.
fn run_with(sandbox: &Sandbox, text: &str, input: &[u8], limits: Limits) -> UnitReport {
    let metering = if limits.fuel.is_some() {
        Metering::Fuel
    } else {
        Metering::Off
    };
    let module = match sandbox.prepare(&wasm(text), metering) {
        Ok(m) => m,
        Err(e) => panic!("module should prepare, got {e}"),
    };
    let executor = Executor::new(sandbox.clone(), 1, 1).expect("executor starts");
    let mut request = UnitRequest::new(input.to_vec());
    request.limits = limits;
    executor.run(module, request)
}

fn run(sandbox: &Sandbox, text: &str) -> UnitReport {
    run_with(sandbox, text, b"", limits())
}

const SPIN: &str = r#"(module (memory (export "memory") 1)
    (func (export "run") (result i32) (loop $l (br $l)) i32.const 0))"#;

const MEMORY_BOMB: &str = r#"(module (memory (export "memory") 1)
    (func (export "run") (result i32)
      (loop $l (drop (memory.grow (i32.const 256))) (br $l))
      i32.const 0))"#;

const HUGE_INITIAL_MEMORY: &str = r#"(module (memory (export "memory") 60000)
    (func (export "run") (result i32) i32.const 0))"#;

const RECURSION: &str = r#"(module (memory (export "memory") 1)
    (func $f (param i64) (result i64)
      (i64.add (call $f (i64.add (local.get 0) (i64.const 1))) (i64.const 1)))
    (func (export "run") (result i32) (drop (call $f (i64.const 0))) i32.const 0))"#;

const OUTPUT_FLOOD: &str = r#"(module
    (import "cf1" "output_write" (func $w (param i32 i32)))
    (memory (export "memory") 1)
    (func (export "run") (result i32) (loop $l (call $w (i32.const 0) (i32.const 65536)) (br $l)) i32.const 0))"#;

const LOG_FLOOD: &str = r#"(module
    (import "cf1" "log" (func $log (param i32 i32 i32)))
    (memory (export "memory") 1)
    (data (i32.const 0) "flooding the log, line after line, until the host stops keeping them")
    (func (export "run") (result i32) (local $i i32)
      (loop $l
        (call $log (i32.const 2) (i32.const 0) (i32.const 68))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br_if $l (i32.lt_u (local.get $i) (i32.const 100000))))
      i32.const 0))"#;

/// Reports progress 200,000 times, never reaching the total.
const PROGRESS_FLOOD: &str = r#"(module
    (import "cf1" "progress" (func $p (param i64 i64)))
    (memory (export "memory") 1)
    (func (export "run") (result i32) (local $i i64)
      (loop $l
        (local.set $i (i64.add (local.get $i) (i64.const 1)))
        (call $p (local.get $i) (i64.const 1000000))
        (br_if $l (i64.lt_u (local.get $i) (i64.const 200000))))
      i32.const 0))"#;

/// Alternates complete (`done == total`) and incomplete reports, 200,000 of them: a guest that
/// tries to slip past the rate limit by completing its work over and over.
const PROGRESS_FLOOD_COMPLETE: &str = r#"(module
    (import "cf1" "progress" (func $p (param i64 i64)))
    (memory (export "memory") 1)
    (func (export "run") (result i32) (local $i i64)
      (loop $l
        (local.set $i (i64.add (local.get $i) (i64.const 1)))
        (call $p (local.get $i)
          (i64.add (local.get $i) (i64.and (i64.add (local.get $i) (i64.const 1)) (i64.const 1))))
        (br_if $l (i64.lt_u (local.get $i) (i64.const 200000))))
      i32.const 0))"#;

const FAIL: &str = r#"(module
    (import "cf1" "fail" (func $fail (param i32 i32 i32)))
    (memory (export "memory") 1)
    (data (i32.const 16) "the sky is falling")
    (func (export "run") (result i32) (call $fail (i32.const 42) (i32.const 16) (i32.const 18)) i32.const 0))"#;

const BAD_POINTER: &str = r#"(module
    (import "cf1" "output_write" (func $w (param i32 i32)))
    (memory (export "memory") 1)
    (func (export "run") (result i32) (call $w (i32.const 65530) (i32.const 100)) i32.const 0))"#;

const NEGATIVE_LENGTH: &str = r#"(module
    (import "cf1" "input_read" (func $r (param i32 i32 i32) (result i32)))
    (memory (export "memory") 1)
    (func (export "run") (result i32) (drop (call $r (i32.const 0) (i32.const 0) (i32.const -1))) i32.const 0))"#;

const UNREACHABLE: &str = r#"(module (memory (export "memory") 1)
    (func (export "run") (result i32) unreachable))"#;

const DIVIDE_BY_ZERO: &str = r#"(module (memory (export "memory") 1)
    (func (export "run") (result i32) (i32.div_u (i32.const 1) (i32.const 0))))"#;

const NONZERO_EXIT: &str = r#"(module (memory (export "memory") 1)
    (func (export "run") (result i32) i32.const 9))"#;

const CHECKPOINT_BOMB: &str = r#"(module
    (import "cf1" "checkpoint_save" (func $save (param i32 i32)))
    (memory (export "memory") 1)
    (func (export "run") (result i32) (call $save (i32.const 0) (i32.const 65536)) i32.const 0))"#;

/// Writes the bit patterns of NaNs produced from a NaN with a payload and sign: without
/// canonicalisation x86 keeps the payload and sign, other machines do not.
const NAN_BITS: &str = r#"(module
    (import "cf1" "output_write" (func $w (param i32 i32)))
    (memory (export "memory") 1)
    (func (export "run") (result i32)
      (i32.store (i32.const 0)
        (i32.reinterpret_f32 (f32.add (f32.reinterpret_i32 (i32.const 0xFFC12345)) (f32.const 1))))
      (i64.store (i32.const 4)
        (i64.reinterpret_f64 (f64.mul (f64.reinterpret_i64 (i64.const 0xFFF8000000ABCDEF)) (f64.const 2))))
      (i32.store (i32.const 12)
        (i32.reinterpret_f32 (f32.sub (f32.const inf) (f32.const inf))))
      (v128.store (i32.const 16)
        (f32x4.add (v128.const i32x4 0xFFC12345 0x7FC00001 0xFFFFFFFF 0x7F800001) (v128.const f32x4 1 1 1 1)))
      (call $w (i32.const 0) (i32.const 32))
      i32.const 0))"#;

/// Every way a NaN's bits can leave float arithmetic, each written as a 64-bit word; `$nan`
/// is `0 / 0`, which x86 makes the *negative* quiet NaN. A NaN with a payload that only moves
/// (load, parameter, return, local) must keep its payload, as the specification says.
const NAN_EXITS: &str = r#"(module
    (import "cf1" "output_write" (func $w (param i32 i32)))
    (memory (export "memory") 1)
    (global $g (mut f64) (f64.const 0))
    (func $nan (result f64) (f64.div (f64.const 0) (f64.const 0)))
    (func $bits (param f64) (result i64) (i64.reinterpret_f64 (local.get 0)))
    (func $id (param f64) (result f64) (local.get 0))
    (func $put (param $at i32) (param $v i64) (i64.store (local.get $at) (local.get $v)))
    (func (export "run") (result i32) (local $x f64) (local $y f64)
      ;; 0: stored as an f64
      (f64.store (i32.const 0) (f64.div (f64.const 0) (f64.const 0)))
      ;; 8: returned from a function, then reinterpreted
      (call $put (i32.const 8) (i64.reinterpret_f64 (call $nan)))
      ;; 16: passed as an argument
      (call $put (i32.const 16) (call $bits (f64.sqrt (f64.const -1))))
      ;; 24: through a global
      (global.set $g (f64.mul (f64.const inf) (f64.const 0)))
      (call $put (i32.const 24) (i64.reinterpret_f64 (global.get $g)))
      ;; 32: the sign of a NaN given to copysign
      (f64.store (i32.const 32) (f64.copysign (f64.const 1) (call $nan)))
      (f64.store (i32.const 32) (f64.copysign (f64.const 1) (f64.div (f64.const 0) (f64.const 0))))
      ;; 40: negated (the sign bit flips on the canonical NaN)
      (f64.store (i32.const 40) (f64.neg (f64.sub (f64.const inf) (f64.const inf))))
      ;; 48: a block's result
      (call $put (i32.const 48) (i64.reinterpret_f64 (block (result f64) (f64.div (f64.const 0) (f64.const 0)))))
      ;; 56 and 64: splat into a vector
      (v128.store (i32.const 56) (f64x2.splat (f64.div (f64.const 0) (f64.const 0))))
      ;; 72: a local that holds an arithmetic NaN across a loop
      (local.set $x (f64.const 1))
      (loop $l
        (local.set $x (f64.sub (local.get $x) (f64.const inf)))
        (local.set $x (f64.mul (local.get $x) (f64.const 0)))
        (br_if $l (f64.eq (local.get $x) (local.get $x))))
      (f64.store (i32.const 72) (local.get $x))
      ;; 80: a payload NaN loaded, passed through a function and a local, stored again
      (i64.store (i32.const 200) (i64.const 0xfff4000000000123))
      (local.set $y (call $id (f64.load (i32.const 200))))
      (f64.store (i32.const 80) (local.get $y))
      ;; 88: f32 arithmetic, promoted
      (f64.store (i32.const 88) (f64.promote_f32 (f32.div (f32.const 0) (f32.const 0))))
      (call $w (i32.const 0) (i32.const 96))
      i32.const 0))"#;

/// The words [`NAN_EXITS`] writes.
fn nan_exit_words(report: &UnitReport) -> Vec<u64> {
    let out = report.result.as_ref().expect("runs");
    out.chunks_exact(8)
        .map(|w| u64::from_le_bytes(w.try_into().unwrap()))
        .collect()
}

#[test]
fn nans_stay_canonical_through_every_way_out() {
    const CANONICAL: u64 = 0x7ff8_0000_0000_0000;
    let words = nan_exit_words(&run(&sandbox(), NAN_EXITS));
    let expected = [
        CANONICAL,
        CANONICAL,
        CANONICAL,
        CANONICAL,
        1f64.to_bits(),
        CANONICAL | 1 << 63,
        CANONICAL,
        CANONICAL,
        CANONICAL,
        CANONICAL,
        0xfff4_0000_0000_0123,
        CANONICAL,
    ];
    for (at, (got, want)) in words.iter().zip(expected).enumerate() {
        assert_eq!(*got, want, "word {at}: {got:#018x}, expected {want:#018x}");
    }
    assert_eq!(words.len(), expected.len());
}

#[test]
fn without_canonicalisation_machines_show_their_own_nans() {
    // The same module on the raw engine: x86 makes negative NaNs and Arm positive ones, so
    // without the rewrite the two would disagree on words 0 and 4, and the test above would
    // fail on x86.
    let raw = Sandbox::new(SandboxConfig {
        canonicalize_nans: false,
        ..SandboxConfig::default()
    })
    .expect("sandbox starts");
    let words = nan_exit_words(&run(&raw, NAN_EXITS));
    if cfg!(target_arch = "x86_64") {
        assert_eq!(words[0], 0xfff8_0000_0000_0000);
        assert_eq!(words[4], (-1f64).to_bits(), "copysign takes x86's sign");
    } else if cfg!(target_arch = "aarch64") {
        assert_eq!(words[0], 0x7ff8_0000_0000_0000);
        assert_eq!(words[4], 1f64.to_bits(), "copysign takes Arm's sign");
    }
    assert_eq!(
        words[10], 0xfff4_0000_0000_0123,
        "payloads survive moves either way"
    );
}

fn expect_err(report: &UnitReport) -> &UnitError {
    match &report.result {
        Ok(out) => panic!("expected a failure, got {} output bytes", out.len()),
        Err(e) => e,
    }
}

#[test]
fn infinite_loop_times_out_in_bounded_time() {
    let sandbox = sandbox();
    let started = Instant::now();
    let report = run_with(
        &sandbox,
        SPIN,
        b"",
        Limits {
            timeout: Duration::from_millis(200),
            ..limits()
        },
    );
    let err = expect_err(&report);
    assert!(matches!(err, UnitError::Timeout { .. }), "{err}");
    assert_eq!(err.class(), OutcomeClass::HostFailure);
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[test]
fn an_aborted_unit_stops_in_process_and_its_timeout_still_holds() {
    let sandbox = sandbox();
    let module = sandbox
        .prepare(&wasm(SPIN), Metering::Off)
        .expect("prepares");
    let executor = Executor::new(sandbox.clone(), 1, 1).expect("executor starts");
    let abort = Abort::new();
    let mut request = UnitRequest::new(Vec::new());
    request.limits = Limits {
        timeout: Duration::from_secs(60),
        ..limits()
    };
    request.abort = Some(abort.clone());
    let stopper = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(200));
        abort.abort();
        Instant::now()
    });
    let report = executor.run(module.clone(), request);
    let stopped = Instant::now();
    let asked = stopper.join().expect("stopper");
    assert_eq!(expect_err(&report), &aborted_error());
    assert!(
        stopped.duration_since(asked) < Duration::from_secs(1),
        "stopped {:?} after it was asked to",
        stopped.duration_since(asked)
    );
    // A unit that may be aborted but is not still times out at its limit.
    let started = Instant::now();
    let mut request = UnitRequest::new(Vec::new());
    request.limits = Limits {
        timeout: Duration::from_millis(200),
        ..limits()
    };
    request.abort = Some(Abort::new());
    let report = executor.run(module, request);
    assert!(matches!(expect_err(&report), UnitError::Timeout { .. }));
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(200) && took < Duration::from_secs(10),
        "{took:?}"
    );
}

#[test]
fn memory_bomb_hits_the_memory_limit_deterministically() {
    let sandbox = sandbox();
    let cap = 32 << 20;
    for text in [MEMORY_BOMB, HUGE_INITIAL_MEMORY] {
        let report = run_with(
            &sandbox,
            text,
            b"",
            Limits {
                memory_bytes: cap,
                ..limits()
            },
        );
        let err = expect_err(&report);
        assert!(
            matches!(err, UnitError::MemoryLimit { cap: c, requested } if *c == cap && *requested > cap),
            "{err}"
        );
        assert_eq!(err.class(), OutcomeClass::Deterministic);
    }
}

#[test]
fn deep_recursion_is_a_host_failure() {
    let report = run(&sandbox(), RECURSION);
    let err = expect_err(&report);
    assert_eq!(err, &UnitError::StackOverflow);
    assert_eq!(err.class(), OutcomeClass::HostFailure);
}

#[test]
fn forbidden_imports_are_refused_before_compiling() {
    let sandbox = sandbox();
    for text in [
        r#"(module (import "wasi_snapshot_preview1" "path_unlink_file" (func (param i32 i32 i32) (result i32)))
            (memory (export "memory") 1) (func (export "run") (result i32) i32.const 0))"#,
        r#"(module (import "cf1" "now" (func (result i64)))
            (memory (export "memory") 1) (func (export "run") (result i32) i32.const 0))"#,
        r#"(module (import "env" "memory" (memory 1)) (func (export "run") (result i32) i32.const 0))"#,
    ] {
        let bytes = wasm(text);
        let err = sandbox.prepare(&bytes, Metering::Off).unwrap_err();
        assert!(matches!(err, UnitError::ForbiddenImport { .. }), "{err}");
        assert_eq!(check_imports(&bytes), Err(err));
    }
    assert_eq!(sandbox.cache_stats().compiled, 0, "nothing was compiled");
}

#[test]
fn malformed_empty_and_oversized_modules_are_bad_modules() {
    let small = Sandbox::new(SandboxConfig {
        max_module_bytes: 1024,
        ..SandboxConfig::default()
    })
    .unwrap();
    let big = wasm(&format!(
        r#"(module (memory (export "memory") 1) (data (i32.const 0) "{}")
            (func (export "run") (result i32) i32.const 0))"#,
        "x".repeat(4096)
    ));
    assert!(matches!(
        small.prepare(&big, Metering::Off),
        Err(UnitError::ModuleTooLarge { cap: 1024, .. })
    ));

    let sandbox = sandbox();
    let cases: Vec<Vec<u8>> = vec![
        Vec::new(),
        b"\0asm".to_vec(),
        b"\0asm\x01\0\0\0\x01\x05\x01\x60\x00".to_vec(),
        b"hello, world".to_vec(),
        wasm("(module)"),
        wasm(r#"(module (func (export "run") (result i32) i32.const 0))"#),
        wasm(
            r#"(module (memory (export "memory") 1) (func (export "run") (param i32) (result i32) i32.const 0))"#,
        ),
        wasm(r#"(module (memory (export "memory") 1) (global (export "run") i32 (i32.const 0)))"#),
    ];
    for bytes in cases {
        let err = sandbox.prepare(&bytes, Metering::Off).unwrap_err();
        assert!(matches!(err, UnitError::BadModule { .. }), "{err}");
        assert_eq!(err.class(), OutcomeClass::Deterministic);
    }

    // Seeded random garbage, with and without a valid header.
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for round in 0..300 {
        let len = 1 + (round * 7) % 300;
        let mut bytes: Vec<u8> = (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        if round % 2 == 0 {
            bytes.splice(0..0, *b"\0asm\x01\0\0\0");
        }
        match sandbox.prepare(&bytes, Metering::Off) {
            Err(e) => assert!(e.is_module_refused(), "{e}"),
            Ok(_) => panic!("random bytes formed a runnable module"),
        }
    }
}

#[test]
fn module_with_a_too_big_table_is_refused() {
    let err = sandbox()
        .prepare(
            &wasm(r#"(module (table 200000 funcref) (memory (export "memory") 1) (func (export "run") (result i32) i32.const 0))"#),
            Metering::Off,
        )
        .unwrap_err();
    assert!(matches!(err, UnitError::BadModule { .. }), "{err}");
}

#[test]
fn output_flood_stops_at_the_cap() {
    let report = run_with(
        &sandbox(),
        OUTPUT_FLOOD,
        b"",
        Limits {
            output_bytes: 1 << 20,
            ..limits()
        },
    );
    assert_eq!(
        expect_err(&report),
        &UnitError::OutputTooLarge { cap: 1 << 20 }
    );
}

#[test]
fn log_flood_is_capped_and_the_unit_goes_on() {
    let report = run_with(
        &sandbox(),
        LOG_FLOOD,
        b"",
        Limits {
            log_bytes: 4096,
            ..limits()
        },
    );
    assert_eq!(report.result, Ok(Vec::new()));
    let kept: usize = report.logs.iter().map(|l| l.text.len()).sum();
    assert!(kept <= 4096 + 4, "kept {kept} bytes of logs");
    assert!(!report.logs.is_empty());
    assert_eq!(report.logs.len() as u64 + report.logs_dropped, 100_000);
}

/// Counts the progress reports an observer hears.
#[derive(Default)]
struct ProgressHeard(std::sync::Mutex<Vec<(u64, u64)>>);

impl coordinator_free::sandbox::UnitObserver for ProgressHeard {
    fn progress(&self, done: u64, total: u64) {
        self.0.lock().unwrap().push((done, total));
    }
}

#[test]
fn progress_flood_reaches_the_observer_at_a_bounded_rate() {
    let sandbox = sandbox();
    // (module, first report, last report, most reports per interval)
    let cases = [
        (PROGRESS_FLOOD, (1, 1_000_000), (200_000, 1_000_000), 1),
        (PROGRESS_FLOOD_COMPLETE, (1, 1), (200_000, 200_001), 2),
    ];
    for (wat, first, last, per_interval) in cases {
        let module = sandbox.prepare(&wasm(wat), Metering::Off).unwrap();
        let heard = Arc::new(ProgressHeard::default());
        let mut request = UnitRequest::new(Vec::new());
        request.limits = limits();
        request.observer = Some(heard.clone());
        let started = Instant::now();
        let report = sandbox.run(&module, request);
        let elapsed = started.elapsed();
        assert_eq!(report.result, Ok(Vec::new()));
        // The report keeps the last value; the observer hears the first report and a bounded
        // number per interval after it.
        assert_eq!(report.progress, Some(last));
        let heard = heard.0.lock().unwrap().clone();
        let bound = per_interval * (1 + elapsed.as_millis() / PROGRESS_INTERVAL.as_millis());
        assert_eq!(heard.first(), Some(&first));
        assert!(
            heard.len() as u128 <= bound,
            "{} reports in {elapsed:?}",
            heard.len()
        );
    }
}

#[test]
fn guest_failures_traps_and_abi_violations_are_typed() {
    let sandbox = sandbox();
    let cases: Vec<(&str, UnitError)> = vec![
        (
            FAIL,
            UnitError::GuestFailure {
                code: 42,
                message: "the sky is falling".into(),
            },
        ),
        (
            NONZERO_EXIT,
            UnitError::GuestFailure {
                code: 9,
                message: String::new(),
            },
        ),
        (
            UNREACHABLE,
            UnitError::Trap {
                kind: TrapKind::Unreachable,
            },
        ),
        (
            DIVIDE_BY_ZERO,
            UnitError::Trap {
                kind: TrapKind::IntegerDivisionByZero,
            },
        ),
        (
            BAD_POINTER,
            UnitError::Trap {
                kind: TrapKind::AbiViolation,
            },
        ),
        (
            NEGATIVE_LENGTH,
            UnitError::Trap {
                kind: TrapKind::AbiViolation,
            },
        ),
    ];
    for (text, expected) in cases {
        let report = run(&sandbox, text);
        assert_eq!(expect_err(&report), &expected);
        assert_eq!(expected.class(), OutcomeClass::Deterministic);
    }
    let report = run_with(
        &sandbox,
        CHECKPOINT_BOMB,
        b"",
        Limits {
            checkpoint_bytes: 1000,
            ..limits()
        },
    );
    assert_eq!(
        expect_err(&report),
        &UnitError::CheckpointTooLarge {
            size: 65536,
            cap: 1000
        }
    );
}

#[test]
fn nans_are_canonical_as_seen_from_the_guest() {
    let report = run(&sandbox(), NAN_BITS);
    let out = report.result.expect("runs");
    let word = |at: usize| u32::from_le_bytes(out[at..at + 4].try_into().unwrap());
    let canonical32 = 0x7FC0_0000;
    assert_eq!(word(0), canonical32, "f32.add of a NaN with payload");
    assert_eq!(
        u64::from_le_bytes(out[4..12].try_into().unwrap()),
        0x7FF8_0000_0000_0000,
        "f64.mul of a NaN with payload"
    );
    assert_eq!(word(12), canonical32, "inf - inf");
    for lane in 0..4 {
        assert_eq!(word(16 + lane * 4), canonical32, "f32x4 lane {lane}");
    }
}

#[test]
fn fuel_runs_out_deterministically_and_does_not_change_results() {
    let sandbox = sandbox();
    let fueled = |budget| Limits {
        fuel: Some(budget),
        ..limits()
    };
    let report = run_with(&sandbox, SPIN, b"", fueled(100_000));
    assert_eq!(
        expect_err(&report),
        &UnitError::OutOfFuel { budget: 100_000 }
    );
    assert_eq!(report.fuel_consumed, Some(100_000));

    let a = run_with(&sandbox, NAN_BITS, b"", fueled(1_000_000));
    let b = run_with(&sandbox, NAN_BITS, b"", fueled(1_000_000));
    let plain = run(&sandbox, NAN_BITS);
    assert!(a.fuel_consumed.unwrap() > 0);
    assert_eq!(a.fuel_consumed, b.fuel_consumed);
    assert_eq!(a.result, plain.result);
    assert_eq!(b.result, plain.result);
}

#[test]
fn disk_cache_is_reused_across_sandboxes() {
    let dir = tempfile::tempdir().unwrap();
    let config = SandboxConfig {
        cache_dir: Some(dir.path().to_owned()),
        ..SandboxConfig::default()
    };
    let bytes = wasm(NAN_BITS);
    let first = Sandbox::new(config.clone()).unwrap();
    let (module, source) = first.prepare_traced(&bytes, Metering::Off).unwrap();
    assert_eq!(source, ModuleSource::Compiled);
    let (again, source) = first.prepare_traced(&bytes, Metering::Off).unwrap();
    assert_eq!(source, ModuleSource::Memory);
    assert!(Arc::ptr_eq(&module, &again));

    let second = Sandbox::new(config).unwrap();
    let (_, source) = second.prepare_traced(&bytes, Metering::Off).unwrap();
    assert_eq!(source, ModuleSource::Disk);
    assert_eq!(second.cache_stats().compiled, 0);
    assert_eq!(run(&first, NAN_BITS).result, run(&second, NAN_BITS).result);
}

#[test]
fn sandboxes_sharing_a_cache_compile_a_module_once() {
    // As a peer's unit hosts do when a new job arrives: all ask for the module at once.
    let dir = tempfile::tempdir().unwrap();
    let config = SandboxConfig {
        cache_dir: Some(dir.path().to_owned()),
        ..SandboxConfig::default()
    };
    let bytes = wasm(NAN_EXITS);
    let sandboxes: Vec<Sandbox> = (0..4)
        .map(|_| Sandbox::new(config.clone()).unwrap())
        .collect();
    let start = std::sync::Barrier::new(sandboxes.len());
    let sources: Vec<ModuleSource> = std::thread::scope(|scope| {
        let handles: Vec<_> = sandboxes
            .iter()
            .map(|sandbox| {
                let (start, bytes) = (&start, &bytes);
                scope.spawn(move || {
                    start.wait();
                    sandbox.prepare_traced(bytes, Metering::Off).unwrap().1
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let compiled: u64 = sandboxes.iter().map(|s| s.cache_stats().compiled).sum();
    assert_eq!(compiled, 1, "sources: {sources:?}");
    assert_eq!(
        sources.iter().filter(|s| **s == ModuleSource::Disk).count(),
        3
    );
}

#[test]
fn executor_queue_is_bounded() {
    let sandbox = sandbox();
    let module = sandbox.prepare(&wasm(SPIN), Metering::Off).unwrap();
    let executor = Executor::new(sandbox, 1, 1).unwrap();
    let request = || {
        let mut r = UnitRequest::new(Vec::new());
        r.limits.timeout = Duration::from_millis(300);
        r
    };
    let (send, receive) = std::sync::mpsc::channel();
    let mut accepted = 0;
    let mut busy = 0;
    for _ in 0..5 {
        let send = send.clone();
        match executor.try_submit(module.clone(), request(), move |r| {
            let _ = send.send(r);
        }) {
            Ok(()) => accepted += 1,
            Err(ExecutorBusy) => busy += 1,
        }
    }
    // One running and one queued at most; the rest are refused, not stored.
    assert!(accepted <= 2, "accepted {accepted}");
    assert!(busy >= 3, "refused {busy}");
    for _ in 0..accepted {
        let report = receive.recv_timeout(Duration::from_secs(20)).unwrap();
        assert!(matches!(report.result, Err(UnitError::Timeout { .. })));
    }
}

/// Every hostile case, round after round, in one process: the process, the sandbox and its
/// threads survive all of them and keep giving the same answers.
#[test]
fn the_process_survives_every_hostile_module_many_times() {
    let sandbox = sandbox();
    let executor = Executor::new(sandbox.clone(), 2, 4).unwrap();
    let limits = Limits {
        memory_bytes: 16 << 20,
        output_bytes: 256 << 10,
        log_bytes: 1024,
        ..limits()
    };
    // Only the spinning module is meant to meet its deadline; the others get a clock generous
    // enough for a loaded machine, so their outcomes cannot depend on timing.
    let cases = [
        (SPIN, Duration::from_millis(100)),
        (MEMORY_BOMB, limits.timeout),
        (HUGE_INITIAL_MEMORY, limits.timeout),
        (RECURSION, limits.timeout),
        (OUTPUT_FLOOD, limits.timeout),
        (LOG_FLOOD, limits.timeout),
        (FAIL, limits.timeout),
        (BAD_POINTER, limits.timeout),
        (UNREACHABLE, limits.timeout),
        (DIVIDE_BY_ZERO, limits.timeout),
        (NAN_BITS, limits.timeout),
    ];
    let mut first: Vec<Result<Vec<u8>, UnitError>> = Vec::new();
    for round in 0..8 {
        for (i, (text, timeout)) in cases.iter().enumerate() {
            let module = sandbox.prepare(&wasm(text), Metering::Off).unwrap();
            let mut request = UnitRequest::new(Vec::new());
            request.limits = Limits {
                timeout: *timeout,
                ..limits.clone()
            };
            let report = executor.run(module, request);
            if round == 0 {
                first.push(report.result);
            } else {
                assert_eq!(report.result, first[i], "case {i} changed in round {round}");
            }
        }
    }
    assert_eq!(sandbox.cache_stats().compiled, cases.len() as u64);
}

#[test]
fn text_from_a_module_is_escaped_and_bounded_where_it_is_made() {
    let sandbox = sandbox();
    // A forbidden import with a 100,000-byte name: the error still fits any report.
    let name = "x".repeat(100_000);
    let text = format!(
        r#"(module (import "env" "{name}" (func)) (memory (export "memory") 1)
            (func (export "run") (result i32) i32.const 0))"#
    );
    let err = sandbox.prepare(&wasm(&text), Metering::Off).unwrap_err();
    assert!(matches!(err, UnitError::ForbiddenImport { .. }), "{err}");
    assert!(
        err.to_string().len() <= 2048,
        "{} bytes",
        err.to_string().len()
    );

    // Escape sequences, carriage returns and NULs in a log line and a failure message reach
    // the observer as visible escapes.
    let report = run(
        &sandbox,
        r#"(module
            (import "cf1" "log" (func $log (param i32 i32 i32)))
            (import "cf1" "fail" (func $fail (param i32 i32 i32)))
            (memory (export "memory") 1)
            (data (i32.const 0) "\1b[2Jcleared\0d\00")
            (func (export "run") (result i32)
              (call $log (i32.const 2) (i32.const 0) (i32.const 13))
              (call $fail (i32.const 1) (i32.const 0) (i32.const 13))
              i32.const 0))"#,
    );
    let line = &report.logs.first().expect("one log line").text;
    assert!(!line.chars().any(char::is_control), "{line:?}");
    assert!(line.contains("\\u{1b}[2Jcleared\\r\\u{0}"), "{line:?}");
    match &report.result {
        Err(UnitError::GuestFailure { message, .. }) => {
            assert!(!message.chars().any(char::is_control), "{message:?}");
        }
        other => panic!("expected a guest failure, got {other:?}"),
    }
}
