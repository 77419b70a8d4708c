//! The bodies of the fuzz targets in `fuzz/`, one function per decoder that bytes from another
//! peer, a unit host or a local client reach.
//!
//! They live in the library so that the fuzz targets (nightly, libFuzzer) and the replay of
//! the committed corpus (`tests/fuzz_corpus.rs`, stable) run exactly the same code, and so that
//! decoders private to their module are reached without making them public. Each function
//! takes arbitrary bytes, must return normally whatever they are, and asserts what is cheap to
//! check about anything that decodes: mostly that it encodes again and decodes to the same
//! value. A panic here is a bug in the decoder or in the property, never in the input.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use crate::job::manifest::{InputSpec, JobManifest, MAX_SWEEP_UNITS};
use crate::job::proto::JobFrame;
use crate::membership::{
    AdvertAuth, Capacity, Command, Config, Event, LocalPeer, Membership, MembershipMessage,
};
use crate::peer_id::PeerId;
use crate::wire::{self, Frame, Hello, Message};

/// The body of a fuzz target.
pub type Target = fn(&[u8]);

/// The names of the targets, as the directories of `fuzz/corpus/` and the files of
/// `fuzz/fuzz_targets/` spell them, with their bodies.
pub const TARGETS: &[(&str, Target)] = &[
    ("wire_frame", wire_frame),
    ("job_frame", job_frame),
    ("membership_message", membership_message),
    ("certificate", certificate),
    #[cfg(unix)]
    ("control_request", control_request),
    ("unit_host_frame", unit_host_frame),
    ("manifest", manifest),
];

/// Peer frames (`wire.rs`): the frame decoder, the async reader over a stream of frames of
/// both message types, and `decode_exact` on the payload types that travel alone.
pub fn wire_frame(data: &[u8]) {
    let decoded = Frame::decode_frame(data);
    if let Ok((frame, used)) = &decoded {
        assert!(*used <= data.len());
        assert_frame_round_trips(frame);
    }
    let frames = read_stream::<Frame>(data);
    // The reader and the slice decoder agree on the first frame.
    let first = frames.first().and_then(|f| f.as_ref().ok());
    assert_eq!(decoded.ok().map(|(frame, _)| frame).as_ref(), first);
    for frame in frames.iter().flatten() {
        assert_frame_round_trips(frame);
    }
    for frame in read_stream::<JobFrame>(data).iter().flatten() {
        assert_frame_round_trips(frame);
    }

    if let Some((&kind, payload)) = data.split_first() {
        exact_round_trip::<Hello>(kind, payload);
        exact_round_trip::<crate::digest::Digest>(kind, payload);
        exact_round_trip::<PeerId>(kind, payload);
        exact_round_trip::<SocketAddr>(kind, payload);
        exact_round_trip::<Vec<crate::schedule::LeaseId>>(kind, payload);
        exact_round_trip::<MembershipMessage>(kind, payload);
    }
}

/// Job link frames (`job/proto.rs`): whole frames, and payloads of the kind named by the first
/// byte without the header's cap, so the fuzzer need not find a valid length first. Whatever
/// decodes has passed [`JobFrame::check`] and must encode again.
pub fn job_frame(data: &[u8]) {
    if let Ok((frame, used)) = JobFrame::decode_frame(data) {
        assert!(used <= data.len());
        assert_eq!(frame.check(), Ok(()));
        // Canonical postcard is never longer than what was decoded, so it fits the same cap.
        let bytes = frame
            .encode_frame()
            .expect("a frame that decoded within its cap encodes within it");
        assert!(bytes.len() <= used);
        assert_frame_round_trips(&frame);
        job_frame_uses(&frame);
    }
    if let Some((&kind, payload)) = data.split_first()
        && let Ok(frame) = JobFrame::decode_payload(kind, payload)
    {
        assert_eq!(frame.check(), Ok(()));
        let (encoded_kind, _) = frame.encode_payload().expect("a decoded frame encodes");
        assert_eq!(encoded_kind, kind);
        assert_frame_round_trips(&frame);
        job_frame_uses(&frame);
    }
}

/// What a worker derives from a checked offer at once, before anything else looks at it.
fn job_frame_uses(frame: &JobFrame) {
    if let JobFrame::Offer(offer) = frame {
        let limits = offer.spec.limits();
        assert_eq!(limits.memory_bytes, offer.spec.memory_bytes);
        assert!(limits.output_bytes <= crate::job::proto::MAX_NETWORK_OUTPUT);
    }
}

