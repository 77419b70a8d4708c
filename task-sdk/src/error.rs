//! The error a unit ends with: a code and a message, reported by the host unchanged.

use std::fmt;

/// Why a unit failed: a numeric code and a human-readable message.
///
/// The host reports both unchanged as a *guest failure*, a deterministic outcome that peers vote
/// on like any output, so the message must not contain anything machine-specific.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    code: i32,
    message: String,
}

impl Error {
    /// Code of an error returned by the unit itself.
    pub const UNIT: i32 = 1;
    /// Code used when the unit's input could not be decoded.
    pub const DECODE: i32 = 2;
    /// Code used when the unit panicked; the message is the panic message with its location.
    pub const PANIC: i32 = 3;

    /// An error returned by the unit (code [`Error::UNIT`]).
    pub fn new(message: impl Into<String>) -> Self {
        Self::with_code(Self::UNIT, message)
    }

    /// An error with a code of the unit's choosing. The host reports code `0` as `1`.
    pub fn with_code(code: i32, message: impl Into<String>) -> Self {
        Error {
            code,
            message: message.into(),
        }
    }

    /// An error (code [`Error::UNIT`]) carrying the `Display` text of any value, for `map_err`.
    pub fn msg(message: impl fmt::Display) -> Self {
        Self::new(message.to_string())
    }

    /// The failure code.
    pub fn code(&self) -> i32 {
        self.code
    }

    /// The failure message.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "error {}: {}", self.code, self.message)
    }
}

impl std::error::Error for Error {}

impl From<serde_json::Error> for Error {
    fn from(err: serde_json::Error) -> Self {
        Self::msg(err)
    }
}

impl From<String> for Error {
    fn from(message: String) -> Self {
        Self::new(message)
    }
}

impl From<&str> for Error {
    fn from(message: &str) -> Self {
        Self::new(message)
    }
}
