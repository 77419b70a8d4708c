//! The job manifest (TOML): what to run, on which inputs, how redundantly, within which limits.
//! `docs/job-manifest.md` documents the format; a bad manifest is refused before anything runs,
//! with an error that names the field and the problem.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use std::collections::BTreeMap;

use crate::host::Placement;
use crate::sandbox::{Limits, MAX_MEMORY_BYTES};

/// Most units a job of input files or JSON lines may have: the submitter keeps a few bytes
/// per file or line (where it is, and a file's digest).
pub const MAX_UNITS: u64 = 1_000_000;
/// Most points a sweep may have: its inputs are computed from the unit index and the
/// submitter keeps a few bits per unit, so this is bounded by the scheduler's unit index and
/// by the time it takes rather than by memory.
pub const MAX_SWEEP_UNITS: u64 = 100_000_000;
/// Most values one sweep parameter may list (a range may have up to [`MAX_SWEEP_UNITS`]).
pub const MAX_POINTS_PER_PARAMETER: u64 = 1_000_000;
/// Largest manifest file.
pub const MAX_MANIFEST_BYTES: u64 = 1 << 20;
/// Largest single input (also the sandbox's default input cap).
pub const MAX_INPUT_BYTES: u64 = 64 << 20;
/// Largest module.
pub const MAX_MODULE_BYTES: u64 = 16 << 20;
/// Most replicas, and most attempts, per unit.
pub const MAX_REPLICAS: u32 = 16;
/// Most attempts per unit.
pub const MAX_ATTEMPTS: u32 = 64;
/// Longest unit timeout: one week.
pub const MAX_TIMEOUT_SECS: f64 = 7.0 * 86_400.0;

/// Why a manifest was refused.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// A file could not be read.
    #[error("cannot read {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Not valid TOML, or a field of the wrong type or an unknown one.
    #[error("{path}: {message}")]
    Syntax {
        /// The manifest.
        path: PathBuf,
        /// The parser's message, with line and column.
        message: String,
    },
    /// A field has a value the job cannot use.
    #[error("{path}: field `{field}`: {problem}")]
    Invalid {
        /// The manifest.
        path: PathBuf,
        /// Dotted path of the field, e.g. `redundancy.quorum`.
        field: String,
        /// What is wrong with it.
        problem: String,
    },
}

/// Most peers a `trusted` file may name.
pub const MAX_TRUSTED_PEERS: usize = 4096;

/// A validated job manifest. Paths are resolved against the manifest's directory.
#[derive(Debug, Clone, PartialEq)]
pub struct JobManifest {
    /// The job's name.
    pub name: String,
    /// The module file.
    pub module: PathBuf,
    /// Where the units' inputs come from.
    pub inputs: InputSpec,
    /// How many replicas must agree.
    pub redundancy: Redundancy,
    /// A file of peer ids (one per line, `#` comments) the operator vouches for: with
    /// `adaptive`, they run units alone without spot checks (`[redundancy] trusted`).
    pub trusted: Option<PathBuf>,
    /// Per-unit limits.
    pub limits: JobLimits,
    /// The arguments and environment of a WASI program (`[wasi] args` and `env`).
    pub program: crate::sandbox::Program,
}

impl JobManifest {
    /// What every replica of every unit runs under: the limits and the program's arguments
    /// and environment.
    pub fn unit_limits(&self) -> Limits {
        Limits {
            program: self.program.clone(),
            ..self.limits.to_limits()
        }
    }
}

/// Where a job's inputs come from.
#[derive(Debug, Clone, PartialEq)]
pub enum InputSpec {
    /// One unit per file, in the order given.
    Files(Vec<PathBuf>),
    /// One unit per regular file in the directory, sorted by name.
    Dir(PathBuf),
    /// One unit per non-empty line of a JSON-lines file.
    JsonLines(PathBuf),
    /// One unit per point of a parameter grid.
    Sweep(Sweep),
}

/// Redundancy: `replicas` copies run on distinct hosts (or peers, by `placement`); `quorum`
/// identical outputs accept a unit; disagreement asks for more replicas, up to `max_attempts`
/// in all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Redundancy {
    /// Copies started at once.
    pub replicas: u32,
    /// Identical outputs needed.
    pub quorum: u32,
    /// Most executions of one unit.
    pub max_attempts: u32,
    /// Whether replicas go to distinct hosts (the default) or only to distinct peers.
    pub placement: Placement,
    /// Adaptive replication: a peer this submitter trusts may run a unit alone, spot-checked
    /// and re-run if the peer is ever caught. Off by default.
    pub adaptive: bool,
    /// With `adaptive`, the peers on the submitting node's `--allow` list (a lab's own
    /// machines) run units alone without spot checks.
    pub trust_allow_list: bool,
}

impl From<Redundancy> for crate::validate::Policy {
    fn from(r: Redundancy) -> Self {
        Self::new(r.replicas, r.quorum, r.max_attempts)
    }
}

/// Limits every replica of every unit runs under.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct JobLimits {
    /// Linear memory cap in MiB.
    pub memory_mb: u64,
    /// Wall-clock limit per unit.
    pub timeout: Duration,
    /// Optional deterministic fuel budget.
    pub fuel: Option<u64>,
}

