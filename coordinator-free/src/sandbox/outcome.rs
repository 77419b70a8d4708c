//! What a unit run can end in, and which endings other peers may vote on.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Whether an outcome says something about the unit or about the machine that ran it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum OutcomeClass {
    /// Every honest peer with the same engine profile, module, input and limits gets this same
    /// outcome, so peers can vote on it.
    Deterministic,
    /// The machine, not the unit, decided this outcome: retry elsewhere, never vote on it.
    HostFailure,
}

/// The kind of a WebAssembly trap that ended a unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum TrapKind {
    /// The `unreachable` instruction ran (also how Rust aborts).
    Unreachable,
    /// A load or store outside linear memory.
    MemoryOutOfBounds,
    /// A table access outside the table.
    TableOutOfBounds,
    /// `call_indirect` through an uninitialised table slot.
    IndirectCallToNull,
    /// `call_indirect` to a function of another type.
    BadSignature,
    /// Integer overflow in a division or conversion.
    IntegerOverflow,
    /// Integer division or remainder by zero.
    IntegerDivisionByZero,
    /// A float that cannot be converted to the integer type.
    BadConversionToInteger,
    /// A null reference was dereferenced.
    NullReference,
    /// The module handed a host import a pointer range outside its memory, or broke another
    /// rule of the guest ABI.
    AbiViolation,
}

impl TrapKind {
    /// A short, stable name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Unreachable => "unreachable",
            Self::MemoryOutOfBounds => "memory out of bounds",
            Self::TableOutOfBounds => "table out of bounds",
            Self::IndirectCallToNull => "indirect call to null",
            Self::BadSignature => "indirect call type mismatch",
            Self::IntegerOverflow => "integer overflow",
            Self::IntegerDivisionByZero => "integer divide by zero",
            Self::BadConversionToInteger => "invalid conversion to integer",
            Self::NullReference => "null reference",
            Self::AbiViolation => "abi violation",
        }
    }
}

impl std::fmt::Display for TrapKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a unit did not produce an output. Each variant is either deterministic or a host failure;
/// see [`UnitError::class`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum UnitError {
    /// The module is not valid WebAssembly under the engine profile, or lacks the ABI's exports.
    #[error("bad module: {reason}")]
    BadModule {
        /// What is wrong, in words.
        reason: String,
    },
    /// The module is larger than the size cap.
    #[error("bad module: {size} bytes is over the module size cap of {cap} bytes")]
    ModuleTooLarge {
        /// The module's size in bytes.
        size: u64,
        /// The cap in bytes.
        cap: u64,
    },
    /// The module imports something outside the guest ABI; refused before compiling.
    #[error("forbidden import: {module}::{name} ({reason})")]
    ForbiddenImport {
        /// The import's module name.
        module: String,
        /// The import's field name.
        name: String,
        /// Why it is refused.
        reason: String,
    },
    /// The input is larger than the input cap; refused before running.
    #[error("input of {size} bytes is over the input cap of {cap} bytes")]
    InputTooLarge {
        /// The input's size in bytes.
        size: u64,
        /// The cap in bytes.
        cap: u64,
    },
    /// The optional fuel budget ran out.
    #[error("out of fuel: the budget of {budget} units ran out")]
    OutOfFuel {
        /// The budget the unit had.
        budget: u64,
    },
    /// The linear memory would have grown past the unit's cap.
    #[error("memory limit: {requested} bytes requested, the cap is {cap} bytes")]
    MemoryLimit {
        /// The size the memory would have had.
        requested: u64,
        /// The cap in bytes.
        cap: u64,
    },
    /// The wall-clock limit passed.
    #[error("timeout: still running after {limit:?}")]
    Timeout {
        /// The limit that passed.
        limit: Duration,
    },
    /// A WebAssembly trap.
    #[error("trap: {kind}")]
    Trap {
        /// Which trap.
        kind: TrapKind,
    },
    /// The guest reported failure (through `fail` or a non-zero return from `run`).
    #[error("guest failure (code {code}){}", colon_then(.message))]
    GuestFailure {
        /// The guest's failure code.
        code: i32,
        /// The guest's message, possibly empty.
        message: String,
    },
    /// The output went past the output cap.
    #[error("output too large: over the cap of {cap} bytes")]
    OutputTooLarge {
        /// The cap in bytes.
        cap: u64,
    },
    /// A checkpoint went past the checkpoint cap.
    #[error("checkpoint too large: {size} bytes is over the cap of {cap} bytes")]
    CheckpointTooLarge {
        /// The checkpoint's size.
        size: u64,
        /// The cap in bytes.
        cap: u64,
    },
    /// The WebAssembly stack ran out; where that happens depends on the machine.
    #[error("stack overflow")]
    StackOverflow,
    /// The host could not supply memory below the unit's cap.
    #[error("host out of memory: {detail}")]
    HostOutOfMemory {
        /// What the host reported.
        detail: String,
    },
    /// Any other failure of the host (an engine error, a full instance pool).
    #[error("host failure: {detail}")]
    Host {
        /// What the host reported.
        detail: String,
    },
}

