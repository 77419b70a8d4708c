//! A relay's circuit as a UDP socket for quinn: the datagrams of one QUIC connection between
//! two peers travel as [`RelayMessage::Data`] frames over each peer's link to the relay, so the
//! connection is end-to-end encrypted and authenticated exactly like a direct one (the relay
//! sees only sealed packets) and the rest of the node cannot tell the two apart.

use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller, VarInt};
use tokio::sync::mpsc;

use crate::net::{PeerLink, close};
use crate::relay::{MAX_CIRCUIT_DATAGRAM, RelayMessage};
use crate::wire::{self, Frame};

/// Datagrams queued each way; more are dropped, as a full router queue drops them.
const QUEUE: usize = 256;

/// One end of a circuit, as quinn sees it: a socket with one remote, `remote`.
pub(super) struct CircuitSocket {
    remote: SocketAddr,
    out: mpsc::Sender<Vec<u8>>,
    incoming: Mutex<mpsc::Receiver<Vec<u8>>>,
}

impl fmt::Debug for CircuitSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitSocket")
            .field("remote", &self.remote)
            .finish_non_exhaustive()
    }
}

/// Turns `link`, a relay link whose circuit is open, into a socket that reaches `remote` (the
/// other end, named by the address the relay saw it at). The link lives while the socket does.
pub(super) fn carry(link: PeerLink, remote: SocketAddr) -> Arc<CircuitSocket> {
    let (out, mut outgoing) = mpsc::channel::<Vec<u8>>(QUEUE);
    let (arrived, incoming) = mpsc::channel::<Vec<u8>>(QUEUE);
    let PeerLink {
        conn,
        mut send,
        mut recv,
        ..
    } = link;
    let writer_conn = conn.clone();
    tokio::spawn(async move {
        while let Some(datagram) = outgoing.recv().await {
            if wire::write(&mut send, &Frame::Relay(RelayMessage::Data(datagram)))
                .await
                .is_err()
            {
                break;
            }
        }
        // The endpoint over the socket is gone (or the link broke): so is the circuit.
        writer_conn.close(VarInt::from_u32(close::NORMAL), b"circuit done");
    });
    tokio::spawn(async move {
        while let Ok(Some(Frame::Relay(RelayMessage::Data(datagram)))) =
            wire::read::<Frame, _>(&mut recv).await
        {
            match arrived.try_send(datagram) {
                Ok(()) | Err(mpsc::error::TrySendError::Full(_)) => {}
                Err(mpsc::error::TrySendError::Closed(_)) => break,
            }
        }
        conn.close(VarInt::from_u32(close::NORMAL), b"circuit done");
    });
    Arc::new(CircuitSocket {
        remote,
        out,
        incoming: Mutex::new(incoming),
    })
}

/// A circuit is always writable: a datagram that finds the queue full is dropped.
#[derive(Debug)]
struct Writable;

impl UdpPoller for Writable {
    fn poll_writable(self: Pin<&mut Self>, _cx: &mut Context) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl AsyncUdpSocket for CircuitSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Box::pin(Writable)
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        // One datagram per transmit (no segmentation offload here); a larger one is dropped
        // as an oversized datagram would be on a path.
        if transmit.contents.len() <= MAX_CIRCUIT_DATAGRAM {
            let _ = self.out.try_send(transmit.contents.to_vec());
        }
        Ok(())
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let (Some(buf), Some(slot)) = (bufs.first_mut(), meta.first_mut()) else {
            return Poll::Ready(Ok(0));
        };
        let mut incoming = self.incoming.lock().unwrap_or_else(|p| p.into_inner());
        match incoming.poll_recv(cx) {
            Poll::Ready(Some(datagram)) => {
                let len = datagram.len().min(buf.len());
                buf[..len].copy_from_slice(&datagram[..len]);
                *slot = RecvMeta {
                    addr: self.remote,
                    len,
                    stride: len,
                    ecn: None,
                    dst_ip: None,
                };
                Poll::Ready(Ok(1))
            }
            // The circuit ended: nothing more arrives, and the connection times out.
            Poll::Ready(None) | Poll::Pending => Poll::Pending,
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    fn may_fragment(&self) -> bool {
        true
    }
}
