//! The sandbox: runs one work unit — a WebAssembly module and its input — under a fixed,
//! deterministic engine profile and hard limits, and says how it ended.
//!
//! * One engine profile, identical on every peer ([`PROFILE`]): NaN canonicalisation on, relaxed
//!   SIMD and threads off, no WASI, no clock or random imports, bounded memory and stack.
//! * Imports are checked against the guest ABI's allow-list before anything is compiled.
//! * Compiled modules are cached by content hash in memory and on disk (only artifacts this peer
//!   compiled itself are ever loaded); each carries a pre-linked instance template, so running a
//!   unit costs a store, an instantiation from the pooling allocator and the call.
//! * Every ending is a typed [`UnitError`], classified as deterministic or host failure.
//!
//! [`Sandbox::run`] runs a unit on the calling thread; [`Executor`] runs units on a bounded set
//! of dedicated threads.

mod abi;
mod cache;
mod compile;
mod executor;
pub(crate) mod host;
mod nan;
mod outcome;
mod wasi;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use wasmtime::wasmparser::WasmFeatures;
use wasmtime::{
    Config, Enabled, Engine, ExternType, InstanceAllocationStrategy, InstancePre, Linker, Module,
    OptLevel, PoolingAllocationConfig, Store, ValType,
};

use crate::digest::Digest;
use abi::{HostState, MemoryLimiter, Stop};
pub use cache::DEFAULT_DISK_CACHE_BYTES;
use cache::{DiskCache, MemoryCache};
use compile::CompileSlots;

pub use abi::{ENTRY, IMPORT_MODULE, MEMORY, PROGRESS_INTERVAL, check_imports};
pub use executor::{Executor, ExecutorBusy, UnitRunner};
pub use host::{HostSwitch, HostedModule, UnitHost, UnitHostCommand, serve_unit_host};
pub use outcome::{OutcomeClass, TrapKind, UnitError};

/// The engine profile every result is produced under. Peers only compare results of the same
/// profile: it fixes the WebAssembly features, NaN canonicalisation and the exact engine version
/// (fuel costs, for one, differ between versions). Version 2 canonicalises NaNs where their
/// bits become observable (`nan.rs`) instead of after every float instruction; fuel counts the
/// instructions that adds.
pub const PROFILE: &str = "cf-wasm-2/wasmtime-48.0.8";

/// The profile name of a sandbox built with NaN canonicalisation off, which only exists to
/// measure what canonicalisation costs: its float results are not comparable across machines.
pub const PROFILE_UNCANONICAL_NANS: &str = "cf-wasm-2-uncanonical-nans/wasmtime-48.0.8";

/// Version number of [`PROFILE`], advertised by peers.
pub const PROFILE_VERSION: u32 = 2;

/// The largest linear memory any unit may have: all of a 32-bit memory.
pub const MAX_MEMORY_BYTES: u64 = 4 << 30;

/// How often the wall-clock deadline is checked.
const TICK: Duration = Duration::from_millis(5);

/// Stack available to WebAssembly code; where it runs out is machine-dependent, so overflowing
/// it is a host failure.
const MAX_WASM_STACK: usize = 512 << 10;

/// Per-unit limits. Every peer that runs a unit must use the same limits, or deterministic
/// outcomes (memory limit, out of fuel, output too large) could differ.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Linear memory cap in bytes (at most [`MAX_MEMORY_BYTES`]).
    pub memory_bytes: u64,
    /// Wall-clock limit.
    pub timeout: Duration,
    /// Optional fuel budget; requires a module prepared with [`Metering::Fuel`].
    pub fuel: Option<u64>,
    /// Input cap in bytes.
    pub input_bytes: u64,
    /// Output cap in bytes.
    pub output_bytes: u64,
    /// Checkpoint cap in bytes.
    pub checkpoint_bytes: u64,
    /// Total log volume per unit in bytes; later lines are dropped and counted.
    pub log_bytes: u64,
    /// Longest log line (and failure message) in bytes; longer ones are cut.
    pub log_line_bytes: u64,
    /// The arguments and environment a WASI program starts with (from the job's manifest).
    pub program: Program,
}

/// What a WASI program is started with, the same for every unit of a job: its arguments after
/// the first (which is always `unit`) and its environment variables.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Program {
    pub args: Vec<String>,
    /// Names and values, ordered by name.
    pub env: Vec<(String, String)>,
}

/// Most arguments, and most environment variables, a job may give.
pub const MAX_PROGRAM_ENTRIES: usize = 64;
/// Most bytes of arguments and environment together.
pub const MAX_PROGRAM_BYTES: usize = 8 << 10;

impl Program {
    /// The argument strings as `args_get` hands them out: NUL-terminated, `unit` first.
    pub(crate) fn argv(&self) -> Vec<Vec<u8>> {
        std::iter::once("unit")
            .chain(self.args.iter().map(String::as_str))
            .map(|a| [a.as_bytes(), b"\0"].concat())
            .collect()
    }

