//! The job protocol: what a submitter and a worker say on a job link.
//!
//! Job links are QUIC connections of their own (ALPN [`crate::identity::JOB_ALPN`]), separate
//! from the membership connections, so that the membership layer's shuffles never cut a job's
//! traffic and a job's bulk transfers never delay gossip. The submitter dials the worker;
//! after the hello, the submitter sends [`JobFrame::Offer`], [`JobFrame::Revoke`] and blob
//! chunks, and the worker answers with [`JobFrame::Report`], [`JobFrame::Decline`] and blob
//! requests.
//!
//! Small inputs travel inside the offer; larger ones, and the module, are blobs named by their
//! BLAKE3 digest that the worker fetches from the submitter in chunks and checks on arrival.
//! Every frame kind has a cap that the reader checks before reading the payload, and every
//! message is checked for counts and sizes after decoding ([`JobFrame::check`]).

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::job::manifest::{MAX_INPUT_BYTES, MAX_MODULE_BYTES};
use crate::sandbox::{Limits, MAX_MEMORY_BYTES, UnitError};
use crate::schedule::LeaseId;
use crate::wire::{Message, WireError, decode_exact};

/// Inputs up to this size travel inside the offer.
pub const MAX_INLINE_INPUT: usize = 16 << 10;
/// Most leases in one offer.
pub const MAX_LEASES_PER_OFFER: usize = 256;
/// Most lease ids in one revocation or decline.
pub const MAX_IDS_PER_MESSAGE: usize = 1024;
/// Most results in one report.
pub const MAX_RESULTS_PER_REPORT: usize = 256;
/// Largest output a unit of a network job may produce: the job's output cap is lowered to
/// this, so an honest output always fits in one report.
pub const MAX_NETWORK_OUTPUT: u64 = 4 << 20;
/// Largest blob chunk taken.
pub const MAX_CHUNK: usize = 1 << 20;
/// Size of the chunks a blob is sent in: a chunk's whole frame fits the buffer a reader sets
/// aside for a frame before its bytes arrive ([`crate::wire::READ_AHEAD`]), so a chunk is read
/// into its buffer once and never regrown.
pub const SEND_CHUNK: usize = crate::wire::READ_AHEAD - 128;
/// Longest error text carried in a result.
pub const MAX_ERROR_TEXT: usize = 4 << 10;
/// Longest engine profile name.
pub const MAX_PROFILE_LEN: usize = 64;
/// Longest job name an offer carries (a manifest's name is at most this long).
pub const MAX_JOB_NAME: usize = 64;
/// Longest wall-clock limit a job may ask for (a week, as in the manifest).
pub const MAX_TIMEOUT_MS: u64 = 7 * 86_400_000;

const OFFER_CAP: usize = MAX_LEASES_PER_OFFER * (MAX_INLINE_INPUT + 64)
    + 4096
    + MAX_JOB_NAME
    + 2 * crate::sandbox::MAX_PROGRAM_BYTES;
const IDS_CAP: usize = 64 + MAX_IDS_PER_MESSAGE * 10;
const REPORT_CAP: usize = 2 * MAX_NETWORK_OUTPUT as usize + MAX_RESULTS_PER_REPORT * 64 + 4096;
const BLOB_GET_CAP: usize = 64;
const BLOB_AT_CAP: usize = 128;
const CHUNK_CAP: usize = MAX_CHUNK + 128;

/// What every replica of a job's units runs: the module and the limits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobSpec {
    /// The module's digest.
    pub module: Digest,
    /// The module's size in bytes.
    pub module_len: u64,
    /// The engine profile the results must be computed under.
    pub profile: String,
    /// Linear memory cap.
    pub memory_bytes: u64,
    /// Wall-clock limit per unit, in milliseconds.
    pub timeout_ms: u64,
    /// Optional deterministic fuel budget.
    pub fuel: Option<u64>,
    /// Output cap.
    pub output_bytes: u64,
    /// The arguments and environment of a WASI program.
    pub program: crate::sandbox::Program,
}