impl JobLimits {
    /// The sandbox limits of one unit.
    /// The limits every replica runs under. The output cap is the network's wherever the job
    /// runs, so a unit's verdict never depends on whether it ran here or on peers.
    pub fn to_limits(&self) -> Limits {
        Limits {
            memory_bytes: self.memory_mb << 20,
            timeout: self.timeout,
            fuel: self.fuel,
            output_bytes: crate::job::proto::MAX_NETWORK_OUTPUT,
            ..Limits::default()
        }
    }
}

/// A parameter sweep: the cartesian product of named parameters' values. Parameters are ordered
/// by name and the last one varies fastest; unit `i`'s input is a JSON object of every
/// parameter's value at that point, keys sorted.
#[derive(Debug, Clone, PartialEq)]
pub struct Sweep {
    params: Vec<(String, Values)>,
    units: u64,
}

/// One sweep parameter's values: a list as written, or a range computed a value at a time, so
/// a range of a hundred million values costs a few numbers.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub enum Values {
    /// The values as listed.
    List(Vec<serde_json::Value>),
    /// `start + i × step` for `i` below `count`; whole numbers when every bound was one.
    Step {
        start: f64,
        step: f64,
        count: u64,
        integers: bool,
    },
    /// `count` values evenly spaced from `start` to `stop`.
    Spaced { start: f64, stop: f64, count: u64 },
}

impl Values {
    /// How many values.
    pub fn len(&self) -> u64 {
        match self {
            Self::List(values) => values.len() as u64,
            Self::Step { count, .. } | Self::Spaced { count, .. } => *count,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The `i`th value.
    pub fn get(&self, i: u64) -> Option<serde_json::Value> {
        if i >= self.len() {
            return None;
        }
        Some(match self {
            Self::List(values) => values.get(usize::try_from(i).ok()?)?.clone(),
            Self::Step {
                start,
                step,
                integers,
                ..
            } => {
                // Each value from the start, not by accumulation, so no drift.
                let v = start + i as f64 * step;
                if *integers {
                    serde_json::Value::from(v as i64)
                } else {
                    serde_json::Value::from(tidy(v))
                }
            }
            Self::Spaced { start, stop, count } => {
                let v = if *count == 1 {
                    *start
                } else {
                    start + (stop - start) * i as f64 / (count - 1) as f64
                };
                serde_json::Value::from(tidy(v))
            }
        })
    }

    /// Every value, in order.
    pub fn iter(&self) -> impl Iterator<Item = serde_json::Value> + '_ {
        (0..self.len()).filter_map(|i| self.get(i))
    }
}

impl Sweep {
    /// The number of points.
    pub fn len(&self) -> u64 {
        self.units
    }

    /// Whether the sweep has no points (never true for a validated manifest).
    pub fn is_empty(&self) -> bool {
        self.units == 0
    }

    /// The parameters and their values, ordered by name.
    pub fn params(&self) -> &[(String, Values)] {
        &self.params
    }

    /// The point with this index, as a JSON object.
    pub fn point(&self, index: u64) -> Option<serde_json::Map<String, serde_json::Value>> {
        if index >= self.units {
            return None;
        }
        let mut rest = index;
        let mut values = Vec::with_capacity(self.params.len());
        for (_, options) in self.params.iter().rev() {
            let n = options.len();
            values.push(options.get(rest % n)?);
            rest /= n;
        }
        values.reverse();
        Some(
            self.params
                .iter()
                .map(|(name, _)| name.clone())
                .zip(values)
                .collect(),
        )
    }

