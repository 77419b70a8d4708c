//! Managing the jobs journaled in a data directory: `worker jobs` lists them, `worker results`
//! prints a job's results again (in unit order, as JSON lines or CSV), `worker cancel` stops a
//! running one, `worker forget` removes one from the journal.
//!
//! The journal admits one process at a time, so while `worker submit` runs on a data directory
//! it describes itself in a small file beside the journal (`submit.running`: its process id, its
//! job and its counts, rewritten about once a second), which `worker jobs` shows and `worker
//! cancel` uses to stop it.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};
use clap::{Args, ValueEnum};
use coordinator_free::digest::Digest;
use coordinator_free::job::UnitSource;
use coordinator_free::job::driver::{JobData, UnitRecord, result_line};
use coordinator_free::job::manifest::JobManifest;
use coordinator_free::job::results::ResultLine;
use coordinator_free::sandbox;
use coordinator_free::store::{JobRecord, JobStore, JobTimes};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::Failure;

/// The journal of the jobs submitted from a data directory.
pub const JOURNAL_FILE: &str = "submit.redb";
/// What a running `worker submit` says about itself.
const RUNNING_FILE: &str = "submit.running";
/// Longest `submit.running` read.
const MAX_RUNNING_BYTES: u64 = 64 * 1024;
/// How long `worker cancel` waits for a running submit to stop.
const CANCEL_WAIT: Duration = Duration::from_secs(60);

/// A running submit, as it describes itself.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Running {
    pub pid: u32,
    pub job: String,
    pub name: String,
    pub units: u32,
    pub accepted: u32,
    pub failed: u32,
}

/// Writes `running` beside the journal (atomically).
pub fn write_running(data_dir: &Path, running: &Running) {
    let path = data_dir.join(RUNNING_FILE);
    let tmp = data_dir.join(format!("{RUNNING_FILE}.tmp"));
    let Ok(text) = serde_json::to_vec(running) else {
        return;
    };
    if std::fs::write(&tmp, text).is_ok() {
        let _ = std::fs::rename(&tmp, &path);
    }
}

/// Removes this process's `submit.running`.
pub fn clear_running(data_dir: &Path) {
    if read_running(data_dir).is_some_and(|r| r.pid == std::process::id()) {
        let _ = std::fs::remove_file(data_dir.join(RUNNING_FILE));
    }
}

fn read_running(data_dir: &Path) -> Option<Running> {
    use std::io::Read;
    let file = std::fs::File::open(data_dir.join(RUNNING_FILE)).ok()?;
    let mut text = Vec::new();
    file.take(MAX_RUNNING_BYTES).read_to_end(&mut text).ok()?;
    serde_json::from_slice(&text).ok()
}

/// The submit running on `data_dir`, if its process is alive and is a `worker submit`.
pub fn running(data_dir: &Path) -> Option<Running> {
    let running = read_running(data_dir)?;
    is_submit(running.pid).then_some(running)
}

fn is_submit(pid: u32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|cmdline| {
            let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
            args.iter().any(|a| *a == b"submit")
        })
        .unwrap_or(false)
}

#[derive(Args)]
pub struct JobsArgs {
    /// The data directory whose jobs to list (default: ~/.local/share/coordinator-free).
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
}

#[derive(Args)]
pub struct ResultsArgs {
    /// The job: its name (the latest job of that name) or the start of its id.
    job: String,
    /// `jsonl` (the lines of results.jsonl) or `csv` (parameters and top-level output fields as
    /// columns).
    #[arg(long, value_enum, default_value_t = Format::Jsonl)]
    format: Format,
    /// Write to this file instead of stdout.
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Jsonl,
    Csv,
}

#[derive(Args)]
pub struct JobArgs {
    /// The job: its name or the start of its id (at least 4 hex digits).
    job: String,
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
}

fn data_dir(arg: Option<PathBuf>) -> Result<PathBuf, Failure> {
    crate::data_dir(arg)
        .ok_or_else(|| Failure::usage(anyhow!("no data directory: pass --data-dir DIR")))
}

