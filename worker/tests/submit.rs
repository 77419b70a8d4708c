//! `worker submit` on this machine alone: real processes, real unit hosts, results checked
//! against the native kernels, and a submitter killed with SIGKILL that resumes.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use serde_json::Value;

mod common;
use common::{Run, check_pi_line, count_before, finish};

fn spawn(dir: &Path, manifest: &Path, tag: &str) -> Child {
    common::spawn_local_submit(dir, manifest, "out", tag)
}

fn submit(dir: &Path, manifest: &Path, tag: &str) -> Run {
    finish(spawn(dir, manifest, tag), dir, tag, Duration::from_secs(30))
}

fn write_manifest(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("job.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn results(dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(dir.join("out/results.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("each line is JSON"))
        .collect()
}

#[test]
fn a_sweep_completes_with_the_native_results() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = write_manifest(
        dir.path(),
        &format!(
            r#"
name = "sir-small"
module = {:?}
[inputs.sweep]
beta = [0.1, 0.2, 0.3]
gamma = [0.05, 0.1, 0.2, 0.25]
population = 100000.0
initial_infected = 10.0
days = 120
steps_per_day = 4
[redundancy]
replicas = 2
"#,
            example_artifacts::SIR
        ),
    );
    let run = submit(dir.path(), &manifest, "run");
    assert_eq!(
        run.code,
        Some(0),
        "stdout {}\nstderr {}",
        run.stdout,
        run.stderr
    );
    assert!(
        run.stdout.contains("12 accepted, 0 failed, of 12"),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout.contains("not independent peers"),
        "{}",
        run.stdout
    );
    let lines = results(dir.path());
    assert_eq!(lines.len(), 12);
    let mut seen: Vec<u64> = Vec::new();
    for line in &lines {
        assert_eq!(line["status"], "accepted", "{line}");
        let input: example_sir::Input =
            serde_json::from_value(line["input"]["params"].clone()).unwrap();
        let expected = serde_json::to_value(example_sir::compute(&input)).unwrap();
        assert_eq!(line["output"], expected, "{line}");
        let agreed = line["agreed"].as_array().unwrap();
        assert_eq!(agreed.len(), 2, "{line}");
        assert_ne!(agreed[0], agreed[1], "distinct simulated peers");
        seen.push(line["index"].as_u64().unwrap());
    }
    seen.sort_unstable();
    assert_eq!(seen, (0..12).collect::<Vec<_>>());
}

#[test]
fn a_panicking_unit_fails_with_evidence_and_a_nonzero_exit() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("inputs.jsonl"),
        "{\"ok\": true}\n{\"panic\": \"boom\"}\n",
    )
    .unwrap();
    let manifest = write_manifest(
        dir.path(),
        &format!(
            "name = \"faults\"\nmodule = {:?}\n[inputs]\njsonl = \"inputs.jsonl\"\n",
            example_artifacts::FAULTS
        ),
    );
    let run = submit(dir.path(), &manifest, "run");
    assert_ne!(run.code, Some(0), "stdout {}", run.stdout);
    assert!(
        run.stdout.contains("1 accepted, 1 failed, of 2"),
        "{}",
        run.stdout
    );
    let lines = results(dir.path());
    assert_eq!(lines.len(), 2);
    let failed = lines.iter().find(|l| l["index"] == 1).unwrap();
    assert_eq!(failed["status"], "failed", "{failed}");
    assert!(
        failed["error"].as_str().unwrap().contains("boom"),
        "{failed}"
    );
    assert_eq!(failed["evidence"].as_array().unwrap().len(), 2, "{failed}");
    let ok = lines.iter().find(|l| l["index"] == 0).unwrap();
    assert_eq!(ok["status"], "accepted", "{ok}");
    assert_eq!(ok["output"]["ok"], true, "{ok}");
}

/// A module the sandbox refuses is refused by `submit` before anything runs, as `worker exec`
/// refuses it: exit 3, one line naming the cause, no results, no journaled job.
#[test]
fn a_module_the_sandbox_refuses_is_refused_up_front() {
    let cases: [(&str, &[u8], &str); 2] = [
        (
            "no-run.wat",
            br#"(module (memory (export "memory") 1) (func (export "start") (result i32) i32.const 0))"#,
            "run",
        ),
        (
            "wasi.wat",
            br#"(module (import "wasi_snapshot_preview1" "sock_send" (func (param i32 i32 i32 i32 i32) (result i32)))
                  (memory (export "memory") 1) (func (export "run") (result i32) i32.const 0))"#,
            "forbidden import",
        ),
    ];
    for (file, module, cause) in cases {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(file), module).unwrap();
        let manifest = write_manifest(
            dir.path(),
            &format!("name = \"refused\"\nmodule = {file:?}\n[inputs.sweep]\nx = [1, 2, 3]\n"),
        );
        let run = submit(dir.path(), &manifest, "run");
        assert_eq!(run.code, Some(3), "{file}: stderr {}", run.stderr);
        let lines: Vec<&str> = run.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{file}: one line: {lines:?}");
        assert!(lines[0].contains(cause), "{file}: {lines:?}");
        assert!(
            lines[0].contains(file),
            "{file}: names the module: {lines:?}"
        );
        assert!(!dir.path().join("out").exists(), "{file}: nothing ran");
        assert!(
            !dir.path().join("data").join("submit.redb").exists(),
            "{file}: no job was journaled"
        );
    }
}

