//! The config file of `worker run`, and `worker config`, which shows what a `worker run` with
//! the same arguments would use and where each setting comes from.
//!
//! Every `worker run` flag is a key of the same name in snake_case (`--max-unit-secs` is
//! `max_unit_secs`; `--no-mdns` is `no_mdns`). Settings are layered: a flag given on the
//! command line, else the file's key, else the flag's default. The layering goes through the
//! command line parser itself: the file's keys become the flags they name, so a value from
//! the file is checked exactly as the same flag would be, and the defaults shown by
//! `worker run --help` are the defaults used.

use std::ffi::OsString;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{ArgMatches, Args, FromArgMatches, parser::ValueSource};
use serde::{Deserialize, Serialize};

use crate::Failure;
use crate::run::RunArgs;

/// Largest config file read.
const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// The keys a config file may set: one per `worker run` flag, by the same name. A missing key
/// leaves the flag's default. A key added here must name a `worker run` flag (a test checks).
#[derive(Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FileKeys {
    listen: Option<String>,
    bootstrap: Option<Vec<String>>,
    data_dir: Option<PathBuf>,
    cpus: Option<u16>,
    memory_mb: Option<u32>,
    memory_mb_idle: Option<u32>,
    max_unit_secs: Option<u64>,
    /// Named `max_cache_mb` before it covered everything the peer stores.
    #[serde(alias = "max_cache_mb")]
    max_disk_mb: Option<u64>,
    no_mdns: Option<bool>,
    advertise: Option<Vec<String>>,
    dial_out_only: Option<bool>,
    allow: Option<PathBuf>,
    discovery: Option<String>,
    relay: Option<bool>,
    via_relay: Option<String>,
    only_when_idle: Option<bool>,
    idle_after: Option<u32>,
    suspend_above_cpu_percent: Option<u8>,
    run_on_battery: Option<bool>,
    max_temperature_c: Option<u8>,
    windows: Option<Vec<String>>,
    max_cpu_percent: Option<u8>,
    max_cpu_percent_idle: Option<u8>,
    ui: Option<String>,
    ui_remote: Option<bool>,
}

impl FileKeys {
    /// Paths in the file are relative to the file's directory, wherever `worker run` starts.
    fn resolve_paths(&mut self, base: &Path) {
        self.data_dir = self.data_dir.take().map(|p| base.join(p));
        self.allow = self.allow.take().map(|p| base.join(p));
    }
}

/// Why the settings could not be put together.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is {size} bytes, over the cap of {MAX_CONFIG_BYTES}")]
    TooLarge { path: PathBuf, size: u64 },
    /// Not TOML, an unknown key, or a value of the wrong kind.
    #[error("config file {path}: {message}")]
    Syntax { path: PathBuf, message: String },
    /// A key's value is one its flag refuses.
    #[error("config file {path}{}, key `{key}`: {message}", line.map(|n| format!(", line {n}")).unwrap_or_default())]
    Value {
        path: PathBuf,
        key: String,
        line: Option<usize>,
        message: String,
    },
    /// Settings of the file that cannot go together.
    #[error("config file {path}: {message}")]
    Conflict { path: PathBuf, message: String },
    /// Settings of the file that cannot go with flags given on the command line.
    #[error("config file {path} with the command line: {message}")]
    ConflictWithFlags { path: PathBuf, message: String },
}

/// Where a setting's value comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Default,
    File,
    Flag,
}

impl Source {
    fn name(self) -> &'static str {
        match self {
            Source::Default => "default",
            Source::File => "file",
            Source::Flag => "flag",
        }
    }
}

/// Which config file, and whether the user named it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigFile {
    pub path: PathBuf,
    /// Named by `--config`: then it must exist. The default file may be missing.
    pub explicit: bool,
}