/// Membership messages (`membership/message.rs`): decoding with validation, advert
/// verification with real Ed25519 keys, and a membership state machine fed the message by a
/// connected peer, whose own messages must then be valid.
pub fn membership_message(data: &[u8]) {
    let Ok(msg) = MembershipMessage::decode(data) else {
        return;
    };
    msg.validate().expect("decode validates");
    let bytes = msg.encode().expect("a decoded message encodes");
    assert!(bytes.len() <= data.len());
    assert_eq!(MembershipMessage::decode(&bytes).ok().as_ref(), Some(&msg));

    if let MembershipMessage::Adverts(adverts) = &msg {
        let auth = ed25519_auth();
        for gossiped in adverts {
            // Forged or not, verification must answer rather than fail.
            let _ = gossiped.signed.verify(auth);
        }
    }
    drive_membership(msg);
}

/// Signs nothing and accepts every signature, so that the fuzzer's adverts reach the table.
#[derive(Debug)]
struct AcceptAnySignature;

impl AdvertAuth for AcceptAnySignature {
    fn sign(&self, _bytes: &[u8]) -> Vec<u8> {
        Vec::new()
    }

    fn verify(&self, _peer: &PeerId, _bytes: &[u8], _sig: &[u8]) -> bool {
        true
    }
}

/// The advert verifier of a real identity, made once: key generation is slow.
fn ed25519_auth() -> &'static crate::identity::KeyAuth {
    static AUTH: OnceLock<crate::identity::KeyAuth> = OnceLock::new();
    AUTH.get_or_init(|| {
        crate::identity::Identity::generate()
            .expect("an identity can be generated")
            .advert_auth()
    })
}

/// The local peer of [`drive_membership`]; seeds may name it to reach the own-advert path.
const FUZZ_LOCAL_PEER: PeerId = PeerId::from_bytes([0x42; 32]);
/// The connected peer every fuzzed message comes from.
const FUZZ_REMOTE_PEER: PeerId = PeerId::from_bytes([0x17; 32]);

fn drive_membership(msg: MembershipMessage) {
    let t0 = Instant::now();
    let local = LocalPeer {
        id: FUZZ_LOCAL_PEER,
        addrs: vec![SocketAddr::from(([127, 0, 0, 1], 4000))],
        capacity: Capacity {
            cores_donated: 4,
            cores_free: 4,
            memory_mb: 1024,
            profile: 1,
        },
        initial_seq: 1,
    };
    let mut membership = Membership::new(Config::default(), local, AcceptAnySignature, 7, t0);
    membership.handle(
        Event::Connected {
            peer: FUZZ_REMOTE_PEER,
            addr: SocketAddr::from(([127, 0, 0, 2], 4000)),
            inbound: true,
        },
        t0,
    );
    // Twice: the second copy meets the state the first one left.
    membership.handle(
        Event::Message {
            from: FUZZ_REMOTE_PEER,
            msg: msg.clone(),
        },
        t0,
    );
    membership.handle(
        Event::Message {
            from: FUZZ_REMOTE_PEER,
            msg,
        },
        t0 + Duration::from_millis(1),
    );
    // One gossip round and one expiry pass over whatever the message put in the table.
    for later in [Duration::from_secs(1), Duration::from_secs(7)] {
        membership.handle_timeout(t0 + later);
    }
    assert!(membership.peer_count() <= membership.config().max_peers);
    while let Some(command) = membership.poll_command() {
        if let Command::Send { msg, .. } = command {
            msg.validate()
                .expect("the state machine sends valid messages");
            // `encode` refuses anything over the frame cap.
            msg.encode()
                .expect("the state machine's messages fit a frame");
        }
    }
}

/// Certificates (`identity.rs`): the peer id reader, and the DER reader under it walked over
/// every nested element the input holds.
pub fn certificate(data: &[u8]) {
    if let Ok(peer) = crate::identity::peer_id_of_cert(data) {
        // The id is the certificate's key: it must occur in the certificate.
        assert!(
            data.windows(peer.as_bytes().len())
                .any(|w| w == peer.as_bytes())
        );
    }
    walk_der(data, 0);
}

/// Reads every element of `input` and, for constructed ones, every element inside them, checking
/// that each element's parts are where the reader says they are.
fn walk_der(input: &[u8], depth: usize) {
    use crate::identity::der;

    const MAX_DEPTH: usize = 16;
    let mut rest = input;
    // Bounded: every element read is at least two bytes long.
    while let Ok((tlv, after)) = der::any(rest) {
        assert_eq!(tlv.tag, rest[0]);
        assert_eq!(&rest[..tlv.whole.len()], tlv.whole);
        assert_eq!(&rest[tlv.whole.len()..], after);
        assert!(tlv.whole.len() >= 2 + tlv.content.len());
        assert!(tlv.whole.ends_with(tlv.content));
        let constructed = tlv.tag & 0x20 != 0;
        if constructed && depth < MAX_DEPTH {
            walk_der(tlv.content, depth + 1);
        }
        rest = after;
    }
}