impl JobSpec {
    /// The spec of a job run under `limits`, whose output cap is lowered to what a report
    /// carries.
    pub fn new(module: Digest, module_len: u64, limits: &Limits) -> Self {
        Self {
            module,
            module_len,
            profile: crate::sandbox::PROFILE.to_owned(),
            memory_bytes: limits.memory_bytes,
            timeout_ms: u64::try_from(limits.timeout.as_millis()).unwrap_or(u64::MAX),
            fuel: limits.fuel,
            output_bytes: limits.output_bytes.min(MAX_NETWORK_OUTPUT),
            program: limits.program.clone(),
        }
    }

    /// The sandbox limits every replica runs under. Peers must agree on every field, so
    /// everything not carried here is the default.
    pub fn limits(&self) -> Limits {
        Limits {
            memory_bytes: self.memory_bytes,
            timeout: std::time::Duration::from_millis(self.timeout_ms),
            fuel: self.fuel,
            input_bytes: MAX_INPUT_BYTES,
            output_bytes: self.output_bytes,
            program: self.program.clone(),
            ..Limits::default()
        }
    }

    fn check(&self) -> Result<(), &'static str> {
        if self.module_len == 0 || self.module_len > MAX_MODULE_BYTES {
            return Err("module size out of range");
        }
        if self.profile.len() > MAX_PROFILE_LEN {
            return Err("profile name too long");
        }
        if self.memory_bytes == 0 || self.memory_bytes > MAX_MEMORY_BYTES {
            return Err("memory cap out of range");
        }
        if self.timeout_ms == 0 || self.timeout_ms > MAX_TIMEOUT_MS {
            return Err("timeout out of range");
        }
        if self.output_bytes > MAX_NETWORK_OUTPUT {
            return Err("output cap over the network cap");
        }
        if self.program.check().is_err() {
            return Err("program arguments or environment out of bounds");
        }
        Ok(())
    }
}

/// Where a lease's input is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum InputRef {
    /// The bytes themselves (at most [`MAX_INLINE_INPUT`]).
    Inline(#[serde(with = "serde_bytes")] Vec<u8>),
    /// A blob to fetch.
    Blob { digest: Digest, len: u64 },
}

/// One lease on the wire. The deadline travels as time left, since clocks differ.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireLease {
    pub id: LeaseId,
    pub unit: u32,
    pub attempt: u32,
    /// Milliseconds until the lease expires, as the submitter sent it.
    pub ttl_ms: u64,
    pub input: InputRef,
}

/// Leases of one job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Offer {
    pub job: Digest,
    /// The job's name as its submitter gave it, shown to the volunteer whose peer runs it;
    /// at most [`MAX_JOB_NAME`] bytes, and worth nothing else.
    pub name: String,
    pub spec: JobSpec,
    pub leases: Vec<WireLease>,
}

/// One execution's answer: the output bytes or the error. The submitter hashes the bytes
/// itself; a digest claimed by the worker would be worth nothing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireResult {
    pub lease: LeaseId,
    #[serde(with = "crate::bytes::result")]
    pub result: Result<Vec<u8>, UnitError>,
}

/// Everything said on a job link after the hello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobFrame {
    /// Submitter → worker: run these leases.
    Offer(Offer),
    /// Submitter → worker: these leases are no longer wanted.
    Revoke { job: Digest, leases: Vec<LeaseId> },
    /// Worker → submitter: answers, and how many more leases it takes now.
    Report {
        job: Digest,
        results: Vec<WireResult>,
        want: u32,
    },
    /// Worker → submitter: these leases were refused and never ran.
    Decline { job: Digest, leases: Vec<LeaseId> },
    /// Worker → submitter: send this blob.
    BlobGet { digest: Digest },
    /// Submitter → worker: part of a blob; `total` is its whole size.
    BlobChunk {
        digest: Digest,
        total: u64,
        offset: u64,
        /// A slice of the frame it arrived in: a chunk's bytes are not copied out of it.
        bytes: Bytes,
    },
    /// Submitter → worker: the blob is not here.
    BlobMissing { digest: Digest },
    /// Worker → submitter: this worker now holds the blob, checked against its digest, and
    /// serves it to other workers on blob links.
    BlobHeld { digest: Digest },
    /// Submitter → worker: the verdicts reached on units this worker answered, so a volunteer
    /// can see how much of what it gave was accepted. Counts only; nothing else depends on it.
    Judged {
        job: Digest,
        accepted: Vec<u32>,
        rejected: Vec<u32>,
    },
    /// Submitter → worker: fetch the blob from `peer`, which holds it (on a blob link); ask
    /// again here if that fails. It names no address: the fetcher dials `peer` only where it
    /// has itself seen it on an authenticated connection, so a submitter cannot aim the
    /// fetcher's packets anywhere.
    BlobAt {
        digest: Digest,
        peer: crate::peer_id::PeerId,
    },
}