    /// The input bytes of the point with this index (compact JSON).
    pub fn input(&self, index: u64) -> Option<Vec<u8>> {
        self.point(index)
            .map(|p| serde_json::Value::Object(p).to_string().into_bytes())
    }
}

/// One unit's input, as a job enumerates them.
#[derive(Debug, Clone, PartialEq)]
pub struct UnitInput {
    /// The unit's index within the job.
    pub index: u64,
    /// Its input bytes.
    pub bytes: Vec<u8>,
    /// Where it came from, for the results: a file name, a line number or the sweep point.
    pub origin: serde_json::Value,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawManifest {
    name: String,
    module: PathBuf,
    inputs: RawInputs,
    #[serde(default)]
    redundancy: RawRedundancy,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    wasi: RawWasi,
}

/// `[wasi]`: what a WASI program is started with.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawWasi {
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInputs {
    files: Option<Vec<PathBuf>>,
    dir: Option<PathBuf>,
    jsonl: Option<PathBuf>,
    sweep: Option<toml::Table>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRedundancy {
    #[serde(default = "default_replicas")]
    replicas: i64,
    quorum: Option<i64>,
    max_attempts: Option<i64>,
    placement: Option<String>,
    #[serde(default)]
    adaptive: bool,
    trusted: Option<PathBuf>,
    #[serde(default)]
    trust_allow_list: bool,
}

fn default_replicas() -> i64 {
    2
}

impl Default for RawRedundancy {
    fn default() -> Self {
        Self {
            replicas: default_replicas(),
            quorum: None,
            max_attempts: None,
            placement: None,
            adaptive: false,
            trusted: None,
            trust_allow_list: false,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    #[serde(default = "default_memory_mb")]
    memory_mb: i64,
    #[serde(default = "default_timeout_secs")]
    timeout_secs: f64,
    fuel: Option<i64>,
}

fn default_memory_mb() -> i64 {
    256
}

fn default_timeout_secs() -> f64 {
    60.0
}

impl Default for RawLimits {
    fn default() -> Self {
        Self {
            memory_mb: default_memory_mb(),
            timeout_secs: default_timeout_secs(),
            fuel: None,
        }
    }
}

/// Builds `Invalid` errors for one manifest.
struct Check<'a> {
    path: &'a Path,
}

impl Check<'_> {
    fn invalid(&self, field: impl fmt::Display, problem: impl fmt::Display) -> ManifestError {
        ManifestError::Invalid {
            path: self.path.to_owned(),
            field: field.to_string(),
            problem: problem.to_string(),
        }
    }

    fn in_range(&self, field: &str, value: i64, low: i64, high: i64) -> Result<u32, ManifestError> {
        if value < low || value > high {
            return Err(self.invalid(
                field,
                format!("must be between {low} and {high}, not {value}"),
            ));
        }
        u32::try_from(value).map_err(|_| self.invalid(field, "out of range"))
    }
}

impl JobManifest {
    /// Reads and validates the manifest at `path`, and checks that the files it names exist.
    pub fn load(path: &Path) -> Result<Self, ManifestError> {
        let io = |source| ManifestError::Io {
            path: path.to_owned(),
            source,
        };
        let size = std::fs::metadata(path).map_err(io)?.len();
        if size > MAX_MANIFEST_BYTES {
            return Err(ManifestError::Syntax {
                path: path.to_owned(),
                message: format!(
                    "the manifest is {size} bytes, over the cap of {MAX_MANIFEST_BYTES}"
                ),
            });
        }
        let text = std::fs::read_to_string(path).map_err(io)?;
        let base = path.parent().unwrap_or(Path::new("."));
        let manifest = Self::parse(&text, path, base)?;
        manifest.check_files(path)?;
        Ok(manifest)
    }

    /// The peers of the `trusted` file, if the manifest names one: one peer id per line,
    /// blank lines and `#` comments allowed, at most [`MAX_TRUSTED_PEERS`] of them.
    pub fn trusted_peers(&self) -> Result<Vec<crate::peer_id::PeerId>, ManifestError> {
        let Some(path) = &self.trusted else {
            return Ok(Vec::new());
        };
        let invalid = |problem: String| ManifestError::Invalid {
            path: path.clone(),
            field: "redundancy.trusted".into(),
            problem,
        };
        let size = std::fs::metadata(path)
            .map_err(|source| ManifestError::Io {
                path: path.clone(),
                source,
            })?
            .len();
        if size > MAX_MANIFEST_BYTES {
            return Err(invalid(format!(
                "the file is {size} bytes, over the cap of {MAX_MANIFEST_BYTES}"
            )));
        }
        let text = std::fs::read_to_string(path).map_err(|source| ManifestError::Io {
            path: path.clone(),
            source,
        })?;
        let mut peers = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let peer = line.parse().map_err(|_| {
                invalid(format!(
                    "line {}: {:?} is not a peer id",
                    n + 1,
                    crate::text::bounded(line, 80)
                ))
            })?;
            if peers.len() >= MAX_TRUSTED_PEERS {
                return Err(invalid(format!("more than {MAX_TRUSTED_PEERS} peers")));
            }
            peers.push(peer);
        }
        Ok(peers)
    }

    /// Parses and validates manifest text; `path` names it in errors and relative paths are
    /// resolved against `base`. Does not touch the file system.
    pub fn parse(text: &str, path: &Path, base: &Path) -> Result<Self, ManifestError> {
        let raw: RawManifest = toml::from_str(text).map_err(|e| ManifestError::Syntax {
            path: path.to_owned(),
            message: crate::toml_text::describe(text, &e),
        })?;
        let check = Check { path };

        let name = raw.name.trim().to_owned();
        if name.is_empty() || name.len() > 64 {
            return Err(check.invalid("name", "must be 1 to 64 characters"));
        }
        if !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err(check.invalid("name", "may only use letters, digits, '-', '_' and '.'"));
        }
        if raw.module.as_os_str().is_empty() {
            return Err(check.invalid("module", "must name the module file"));
        }

        let sources = [
            raw.inputs.files.is_some(),
            raw.inputs.dir.is_some(),
            raw.inputs.jsonl.is_some(),
            raw.inputs.sweep.is_some(),
        ];
        let inputs = match sources.iter().filter(|s| **s).count() {
            0 => {
                return Err(
                    check.invalid("inputs", "give one of `files`, `dir`, `jsonl` or `sweep`")
                );
            }
            1 => {
                if let Some(files) = raw.inputs.files {
                    if files.is_empty() {
                        return Err(check.invalid("inputs.files", "must list at least one file"));
                    }
                    if files.len() as u64 > MAX_UNITS {
                        return Err(
                            check.invalid("inputs.files", format!("more than {MAX_UNITS} files"))
                        );
                    }
                    InputSpec::Files(files.into_iter().map(|f| base.join(f)).collect())
                } else if let Some(dir) = raw.inputs.dir {
                    InputSpec::Dir(base.join(dir))
                } else if let Some(jsonl) = raw.inputs.jsonl {
                    InputSpec::JsonLines(base.join(jsonl))
                } else if let Some(sweep) = raw.inputs.sweep {
                    InputSpec::Sweep(sweep_from(&check, &sweep)?)
                } else {
                    return Err(check.invalid("inputs", "no input source"));
                }
            }
            _ => {
                return Err(check.invalid(
                    "inputs",
                    "give only one of `files`, `dir`, `jsonl` or `sweep`",
                ));
            }
        };

        let r = raw.redundancy;
        let replicas = check.in_range(
            "redundancy.replicas",
            r.replicas,
            1,
            i64::from(MAX_REPLICAS),
        )?;
        // A majority of the replicas by default, as BOINC's rule does.
        let quorum = check.in_range(
            "redundancy.quorum",
            r.quorum.unwrap_or(i64::from(replicas / 2 + 1)),
            1,
            i64::from(replicas),
        )?;
        let max_attempts = check.in_range(
            "redundancy.max_attempts",
            r.max_attempts
                .unwrap_or(i64::from((replicas * 2).max(replicas + 2))),
            i64::from(replicas),
            i64::from(MAX_ATTEMPTS),
        )?;
        let placement = match r.placement.as_deref() {
            None | Some("host") => Placement::Host,
            Some("peer") => Placement::Peer,
            Some(other) => {
                return Err(check.invalid(
                    "redundancy.placement",
                    format!("must be \"host\" or \"peer\", not {other:?}"),
                ));
            }
        };

        let program = crate::sandbox::Program {
            args: raw.wasi.args,
            env: raw.wasi.env.into_iter().collect(),
        };
        program
            .check()
            .map_err(|problem| check.invalid("wasi", problem))?;
        let l = raw.limits;
        let max_mb = (MAX_MEMORY_BYTES >> 20) as i64;
        let memory_mb = u64::from(check.in_range("limits.memory_mb", l.memory_mb, 1, max_mb)?);
        if !(l.timeout_secs.is_finite()
            && l.timeout_secs > 0.0
            && l.timeout_secs <= MAX_TIMEOUT_SECS)
        {
            return Err(check.invalid(
                "limits.timeout_secs",
                format!("must be above 0 and at most {MAX_TIMEOUT_SECS} (a week)"),
            ));
        }
        let fuel = match l.fuel {
            None => None,
            Some(f) if f > 0 => Some(f as u64),
            Some(f) => {
                return Err(check.invalid("limits.fuel", format!("must be above 0, not {f}")));
            }
        };

        Ok(Self {
            name,
            module: base.join(raw.module),
            inputs,
            redundancy: Redundancy {
                replicas,
                quorum,
                max_attempts,
                placement,
                adaptive: r.adaptive,
                trust_allow_list: r.trust_allow_list,
            },
            trusted: r.trusted.map(|t| base.join(t)),
            limits: JobLimits {
                memory_mb,
                timeout: Duration::from_secs_f64(l.timeout_secs),
                fuel,
            },
            program,
        })
    }

