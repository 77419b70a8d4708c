//! Programs built for WASI run unchanged through the sandbox's deterministic WASI subset: a
//! plain Rust `std` program (`example-stats`, built for `wasm32-wasip1`) agrees with the same
//! code run natively, and each WASI function of the subset behaves as `docs/guest-abi.md` says.

use std::time::Duration;

use coordinator_free::sandbox::{
    Executor, Limits, Metering, Program, Sandbox, SandboxConfig, UnitError, UnitReport, UnitRequest,
};
use example_artifacts as artifacts;

fn run(wasm: &[u8], input: &[u8]) -> UnitReport {
    let sandbox = Sandbox::new(SandboxConfig::default()).expect("sandbox starts");
    let module = sandbox
        .prepare(wasm, Metering::Off)
        .unwrap_or_else(|e| panic!("module refused: {e}"));
    let executor = Executor::new(sandbox.clone(), 1, 1).expect("executor starts");
    let mut request = UnitRequest::new(input.to_vec());
    request.limits = Limits {
        timeout: Duration::from_secs(20),
        output_bytes: 4096,
        ..Limits::default()
    };
    executor.run(module, request)
}

fn wat(text: &str) -> Vec<u8> {
    wat::parse_str(text).expect("valid test module")
}

fn output(report: &UnitReport) -> &[u8] {
    match &report.result {
        Ok(bytes) => bytes,
        Err(e) => panic!("unit failed: {e}; logs {:?}", report.logs),
    }
}

#[test]
fn a_rust_std_program_agrees_with_native_and_with_itself() {
    let inputs: [&[u8]; 4] = [
        b"1 2 3 4 4",
        b"0.1\n0.2\n0.3\n-7.5e3\n",
        b"3.141592653589793 2.718281828459045 1.4142135623730951 3.141592653589793",
        &[b'9'; 1][..],
    ];
    for input in inputs {
        let text = std::str::from_utf8(input).unwrap();
        let (native, n) = example_stats::summarize(text).expect("numbers");
        let first = run(artifacts::STATS_WASI_BYTES, input);
        assert_eq!(
            String::from_utf8_lossy(output(&first)),
            native,
            "sandbox and native disagree on {text:?}"
        );
        // stderr is the unit's log.
        assert_eq!(first.logs.len(), 1, "{:?}", first.logs);
        assert_eq!(first.logs[0].text, format!("{n} numbers"));
        // The HashMap's seed comes from random_get: the same input gives the same run.
        let again = run(artifacts::STATS_WASI_BYTES, input);
        assert_eq!(output(&first), output(&again));
    }
    // The same bytes on every architecture: fixed here, checked on x86-64 and aarch64.
    assert_eq!(
        String::from_utf8_lossy(output(&run(artifacts::STATS_WASI_BYTES, b"1 2 3 4 4 0.1"))),
        "{\"n\":6,\"distinct\":5,\"mean\":2.35,\"variance\":2.1458333333333335,\"min\":0.1,\"max\":4.0}\n"
    );
    // A large input, read by stdin in many pieces.
    let big: String = (0..20_000)
        .map(|i| format!("{} ", (i * 37) % 1001))
        .collect();
    let (native, _) = example_stats::summarize(&big).unwrap();
    assert_eq!(
        String::from_utf8_lossy(output(&run(artifacts::STATS_WASI_BYTES, big.as_bytes()))),
        native
    );
}

#[test]
fn a_nonzero_exit_is_a_guest_failure_with_its_code() {
    for (input, code) in [(&b""[..], 2), (b"1 two 3", 3)] {
        let report = run(artifacts::STATS_WASI_BYTES, input);
        match &report.result {
            Err(UnitError::GuestFailure { code: got, .. }) => assert_eq!(*got, code),
            other => panic!("expected exit {code}, got {other:?}"),
        }
        assert!(
            report.logs[0].text.starts_with("no statistics"),
            "{:?}",
            report.logs
        );
    }
}

