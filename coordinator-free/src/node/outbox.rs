//! A link's queue of frames waiting for its writer, bounded in frames *and* in bytes, and the
//! writer that drains it with a deadline on every write.
//!
//! A frame count alone bounds nothing when frames may be a MiB each: a peer that stops
//! reading would pin the count times the largest frame. Frames are encoded when they are
//! queued, so their exact size is known and held against the link's byte budget until the
//! writer has handed them to QUIC; a sender that would go over waits (or, with `try_send`, is
//! told the link is full). A write that makes no progress for [`WRITE_TIMEOUT`] — the peer has
//! stopped reading and QUIC's flow control has closed — closes the connection, so a reader
//! that never reads cannot hold the budget, or the task, forever.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use quinn::VarInt;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc};

use crate::net::close;
use crate::wire::Message;

/// Longest a single frame's write may take before the link is given up.
pub(crate) const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a finished stream waits for the peer to read what is left.
const LINGER: Duration = Duration::from_secs(1);

/// Why a frame was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OutboxError {
    /// The queue holds its most frames or bytes.
    Full,
    /// The writer is gone.
    Closed,
    /// The frame could not be encoded (a local bug; the receiver would refuse it).
    Encode,
}

/// A frame as pieces handed to QUIC as they are (quinn takes `Bytes` without copying them): one
/// piece, or a chunk's header and its bytes.
type Queued = ([Bytes; 2], OwnedSemaphorePermit);

/// The sending side of a link's queue.
#[derive(Debug, Clone)]
pub(crate) struct Outbox {
    tx: mpsc::Sender<Queued>,
    budget: Arc<Semaphore>,
    max_bytes: u32,
    finish: Arc<Notify>,
}

/// The receiving side of a link's queue, which [`write_loop`] drains.
#[derive(Debug)]
pub(crate) struct Inbox {
    rx: mpsc::Receiver<Queued>,
    finish: Arc<Notify>,
}

#[cfg(test)]
impl Inbox {
    pub(crate) async fn recv(&mut self) -> Option<Queued> {
        self.rx.recv().await
    }
}

impl Outbox {
    /// A queue of at most `frames` frames and `bytes` bytes, and its receiving end for
    /// [`write_loop`].
    pub(crate) fn new(frames: usize, bytes: u32) -> (Self, Inbox) {
        let (tx, rx) = mpsc::channel(frames.max(1));
        let max_bytes = bytes.max(1);
        let finish = Arc::new(Notify::new());
        (
            Self {
                tx,
                budget: Arc::new(Semaphore::new(max_bytes as usize)),
                max_bytes,
                finish: Arc::clone(&finish),
            },
            Inbox { rx, finish },
        )
    }

    /// Asks the writer to write what is queued now, finish the stream, wait for the peer to
    /// acknowledge all of it (at most [`LINGER`]) and close the connection, whoever else still
    /// holds this queue's sender.
    pub(crate) fn finish(&self) {
        self.finish.notify_one();
    }

    fn encode<M: Message>(&self, message: &M) -> Result<([Bytes; 2], u32), OutboxError> {
        let frame = message.encode_frame().map_err(|_| OutboxError::Encode)?;
        let frame = [Bytes::from(frame), Bytes::new()];
        let weight = self.weight(&frame);
        Ok((frame, weight))
    }

    /// A frame larger than the whole budget takes all of it.
    fn weight(&self, frame: &[Bytes; 2]) -> u32 {
        u32::try_from(frame[0].len() + frame[1].len())
            .unwrap_or(u32::MAX)
            .clamp(1, self.max_bytes)
    }

    /// Queues `message` if there is room now.
    pub(crate) fn try_send<M: Message>(&self, message: &M) -> Result<(), OutboxError> {
        let (frame, weight) = self.encode(message)?;
        let permit = match Arc::clone(&self.budget).try_acquire_many_owned(weight) {
            Ok(permit) => permit,
            Err(tokio::sync::TryAcquireError::NoPermits) => return Err(OutboxError::Full),
            Err(tokio::sync::TryAcquireError::Closed) => return Err(OutboxError::Closed),
        };
        self.tx.try_send((frame, permit)).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => OutboxError::Full,
            mpsc::error::TrySendError::Closed(_) => OutboxError::Closed,
        })
    }

    /// Queues `message`, waiting for room.
    pub(crate) async fn send<M: Message>(&self, message: &M) -> Result<(), OutboxError> {
        let (frame, weight) = self.encode(message)?;
        self.send_weighed(frame, weight).await
    }

    /// Queues a frame encoded already (a blob chunk written straight from its bytes), waiting
    /// for room.
    pub(crate) async fn send_frame(&self, frame: [Bytes; 2]) -> Result<(), OutboxError> {
        let weight = self.weight(&frame);
        self.send_weighed(frame, weight).await
    }

    async fn send_weighed(&self, frame: [Bytes; 2], weight: u32) -> Result<(), OutboxError> {
        let permit = Arc::clone(&self.budget)
            .acquire_many_owned(weight)
            .await
            .map_err(|_| OutboxError::Closed)?;
        self.tx
            .send((frame, permit))
            .await
            .map_err(|_| OutboxError::Closed)
    }

    /// Bytes queued and not yet handed to QUIC.
    #[cfg(test)]
    pub(crate) fn queued_bytes(&self) -> usize {
        self.max_bytes as usize - self.budget.available_permits()
    }
}