/// The up-front check compiles into the data directory's module cache, which this machine's
/// unit hosts and the next submit share: checked once, a module is not compiled again. Here the
/// submit stops right after the check (`--cpus 0` with no network to run on).
#[test]
fn the_up_front_check_compiles_into_the_shared_module_cache() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = write_manifest(
        dir.path(),
        &format!(
            "name = \"cached\"\nmodule = {:?}\n[inputs.sweep]\nseed = [1, 2]\nsamples = 1000\n",
            example_artifacts::PI
        ),
    );
    let run = Command::new(env!("CARGO_BIN_EXE_worker"))
        .arg("submit")
        .arg(&manifest)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .args(["--cpus", "0", "--no-mdns"])
        .env_remove("WORKER_LOG")
        .output()
        .unwrap();
    assert_eq!(run.status.code(), Some(2), "{run:?}");
    let digest =
        coordinator_free::digest::Digest::of(&std::fs::read(example_artifacts::PI).unwrap())
            .to_hex();
    let artifacts: Vec<String> = walk(&dir.path().join("data").join("modules"))
        .into_iter()
        .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .filter(|n| n.ends_with(".cwasm"))
        .collect();
    assert_eq!(artifacts, vec![format!("{digest}.cwasm")], "{run:?}");
    assert!(!dir.path().join("out").exists(), "nothing ran");
}

/// Every file under `dir`.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else {
                files.push(path);
            }
        }
    }
    files
}

/// A plain Rust `std` program built for WASI runs as a job over a directory of files, each
/// result the same as the program's computation run natively.
#[test]
fn a_wasi_program_runs_as_a_job() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data-files");
    std::fs::create_dir(&data).unwrap();
    let texts = ["1 2 3 4 4", "0.5 0.25\n-3e2", "7"];
    for (i, text) in texts.iter().enumerate() {
        std::fs::write(data.join(format!("{i}.txt")), text).unwrap();
    }
    let manifest = write_manifest(
        dir.path(),
        &format!(
            "name = \"stats\"\nmodule = {:?}\n[inputs]\ndir = \"data-files/\"\n",
            example_artifacts::STATS_WASI
        ),
    );
    let run = submit(dir.path(), &manifest, "run");
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    let lines = results(dir.path());
    assert_eq!(lines.len(), texts.len());
    for (line, text) in lines.iter().zip(texts) {
        let (native, _) = example_stats::summarize(text).unwrap();
        let native: Value = serde_json::from_str(&native).unwrap();
        assert_eq!(line["status"], "accepted", "{line}");
        assert_eq!(line["output"], native, "{text:?}");
    }
}

/// The manifest's `[wasi]` arguments and environment reach the program on the unit hosts:
/// a program that writes out its `argv` and `environ` returns them.
#[test]
fn a_wasi_programs_arguments_come_from_the_manifest() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("args.wat"),
        r#"(module
          (import "wasi_snapshot_preview1" "args_sizes_get" (func $as (param i32 i32) (result i32)))
          (import "wasi_snapshot_preview1" "args_get" (func $ag (param i32 i32) (result i32)))
          (import "wasi_snapshot_preview1" "environ_sizes_get" (func $es (param i32 i32) (result i32)))
          (import "wasi_snapshot_preview1" "environ_get" (func $eg (param i32 i32) (result i32)))
          (import "wasi_snapshot_preview1" "fd_write" (func $w (param i32 i32 i32 i32) (result i32)))
          (memory (export "memory") 1)
          (func $emit (param $ptr i32) (param $len i32)
            (i32.store (i32.const 0) (local.get $ptr))
            (i32.store (i32.const 4) (local.get $len))
            (drop (call $w (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8))))
          (func (export "_start")
            (drop (call $as (i32.const 16) (i32.const 20)))
            (drop (call $es (i32.const 24) (i32.const 28)))
            (drop (call $ag (i32.const 1024) (i32.const 2048)))
            (drop (call $eg (i32.const 1536) (i32.const 4096)))
            (call $emit (i32.const 2048) (i32.load (i32.const 20)))
            (call $emit (i32.const 4096) (i32.load (i32.const 28)))))"#,
    )
    .unwrap();
    let manifest = write_manifest(
        dir.path(),
        "name = \"args\"\nmodule = \"args.wat\"\n[inputs.sweep]\nn = [1, 2]\n\
         [wasi]\nargs = [\"--steps\", \"10\"]\nenv = { MODE = \"fast\" }\n",
    );
    let run = submit(dir.path(), &manifest, "run");
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    let expected = coordinator_free::digest::Digest::of(b"unit\x00--steps\x0010\x00MODE=fast\x00");
    let lines = results(dir.path());
    assert_eq!(lines.len(), 2);
    for line in lines {
        assert_eq!(line["status"], "accepted", "{line}");
        assert_eq!(line["digest"], expected.to_hex(), "{line}");
    }
}

