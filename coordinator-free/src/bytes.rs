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

/// `#[serde(deserialize_with = "crate::bytes::shared::deserialize")]` for an `Arc<[u8]>` read
/// from a frame: the bytes
/// go from the frame into the shared buffer in one copy, with no `Vec` between.
pub mod shared {
    use std::sync::Arc;

    use super::*;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Arc<[u8]>, D::Error> {
        struct Visit;
        impl serde::de::Visitor<'_> for Visit {
            type Value = Arc<[u8]>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("bytes")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Self::Value, E> {
                Ok(Arc::from(v))
            }
            fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Self::Value, E> {
                Ok(Arc::from(v))
            }
        }
        d.deserialize_bytes(Visit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize, Deserialize, PartialEq, Debug)]
    struct Plain {
        bytes: Vec<u8>,
        result: Result<Vec<u8>, UnitError>,
    }

    #[derive(Serialize, Deserialize, PartialEq, Debug)]
    struct Marked {
        #[serde(with = "serde_bytes")]
        bytes: Vec<u8>,
        #[serde(with = "result")]
        result: Result<Vec<u8>, UnitError>,
    }

    #[derive(Deserialize, PartialEq, Debug)]
    struct Shared {
        #[serde(deserialize_with = "shared::deserialize")]
        bytes: std::sync::Arc<[u8]>,
    }

    #[test]
    fn shared_bytes_read_what_plain_ones_wrote() {
        let plain = Plain {
            bytes: vec![9, 8, 7],
            result: Ok(Vec::new()),
        };
        let encoded = postcard::to_stdvec(&plain).unwrap();
        let (shared, rest): (Shared, _) = postcard::take_from_bytes(&encoded).unwrap();
        assert_eq!(&shared.bytes[..], &[9, 8, 7]);
        assert_eq!(rest.len(), 2, "the result follows");
    }

    /// Marked fields are byte for byte what the plain ones were, so peers of either build
    /// understand each other.
    #[test]
    fn marked_fields_encode_as_plain_ones() {
        for result in [
            Ok(vec![1, 2, 255]),
            Ok(Vec::new()),
            Err(UnitError::BadModule {
                reason: "no".into(),
            }),
        ] {
            let plain = Plain {
                bytes: (0..=255).collect(),
                result: result.clone(),
            };
            let marked = Marked {
                bytes: (0..=255).collect(),
                result,
            };
            let a = postcard::to_stdvec(&plain).unwrap();
            let b = postcard::to_stdvec(&marked).unwrap();
            assert_eq!(a, b);
            assert_eq!(postcard::from_bytes::<Marked>(&a).unwrap(), marked);
            assert_eq!(postcard::from_bytes::<Plain>(&b).unwrap(), plain);
        }
    }
}
