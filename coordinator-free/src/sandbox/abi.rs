//! Guest ABI v1: the import allow-list, checked before compiling, and the host functions behind
//! it. The contract itself is documented in `docs/guest-abi.md`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use wasmtime::wasmparser::{self, Parser, Payload, TypeRef, ValType};
use wasmtime::{Caller, Linker, Memory};

use super::outcome::{TrapKind, UnitError};
use super::{Limits, LogLevel, LogLine, UnitObserver};

/// The import module every host function lives in; its name carries the ABI version.
pub const IMPORT_MODULE: &str = "cf1";
/// The exported entry point.
pub const ENTRY: &str = "run";
/// The exported memory.
pub const MEMORY: &str = "memory";
/// The shortest time between two progress reports passed on to a unit's observer: ten a second
/// is as often as a progress bar redraws, and a guest reporting progress in its inner loop then
/// costs the host nothing (each report a unit host passes on is a frame and a wake-up of its
/// parent).
pub const PROGRESS_INTERVAL: Duration = Duration::from_millis(100);

#[derive(Clone, Copy, PartialEq, Eq)]
enum Ty {
    I32,
    I64,
}

struct Import {
    name: &'static str,
    params: &'static [Ty],
    results: &'static [Ty],
}

/// The functions of WASI preview 1 a module may import (see `wasi.rs`); every other one is
/// refused before compiling.
const WASI_IMPORTS: &[Import] = &[
    Import {
        name: "args_get",
        params: &[Ty::I32, Ty::I32],
        results: &[Ty::I32],
    },
    Import {
        name: "args_sizes_get",
        params: &[Ty::I32, Ty::I32],
        results: &[Ty::I32],
    },
    Import {
        name: "environ_get",
        params: &[Ty::I32, Ty::I32],
        results: &[Ty::I32],
    },
    Import {
        name: "environ_sizes_get",
        params: &[Ty::I32, Ty::I32],
        results: &[Ty::I32],
    },
    Import {
        name: "clock_res_get",
        params: &[Ty::I32, Ty::I32],
        results: &[Ty::I32],
    },
    Import {
        name: "clock_time_get",
        params: &[Ty::I32, Ty::I64, Ty::I32],
        results: &[Ty::I32],
    },
    Import {
        name: "fd_close",
        params: &[Ty::I32],
        results: &[Ty::I32],
    },
    Import {
        name: "fd_fdstat_get",
        params: &[Ty::I32, Ty::I32],
        results: &[Ty::I32],
    },
    Import {
        name: "fd_fdstat_set_flags",
        params: &[Ty::I32, Ty::I32],
        results: &[Ty::I32],
    },
    Import {
        name: "fd_prestat_get",
        params: &[Ty::I32, Ty::I32],
        results: &[Ty::I32],
    },
    Import {
        name: "fd_prestat_dir_name",
        params: &[Ty::I32, Ty::I32, Ty::I32],
        results: &[Ty::I32],
    },
    Import {
        name: "fd_read",
        params: &[Ty::I32, Ty::I32, Ty::I32, Ty::I32],
        results: &[Ty::I32],
    },
    Import {
        name: "fd_write",
        params: &[Ty::I32, Ty::I32, Ty::I32, Ty::I32],
        results: &[Ty::I32],
    },
    Import {
        name: "fd_seek",
        params: &[Ty::I32, Ty::I64, Ty::I32, Ty::I32],
        results: &[Ty::I32],
    },
    Import {
        name: "path_open",
        params: &[
            Ty::I32,
            Ty::I32,
            Ty::I32,
            Ty::I32,
            Ty::I32,
            Ty::I64,
            Ty::I64,
            Ty::I32,
            Ty::I32,
        ],
        results: &[Ty::I32],
    },
    Import {
        name: "proc_exit",
        params: &[Ty::I32],
        results: &[],
    },
    Import {
        name: "random_get",
        params: &[Ty::I32, Ty::I32],
        results: &[Ty::I32],
    },
    Import {
        name: "sched_yield",
        params: &[],
        results: &[Ty::I32],
    },
];