    /// The environment as `environ_get` hands it out: `NAME=value`, NUL-terminated.
    pub(crate) fn environ(&self) -> Vec<Vec<u8>> {
        self.env
            .iter()
            .map(|(k, v)| [k.as_bytes(), b"=", v.as_bytes(), b"\0"].concat())
            .collect()
    }

    /// Why this program cannot be run, if it breaks a cap or holds a string a C program could
    /// not receive (a NUL byte; `=` in a name).
    pub fn check(&self) -> Result<(), String> {
        if self.args.len() > MAX_PROGRAM_ENTRIES || self.env.len() > MAX_PROGRAM_ENTRIES {
            return Err(format!(
                "more than {MAX_PROGRAM_ENTRIES} arguments or variables"
            ));
        }
        let bytes: usize = self.args.iter().map(String::len).sum::<usize>()
            + self
                .env
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>();
        if bytes > MAX_PROGRAM_BYTES {
            return Err(format!(
                "more than {MAX_PROGRAM_BYTES} bytes of arguments and variables"
            ));
        }
        if self.args.iter().any(|a| a.contains('\0')) {
            return Err("an argument holds a NUL byte".into());
        }
        if let Some((name, _)) = self
            .env
            .iter()
            .find(|(k, v)| k.is_empty() || k.contains(['=', '\0']) || v.contains('\0'))
        {
            return Err(format!(
                "the variable {name:?} is empty, or holds `=` or a NUL byte"
            ));
        }
        if self.env.windows(2).any(|w| w[0].0 >= w[1].0) {
            return Err("variables must be unique and ordered by name".into());
        }
        Ok(())
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            memory_bytes: 256 << 20,
            timeout: Duration::from_secs(60),
            fuel: None,
            input_bytes: 64 << 20,
            output_bytes: 16 << 20,
            checkpoint_bytes: 16 << 20,
            log_bytes: 64 << 10,
            log_line_bytes: 4 << 10,
            program: Program::default(),
        }
    }
}

/// Whether compiled code counts fuel. Counting costs time, so it is only compiled in for units
/// that have a fuel budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Metering {
    /// No fuel accounting; only the wall clock bounds the unit.
    Off,
    /// Deterministic fuel accounting.
    Fuel,
}

/// Severity of a guest log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LogLevel {
    /// Level 0.
    Error,
    /// Level 1.
    Warn,
    /// Level 2, and any unknown level.
    Info,
    /// Level 3.
    Debug,
    /// Level 4.
    Trace,
}

impl LogLevel {
    fn from_abi(level: i32) -> Self {
        match level {
            0 => Self::Error,
            1 => Self::Warn,
            3 => Self::Debug,
            4 => Self::Trace,
            _ => Self::Info,
        }
    }

    /// Lowercase name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Error => "error",
            Self::Warn => "warn",
            Self::Info => "info",
            Self::Debug => "debug",
            Self::Trace => "trace",
        }
    }
}

/// One line a unit logged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogLine {
    /// Its severity.
    pub level: LogLevel,
    /// Its text (invalid UTF-8 replaced, cut at the line cap).
    pub text: String,
}

/// Receives a unit's logs, progress and checkpoints while it runs (on the unit's thread, so keep
/// it quick).
pub trait UnitObserver: Send + Sync {
    /// A log line, after the caps were applied.
    fn log(&self, _line: &LogLine) {}
    /// A progress report.
    fn progress(&self, _done: u64, _total: u64) {}
    /// A checkpoint was saved.
    fn checkpoint(&self, _bytes: &[u8]) {}
}

/// One unit to run.
#[derive(Clone)]
pub struct UnitRequest {
    /// The unit's input bytes.
    pub input: Arc<[u8]>,
    /// The checkpoint of an earlier, interrupted run to resume from.
    pub checkpoint: Option<Vec<u8>>,
    /// Its limits.
    pub limits: Limits,
    /// Who hears about logs, progress and checkpoints as they happen.
    pub observer: Option<Arc<dyn UnitObserver>>,
    /// Set when the unit is no longer wanted: a queued unit is dropped, a unit running in a
    /// unit host has the host killed.
    pub abort: Option<Abort>,
}

/// Stops a unit early, when whoever asked for it no longer wants the result (its lease was
/// revoked). Cheap to clone; every clone sees the same flag.
#[derive(Debug, Clone, Default)]
pub struct Abort(Arc<std::sync::atomic::AtomicBool>);

impl Abort {
    pub fn new() -> Self {
        Self::default()
    }

    /// Asks for the unit to stop.
    pub fn abort(&self) {
        self.0.store(true, std::sync::atomic::Ordering::Release);
    }

    pub fn is_aborted(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::Acquire)
    }
}

/// The error of a unit stopped because it was no longer wanted.
pub fn aborted_error() -> UnitError {
    UnitError::Host {
        detail: "stopped: the unit was no longer wanted".into(),
    }
}