/// A WASI command that calls `$probe` (which leaves one i32 on the stack), writes that value
/// as 4 little-endian bytes to stdout, and exits with `$exit`.
fn probe(body: &str, exit: i32) -> Vec<u8> {
    wat(&format!(
        r#"(module
          (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
          (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
          (import "wasi_snapshot_preview1" "clock_time_get" (func $clock (param i32 i64 i32) (result i32)))
          (import "wasi_snapshot_preview1" "random_get" (func $random (param i32 i32) (result i32)))
          (import "wasi_snapshot_preview1" "fd_prestat_get" (func $prestat (param i32 i32) (result i32)))
          (import "wasi_snapshot_preview1" "path_open" (func $open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
          (import "wasi_snapshot_preview1" "fd_read" (func $fd_read (param i32 i32 i32 i32) (result i32)))
          (import "wasi_snapshot_preview1" "args_sizes_get" (func $args_sizes (param i32 i32) (result i32)))
          (import "wasi_snapshot_preview1" "args_get" (func $args_get (param i32 i32) (result i32)))
          (import "wasi_snapshot_preview1" "environ_sizes_get" (func $env_sizes (param i32 i32) (result i32)))
          (import "wasi_snapshot_preview1" "environ_get" (func $env_get (param i32 i32) (result i32)))
          (memory (export "memory") 1)
          (func $emit (param $ptr i32) (param $len i32)
            (i32.store (i32.const 0) (local.get $ptr))
            (i32.store (i32.const 4) (local.get $len))
            (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8))))
          (func (export "_start")
            {body}
            (call $exit (i32.const {exit}))))"#
    ))
}

#[test]
fn clocks_are_virtual_and_advance_a_microsecond_per_reading() {
    // Two real-time readings at 100 and 108, both emitted.
    let module = probe(
        r#"(drop (call $clock (i32.const 0) (i64.const 0) (i32.const 100)))
           (drop (call $clock (i32.const 1) (i64.const 0) (i32.const 108)))
           (drop (call $clock (i32.const 0) (i64.const 0) (i32.const 116)))
           (call $emit (i32.const 100) (i32.const 24))"#,
        0,
    );
    let out = output(&run(&module, b"")).to_vec();
    let read = |i: usize| u64::from_le_bytes(out[i * 8..i * 8 + 8].try_into().unwrap());
    assert_eq!(
        read(0),
        946_684_800_000_000_000 + 1_000,
        "2000-01-01 plus one tick"
    );
    assert_eq!(
        read(1),
        2_000,
        "the monotonic clock counts readings from zero"
    );
    assert_eq!(read(2), 946_684_800_000_000_000 + 3_000);
    assert_eq!(out, output(&run(&module, b"")), "the same on every run");
}

#[test]
fn random_bytes_are_a_function_of_the_input() {
    let module = probe(
        r#"(drop (call $random (i32.const 100) (i32.const 32)))
           (call $emit (i32.const 100) (i32.const 32))"#,
        0,
    );
    let a = output(&run(&module, b"input a")).to_vec();
    assert_eq!(a, output(&run(&module, b"input a")));
    assert_ne!(a, output(&run(&module, b"input b")));
    assert_ne!(a, vec![0u8; 32]);
}

#[test]
fn there_are_no_files_to_open() {
    // fd_prestat_get(3) is EBADF (no preopened directory), path_open is ENOTCAPABLE.
    let module = probe(
        r#"(i32.store (i32.const 100) (call $prestat (i32.const 3) (i32.const 200)))
           (i32.store (i32.const 104)
             (call $open (i32.const 3) (i32.const 0) (i32.const 300) (i32.const 4)
                         (i32.const 0) (i64.const 0) (i64.const 0) (i32.const 0) (i32.const 204)))
           (i32.store (i32.const 108) (call $fd_read (i32.const 3) (i32.const 0) (i32.const 1) (i32.const 204)))
           (call $emit (i32.const 100) (i32.const 12))"#,
        0,
    );
    let out = output(&run(&module, b"")).to_vec();
    let errno = |i: usize| u32::from_le_bytes(out[i * 4..i * 4 + 4].try_into().unwrap());
    assert_eq!((errno(0), errno(1), errno(2)), (8, 76, 8));
}

#[test]
fn exit_codes_output_caps_and_bad_pointers() {
    // proc_exit(0) after writing is a success with that output; proc_exit(5) a guest failure.
    let ok = probe("(call $emit (i32.const 0) (i32.const 4))", 0);
    assert_eq!(output(&run(&ok, b"")).len(), 4);
    let five = probe("(call $emit (i32.const 0) (i32.const 4))", 5);
    match run(&five, b"").result {
        Err(UnitError::GuestFailure { code: 5, .. }) => {}
        other => panic!("{other:?}"),
    }
    // Writing past the output cap (4096 here) ends the unit, as output_write does.
    let big = probe("(call $emit (i32.const 0) (i32.const 5000))", 0);
    assert!(matches!(
        run(&big, b"").result,
        Err(UnitError::OutputTooLarge { cap: 4096 })
    ));
    // An iovec pointing past memory is EFAULT (21), not a crash.
    let fault = probe(
        r#"(i32.store (i32.const 0) (i32.const 70000))
           (i32.store (i32.const 4) (i32.const 8))
           (i32.store (i32.const 100) (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))
           (call $emit (i32.const 100) (i32.const 4))"#,
        0,
    );
    assert_eq!(output(&run(&fault, b"")), 21u32.to_le_bytes());
}

#[test]
fn functions_outside_the_subset_are_refused_before_compiling() {
    let sandbox = Sandbox::new(SandboxConfig::default()).expect("sandbox starts");
    for name in [
        "sock_accept",
        "path_unlink_file",
        "poll_oneoff",
        "fd_readdir",
    ] {
        let module = wat(&format!(
            r#"(module (import "wasi_snapshot_preview1" "{name}" (func (param i32 i32 i32) (result i32)))
               (memory (export "memory") 1) (func (export "_start")))"#
        ));
        match sandbox.prepare(&module, Metering::Off) {
            Err(UnitError::ForbiddenImport { name: got, .. }) => assert_eq!(got, name),
            Err(other) => panic!("{name}: {other}"),
            Ok(_) => panic!("{name} was accepted"),
        }
    }
    assert_eq!(sandbox.cache_stats().compiled, 0);
}