const IMPORTS: &[Import] = &[
    Import {
        name: "input_len",
        params: &[],
        results: &[Ty::I32],
    },
    Import {
        name: "input_read",
        params: &[Ty::I32, Ty::I32, Ty::I32],
        results: &[Ty::I32],
    },
    Import {
        name: "output_write",
        params: &[Ty::I32, Ty::I32],
        results: &[],
    },
    Import {
        name: "log",
        params: &[Ty::I32, Ty::I32, Ty::I32],
        results: &[],
    },
    Import {
        name: "progress",
        params: &[Ty::I64, Ty::I64],
        results: &[],
    },
    Import {
        name: "checkpoint_save",
        params: &[Ty::I32, Ty::I32],
        results: &[],
    },
    Import {
        name: "checkpoint_len",
        params: &[],
        results: &[Ty::I32],
    },
    Import {
        name: "checkpoint_read",
        params: &[Ty::I32, Ty::I32, Ty::I32],
        results: &[Ty::I32],
    },
    Import {
        name: "fail",
        params: &[Ty::I32, Ty::I32, Ty::I32],
        results: &[],
    },
];

fn forbidden(module: &str, name: &str, reason: impl Into<String>) -> UnitError {
    UnitError::ForbiddenImport {
        module: module.to_owned(),
        name: name.to_owned(),
        reason: reason.into(),
    }
}

fn malformed(err: wasmparser::BinaryReaderError) -> UnitError {
    UnitError::BadModule {
        reason: err.to_string(),
    }
}

fn matches(expected: &[Ty], actual: &[ValType]) -> bool {
    expected.len() == actual.len()
        && expected
            .iter()
            .zip(actual)
            .all(|(e, a)| matches!((e, a), (Ty::I32, ValType::I32) | (Ty::I64, ValType::I64)))
}

/// Checks every import of `wasm` against the allow-list without compiling anything. Only the
/// sections up to the import section are parsed, so this is cheap even for large modules.
pub fn check_imports(wasm: &[u8]) -> Result<(), UnitError> {
    check_imports_unbounded(wasm).map_err(UnitError::bounded)
}

fn check_imports_unbounded(wasm: &[u8]) -> Result<(), UnitError> {
    if wasm.is_empty() {
        return Err(UnitError::BadModule {
            reason: "the module is empty".into(),
        });
    }
    // Function types by index; a `None` is a non-function type, which no import may use.
    let mut types: Vec<Option<(Vec<ValType>, Vec<ValType>)>> = Vec::new();
    for payload in Parser::new(0).parse_all(wasm) {
        match payload.map_err(malformed)? {
            Payload::Version { encoding, .. } if encoding != wasmparser::Encoding::Module => {
                return Err(UnitError::BadModule {
                    reason: "a component, not a core module".into(),
                });
            }
            Payload::TypeSection(reader) => {
                for group in reader {
                    for sub in group.map_err(malformed)?.into_types() {
                        types.push(match &sub.composite_type.inner {
                            wasmparser::CompositeInnerType::Func(f) => {
                                Some((f.params().to_vec(), f.results().to_vec()))
                            }
                            _ => None,
                        });
                    }
                }
            }
            Payload::ImportSection(reader) => {
                for import in reader.into_imports() {
                    let import = import.map_err(malformed)?;
                    check_import(&import, &types)?;
                }
            }
            // Imports precede every section after them; nothing later can add one.
            Payload::FunctionSection(_)
            | Payload::TableSection(_)
            | Payload::MemorySection(_)
            | Payload::GlobalSection(_)
            | Payload::ExportSection(_)
            | Payload::CodeSectionStart { .. }
            | Payload::DataSection(_)
            | Payload::End(_) => return Ok(()),
            _ => {}
        }
    }
    Ok(())
}

