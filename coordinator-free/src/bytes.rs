//! Byte fields of wire and unit-host frames as one run of bytes. serde writes a `Vec<u8>` as a
//! sequence of `u8`s, one call each; postcard's bytes for both are the same (a length, then the
//! bytes), so marking a field as bytes changes nothing on the wire and copies a 10 MiB input in
//! one `memcpy` instead of ten million calls.

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::sandbox::UnitError;

/// `#[serde(with = "crate::bytes::result")]` for a `Result<Vec<u8>, UnitError>`: encoded as
/// serde encodes a `Result`, its `Ok` bytes as bytes.
pub mod result {
    use super::*;

    #[derive(Serialize)]
    #[serde(rename = "Result")]
    enum Sent<'a> {
        Ok(#[serde(with = "serde_bytes")] &'a [u8]),
        Err(&'a UnitError),
    }

    #[derive(Deserialize)]
    #[serde(rename = "Result")]
    enum Received {
        Ok(#[serde(with = "serde_bytes")] Vec<u8>),
        Err(UnitError),
    }

    pub fn serialize<S: Serializer>(
        value: &Result<Vec<u8>, UnitError>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match value {
            Ok(bytes) => Sent::Ok(bytes),
            Err(e) => Sent::Err(e),
        }
        .serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Result<Vec<u8>, UnitError>, D::Error> {
        Ok(match Received::deserialize(d)? {
            Received::Ok(bytes) => Ok(bytes),
            Received::Err(e) => Err(e),
        })
    }
}

/// A shared buffer of `len` zero bytes to fill in place (`Arc::get_mut` while it is not yet
/// shared). Zeroed memory of this size comes from the system untouched, so only the pages
/// written to are ever committed and nothing is zeroed twice.
pub(crate) fn zeroed(len: usize) -> std::sync::Arc<[u8]> {
    let zeroed = std::sync::Arc::<[u8]>::new_zeroed_slice(len);
    // SAFETY: every bit pattern, all zeroes included, is a valid `u8`.
    unsafe { zeroed.assume_init() }
}
