//! Write coordinator-free work units in Rust.
//!
//! A work unit is a function from one input to one output. This crate turns such a function
//! into a WebAssembly module that follows guest ABI v1 (`docs/guest-abi.md`): it reads the input
//! from the host, decodes it, runs the function, writes the output, and turns errors and panics
//! into clean guest failures. The unit gets a [`Context`] for logging, progress, checkpoints and
//! a deterministic random generator.
//!
//! Results are validated by comparing output bytes across peers, so a unit must be
//! deterministic: draw random numbers only from [`Context::rng`] or an [`Rng`] seeded from the
//! input, never iterate a `HashMap` into the output, and prefer `+ - * / sqrt` over `exp`, `ln`,
//! `sin` or `powf`, whose last bit may differ between the libm of a native test build and
//! the one compiled into wasm.
//!
//! # Example
//!
//! ```
//! use serde::{Deserialize, Serialize};
//! use task_sdk::{Context, Error, Rng};
//!
//! #[derive(Deserialize)]
//! pub struct Input {
//!     samples: u64,
//! }
//!
//! #[derive(Serialize)]
//! pub struct Output {
//!     inside: u64,
//!     pi: f64,
//! }
//!
//! /// What a resumed run needs to continue exactly where the interrupted one stopped.
//! #[derive(Serialize, Deserialize)]
//! struct State {
//!     done: u64,
//!     inside: u64,
//!     rng: Rng,
//! }
//!
//! pub fn estimate(input: Input, ctx: &mut Context) -> Result<Output, Error> {
//!     if input.samples == 0 {
//!         return Err(Error::new("samples must be positive"));
//!     }
//!     let mut state = ctx.load_checkpoint().unwrap_or(State {
//!         done: 0,
//!         inside: 0,
//!         rng: ctx.rng(),
//!     });
//!     task_sdk::info!(ctx, "starting at {} of {}", state.done, input.samples);
//!     while state.done < input.samples {
//!         let batch = (input.samples - state.done).min(100_000);
//!         for _ in 0..batch {
//!             let (x, y) = (state.rng.next_f64(), state.rng.next_f64());
//!             state.inside += u64::from(x * x + y * y < 1.0);
//!         }
//!         state.done += batch;
//!         ctx.save_checkpoint(&state)?;
//!         ctx.progress(state.done, input.samples);
//!     }
//!     let pi = 4.0 * state.inside as f64 / input.samples as f64;
//!     Ok(Output { inside: state.inside, pi })
//! }
//!
//! task_sdk::json_unit!(estimate);
//!
//! // The same unit, run natively as a test would:
//! let outcome = task_sdk::native::Harness::new(r#"{"samples": 300000}"#).run_json(estimate);
//! let output: serde_json::Value = serde_json::from_slice(&outcome.result.unwrap()).unwrap();
//! assert!((output["pi"].as_f64().unwrap() - std::f64::consts::PI).abs() < 0.02);
//! assert_eq!(outcome.progress, Some((300_000, 300_000)));
//! ```
//!
//! # Building
//!
//! A unit crate is a library with `crate-type = ["cdylib", "rlib"]`: the `cdylib` is the wasm
//! module, the `rlib` lets its tests run natively through [`native::Harness`].
//!
//! ```text
//! RUSTFLAGS="-C target-feature=+simd128" cargo build --release --target wasm32-unknown-unknown
//! ```
//!
//! The module is `target/wasm32-unknown-unknown/release/<crate_name>.wasm`. It imports only
//! `cf1` functions and exports `memory` and `run`. The repository's `docs/fast-units.md` says
//! which code runs at native speed in the sandbox (integer loops, bulk copies, float arithmetic
//! kept in locals) and what costs more (floats stored or passed to functions inside a hot loop,
//! which pay a NaN check each).
//!
//! # Failure codes
//!
//! [`Error::UNIT`] (1) for an error the unit returned, [`Error::DECODE`] (2) for input that does
//! not decode, [`Error::PANIC`] (3) for a panic, whose message carries the panic message and
//! its location.

mod context;
mod error;
mod rng;

#[cfg(not(target_arch = "wasm32"))]
pub mod native;
#[cfg(target_arch = "wasm32")]
mod wasm;

pub use context::{Context, Level};
pub use error::Error;
pub use rng::Rng;

/// Used by the macros; not part of the API.
#[doc(hidden)]
pub mod __private {
    pub use crate::context::{bytes_body, json_body};
    #[cfg(target_arch = "wasm32")]
    pub use crate::wasm::{run_bytes, run_json};
}

