//! A deterministic subset of WASI preview 1, so programs built for `wasm32-wasip1` (Rust with
//! `std`) or with wasi-libc (C, C++) run unchanged: stdin is the unit's input, stdout its output,
//! stderr its log. Everything a program could observe is a function of the unit's input:
//!
//! * `args` is `unit` followed by the manifest's `[wasi] args`; `environ` is its `[wasi] env`
//!   (both the same for every unit of a job, and part of its id).
//! * Clocks are virtual: every clock reading advances them by one microsecond, from
//!   2000-01-01T00:00:00Z for the real-time clock and from zero for the others.
//! * `random_get` draws from BLAKE3's output stream keyed by the unit's input.
//! * There are no preopened directories: `fd_prestat_get` ends the list at once, so libc's
//!   `open` fails cleanly (and `path_open` answers `ENOTCAPABLE`).
//! * `proc_exit(0)` ends the unit successfully; any other code is a guest failure with it.
//!
//! Every other WASI function is refused before compiling, like any import outside the ABI.
//! Guest pointers outside memory get `EFAULT`, bad descriptors `EBADF`.

use wasmtime::{Caller, Linker};

use super::LogLevel;
use super::abi::{HostState, Stop};

/// The import module of WASI preview 1.
pub const MODULE: &str = "wasi_snapshot_preview1";
/// The entry point of a WASI command.
pub const ENTRY: &str = "_start";

/// What the real-time clock reads first: 2000-01-01T00:00:00Z, in nanoseconds.
const EPOCH_2000_NS: u64 = 946_684_800 * 1_000_000_000;
/// How far every clock reading advances the clocks.
const TICK_NS: u64 = 1_000;
/// Most iovecs one read or write may name.
const MAX_IOVECS: u32 = 1024;

// WASI errno values.
const SUCCESS: i32 = 0;
const EBADF: i32 = 8;
const EFAULT: i32 = 21;
const EINVAL: i32 = 28;
const ESPIPE: i32 = 70;
const ENOTCAPABLE: i32 = 76;

/// What WASI keeps per unit.
#[derive(Default)]
pub(crate) struct WasiState {
    /// How much of the input stdin has given.
    input_read: usize,
    /// Clock readings so far.
    clock_reads: u64,
    /// The random stream, started at the first `random_get`.
    random: Option<blake3::OutputReader>,
    /// Bytes written to stderr since its last full line.
    stderr: Vec<u8>,
}

impl HostState {
    /// Logs what stderr holds that did not end in a newline (at the end of a unit).
    pub(crate) fn flush_stderr(&mut self) {
        let rest = std::mem::take(&mut self.wasi.stderr);
        if !rest.is_empty() {
            self.log(LogLevel::Info, &rest);
        }
    }

    fn write_stderr(&mut self, bytes: &[u8]) {
        let cap = usize::try_from(self.limits.log_line_bytes).unwrap_or(usize::MAX);
        self.wasi.stderr.extend_from_slice(bytes);
        while let Some(end) = self.wasi.stderr.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.wasi.stderr.drain(..=end).collect();
            self.log(LogLevel::Info, &line[..line.len() - 1]);
        }
        if self.wasi.stderr.len() > cap {
            let line = std::mem::take(&mut self.wasi.stderr);
            self.log(LogLevel::Info, &line);
        }
    }
}

/// The guest memory and the host state of a call.
fn parts<'a>(caller: &'a mut Caller<'_, HostState>) -> Option<(&'a mut [u8], &'a mut HostState)> {
    let memory = caller.data().memory?;
    Some(memory.data_and_store_mut(caller))
}

fn range(ptr: i32, len: u64, size: usize) -> Option<std::ops::Range<usize>> {
    let start = ptr as u32 as usize;
    let end = start.checked_add(usize::try_from(len).ok()?)?;
    (end <= size).then_some(start..end)
}

fn put(data: &mut [u8], ptr: i32, bytes: &[u8]) -> Result<(), i32> {
    let r = range(ptr, bytes.len() as u64, data.len()).ok_or(EFAULT)?;
    data[r].copy_from_slice(bytes);
    Ok(())
}

fn get_u32(data: &[u8], ptr: u64) -> Result<u32, i32> {
    let start = usize::try_from(ptr).map_err(|_| EFAULT)?;
    let bytes = data
        .get(start..start.checked_add(4).ok_or(EFAULT)?)
        .ok_or(EFAULT)?;
    Ok(u32::from_le_bytes(bytes.try_into().map_err(|_| EFAULT)?))
}

/// The `(pointer, length)` pairs of an iovec array.
fn iovecs(data: &[u8], iovs: i32, count: i32) -> Result<Vec<(u32, u32)>, i32> {
    let count = count as u32;
    if count > MAX_IOVECS {
        return Err(EINVAL);
    }
    let base = u64::from(iovs as u32);
    (0..u64::from(count))
        .map(|i| {
            let at = base + i * 8;
            Ok((get_u32(data, at)?, get_u32(data, at + 4)?))
        })
        .collect()
}