#[derive(Serialize, Deserialize)]
struct IdsPayload {
    job: Digest,
    leases: Vec<LeaseId>,
}

#[derive(Serialize, Deserialize)]
struct ReportPayload {
    job: Digest,
    results: Vec<WireResult>,
    want: u32,
}

#[derive(Serialize, Deserialize)]
struct JudgedPayload {
    job: Digest,
    accepted: Vec<u32>,
    rejected: Vec<u32>,
}

#[derive(Serialize, Deserialize)]
struct BlobAtPayload {
    digest: Digest,
    peer: crate::peer_id::PeerId,
}

/// A chunk's payload up to its bytes: postcard writes a byte slice as its length (a varint, as
/// for a `u64`) and then the bytes, so the bytes are the rest of the payload.
#[derive(Serialize, Deserialize)]
struct ChunkHead {
    digest: Digest,
    total: u64,
    offset: u64,
    len: u64,
}

/// Decodes a chunk's payload, its bytes left where they are in `payload`.
fn decode_chunk(kind: u8, payload: Bytes) -> Result<JobFrame, WireError> {
    let (head, rest): (ChunkHead, &[u8]) = postcard::take_from_bytes(&payload)
        .map_err(|source| WireError::Malformed { kind, source })?;
    let rest_len = rest.len();
    match (rest_len as u64).cmp(&head.len) {
        std::cmp::Ordering::Less => Err(WireError::Malformed {
            kind,
            source: postcard::Error::DeserializeUnexpectedEnd,
        }),
        std::cmp::Ordering::Greater => Err(WireError::Trailing {
            kind,
            trailing: rest_len - head.len as usize,
        }),
        std::cmp::Ordering::Equal => Ok(JobFrame::BlobChunk {
            digest: head.digest,
            total: head.total,
            offset: head.offset,
            bytes: payload.slice(payload.len() - rest_len..),
        }),
    }
}

impl JobFrame {
    pub const KIND_OFFER: u8 = 16;
    pub const KIND_REVOKE: u8 = 17;
    pub const KIND_REPORT: u8 = 18;
    pub const KIND_DECLINE: u8 = 19;
    pub const KIND_BLOB_GET: u8 = 20;
    pub const KIND_BLOB_CHUNK: u8 = 21;
    pub const KIND_BLOB_MISSING: u8 = 22;
    pub const KIND_BLOB_AT: u8 = 23;
    pub const KIND_BLOB_HELD: u8 = 24;
    pub const KIND_JUDGED: u8 = 25;