impl ConfigFile {
    /// `--config FILE`, else `$XDG_CONFIG_HOME/coordinator-free/worker.toml`, else
    /// `~/.config/coordinator-free/worker.toml`; `None` when neither variable is set.
    pub fn of(command_line: &ArgMatches) -> Option<Self> {
        if let Some(path) = command_line.get_one::<PathBuf>("config") {
            return Some(Self {
                path: path.clone(),
                explicit: true,
            });
        }
        let home = || {
            std::env::var_os("HOME")
                .filter(|v| !v.is_empty())
                .map(|h| PathBuf::from(h).join(".config"))
        };
        let dir = std::env::var_os("XDG_CONFIG_HOME")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .or_else(home)?;
        Some(Self {
            path: dir.join("coordinator-free").join("worker.toml"),
            explicit: false,
        })
    }

    /// The file's keys; `None` for a default file that does not exist.
    pub fn read(&self) -> Result<Option<FileKeys>, ConfigError> {
        let path = &self.path;
        let read_err = |source| ConfigError::Read {
            path: path.clone(),
            source,
        };
        let size = match std::fs::metadata(path) {
            Ok(meta) => meta.len(),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound && !self.explicit => {
                return Ok(None);
            }
            Err(err) => return Err(read_err(err)),
        };
        if size > MAX_CONFIG_BYTES {
            return Err(ConfigError::TooLarge {
                path: path.clone(),
                size,
            });
        }
        let text = std::fs::read_to_string(path).map_err(read_err)?;
        let base = path.parent().unwrap_or(Path::new("."));
        parse(&text, path, base).map(Some)
    }
}

/// What tells an edited file apart without reading it: its modification time, length and
/// inode (an editor that writes a new file and renames it over the old one changes the inode).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    modified: Option<std::time::SystemTime>,
    len: u64,
    inode: u64,
}

/// The file's stamp now; `None` when it cannot be read (missing, say).
pub fn stamp(path: &Path) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt as _;
    let meta = std::fs::metadata(path).ok()?;
    Some(Stamp {
        modified: meta.modified().ok(),
        len: meta.len(),
        inode: meta.ino(),
    })
}

/// The file's text as keys; `path` names it in errors and relative paths are resolved
/// against `base`.
fn parse(text: &str, path: &Path, base: &Path) -> Result<FileKeys, ConfigError> {
    let mut keys: FileKeys = toml::from_str(text).map_err(|err| ConfigError::Syntax {
        path: path.to_owned(),
        message: coordinator_free::toml_text::headline(text, &err),
    })?;
    keys.resolve_paths(base);
    // Each key on its own through its flag's parser, so a refusal names the key.
    for (key, value) in present(&keys) {
        let Some(arg) = run_command()
            .get_arguments()
            .find(|a| a.get_id() == key.as_str())
            .cloned()
        else {
            continue;
        };
        let mut argv = vec![OsString::from("run")];
        argv.extend(tokens(&arg, &value));
        if let Err(err) = run_command().try_get_matches_from(argv) {
            return Err(ConfigError::Value {
                path: path.to_owned(),
                line: line_of(text, &key),
                key,
                message: one_line(&err),
            });
        }
    }
    Ok(keys)
}

/// The keys the file sets, with their values.
fn present(keys: &FileKeys) -> Vec<(String, serde_json::Value)> {
    match serde_json::to_value(keys) {
        Ok(serde_json::Value::Object(map)) => {
            map.into_iter().filter(|(_, v)| !v.is_null()).collect()
        }
        _ => Vec::new(),
    }
}

/// The line that sets `key`, for the refusal.
fn line_of(text: &str, key: &str) -> Option<usize> {
    text.lines()
        .position(|line| {
            line.trim_start()
                .strip_prefix(key)
                .is_some_and(|rest| rest.trim_start().starts_with('='))
        })
        .map(|i| i + 1)
}

/// `worker run`'s flags as a command of their own, for parsing settings from the file.
fn run_command() -> clap::Command {
    RunArgs::augment_args(clap::Command::new("run"))
}