impl std::fmt::Debug for UnitRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UnitRequest")
            .field("input_len", &self.input.len())
            .field("checkpoint_len", &self.checkpoint.as_ref().map(Vec::len))
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl UnitRequest {
    /// A request with default limits and no checkpoint.
    pub fn new(input: impl Into<Arc<[u8]>>) -> Self {
        Self {
            input: input.into(),
            checkpoint: None,
            limits: Limits::default(),
            observer: None,
            abort: None,
        }
    }

    pub(crate) fn aborted(&self) -> bool {
        self.abort.as_ref().is_some_and(Abort::is_aborted)
    }
}

/// How a unit run ended, with what it said along the way.
#[derive(Debug, Clone)]
pub struct UnitReport {
    /// The output bytes, or why there are none.
    pub result: Result<Vec<u8>, UnitError>,
    /// Log lines kept (within the log volume cap).
    pub logs: Vec<LogLine>,
    /// Log lines dropped after the cap was reached.
    pub logs_dropped: u64,
    /// The last progress report.
    pub progress: Option<(u64, u64)>,
    /// The last checkpoint the unit saved in this run, if it saved one.
    pub checkpoint: Option<Vec<u8>>,
    /// Fuel consumed by `run`, when the unit was metered.
    pub fuel_consumed: Option<u64>,
    /// Wall-clock time of instantiation and run.
    pub elapsed: Duration,
    /// The engine profile it ran under.
    pub profile: &'static str,
}

impl UnitReport {
    /// A report with no run behind it: the unit was refused before it started.
    pub(crate) fn refused(error: UnitError) -> Self {
        Self {
            result: Err(error),
            logs: Vec::new(),
            logs_dropped: 0,
            progress: None,
            checkpoint: None,
            fuel_consumed: None,
            elapsed: Duration::ZERO,
            profile: PROFILE,
        }
    }
}

/// Settings of a [`Sandbox`].
#[derive(Debug, Clone)]
pub struct SandboxConfig {
    /// Where compiled modules are kept across restarts; `None` keeps them in memory only.
    pub cache_dir: Option<PathBuf>,
    /// Most bytes of compiled modules kept in `cache_dir`; the least recently used go first.
    pub disk_cache_bytes: u64,
    /// Threads that compile modules. With a `cache_dir`, a bound shared by every sandbox and
    /// process using that directory: each compile takes as many of these slots as are free (at
    /// least one, waiting for it) and compiles on that many threads. Without one, the threads
    /// of each compile. `None` compiles on rayon's global pool, unbounded across processes.
    pub compile_threads: Option<u32>,
    /// How many units may run at once (instance slots reserved up front).
    pub max_concurrent_units: u32,
    /// Largest module accepted, in bytes.
    pub max_module_bytes: u64,
    /// Compiled modules kept in memory, per metering mode.
    pub memory_cache_entries: usize,
    /// Largest table a module may have, in elements.
    pub max_table_elements: usize,
    /// NaN canonicalisation, on in [`PROFILE`]. Turning it off is only for measuring its cost:
    /// results then carry [`PROFILE_UNCANONICAL_NANS`] and may differ between machines.
    pub canonicalize_nans: bool,
    /// Wall-clock deadlines checked by the compiled code (epoch interruption), on by default.
    /// The checks cost time in every loop; turn them off only where something outside the
    /// sandbox bounds a unit's time (a supervisor that kills the process running it), or to
    /// measure their cost. Off, [`Limits::timeout`] is not enforced.
    pub epoch_deadlines: bool,
    /// Bytes of each instance slot's linear memory kept resident between units and reset
    /// instead of unmapped: small units then pay no page faults for their stack and heap, and
    /// a unit that reads an input of many MiB into its memory finds the pages there (only the
    /// pages a unit dirtied are reset, where the kernel can tell). The default, 16 MiB, costs a
    /// unit host at most that much resident memory per slot (one per core) after such a unit.
    pub keep_resident_bytes: usize,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        Self {
            cache_dir: None,
            disk_cache_bytes: DEFAULT_DISK_CACHE_BYTES,
            compile_threads: None,
            max_concurrent_units: 4,
            max_module_bytes: 16 << 20,
            memory_cache_entries: 64,
            max_table_elements: 100_000,
            canonicalize_nans: true,
            epoch_deadlines: true,
            keep_resident_bytes: 16 << 20,
        }
    }
}

/// Errors setting up a sandbox.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// The engine refused the profile's configuration.
    #[error("cannot configure the WebAssembly engine: {0}")]
    Engine(String),
    /// The cache directory cannot be used.
    #[error("cannot use the module cache directory {path}: {source}")]
    CacheDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A unit thread could not be started.
    #[error("cannot start a unit thread: {0}")]
    Thread(std::io::Error),
}

/// Where a prepared module came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModuleSource {
    /// Compiled now.
    Compiled,
    /// Loaded from this peer's disk cache.
    Disk,
    /// Already in memory.
    Memory,
}

/// A module checked, compiled and linked, ready to run any number of units.
pub struct PreparedModule {
    digest: Digest,
    metering: Metering,
    pre: InstancePre<HostState>,
}

impl std::fmt::Debug for PreparedModule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreparedModule")
            .field("digest", &self.digest)
            .field("metering", &self.metering)
            .finish_non_exhaustive()
    }
}

