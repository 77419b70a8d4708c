//! Framing and typed messages between peers (and between `worker status` and its peer).
//!
//! A frame is a one-byte kind, a four-byte big-endian payload length, and a postcard payload.
//! The kind comes first so that the length can be checked against that kind's own cap before a
//! single payload byte is read: a peer cannot make us buffer more than the largest message of
//! the kind it claims to send. Unknown kinds, lengths over the cap, payloads that do not decode
//! or leave trailing bytes are errors that end the stream; nothing here panics on input.
//!
//! On a peer connection each side opens one unidirectional stream and sends a [`Hello`]
//! first; the receiver checks the protocol version before reading anything else.

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::membership::{MAX_MESSAGE_BYTES, MembershipMessage, MessageError};

/// The peer protocol version. The ALPN id carries the same number.
pub const PROTOCOL_VERSION: u16 = 2;
/// Bytes before the payload: kind and length.
pub const HEADER_LEN: usize = 5;
/// Largest [`Hello`] payload.
pub const MAX_HELLO_BYTES: usize = 64;

/// Why a frame was refused or could not be moved.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("unknown frame kind {kind}")]
    UnknownKind { kind: u8 },
    #[error("frame of kind {kind} claims {len} bytes, the cap is {cap}")]
    TooLarge { kind: u8, len: usize, cap: usize },
    #[error("malformed payload in frame of kind {kind}")]
    Malformed {
        kind: u8,
        #[source]
        source: postcard::Error,
    },
    #[error("frame of kind {kind} has {trailing} trailing bytes")]
    Trailing { kind: u8, trailing: usize },
    #[error("invalid message of kind {kind}: {reason}")]
    Invalid { kind: u8, reason: &'static str },
    #[error("invalid membership message")]
    Membership(#[source] MessageError),
    #[error("malformed overlay message")]
    Overlay(#[source] crate::overlay::MessageError),
    #[error("stream ended inside a frame")]
    Truncated,
    #[error("cannot encode a frame")]
    Encode(#[source] postcard::Error),
    #[error("stream error")]
    Io(#[from] std::io::Error),
}

/// A message type that travels in frames: which kinds it owns, and each kind's cap.
pub trait Message: Sized {
    /// The cap of `kind`'s payload, or `None` if the kind is not one of this type's.
    fn cap(kind: u8) -> Option<usize>;
    /// Kind and payload bytes.
    fn encode_payload(&self) -> Result<(u8, Vec<u8>), WireError>;
    /// Decodes a payload whose kind is known and whose length is within the cap.
    fn decode_payload(kind: u8, payload: &[u8]) -> Result<Self, WireError>;
    /// [`Message::decode_payload`] of a payload read into a buffer of its own: a kind that
    /// carries bulk bytes may keep them in that buffer rather than copy them out.
    fn decode_owned(kind: u8, payload: Vec<u8>) -> Result<Self, WireError> {
        Self::decode_payload(kind, &payload)
    }

    /// The whole frame.
    fn encode_frame(&self) -> Result<Vec<u8>, WireError> {
        let (kind, payload) = self.encode_payload()?;
        let cap = Self::cap(kind).unwrap_or(0);
        if payload.len() > cap {
            // Our own message over a cap is a bug here, but the receiver would refuse it.
            return Err(WireError::TooLarge {
                kind,
                len: payload.len(),
                cap,
            });
        }
        let len = u32::try_from(payload.len()).map_err(|_| WireError::TooLarge {
            kind,
            len: payload.len(),
            cap,
        })?;
        let mut frame = Vec::with_capacity(HEADER_LEN + payload.len());
        frame.push(kind);
        frame.extend_from_slice(&len.to_be_bytes());
        frame.extend_from_slice(&payload);
        Ok(frame)
    }

    /// Decodes one frame at the start of `bytes`; returns it and how many bytes it took.
    fn decode_frame(bytes: &[u8]) -> Result<(Self, usize), WireError> {
        let header: [u8; HEADER_LEN] = bytes
            .get(..HEADER_LEN)
            .and_then(|h| h.try_into().ok())
            .ok_or(WireError::Truncated)?;
        let (kind, len) = check_header::<Self>(header)?;
        let payload = bytes
            .get(HEADER_LEN..HEADER_LEN + len)
            .ok_or(WireError::Truncated)?;
        Ok((Self::decode_payload(kind, payload)?, HEADER_LEN + len))
    }
}

fn check_header<M: Message>(header: [u8; HEADER_LEN]) -> Result<(u8, usize), WireError> {
    let kind = header[0];
    let cap = M::cap(kind).ok_or(WireError::UnknownKind { kind })?;
    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
    if len > cap {
        return Err(WireError::TooLarge { kind, len, cap });
    }
    Ok((kind, len))
}

/// Postcard decoding that refuses trailing bytes, so a payload holds exactly one message.
///
/// It does not make encodings unique: postcard also accepts over-long varints (`81 00` for 1),
/// so nothing may rely on a message's bytes, only on its decoded value. Adverts are signed and
/// verified over their re-encoding for that reason.
pub fn decode_exact<'a, T: Deserialize<'a>>(kind: u8, payload: &'a [u8]) -> Result<T, WireError> {
    let (value, rest) = postcard::take_from_bytes(payload)
        .map_err(|source| WireError::Malformed { kind, source })?;
    if !rest.is_empty() {
        return Err(WireError::Trailing {
            kind,
            trailing: rest.len(),
        });
    }
    Ok(value)
}

/// Reads one frame. `Ok(None)` means the stream ended cleanly between frames.
pub async fn read<M: Message, R: AsyncRead + Unpin>(
    reader: &mut R,
) -> Result<Option<M>, WireError> {
    let mut header = [0u8; HEADER_LEN];
    // Read the first byte alone so a clean end of stream is told apart from a cut frame.
    if reader.read(&mut header[..1]).await? == 0 {
        return Ok(None);
    }
    reader
        .read_exact(&mut header[1..])
        .await
        .map_err(truncated)?;
    let (kind, len) = check_header::<M>(header)?;
    // The buffer is set aside at once up to `READ_AHEAD`, and beyond that grows with the bytes
    // that arrive, not with what the header claims: a peer that announces a large frame and
    // sends nothing holds `READ_AHEAD`, not the kind's cap. Reading into spare capacity,
    // exactly to the frame's end, writes each byte once; a blob chunk as we send them fits the
    // first buffer whole.
    let mut payload = Vec::with_capacity(len.min(READ_AHEAD));
    while payload.len() < len {
        if payload.len() == payload.capacity() {
            payload.reserve((len - payload.len()).min(payload.capacity()));
        }
        let want = (len - payload.len()) as u64;
        if (&mut *reader).take(want).read_buf(&mut payload).await? == 0 {
            return Err(WireError::Truncated);
        }
    }
    M::decode_owned(kind, payload).map(Some)
}

/// What a frame's buffer starts at before its bytes arrive.
pub const READ_AHEAD: usize = 128 << 10;

fn truncated(err: std::io::Error) -> WireError {
    if err.kind() == std::io::ErrorKind::UnexpectedEof {
        WireError::Truncated
    } else {
        WireError::Io(err)
    }
}

/// Writes one frame.
pub async fn write<M: Message, W: AsyncWrite + Unpin>(
    writer: &mut W,
    message: &M,
) -> Result<(), WireError> {
    let frame = message.encode_frame()?;
    writer.write_all(&frame).await?;
    Ok(())
}

/// The first frame on every peer stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub version: u16,
}

impl Hello {
    pub fn current() -> Self {
        Self {
            version: PROTOCOL_VERSION,
        }
    }
}

/// Everything a peer may send on its stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Hello(Hello),
    Membership(MembershipMessage),
    /// A partial-view overlay message, on an overlay link.
    Overlay(crate::overlay::OverlayMessage),
    /// A job advert's broadcast (PlumTree) message, on an overlay link.
    Broadcast(crate::overlay::broadcast::BroadcastMessage),
    /// A survey question or answer, on a survey link.
    Survey(crate::survey::SurveyMessage),
    /// A reservation or introduction, on a relay link.
    Relay(crate::relay::RelayMessage),
}

impl Frame {
    pub const KIND_HELLO: u8 = 1;
    pub const KIND_MEMBERSHIP: u8 = 2;
    pub const KIND_OVERLAY: u8 = 3;
    pub const KIND_BROADCAST: u8 = 4;
    pub const KIND_SURVEY: u8 = 5;
    pub const KIND_RELAY: u8 = 6;
}

impl Message for Frame {
    fn cap(kind: u8) -> Option<usize> {
        match kind {
            Self::KIND_HELLO => Some(MAX_HELLO_BYTES),
            Self::KIND_MEMBERSHIP => Some(MAX_MESSAGE_BYTES),
            Self::KIND_OVERLAY | Self::KIND_BROADCAST | Self::KIND_SURVEY | Self::KIND_RELAY => {
                Some(crate::overlay::MAX_MESSAGE_BYTES)
            }
            _ => None,
        }
    }

    fn encode_payload(&self) -> Result<(u8, Vec<u8>), WireError> {
        match self {
            Frame::Hello(hello) => Ok((
                Self::KIND_HELLO,
                postcard::to_stdvec(hello).map_err(WireError::Encode)?,
            )),
            Frame::Membership(msg) => Ok((
                Self::KIND_MEMBERSHIP,
                msg.encode().map_err(WireError::Membership)?,
            )),
            Frame::Overlay(msg) => Ok((
                Self::KIND_OVERLAY,
                msg.encode().map_err(WireError::Overlay)?,
            )),
            Frame::Broadcast(msg) => Ok((
                Self::KIND_BROADCAST,
                msg.encode().map_err(WireError::Overlay)?,
            )),
            Frame::Survey(msg) => {
                Ok((Self::KIND_SURVEY, msg.encode().map_err(WireError::Overlay)?))
            }
            Frame::Relay(msg) => Ok((Self::KIND_RELAY, msg.encode().map_err(WireError::Overlay)?)),
        }
    }

    fn decode_payload(kind: u8, payload: &[u8]) -> Result<Self, WireError> {
        match kind {
            Self::KIND_HELLO => decode_exact(kind, payload).map(Frame::Hello),
            Self::KIND_MEMBERSHIP => MembershipMessage::decode(payload)
                .map(Frame::Membership)
                .map_err(WireError::Membership),
            Self::KIND_OVERLAY => crate::overlay::OverlayMessage::decode(payload)
                .map(Frame::Overlay)
                .map_err(WireError::Overlay),
            Self::KIND_BROADCAST => crate::overlay::broadcast::BroadcastMessage::decode(payload)
                .map(Frame::Broadcast)
                .map_err(WireError::Overlay),
            Self::KIND_SURVEY => crate::survey::SurveyMessage::decode(payload)
                .map(Frame::Survey)
                .map_err(WireError::Overlay),
            Self::KIND_RELAY => crate::relay::RelayMessage::decode(payload)
                .map(Frame::Relay)
                .map_err(WireError::Overlay),
            _ => Err(WireError::UnknownKind { kind }),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use proptest::prelude::*;

    use super::*;
    use crate::membership::{
        Advert, Digest, DigestEntry, GossipedAdvert, MAX_ADVERT_ADDRS, MAX_ADVERTS_PER_MESSAGE,
        MAX_DIGEST_ENTRIES, SignedAdvert,
    };
    use crate::peer_id::PeerId;

    fn peer_id() -> impl Strategy<Value = PeerId> {
        any::<[u8; 32]>().prop_map(PeerId::from_bytes)
    }

    fn addr() -> impl Strategy<Value = SocketAddr> {
        (any::<[u8; 4]>(), 1u16..).prop_map(|(ip, port)| SocketAddr::from((ip, port)))
    }

    fn advert() -> impl Strategy<Value = GossipedAdvert> {
        (
            peer_id(),
            proptest::collection::vec(addr(), 0..MAX_ADVERT_ADDRS),
            any::<(u16, u16, u32, u32, u64)>(),
            proptest::collection::vec(any::<u8>(), 64),
            any::<u32>(),
        )
            .prop_map(
                |(peer, addrs, (donated, free, mem, profile, seq), signature, age_ms)| {
                    GossipedAdvert {
                        signed: SignedAdvert {
                            advert: Advert {
                                peer,
                                addrs,
                                cores_donated: donated,
                                cores_free: free,
                                memory_mb: mem,
                                profile,
                                seq,
                                job: None,
                            },
                            signature,
                        },
                        age_ms,
                        public_path: seq % 2 == 0,
                    }
                },
            )
    }

    fn membership() -> impl Strategy<Value = MembershipMessage> {
        prop_oneof![
            // Digests must be sorted by peer to be valid; a map gives exactly that.
            proptest::collection::btree_map(peer_id(), any::<u64>(), 0..MAX_DIGEST_ENTRIES)
                .prop_map(|entries| MembershipMessage::Digest(Digest {
                    start: None,
                    end: None,
                    entries: entries
                        .into_iter()
                        .map(|(peer, seq)| DigestEntry { peer, seq })
                        .collect(),
                })),
            proptest::collection::vec(advert(), 0..MAX_ADVERTS_PER_MESSAGE)
                .prop_map(MembershipMessage::Adverts),
            proptest::collection::vec(peer_id(), 0..64).prop_map(MembershipMessage::Request),
        ]
    }

    fn frame() -> impl Strategy<Value = Frame> {
        prop_oneof![
            any::<u16>().prop_map(|version| Frame::Hello(Hello { version })),
            membership().prop_map(Frame::Membership),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn every_frame_round_trips(frame in frame()) {
            let bytes = frame.encode_frame().expect("encode");
            let (back, used) = Frame::decode_frame(&bytes).expect("decode");
            prop_assert_eq!(used, bytes.len());
            prop_assert_eq!(back, frame);
        }

        #[test]
        fn arbitrary_bytes_never_panic_the_frame_decoder(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = Frame::decode_frame(&bytes);
        }

        #[test]
        fn arbitrary_payloads_never_panic_any_kind(kind in 0u8..4, payload in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = Frame::decode_payload(kind, &payload);
        }

        #[test]
        fn arbitrary_streams_never_panic_the_reader(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let rt = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
            rt.block_on(async {
                let mut reader = &bytes[..];
                // Bounded: every successful read consumes at least a header.
                for _ in 0..bytes.len() + 1 {
                    match read::<Frame, _>(&mut reader).await {
                        Ok(Some(_)) => continue,
                        Ok(None) | Err(_) => break,
                    }
                }
            });
        }
    }

    #[test]
    fn oversized_length_is_refused_before_reading_the_payload() {
        let mut header = vec![Frame::KIND_MEMBERSHIP];
        header.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(
            Frame::decode_frame(&header),
            Err(WireError::TooLarge { .. })
        ));
        let mut hello = vec![Frame::KIND_HELLO];
        hello.extend_from_slice(&((MAX_HELLO_BYTES as u32) + 1).to_be_bytes());
        assert!(matches!(
            Frame::decode_frame(&hello),
            Err(WireError::TooLarge { .. })
        ));
    }

    #[test]
    fn unknown_kind_and_trailing_bytes_are_refused() {
        assert!(matches!(
            Frame::decode_frame(&[9, 0, 0, 0, 0]),
            Err(WireError::UnknownKind { kind: 9 })
        ));
        let mut frame = Frame::Hello(Hello::current())
            .encode_frame()
            .expect("encode");
        frame.push(0);
        frame[4] += 1;
        assert!(matches!(
            Frame::decode_frame(&frame),
            Err(WireError::Trailing { .. })
        ));
    }

    #[test]
    fn over_long_varints_decode_to_the_same_value() {
        let short = decode_exact::<Hello>(Frame::KIND_HELLO, &[1]).expect("canonical");
        let long = decode_exact::<Hello>(Frame::KIND_HELLO, &[0x81, 0x00]).expect("over-long");
        assert_eq!(short, long);
        assert_eq!(postcard::to_stdvec(&long).expect("encode"), [1]);
    }

    #[tokio::test]
    async fn clean_end_of_stream_is_none_and_a_cut_frame_is_an_error() {
        let frame = Frame::Hello(Hello::current())
            .encode_frame()
            .expect("encode");
        let mut whole = &frame[..];
        assert!(matches!(read::<Frame, _>(&mut whole).await, Ok(Some(_))));
        assert!(matches!(read::<Frame, _>(&mut whole).await, Ok(None)));
        let mut cut = &frame[..frame.len() - 1];
        assert!(matches!(
            read::<Frame, _>(&mut cut).await,
            Err(WireError::Truncated)
        ));
    }
}