/// The control socket (`control.rs`): the peer's reading of a request line, and the client's
/// reading of the peer's reply.
#[cfg(unix)]
pub fn control_request(data: &[u8]) {
    use crate::control::{ClientRequest, MAX_ECHOED_CHARS, MAX_REQUEST, StatusReport};

    match complete(crate::control::read_request(data)) {
        Ok(ClientRequest::Status) => {
            // Only the first line, and of it only what fits the request cap, is read.
            let read = &data[..data.len().min(MAX_REQUEST)];
            let line = read.split(|&b| b == b'\n').next().unwrap_or_default();
            assert_eq!(std::str::from_utf8(line).map(str::trim), Ok("status"));
        }
        Ok(ClientRequest::StatusAll) => {
            let read = &data[..data.len().min(MAX_REQUEST)];
            let line = read.split(|&b| b == b'\n').next().unwrap_or_default();
            let line = std::str::from_utf8(line).expect("a request read is text");
            assert_eq!(
                line.split_whitespace().collect::<Vec<_>>(),
                ["status", "all"]
            );
        }
        Ok(ClientRequest::Pause(secs)) => {
            assert!(secs.is_none_or(|s| (1..=crate::control::MAX_PAUSE_SECS).contains(&s)));
        }
        Ok(ClientRequest::Resume) => {}
        Ok(ClientRequest::BadPause(echo)) | Ok(ClientRequest::Unknown(echo)) => {
            assert!(echo.chars().count() <= MAX_ECHOED_CHARS);
            assert_ne!(echo, "status");
        }
        Err(_) => {}
    }
    if let Ok(report) = crate::control::parse_reply(data) {
        let json = serde_json::to_vec(&report).expect("a report serialises");
        let back: StatusReport = serde_json::from_slice(&json).expect("a report parses back");
        assert_eq!(back, report);
    }
}

/// Frames between a worker and its unit host (`sandbox/host.rs`), both directions: batches
/// as the host reads them and the host's answers as the worker reads them, from one stream.
pub fn unit_host_frame(data: &[u8]) {
    use crate::sandbox::host::{
        FromHost, SpareInputs, read_batch, read_frame, write_batch, write_frame,
    };

    let mut stream = data;
    // Buffers of earlier batches are read into again, as in the host.
    let mut spare = SpareInputs::default();
    // Bounded: every frame read consumes at least its four-byte length.
    for _ in 0..=data.len() / 4 {
        let Ok(Some(batch)) = read_batch(&mut stream, &mut spare) else {
            break;
        };
        let mut once = Vec::new();
        write_batch(&mut once, &batch.as_sent()).expect("a read batch fits a frame");
        let again = read_batch(&mut &once[..], &mut spare)
            .expect("a written batch reads")
            .expect("a written batch is a frame");
        let mut twice = Vec::new();
        write_batch(&mut twice, &again.as_sent()).expect("a read batch fits a frame");
        assert_eq!(once, twice);
        batch.recycle(&mut spare);
        again.recycle(&mut spare);
    }

    let mut stream = data;
    for _ in 0..=data.len() / 4 {
        let Ok(Some(message)) = read_frame::<FromHost>(&mut stream) else {
            break;
        };
        let mut once = Vec::new();
        write_frame(&mut once, &message).expect("a read message fits a frame");
        let again: FromHost = read_frame(&mut &once[..])
            .expect("a written message reads")
            .expect("a written message is a frame");
        let mut twice = Vec::new();
        write_frame(&mut twice, &again).expect("a read message fits a frame");
        assert_eq!(once, twice);
    }
}

