//! Running units natively, for tests: an in-memory host behind [`Context`] and a [`Harness`]
//! that runs a unit the way the wasm entry does.
//!
//! ```
//! use task_sdk::{Context, Error, native::Harness};
//!
//! fn double(n: u64, _ctx: &mut Context) -> Result<u64, Error> {
//!     n.checked_mul(2).ok_or_else(|| Error::new("overflow"))
//! }
//!
//! let outcome = Harness::new("21").run_json(double);
//! assert_eq!(outcome.result.unwrap(), b"42");
//! let outcome = Harness::new("\"x\"").run_json(double);
//! assert_eq!(outcome.result.unwrap_err().code(), Error::DECODE);
//! ```

use std::panic::{self, AssertUnwindSafe};

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::Error;
use crate::context::{self, Context, Level};

/// The host side of a [`Context`] in a native build: records what the unit did.
#[derive(Debug, Default)]
pub(crate) struct Host {
    logs: Vec<(Level, String)>,
    progress: Option<(u64, u64)>,
    checkpoint: Option<Vec<u8>>,
}

impl Host {
    pub(crate) fn log(&mut self, level: Level, msg: &str) {
        self.logs.push((level, msg.to_owned()));
    }

    pub(crate) fn progress(&mut self, done: u64, total: u64) {
        self.progress = Some((done, total));
    }

    pub(crate) fn checkpoint_save(&mut self, bytes: &[u8]) {
        self.checkpoint = Some(bytes.to_vec());
    }

    pub(crate) fn checkpoint_load(&mut self) -> Option<Vec<u8>> {
        self.checkpoint.clone()
    }
}

/// Runs a unit natively with a given input and starting checkpoint.
#[derive(Debug, Clone)]
pub struct Harness {
    input: Vec<u8>,
    checkpoint: Option<Vec<u8>>,
}

/// Everything a natively run unit produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// The output bytes, or the error the unit failed with. A panic becomes code
    /// [`Error::PANIC`] carrying the panic message.
    pub result: Result<Vec<u8>, Error>,
    /// Every log line, in order.
    pub logs: Vec<(Level, String)>,
    /// The last progress report.
    pub progress: Option<(u64, u64)>,
    /// The checkpoint when the unit ended: the last one saved, or the starting one.
    pub checkpoint: Option<Vec<u8>>,
}

impl Harness {
    /// A harness that hands the unit these raw input bytes.
    pub fn new(input: impl Into<Vec<u8>>) -> Self {
        Harness {
            input: input.into(),
            checkpoint: None,
        }
    }

    /// A harness whose input is `value` encoded as compact JSON, as a job would deliver it.
    ///
    /// # Panics
    ///
    /// If `value` cannot be encoded as JSON (e.g. a map with non-string keys).
    pub fn json<T: Serialize>(value: &T) -> Self {
        let input = serde_json::to_vec(value).expect("harness input must encode as JSON");
        Self::new(input)
    }

    /// Starts the unit with this checkpoint, as if resuming an interrupted run.
    pub fn checkpoint(mut self, checkpoint: Option<Vec<u8>>) -> Self {
        self.checkpoint = checkpoint;
        self
    }

    /// Runs a JSON unit, exactly as [`crate::json_unit!`] does inside wasm.
    pub fn run_json<I, O, F>(self, unit: F) -> Outcome
    where
        I: DeserializeOwned,
        O: Serialize,
        F: FnOnce(I, &mut Context) -> Result<O, Error>,
    {
        self.run(|ctx| context::json_body(ctx, unit))
    }

    /// Runs a bytes unit, exactly as [`crate::bytes_unit!`] does inside wasm.
    pub fn run_bytes<F>(self, unit: F) -> Outcome
    where
        F: FnOnce(&[u8], &mut Context) -> Result<Vec<u8>, Error>,
    {
        self.run(|ctx| context::bytes_body(ctx, unit))
    }

    fn run(self, body: impl FnOnce(&mut Context) -> Result<Vec<u8>, Error>) -> Outcome {
        let host = Host {
            checkpoint: self.checkpoint,
            ..Host::default()
        };
        let mut ctx = Context::new(self.input, host);
        let result =
            panic::catch_unwind(AssertUnwindSafe(|| body(&mut ctx))).unwrap_or_else(|payload| {
                let message = payload
                    .downcast_ref::<&str>()
                    .copied()
                    .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
                    .unwrap_or("Box<dyn Any>");
                Err(Error::with_code(
                    Error::PANIC,
                    format!("panicked: {message}"),
                ))
            });
        let host = ctx.into_host();
        Outcome {
            result,
            logs: host.logs,
            progress: host.progress,
            checkpoint: host.checkpoint,
        }
    }
}
