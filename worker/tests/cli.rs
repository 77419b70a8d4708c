//! `worker exec` and `worker demo` as a user runs them: real processes, exact stdout bytes, one
//! line on stderr for any failure, and the documented exit codes.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

fn worker(data_dir: &Path, args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_worker"))
        .args(args)
        .arg("--data-dir")
        .arg(data_dir)
        .env_remove("WORKER_LOG")
        .env("RUST_BACKTRACE", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("worker starts");
    let mut pipe = child.stdin.take().expect("stdin is piped");
    if let Some(bytes) = stdin {
        pipe.write_all(bytes).expect("stdin takes the input");
    }
    drop(pipe);
    child.wait_with_output().expect("worker finishes")
}

fn stderr_lines(output: &Output) -> Vec<String> {
    String::from_utf8_lossy(&output.stderr)
        .lines()
        .map(str::to_owned)
        .collect()
}

/// A failure: the expected exit code and exactly one stderr line that contains `needle`.
fn fails_with(output: &Output, code: i32, needle: &str) {
    let lines = stderr_lines(output);
    assert_eq!(output.status.code(), Some(code), "stderr: {lines:?}");
    assert_eq!(lines.len(), 1, "exactly one line: {lines:?}");
    assert!(
        lines[0].contains(needle),
        "{:?} should name {needle}",
        lines[0]
    );
    assert!(!lines[0].contains("stack backtrace"));
    assert!(output.stdout.is_empty());
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> String {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path.display().to_string()
}

#[test]
fn stdout_carries_exactly_the_output_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let input = write(dir.path(), "in.bin", b"\x00\x01binary\xffinput");
    let out = worker(
        dir.path(),
        &["exec", example_artifacts::REVERSE_WAT, "--input", &input],
        None,
    );
    assert!(out.status.success(), "{:?}", stderr_lines(&out));
    assert_eq!(out.stdout, b"tupni\xffyranib\x01\x00");

    let out = worker(
        dir.path(),
        &["exec", example_artifacts::PI, "--input", "-"],
        Some(br#"{"samples":100000,"seed":1}"#),
    );
    assert!(out.status.success(), "{:?}", stderr_lines(&out));
    let expected = serde_json::to_vec(&example_pi::compute(&example_pi::Input {
        samples: 100_000,
        seed: 1,
    }))
    .unwrap();
    assert_eq!(out.stdout, expected);
}

#[test]
fn every_failure_is_one_line_and_a_documented_exit_code() {
    let dir = tempfile::tempdir().unwrap();
    let faults = example_artifacts::FAULTS;
    let panic = worker(
        dir.path(),
        &["exec", faults, "--input", "-"],
        Some(br#"{"panic":"bad parameters"}"#),
    );
    fails_with(&panic, 4, "bad parameters");

    let spin = worker(
        dir.path(),
        &["exec", faults, "--input", "-", "--timeout", "0.2"],
        Some(br#"{"spin":true}"#),
    );
    fails_with(&spin, 5, "timeout");

    let memory = worker(
        dir.path(),
        &["exec", faults, "--input", "-", "--memory-mb", "32"],
        Some(br#"{"alloc_mb":100}"#),
    );
    fails_with(&memory, 4, "memory limit");

    let fuel = worker(
        dir.path(),
        &["exec", faults, "--input", "-", "--fuel", "1000"],
        Some(br#"{"spin":true}"#),
    );
    fails_with(&fuel, 4, "out of fuel");

    let wasi = write(
        dir.path(),
        "wasi.wat",
        br#"(module (import "wasi_snapshot_preview1" "sock_send" (func (param i32 i32 i32 i32 i32) (result i32)))
              (memory (export "memory") 1) (func (export "run") (result i32) i32.const 0))"#,
    );
    fails_with(
        &worker(dir.path(), &["exec", &wasi], None),
        3,
        "forbidden import",
    );

    let garbage = write(
        dir.path(),
        "garbage.wasm",
        b"\0asm\x01\0\0\0\xde\xad\xbe\xef",
    );
    fails_with(
        &worker(dir.path(), &["exec", &garbage], None),
        3,
        "bad module",
    );
    let empty = write(dir.path(), "empty.wasm", b"");
    fails_with(&worker(dir.path(), &["exec", &empty], None), 3, "empty");

    let missing = dir.path().join("missing.wasm").display().to_string();
    fails_with(
        &worker(dir.path(), &["exec", &missing], None),
        2,
        "cannot read",
    );
    fails_with(
        &worker(dir.path(), &["exec", faults, "--memory-mb", "999999"], None),
        2,
        "--memory-mb",
    );
    fails_with(
        &worker(dir.path(), &["exec", faults, "--timeout", "NaN"], None),
        2,
        "--timeout",
    );
}

#[test]
fn checkpoint_file_lets_an_interrupted_unit_resume() {
    let dir = tempfile::tempdir().unwrap();
    let primes = example_artifacts::PRIMES;
    let input = write(dir.path(), "range.json", br#"{"start":0,"end":100000000}"#);
    let checkpoint = dir.path().join("primes.ckpt").display().to_string();

    let straight = worker(dir.path(), &["exec", primes, "--input", &input], None);
    assert!(straight.status.success());

    // A budget that ends the run after a checkpointed batch or two (each batch is 16 segments
    // of 2^20 numbers; the whole range needs about three times this budget).
    let interrupted = worker(
        dir.path(),
        &[
            "exec",
            primes,
            "--input",
            &input,
            "--fuel",
            "300000000",
            "--checkpoint",
            &checkpoint,
        ],
        None,
    );
    fails_with(&interrupted, 4, "out of fuel");
    let saved: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&checkpoint).expect("the checkpoint was kept"))
            .expect("the checkpoint is the unit's JSON state");
    let next = saved["next"]
        .as_u64()
        .expect("the checkpoint says where to resume");
    assert!(
        0 < next && next < 100_000_000,
        "the run stopped midway: {saved}"
    );

    let resumed = worker(
        dir.path(),
        &[
            "exec",
            primes,
            "--input",
            &input,
            "--checkpoint",
            &checkpoint,
        ],
        None,
    );
    assert!(resumed.status.success(), "{:?}", stderr_lines(&resumed));
    assert_eq!(resumed.stdout, straight.stdout);
}

/// Runs `worker demo ARGS` in a directory of its own; its stdout, once it succeeded.
fn demo(args: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_worker"))
        .arg("demo")
        .args(args)
        .current_dir(dir.path())
        .output()
        .expect("demo runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{stdout}");
    stdout
}

#[test]
fn demo_accepts_every_unit() {
    let stdout = demo(&[]);
    assert!(stdout.contains("16/16 units accepted"), "{stdout}");
    assert!(stdout.contains("on 3 peers"), "{stdout}");
}

#[test]
fn demo_on_the_overlay_accepts_every_unit() {
    let stdout = demo(&["--discovery", "overlay", "--peers", "4"]);
    assert!(stdout.contains("16/16 units accepted"), "{stdout}");
    assert!(stdout.contains("on 4 peers"), "{stdout}");
}

#[test]
fn demo_outvotes_and_names_a_lying_peer() {
    let stdout = demo(&["--liar"]);
    assert!(stdout.contains("16/16 units accepted"), "{stdout}");
    assert!(
        stdout.contains("dissent: peer 4 (alters its outputs)"),
        "{stdout}"
    );
    // No unit is accepted on the altered bytes: the liar never appears among those who agreed.
    for line in stdout.lines().filter(|l| l.contains("accepted  ")) {
        let agreed = line.split("accepted  ").nth(1).unwrap_or("");
        let agreed = agreed.split("; outvoted").next().unwrap_or("");
        assert!(!agreed.contains("peer 4"), "{line}");
    }
}