    /// Checks that the module and the input files, directory or JSON-lines file exist and are
    /// within their caps.
    fn check_files(&self, path: &Path) -> Result<(), ManifestError> {
        let check = Check { path };
        let file_size = |field: &str, file: &Path| -> Result<u64, ManifestError> {
            let meta = std::fs::metadata(file)
                .map_err(|e| check.invalid(field, format!("{}: {e}", file.display())))?;
            if !meta.is_file() {
                return Err(check.invalid(field, format!("{} is not a file", file.display())));
            }
            Ok(meta.len())
        };
        let size = file_size("module", &self.module)?;
        if size > MAX_MODULE_BYTES {
            return Err(check.invalid(
                "module",
                format!("{size} bytes is over the module cap of {MAX_MODULE_BYTES}"),
            ));
        }
        match &self.inputs {
            InputSpec::Files(files) => {
                for file in files {
                    if file_size("inputs.files", file)? > MAX_INPUT_BYTES {
                        return Err(check.invalid(
                            "inputs.files",
                            format!(
                                "{} is over the input cap of {MAX_INPUT_BYTES} bytes",
                                file.display()
                            ),
                        ));
                    }
                }
            }
            InputSpec::Dir(dir) => {
                let files = dir_files(dir)
                    .map_err(|e| check.invalid("inputs.dir", format!("{}: {e}", dir.display())))?;
                if files.is_empty() {
                    return Err(
                        check.invalid("inputs.dir", format!("{} holds no files", dir.display()))
                    );
                }
            }
            InputSpec::JsonLines(file) => {
                file_size("inputs.jsonl", file)?;
            }
            InputSpec::Sweep(_) => {}
        }
        Ok(())
    }

    /// Every unit's input, in index order, read at once: for tests and small jobs. A job
    /// reads its inputs as its units need them ([`crate::job::inputs::UnitSource`]). A file
    /// that vanished or a JSON line that does not parse is an error naming it.
    pub fn units(&self, manifest_path: &Path) -> Result<Vec<UnitInput>, ManifestError> {
        let source = crate::job::inputs::UnitSource::open(self, manifest_path)?;
        (0..source.len())
            .map(|i| {
                source.unit(i).map_err(|e| ManifestError::Invalid {
                    path: manifest_path.to_owned(),
                    field: "inputs".into(),
                    problem: e.to_string(),
                })
            })
            .collect()
    }
}

/// Regular files in `dir`, sorted by name, capped at [`MAX_UNITS`].
pub(crate) fn dir_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            files.push(entry.path());
            if files.len() as u64 > MAX_UNITS {
                return Err(std::io::Error::other(format!(
                    "more than {MAX_UNITS} files"
                )));
            }
        }
    }
    files.sort();
    Ok(files)
}