    /// Checks counts and sizes a decoded message must respect; a message that fails is a
    /// protocol violation.
    pub fn check(&self) -> Result<(), &'static str> {
        match self {
            JobFrame::Offer(offer) => {
                offer.spec.check()?;
                if offer.name.len() > MAX_JOB_NAME {
                    return Err("job name too long");
                }
                if offer.leases.len() > MAX_LEASES_PER_OFFER {
                    return Err("too many leases in one offer");
                }
                for lease in &offer.leases {
                    match &lease.input {
                        InputRef::Inline(bytes) if bytes.len() > MAX_INLINE_INPUT => {
                            return Err("inline input over the cap");
                        }
                        InputRef::Blob { len, .. } if *len > MAX_INPUT_BYTES => {
                            return Err("input over the cap");
                        }
                        _ => {}
                    }
                    if lease.ttl_ms > MAX_TIMEOUT_MS.saturating_mul(2) {
                        return Err("lease longer than any job may ask");
                    }
                }
                Ok(())
            }
            JobFrame::Revoke { leases, .. } | JobFrame::Decline { leases, .. } => {
                if leases.len() > MAX_IDS_PER_MESSAGE {
                    return Err("too many lease ids");
                }
                Ok(())
            }
            JobFrame::Judged {
                accepted, rejected, ..
            } => {
                if accepted.len() + rejected.len() > MAX_IDS_PER_MESSAGE {
                    return Err("too many verdicts");
                }
                Ok(())
            }
            JobFrame::Report { results, .. } => {
                if results.len() > MAX_RESULTS_PER_REPORT {
                    return Err("too many results in one report");
                }
                for r in results {
                    match &r.result {
                        Ok(bytes) if bytes.len() as u64 > MAX_NETWORK_OUTPUT => {
                            return Err("output over the network cap");
                        }
                        Err(e) if e.to_string().len() > 4 * MAX_ERROR_TEXT => {
                            return Err("error text too long");
                        }
                        _ => {}
                    }
                }
                Ok(())
            }
            JobFrame::BlobChunk {
                total,
                offset,
                bytes,
                ..
            } => {
                let end = offset.checked_add(bytes.len() as u64);
                if bytes.len() > MAX_CHUNK
                    || *total > MAX_INPUT_BYTES.max(MAX_MODULE_BYTES)
                    || end.is_none_or(|end| end > *total)
                {
                    return Err("blob chunk out of range");
                }
                Ok(())
            }
            JobFrame::BlobGet { .. }
            | JobFrame::BlobMissing { .. }
            | JobFrame::BlobHeld { .. }
            | JobFrame::BlobAt { .. } => Ok(()),
        }
    }
}

/// [`ChunkPayload`] as it is sent, borrowing its bytes.
#[derive(Serialize)]
struct ChunkPayloadRef<'a> {
    digest: Digest,
    total: u64,
    offset: u64,
    #[serde(with = "serde_bytes")]
    bytes: &'a [u8],
}

impl JobFrame {
    /// The frame of a [`JobFrame::BlobChunk`] of `bytes` as two pieces, its header and the
    /// bytes themselves: a blob's bytes reach QUIC without being copied into a frame.
    pub fn chunk_frame(
        digest: Digest,
        total: u64,
        offset: u64,
        bytes: Bytes,
    ) -> Result<[Bytes; 2], WireError> {
        let too_large = |len| WireError::TooLarge {
            kind: Self::KIND_BLOB_CHUNK,
            len,
            cap: CHUNK_CAP,
        };
        let head = ChunkHead {
            digest,
            total,
            offset,
            len: bytes.len() as u64,
        };
        let mut frame = Vec::with_capacity(crate::wire::HEADER_LEN + 64);
        frame.extend_from_slice(&[Self::KIND_BLOB_CHUNK, 0, 0, 0, 0]);
        let mut frame = postcard::to_extend(&head, frame).map_err(WireError::Encode)?;
        let len = frame.len() - crate::wire::HEADER_LEN + bytes.len();
        if len > CHUNK_CAP {
            return Err(too_large(len));
        }
        let len32 = u32::try_from(len).map_err(|_| too_large(len))?;
        frame[1..crate::wire::HEADER_LEN].copy_from_slice(&len32.to_be_bytes());
        Ok([Bytes::from(frame), bytes])
    }
}

fn encode<T: Serialize>(kind: u8, value: &T) -> Result<(u8, Vec<u8>), WireError> {
    Ok((kind, postcard::to_stdvec(value).map_err(WireError::Encode)?))
}