fn check_import(
    import: &wasmparser::Import<'_>,
    types: &[Option<(Vec<ValType>, Vec<ValType>)>],
) -> Result<(), UnitError> {
    let list = match import.module {
        IMPORT_MODULE => IMPORTS,
        super::wasi::MODULE => WASI_IMPORTS,
        _ => {
            return Err(forbidden(
                import.module,
                import.name,
                format!(
                    "only imports from \"{IMPORT_MODULE}\" and the WASI subset of \"{}\" are allowed",
                    super::wasi::MODULE
                ),
            ));
        }
    };
    let TypeRef::Func(index) = import.ty else {
        return Err(forbidden(
            import.module,
            import.name,
            "only functions may be imported",
        ));
    };
    let Some(spec) = list.iter().find(|i| i.name == import.name) else {
        return Err(forbidden(
            import.module,
            import.name,
            if import.module == IMPORT_MODULE {
                "not a function of the guest ABI"
            } else {
                "not in the WASI subset: no files, sockets, threads or polling"
            },
        ));
    };
    let Some(Some((params, results))) = usize::try_from(index).ok().and_then(|i| types.get(i))
    else {
        return Err(forbidden(
            import.module,
            import.name,
            "its type is not a function type",
        ));
    };
    if !matches(spec.params, params) || !matches(spec.results, results) {
        return Err(forbidden(
            import.module,
            import.name,
            "its signature differs from the guest ABI",
        ));
    }
    Ok(())
}

/// Why a host function stopped the unit. Carried through wasmtime as the error of the host call
/// and turned back into a [`UnitError`] at the sandbox boundary.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Stop {
    #[error("guest failure {code}")]
    GuestFailure { code: i32, message: String },
    #[error("output too large")]
    OutputTooLarge { cap: u64 },
    #[error("checkpoint too large")]
    CheckpointTooLarge { size: u64, cap: u64 },
    #[error("abi violation")]
    AbiViolation,
    #[error("memory limit")]
    MemoryLimit { requested: u64, cap: u64 },
    /// The unit is no longer wanted (its lease was revoked).
    #[error("aborted")]
    Aborted,
    /// A WASI program called `proc_exit`.
    #[error("exit {code}")]
    Exit { code: i32 },
}

impl Stop {
    pub(crate) fn into_unit_error(self) -> UnitError {
        match self {
            Self::GuestFailure { code, message } => UnitError::GuestFailure { code, message },
            Self::OutputTooLarge { cap } => UnitError::OutputTooLarge { cap },
            Self::CheckpointTooLarge { size, cap } => UnitError::CheckpointTooLarge { size, cap },
            Self::AbiViolation => UnitError::Trap {
                kind: TrapKind::AbiViolation,
            },
            Self::MemoryLimit { requested, cap } => UnitError::MemoryLimit { requested, cap },
            Self::Aborted => super::aborted_error(),
            // `proc_exit(0)` is a success, told apart before an error is made of it.
            Self::Exit { code } => UnitError::GuestFailure {
                code,
                message: String::new(),
            },
        }
    }
}

/// Everything a running unit can touch through its imports.
pub(crate) struct HostState {
    pub(crate) input: Arc<[u8]>,
    pub(crate) output: Vec<u8>,
    pub(crate) checkpoint: Option<Vec<u8>>,
    pub(crate) checkpoint_saved: bool,
    pub(crate) limits: Limits,
    pub(crate) logs: Vec<LogLine>,
    pub(crate) log_bytes: u64,
    pub(crate) logs_dropped: u64,
    pub(crate) progress: Option<(u64, u64)>,
    /// When the observer last heard of progress, and whether that report was complete
    /// (`done >= total`): reports closer together are kept, not passed on.
    pub(crate) progress_shown: Option<(Instant, bool)>,
    pub(crate) memory: Option<Memory>,
    pub(crate) observer: Option<Arc<dyn UnitObserver>>,
    pub(crate) limiter: MemoryLimiter,
    pub(crate) wasi: super::wasi::WasiState,
}