/// `args` is `unit` and then the manifest's arguments, `environ` its variables, each string
/// NUL-terminated and each pointer where the program asked: a C program's `argv` and
/// `environ`, the same for every unit of a job.
#[test]
fn arguments_and_environment_come_from_the_job() {
    let module = probe(
        r#"
            ;; Counts and sizes at 16.., pointers at 1024 and 1536, strings at 2048 and 4096.
            (drop (call $args_sizes (i32.const 16) (i32.const 20)))
            (drop (call $env_sizes (i32.const 24) (i32.const 28)))
            (drop (call $args_get (i32.const 1024) (i32.const 2048)))
            (drop (call $env_get (i32.const 1536) (i32.const 4096)))
            (call $emit (i32.const 16) (i32.const 16))
            (call $emit (i32.const 1024) (i32.mul (i32.load (i32.const 16)) (i32.const 4)))
            (call $emit (i32.const 1536) (i32.mul (i32.load (i32.const 24)) (i32.const 4)))
            (call $emit (i32.const 2048) (i32.load (i32.const 20)))
            (call $emit (i32.const 4096) (i32.load (i32.const 28)))"#,
        0,
    );
    let run_with = |program: Program| {
        let sandbox = Sandbox::new(SandboxConfig::default()).expect("sandbox starts");
        let prepared = sandbox.prepare(&module, Metering::Off).expect("module");
        let executor = Executor::new(sandbox.clone(), 1, 1).expect("executor starts");
        let mut request = UnitRequest::new(Vec::new());
        request.limits = Limits {
            output_bytes: 4096,
            program,
            ..Limits::default()
        };
        let report = executor.run(prepared, request);
        output(&report).to_vec()
    };
    let le = |v: u32| v.to_le_bytes();
    let mut expected = Vec::new();
    for v in [3, 5 + 3 + 4, 2, 4 + 6] {
        expected.extend(le(v));
    }
    for p in [2048, 2053, 2056, 4096, 4100] {
        expected.extend(le(p));
    }
    expected.extend(b"unit\0-v\0a b\0K=v\0PATH=\0");
    let program = Program {
        args: vec!["-v".into(), "a b".into()],
        env: vec![("K".into(), "v".into()), ("PATH".into(), String::new())],
    };
    assert!(program.check().is_ok());
    assert_eq!(run_with(program), expected);
    // Without any: one argument, no environment.
    let mut bare = Vec::new();
    for v in [1, 5, 0, 0, 2048] {
        bare.extend(le(v));
    }
    bare.extend(b"unit\0");
    assert_eq!(run_with(Program::default()), bare);
    // Strings a C program could not receive are refused.
    for bad in [
        Program {
            args: vec!["a\0b".into()],
            ..Program::default()
        },
        Program {
            env: vec![("A=B".into(), "c".into())],
            ..Program::default()
        },
        Program {
            env: vec![("B".into(), "1".into()), ("A".into(), "2".into())],
            ..Program::default()
        },
    ] {
        assert!(bad.check().is_err(), "{bad:?}");
    }
}