fn scalar(
    check: &Check<'_>,
    field: &str,
    value: &toml::Value,
) -> Result<serde_json::Value, ManifestError> {
    match value {
        toml::Value::Integer(i) => Ok((*i).into()),
        toml::Value::Float(f) if f.is_finite() => Ok((*f).into()),
        toml::Value::Float(_) => Err(check.invalid(field, "values must be finite numbers")),
        toml::Value::String(s) => Ok(s.clone().into()),
        toml::Value::Boolean(b) => Ok((*b).into()),
        _ => Err(check.invalid(field, "values must be numbers, strings or booleans")),
    }
}

fn number(
    check: &Check<'_>,
    field: &str,
    table: &toml::Table,
    key: &str,
) -> Result<Option<f64>, ManifestError> {
    match table.get(key) {
        None => Ok(None),
        Some(toml::Value::Integer(i)) => Ok(Some(*i as f64)),
        Some(toml::Value::Float(f)) if f.is_finite() => Ok(Some(*f)),
        Some(_) => Err(check.invalid(format!("{field}.{key}"), "must be a finite number")),
    }
}

/// The values of one sweep parameter: a list, a range `{ start, stop, step }` (stop included
/// when the steps land on it), a linear space `{ start, stop, count }`, or a single value.
fn parameter(check: &Check<'_>, field: &str, value: &toml::Value) -> Result<Values, ManifestError> {
    match value {
        toml::Value::Array(items) => {
            if items.is_empty() {
                return Err(check.invalid(field, "the list of values is empty"));
            }
            if items.len() as u64 > MAX_POINTS_PER_PARAMETER {
                return Err(check.invalid(
                    field,
                    format!("more than {MAX_POINTS_PER_PARAMETER} values"),
                ));
            }
            items
                .iter()
                .map(|v| scalar(check, field, v))
                .collect::<Result<_, _>>()
                .map(Values::List)
        }
        toml::Value::Table(table) => {
            if let Some(key) = table
                .keys()
                .find(|k| !matches!(k.as_str(), "start" | "stop" | "step" | "count"))
            {
                return Err(check.invalid(
                    format!("{field}.{key}"),
                    "unknown key; a range has `start`, `stop` and `step` or `count`",
                ));
            }
            let start = number(check, field, table, "start")?
                .ok_or_else(|| check.invalid(field, "a range needs `start`"))?;
            let stop = number(check, field, table, "stop")?
                .ok_or_else(|| check.invalid(field, "a range needs `stop`"))?;
            if stop < start {
                return Err(check.invalid(field, "`stop` is below `start`"));
            }
            let integers = [table.get("start"), table.get("stop"), table.get("step")]
                .iter()
                .flatten()
                .all(|v| matches!(v, toml::Value::Integer(_)));
            match (table.get("step"), table.get("count")) {
                (Some(_), Some(_)) => Err(check.invalid(field, "give `step` or `count`, not both")),
                (None, None) => Err(check.invalid(field, "a range needs `step` or `count`")),
                (Some(_), None) => {
                    let step = number(check, field, table, "step")?.unwrap_or(0.0);
                    if step <= 0.0 {
                        return Err(check.invalid(format!("{field}.step"), "must be above 0"));
                    }
                    // Tolerate rounding so that 0.1..=0.5 step 0.1 includes 0.5.
                    let points = ((stop - start) / step + 1e-9).floor() + 1.0;
                    if points > MAX_SWEEP_UNITS as f64 {
                        return Err(
                            check.invalid(field, format!("more than {MAX_SWEEP_UNITS} values"))
                        );
                    }
                    let values = Values::Step {
                        start,
                        step,
                        count: points as u64,
                        integers,
                    };
                    finite_ends(check, field, &values)?;
                    Ok(values)
                }
                (None, Some(count)) => {
                    let toml::Value::Integer(count) = count else {
                        return Err(check.invalid(format!("{field}.count"), "must be an integer"));
                    };
                    if *count < 1 || *count as u64 > MAX_SWEEP_UNITS {
                        return Err(check.invalid(
                            format!("{field}.count"),
                            format!("must be between 1 and {MAX_SWEEP_UNITS}"),
                        ));
                    }
                    let values = Values::Spaced {
                        start,
                        stop,
                        count: *count as u64,
                    };
                    finite_ends(check, field, &values)?;
                    Ok(values)
                }
            }
        }
        other => Ok(Values::List(vec![scalar(check, field, other)?])),
    }
}

/// Rounds a computed grid value to 15 significant digits, so that `0.1 + 2 × 0.1` is the `0.3`
/// a scientist wrote rather than `0.30000000000000004`. Formatting and parsing are exact and
/// identical everywhere, so every peer derives the same value. Near the largest `f64` the
/// rounding would overflow to infinity; such a value is kept as it is.
fn tidy(v: f64) -> f64 {
    format!("{v:.14e}")
        .parse()
        .ok()
        .filter(|t: &f64| t.is_finite())
        .unwrap_or(v)
}

/// Refuses a range whose width or steps leave the finite numbers (`stop - start` overflows):
/// JSON has no infinity or NaN, and `serde_json` would turn them into `null`, an input no
/// manifest asked for. A range's values run from its first to its last, so checking those two
/// checks them all.
fn finite_ends(check: &Check<'_>, field: &str, values: &Values) -> Result<(), ManifestError> {
    let finite = |i: u64| {
        let v = match values {
            Values::Step { start, step, .. } => start + i as f64 * step,
            Values::Spaced { start, stop, count } if *count > 1 => {
                start + (stop - start) * i as f64 / (count - 1) as f64
            }
            Values::Spaced { start, .. } => *start,
            Values::List(_) => 0.0,
        };
        tidy(v).is_finite()
    };
    if !finite(0) || !finite(values.len().saturating_sub(1)) {
        return Err(check.invalid(field, "the range's values overflow the finite numbers"));
    }
    Ok(())
}