/// Enforces the memory cap and tells a deterministic refusal (over the cap) from a host one.
pub(crate) struct MemoryLimiter {
    pub(crate) memory_cap: u64,
    pub(crate) table_elements_cap: usize,
    pub(crate) host_refused: Option<String>,
}

impl wasmtime::ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let desired = desired as u64;
        if desired > self.memory_cap {
            return Err(wasmtime::Error::new(Stop::MemoryLimit {
                requested: desired,
                cap: self.memory_cap,
            }));
        }
        // Past the module's own declared maximum growth fails in the guest (`memory.grow`
        // returns -1) on every machine alike.
        Ok(maximum.is_none_or(|max| desired <= max as u64))
    }

    fn memory_grow_failed(&mut self, error: wasmtime::Error) -> wasmtime::Result<()> {
        // Growth below both caps was allowed and the machine still said no.
        self.host_refused = Some(error.to_string());
        Ok(())
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= self.table_elements_cap && maximum.is_none_or(|max| desired <= max))
    }

    fn instances(&self) -> usize {
        1
    }

    fn tables(&self) -> usize {
        4
    }

    fn memories(&self) -> usize {
        1
    }
}

/// The byte range `[ptr, ptr + len)` of a guest memory of `size` bytes, if it lies inside.
fn guest_range(ptr: i32, len: i32, size: usize) -> Result<std::ops::Range<usize>, Stop> {
    // The ABI reads pointers and lengths as unsigned 32-bit values.
    let start = ptr as u32 as usize;
    let end = start
        .checked_add(len as u32 as usize)
        .ok_or(Stop::AbiViolation)?;
    if end > size {
        return Err(Stop::AbiViolation);
    }
    Ok(start..end)
}

fn memory(caller: &Caller<'_, HostState>) -> Result<Memory, Stop> {
    caller.data().memory.ok_or(Stop::AbiViolation)
}

fn guest_bytes(caller: &Caller<'_, HostState>, ptr: i32, len: i32) -> Result<Vec<u8>, Stop> {
    let mem = memory(caller)?;
    let data = mem.data(caller);
    let range = guest_range(ptr, len, data.len())?;
    Ok(data[range].to_vec())
}

/// Copies `source[offset..offset + len]`, clamped to its end, into guest memory at `dst`.
fn copy_to_guest(
    caller: &mut Caller<'_, HostState>,
    which: fn(&HostState) -> Option<&[u8]>,
    dst: i32,
    offset: i32,
    len: i32,
) -> Result<i32, Stop> {
    let mem = memory(caller)?;
    let (data, state) = mem.data_and_store_mut(caller);
    let range = guest_range(dst, len, data.len())?;
    let Some(source) = which(state) else {
        return Ok(0);
    };
    let offset = offset as u32 as usize;
    if offset >= source.len() {
        return Ok(0);
    }
    let count = range.len().min(source.len() - offset);
    data[range.start..range.start + count].copy_from_slice(&source[offset..offset + count]);
    // `count` fits: it is at most `len`, a 32-bit value.
    Ok(count as i32)
}

fn stop(result: Result<(), Stop>) -> wasmtime::Result<()> {
    result.map_err(wasmtime::Error::new)
}