/// A setting as command line words: a flag for `true`, nothing for `false`, `--key=VALUE` for
/// each value.
fn tokens(arg: &clap::Arg, value: &serde_json::Value) -> Vec<OsString> {
    let Some(long) = arg.get_long() else {
        return Vec::new();
    };
    let one = |v: &serde_json::Value| -> Option<OsString> {
        match v {
            serde_json::Value::String(s) => Some(format!("--{long}={s}").into()),
            serde_json::Value::Number(n) => Some(format!("--{long}={n}").into()),
            _ => None,
        }
    };
    match value {
        serde_json::Value::Bool(true) => vec![format!("--{long}").into()],
        serde_json::Value::Array(items) => items.iter().filter_map(one).collect(),
        other => one(other).into_iter().collect(),
    }
}

/// The command line's words for a flag given there.
fn given_tokens(arg: &clap::Arg, command_line: &ArgMatches) -> Vec<OsString> {
    let Some(long) = arg.get_long() else {
        return Vec::new();
    };
    if !arg.get_action().takes_values() {
        return vec![format!("--{long}").into()];
    }
    let Ok(Some(raw)) = command_line.try_get_raw(arg.get_id().as_str()) else {
        return Vec::new();
    };
    raw.map(|v| {
        let mut token = OsString::from(format!("--{long}="));
        token.push(v);
        token
    })
    .collect()
}

/// A parser error as one line, without clap's usage hints.
fn one_line(err: &clap::Error) -> String {
    let text = err.to_string();
    let first = text.lines().next().unwrap_or_default();
    first.strip_prefix("error: ").unwrap_or(first).to_owned()
}

/// The settings a `worker run` uses, and where each came from.
#[derive(Debug, Clone)]
pub struct Layered {
    pub args: RunArgs,
    /// Each key and its source, in `--help` order.
    pub sources: Vec<(String, Source)>,
    /// The file looked at, and whether it was found.
    pub file: Option<ConfigFile>,
    pub found: bool,
}

/// Puts the settings together: flags given on `command_line`, else keys of the config file,
/// else defaults.
pub fn layer(command_line: &ArgMatches) -> Result<Layered, ConfigError> {
    let file = ConfigFile::of(command_line);
    let keys = match &file {
        Some(file) => file.read()?,
        None => None,
    };
    let from_file: std::collections::BTreeMap<String, serde_json::Value> = keys
        .as_ref()
        .map(present)
        .unwrap_or_default()
        .into_iter()
        .collect();
    let mut argv = vec![OsString::from("run")];
    let mut sources = Vec::new();
    let mut any_flag = false;
    for arg in run_command().get_arguments() {
        let id = arg.get_id().as_str();
        if id == "help" {
            continue;
        }
        let source = if command_line.value_source(id) == Some(ValueSource::CommandLine) {
            argv.extend(given_tokens(arg, command_line));
            any_flag |= id != "config";
            Source::Flag
        } else if let Some(value) = from_file.get(id) {
            argv.extend(tokens(arg, value));
            Source::File
        } else {
            Source::Default
        };
        if id != "config" {
            sources.push((id.to_owned(), source));
        }
    }
    let parsed = run_command()
        .try_get_matches_from(argv)
        .and_then(|m| RunArgs::from_arg_matches(&m));
    let args = parsed.map_err(|err| {
        let path = file.as_ref().map(|f| f.path.clone()).unwrap_or_default();
        let message = one_line(&err);
        if any_flag {
            ConfigError::ConflictWithFlags { path, message }
        } else {
            ConfigError::Conflict { path, message }
        }
    })?;
    Ok(Layered {
        args,
        sources,
        found: keys.is_some(),
        file,
    })
}