/// Job manifests (`job/manifest.rs`): parsing and validation of the text. `parse` does not
/// touch the file system, and this never follows the paths a manifest names, so the input
/// cannot make it read files; the base directory is only joined to them.
pub fn manifest(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let base = manifest_base();
    let Ok(manifest) = JobManifest::parse(text, Path::new("job.toml"), base) else {
        return;
    };
    assert!(!manifest.name.is_empty() && manifest.name.len() <= 64);
    assert!(manifest.module.starts_with(base) || manifest.module.is_absolute());
    let r = manifest.redundancy;
    assert!(1 <= r.quorum && r.quorum <= r.replicas && r.replicas <= r.max_attempts);
    let limits = manifest.unit_limits();
    assert!(limits.program.check().is_ok());
    assert!(limits.memory_bytes > 0 && limits.memory_bytes <= crate::sandbox::MAX_MEMORY_BYTES);
    assert!(!limits.timeout.is_zero());
    match &manifest.inputs {
        InputSpec::Files(files) => assert!(!files.is_empty()),
        InputSpec::Dir(_) | InputSpec::JsonLines(_) => {}
        InputSpec::Sweep(sweep) => {
            assert!(!sweep.is_empty() && sweep.len() <= MAX_SWEEP_UNITS);
            for (name, values) in sweep.params() {
                assert!(!values.is_empty(), "parameter {name} has no values");
                // The ends and a few between: a range may hold a hundred million values.
                let n = values.len();
                for value in [0, 1, n / 2, n - 1]
                    .into_iter()
                    .filter_map(|i| values.get(i))
                {
                    let finite_number = value.as_f64().is_some_and(f64::is_finite);
                    assert!(
                        finite_number || value.is_string() || value.is_boolean(),
                        "parameter {name} has the value {value}"
                    );
                }
            }
            // The first and the last point exist, one past the last does not.
            for index in [0, sweep.len() - 1] {
                let point = sweep.point(index).expect("a point inside the sweep");
                assert_eq!(point.len(), sweep.params().len());
                assert!(sweep.input(index).is_some());
            }
            assert!(sweep.point(sweep.len()).is_none());
        }
    }
}

/// A directory that is never created: manifests resolve their paths against it and nothing
/// reads them.
fn manifest_base() -> &'static Path {
    static BASE: OnceLock<PathBuf> = OnceLock::new();
    BASE.get_or_init(|| std::env::temp_dir().join("coordinator-free-fuzz-manifest"))
}

fn assert_frame_round_trips<M: Message + PartialEq + std::fmt::Debug>(frame: &M) {
    let bytes = frame.encode_frame().expect("a decoded frame encodes");
    let (back, used) = M::decode_frame(&bytes).expect("an encoded frame decodes");
    assert_eq!(used, bytes.len());
    assert_eq!(&back, frame);
}

fn exact_round_trip<T>(kind: u8, payload: &[u8])
where
    T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let Ok(value) = wire::decode_exact::<T>(kind, payload) else {
        return;
    };
    let bytes = postcard::to_stdvec(&value).expect("a decoded value encodes");
    assert!(bytes.len() <= payload.len());
    let back: T = wire::decode_exact(kind, &bytes).expect("an encoded value decodes");
    assert_eq!(back, value);
}

/// Every frame the async reader takes from `data` until the stream ends or a frame is refused.
fn read_stream<M: Message>(data: &[u8]) -> Vec<Result<M, wire::WireError>> {
    let mut reader = data;
    let mut frames = Vec::new();
    // Bounded: every frame read consumes at least a header.
    for _ in 0..=data.len() / wire::HEADER_LEN {
        match complete(wire::read::<M, _>(&mut reader)) {
            Ok(Some(frame)) => frames.push(Ok(frame)),
            Ok(None) => break,
            Err(err) => {
                frames.push(Err(err));
                break;
            }
        }
    }
    frames
}

/// Runs a future that reads from a byte slice: such reads never wait, so one poll finishes it
/// and no runtime is needed.
fn complete<F: Future>(future: F) -> F::Output {
    let mut future = std::pin::pin!(future);
    match future
        .as_mut()
        .poll(&mut Context::from_waker(Waker::noop()))
    {
        Poll::Ready(output) => output,
        Poll::Pending => panic!("a read from a byte slice waited"),
    }
}

/// Valid inputs for `target`, built with the project's own encoders, so the fuzzer starts past
/// the kind, length and signature checks. `fuzz/corpus/` began as these.
pub fn seeds(target: &str) -> Vec<Vec<u8>> {
    match target {
        "wire_frame" => wire_seeds(),
        "job_frame" => job_frames()
            .iter()
            .flat_map(|frame| {
                let frame_bytes = frame.encode_frame().expect("seed frame encodes");
                let (kind, payload) = frame.encode_payload().expect("seed payload encodes");
                [frame_bytes, [&[kind][..], &payload].concat()]
            })
            .collect(),
        "membership_message" => membership_messages()
            .iter()
            .map(|msg| msg.encode().expect("seed message encodes"))
            .collect(),
        "certificate" => (0..2)
            .map(|_| {
                crate::identity::Identity::generate()
                    .expect("an identity can be generated")
                    .certificate()
                    .to_vec()
            })
            .collect(),
        "control_request" => control_seeds(),
        "unit_host_frame" => unit_host_seeds(),
        "manifest" => MANIFEST_SEEDS
            .iter()
            .map(|m| m.as_bytes().to_vec())
            .collect(),
        _ => Vec::new(),
    }
}