impl PreparedModule {
    /// The module's content hash.
    pub fn digest(&self) -> Digest {
        self.digest
    }

    /// Whether it counts fuel.
    pub fn metering(&self) -> Metering {
        self.metering
    }
}

/// Counters of the module cache, for tests and status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Modules compiled.
    pub compiled: u64,
    /// Modules loaded from disk.
    pub disk_hits: u64,
    /// Modules found in memory.
    pub memory_hits: u64,
}

/// One engine configuration (with or without fuel) and its caches.
struct Flavor {
    engine: Engine,
    linker: Linker<HostState>,
    memory: MemoryCache<PreparedModule>,
    disk: Option<DiskCache>,
}

/// Runs work units. Cheap to clone; clones share engines, caches and the deadline clock.
#[derive(Clone)]
pub struct Sandbox {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Sandbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sandbox")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

struct Inner {
    config: SandboxConfig,
    plain: Flavor,
    fueled: Flavor,
    compile: Option<CompileSlots>,
    clock: Arc<Clock>,
    compiled: AtomicU64,
    disk_hits: AtomicU64,
    memory_hits: AtomicU64,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.clock.shut_down();
    }
}

/// `ENOMEM`, the same number on Linux, macOS and the BSDs.
const ENOMEM: i32 = 12;

/// Whether the machine, not the module, stopped a compile: memory ran out (the unit host's
/// limit, or the machine's) while the compiler allocated or the engine mapped the code. Such a
/// module may compile fine on another peer, so it must never be voted a bad module.
fn out_of_memory(error: &wasmtime::Error) -> bool {
    let enomem = std::io::Error::from_raw_os_error(ENOMEM).to_string();
    error.is::<wasmtime::OutOfMemory>()
        || error.chain().any(|cause| {
            cause
                .downcast_ref::<std::io::Error>()
                .is_some_and(|e| e.kind() == std::io::ErrorKind::OutOfMemory)
                // The engine's system calls report errors in their own type, shown as the
                // operating system's message.
                || cause.to_string() == enomem
        })
}

/// What Rust, C and hand-written modules need, and nothing else.
const ACCEPTED_FEATURES: WasmFeatures = WasmFeatures::MUTABLE_GLOBAL
    .union(WasmFeatures::SATURATING_FLOAT_TO_INT)
    .union(WasmFeatures::SIGN_EXTENSION)
    .union(WasmFeatures::MULTI_VALUE)
    .union(WasmFeatures::BULK_MEMORY)
    .union(WasmFeatures::REFERENCE_TYPES)
    .union(WasmFeatures::SIMD)
    .union(WasmFeatures::EXTENDED_CONST)
    .union(WasmFeatures::TAIL_CALL)
    .union(WasmFeatures::FLOATS);

/// Proposals that break determinism or that no unit needs.
const REFUSED_FEATURES: WasmFeatures = WasmFeatures::THREADS
    .union(WasmFeatures::SHARED_EVERYTHING_THREADS)
    .union(WasmFeatures::RELAXED_SIMD)
    .union(WasmFeatures::MEMORY64)
    .union(WasmFeatures::MULTI_MEMORY)
    .union(WasmFeatures::GC)
    .union(WasmFeatures::FUNCTION_REFERENCES)
    .union(WasmFeatures::EXCEPTIONS)
    .union(WasmFeatures::LEGACY_EXCEPTIONS)
    .union(WasmFeatures::STACK_SWITCHING)
    .union(WasmFeatures::CUSTOM_PAGE_SIZES)
    .union(WasmFeatures::WIDE_ARITHMETIC)
    .union(WasmFeatures::COMPONENT_MODEL);

/// The features modules are validated against before the NaN rewrite: the parser's defaults
/// with the engine's choices applied; the engine validates the rewritten module once more.
fn validation_features() -> WasmFeatures {
    (WasmFeatures::default() | ACCEPTED_FEATURES) - REFUSED_FEATURES
}

/// The engine configuration of [`PROFILE`].
fn engine_config(config: &SandboxConfig, metering: Metering) -> Config {
    let mut c = Config::new();
    // Determinism: no relaxed SIMD, no threads. NaNs are canonicalised by rewriting the module
    // before it is compiled (`nan.rs`), not by the compiler after every float instruction.
    c.cranelift_nan_canonicalization(false)
        .relaxed_simd_deterministic(true);
    c.wasm_features(ACCEPTED_FEATURES, true)
        .wasm_features(REFUSED_FEATURES, false);
    c.cranelift_opt_level(OptLevel::Speed)
        .max_wasm_stack(MAX_WASM_STACK)
        .epoch_interruption(config.epoch_deadlines)
        .consume_fuel(metering == Metering::Fuel);

    let slots = config.max_concurrent_units.max(1);
    let mut pool = PoolingAllocationConfig::new();
    pool.total_core_instances(slots)
        .total_memories(slots)
        .total_tables(slots * 4)
        .max_memories_per_module(1)
        .max_tables_per_module(4)
        .table_elements(config.max_table_elements)
        .max_memory_size(MAX_MEMORY_BYTES as usize)
        .linear_memory_keep_resident(config.keep_resident_bytes)
        .table_keep_resident(64 << 10)
        // Resets only the pages a unit dirtied, where the kernel can tell (Linux 6.7+).
        .pagemap_scan(Enabled::Auto);
    c.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    c
}