/// Exports `fn(I, &mut Context) -> Result<O, Error>` as the module's `run` entry.
///
/// The input is decoded from JSON (failure code 2 with serde's message if it does not decode),
/// and the output is written as compact JSON (`serde_json::to_vec`). An `Err` becomes a guest
/// failure with its code and message; a panic becomes code 3. The export exists only on
/// `wasm32`; natively the unit is just type-checked, and run with [`native::Harness`].
#[macro_export]
macro_rules! json_unit {
    ($unit:path) => {
        #[cfg(target_arch = "wasm32")]
        const _: () = {
            #[unsafe(no_mangle)]
            pub extern "C" fn run() -> i32 {
                $crate::__private::run_json($unit)
            }
        };
        #[cfg(not(target_arch = "wasm32"))]
        const _: () = {
            #[allow(dead_code)]
            fn entry(
                ctx: &mut $crate::Context,
            ) -> ::std::result::Result<::std::vec::Vec<u8>, $crate::Error> {
                $crate::__private::json_body(ctx, $unit)
            }
        };
    };
}

/// Exports `fn(&[u8], &mut Context) -> Result<Vec<u8>, Error>` as the module's `run` entry:
/// raw input bytes in, raw output bytes out. Errors and panics behave as in [`json_unit!`].
#[macro_export]
macro_rules! bytes_unit {
    ($unit:path) => {
        #[cfg(target_arch = "wasm32")]
        const _: () = {
            #[unsafe(no_mangle)]
            pub extern "C" fn run() -> i32 {
                $crate::__private::run_bytes($unit)
            }
        };
        #[cfg(not(target_arch = "wasm32"))]
        const _: () = {
            #[allow(dead_code)]
            fn entry(
                ctx: &mut $crate::Context,
            ) -> ::std::result::Result<::std::vec::Vec<u8>, $crate::Error> {
                $crate::__private::bytes_body(ctx, $unit)
            }
        };
    };
}

/// Logs a formatted line at [`Level::Error`]: `error!(ctx, "fmt", args...)`.
#[macro_export]
macro_rules! error {
    ($ctx:expr, $($arg:tt)+) => {
        $ctx.log($crate::Level::Error, &::std::format!($($arg)+))
    };
}

/// Logs a formatted line at [`Level::Warn`]: `warn!(ctx, "fmt", args...)`.
#[macro_export]
macro_rules! warn {
    ($ctx:expr, $($arg:tt)+) => {
        $ctx.log($crate::Level::Warn, &::std::format!($($arg)+))
    };
}

/// Logs a formatted line at [`Level::Info`]: `info!(ctx, "fmt", args...)`.
#[macro_export]
macro_rules! info {
    ($ctx:expr, $($arg:tt)+) => {
        $ctx.log($crate::Level::Info, &::std::format!($($arg)+))
    };
}

/// Logs a formatted line at [`Level::Debug`]: `debug!(ctx, "fmt", args...)`.
#[macro_export]
macro_rules! debug {
    ($ctx:expr, $($arg:tt)+) => {
        $ctx.log($crate::Level::Debug, &::std::format!($($arg)+))
    };
}

/// Logs a formatted line at [`Level::Trace`]: `trace!(ctx, "fmt", args...)`.
#[macro_export]
macro_rules! trace {
    ($ctx:expr, $($arg:tt)+) => {
        $ctx.log($crate::Level::Trace, &::std::format!($($arg)+))
    };
}

#[cfg(test)]
mod tests {
    use serde::{Deserialize, Serialize};

    use super::native::Harness;
    use super::*;

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    struct Sum {
        values: Vec<i64>,
    }

    fn sum(input: Sum, ctx: &mut Context) -> Result<i64, Error> {
        info!(ctx, "summing {} values", input.values.len());
        debug!(ctx, "first {:?}", input.values.first());
        ctx.progress(1, 1);
        input
            .values
            .iter()
            .try_fold(0i64, |acc, &v| acc.checked_add(v))
            .ok_or_else(|| Error::with_code(9, "overflow"))
    }

    json_unit!(sum);

    #[test]
    fn json_unit_runs_and_records() {
        let outcome = Harness::json(&Sum {
            values: vec![1, 2, 39],
        })
        .run_json(sum);
        assert_eq!(outcome.result, Ok(b"42".to_vec()));
        assert_eq!(
            outcome.logs,
            vec![
                (Level::Info, "summing 3 values".to_owned()),
                (Level::Debug, "first Some(1)".to_owned()),
            ]
        );
        assert_eq!(outcome.progress, Some((1, 1)));
        assert_eq!(outcome.checkpoint, None);
    }