fn wire_seeds() -> Vec<Vec<u8>> {
    let mut frames: Vec<Vec<u8>> = std::iter::once(Frame::Hello(Hello::current()))
        .chain(membership_messages().into_iter().map(Frame::Membership))
        .map(|frame| frame.encode_frame().expect("seed frame encodes"))
        .collect();
    // A stream: a hello, then membership messages.
    frames.push(frames.concat());
    let jobs: Vec<Vec<u8>> = job_frames()
        .iter()
        .map(|frame| frame.encode_frame().expect("seed frame encodes"))
        .collect();
    frames.push(jobs.concat());
    let kind = Frame::KIND_HELLO;
    frames.push(
        [
            &[kind][..],
            &postcard::to_stdvec(&Hello::current()).expect("seed encodes"),
        ]
        .concat(),
    );
    frames.push(
        [
            &[kind][..],
            &postcard::to_stdvec(&SocketAddr::from(([10, 0, 0, 1], 4000))).expect("seed encodes"),
        ]
        .concat(),
    );
    // Overlay links: each kind of overlay message alone, then a stream of them after a hello.
    let overlay: Vec<Vec<u8>> = overlay_messages()
        .into_iter()
        .map(|msg| {
            Frame::Overlay(msg)
                .encode_frame()
                .expect("seed frame encodes")
        })
        .collect();
    let stream = [
        Frame::Hello(Hello::current())
            .encode_frame()
            .expect("seed frame encodes"),
        overlay.concat(),
    ]
    .concat();
    frames.extend(overlay);
    frames.push(stream);
    // The overlay's other frames: job adverts' broadcast, and survey questions and answers.
    let more: Vec<Vec<u8>> = broadcast_messages()
        .into_iter()
        .map(Frame::Broadcast)
        .chain(survey_messages().into_iter().map(Frame::Survey))
        .chain(relay_messages().into_iter().map(Frame::Relay))
        .map(|frame| frame.encode_frame().expect("seed frame encodes"))
        .collect();
    frames.push(more.concat());
    frames.extend(more);
    frames
}

fn broadcast_messages() -> Vec<crate::overlay::broadcast::BroadcastMessage> {
    use crate::job_advert::JobAdvert;
    use crate::overlay::broadcast::BroadcastMessage;

    let identity = crate::identity::Identity::generate().expect("an identity can be generated");
    let mut advert = JobAdvert {
        submitter: identity.id(),
        addrs: vec![SocketAddr::from(([192, 0, 2, 10], 7401))],
        job: crate::digest::Digest::of(b"a job"),
        profile: crate::sandbox::PROFILE_VERSION,
        memory_bytes: 64 << 20,
        wanted: 64,
        network_size: 5_000,
        issued: 1_765_000_000_000,
        expires: 1_765_000_060_000,
        relay: Some(crate::relay::RelayRef {
            peer: crate::peer_id::PeerId::from_bytes([9; 32]),
            addr: SocketAddr::from(([198, 51, 100, 1], 7401)),
        }),
        signature: crate::overlay::Signature::default(),
    };
    advert.sign(|bytes| identity.sign(bytes));
    let payload = advert.encode();
    let id = JobAdvert::id_of(&payload);
    vec![
        BroadcastMessage::Gossip {
            id,
            expires: advert.expires,
            round: 2,
            payload,
        },
        BroadcastMessage::IHave {
            ids: vec![(id, 3), ([7; 32], 1)],
        },
        BroadcastMessage::Graft { id },
        BroadcastMessage::Prune,
    ]
}

fn relay_messages() -> Vec<crate::relay::RelayMessage> {
    use crate::relay::{Refusal, RelayMessage};
    let addr = SocketAddr::from(([203, 0, 113, 5], 40_001));
    let peer = crate::peer_id::PeerId::from_bytes([3; 32]);
    vec![
        RelayMessage::Reserve,
        RelayMessage::Reserved {
            observed: addr,
            secs: 3600,
        },
        RelayMessage::Connect { target: peer },
        RelayMessage::Meet { target: peer, addr },
        RelayMessage::Introduce { from: peer, addr },
        RelayMessage::Refused(Refusal::NoReservation),
    ]
}

fn survey_messages() -> Vec<crate::survey::SurveyMessage> {
    use crate::overlay::{PeerInfo, PeerList};
    use crate::survey::{SurveyMessage, SurveyReply};

    let info = |n: u8| PeerInfo::new(sample_peer(n), SocketAddr::from(([192, 0, 2, n], 7401)), 0);
    vec![
        SurveyMessage::Request,
        SurveyMessage::Reply(SurveyReply {
            cores_donated: 4,
            cores_free: 2,
            memory_mb: 2048,
            profile: 1,
            job: Some(crate::digest::Digest::of(b"a job")),
            active: PeerList((1..=5).map(info).collect()),
            passive: PeerList((10..=29).map(info).collect()),
        }),
    ]
}