impl UnitError {
    /// The error with every text it carries escaped and bounded
    /// ([`text::bounded`](crate::text::bounded)): what the sandbox hands out, so an error made
    /// from a module's bytes (a huge import name, a guest's message) fits every report and
    /// cannot drive the terminal it is printed on. Every honest peer makes the same change, so
    /// errors still vote alike; applying it twice changes nothing.
    pub fn bounded(self) -> Self {
        use crate::text::{MAX_TEXT, bounded};
        let b = |s: String| bounded(&s, MAX_TEXT);
        match self {
            Self::BadModule { reason } => Self::BadModule { reason: b(reason) },
            Self::ForbiddenImport {
                module,
                name,
                reason,
            } => Self::ForbiddenImport {
                module: bounded(&module, MAX_TEXT / 4),
                name: bounded(&name, MAX_TEXT / 4),
                reason: bounded(&reason, MAX_TEXT / 2),
            },
            Self::GuestFailure { code, message } => Self::GuestFailure {
                code,
                message: b(message),
            },
            Self::HostOutOfMemory { detail } => Self::HostOutOfMemory { detail: b(detail) },
            Self::Host { detail } => Self::Host { detail: b(detail) },
            other => other,
        }
    }

    /// Whether other peers can vote on this outcome or it must be retried elsewhere.
    pub fn class(&self) -> OutcomeClass {
        match self {
            Self::BadModule { .. }
            | Self::ModuleTooLarge { .. }
            | Self::ForbiddenImport { .. }
            | Self::InputTooLarge { .. }
            | Self::OutOfFuel { .. }
            | Self::MemoryLimit { .. }
            | Self::Trap { .. }
            | Self::GuestFailure { .. }
            | Self::OutputTooLarge { .. }
            | Self::CheckpointTooLarge { .. } => OutcomeClass::Deterministic,
            Self::Timeout { .. }
            | Self::StackOverflow
            | Self::HostOutOfMemory { .. }
            | Self::Host { .. } => OutcomeClass::HostFailure,
        }
    }

    /// Whether the module itself was refused (before any unit ran).
    pub fn is_module_refused(&self) -> bool {
        matches!(
            self,
            Self::BadModule { .. } | Self::ModuleTooLarge { .. } | Self::ForbiddenImport { .. }
        )
    }
}

/// `": message"`, or nothing for an empty message.
fn colon_then(message: &str) -> String {
    if message.is_empty() {
        String::new()
    } else {
        format!(": {message}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_failures_are_exactly_the_machine_dependent_ones() {
        let host = [
            UnitError::Timeout {
                limit: Duration::from_secs(1),
            },
            UnitError::StackOverflow,
            UnitError::HostOutOfMemory { detail: "x".into() },
            UnitError::Host { detail: "x".into() },
        ];
        for e in host {
            assert_eq!(e.class(), OutcomeClass::HostFailure, "{e}");
        }
        let deterministic = [
            UnitError::OutOfFuel { budget: 1 },
            UnitError::MemoryLimit {
                requested: 2,
                cap: 1,
            },
            UnitError::Trap {
                kind: TrapKind::Unreachable,
            },
            UnitError::GuestFailure {
                code: 3,
                message: "m".into(),
            },
            UnitError::OutputTooLarge { cap: 1 },
            UnitError::ForbiddenImport {
                module: "wasi".into(),
                name: "x".into(),
                reason: "r".into(),
            },
        ];
        for e in deterministic {
            assert_eq!(e.class(), OutcomeClass::Deterministic, "{e}");
        }
    }
}