/// Defines every host function of the ABI in `linker`.
pub(crate) fn define(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    linker.func_wrap(
        IMPORT_MODULE,
        "input_len",
        |caller: Caller<'_, HostState>| {
            // Inputs are capped far below 2 GiB, so the length fits.
            caller.data().input.len() as i32
        },
    )?;
    linker.func_wrap(
        IMPORT_MODULE,
        "input_read",
        |mut caller: Caller<'_, HostState>, dst: i32, offset: i32, len: i32| {
            copy_to_guest(&mut caller, |s| Some(&s.input), dst, offset, len)
                .map_err(wasmtime::Error::new)
        },
    )?;
    linker.func_wrap(
        IMPORT_MODULE,
        "output_write",
        |mut caller: Caller<'_, HostState>, src: i32, len: i32| {
            stop((|| {
                let mem = memory(&caller)?;
                let (data, state) = mem.data_and_store_mut(&mut caller);
                let range = guest_range(src, len, data.len())?;
                let cap = state.limits.output_bytes;
                if (state.output.len() + range.len()) as u64 > cap {
                    return Err(Stop::OutputTooLarge { cap });
                }
                state.output.extend_from_slice(&data[range]);
                Ok(())
            })())
        },
    )?;
    linker.func_wrap(
        IMPORT_MODULE,
        "log",
        |mut caller: Caller<'_, HostState>, level: i32, src: i32, len: i32| {
            stop((|| {
                let mem = memory(&caller)?;
                let (data, state) = mem.data_and_store_mut(&mut caller);
                let range = guest_range(src, len, data.len())?;
                state.log(LogLevel::from_abi(level), &data[range]);
                Ok(())
            })())
        },
    )?;
    linker.func_wrap(
        IMPORT_MODULE,
        "progress",
        |mut caller: Caller<'_, HostState>, done: i64, total: i64| {
            let state = caller.data_mut();
            let progress = (done.max(0) as u64, total.max(0) as u64);
            state.progress = Some(progress);
            // The unit's report always carries the last value; an observer (a progress bar, the
            // pipe to a unit host's parent) hears one report per interval, and a report that
            // completes the work at once unless the last one it heard was complete already: at
            // most two per interval, however often and with whatever values a guest calls this.
            if let Some(observer) = &state.observer {
                let now = Instant::now();
                let complete = progress.0 >= progress.1;
                let due = match state.progress_shown {
                    None => true,
                    Some((shown, shown_complete)) => {
                        now.duration_since(shown) >= PROGRESS_INTERVAL
                            || (complete && !shown_complete)
                    }
                };
                if due {
                    state.progress_shown = Some((now, complete));
                    observer.progress(progress.0, progress.1);
                }
            }
        },
    )?;
    linker.func_wrap(
        IMPORT_MODULE,
        "checkpoint_save",
        |mut caller: Caller<'_, HostState>, src: i32, len: i32| {
            stop((|| {
                let cap = caller.data().limits.checkpoint_bytes;
                if len as u32 as u64 > cap {
                    return Err(Stop::CheckpointTooLarge {
                        size: len as u32 as u64,
                        cap,
                    });
                }
                let bytes = guest_bytes(&caller, src, len)?;
                let state = caller.data_mut();
                if let Some(observer) = &state.observer {
                    observer.checkpoint(&bytes);
                }
                state.checkpoint = Some(bytes);
                state.checkpoint_saved = true;
                Ok(())
            })())
        },
    )?;
    linker.func_wrap(
        IMPORT_MODULE,
        "checkpoint_len",
        |caller: Caller<'_, HostState>| match &caller.data().checkpoint {
            // Checkpoints are capped far below 2 GiB.
            Some(bytes) => bytes.len() as i32,
            None => -1,
        },
    )?;
    linker.func_wrap(
        IMPORT_MODULE,
        "checkpoint_read",
        |mut caller: Caller<'_, HostState>, dst: i32, offset: i32, len: i32| {
            copy_to_guest(&mut caller, |s| s.checkpoint.as_deref(), dst, offset, len)
                .map_err(wasmtime::Error::new)
        },
    )?;
    linker.func_wrap(
        IMPORT_MODULE,
        "fail",
        |caller: Caller<'_, HostState>, code: i32, src: i32, len: i32| -> wasmtime::Result<()> {
            let cap = caller.data().limits.log_line_bytes;
            // The message is read up to the log line cap; a longer one is cut, not refused.
            let len = (len as u32).min(u32::try_from(cap).unwrap_or(u32::MAX)) as i32;
            let message = guest_bytes(&caller, src, len).map_err(wasmtime::Error::new)?;
            Err(wasmtime::Error::new(Stop::GuestFailure {
                code: if code == 0 { 1 } else { code },
                message: String::from_utf8_lossy(&message).into_owned(),
            }))
        },
    )?;
    super::wasi::define(linker)
}

