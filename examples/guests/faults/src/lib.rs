//! A unit that misbehaves on request, so the host's sandbox can be tested against hostile
//! modules: panics, failures, deep recursion, large allocations, large output, log floods and
//! endless loops.
//!
//! Unlike the other examples there is no pure `compute`: misbehaving is the point.

use std::hint::black_box;

use serde::{Deserialize, Serialize};
use task_sdk::{Context, Error};

const MIB: usize = 1 << 20;

/// What to do, as one externally tagged JSON object, e.g. `{"panic": "boom"}`,
/// `{"fail": {"code": 42, "message": "no"}}`, `{"recurse": 100000}` or `{"ok": true}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Input {
    /// Panic with this message (guest failure, code 3).
    Panic(String),
    /// Return an error with this code and message.
    Fail { code: i32, message: String },
    /// Recurse this deep without tail calls; deep enough, it overflows the wasm stack.
    Recurse(u32),
    /// Allocate this many MiB and touch every page.
    AllocMb(u32),
    /// Write at least this many MiB of output.
    OutputMb(u32),
    /// Write this many info lines of 100 bytes each.
    LogLines(u32),
    /// `true`: loop forever without calling the host.
    Spin(bool),
    /// Succeed with `{"ok":<value>}`.
    Ok(bool),
}

/// `{"ok":true}` plus, for some requests, a value that keeps the work observable.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Output {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<String>,
}

impl Output {
    fn ok() -> Self {
        Output {
            ok: true,
            value: None,
            data: None,
        }
    }

    fn value(value: u64) -> Self {
        Output {
            value: Some(value),
            ..Output::ok()
        }
    }
}

/// Non-tail recursion: every local computed before the call is used after it, so each frame
/// stays alive on the wasm stack and the compiler cannot turn the recursion into a loop. The
/// values are plain locals, not an array, so they live on the engine's native stack (which the
/// host limits) rather than in the shadow stack in linear memory.
#[inline(never)]
fn recurse(depth: u32, seed: u64) -> u64 {
    if depth == 0 {
        return seed;
    }
    let a = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let b = a.rotate_left(17) ^ u64::from(depth);
    let c = b.wrapping_add(a >> 7);
    let d = c ^ (b << 3);
    let below = recurse(depth - 1, d);
    below.rotate_left(depth % 64) ^ a ^ b.wrapping_mul(c) ^ d
}

fn allocate(mb: u32) -> Result<u64, Error> {
    let bytes = (mb as usize)
        .checked_mul(MIB)
        .ok_or_else(|| Error::new(format!("{mb} MiB do not fit the address space")))?;
    let mut block = vec![0u8; bytes];
    // Writing one byte per page forces the memory to be really provided.
    for (page, byte) in block.iter_mut().step_by(4096).enumerate() {
        *byte = page as u8 | 1;
    }
    let block = black_box(block);
    Ok(block.iter().step_by(4096).map(|&b| u64::from(b)).sum())
}

fn spin() -> ! {
    let mut n = 0u64;
    loop {
        n = black_box(n.wrapping_add(1));
    }
}

/// The work unit: does what the input asks.
pub fn unit(input: Input, ctx: &mut Context) -> Result<Output, Error> {
    match input {
        Input::Panic(message) => panic!("{message}"),
        Input::Fail { code, message } => Err(Error::with_code(code, message)),
        Input::Recurse(depth) => Ok(Output::value(recurse(black_box(depth), 1))),
        Input::AllocMb(mb) => allocate(mb).map(Output::value),
        Input::OutputMb(mb) => {
            let bytes = (mb as usize)
                .checked_mul(MIB)
                .ok_or_else(|| Error::new(format!("{mb} MiB do not fit the address space")))?;
            Ok(Output {
                data: Some("x".repeat(bytes)),
                ..Output::ok()
            })
        }
        Input::LogLines(lines) => {
            let filler = "-".repeat(84);
            for line in 0..lines {
                task_sdk::info!(ctx, "line {line:010} {filler}");
            }
            Ok(Output::ok())
        }
        Input::Spin(true) => spin(),
        Input::Spin(false) => Ok(Output::ok()),
        Input::Ok(ok) => Ok(Output { ok, ..Output::ok() }),
    }
}

task_sdk::json_unit!(unit);

#[cfg(test)]
mod tests {
    use super::*;
    use task_sdk::Level;
    use task_sdk::native::{Harness, Outcome};

    fn run(json: &str) -> Outcome {
        Harness::new(json).run_json(unit)
    }

    #[test]
    fn ok_is_minimal() {
        assert_eq!(run(r#"{"ok": true}"#).result.unwrap(), br#"{"ok":true}"#);
        assert_eq!(run(r#"{"spin": false}"#).result.unwrap(), br#"{"ok":true}"#);
    }

    #[test]
    fn panic_carries_its_message() {
        let err = run(r#"{"panic": "deliberate"}"#).result.unwrap_err();
        assert_eq!(err.code(), Error::PANIC);
        assert!(err.message().contains("deliberate"), "{err}");
    }

    #[test]
    fn fail_keeps_code_and_message() {
        let err = run(r#"{"fail": {"code": 42, "message": "refused"}}"#)
            .result
            .unwrap_err();
        assert_eq!(err, Error::with_code(42, "refused"));
    }

    #[test]
    fn shallow_recursion_completes_deterministically() {
        let a = run(r#"{"recurse": 1000}"#).result.unwrap();
        assert_eq!(a, run(r#"{"recurse": 1000}"#).result.unwrap());
        assert_ne!(a, run(r#"{"recurse": 999}"#).result.unwrap());
    }

    #[test]
    fn allocation_touches_every_page() {
        let out: Output =
            serde_json::from_slice(&run(r#"{"alloc_mb": 4}"#).result.unwrap()).unwrap();
        assert!(out.ok);
        assert!(out.value.unwrap() >= 4 * 256);
    }

    #[test]
    fn output_has_the_requested_size() {
        let bytes = run(r#"{"output_mb": 2}"#).result.unwrap();
        assert!(bytes.len() >= 2 * MIB && bytes.len() < 2 * MIB + 64);
    }

    #[test]
    fn log_lines_are_100_bytes() {
        let outcome = run(r#"{"log_lines": 3}"#);
        assert_eq!(outcome.logs.len(), 3);
        assert!(
            outcome
                .logs
                .iter()
                .all(|(level, line)| *level == Level::Info && line.len() == 100)
        );
    }

    #[test]
    fn unknown_request_is_a_decode_error() {
        assert_eq!(
            run(r#"{"explode": 1}"#).result.unwrap_err().code(),
            Error::DECODE
        );
        let input = Input::Fail {
            code: 5,
            message: "m".into(),
        };
        assert_eq!(
            serde_json::to_string(&input).unwrap(),
            r#"{"fail":{"code":5,"message":"m"}}"#
        );
    }
}