/// Opens the journal, or says why not: none yet, or a running submit holds it.
fn open(dir: &Path) -> Result<JobStore, Failure> {
    let path = dir.join(JOURNAL_FILE);
    if !path.exists() {
        return Err(Failure::usage(anyhow!(
            "no jobs were submitted from {}",
            dir.display()
        )));
    }
    if let Some(r) = running(dir) {
        return Err(Failure::usage(anyhow!(
            "worker submit (pid {}) is running job {} ({}) on {} and holds its journal; wait for it, or stop it with `worker cancel {}`",
            r.pid,
            r.name,
            short(&r.job),
            dir.display(),
            r.name
        )));
    }
    JobStore::open(&path)
        .with_context(|| format!("cannot open the journal {}", path.display()))
        .map_err(Failure::usage)
}

fn short(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}

/// A journaled job: its id, record and times.
struct Job {
    id: Digest,
    record: JobRecord,
    times: Option<JobTimes>,
}

fn all_jobs(store: &JobStore) -> Result<Vec<Job>, Failure> {
    let mut jobs = Vec::new();
    for (id, record) in store.jobs().map_err(|e| Failure::usage(anyhow!(e)))? {
        let times = store.times(&id).map_err(|e| Failure::usage(anyhow!(e)))?;
        jobs.push(Job { id, record, times });
    }
    // Oldest first; jobs of older journals, with no times, first of all.
    jobs.sort_by_key(|j| (j.times.map_or(0, |t| t.started_ms), j.id.to_hex()));
    Ok(jobs)
}