impl Sandbox {
    /// Sets up the engines, the caches and the deadline clock.
    pub fn new(config: SandboxConfig) -> Result<Self, SandboxError> {
        let flavor = |metering: Metering, tag: &str| -> Result<Flavor, SandboxError> {
            // Artifacts hold rewritten code: the profile version keeps another rewrite's apart.
            let tag = if config.canonicalize_nans {
                format!("{tag}-v{PROFILE_VERSION}")
            } else {
                format!("{tag}-uncanonical")
            };
            let engine = Engine::new(&engine_config(&config, metering))
                .map_err(|e| SandboxError::Engine(format!("{e:#}")))?;
            let mut linker = Linker::new(&engine);
            abi::define(&mut linker).map_err(|e| SandboxError::Engine(format!("{e:#}")))?;
            let disk = match &config.cache_dir {
                Some(dir) => Some(
                    DiskCache::open(dir, &engine, &tag, config.disk_cache_bytes).map_err(
                        |source| SandboxError::CacheDir {
                            path: dir.clone(),
                            source,
                        },
                    )?,
                ),
                None => None,
            };
            Ok(Flavor {
                engine,
                linker,
                memory: MemoryCache::new(config.memory_cache_entries),
                disk,
            })
        };
        let plain = flavor(Metering::Off, "plain")?;
        let fueled = flavor(Metering::Fuel, "fuel")?;
        let clock = Clock::start(vec![plain.engine.clone(), fueled.engine.clone()])
            .map_err(SandboxError::Thread)?;
        let compile = config
            .compile_threads
            .map(|threads| CompileSlots::new(config.cache_dir.as_deref(), threads));
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                plain,
                fueled,
                compile,
                clock,
                compiled: AtomicU64::new(0),
                disk_hits: AtomicU64::new(0),
                memory_hits: AtomicU64::new(0),
            }),
        })
    }

    /// The configuration it was built with.
    pub fn config(&self) -> &SandboxConfig {
        &self.inner.config
    }

    /// The engine profile units run under.
    pub fn profile(&self) -> &'static str {
        if self.inner.config.canonicalize_nans {
            PROFILE
        } else {
            PROFILE_UNCANONICAL_NANS
        }
    }

    /// Cache counters so far.
    pub fn cache_stats(&self) -> CacheStats {
        CacheStats {
            compiled: self.inner.compiled.load(Ordering::Relaxed),
            disk_hits: self.inner.disk_hits.load(Ordering::Relaxed),
            memory_hits: self.inner.memory_hits.load(Ordering::Relaxed),
        }
    }

    fn flavor(&self, metering: Metering) -> &Flavor {
        match metering {
            Metering::Off => &self.inner.plain,
            Metering::Fuel => &self.inner.fueled,
        }
    }

    /// Checks, compiles (or finds in a cache) and links a module.
    pub fn prepare(
        &self,
        wasm: &[u8],
        metering: Metering,
    ) -> Result<Arc<PreparedModule>, UnitError> {
        self.prepare_traced(wasm, metering)
            .map(|(module, _)| module)
    }

    /// Like [`Sandbox::prepare`], also saying where the module came from.
    pub fn prepare_traced(
        &self,
        wasm: &[u8],
        metering: Metering,
    ) -> Result<(Arc<PreparedModule>, ModuleSource), UnitError> {
        self.prepare_unbounded(wasm, metering)
            .map_err(UnitError::bounded)
    }

    fn prepare_unbounded(
        &self,
        wasm: &[u8],
        metering: Metering,
    ) -> Result<(Arc<PreparedModule>, ModuleSource), UnitError> {
        let cap = self.inner.config.max_module_bytes;
        if wasm.len() as u64 > cap {
            return Err(UnitError::ModuleTooLarge {
                size: wasm.len() as u64,
                cap,
            });
        }
        let digest = Digest::of(wasm);
        let flavor = self.flavor(metering);
        if let Some(prepared) = flavor.memory.get(&digest) {
            self.inner.memory_hits.fetch_add(1, Ordering::Relaxed);
            return Ok((prepared, ModuleSource::Memory));
        }
        check_imports(wasm)?;
        let load = || {
            flavor
                .disk
                .as_ref()
                .and_then(|disk| disk.load(&flavor.engine, &digest))
        };
        let mut cached = load();
        // A peer's unit hosts all start on a new job's module at once: one compiles it while
        // the others wait for its artifact instead of compiling the same module each.
        let _compiling = match (&cached, &flavor.disk) {
            (None, Some(disk)) => {
                let lock = disk.compile_lock(&digest);
                cached = load();
                lock
            }
            _ => None,
        };
        let (module, source) = match cached {
            // Only modules that passed `check_exports` were ever written to disk.
            Some(module) => {
                self.inner.disk_hits.fetch_add(1, Ordering::Relaxed);
                (module, ModuleSource::Disk)
            }
            None => {
                let span = tracing::debug_span!("compile", module = %digest);
                let canonicalize = self.inner.config.canonicalize_nans;
                let engine = &flavor.engine;
                let compile = move || {
                    let _span = span.enter();
                    let rewritten;
                    let code = if canonicalize {
                        rewritten = nan::canonicalize_observable_nans(wasm, validation_features())
                            .map_err(|e| UnitError::BadModule { reason: e.0 })?;
                        &rewritten[..]
                    } else {
                        wasm
                    };
                    Module::new(engine, code).map_err(|e| {
                        if out_of_memory(&e) {
                            UnitError::HostOutOfMemory {
                                detail: format!("{e:#}"),
                            }
                        } else {
                            UnitError::BadModule {
                                reason: format!("{e:#}"),
                            }
                        }
                    })
                };
                let module = match &self.inner.compile {
                    Some(slots) => slots.run(compile),
                    None => compile(),
                }?;
                check_exports(&module)?;
                self.inner.compiled.fetch_add(1, Ordering::Relaxed);
                if let Some(disk) = &flavor.disk {
                    disk.store(&digest, &module);
                }
                (module, ModuleSource::Compiled)
            }
        };
        let pre = flavor
            .linker
            .instantiate_pre(&module)
            .map_err(|e| UnitError::BadModule {
                reason: format!("{e:#}"),
            })?;
        let prepared = Arc::new(PreparedModule {
            digest,
            metering,
            pre,
        });
        flavor.memory.insert(digest, prepared.clone());
        Ok((prepared, source))
    }

    /// Runs one unit on the calling thread. The thread needs a few MiB of stack beyond the
    /// WebAssembly stack; [`Executor`] threads have it.
    pub fn run(&self, module: &PreparedModule, request: UnitRequest) -> UnitReport {
        let mut report = self.run_unbounded(module, request);
        report.result = report.result.map_err(UnitError::bounded);
        report
    }

    fn run_unbounded(&self, module: &PreparedModule, request: UnitRequest) -> UnitReport {
        let span = tracing::debug_span!("unit", module = %module.digest);
        let _entered = span.enter();
        let limits = request.limits;
        if request.input.len() as u64 > limits.input_bytes {
            return UnitReport::refused(UnitError::InputTooLarge {
                size: request.input.len() as u64,
                cap: limits.input_bytes,
            });
        }
        let budget = match (limits.fuel, module.metering) {
            (Some(budget), Metering::Fuel) => Some(budget),
            (None, Metering::Off) => None,
            (Some(_), Metering::Off) | (None, Metering::Fuel) => {
                return UnitReport::refused(UnitError::Host {
                    detail: "the module was prepared for another metering mode".into(),
                });
            }
        };
        let memory_cap = limits.memory_bytes.min(MAX_MEMORY_BYTES);
        let timeout = limits.timeout;
        let started = Instant::now();
        let abort = request.abort.clone();
        let state = HostState {
            input: request.input,
            output: Vec::new(),
            checkpoint: request.checkpoint,
            checkpoint_saved: false,
            limiter: MemoryLimiter {
                memory_cap,
                table_elements_cap: self.inner.config.max_table_elements,
                host_refused: None,
            },
            limits,
            logs: Vec::new(),
            log_bytes: 0,
            logs_dropped: 0,
            progress: None,
            progress_shown: None,
            memory: None,
            observer: request.observer,
            wasi: wasi::WasiState::default(),
        };
        let mut store = Store::new(module.pre.module().engine(), state);
        store.limiter(|state| &mut state.limiter);
        let ticks = timeout.as_nanos().div_ceil(TICK.as_nanos()) + 1;
        let ticks = u64::try_from(ticks).unwrap_or(u64::MAX);
        let _ticking = if self.inner.config.epoch_deadlines {
            match abort {
                // A unit that may be called off looks at its flag every tick (5 ms) and still
                // traps as late as it would otherwise: a revoked lease frees its thread at once.
                Some(abort) => {
                    let mut left = ticks;
                    store.set_epoch_deadline(1);
                    store.epoch_deadline_callback(move |_| {
                        if abort.is_aborted() {
                            return Err(Stop::Aborted.into());
                        }
                        left = left.saturating_sub(1);
                        Ok(if left == 0 {
                            wasmtime::UpdateDeadline::Interrupt
                        } else {
                            wasmtime::UpdateDeadline::Continue(1)
                        })
                    });
                }
                None => {
                    store.set_epoch_deadline(ticks);
                    store.epoch_deadline_trap();
                }
            }
            Some(self.inner.clock.running())
        } else {
            None
        };

        let result = (|| {
            if let Some(budget) = budget {
                store.set_fuel(budget).map_err(host_error)?;
            }
            let instance = module
                .pre
                .instantiate(&mut store)
                .map_err(|e| classify(e, &store, timeout, budget))?;
            let memory =
                instance
                    .get_memory(&mut store, MEMORY)
                    .ok_or_else(|| UnitError::BadModule {
                        reason: format!("no exported memory named \"{MEMORY}\""),
                    })?;
            store.data_mut().memory = Some(memory);
            // Fuel counts from the call of the entry point: how much instantiation consumes
            // differs between platforms (copy-on-write memory set-up).
            if let Some(budget) = budget {
                store.set_fuel(budget).map_err(host_error)?;
            }
            let bad = |e: wasmtime::Error| UnitError::BadModule {
                reason: format!("{e:#}"),
            };
            if module.pre.module().get_export(ENTRY).is_some() {
                let entry = instance
                    .get_typed_func::<(), i32>(&mut store, ENTRY)
                    .map_err(bad)?;
                match entry.call(&mut store, ()) {
                    Ok(0) => Ok(()),
                    Ok(code) => Err(UnitError::GuestFailure {
                        code,
                        message: String::new(),
                    }),
                    Err(e) => Err(classify(e, &store, timeout, budget)),
                }
            } else {
                // A WASI command: returning from `_start` or `proc_exit(0)` is success.
                let entry = instance
                    .get_typed_func::<(), ()>(&mut store, wasi::ENTRY)
                    .map_err(bad)?;
                match entry.call(&mut store, ()) {
                    Ok(()) => Ok(()),
                    Err(e) => match e.downcast_ref::<Stop>() {
                        Some(Stop::Exit { code: 0 }) => Ok(()),
                        _ => Err(classify(e, &store, timeout, budget)),
                    },
                }
            }
        })();

        let fuel_consumed = budget.map(|b| b.saturating_sub(store.get_fuel().unwrap_or(0)));
        let elapsed = started.elapsed();
        store.data_mut().flush_stderr();
        let state = store.into_data();
        let result = result.map(|()| state.output);
        if let Err(error) = &result {
            tracing::debug!(%error, class = ?error.class(), "unit failed");
        }
        UnitReport {
            result,
            logs: state.logs,
            logs_dropped: state.logs_dropped,
            progress: state.progress,
            checkpoint: state.checkpoint.filter(|_| state.checkpoint_saved),
            fuel_consumed,
            elapsed,
            profile: self.profile(),
        }
    }
}