impl Message for JobFrame {
    fn cap(kind: u8) -> Option<usize> {
        match kind {
            Self::KIND_OFFER => Some(OFFER_CAP),
            Self::KIND_REVOKE | Self::KIND_DECLINE | Self::KIND_JUDGED => Some(IDS_CAP),
            Self::KIND_REPORT => Some(REPORT_CAP),
            Self::KIND_BLOB_GET | Self::KIND_BLOB_MISSING | Self::KIND_BLOB_HELD => {
                Some(BLOB_GET_CAP)
            }
            Self::KIND_BLOB_AT => Some(BLOB_AT_CAP),
            Self::KIND_BLOB_CHUNK => Some(CHUNK_CAP),
            _ => None,
        }
    }

    fn encode_payload(&self) -> Result<(u8, Vec<u8>), WireError> {
        match self {
            JobFrame::Offer(offer) => encode(Self::KIND_OFFER, offer),
            JobFrame::Revoke { job, leases } => encode(
                Self::KIND_REVOKE,
                &IdsPayload {
                    job: *job,
                    leases: leases.clone(),
                },
            ),
            JobFrame::Decline { job, leases } => encode(
                Self::KIND_DECLINE,
                &IdsPayload {
                    job: *job,
                    leases: leases.clone(),
                },
            ),
            JobFrame::Report { job, results, want } => encode(
                Self::KIND_REPORT,
                &ReportPayload {
                    job: *job,
                    results: results.clone(),
                    want: *want,
                },
            ),
            JobFrame::BlobGet { digest } => encode(Self::KIND_BLOB_GET, digest),
            JobFrame::BlobMissing { digest } => encode(Self::KIND_BLOB_MISSING, digest),
            JobFrame::BlobHeld { digest } => encode(Self::KIND_BLOB_HELD, digest),
            JobFrame::Judged {
                job,
                accepted,
                rejected,
            } => encode(
                Self::KIND_JUDGED,
                &JudgedPayload {
                    job: *job,
                    accepted: accepted.clone(),
                    rejected: rejected.clone(),
                },
            ),
            JobFrame::BlobAt { digest, peer } => encode(
                Self::KIND_BLOB_AT,
                &BlobAtPayload {
                    digest: *digest,
                    peer: *peer,
                },
            ),
            JobFrame::BlobChunk {
                digest,
                total,
                offset,
                bytes,
            } => encode(
                Self::KIND_BLOB_CHUNK,
                &ChunkPayloadRef {
                    digest: *digest,
                    total: *total,
                    offset: *offset,
                    bytes: &bytes[..],
                },
            ),
        }
    }

    fn decode_payload(kind: u8, payload: &[u8]) -> Result<Self, WireError> {
        let frame = match kind {
            Self::KIND_OFFER => JobFrame::Offer(decode_exact(kind, payload)?),
            Self::KIND_REVOKE => {
                let p: IdsPayload = decode_exact(kind, payload)?;
                JobFrame::Revoke {
                    job: p.job,
                    leases: p.leases,
                }
            }
            Self::KIND_DECLINE => {
                let p: IdsPayload = decode_exact(kind, payload)?;
                JobFrame::Decline {
                    job: p.job,
                    leases: p.leases,
                }
            }
            Self::KIND_REPORT => {
                let p: ReportPayload = decode_exact(kind, payload)?;
                JobFrame::Report {
                    job: p.job,
                    results: p.results,
                    want: p.want,
                }
            }
            Self::KIND_BLOB_GET => JobFrame::BlobGet {
                digest: decode_exact(kind, payload)?,
            },
            Self::KIND_BLOB_MISSING => JobFrame::BlobMissing {
                digest: decode_exact(kind, payload)?,
            },
            Self::KIND_JUDGED => {
                let p: JudgedPayload = decode_exact(kind, payload)?;
                JobFrame::Judged {
                    job: p.job,
                    accepted: p.accepted,
                    rejected: p.rejected,
                }
            }
            Self::KIND_BLOB_HELD => JobFrame::BlobHeld {
                digest: decode_exact(kind, payload)?,
            },
            Self::KIND_BLOB_AT => {
                let p: BlobAtPayload = decode_exact(kind, payload)?;
                JobFrame::BlobAt {
                    digest: p.digest,
                    peer: p.peer,
                }
            }
            Self::KIND_BLOB_CHUNK => decode_chunk(kind, Bytes::copy_from_slice(payload))?,
            _ => return Err(WireError::UnknownKind { kind }),
        };
        frame
            .check()
            .map_err(|reason| WireError::Invalid { kind, reason })?;
        Ok(frame)
    }