    #[test]
    fn unit_error_keeps_code_and_message() {
        let outcome = Harness::new(format!("{{\"values\":[{},1]}}", i64::MAX)).run_json(sum);
        assert_eq!(outcome.result, Err(Error::with_code(9, "overflow")));
    }

    #[test]
    fn undecodable_input_fails_with_code_2() {
        for input in [&b""[..], b"{", b"{\"values\":\"x\"}", b"\xff\xfe"] {
            let err = Harness::new(input).run_json(sum).result.unwrap_err();
            assert_eq!(err.code(), Error::DECODE, "{input:?}");
            assert!(!err.message().is_empty());
        }
    }

    #[test]
    fn panic_becomes_code_3() {
        fn boom(_: (), _: &mut Context) -> Result<(), Error> {
            panic!("boom {}", 7)
        }
        let err = Harness::new("null").run_json(boom).result.unwrap_err();
        assert_eq!(err.code(), Error::PANIC);
        assert!(err.message().contains("boom 7"), "{err}");
    }

    fn reverse(input: &[u8], ctx: &mut Context) -> Result<Vec<u8>, Error> {
        assert_eq!(input, ctx.input_bytes());
        warn!(ctx, "{} bytes", input.len());
        Ok(input.iter().rev().copied().collect())
    }

    bytes_unit!(reverse);

    #[test]
    fn bytes_unit_sees_raw_input() {
        let outcome = Harness::new(&b"\x00abc\xff"[..]).run_bytes(reverse);
        assert_eq!(outcome.result, Ok(b"\xffcba\x00".to_vec()));
        assert_eq!(outcome.logs, vec![(Level::Warn, "5 bytes".to_owned())]);
    }

    #[derive(Debug, Serialize, Deserialize, PartialEq, Clone)]
    struct Progress {
        next: u32,
        rng: Rng,
    }

    fn counter(limit: u32, ctx: &mut Context) -> Result<Vec<u64>, Error> {
        let mut state = ctx.load_checkpoint().unwrap_or(Progress {
            next: 0,
            rng: ctx.rng(),
        });
        let mut draws = Vec::new();
        while state.next < limit {
            draws.push(state.rng.below(1000));
            state.next += 1;
            ctx.save_checkpoint(&state)?;
        }
        Ok(draws)
    }

    #[test]
    fn checkpoint_roundtrip() {
        let full = Harness::new("5").run_json(counter);
        let saved: Progress = serde_json::from_slice(full.checkpoint.as_ref().unwrap()).unwrap();
        assert_eq!(saved.next, 5);

        // A run started from a mid-way checkpoint continues the same random stream.
        let mut rng = Rng::from_bytes(b"5");
        rng.below(1000);
        rng.below(1000);
        let midway = serde_json::to_vec(&Progress { next: 2, rng }).unwrap();
        let resumed = Harness::new("5").checkpoint(Some(midway)).run_json(counter);
        let all: Vec<u64> = serde_json::from_slice(&full.result.unwrap()).unwrap();
        let rest: Vec<u64> = serde_json::from_slice(&resumed.result.unwrap()).unwrap();
        assert_eq!(rest, all[2..]);
        assert_eq!(resumed.checkpoint, full.checkpoint);
    }

    #[test]
    fn bad_checkpoint_is_ignored() {
        let outcome = Harness::new("1")
            .checkpoint(Some(b"not json".to_vec()))
            .run_json(counter);
        assert!(outcome.result.is_ok());
    }

    #[test]
    fn context_rng_depends_only_on_input() {
        fn draw(_: &[u8], ctx: &mut Context) -> Result<Vec<u8>, Error> {
            let (mut a, mut b) = (ctx.rng(), ctx.rng());
            assert_eq!(a.next_u64(), b.next_u64());
            Ok(a.next_u64().to_le_bytes().to_vec())
        }
        let one = Harness::new("abc").run_bytes(draw).result.unwrap();
        let two = Harness::new("abc").run_bytes(draw).result.unwrap();
        let other = Harness::new("abd").run_bytes(draw).result.unwrap();
        assert_eq!(one, two);
        assert_ne!(one, other);
        let mut expected = Rng::from_bytes(b"abc");
        expected.next_u64();
        assert_eq!(one, expected.next_u64().to_le_bytes());
    }

    #[test]
    fn level_codes_match_the_abi() {
        let levels = [
            Level::Error,
            Level::Warn,
            Level::Info,
            Level::Debug,
            Level::Trace,
        ];
        let codes: Vec<i32> = levels.iter().map(|l| l.code()).collect();
        assert_eq!(codes, [0, 1, 2, 3, 4]);
    }
}
