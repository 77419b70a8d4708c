//! Managing jobs with real processes: `worker jobs`, `worker results`, `worker cancel` (of a
//! `worker submit` running in another process), `worker forget`, and what a submit says when it
//! is stopped or when units fail.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use serde_json::Value;

mod common;
use common::{WORKER, check_pi_line, finish, manifest, spawn_local_submit, wait_for};

/// Samples per pi unit: small units, so jobs end quickly.
const SAMPLES: u64 = 20_000;

fn worker(dir: &Path, args: &[&str]) -> Output {
    Command::new(WORKER)
        .args(args)
        .arg("--data-dir")
        .arg(dir.join("data"))
        .env_remove("WORKER_LOG")
        .stdin(Stdio::null())
        .output()
        .expect("worker runs")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn submit_local(dir: &Path, job: &Path, out: &str, tag: &str) -> common::Run {
    finish(
        spawn_local_submit(dir, job, out, tag),
        dir,
        tag,
        Duration::from_secs(120),
    )
}

/// The rows of `worker jobs` below its header, split on whitespace.
fn job_rows(dir: &Path) -> Vec<Vec<String>> {
    let out = worker(dir, &["jobs"]);
    assert!(out.status.success(), "{}", text(&out));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().map(str::to_owned).collect())
        .collect()
}