fn overlay_messages() -> Vec<crate::overlay::OverlayMessage> {
    use crate::overlay::{OverlayMessage, PeerInfo, PeerList, Priority, Seal};

    let identity = crate::identity::Identity::generate().expect("an identity can be generated");
    let seal = identity.advert_auth();
    let info = |n: u8| {
        let mut info = PeerInfo::new(
            sample_peer(n),
            SocketAddr::from(([192, 0, 2, n], 7401)),
            1_765_000_000_000 + u64::from(n),
        );
        info.signature = Seal::sign(&seal, &info);
        info
    };
    let mut own = PeerInfo::new(
        identity.id(),
        SocketAddr::from(([198, 51, 100, 7], 7401)),
        1_765_000_000_000,
    );
    own.signature = Seal::sign(&seal, &own);
    let some = PeerList((1..=4).map(info).collect());
    vec![
        OverlayMessage::Join { info: own },
        OverlayMessage::ForwardJoin {
            joiner: info(9),
            ttl: 6,
        },
        OverlayMessage::Neighbor {
            info: own,
            priority: Priority::Low,
        },
        OverlayMessage::NeighborReply {
            accepted: false,
            peers: some.clone(),
        },
        OverlayMessage::Refresh {
            info: own,
            peers: some.clone(),
        },
        OverlayMessage::Disconnect,
        OverlayMessage::Shuffle {
            nonce: 7,
            origin: own,
            ttl: 3,
            peers: some.clone(),
        },
        OverlayMessage::ShuffleReply {
            nonce: 7,
            peers: some,
        },
    ]
}

fn sample_peer(n: u8) -> PeerId {
    let mut bytes = [0x30u8; 32];
    bytes[0] = n;
    PeerId::from_bytes(bytes)
}

fn membership_messages() -> Vec<MembershipMessage> {
    use crate::membership::{Advert, Digest, DigestEntry, GossipedAdvert, SignedAdvert};

    let identity = crate::identity::Identity::generate().expect("an identity can be generated");
    let signed = |peer: PeerId, seq: u64, sign: bool| {
        let advert = Advert {
            peer,
            addrs: vec![
                SocketAddr::from(([192, 168, 1, 20], 4000)),
                SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, 4001)),
            ],
            cores_donated: 8,
            cores_free: 3,
            memory_mb: 4096,
            profile: 1,
            seq,
            job: seq
                .is_multiple_of(2)
                .then(|| crate::digest::Digest::of(b"job")),
        };
        if sign {
            SignedAdvert::sign(advert, &identity.advert_auth()).expect("seed advert signs")
        } else {
            SignedAdvert {
                advert,
                signature: vec![0x55; 64],
            }
        }
    };
    vec![
        MembershipMessage::Digest(Digest {
            start: None,
            end: None,
            entries: vec![
                DigestEntry {
                    peer: sample_peer(1),
                    seq: 5,
                },
                DigestEntry {
                    peer: FUZZ_LOCAL_PEER,
                    seq: 9,
                },
                DigestEntry {
                    peer: sample_peer(0x50),
                    seq: 1,
                },
            ],
        }),
        MembershipMessage::Digest(Digest {
            start: Some(sample_peer(1)),
            end: Some(sample_peer(0x80)),
            entries: vec![DigestEntry {
                peer: sample_peer(2),
                seq: 3,
            }],
        }),
        MembershipMessage::Adverts(vec![
            GossipedAdvert {
                signed: signed(identity.id(), 4, true),
                age_ms: 120,
                public_path: false,
            },
            GossipedAdvert {
                signed: signed(sample_peer(7), 11, false),
                age_ms: 0,
                public_path: true,
            },
            GossipedAdvert {
                signed: signed(FUZZ_LOCAL_PEER, 30, false),
                age_ms: 10,
                public_path: false,
            },
        ]),
        MembershipMessage::Request(vec![sample_peer(1), FUZZ_LOCAL_PEER]),
    ]
}