#[test]
fn a_bad_manifest_is_refused_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = write_manifest(
        dir.path(),
        &format!(
            "name = \"bad\"\nmodule = {:?}\n[inputs.sweep]\nseed = [1, 2]\n[redundancy]\nreplicas = 2\nquorum = 3\n",
            example_artifacts::PI
        ),
    );
    let run = submit(dir.path(), &manifest, "run");
    assert_eq!(run.code, Some(2), "stderr {}", run.stderr);
    let lines: Vec<&str> = run.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line: {lines:?}");
    assert!(lines[0].contains("redundancy.quorum"), "{lines:?}");
    assert!(!dir.path().join("out").exists(), "nothing ran");
}

#[test]
fn a_killed_submit_resumes_without_rerunning_accepted_units() {
    const UNITS: u64 = 40;
    const SAMPLES: u64 = 6_000_000;
    let dir = tempfile::tempdir().unwrap();
    let manifest = write_manifest(
        dir.path(),
        &format!(
            "name = \"pi\"\nmodule = {:?}\n[inputs.sweep]\nseed = {{ start = 1, stop = {UNITS}, step = 1 }}\nsamples = {SAMPLES}\n[redundancy]\nreplicas = 2\n",
            example_artifacts::PI
        ),
    );

    let mut child = spawn(dir.path(), &manifest, "first");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let done = results(dir.path()).len();
        if done >= 6 {
            break;
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the first run ended before it could be killed: {status}");
        }
        assert!(Instant::now() < deadline, "no results within 30 s");
        std::thread::sleep(Duration::from_millis(10));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let before = results(dir.path()).len() as u64;
    assert!(before < UNITS, "killed mid-job, {before} units done");

    let run = submit(dir.path(), &manifest, "second");
    assert_eq!(
        run.code,
        Some(0),
        "stdout {}\nstderr {}",
        run.stdout,
        run.stderr
    );
    let restored = count_before(&run.stdout, "restored");
    let ran = count_before(&run.stdout, "units run this time");
    assert!(
        restored >= before,
        "{restored} restored, {before} seen: {}",
        run.stdout
    );
    assert_eq!(ran + restored, UNITS, "{}", run.stdout);
    assert!(
        ran < UNITS,
        "the second run re-ran accepted units: {}",
        run.stdout
    );

    let lines = results(dir.path());
    assert_eq!(
        lines.len() as u64,
        UNITS,
        "one line per unit after resuming"
    );
    let mut seen: Vec<u64> = lines
        .iter()
        .map(|line| check_pi_line(line, SAMPLES))
        .collect();
    seen.sort_unstable();
    assert_eq!(seen, (0..UNITS).collect::<Vec<_>>());
}

/// A journal that holds the job under another engine profile is refused with a message that
/// names both profiles, instead of mixing results of two engines.
#[test]
fn a_journal_of_another_engine_profile_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = write_manifest(
        dir.path(),
        &format!(
            "name = \"profiles\"\nmodule = {:?}\n[inputs.sweep]\nx = [1, 2]\n[redundancy]\nreplicas = 1\n",
            example_artifacts::ECHO
        ),
    );
    let first = submit(dir.path(), &manifest, "first");
    assert_eq!(first.code, Some(0), "{}\n{}", first.stdout, first.stderr);
    // "job NAME (ID)" names the job's id.
    let id: coordinator_free::digest::Digest = first
        .stdout
        .split(['(', ')'])
        .nth(1)
        .and_then(|id| id.parse().ok())
        .unwrap_or_else(|| panic!("a job id in {}", first.stdout));
    {
        let store =
            coordinator_free::store::JobStore::open(&dir.path().join("data/submit.redb")).unwrap();
        let mut record = store.job(&id).unwrap().expect("the job is journaled");
        record.profile = "cf-wasm-1/wasmtime-40.0.0".into();
        store.put_job(&id, &record).unwrap();
    }
    let again = submit(dir.path(), &manifest, "again");
    assert_ne!(again.code, Some(0), "{}", again.stdout);
    assert!(
        again.stderr.contains("cf-wasm-1/wasmtime-40.0.0")
            && again.stderr.contains(coordinator_free::sandbox::PROFILE),
        "{}",
        again.stderr
    );
}