#[test]
fn jobs_are_listed_printed_again_in_unit_order_and_forgotten() {
    let scratch = tempfile::tempdir().unwrap();
    let root = scratch.path();
    let small = manifest(root, "sweep-a", (1, 12), SAMPLES, false);
    let run = submit_local(root, &small, "out-a", "a");
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    let other = manifest(root, "sweep-b", (101, 120), SAMPLES, false);
    let run = submit_local(root, &other, "out-b", "b");
    assert_eq!(run.code, Some(0), "{}", run.stderr);

    let rows = job_rows(root);
    assert_eq!(rows.len(), 2, "{rows:?}");
    for (row, (name, units)) in rows.iter().zip([("sweep-a", "12"), ("sweep-b", "20")]) {
        assert_eq!(row[0], name, "{rows:?}");
        assert_eq!(row[2], "complete", "{rows:?}");
        assert_eq!(
            (row[3].as_str(), row[4].as_str(), row[5].as_str()),
            (units, units, "0")
        );
    }
    let id_b = rows[1][1].clone();

    // results.jsonl is in unit order, and `worker results` prints exactly its lines.
    let file = std::fs::read_to_string(root.join("out-b").join("results.jsonl")).unwrap();
    let indices: Vec<u64> = file
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["index"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(indices, (0..20).collect::<Vec<_>>());
    let out = worker(root, &["results", "sweep-b"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), file);

    // CSV: the sweep's parameters and the output's fields as columns, one row per unit.
    let csv_path = root.join("b.csv");
    let out = worker(
        root,
        &[
            "results",
            &id_b[..6],
            "--format",
            "csv",
            "--out",
            csv_path.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    let csv = std::fs::read_to_string(&csv_path).unwrap();
    let mut lines = csv.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    for column in [
        "index",
        "status",
        "samples",
        "seed",
        "inside",
        "pi",
        "validated",
    ] {
        assert!(header.contains(&column), "{header:?}");
    }
    let col = |name: &str| header.iter().position(|h| *h == name).unwrap();
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split(',').collect()).collect();
    assert_eq!(rows.len(), 20);
    for (i, (row, json)) in rows.iter().zip(file.lines()).enumerate() {
        let json: Value = serde_json::from_str(json).unwrap();
        check_pi_line(&json, SAMPLES);
        assert_eq!(row[col("index")], i.to_string());
        assert_eq!(row[col("seed")], (101 + i).to_string());
        assert_eq!(row[col("status")], "accepted");
        assert_eq!(row[col("pi")], json["output"]["pi"].to_string());
        assert_eq!(row[col("inside")], json["output"]["inside"].to_string());
    }

    // Forgotten: gone from the list and from `worker results`; its results file stays.
    let out = worker(root, &["forget", "sweep-a"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("12 unit records removed"),
        "{}",
        text(&out)
    );
    let rows = job_rows(root);
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0][0], "sweep-b");
    let out = worker(root, &["results", "sweep-a"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(root.join("out-a").join("results.jsonl").exists());
}

#[test]
fn a_running_submit_is_cancelled_says_where_it_stopped_and_resumes() {
    let scratch = tempfile::tempdir().unwrap();
    let root = scratch.path();
    // Long enough to be caught running: 300 units of about 20 ms, twice each, on two cores.
    let job = manifest(root, "long", (1, 300), 1_500_000, false);
    let child = spawn_local_submit(root, &job, "out", "first");
    wait_for(
        Duration::from_secs(60),
        "the running job in `worker jobs`",
        || {
            let out = worker(root, &["jobs"]);
            let t = text(&out);
            out.status.success() && t.starts_with("running: long (") && !t.contains(" 0/300 ")
        },
    );
    let out = worker(root, &["cancel", "long"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("stopped worker submit"),
        "{}",
        text(&out)
    );
    let run = finish(child, root, "first", Duration::from_secs(30));
    assert_eq!(run.code, Some(130), "{}", run.stderr);
    assert!(run.stderr.contains("stopped: job long ("), "{}", run.stderr);
    assert!(
        run.stderr.contains("the same command resumes it"),
        "{}",
        run.stderr
    );
    let rows = job_rows(root);
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0][2], "cancelled", "{rows:?}");
    let decided: u64 = rows[0][4].parse().unwrap();
    assert!(decided > 0 && decided < 300, "{rows:?}");

    // Submitted again: it resumes, runs only the rest, and ends complete.
    let run = submit_local(root, &job, "out", "second");
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert!(
        run.stderr.contains("was cancelled; resuming it"),
        "{}",
        run.stderr
    );
    assert!(
        run.stdout.contains(&format!("{decided} restored")),
        "{}",
        run.stdout
    );
    let rows = job_rows(root);
    assert_eq!(rows[0][2], "complete", "{rows:?}");
    assert_eq!(rows[0][4], "300", "{rows:?}");
}

#[test]
fn the_summary_names_the_first_failed_units() {
    let scratch = tempfile::tempdir().unwrap();
    let root = scratch.path();
    std::fs::write(
        root.join("fails.wat"),
        r#"(module (memory (export "memory") 1) (func (export "run") (result i32) i32.const 7))"#,
    )
    .unwrap();
    let job = root.join("fails.toml");
    std::fs::write(
        &job,
        "name = \"fails\"\nmodule = \"fails.wat\"\n[inputs.sweep]\nx = { start = 1, stop = 8, step = 1 }\n",
    )
    .unwrap();
    let run = submit_local(root, &job, "out", "run");
    assert_eq!(run.code, Some(4), "{}", run.stderr);
    assert!(
        run.stdout.contains("failed units (the first 5 of 8):"),
        "{}",
        run.stdout
    );
    for unit in 0..5 {
        assert!(
            run.stdout
                .contains(&format!("  unit {unit}: guest failure (code 7)")),
            "{}",
            run.stdout
        );
    }
    assert!(!run.stdout.contains("  unit 5:"), "{}", run.stdout);
}

/// Results are reused by content: extending a sweep runs only the new points; asking for a
/// stronger quorum, or changing the module, runs everything again.
#[test]
fn extending_a_sweep_reuses_the_units_already_accepted() {
    let scratch = tempfile::tempdir().unwrap();
    let root = scratch.path();
    let first = manifest(root, "sweep", (1, 12), SAMPLES, false);
    let run = submit_local(root, &first, "out-1", "first");
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert!(!run.stdout.contains("reused"), "{}", run.stdout);

    // The same sweep extended to 20 points: a new job, of which 12 units are reused.
    let extended = manifest(root, "sweep", (1, 20), SAMPLES, false);
    let run = submit_local(root, &extended, "out-2", "extended");
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert!(
        run.stdout.contains("12 units reused from earlier jobs"),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout.contains("8 units run this time"),
        "{}",
        run.stdout
    );
    let lines = |out: &str| -> Vec<Value> {
        std::fs::read_to_string(root.join(out).join("results.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let (old, new) = (lines("out-1"), lines("out-2"));
    assert_eq!(new.len(), 20);
    for (a, b) in old.iter().zip(&new) {
        assert_eq!(a["input"], b["input"]);
        assert_eq!(a["output"], b["output"]);
        assert_eq!(a["digest"], b["digest"]);
    }
    for line in &new {
        check_pi_line(line, SAMPLES);
    }

    // A stronger quorum is not met by results two hosts agreed on: all run again.
    let text = std::fs::read_to_string(&extended)
        .unwrap()
        .replace("replicas = 2\n", "replicas = 3\nquorum = 3\n");
    runs_all_twenty_again(root, &text, "stricter");

    // Another module (the same code with a custom section added): all run again.
    let mut wasm = std::fs::read(example_artifacts::PI).unwrap();
    wasm.extend_from_slice(&[0, 5, 4, b'n', b'o', b't', b'e']);
    std::fs::write(root.join("pi-noted.wasm"), &wasm).unwrap();
    let text = std::fs::read_to_string(&extended).unwrap().replace(
        &format!("module = {:?}", example_artifacts::PI),
        "module = \"pi-noted.wasm\"",
    );
    assert!(text.contains("pi-noted.wasm"), "{text}");
    runs_all_twenty_again(root, &text, "other");
}

/// Submits the manifest `text` as `root/TAG.toml`: none of its 20 units is reused.
fn runs_all_twenty_again(root: &Path, text: &str, tag: &str) {
    let job = root.join(format!("{tag}.toml"));
    std::fs::write(&job, text).unwrap();
    let run = submit_local(root, &job, &format!("out-{tag}"), tag);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert!(!run.stdout.contains("reused"), "{}", run.stdout);
    assert!(
        run.stdout.contains("20 units run this time"),
        "{}",
        run.stdout
    );
}

/// On a terminal the progress is a bar with the counts beside it; piped, plain lines without
/// escape codes. The terminal is a pseudo-terminal made by `script` (util-linux).
#[test]
fn progress_is_a_bar_on_a_terminal_and_plain_lines_when_piped() {
    let scratch = tempfile::tempdir().unwrap();
    let root = scratch.path();
    let job = manifest(root, "bar", (1, 40), SAMPLES, false);
    let piped = submit_local(root, &job, "out-piped", "piped");
    assert_eq!(piped.code, Some(0), "{}", piped.stderr);
    assert!(!piped.stderr.contains('\u{1b}'), "{}", piped.stderr);
    assert!(
        piped.stderr.contains("40/40 units: 40 accepted"),
        "{}",
        piped.stderr
    );

    let typescript = root.join("typescript");
    let command = format!(
        "{WORKER} submit {} --cpus 2 --data-dir {} --out {}",
        job.display(),
        root.join("data-tty").display(),
        root.join("out-tty").display()
    );
    let status = Command::new("script")
        .args(["-qec", &command])
        .arg(&typescript)
        .env("TERM", "xterm")
        .env_remove("WORKER_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .status()
        .expect("script runs");
    assert!(status.success());
    let screen = String::from_utf8_lossy(&std::fs::read(&typescript).unwrap()).into_owned();
    assert!(screen.contains('\u{1b}'), "{screen}");
    assert!(screen.contains("40/40 units  40 accepted"), "{screen}");
    assert!(screen.contains("=========="), "the bar: {screen}");
}
