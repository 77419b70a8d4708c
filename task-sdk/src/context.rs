//! The handle a unit receives, and the entry logic shared by the wasm entry and the native
//! harness.

use std::cell::OnceCell;
use std::fmt;
use std::rc::Rc;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::{Error, Rng, rng};

#[cfg(not(target_arch = "wasm32"))]
use crate::native::Host;
#[cfg(target_arch = "wasm32")]
use crate::wasm::Host;

/// Severity of a log line; the discriminant is the ABI level code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Level {
    /// Level code 0.
    Error = 0,
    /// Level code 1.
    Warn = 1,
    /// Level code 2.
    Info = 2,
    /// Level code 3.
    Debug = 3,
    /// Level code 4.
    Trace = 4,
}

impl Level {
    /// The ABI code of this level (`0` error … `4` trace).
    pub fn code(self) -> i32 {
        self as i32
    }
}

/// The unit's view of the host: its input, logging, progress, checkpoints and a deterministic
/// random generator.
///
/// Inside wasm every call goes to the host's `cf1` imports; in a native build the same calls are
/// recorded in memory for [`crate::native::Harness`].
pub struct Context {
    input: Rc<Vec<u8>>,
    seed: OnceCell<u64>,
    host: Host,
}

impl fmt::Debug for Context {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The input can be megabytes; its length is what helps when debugging.
        f.debug_struct("Context")
            .field("input_len", &self.input.len())
            .field("host", &self.host)
            .finish_non_exhaustive()
    }
}

impl Context {
    pub(crate) fn new(input: Vec<u8>, host: Host) -> Self {
        Context {
            input: Rc::new(input),
            seed: OnceCell::new(),
            host,
        }
    }

    #[cfg(not(target_arch = "wasm32"))]
    pub(crate) fn into_host(self) -> Host {
        self.host
    }

    /// The unit's raw input bytes, exactly as the host delivered them.
    pub fn input_bytes(&self) -> &[u8] {
        &self.input
    }

    /// Writes one log line. The host caps line length and total volume per unit and drops what
    /// goes over, so logging never fails.
    pub fn log(&mut self, level: Level, msg: &str) {
        self.host.log(level, msg);
    }

    /// Reports progress as `done` out of `total`; purely informative.
    pub fn progress(&mut self, done: u64, total: u64) {
        self.host.progress(done, total);
    }

    /// Replaces the unit's checkpoint with `state`, JSON-encoded.
    ///
    /// A resumed run must produce the same output as an uninterrupted one, so the state must
    /// hold everything needed to continue, including any [`Rng`] in use (it serializes).
    pub fn save_checkpoint<T: Serialize>(&mut self, state: &T) -> Result<(), Error> {
        let bytes = serde_json::to_vec(state)?;
        self.save_checkpoint_bytes(&bytes);
        Ok(())
    }

    /// The checkpoint this unit was started with (or last saved), decoded from JSON; `None` if
    /// there is none or it does not decode as `T`.
    pub fn load_checkpoint<T: DeserializeOwned>(&mut self) -> Option<T> {
        let bytes = self.load_checkpoint_bytes()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Replaces the unit's checkpoint with raw bytes.
    pub fn save_checkpoint_bytes(&mut self, bytes: &[u8]) {
        self.host.checkpoint_save(bytes);
    }

    /// The raw checkpoint this unit was started with (or last saved), if any.
    pub fn load_checkpoint_bytes(&mut self) -> Option<Vec<u8>> {
        self.host.checkpoint_load()
    }

    /// A fresh generator seeded from a 64-bit hash of the raw input bytes: the same on every
    /// machine, and the same on every call. Units whose inputs are identical draw identical
    /// numbers, so put a seed field in the input when replicates must differ.
    pub fn rng(&self) -> Rng {
        let seed = *self.seed.get_or_init(|| rng::hash64(&self.input));
        Rng::seed_from_u64(seed)
    }
}

/// Decodes the input as JSON, runs `unit`, and encodes its output as compact JSON.
pub fn json_body<I, O, F>(ctx: &mut Context, unit: F) -> Result<Vec<u8>, Error>
where
    I: DeserializeOwned,
    O: Serialize,
    F: FnOnce(I, &mut Context) -> Result<O, Error>,
{
    let input: I = serde_json::from_slice(ctx.input_bytes())
        .map_err(|err| Error::with_code(Error::DECODE, err.to_string()))?;
    let output = unit(input, ctx)?;
    Ok(serde_json::to_vec(&output)?)
}

/// Runs `unit` on the raw input bytes.
pub fn bytes_body<F>(ctx: &mut Context, unit: F) -> Result<Vec<u8>, Error>
where
    F: FnOnce(&[u8], &mut Context) -> Result<Vec<u8>, Error>,
{
    // The unit borrows the input and the context at once; sharing the buffer avoids a copy.
    let input = Rc::clone(&ctx.input);
    unit(&input, ctx)
}