fn job_frames() -> Vec<JobFrame> {
    use crate::digest::Digest;
    use crate::job::proto::{InputRef, JobSpec, Offer, WireLease, WireResult};
    use crate::sandbox::{Limits, UnitError};
    use crate::schedule::LeaseId;

    let job = Digest::of(b"job");
    let blob = Digest::of(b"blob");
    let spec = JobSpec::new(Digest::of(b"module"), 4096, &Limits::default());
    vec![
        JobFrame::Offer(Offer {
            name: "test".into(),
            job,
            spec,
            leases: vec![
                WireLease {
                    id: LeaseId(1),
                    unit: 0,
                    attempt: 0,
                    ttl_ms: 60_000,
                    input: InputRef::Inline(b"{\"seed\":1}".to_vec()),
                },
                WireLease {
                    id: LeaseId(2),
                    unit: 1,
                    attempt: 1,
                    ttl_ms: 30_000,
                    input: InputRef::Blob {
                        digest: blob,
                        len: 1 << 20,
                    },
                },
            ],
        }),
        JobFrame::Revoke {
            job,
            leases: vec![LeaseId(1), LeaseId(300)],
        },
        JobFrame::Report {
            job,
            results: vec![
                WireResult {
                    lease: LeaseId(1),
                    result: Ok(b"[1,2,3]".to_vec()),
                },
                WireResult {
                    lease: LeaseId(2),
                    result: Err(UnitError::OutOfFuel { budget: 1000 }),
                },
                WireResult {
                    lease: LeaseId(3),
                    result: Err(UnitError::Host {
                        detail: "unit host exited".into(),
                    }),
                },
            ],
            want: 4,
        },
        JobFrame::Decline {
            job,
            leases: vec![LeaseId(2)],
        },
        JobFrame::BlobGet { digest: blob },
        JobFrame::BlobChunk {
            digest: blob,
            total: 10,
            offset: 4,
            bytes: b"chunk!".to_vec().into(),
        },
        JobFrame::BlobMissing { digest: blob },
        JobFrame::BlobAt {
            digest: blob,
            peer: sample_peer(9),
        },
    ]
}

#[cfg(unix)]
fn control_seeds() -> Vec<Vec<u8>> {
    use crate::control::{PeerStatus, StatusReport, WorkStatus};

    let report = StatusReport {
        id: sample_peer(1),
        listen: SocketAddr::from(([0, 0, 0, 0], 4000)),
        addrs: vec![SocketAddr::from(([192, 168, 1, 20], 4000))],
        cores_donated: 4,
        cores_free: 2,
        memory_mb: 2048,
        profile: 1,
        seq: 17,
        connections: 1,
        peers: vec![PeerStatus {
            id: sample_peer(2),
            addrs: vec![SocketAddr::from(([192, 168, 1, 21], 4000))],
            cores_donated: 8,
            cores_free: 8,
            memory_mb: 8192,
            profile: 1,
            seq: 3,
            connected: true,
            job: Some(crate::digest::Digest::of(b"job")),
            known_by: crate::control::KnownBy::Table,
        }],
        work: Some(WorkStatus {
            slots: 4,
            running: 2,
            queued: 1,
            completed: 10,
            submitters: 1,
            jobs: 1,
            ..WorkStatus::default()
        }),
        traffic: Default::default(),
        overlay: Some(crate::control::OverlayStatus {
            active: 4,
            passive: 21,
            adverts_heard: 2,
            adverts_relayed: 9,
            adverts_refused: 1,
            survey: Some(crate::control::SurveyCount {
                named: 30,
                answered: 28,
                complete: true,
                millis: 412,
            }),
            estimated_peers: Some(212),
            estimate_is_lower_bound: false,
            census_samples: 340,
        }),
        relay: crate::control::RelayStatus {
            serving: Some(crate::control::RelayServing {
                reservations: 12,
                circuits: 1,
                links: 14,
            }),
            via: Some(crate::control::RelayVia {
                relay: SocketAddr::from(([198, 51, 100, 10], 7401)),
                observed: Some(SocketAddr::from(([203, 0, 113, 2], 40_012))),
            }),
        },
    };
    vec![
        b"status\n".to_vec(),
        b"  status  \r\nextra".to_vec(),
        b"peers\n".to_vec(),
        serde_json::to_vec(&report).expect("seed report serialises"),
        br#"{"error":"the peer is shutting down"}"#.to_vec(),
        b"status all\n".to_vec(),
    ]
}

#[cfg(not(unix))]
fn control_seeds() -> Vec<Vec<u8>> {
    Vec::new()
}