/// Arguments of `worker config`: those of `worker run`, and how to print.
#[derive(Args)]
pub struct ConfigArgs {
    #[command(flatten)]
    run: RunArgs,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

/// `worker config`: every setting a `worker run` with these arguments would use, its value and
/// where it comes from.
pub fn show(args: &ConfigArgs, command_line: &ArgMatches) -> Result<ExitCode, Failure> {
    let layered = layer(command_line).map_err(Failure::usage)?;
    let mut values = match serde_json::to_value(&layered.args) {
        Ok(serde_json::Value::Object(map)) => map,
        _ => serde_json::Map::new(),
    };
    // What "all cores" and "512 MiB per core" come to on this machine.
    let (cores, memory_mb) = crate::run::capacity_of(&layered.args);
    values.insert("cpus".into(), cores.into());
    values.insert("memory_mb".into(), memory_mb.into());
    let file = layered.file.as_ref();
    if args.json {
        let settings: serde_json::Map<String, serde_json::Value> = layered
            .sources
            .iter()
            .map(|(key, source)| {
                let value = values.get(key).cloned().unwrap_or_default();
                (
                    key.clone(),
                    serde_json::json!({ "value": value, "source": source.name() }),
                )
            })
            .collect();
        let out = serde_json::json!({
            "file": file.map(|f| f.path.display().to_string()),
            "file_found": layered.found,
            "settings": settings,
        });
        println!("{out}");
        return Ok(ExitCode::SUCCESS);
    }
    let mut out = String::new();
    match file {
        Some(f) if layered.found => {
            let _ = writeln!(out, "config file {}", f.path.display());
        }
        Some(f) => {
            let _ = writeln!(
                out,
                "config file {} (not found: defaults)",
                f.path.display()
            );
        }
        None => {
            let _ = writeln!(
                out,
                "config file: none (neither XDG_CONFIG_HOME nor HOME is set)"
            );
        }
    }
    let path = file
        .map(|f| f.path.display().to_string())
        .unwrap_or_default();
    let rows: Vec<(String, String, String)> = layered
        .sources
        .iter()
        .map(|(key, source)| {
            let value = values.get(key).map(as_text).unwrap_or_default();
            let from = match source {
                Source::File => format!("file {path}"),
                other => other.name().to_owned(),
            };
            (key.clone(), value, from)
        })
        .collect();
    let key_width = rows.iter().map(|r| r.0.len()).max().unwrap_or(0);
    let value_width = rows.iter().map(|r| r.1.chars().count()).max().unwrap_or(0);
    for (key, value, from) in rows {
        let _ = writeln!(out, "{key:<key_width$}  {value:<value_width$}  {from}");
    }
    print!("{out}");
    Ok(ExitCode::SUCCESS)
}

/// A setting's value as the table shows it: strings bare, lists comma-separated, `-` for none.
fn as_text(value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::Null => "-".into(),
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Array(items) if items.is_empty() => "-".into(),
        serde_json::Value::Array(items) => items.iter().map(as_text).collect::<Vec<_>>().join(", "),
        other => other.to_string(),
    }
}

/// Serializes a list by each item's text, for settings whose types have no serde form.
pub fn as_texts<T: std::fmt::Display, S: serde::Serializer>(
    items: &[T],
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.collect_seq(items.iter().map(ToString::to_string))
}

