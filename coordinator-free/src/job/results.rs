//! `results.jsonl`: one JSON object per finished unit, in the order units finish while the job
//! runs, rewritten in unit order when it ends.

use serde::Serialize;

use crate::digest::Digest;
use crate::peer_id::PeerId;

/// How a unit ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// A quorum of peers returned identical output.
    Accepted,
    /// No quorum was reached within the attempts allowed.
    Failed,
}

/// One line of `results.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ResultLine {
    /// The unit's index in the job.
    pub index: u64,
    /// `accepted` or `failed`.
    pub status: Status,
    /// Where the input came from: the file, the line, or the sweep's parameters.
    pub input: serde_json::Value,
    /// The accepted output: as JSON when it is JSON, else `{"base64": "..."}`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output: Option<serde_json::Value>,
    /// Digest of the accepted output bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub digest: Option<Digest>,
    /// The peers whose results formed the quorum.
    pub agreed: Vec<PeerId>,
    /// The host each of them answered from, in the same order: all distinct unless the job
    /// placed by peer.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    /// Peers whose results differed from the accepted one.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub dissented: Vec<PeerId>,
    /// Executions the unit took.
    pub attempts: u32,
    /// For a failed unit: each peer's result digest, the evidence of the disagreement.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub evidence: Vec<(PeerId, Digest)>,
    /// For a failed unit: the error its executions reported, when they reported one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// How an accepted result was validated.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub validated: Option<Validated>,
}

/// How an accepted result was validated, as `results.jsonl` states it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "by", rename_all = "kebab-case")]
pub enum Validated {
    /// A quorum of distinct hosts (`agreed`, `hosts`) returned it. `revalidated_after` names
    /// the peer whose word the result first rested on, caught lying since.
    Quorum {
        #[serde(skip_serializing_if = "Option::is_none")]
        revalidated_after: Option<PeerId>,
    },
    /// One peer this submitter trusts returned it, unchecked: `streak` consecutive results of
    /// it had agreed with quorums of other hosts.
    Trusted { peer: PeerId, streak: u32 },
    /// A trusted peer returned it and another host confirmed it.
    SpotChecked { peer: PeerId, streak: u32 },
    /// A peer the job's operator vouches for returned it, unchecked.
    Vouched { peer: PeerId },
}

impl From<crate::schedule::Validation> for Validated {
    fn from(v: crate::schedule::Validation) -> Self {
        use crate::schedule::Validation as V;
        match v {
            V::Quorum => Self::Quorum {
                revalidated_after: None,
            },
            V::Revalidated { caught } => Self::Quorum {
                revalidated_after: Some(caught),
            },
            V::Trusted { peer, streak, .. } => Self::Trusted { peer, streak },
            V::SpotChecked { peer, streak } => Self::SpotChecked { peer, streak },
            V::Vouched { peer } => Self::Vouched { peer },
        }
    }
}

/// A unit's output bytes for the results file: the JSON value itself when the bytes are JSON,
/// else `{"base64": "..."}`.
pub fn output_value(bytes: &[u8]) -> serde_json::Value {
    match serde_json::from_slice::<serde_json::Value>(bytes) {
        Ok(value) => value,
        Err(_) => serde_json::json!({ "base64": base64(bytes) }),
    }
}

/// Standard base64 (RFC 4648, with padding).
pub fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> shift) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_the_rfc_vectors() {
        // RFC 4648, section 10.
        for (plain, encoded) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(plain.as_bytes()), encoded);
        }
    }

    #[test]
    fn json_outputs_stay_json_and_others_become_base64() {
        assert_eq!(
            output_value(br#"{"pi":2.5}"#),
            serde_json::json!({"pi": 2.5})
        );
        assert_eq!(
            output_value(b"\xff\x00binary"),
            serde_json::json!({"base64": "/wBiaW5hcnk="})
        );
    }

    #[test]
    fn a_line_names_peers_by_their_text_id() {
        let peer = PeerId::from_bytes([3; 32]);
        let line = ResultLine {
            index: 4,
            status: Status::Accepted,
            input: serde_json::json!({"params": {"beta": 0.2}}),
            output: Some(output_value(b"[1,2]")),
            digest: Some(Digest::of(b"[1,2]")),
            agreed: vec![peer],
            hosts: vec!["127.0.0.2".to_owned()],
            dissented: Vec::new(),
            attempts: 2,
            evidence: Vec::new(),
            error: None,
            validated: Some(Validated::Trusted { peer, streak: 12 }),
        };
        let text = serde_json::to_string(&line).unwrap();
        assert!(
            text.contains(&format!(
                r#""validated":{{"by":"trusted","peer":"{peer}","streak":12}}"#
            )),
            "{text}"
        );
        assert!(text.contains(&format!("\"{peer}\"")), "{text}");
        assert!(text.contains(r#""status":"accepted""#), "{text}");
        assert!(!text.contains("evidence"), "{text}");
    }
}