fn sweep_from(check: &Check<'_>, table: &toml::Table) -> Result<Sweep, ManifestError> {
    if table.is_empty() {
        return Err(check.invalid("inputs.sweep", "needs at least one parameter"));
    }
    let mut params = Vec::with_capacity(table.len());
    let mut units: u64 = 1;
    // `toml::Table` is ordered by key, which fixes the enumeration order.
    for (name, value) in table {
        let field = format!("inputs.sweep.{name}");
        let values = parameter(check, &field, value)?;
        units = units
            .checked_mul(values.len() as u64)
            .filter(|&u| u <= MAX_SWEEP_UNITS)
            .ok_or_else(|| {
                check.invalid(
                    "inputs.sweep",
                    format!("the grid has more than {MAX_SWEEP_UNITS} points"),
                )
            })?;
        params.push((name.clone(), values));
    }
    Ok(Sweep { params, units })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    fn parse(text: &str) -> Result<JobManifest, ManifestError> {
        JobManifest::parse(text, Path::new("job.toml"), Path::new("/jobs"))
    }

    #[test]
    fn a_toml_error_names_the_place_and_field_in_words_with_the_line_below() {
        let err = parse("name = \"x\"\nmodule = \"m.wasm\"\n[inputs.sweep]\nseed = [1, 2]\n[redundancy]\nreplicas = \"two\"\n")
            .unwrap_err()
            .to_string();
        let lines: Vec<&str> = err.lines().collect();
        assert_eq!(lines.len(), 3, "{err}");
        assert!(
            lines[0].starts_with("job.toml: line 6, column 12, field `redundancy.replicas`: "),
            "{err}"
        );
        assert!(lines[0].contains("expected a whole number"), "{err}");
        assert!(!err.contains("i64"), "{err}");
        assert_eq!(lines[1], "  6 | replicas = \"two\"");
        assert_eq!(lines[2], "    |            ^^^^^");

        let err = parse("name = \"x\"\nmodule = \"m.wasm\"\n[inputs.sweep]\nseed = [1, 2\n")
            .unwrap_err()
            .to_string();
        let lines: Vec<&str> = err.lines().collect();
        assert_eq!(lines.len(), 3, "{err}");
        assert!(lines[0].starts_with("job.toml: line 4, column "), "{err}");
        assert_eq!(lines[1], "  4 | seed = [1, 2");
        assert!(lines[2].trim_end().ends_with('^'), "{err}");
        // A line too long to quote is left out; the place is still given.
        let long = format!(
            "name = \"x\"\nmodule = \"m.wasm\"\nnote = {}\n",
            "x".repeat(500)
        );
        let err = parse(&long).unwrap_err().to_string();
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains("line 3, column 8"), "{err}");
    }

    fn refusal(text: &str) -> (String, String) {
        match parse(text) {
            Err(ManifestError::Invalid { field, problem, .. }) => (field, problem),
            Err(other) => (String::from("<syntax>"), other.to_string()),
            Ok(m) => panic!("accepted: {m:?}"),
        }
    }

    const SWEEP: &str = r#"
        name = "sir-grid"
        module = "sir.wasm"
        [inputs.sweep]
        beta = { start = 0.1, stop = 0.5, step = 0.1 }
        gamma = [0.1, 0.2]
        days = 365
        [redundancy]
        replicas = 3
    "#;

    #[test]
    fn a_wasi_programs_arguments_and_environment_come_from_the_manifest() {
        let m = parse(&format!(
            "{SWEEP}\n[wasi]\nargs = [\"--steps\", \"100\"]\nenv = {{ OMP_NUM_THREADS = \"1\", LANG = \"C\" }}\n"
        ))
        .unwrap();
        assert_eq!(m.program.args, ["--steps", "100"]);
        assert_eq!(
            m.program.env,
            [
                ("LANG".to_owned(), "C".to_owned()),
                ("OMP_NUM_THREADS".to_owned(), "1".to_owned())
            ]
        );
        assert_eq!(m.unit_limits().program, m.program);
        assert_eq!(
            parse(SWEEP).unwrap().program,
            crate::sandbox::Program::default()
        );
        let (field, problem) = refusal(&format!("{SWEEP}\n[wasi]\nenv = {{ \"A=B\" = \"1\" }}\n"));
        assert_eq!(field, "wasi", "{problem}");
        let (field, problem) = refusal(&format!("{SWEEP}\n[wasi]\nargv = [\"x\"]\n"));
        assert!(problem.contains("argv"), "{field}: {problem}");
    }

    #[test]
    fn sweep_enumerates_the_cartesian_product_in_a_fixed_order() {
        let m = parse(SWEEP).unwrap();
        assert_eq!(m.module, Path::new("/jobs/sir.wasm"));
        assert_eq!(
            m.redundancy,
            Redundancy {
                replicas: 3,
                quorum: 2,
                max_attempts: 6,
                placement: Placement::Host,
                adaptive: false,
                trust_allow_list: false,
            }
        );
        let InputSpec::Sweep(sweep) = &m.inputs else {
            panic!("a sweep")
        };
        assert_eq!(sweep.len(), 5 * 2);
        let names: Vec<&str> = sweep.params().iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["beta", "days", "gamma"]);
        assert_eq!(
            String::from_utf8(sweep.input(0).unwrap()).unwrap(),
            r#"{"beta":0.1,"days":365,"gamma":0.1}"#
        );
        assert_eq!(
            String::from_utf8(sweep.input(1).unwrap()).unwrap(),
            r#"{"beta":0.1,"days":365,"gamma":0.2}"#
        );
        // 0.1 + k × 0.1 computed from the start and tidied: the values a person wrote.
        assert_eq!(sweep.point(9).unwrap()["beta"], serde_json::json!(0.5));
        assert_eq!(sweep.point(4).unwrap()["beta"], serde_json::json!(0.3));
        assert_eq!(sweep.input(10), None);
        let units = m.units(Path::new("job.toml")).unwrap();
        assert_eq!(units.len(), 10);
        assert_eq!(units[3].index, 3);
    }

    #[test]
    fn ranges_at_the_edge_of_the_floats_give_finite_values_or_are_refused() {
        // `stop - start` overflows: the middle values would be infinite and the first NaN.
        let wide = SWEEP.replace(
            "beta = { start = 0.1, stop = 0.5, step = 0.1 }",
            "beta = { start = -1e308, stop = 1e308, count = 3 }",
        );
        assert_eq!(refusal(&wide).0, "inputs.sweep.beta");
        // Rounding f64::MAX to 15 digits overflows; the value is kept as written.
        let edge = SWEEP.replace(
            "beta = { start = 0.1, stop = 0.5, step = 0.1 }",
            "beta = { start = 1.7976931348623157e308, stop = 1.7976931348623157e308, count = 1 }",
        );
        let InputSpec::Sweep(sweep) = parse(&edge).unwrap().inputs else {
            panic!("a sweep")
        };
        assert_eq!(
            sweep.params()[0].1.iter().collect::<Vec<_>>(),
            [serde_json::Value::from(f64::MAX)]
        );
        // The rounding tolerance takes a third step a hair past `stop`, which is past the
        // largest float.
        let past = SWEEP.replace(
            "beta = { start = 0.1, stop = 0.5, step = 0.1 }",
            "beta = { start = 0.0, stop = 1.7976931348623157e308, step = 8.988465674761003e307 }",
        );
        assert_eq!(refusal(&past).0, "inputs.sweep.beta");
    }

    #[test]
    fn integer_ranges_and_linear_spaces() {
        let m = parse(
            r#"name = "n"
               module = "m.wasm"
               [inputs.sweep]
               seed = { start = 1, stop = 100, step = 1 }
               x = { start = 0.0, stop = 1.0, count = 5 }"#,
        )
        .unwrap();
        let InputSpec::Sweep(sweep) = &m.inputs else {
            panic!("a sweep")
        };
        assert_eq!(sweep.len(), 500);
        assert_eq!(sweep.point(0).unwrap()["seed"], serde_json::json!(1));
        assert_eq!(sweep.point(499).unwrap()["seed"], serde_json::json!(100));
        assert_eq!(sweep.point(4).unwrap()["x"], serde_json::json!(1.0));
        assert_eq!(sweep.point(2).unwrap()["x"], serde_json::json!(0.5));
    }

    #[test]
    fn refusals_name_the_field() {
        let cases = [
            (
                r#"module = "m.wasm"
                [inputs]
                files = ["a"]"#,
                "<syntax>",
                "name",
            ),
            (
                r#"name = "x"
                module = "m.wasm"
                [inputs]"#,
                "inputs",
                "one of",
            ),
            (
                r#"name = "x"
                module = "m.wasm"
                [inputs]
                files = ["a"]
                jsonl = "b""#,
                "inputs",
                "only one",
            ),
            (
                r#"name = "bad name!"
                module = "m.wasm"
                [inputs]
                files = ["a"]"#,
                "name",
                "letters",
            ),
            (
                r#"name = "x"
                module = "m.wasm"
                [inputs]
                files = ["a"]
                [redundancy]
                replicas = 2
                quorum = 3"#,
                "redundancy.quorum",
                "between 1 and 2",
            ),
            (
                r#"name = "x"
                module = "m.wasm"
                [inputs]
                files = ["a"]
                [redundancy]
                replicas = 0"#,
                "redundancy.replicas",
                "between",
            ),
            (
                r#"name = "x"
                module = "m.wasm"
                [inputs]
                files = ["a"]
                [redundancy]
                replicas = 3
                max_attempts = 2"#,
                "redundancy.max_attempts",
                "between 3",
            ),
            (
                r#"name = "x"
                module = "m.wasm"
                [inputs]
                files = ["a"]
                [redundancy]
                placement = "rack""#,
                "redundancy.placement",
                "\"host\" or \"peer\"",
            ),
            (
                r#"name = "x"
                module = "m.wasm"
                [inputs]
                files = ["a"]
                [limits]
                memory_mb = 5000"#,
                "limits.memory_mb",
                "between 1 and 4096",
            ),
            (
                r#"name = "x"
                module = "m.wasm"
                [inputs]
                files = ["a"]
                [limits]
                timeout_secs = -1.0"#,
                "limits.timeout_secs",
                "above 0",
            ),
            (
                r#"name = "x"
                module = "m.wasm"
                [inputs]
                files = ["a"]
                [limits]
                fuel = 0"#,
                "limits.fuel",
                "above 0",
            ),
            (
                r#"name = "x"
                module = "m.wasm"
                [inputs.sweep]
                a = { start = 1, stop = 0, step = 1 }"#,
                "inputs.sweep.a",
                "below",
            ),
            (
                r#"name = "x"
                module = "m.wasm"
                [inputs.sweep]
                a = { start = 0, stop = 1, step = 0 }"#,
                "inputs.sweep.a.step",
                "above 0",
            ),
            (
                r#"name = "x"
                module = "m.wasm"
                [inputs.sweep]
                a = { start = 0, stop = 1, steps = 3 }"#,
                "inputs.sweep.a.steps",
                "unknown key",
            ),
            (
                r#"name = "x"
                module = "m.wasm"
                [inputs.sweep]
                a = []"#,
                "inputs.sweep.a",
                "empty",
            ),
            (
                r#"name = "x"
                module = "m.wasm"
                [inputs.sweep]
                a = { start = 0, stop = 999999, step = 1 }
                b = { start = 0, stop = 999, step = 1 }"#,
                "inputs.sweep",
                "more than",
            ),
            (
                r#"name = "x"
                module = "m.wasm"
                colour = "blue"
                [inputs]
                files = ["a"]"#,
                "<syntax>",
                "colour",
            ),
        ];
        for (text, field, needle) in cases {
            let (got_field, problem) = refusal(text);
            assert_eq!(got_field, field, "{problem}");
            assert!(
                problem.contains(needle),
                "{field}: {problem:?} should mention {needle:?}"
            );
        }
    }

    #[test]
    fn files_directories_and_json_lines_are_checked_on_load() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::write(root.join("m.wasm"), b"\0asm\x01\0\0\0").unwrap();
        std::fs::create_dir(root.join("in")).unwrap();
        std::fs::write(root.join("in/b.json"), b"{\"x\":2}").unwrap();
        std::fs::write(root.join("in/a.json"), b"{\"x\":1}").unwrap();
        std::fs::write(root.join("lines.jsonl"), "{\"x\":1}\n\n[2, 3]\n").unwrap();
        std::fs::write(root.join("bad.jsonl"), "{\"x\":1}\nnot json\n").unwrap();
        let write = |name: &str, inputs: &str| {
            let path = root.join(name);
            std::fs::write(
                &path,
                format!("name = \"j\"\nmodule = \"m.wasm\"\n[inputs]\n{inputs}\n"),
            )
            .unwrap();
            path
        };

        let path = write("dir.toml", "dir = \"in\"");
        let m = JobManifest::load(&path).unwrap();
        let units = m.units(&path).unwrap();
        assert_eq!(units.len(), 2);
        assert_eq!(units[0].bytes, b"{\"x\":1}", "sorted by file name");

        let path = write("lines.toml", "jsonl = \"lines.jsonl\"");
        let units = JobManifest::load(&path).unwrap().units(&path).unwrap();
        assert_eq!(units.len(), 2);
        assert_eq!(units[1].bytes, b"[2,3]");
        assert_eq!(units[1].origin["line"], 3);

        let path = write("bad.toml", "jsonl = \"bad.jsonl\"");
        let err = JobManifest::load(&path).unwrap().units(&path).unwrap_err();
        assert!(err.to_string().contains("line 2"), "{err}");

        let path = write("missing.toml", "files = [\"in/a.json\", \"nope.json\"]");
        let err = JobManifest::load(&path).unwrap_err();
        assert!(err.to_string().contains("inputs.files"), "{err}");

        std::fs::remove_file(root.join("m.wasm")).unwrap();
        let path = write("nomodule.toml", "dir = \"in\"");
        let err = JobManifest::load(&path).unwrap_err();
        assert!(
            matches!(&err, ManifestError::Invalid { field, .. } if field == "module"),
            "{err}"
        );
    }

    #[test]
    fn the_example_manifests_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/jobs");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                let text = std::fs::read_to_string(&path).unwrap();
                let m = JobManifest::parse(&text, &path, &dir)
                    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                if let InputSpec::JsonLines(file) = &m.inputs {
                    assert!(m.units(&path).unwrap().len() > 1, "{}", file.display());
                }
                seen += 1;
            }
        }
        assert!(seen >= 3);
    }

    #[test]
    fn arbitrary_text_never_panics() {
        let mut rng = Rng::seed_from_u64(7);
        let pieces = [
            "name",
            "module",
            "=",
            "\"x\"",
            "[inputs]",
            "[inputs.sweep]",
            "files",
            "[",
            "]",
            "{",
            "}",
            "start",
            "stop",
            "step",
            "count",
            "1",
            "-1",
            "0.5",
            "1e308",
            "nan",
            "inf",
            ",",
            "\n",
            "[redundancy]",
            "replicas",
            "quorum",
            "[limits]",
            "fuel",
            "timeout_secs",
            "\"",
            "#",
        ];
        for _ in 0..3000 {
            let mut text = String::new();
            for _ in 0..rng.below(40) {
                text.push_str(pieces[rng.below(pieces.len() as u64) as usize]);
                text.push(' ');
            }
            let _ = parse(&text);
            let bytes: Vec<u8> = (0..rng.below(200)).map(|_| rng.next_u64() as u8).collect();
            let _ = parse(&String::from_utf8_lossy(&bytes));
        }
    }
}