/// Writes the queued frames in order. When every sender is dropped, or one asks it to
/// ([`Outbox::finish`]), writes what is queued, finishes the stream, waits briefly for the peer
/// to acknowledge it and closes the connection. A write that takes longer than
/// [`WRITE_TIMEOUT`] closes the connection at once.
pub(crate) async fn write_loop(conn: quinn::Connection, mut send: quinn::SendStream, queue: Inbox) {
    let Inbox { mut rx, finish } = queue;
    loop {
        let next = tokio::select! {
            // What was queued before the ask is written first.
            biased;
            next = rx.recv() => next,
            () = finish.notified() => {
                rx.close();
                rx.recv().await
            }
        };
        let Some((mut frame, permit)) = next else {
            break;
        };
        match tokio::time::timeout(WRITE_TIMEOUT, send.write_all_chunks(&mut frame)).await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => {
                tracing::debug!(%err, "write failed");
                return;
            }
            Err(_) => {
                tracing::info!("peer stopped reading; link closed");
                conn.close(VarInt::from_u32(close::PROTOCOL), b"write timed out");
                return;
            }
        }
        drop(permit);
    }
    let _ = send.finish();
    let _ = tokio::time::timeout(LINGER, send.stopped()).await;
    conn.close(VarInt::from_u32(close::NORMAL), b"bye");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::Digest;
    use crate::job::proto::JobFrame;

    fn chunk(len: usize) -> JobFrame {
        JobFrame::BlobChunk {
            digest: Digest::of(b"x"),
            total: len as u64,
            offset: 0,
            bytes: vec![7; len].into(),
        }
    }

    #[tokio::test]
    async fn the_queue_is_bounded_in_bytes_not_only_in_frames() {
        let (outbox, mut rx) = Outbox::new(256, 4 << 20);
        for _ in 0..3 {
            outbox
                .try_send(&chunk(1 << 20))
                .expect("room for three chunks");
        }
        // Far fewer frames than the count allows, but the bytes are spent.
        assert_eq!(outbox.try_send(&chunk(1 << 20)), Err(OutboxError::Full));
        assert!(outbox.queued_bytes() <= 4 << 20);
        // A sender that waits is let through once the writer took a frame.
        let waiting = {
            let outbox = outbox.clone();
            tokio::spawn(async move { outbox.send(&chunk(1 << 20)).await })
        };
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        drop(rx.recv().await.expect("a queued frame"));
        assert_eq!(waiting.await.expect("task"), Ok(()));
    }

    #[tokio::test]
    async fn a_frame_larger_than_the_budget_still_goes_alone() {
        let (outbox, mut rx) = Outbox::new(4, 1 << 20);
        outbox
            .try_send(&chunk(1 << 20))
            .expect("takes the whole budget");
        assert_eq!(outbox.try_send(&chunk(10)), Err(OutboxError::Full));
        drop(rx.recv().await);
        outbox.try_send(&chunk(10)).expect("room again");
    }

    /// Asked to finish, the writer writes every frame queued before the ask and finishes the
    /// stream, though a sender is still held; the reader gets them all, then the stream's end.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_finished_queue_is_written_out_and_its_stream_ends() {
        use crate::identity::Identity;
        use crate::net::{self, LinkKind, NetConfig};

        let config = NetConfig::default();
        let (a, b) = (Identity::generate().unwrap(), Identity::generate().unwrap());
        let any = "127.0.0.1:0".parse().unwrap();
        let a_end = net::endpoint(&a, None, any, &config).unwrap();
        let b_end = net::endpoint(&b, None, any, &config).unwrap();
        let at = b_end.local_addr().unwrap();
        let accepting = tokio::spawn(async move {
            let incoming = b_end.accept().await.expect("incoming");
            (net::accept(incoming, &NetConfig::default()).await, b_end)
        });
        let link = net::dial_for(&a_end, &a, None, at, Some(b.id()), &config, LinkKind::Job)
            .await
            .expect("dialed");
        let (accepted, _b_end) = accepting.await.unwrap();
        let mut accepted = accepted.expect("accepted");

        let (outbox, inbox) = Outbox::new(16, 1 << 20);
        for len in [10, 20, 30] {
            outbox.try_send(&chunk(len)).expect("room");
        }
        outbox.finish();
        let writer = tokio::spawn(write_loop(link.conn.clone(), link.send, inbox));
        let mut lens = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), async {
            while let Some(frame) = crate::wire::read::<JobFrame, _>(&mut accepted.recv)
                .await
                .expect("a frame or the end")
            {
                if let JobFrame::BlobChunk { bytes, .. } = frame {
                    lens.push(bytes.len());
                }
            }
        })
        .await;
        assert!(read.is_ok(), "the stream ended");
        assert_eq!(lens, [10, 20, 30]);
        tokio::time::timeout(Duration::from_secs(5), writer)
            .await
            .expect("the writer ended")
            .expect("task");
        // The sender is still held, and the queue takes no more.
        assert_eq!(outbox.try_send(&chunk(1)), Err(OutboxError::Closed));
    }
}