/// The job `text` names: the start of an id (4 hex digits or more), or a name; with
/// `latest`, a name several jobs share means the one submitted last.
fn resolve(store: &JobStore, text: &str, latest: bool) -> Result<Job, Failure> {
    let text = text.trim();
    let hex = text.len() >= 4 && text.bytes().all(|b| b.is_ascii_hexdigit());
    let lower = text.to_ascii_lowercase();
    let mut matches: Vec<Job> = all_jobs(store)?
        .into_iter()
        .filter(|j| j.record.name == text || (hex && j.id.to_hex().starts_with(&lower)))
        .collect();
    match matches.len() {
        0 => Err(Failure::usage(anyhow!(
            "no job named {text:?} or with an id starting so; `worker jobs` lists them"
        ))),
        1 => Ok(matches.remove(0)),
        n if latest && matches.iter().all(|j| j.record.name == text) => {
            let job = matches.pop().expect("several matches");
            eprintln!(
                "{n} jobs are named {text:?}: the latest, {} (name another by its id)",
                short(&job.id.to_hex())
            );
            Ok(job)
        }
        _ => Err(Failure::usage(anyhow!(
            "{text:?} names {} jobs: {}; give the start of an id",
            matches.len(),
            matches
                .iter()
                .map(|j| format!("{} ({})", short(&j.id.to_hex()), j.record.name))
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

/// Accepted and failed units in the journal, read a batch at a time (a job may hold a hundred
/// million).
fn counts(store: &JobStore, id: &Digest) -> Result<(u64, u64), Failure> {
    let (mut accepted, mut failed) = (0, 0);
    store
        .each_unit(id, |_, bytes| {
            match UnitRecord::decode(bytes) {
                Ok(r) if r.succeeded() => accepted += 1,
                Ok(_) => failed += 1,
                Err(_) => {}
            }
            Ok::<_, coordinator_free::store::StoreError>(())
        })
        .map_err(|e| Failure::usage(anyhow!(e)))?;
    Ok((accepted, failed))
}

pub(crate) fn when(ms: u64) -> String {
    let secs = ms / 1000;
    let days = secs / 86_400;
    let (y, m, d) = civil_from_days(i64::try_from(days).unwrap_or(0));
    let rest = secs % 86_400;
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02} UTC",
        rest / 3600,
        (rest % 3600) / 60
    )
}

/// The calendar date of a day count since 1970-01-01 (proleptic Gregorian).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = u32::try_from(doy - (153 * mp + 2) / 5 + 1).unwrap_or(1);
    let m = u32::try_from(if mp < 10 { mp + 3 } else { mp - 9 }).unwrap_or(1);
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

pub fn list(args: JobsArgs) -> Result<ExitCode, Failure> {
    let dir = data_dir(args.data_dir)?;
    if let Some(r) = running(&dir) {
        println!(
            "running: {} ({})  {}/{} units decided, {} failed  (worker submit, pid {}; the other jobs are listed when it ends)",
            r.name,
            short(&r.job),
            r.accepted + r.failed,
            r.units,
            r.failed,
            r.pid
        );
        return Ok(ExitCode::SUCCESS);
    }
    let store = open(&dir)?;
    let jobs = all_jobs(&store)?;
    if jobs.is_empty() {
        println!("no jobs in {}", dir.display());
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<24} {:<12} {:<10} {:>9} {:>9} {:>9}  {:<20} {:<20}",
        "name", "id", "state", "units", "accepted", "failed", "started", "finished"
    );
    for job in jobs {
        let (accepted, failed) = counts(&store, &job.id)?;
        let decided = accepted + failed;
        let state = match job.times {
            Some(t) if t.cancelled => "cancelled",
            _ if decided >= job.record.units => "complete",
            _ => "stopped",
        };
        println!(
            "{:<24} {:<12} {:<10} {:>9} {:>9} {:>9}  {:<20} {:<20}",
            job.record.name,
            short(&job.id.to_hex()),
            state,
            job.record.units,
            accepted,
            failed,
            job.times
                .map_or_else(|| "-".to_owned(), |t| when(t.started_ms)),
            job.times
                .and_then(|t| t.finished_ms)
                .map_or_else(|| "-".to_owned(), when),
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// The units of `job` as its recorded manifest yields them, if that manifest still yields the
/// same job.
fn job_units(store: &JobStore, job: &Job) -> Option<JobData> {
    let source = store.source(&job.id).ok()??;
    let manifest = JobManifest::load(&source.manifest).ok()?;
    let units = UnitSource::open(&manifest, &source.manifest).ok()?;
    let file = std::fs::read(&manifest.module).ok()?;
    let wasm = sandbox::module_from_file_bytes(&file).ok()?;
    let data = JobData::new(&manifest, units, Digest::of(&wasm));
    (data.id == job.id).then_some(data)
}

pub fn results(args: ResultsArgs) -> Result<ExitCode, Failure> {
    let dir = data_dir(args.data_dir)?;
    let store = open(&dir)?;
    let job = resolve(&store, &args.job, true)?;
    let data = job_units(&store, &job);
    if data.is_none() {
        eprintln!(
            "the manifest {} was submitted from is gone or changed: lines carry no input",
            job.record.name
        );
    }
    let mut out: Box<dyn Write> = match &args.out {
        Some(path) => Box::new(std::io::BufWriter::new(
            std::fs::File::create(path)
                .with_context(|| format!("cannot create {}", path.display()))
                .map_err(Failure::usage)?,
        )),
        None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
    };
    let lines = Lines {
        store: &store,
        job: &job.id,
        data: data.as_ref(),
    };
    let written = match args.format {
        Format::Jsonl => lines.each(&mut |line| write_jsonl(&mut out, &line)),
        Format::Csv => write_csv(&mut out, &|f| {
            lines.each(&mut |line| f(serde_json::to_value(line).map_err(std::io::Error::other)?))
        }),
    };
    match written.and_then(|()| out.flush()) {
        Ok(()) => Ok(ExitCode::SUCCESS),
        // The reader stopped reading (`| head`): nothing is wrong.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(ExitCode::SUCCESS),
        Err(e) => Err(Failure::usage(
            anyhow!(e).context("cannot write the results"),
        )),
    }
}

/// A job's results lines, read from the journal a batch at a time, so printing the results of
/// a job of any size holds one batch.
struct Lines<'a> {
    store: &'a JobStore,
    job: &'a Digest,
    /// The job as its manifest yields it now, for each line's input; `None` leaves it out.
    data: Option<&'a JobData>,
}

impl Lines<'_> {
    /// Calls `f` with every line, in unit order.
    fn each(&self, f: &mut dyn FnMut(ResultLine) -> std::io::Result<()>) -> std::io::Result<()> {
        self.store.each_unit(self.job, |index, bytes| {
            let record = UnitRecord::decode(bytes)?;
            let origin = self
                .data
                .and_then(|d| d.source.origin(index).ok())
                .unwrap_or(Value::Null);
            f(result_line(index, origin, &record))
        })
    }
}

fn write_jsonl(out: &mut dyn Write, line: &ResultLine) -> std::io::Result<()> {
    let text = serde_json::to_string(line).map_err(std::io::Error::other)?;
    out.write_all(text.as_bytes())?;
    out.write_all(b"\n")
}

/// The input's own fields: a sweep's parameters, a JSON line's fields (and its line number), a
/// file's name.
fn input_fields(input: &Value) -> Vec<(String, Value)> {
    let Some(map) = input.as_object() else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (key, value) in map {
        match value {
            Value::Object(inner) if key == "params" || key == "input" => {
                out.extend(inner.iter().map(|(k, v)| (k.clone(), v.clone())));
            }
            other => out.push((key.clone(), other.clone())),
        }
    }
    out
}

/// The output's top-level fields, or the whole output as one column.
fn output_fields(output: Option<&Value>) -> Vec<(String, Value)> {
    match output {
        Some(Value::Object(map)) => map.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        Some(other) => vec![("output".to_owned(), other.clone())],
        None => Vec::new(),
    }
}

/// Lines as JSON values, handed one at a time to the callback, as often as asked.
type EachLine<'a> = &'a dyn Fn(&mut dyn FnMut(Value) -> std::io::Result<()>) -> std::io::Result<()>;

/// Writes the lines as CSV, reading them twice: once for the columns, once for the rows.
fn write_csv(out: &mut dyn Write, each: EachLine<'_>) -> std::io::Result<()> {
    // Columns in order of first appearance: inputs, then outputs (prefixed where a name is
    // taken by an input).
    let mut inputs: Vec<String> = Vec::new();
    let mut outputs: Vec<String> = Vec::new();
    each(&mut |line| {
        for (k, _) in input_fields(&line["input"]) {
            if !inputs.contains(&k) {
                inputs.push(k);
            }
        }
        for (k, _) in output_fields(line.get("output")) {
            if !outputs.contains(&k) {
                outputs.push(k);
            }
        }
        Ok(())
    })?;
    let out_name = |k: &String| {
        if inputs.contains(k) || ["index", "status", "error", "validated"].contains(&k.as_str()) {
            format!("output.{k}")
        } else {
            k.clone()
        }
    };
    let mut header: Vec<String> = vec!["index".into(), "status".into()];
    header.extend(inputs.iter().cloned());
    header.extend(outputs.iter().map(out_name));
    header.extend(["error".into(), "validated".into()]);
    write_row(out, header.iter().map(String::as_str))?;
    each(&mut |line| {
        let ins: BTreeMap<String, Value> = input_fields(&line["input"]).into_iter().collect();
        let outs: BTreeMap<String, Value> = output_fields(line.get("output")).into_iter().collect();
        let mut row: Vec<String> = vec![cell(&line["index"]), cell(&line["status"])];
        row.extend(
            inputs
                .iter()
                .map(|k| ins.get(k).map_or_else(String::new, cell)),
        );
        row.extend(
            outputs
                .iter()
                .map(|k| outs.get(k).map_or_else(String::new, cell)),
        );
        row.push(line.get("error").map_or_else(String::new, cell));
        row.push(line["validated"].get("by").map_or_else(String::new, cell));
        write_row(out, row.iter().map(String::as_str))
    })
}

fn cell(value: &Value) -> String {
    match value {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn write_row<'a>(out: &mut dyn Write, cells: impl Iterator<Item = &'a str>) -> std::io::Result<()> {
    let mut first = true;
    for c in cells {
        if !first {
            out.write_all(b",")?;
        }
        first = false;
        if c.contains([',', '"', '\n', '\r']) || c.starts_with(' ') || c.ends_with(' ') {
            write!(out, "\"{}\"", c.replace('"', "\"\""))?;
        } else {
            out.write_all(c.as_bytes())?;
        }
    }
    out.write_all(b"\n")
}

pub fn cancel(args: JobArgs) -> Result<ExitCode, Failure> {
    let dir = data_dir(args.data_dir)?;
    let mut named = args.job.trim().to_owned();
    if let Some(r) = running(&dir)
        && (r.name == args.job.trim()
            || (args.job.trim().len() >= 4
                && r.job.starts_with(&args.job.trim().to_ascii_lowercase())))
    {
        // SAFETY: kill(2) with a pid read from the file, checked to be a `worker submit`.
        let pid = libc::pid_t::try_from(r.pid).map_err(|e| Failure::usage(anyhow!(e)))?;
        if unsafe { libc::kill(pid, libc::SIGINT) } != 0 {
            return Err(Failure::usage(anyhow!(
                "cannot stop worker submit (pid {}): {}",
                r.pid,
                std::io::Error::last_os_error()
            )));
        }
        let start = Instant::now();
        while is_submit(r.pid) && start.elapsed() < CANCEL_WAIT {
            std::thread::sleep(Duration::from_millis(100));
        }
        if is_submit(r.pid) {
            return Err(Failure::usage(anyhow!(
                "worker submit (pid {}) did not stop within {CANCEL_WAIT:?}",
                r.pid
            )));
        }
        println!("stopped worker submit (pid {}) running {}", r.pid, r.name);
        // The job it ran, whatever else shares its name.
        named = r.job;
    }
    let store = open(&dir)?;
    let job = resolve(&store, &named, false)?;
    let (accepted, failed) = counts(&store, &job.id)?;
    if accepted + failed >= job.record.units {
        println!(
            "{} ({}) is complete: nothing to cancel",
            job.record.name,
            short(&job.id.to_hex())
        );
        return Ok(ExitCode::SUCCESS);
    }
    let mut times = job.times.unwrap_or_default();
    times.cancelled = true;
    store
        .put_times(&job.id, &times)
        .map_err(|e| Failure::usage(anyhow!(e)))?;
    println!(
        "cancelled {} ({}): {} of {} units decided ({accepted} accepted, {failed} failed) stay in the journal; submitting it again resumes it, `worker forget {}` removes it",
        job.record.name,
        short(&job.id.to_hex()),
        accepted + failed,
        job.record.units,
        short(&job.id.to_hex())
    );
    Ok(ExitCode::SUCCESS)
}

pub fn forget(args: JobArgs) -> Result<ExitCode, Failure> {
    let dir = data_dir(args.data_dir)?;
    let store = open(&dir)?;
    let job = resolve(&store, &args.job, false)?;
    let removed = store
        .forget(&job.id)
        .map_err(|e| Failure::usage(anyhow!(e)))?;
    println!(
        "forgot {} ({}): {removed} unit records removed from the journal; files it wrote (results.jsonl) are left as they are",
        job.record.name,
        short(&job.id.to_hex())
    );
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn days_become_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_793), (2026, 12, 6));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(when(1_796_558_400_000), "2026-12-06 12:00 UTC");
    }

    #[test]
    fn csv_flattens_parameters_and_outputs_and_quotes_what_needs_it() {
        let lines = [
            serde_json::json!({"index": 0, "status": "accepted", "input": {"params": {"seed": 1, "beta": 0.5}}, "output": {"pi": 3.1, "note": "a, b"}, "validated": {"by": "quorum"}}),
            serde_json::json!({"index": 1, "status": "failed", "input": {"params": {"seed": 2, "beta": 0.5}}, "error": "trap: \"x\"", "validated": null}),
        ];
        let mut out = Vec::new();
        write_csv(&mut out, &|f| lines.iter().try_for_each(|l| f(l.clone()))).unwrap();
        let text = String::from_utf8(out).unwrap();
        let rows: Vec<&str> = text.lines().collect();
        assert_eq!(rows[0], "index,status,beta,seed,note,pi,error,validated");
        assert_eq!(rows[1], "0,accepted,0.5,1,\"a, b\",3.1,,quorum");
        assert_eq!(rows[2], "1,failed,0.5,2,,,\"trap: \"\"x\"\"\",");
    }
}