/// Serializes an optional value that has a text form as that text.
pub fn as_text_option<T: std::fmt::Display, S: serde::Serializer>(
    item: &Option<T>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    match item {
        Some(item) => serializer.serialize_some(&item.to_string()),
        None => serializer.serialize_none(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory as _;

    /// The settings of `worker run ARGS` with the file at `file` holding `text`.
    fn settings(text: &str, args: &[&str]) -> Result<Layered, ConfigError> {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("worker.toml");
        std::fs::write(&path, text).expect("config file");
        let mut argv = vec![
            "worker".into(),
            "run".into(),
            "--config".into(),
            path.into_os_string(),
        ];
        argv.extend(args.iter().map(OsString::from));
        let matches = crate::Cli::command()
            .try_get_matches_from(argv)
            .expect("the command line parses");
        let (_, given) = matches.subcommand().expect("a subcommand");
        layer(given)
    }

    fn value(layered: &Layered, key: &str) -> serde_json::Value {
        serde_json::to_value(&layered.args).expect("settings serialize")[key].clone()
    }

    fn source(layered: &Layered, key: &str) -> Source {
        layered
            .sources
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, s)| *s)
            .expect("the key has a source")
    }

    #[test]
    fn every_run_flag_is_a_key_and_every_key_a_run_flag() {
        let keys = match serde_json::to_value(FileKeys::default()) {
            Ok(serde_json::Value::Object(map)) => map.keys().cloned().collect::<Vec<_>>(),
            other => panic!("{other:?}"),
        };
        let mut flags: Vec<String> = run_command()
            .get_arguments()
            .map(|a| a.get_id().to_string())
            .filter(|id| id != "help" && id != "config")
            .collect();
        flags.sort();
        let mut keys = keys;
        keys.sort();
        assert_eq!(keys, flags);
    }

    #[test]
    fn a_flag_beats_the_file_and_the_file_beats_the_default() {
        let layered = settings(
            "cpus = 3\nmax_disk_mb = 10\nbootstrap = [\"127.0.0.1:9\", \"lab.example.org:7401\"]\nno_mdns = true\n",
            &["--cpus", "1", "--bootstrap", "127.0.0.1:8"],
        )
        .expect("settings");
        assert!(layered.found);
        assert_eq!(value(&layered, "cpus"), 1);
        assert_eq!(source(&layered, "cpus"), Source::Flag);
        // A list given as flags replaces the file's list, not adds to it.
        assert_eq!(
            value(&layered, "bootstrap"),
            serde_json::json!(["127.0.0.1:8"])
        );
        assert_eq!(source(&layered, "bootstrap"), Source::Flag);
        assert_eq!(value(&layered, "max_disk_mb"), 10);
        assert_eq!(source(&layered, "max_disk_mb"), Source::File);
        assert_eq!(value(&layered, "no_mdns"), true);
        assert_eq!(source(&layered, "no_mdns"), Source::File);
        assert_eq!(value(&layered, "listen"), "0.0.0.0:7401");
        assert_eq!(source(&layered, "listen"), Source::Default);
        assert_eq!(value(&layered, "max_unit_secs"), 86_400);

        // `false` in the file is a setting too, and a flag still turns it on.
        let off = settings("no_mdns = false\n", &[]).expect("settings");
        assert_eq!(
            (value(&off, "no_mdns"), source(&off, "no_mdns")),
            (false.into(), Source::File)
        );
        let on = settings("no_mdns = false\n", &["--no-mdns"]).expect("settings");
        assert_eq!(
            (value(&on, "no_mdns"), source(&on, "no_mdns")),
            (true.into(), Source::Flag)
        );
    }

    #[test]
    fn relative_paths_are_relative_to_the_files_directory() {
        let keys = parse(
            "data_dir = \"peer\"\nallow = \"/etc/lab/allow.txt\"\n",
            Path::new("/home/v/.config/coordinator-free/worker.toml"),
            Path::new("/home/v/.config/coordinator-free"),
        )
        .expect("keys");
        assert_eq!(
            keys.data_dir.as_deref(),
            Some(Path::new("/home/v/.config/coordinator-free/peer"))
        );
        assert_eq!(keys.allow.as_deref(), Some(Path::new("/etc/lab/allow.txt")));
    }

    /// The refusal of `text` as a file: one line.
    fn refusal(text: &str) -> String {
        let err = parse(text, Path::new("/etc/w.toml"), Path::new("/etc"))
            .expect_err("refused")
            .to_string();
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.starts_with("config file /etc/w.toml"), "{err}");
        err
    }

    #[test]
    fn unknown_keys_and_wrong_kinds_are_refused_naming_the_key_and_the_line() {
        let err = refusal("cpus = 2\ncpu = 4\n");
        assert!(err.contains("line 2"), "{err}");
        assert!(err.contains("unknown field `cpu`"), "{err}");

        let err = refusal("\ncpus = \"four\"\n");
        assert!(err.contains("line 2"), "{err}");
        assert!(err.contains("field `cpus`"), "{err}");
        assert!(err.contains("expected a whole number"), "{err}");
        assert!(!err.contains("u16"), "{err}");

        let err = refusal("bootstrap = \"127.0.0.1:9\"\n");
        assert!(
            err.contains("field `bootstrap`") && err.contains("expected a list"),
            "{err}"
        );
        let err = refusal("no_mdns = \"yes\"\n");
        assert!(
            err.contains("field `no_mdns`") && err.contains("expected a boolean"),
            "{err}"
        );
        let err = refusal("[limits]\ncpus = 2\n");
        assert!(err.contains("unknown field `limits`"), "{err}");
        let err = refusal("cpus = [1\n");
        assert!(err.contains("line 1"), "{err}");
    }

    #[test]
    fn values_are_checked_as_their_flags_check_them() {
        let err = refusal("# cores\ncpus = 0\n");
        assert!(err.contains("line 2, key `cpus`"), "{err}");
        let err = refusal("listen = \"nowhere\"\n");
        assert!(
            err.contains("key `listen`") && err.contains("not IP:PORT or HOST:PORT"),
            "{err}"
        );
        let err = refusal("bootstrap = [\"127.0.0.1:9\", \"not an address\"]\n");
        assert!(err.contains("key `bootstrap`"), "{err}");
        let err = refusal("max_unit_secs = 0\n");
        assert!(err.contains("key `max_unit_secs`"), "{err}");
        // A value that looks like a flag is still a value.
        let err = refusal("listen = \"--no-mdns\"\n");
        assert!(err.contains("key `listen`"), "{err}");
    }

    #[test]
    fn settings_that_cannot_go_together_are_refused_saying_where_they_come_from() {
        let err = settings(
            "dial_out_only = true\nadvertise = [\"192.0.2.1:7401\"]\n",
            &[],
        )
        .expect_err("refused")
        .to_string();
        assert!(
            err.contains("cannot be used with") && !err.contains("command line"),
            "{err}"
        );
        let err = settings("dial_out_only = true\n", &["--advertise", "192.0.2.1:7401"])
            .expect_err("refused")
            .to_string();
        assert!(err.contains("with the command line"), "{err}");
    }

    #[test]
    fn a_missing_default_file_means_defaults_and_a_missing_named_one_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("absent.toml");
        let default = ConfigFile {
            path: path.clone(),
            explicit: false,
        };
        assert_eq!(default.read().expect("defaults"), None);
        let named = ConfigFile {
            path,
            explicit: true,
        };
        assert!(matches!(named.read(), Err(ConfigError::Read { .. })));
        let big = dir.path().join("big.toml");
        std::fs::write(&big, "#".repeat(2 << 20)).expect("write");
        let big = ConfigFile {
            path: big,
            explicit: true,
        };
        assert!(matches!(big.read(), Err(ConfigError::TooLarge { .. })));
    }

    #[test]
    fn arbitrary_text_never_panics() {
        let mut rng = coordinator_free::rng::Rng::seed_from_u64(7);
        let pieces = [
            "cpus",
            "=",
            "\"",
            "[",
            "]",
            "{",
            "}",
            "\n",
            "1",
            "-1",
            "true",
            "listen",
            "bootstrap",
            "data_dir",
            ".",
            ",",
            "#",
            "\u{0}",
            "é",
            "999999999999999999999",
            "[x]",
        ];
        for _ in 0..2_000 {
            let len = rng.below(12) as usize;
            let text: String = (0..len)
                .map(|_| pieces[rng.below(pieces.len() as u64) as usize])
                .collect::<Vec<_>>()
                .join(" ");
            let _ = parse(&text, Path::new("w.toml"), Path::new("."));
        }
    }
}