impl HostState {
    pub(crate) fn log(&mut self, level: LogLevel, bytes: &[u8]) {
        let cap = self.limits.log_bytes;
        let line_cap = self.limits.log_line_bytes as usize;
        if self.log_bytes >= cap {
            self.logs_dropped += 1;
            return;
        }
        let take = bytes
            .len()
            .min(line_cap)
            .min((cap - self.log_bytes) as usize);
        // Escaped where it is made: the line may reach the volunteer's terminal.
        let mut text =
            crate::text::escape_controls(&String::from_utf8_lossy(&bytes[..take])).into_owned();
        if take < bytes.len() {
            text.push('…');
        }
        self.log_bytes += take as u64;
        let line = LogLine { level, text };
        if let Some(observer) = &self.observer {
            observer.log(&line);
        }
        self.logs.push(line);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal(wat: &str) -> UnitError {
        check_imports(&wat::parse_str(wat).expect("test module parses"))
            .expect_err("module must be refused")
    }

    #[test]
    fn accepts_the_abi() {
        let wasm = wat::parse_str(
            r#"(module
                (import "cf1" "input_len" (func (result i32)))
                (import "cf1" "progress" (func (param i64 i64)))
                (import "cf1" "fail" (func (param i32 i32 i32)))
                (memory (export "memory") 1)
                (func (export "run") (result i32) i32.const 0))"#,
        )
        .unwrap();
        assert_eq!(check_imports(&wasm), Ok(()));
    }

    #[test]
    fn refuses_other_modules_names_kinds_and_signatures() {
        for (wat, what) in [
            (
                r#"(module (import "env" "memset" (func (param i32 i32 i32) (result i32))))"#,
                "only imports from",
            ),
            (
                r#"(module (import "wasi_snapshot_preview1" "sock_accept" (func (param i32 i32 i32) (result i32))))"#,
                "not in the WASI subset",
            ),
            (
                r#"(module (import "wasi_snapshot_preview1" "fd_write" (func (param i32 i32 i32) (result i32))))"#,
                "signature differs",
            ),
            (
                r#"(module (import "cf1" "clock" (func (result i64))))"#,
                "not a function of the guest ABI",
            ),
            (
                r#"(module (import "cf1" "input_len" (func (result i64))))"#,
                "signature differs",
            ),
            (
                r#"(module (import "cf1" "log" (func (param i32 i32))))"#,
                "signature differs",
            ),
            (
                r#"(module (import "cf1" "memory" (memory 1)))"#,
                "only functions",
            ),
            (
                r#"(module (import "cf1" "g" (global i32)))"#,
                "only functions",
            ),
        ] {
            match refusal(wat) {
                UnitError::ForbiddenImport { reason, .. } => {
                    assert!(reason.contains(what), "{reason} should say {what}")
                }
                other => panic!("expected a forbidden import, got {other:?}"),
            }
        }
    }

    #[test]
    fn refuses_garbage() {
        assert!(matches!(
            check_imports(b""),
            Err(UnitError::BadModule { .. })
        ));
        assert!(matches!(
            check_imports(b"\0asm\x01\0\0\0\x02\xff\xff\xff"),
            Err(UnitError::BadModule { .. })
        ));
        assert!(matches!(
            check_imports(b"not wasm at all"),
            Err(UnitError::BadModule { .. })
        ));
    }

    #[test]
    fn ranges_are_bounds_checked_as_unsigned() {
        assert_eq!(guest_range(0, 10, 10).unwrap(), 0..10);
        assert!(guest_range(1, 10, 10).is_err());
        assert!(guest_range(-1, 1, 1 << 20).is_err());
        assert!(guest_range(5, -1, 1 << 20).is_err());
        assert_eq!(guest_range(10, 0, 10).unwrap(), 10..10);
    }
}