fn host_error(e: wasmtime::Error) -> UnitError {
    UnitError::Host {
        detail: format!("{e:#}"),
    }
}

/// Turns an engine error into the unit's outcome.
fn classify(
    error: wasmtime::Error,
    store: &Store<HostState>,
    timeout: Duration,
    budget: Option<u64>,
) -> UnitError {
    if let Some(detail) = &store.data().limiter.host_refused {
        return UnitError::HostOutOfMemory {
            detail: detail.clone(),
        };
    }
    let error = match error.downcast::<Stop>() {
        Ok(stop) => return stop.into_unit_error(),
        Err(error) => error,
    };
    if let Some(trap) = error.downcast_ref::<wasmtime::Trap>() {
        use wasmtime::Trap;
        let kind = match trap {
            Trap::StackOverflow => return UnitError::StackOverflow,
            Trap::Interrupt => return UnitError::Timeout { limit: timeout },
            Trap::OutOfFuel => {
                return UnitError::OutOfFuel {
                    budget: budget.unwrap_or(0),
                };
            }
            Trap::MemoryOutOfBounds => TrapKind::MemoryOutOfBounds,
            Trap::TableOutOfBounds => TrapKind::TableOutOfBounds,
            Trap::IndirectCallToNull => TrapKind::IndirectCallToNull,
            Trap::BadSignature => TrapKind::BadSignature,
            Trap::IntegerOverflow => TrapKind::IntegerOverflow,
            Trap::IntegerDivisionByZero => TrapKind::IntegerDivisionByZero,
            Trap::BadConversionToInteger => TrapKind::BadConversionToInteger,
            Trap::UnreachableCodeReached => TrapKind::Unreachable,
            Trap::NullReference => TrapKind::NullReference,
            // Traps of features the profile does not enable: not expected, and not trusted to be
            // deterministic.
            other => {
                return UnitError::Host {
                    detail: format!("unexpected trap: {other}"),
                };
            }
        };
        return UnitError::Trap { kind };
    }
    UnitError::Host {
        detail: format!("{error:#}"),
    }
}