fn errno(result: Result<(), i32>) -> i32 {
    result.err().unwrap_or(SUCCESS)
}

fn fd_read(caller: &mut Caller<'_, HostState>, fd: i32, iovs: i32, count: i32, nread: i32) -> i32 {
    let Some((data, state)) = parts(caller) else {
        return EFAULT;
    };
    if fd != 0 {
        return EBADF;
    }
    errno((|| {
        let mut total: u32 = 0;
        for (ptr, len) in iovecs(data, iovs, count)? {
            let r = range(ptr as i32, u64::from(len), data.len()).ok_or(EFAULT)?;
            let rest = &state.input[state.wasi.input_read.min(state.input.len())..];
            let n = r.len().min(rest.len());
            data[r.start..r.start + n].copy_from_slice(&rest[..n]);
            state.wasi.input_read += n;
            // `n` is at most `len`, a 32-bit value, and inputs are far below 4 GiB.
            total = total.saturating_add(n as u32);
            if n < r.len() {
                break;
            }
        }
        put(data, nread, &total.to_le_bytes())
    })())
}

fn fd_write(
    caller: &mut Caller<'_, HostState>,
    fd: i32,
    iovs: i32,
    count: i32,
    nwritten: i32,
) -> Result<i32, Stop> {
    let Some((data, state)) = parts(caller) else {
        return Ok(EFAULT);
    };
    if fd != 1 && fd != 2 {
        return Ok(EBADF);
    }
    let vecs = match iovecs(data, iovs, count) {
        Ok(v) => v,
        Err(e) => return Ok(e),
    };
    let mut total: u32 = 0;
    for (ptr, len) in vecs {
        let Some(r) = range(ptr as i32, u64::from(len), data.len()) else {
            return Ok(EFAULT);
        };
        if fd == 1 {
            let cap = state.limits.output_bytes;
            if (state.output.len() + r.len()) as u64 > cap {
                return Err(Stop::OutputTooLarge { cap });
            }
            state.output.extend_from_slice(&data[r.clone()]);
        } else {
            state.write_stderr(&data[r.clone()]);
        }
        total = total.saturating_add(len);
    }
    Ok(errno(put(data, nwritten, &total.to_le_bytes())))
}

fn clock_time_get(caller: &mut Caller<'_, HostState>, id: i32, time: i32) -> i32 {
    let Some((data, state)) = parts(caller) else {
        return EFAULT;
    };
    if !(0..=3).contains(&id) {
        return EINVAL;
    }
    state.wasi.clock_reads += 1;
    let elapsed = state.wasi.clock_reads.saturating_mul(TICK_NS);
    let value = if id == 0 {
        EPOCH_2000_NS.saturating_add(elapsed)
    } else {
        elapsed
    };
    errno(put(data, time, &value.to_le_bytes()))
}

fn random_get(caller: &mut Caller<'_, HostState>, buf: i32, len: i32) -> i32 {
    let Some((data, state)) = parts(caller) else {
        return EFAULT;
    };
    let Some(r) = range(buf, u64::from(len as u32), data.len()) else {
        return EFAULT;
    };
    let input = std::sync::Arc::clone(&state.input);
    let reader = state.wasi.random.get_or_insert_with(|| {
        blake3::Hasher::new_derive_key("coordinator-free 2026 wasi random_get v1")
            .update(&input)
            .finalize_xof()
    });
    reader.fill(&mut data[r]);
    SUCCESS
}

/// `fdstat` of the three standard streams: unknown file type (so libc buffers stdout fully),
/// reading rights on stdin, writing rights on stdout and stderr.
fn fd_fdstat_get(caller: &mut Caller<'_, HostState>, fd: i32, ptr: i32) -> i32 {
    let Some((data, _)) = parts(caller) else {
        return EFAULT;
    };
    const RIGHT_FD_READ: u64 = 1 << 1;
    const RIGHT_FD_WRITE: u64 = 1 << 6;
    let rights = match fd {
        0 => RIGHT_FD_READ,
        1 | 2 => RIGHT_FD_WRITE,
        _ => return EBADF,
    };
    let mut stat = [0u8; 24];
    stat[8..16].copy_from_slice(&rights.to_le_bytes());
    errno(put(data, ptr, &stat))
}

/// The arguments (`args`) or the environment of the unit's program, NUL-terminated.
fn strings(state: &HostState, args: bool) -> Vec<Vec<u8>> {
    if args {
        state.limits.program.argv()
    } else {
        state.limits.program.environ()
    }
}

/// `args_get` and `environ_get`: the strings one after another at `buf`, a pointer to each at
/// `ptrs`.
fn copy_strings(caller: &mut Caller<'_, HostState>, ptrs: i32, buf: i32, args: bool) -> i32 {
    let strings = strings(caller.data(), args);
    let Some((data, _)) = parts(caller) else {
        return EFAULT;
    };
    let mut at = buf as u32;
    for (i, s) in strings.iter().enumerate() {
        let Some(slot) = (ptrs as u32).checked_add(4 * i as u32) else {
            return EFAULT;
        };
        if let Err(e) =
            put(data, slot as i32, &at.to_le_bytes()).and_then(|()| put(data, at as i32, s))
        {
            return e;
        }
        let Some(next) = at.checked_add(s.len() as u32) else {
            return EFAULT;
        };
        at = next;
    }
    SUCCESS
}