    fn decode_owned(kind: u8, payload: Vec<u8>) -> Result<Self, WireError> {
        if kind != Self::KIND_BLOB_CHUNK {
            return Self::decode_payload(kind, &payload);
        }
        let frame = decode_chunk(kind, Bytes::from(payload))?;
        frame
            .check()
            .map_err(|reason| WireError::Invalid { kind, reason })?;
        Ok(frame)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn digest() -> impl Strategy<Value = Digest> {
        any::<[u8; 32]>().prop_map(Digest)
    }

    fn spec() -> impl Strategy<Value = JobSpec> {
        (
            digest(),
            1..MAX_MODULE_BYTES,
            1..MAX_MEMORY_BYTES,
            1..MAX_TIMEOUT_MS,
            any::<Option<u64>>(),
            0..MAX_NETWORK_OUTPUT,
            proptest::collection::vec("[a-z=-]{0,8}", 0..4),
            proptest::collection::btree_map("[A-Z_]{1,8}", "[ -~]{0,8}", 0..4),
        )
            .prop_map(
                |(module, module_len, mem, timeout, fuel, out, args, env)| JobSpec {
                    module,
                    module_len,
                    profile: crate::sandbox::PROFILE.to_owned(),
                    memory_bytes: mem,
                    timeout_ms: timeout,
                    fuel,
                    output_bytes: out,
                    program: crate::sandbox::Program {
                        args,
                        env: env.into_iter().collect(),
                    },
                },
            )
    }

    fn lease() -> impl Strategy<Value = WireLease> {
        (
            any::<u64>(),
            any::<u32>(),
            any::<u32>(),
            0..MAX_TIMEOUT_MS,
            prop_oneof![
                proptest::collection::vec(any::<u8>(), 0..64).prop_map(InputRef::Inline),
                (digest(), 0..MAX_INPUT_BYTES)
                    .prop_map(|(digest, len)| InputRef::Blob { digest, len }),
            ],
        )
            .prop_map(|(id, unit, attempt, ttl_ms, input)| WireLease {
                id: LeaseId(id),
                unit,
                attempt,
                ttl_ms,
                input,
            })
    }

    fn frame() -> impl Strategy<Value = JobFrame> {
        let ids = proptest::collection::vec(any::<u64>().prop_map(LeaseId), 0..32);
        prop_oneof![
            (digest(), spec(), proptest::collection::vec(lease(), 0..16)).prop_map(
                |(job, spec, leases)| JobFrame::Offer(Offer {
                    job,
                    name: "test".into(),
                    spec,
                    leases
                })
            ),
            (digest(), ids.clone()).prop_map(|(job, leases)| JobFrame::Revoke { job, leases }),
            (digest(), ids).prop_map(|(job, leases)| JobFrame::Decline { job, leases }),
            (
                digest(),
                proptest::collection::vec(
                    (
                        any::<u64>(),
                        proptest::option::of(proptest::collection::vec(any::<u8>(), 0..64))
                    ),
                    0..16
                ),
                any::<u32>()
            )
                .prop_map(|(job, results, want)| JobFrame::Report {
                    job,
                    results: results
                        .into_iter()
                        .map(|(lease, out)| WireResult {
                            lease: LeaseId(lease),
                            result: out.ok_or(UnitError::Host {
                                detail: "lost".into()
                            }),
                        })
                        .collect(),
                    want,
                }),
            digest().prop_map(|digest| JobFrame::BlobGet { digest }),
            digest().prop_map(|digest| JobFrame::BlobMissing { digest }),
            digest().prop_map(|digest| JobFrame::BlobHeld { digest }),
            (
                digest(),
                proptest::collection::vec(any::<u32>(), 0..64),
                proptest::collection::vec(any::<u32>(), 0..64)
            )
                .prop_map(|(job, accepted, rejected)| JobFrame::Judged {
                    job,
                    accepted,
                    rejected
                }),
            (digest(), any::<[u8; 32]>()).prop_map(|(digest, peer)| JobFrame::BlobAt {
                digest,
                peer: crate::peer_id::PeerId::from_bytes(peer),
            }),
            (digest(), proptest::collection::vec(any::<u8>(), 0..256)).prop_map(
                |(digest, bytes)| JobFrame::BlobChunk {
                    digest,
                    total: 1000,
                    offset: 1000 - bytes.len() as u64,
                    bytes: bytes.into(),
                }
            ),
        ]
    }

    proptest! {
        /// A chunk written straight from its bytes is the frame of the same `BlobChunk`.
        #[test]
        fn chunk_frames_written_from_slices_match(
            bytes in proptest::collection::vec(any::<u8>(), 0..4096),
            total in any::<u64>(),
            offset in any::<u64>(),
        ) {
            let digest = Digest::of(&bytes);
            let frame = JobFrame::BlobChunk { digest, total, offset, bytes: bytes.clone().into() };
            let [head, body] = JobFrame::chunk_frame(digest, total, offset, bytes.into()).unwrap();
            let whole = frame.encode_frame().unwrap();
            prop_assert_eq!([&head[..], &body[..]].concat(), whole.clone());
            // Read back as a frame arrives, the chunk's bytes are a slice of the payload.
            let payload = whole[crate::wire::HEADER_LEN..].to_vec();
            prop_assert_eq!(
                JobFrame::decode_owned(JobFrame::KIND_BLOB_CHUNK, payload.clone()).ok(),
                JobFrame::decode_payload(JobFrame::KIND_BLOB_CHUNK, &payload).ok()
            );
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn every_job_frame_round_trips(frame in frame()) {
            let bytes = frame.encode_frame().expect("encode");
            let (back, used) = JobFrame::decode_frame(&bytes).expect("decode");
            prop_assert_eq!(used, bytes.len());
            prop_assert_eq!(back, frame);
        }

        #[test]
        fn arbitrary_payloads_never_panic_any_job_kind(kind in 14u8..27, payload in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = JobFrame::decode_payload(kind, &payload);
        }
    }

    #[test]
    fn a_chunk_as_sent_fits_the_buffer_a_reader_sets_aside() {
        let [head, body] = JobFrame::chunk_frame(
            Digest([0xff; 32]),
            u64::MAX,
            u64::MAX,
            Bytes::from(vec![0; SEND_CHUNK]),
        )
        .expect("a chunk of the size we send");
        assert!(head.len() - crate::wire::HEADER_LEN + body.len() <= crate::wire::READ_AHEAD);
    }

    #[test]
    fn out_of_range_messages_are_refused() {
        let chunk = JobFrame::BlobChunk {
            digest: Digest([0; 32]),
            total: 10,
            offset: 8,
            bytes: vec![0; 4].into(),
        };
        let bytes = chunk.encode_frame().expect("encode");
        assert!(matches!(
            JobFrame::decode_frame(&bytes),
            Err(WireError::Invalid { .. })
        ));
        let mut spec = JobSpec::new(Digest([0; 32]), 10, &Limits::default());
        spec.memory_bytes = MAX_MEMORY_BYTES + 1;
        let offer = JobFrame::Offer(Offer {
            name: "test".into(),
            job: Digest([1; 32]),
            spec,
            leases: Vec::new(),
        });
        let bytes = offer.encode_frame().expect("encode");
        assert!(JobFrame::decode_frame(&bytes).is_err());
        // The default output cap (16 MiB) is lowered to what one report carries.
        let spec = JobSpec::new(Digest([0; 32]), 10, &Limits::default());
        assert_eq!(spec.output_bytes, MAX_NETWORK_OUTPUT);
    }
}