fn check_exports(module: &Module) -> Result<(), UnitError> {
    let bad = |reason: String| Err(UnitError::BadModule { reason });
    match (module.get_export(ENTRY), module.get_export(wasi::ENTRY)) {
        (Some(ExternType::Func(f)), _) => {
            let params: Vec<ValType> = f.params().collect();
            let results: Vec<ValType> = f.results().collect();
            if !params.is_empty() || results.len() != 1 || !matches!(results[0], ValType::I32) {
                return bad(format!(
                    "the export \"{ENTRY}\" must have the type [] -> [i32]"
                ));
            }
        }
        (Some(_), _) => return bad(format!("the export \"{ENTRY}\" is not a function")),
        (None, Some(ExternType::Func(f))) => {
            if f.params().len() != 0 || f.results().len() != 0 {
                return bad(format!(
                    "the export \"{}\" (a WASI command) must have the type [] -> []",
                    wasi::ENTRY
                ));
            }
        }
        (None, _) => {
            return bad(format!(
                "no exported function named \"{ENTRY}\" (or \"{}\", for a WASI program)",
                wasi::ENTRY
            ));
        }
    }
    match module.get_export(MEMORY) {
        Some(ExternType::Memory(m)) if !m.is_64() && !m.is_shared() => Ok(()),
        Some(_) => bad(format!("the export \"{MEMORY}\" is not a 32-bit memory")),
        None => bad(format!("no exported memory named \"{MEMORY}\"")),
    }
}