fn sizes(caller: &mut Caller<'_, HostState>, count_ptr: i32, size_ptr: i32, args: bool) -> i32 {
    let strings = strings(caller.data(), args);
    let Some((data, _)) = parts(caller) else {
        return EFAULT;
    };
    let count = strings.len() as u32;
    let size = strings.iter().map(Vec::len).sum::<usize>() as u32;
    errno(
        put(data, count_ptr, &count.to_le_bytes())
            .and_then(|()| put(data, size_ptr, &size.to_le_bytes())),
    )
}

/// `errno` for one of the three standard streams, `EBADF` for any other descriptor.
fn standard(fd: i32, errno: i32) -> i32 {
    if (0..=2).contains(&fd) { errno } else { EBADF }
}

/// Defines the WASI functions of the subset in `linker`.
pub(crate) fn define(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    linker.func_wrap(
        MODULE,
        "args_sizes_get",
        |mut c: Caller<'_, HostState>, n: i32, size: i32| sizes(&mut c, n, size, true),
    )?;
    linker.func_wrap(
        MODULE,
        "args_get",
        |mut c: Caller<'_, HostState>, argv: i32, buf: i32| copy_strings(&mut c, argv, buf, true),
    )?;
    linker.func_wrap(
        MODULE,
        "environ_sizes_get",
        |mut c: Caller<'_, HostState>, n: i32, size: i32| sizes(&mut c, n, size, false),
    )?;
    linker.func_wrap(
        MODULE,
        "environ_get",
        |mut c: Caller<'_, HostState>, environ: i32, buf: i32| {
            copy_strings(&mut c, environ, buf, false)
        },
    )?;
    linker.func_wrap(
        MODULE,
        "clock_res_get",
        |mut c: Caller<'_, HostState>, id: i32, res: i32| {
            let Some((data, _)) = parts(&mut c) else {
                return EFAULT;
            };
            if !(0..=3).contains(&id) {
                return EINVAL;
            }
            errno(put(data, res, &TICK_NS.to_le_bytes()))
        },
    )?;
    linker.func_wrap(
        MODULE,
        "clock_time_get",
        |mut c: Caller<'_, HostState>, id: i32, _precision: i64, time: i32| {
            clock_time_get(&mut c, id, time)
        },
    )?;
    linker.func_wrap(MODULE, "fd_close", |_: Caller<'_, HostState>, fd: i32| {
        standard(fd, SUCCESS)
    })?;
    linker.func_wrap(
        MODULE,
        "fd_fdstat_get",
        |mut c: Caller<'_, HostState>, fd: i32, ptr: i32| fd_fdstat_get(&mut c, fd, ptr),
    )?;
    linker.func_wrap(
        MODULE,
        "fd_fdstat_set_flags",
        |_: Caller<'_, HostState>, fd: i32, _: i32| standard(fd, SUCCESS),
    )?;
    linker.func_wrap(
        MODULE,
        "fd_prestat_get",
        |_: Caller<'_, HostState>, _: i32, _: i32| EBADF,
    )?;
    linker.func_wrap(
        MODULE,
        "fd_prestat_dir_name",
        |_: Caller<'_, HostState>, _: i32, _: i32, _: i32| EBADF,
    )?;
    linker.func_wrap(
        MODULE,
        "fd_read",
        |mut c: Caller<'_, HostState>, fd: i32, iovs: i32, count: i32, nread: i32| {
            fd_read(&mut c, fd, iovs, count, nread)
        },
    )?;
    linker.func_wrap(
        MODULE,
        "fd_write",
        |mut c: Caller<'_, HostState>, fd: i32, iovs: i32, count: i32, nwritten: i32| {
            fd_write(&mut c, fd, iovs, count, nwritten).map_err(wasmtime::Error::new)
        },
    )?;
    linker.func_wrap(
        MODULE,
        "fd_seek",
        |_: Caller<'_, HostState>, fd: i32, _: i64, _: i32, _: i32| standard(fd, ESPIPE),
    )?;
    linker.func_wrap(
        MODULE,
        "path_open",
        |_: Caller<'_, HostState>,
         _: i32,
         _: i32,
         _: i32,
         _: i32,
         _: i32,
         _: i64,
         _: i64,
         _: i32,
         _: i32| ENOTCAPABLE,
    )?;
    linker.func_wrap(
        MODULE,
        "proc_exit",
        |_: Caller<'_, HostState>, code: i32| -> wasmtime::Result<()> {
            Err(wasmtime::Error::new(Stop::Exit { code }))
        },
    )?;
    linker.func_wrap(
        MODULE,
        "random_get",
        |mut c: Caller<'_, HostState>, buf: i32, len: i32| random_get(&mut c, buf, len),
    )?;
    linker.func_wrap(MODULE, "sched_yield", |_: Caller<'_, HostState>| SUCCESS)?;
    Ok(())
}
