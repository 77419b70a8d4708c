//! Surveys over real links (`crate::survey`): answering one on a survey link, and walking the
//! overlay breadth first for `worker status --all`.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use quinn::VarInt;
use tokio::task::JoinSet;

use super::JobDialer;
use crate::control::{KnownBy, PeerStatus, SurveyCount};
use crate::net::{LinkKind, PeerLink, close};
use crate::peer_id::PeerId;
use crate::survey::{
    MAX_SURVEY_PEERS, SURVEY_PARALLEL, SURVEY_TIME, SurveyMessage, SurveyReply, Walk,
};
use crate::wire::{self, Frame};

/// Survey questions answered per second, and in a burst: a lab's walk asks each peer once;
/// more than this is someone using peers' answers as a flood.
pub(super) const ANSWER_RATE: f64 = 20.0;
pub(super) const ANSWER_BURST: f64 = 20.0;
/// How long an asker has to send its question, and an answer to be acknowledged.
const ANSWER_WAIT: Duration = Duration::from_secs(2);
/// How long one peer may take to be dialed and answer.
const ASK_WAIT: Duration = Duration::from_secs(3);

/// Answers one survey link with `reply`, then closes it.
pub(super) async fn answer(mut link: PeerLink, reply: SurveyReply) {
    let question = tokio::time::timeout(ANSWER_WAIT, wire::read::<Frame, _>(&mut link.recv)).await;
    if let Ok(Ok(Some(Frame::Survey(SurveyMessage::Request)))) = question {
        let answer = Frame::Survey(SurveyMessage::Reply(reply));
        if wire::write(&mut link.send, &answer).await.is_ok() {
            let _ = link.send.finish();
            let _ = tokio::time::timeout(ANSWER_WAIT, link.send.stopped()).await;
        }
    }
    link.conn
        .close(VarInt::from_u32(close::NORMAL), b"answered");
}

/// Asks `peer` at `addr`; its answer, if it gave one in time.
async fn ask(dialer: &JobDialer, peer: PeerId, addr: SocketAddr) -> Option<SurveyReply> {
    tokio::time::timeout(ASK_WAIT, async {
        let mut link = dialer.dial(addr, peer, LinkKind::Survey).await.ok()?;
        wire::write(&mut link.send, &Frame::Survey(SurveyMessage::Request))
            .await
            .ok()?;
        let _ = link.send.finish();
        let reply = match wire::read::<Frame, _>(&mut link.recv).await {
            Ok(Some(Frame::Survey(SurveyMessage::Reply(reply)))) => Some(reply),
            _ => None,
        };
        link.conn.close(VarInt::from_u32(close::NORMAL), b"thanks");
        reply
    })
    .await
    .ok()
    .flatten()
}

/// Walks the overlay from this peer's views (`seeds`); the peers that answered, as status
/// entries (`active` are this peer's neighbours), and the walk's counts.
pub(super) async fn walk(
    dialer: JobDialer,
    me: PeerId,
    seeds: Vec<(PeerId, SocketAddr)>,
    active: Vec<PeerId>,
) -> (Vec<PeerStatus>, SurveyCount) {
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + SURVEY_TIME;
    let mut walk = Walk::new(me, seeds, MAX_SURVEY_PEERS);
    let mut asking = JoinSet::new();
    loop {
        while let Some((peer, addr)) = walk.next(SURVEY_PARALLEL) {
            let d = dialer.clone();
            asking.spawn(async move { (peer, ask(&d, peer, addr).await) });
        }
        if walk.done() {
            break;
        }
        match tokio::time::timeout_at(deadline, asking.join_next()).await {
            Ok(Some(Ok((peer, Some(reply))))) => walk.answered(peer, reply),
            Ok(Some(Ok((peer, None)))) => walk.failed(peer),
            // A task that ended without its peer (it cannot panic): the set empties anyway.
            Ok(Some(Err(_))) => {}
            Ok(None) | Err(_) => break,
        }
    }
    asking.abort_all();
    let count = SurveyCount {
        named: walk.found().len(),
        answered: walk.answered_count(),
        complete: walk.complete(),
        millis: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
    };
    let peers = walk
        .found()
        .iter()
        .filter_map(|(id, found)| {
            let reply = found.reply.as_ref()?;
            Some(PeerStatus {
                id: *id,
                addrs: vec![found.addr],
                cores_donated: reply.cores_donated,
                cores_free: reply.cores_free,
                memory_mb: reply.memory_mb,
                profile: reply.profile,
                seq: 0,
                connected: active.contains(id),
                job: reply.job,
                known_by: KnownBy::Survey,
            })
        })
        .collect();
    (peers, count)
}