fn unit_host_seeds() -> Vec<Vec<u8>> {
    use crate::sandbox::host::{Batch, BatchUnit, Finished, FromHost, write_frame};
    use crate::sandbox::{Limits, LogLevel, LogLine, Metering, UnitError};

    let limits = Limits {
        fuel: Some(1_000_000),
        ..Limits::default()
    };
    let batch = Batch {
        digest: crate::digest::Digest::of(b"\0asm\x01\0\0\0"),
        module: Some(b"\0asm\x01\0\0\0"),
        metering: Metering::Fuel,
        report_start: true,
        units: vec![
            BatchUnit {
                input: b"{\"seed\":1}",
                checkpoint: None,
                limits: &limits,
            },
            BatchUnit {
                input: b"",
                checkpoint: Some(b"saved"),
                limits: &limits,
            },
        ],
    };
    let answers = [
        FromHost::NeedModule,
        FromHost::Started,
        FromHost::Log(LogLine {
            level: LogLevel::Info,
            text: "halfway".into(),
        }),
        FromHost::Progress(5, 10),
        FromHost::Checkpoint(b"saved".to_vec()),
        FromHost::Done(Box::new(Finished {
            result: Ok(b"42".to_vec()),
            progress: Some((10, 10)),
            logs_dropped: 0,
            fuel_consumed: Some(1234),
            elapsed: Duration::from_millis(15),
        })),
        FromHost::Done(Box::new(Finished {
            result: Err(UnitError::Timeout {
                limit: Duration::from_secs(1),
            }),
            progress: None,
            logs_dropped: 3,
            fuel_consumed: None,
            elapsed: Duration::from_secs(1),
        })),
    ];
    let mut seeds = Vec::new();
    let mut bytes = Vec::new();
    write_frame(&mut bytes, &batch).expect("seed batch fits a frame");
    seeds.push(bytes);
    let mut stream = Vec::new();
    for answer in &answers {
        let mut bytes = Vec::new();
        write_frame(&mut bytes, answer).expect("seed answer fits a frame");
        stream.extend_from_slice(&bytes);
        seeds.push(bytes);
    }
    seeds.push(stream);
    seeds
}

const MANIFEST_SEEDS: &[&str] = &[
    r#"name = "sir-sweep"
module = "sir.wasm"

[inputs.sweep]
beta = { start = 0.1, stop = 0.5, step = 0.1 }
gamma = [0.05, 0.1, 0.2, 0.25]
x = { start = 0.0, stop = 1.0, count = 11 }
days = 365
label = "run"
flag = true

[redundancy]
replicas = 2
quorum = 2
max_attempts = 5

[limits]
memory_mb = 64
timeout_secs = 30
fuel = 1000000000
"#,
    r#"name = "pi-monte-carlo"
module = "../pi.wasm"

[inputs.sweep]
seed = { start = 1, stop = 200, step = 1 }
samples = 10000000
"#,
    r#"name = "primes"
module = "/opt/primes.wasm"

[inputs]
jsonl = "primes-ranges.jsonl"

[redundancy]
replicas = 3
"#,
    r#"name = "files.v2"
module = "m.wasm"
inputs = { files = ["a.json", "b/c.json"] }
"#,
    r#"name = "dir_job"
module = "m.wasm"
[inputs]
dir = "inputs/"
[limits]
timeout_secs = 0.5
"#,
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_target_takes_its_seeds() {
        for (name, target) in TARGETS {
            let seeds = seeds(name);
            assert!(!seeds.is_empty(), "{name} has no seeds");
            for seed in seeds {
                target(&seed);
            }
        }
    }

    /// The overlay seeds are frames the decoder takes (and so the round trip is checked on
    /// them), not ones it refuses at once.
    #[test]
    fn overlay_seeds_decode_as_overlay_frames() {
        let overlay = seeds("wire_frame")
            .iter()
            .filter_map(|seed| Frame::decode_frame(seed).ok())
            .filter(|(frame, _)| matches!(frame, Frame::Overlay(_)))
            .count();
        // One per kind; the stream of them starts with a hello.
        assert_eq!(overlay, overlay_messages().len());
        let decoded: Vec<Frame> = seeds("wire_frame")
            .iter()
            .filter_map(|seed| Frame::decode_frame(seed).ok().map(|(frame, _)| frame))
            .collect();
        let broadcast = decoded
            .iter()
            .filter(|f| matches!(f, Frame::Broadcast(_)))
            .count();
        let survey = decoded
            .iter()
            .filter(|f| matches!(f, Frame::Survey(_)))
            .count();
        // Each alone, and the first of the stream of them.
        assert_eq!(broadcast, broadcast_messages().len() + 1);
        assert_eq!(survey, survey_messages().len());
    }

    #[test]
    fn every_target_survives_empty_and_short_inputs() {
        for (_, target) in TARGETS {
            for input in [&b""[..], b"\0", b"\x01\0\0\0\0", b"\xff\xff\xff\xff\xff"] {
                target(input);
            }
        }
    }
}