/// Advances the engines' epochs while any unit runs, so wall-clock deadlines fire; sleeps when
/// none does, so an idle peer costs nothing.
struct Clock {
    state: Mutex<ClockState>,
    wake: Condvar,
}

struct ClockState {
    running: usize,
    stop: bool,
}

struct Ticking<'a>(&'a Clock);

impl Drop for Ticking<'_> {
    fn drop(&mut self) {
        let mut state = self.0.state.lock().unwrap_or_else(|p| p.into_inner());
        state.running -= 1;
    }
}

impl Clock {
    fn start(engines: Vec<Engine>) -> std::io::Result<Arc<Self>> {
        let clock = Arc::new(Self {
            state: Mutex::new(ClockState {
                running: 0,
                stop: false,
            }),
            wake: Condvar::new(),
        });
        let ticker = clock.clone();
        std::thread::Builder::new()
            .name("cf-deadlines".into())
            .spawn(move || ticker.tick(&engines))?;
        Ok(clock)
    }

    fn tick(&self, engines: &[Engine]) {
        loop {
            {
                let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
                while state.running == 0 && !state.stop {
                    state = self.wake.wait(state).unwrap_or_else(|p| p.into_inner());
                }
                if state.stop {
                    return;
                }
            }
            std::thread::sleep(TICK);
            for engine in engines {
                engine.increment_epoch();
            }
        }
    }

    fn running(&self) -> Ticking<'_> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.running += 1;
        self.wake.notify_one();
        Ticking(self)
    }

    fn shut_down(&self) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.stop = true;
        self.wake.notify_one();
    }
}

/// Reads a module file's bytes: binary WebAssembly as is, or the text format (`.wat`) converted.
pub fn module_from_file_bytes(bytes: &[u8]) -> Result<std::borrow::Cow<'_, [u8]>, UnitError> {
    if bytes.starts_with(b"\0asm") {
        return Ok(std::borrow::Cow::Borrowed(bytes));
    }
    if bytes.is_empty() {
        return Err(UnitError::BadModule {
            reason: "the module is empty".into(),
        });
    }
    match std::str::from_utf8(bytes) {
        Ok(text) => wat::parse_str(text)
            .map(std::borrow::Cow::Owned)
            .map_err(|e| UnitError::BadModule {
                reason: format!(
                    "not WebAssembly (no \\0asm header), and not the text format either: {}",
                    wat_error_line(&e.to_string())
                ),
            }),
        Err(_) => Err(UnitError::BadModule {
            reason: "not WebAssembly (no \\0asm header) and not text".into(),
        }),
    }
}

/// The text-format parser's error on one line: its message and where, without the quoted
/// source it draws below.
fn wat_error_line(error: &str) -> String {
    let mut lines = error.lines();
    let message = lines.next().unwrap_or_default().trim();
    let place = lines
        .find_map(|l| l.trim().strip_prefix("-->"))
        .and_then(|place| {
            let mut parts = place.trim().rsplitn(3, ':');
            let column = parts.next()?.parse::<u64>().ok()?;
            let line = parts.next()?.parse::<u64>().ok()?;
            Some(format!(" at line {line}, column {column}"))
        })
        .unwrap_or_default();
    format!("{message}{place}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_that_is_no_module_is_refused_in_one_line() {
        for (bytes, place) in [
            (&b"hello"[..], "at line 1, column 1"),
            (
                b"(module\n  (func (export \"run\") (result i32) i32.const x))",
                "at line 2",
            ),
        ] {
            let err = module_from_file_bytes(bytes).unwrap_err().to_string();
            assert_eq!(err.lines().count(), 1, "{err}");
            assert!(err.contains("not WebAssembly"), "{err}");
            assert!(err.contains(place), "{err}");
        }
        let err = UnitError::GuestFailure {
            code: -5,
            message: String::new(),
        };
        assert_eq!(err.to_string(), "guest failure (code -5)");
    }

    #[test]
    fn a_compile_the_machine_could_not_finish_is_no_bad_module() {
        let refused = wasmtime::Error::new(std::io::Error::from_raw_os_error(ENOMEM))
            .context("mmap failed to allocate 0x10000 bytes");
        assert!(out_of_memory(&refused));
        assert!(out_of_memory(&wasmtime::Error::new(std::io::Error::from(
            std::io::ErrorKind::OutOfMemory
        ))));
        let engine = Engine::default();
        let invalid = Module::new(&engine, b"\0asm\x01\0\0\0\x05").unwrap_err();
        assert!(!out_of_memory(&invalid));
    }
}
