//! A deterministic many-peer simulation of the membership state machine.
//!
//! Peers run on an in-memory network with a virtual clock: every message gets a random delay
//! and may be lost, dials to a live peer's address open a connection after a handshake delay,
//! and a crash closes all of a peer's connections. Everything random comes from one seeded
//! [`Rng`], so a failing seed replays exactly.
//!
//! Convergence is tracked incrementally from the `PeerUp`/`PeerDown` notifications rather than
//! by scanning every table after every event, which keeps 500-peer runs fast in debug builds.

use crate::sim_queue::{EventQueue, Scheduled};
use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use super::advert::test_auth::FakeAuth;
use super::*;

#[derive(Debug, Clone)]
struct NetConfig {
    loss: f64,
    min_delay: Duration,
    max_delay: Duration,
}

#[derive(Debug)]
enum SimEvent {
    Timer {
        node: usize,
    },
    Deliver {
        to: usize,
        from: usize,
        msg: MembershipMessage,
    },
    Establish {
        from: usize,
        to: Option<usize>,
        addr: SocketAddr,
        expect: Option<PeerId>,
    },
    Disconnected {
        node: usize,
        peer: usize,
    },
}

#[derive(Debug)]
struct SimNode {
    m: Membership<FakeAuth>,
    id: PeerId,
    addr: SocketAddr,
    alive: bool,
    timer: Option<Instant>,
    known: BTreeSet<usize>,
    crashed_at: Option<Duration>,
}

#[derive(Debug)]
struct Sim {
    net: NetConfig,
    config: Config,
    rng: Rng,
    base: Instant,
    now: Duration,
    queue: EventQueue<SimEvent>,
    nodes: Vec<SimNode>,
    by_addr: BTreeMap<SocketAddr, usize>,
    links: BTreeSet<(usize, usize)>,
    degree: Vec<usize>,
    alive: usize,
    /// (alive, alive) pairs where the first knows the second.
    live_known: u64,
    /// (alive, dead) pairs where the first still knows the second.
    dead_known: u64,
    /// How many alive peers know each peer.
    holders: Vec<u32>,
    /// When a crashed peer left the last table it was in.
    gone_at: Vec<Option<Duration>>,
    max_degree: usize,
    /// Live peers dropped from some table (false suspicions).
    flaps: u64,
    sent: u64,
    trace: u64,
}

fn trace_mix(trace: u64, value: u64) -> u64 {
    (trace ^ value).wrapping_mul(0x0100_0000_01b3)
}

impl Sim {
    fn new(seed: u64, net: NetConfig, config: Config) -> Self {
        Self {
            net,
            config,
            rng: Rng::seed_from_u64(seed),
            base: Instant::now(),
            now: Duration::ZERO,
            queue: EventQueue::new(),
            nodes: Vec::new(),
            by_addr: BTreeMap::new(),
            links: BTreeSet::new(),
            degree: Vec::new(),
            alive: 0,
            live_known: 0,
            dead_known: 0,
            holders: Vec::new(),
            gone_at: Vec::new(),
            max_degree: 0,
            flaps: 0,
            sent: 0,
            trace: 0xcbf2_9ce4_8422_2325,
        }
    }

    fn instant(&self) -> Instant {
        self.base + self.now
    }

    fn schedule(&mut self, after: Duration, event: SimEvent) {
        self.queue.push(self.now + after, event);
    }

    fn delay(&mut self) -> Duration {
        self.rng
            .duration_between(self.net.min_delay, self.net.max_delay)
    }

    fn index_of(&self, id: &PeerId) -> Option<usize> {
        let mut index = [0u8; 8];
        index.copy_from_slice(&id.as_bytes()[24..]);
        let n = usize::try_from(u64::from_be_bytes(index)).ok()?;
        (self.nodes.get(n)?.id == *id).then_some(n)
    }

    fn link_key(a: usize, b: usize) -> (usize, usize) {
        (a.min(b), a.max(b))
    }

    fn live_ids(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|&i| self.nodes[i].alive)
            .collect()
    }

    fn converged(&self) -> bool {
        let a = self.alive as u64;
        self.dead_known == 0 && self.live_known == a * a.saturating_sub(1)
    }

    /// Adds a peer that knows only `bootstrap`'s address.
    fn add_node(&mut self, bootstrap: Option<usize>) -> usize {
        let n = self.nodes.len();
        // Random ids (so table order is unrelated to join order) that carry their index in the
        // last bytes, so the simulator finds a peer without a map lookup per message.
        let mut bytes = [0u8; 32];
        for chunk in bytes[..24].chunks_mut(8) {
            chunk.copy_from_slice(&self.rng.next_u64().to_le_bytes());
        }
        bytes[24..].copy_from_slice(&(n as u64).to_be_bytes());
        let id = PeerId::from_bytes(bytes);
        let addr = SocketAddr::from((Ipv4Addr::from(0x0a00_0000 + n as u32), 7000));
        let local = LocalPeer {
            id,
            addrs: vec![addr],
            capacity: Capacity {
                cores_donated: 4,
                cores_free: 4,
                memory_mb: 2048,
                profile: 1,
            },
            // One wall clock for every peer: the virtual time since the run began.
            initial_seq: u64::try_from(self.now.as_millis()).unwrap_or(u64::MAX),
        };
        let seed = self.rng.next_u64();
        let now = self.instant();
        let m = Membership::new(self.config.clone(), local, FakeAuth { me: id }, seed, now);
        self.nodes.push(SimNode {
            m,
            id,
            addr,
            alive: true,
            timer: None,
            known: BTreeSet::new(),
            crashed_at: None,
        });
        self.by_addr.insert(addr, n);
        self.degree.push(0);
        self.holders.push(0);
        self.gone_at.push(None);
        self.alive += 1;
        if let Some(b) = bootstrap {
            let addr = self.nodes[b].addr;
            self.nodes[n]
                .m
                .handle(Event::Discovered { addr, peer: None }, now);
        }
        self.drain(n);
        n
    }

    fn crash(&mut self, n: usize) {
        if !self.nodes[n].alive {
            return;
        }
        // n's own knowledge disappears with it.
        let known: Vec<usize> = self.nodes[n].known.iter().copied().collect();
        for p in known {
            self.holders[p] -= 1;
            if self.nodes[p].alive {
                self.live_known -= 1;
            } else {
                self.dead_known -= 1;
                if self.holders[p] == 0 {
                    self.gone_at[p] = Some(self.now);
                }
            }
        }
        self.nodes[n].alive = false;
        self.nodes[n].crashed_at = Some(self.now);
        self.alive -= 1;
        let holders = u64::from(self.holders[n]);
        self.live_known -= holders;
        self.dead_known += holders;
        if holders == 0 {
            self.gone_at[n] = Some(self.now);
        }
        let links: Vec<(usize, usize)> = self
            .links
            .iter()
            .filter(|(a, b)| *a == n || *b == n)
            .copied()
            .collect();
        for (a, b) in links {
            self.links.remove(&(a, b));
            self.degree[a] -= 1;
            self.degree[b] -= 1;
            let other = if a == n { b } else { a };
            let after = self.delay();
            self.schedule(
                after,
                SimEvent::Disconnected {
                    node: other,
                    peer: n,
                },
            );
        }
    }

    fn drain(&mut self, n: usize) {
        while let Some(command) = self.nodes[n].m.poll_command() {
            match command {
                Command::Dial { addr, peer } => {
                    let to = self.by_addr.get(&addr).copied();
                    let after = self.delay() + self.delay();
                    self.schedule(
                        after,
                        SimEvent::Establish {
                            from: n,
                            to,
                            addr,
                            expect: peer,
                        },
                    );
                }
                Command::Disconnect { peer } => {
                    let Some(p) = self.index_of(&peer) else {
                        continue;
                    };
                    if p != n && self.links.remove(&Self::link_key(n, p)) {
                        self.degree[n] -= 1;
                        self.degree[p] -= 1;
                        let after = self.delay();
                        self.schedule(after, SimEvent::Disconnected { node: p, peer: n });
                    }
                }
                Command::Send { to, msg } => {
                    let Some(p) = self.index_of(&to) else {
                        continue;
                    };
                    if !self.links.contains(&Self::link_key(n, p)) {
                        continue;
                    }
                    self.sent += 1;
                    if self.rng.chance(self.net.loss) {
                        continue;
                    }
                    let after = self.delay();
                    self.schedule(
                        after,
                        SimEvent::Deliver {
                            to: p,
                            from: n,
                            msg,
                        },
                    );
                }
                Command::PeerUp(advert) => {
                    let Some(p) = self.index_of(&advert.peer) else {
                        panic!("unknown peer learned: {:?}", advert.peer);
                    };
                    assert!(self.nodes[n].known.insert(p), "PeerUp twice");
                    self.holders[p] += 1;
                    if self.nodes[p].alive {
                        self.live_known += 1;
                    } else {
                        self.dead_known += 1;
                        self.gone_at[p] = None;
                    }
                }
                Command::PeerDown(peer) => {
                    let p = self.index_of(&peer).expect("known peer");
                    assert!(self.nodes[n].known.remove(&p), "PeerDown of unknown");
                    self.holders[p] -= 1;
                    if self.nodes[p].alive {
                        self.live_known -= 1;
                        self.flaps += 1;
                    } else {
                        self.dead_known -= 1;
                        if self.holders[p] == 0 {
                            self.gone_at[p] = Some(self.now);
                        }
                    }
                }
            }
        }
        self.max_degree = self.max_degree.max(self.degree[n]);
        let next = self.nodes[n].m.poll_timeout();
        if next != self.nodes[n].timer
            && let Some(at) = next
        {
            self.nodes[n].timer = next;
            let after = at.saturating_duration_since(self.instant());
            self.schedule(after, SimEvent::Timer { node: n });
        }
    }

    /// Processes the next event if it is due by `deadline`.
    fn step(&mut self, deadline: Duration) -> bool {
        match self.queue.next_at() {
            Some(at) if at <= deadline => {}
            _ => return false,
        }
        let Some(Scheduled { at, order, event }) = self.queue.pop() else {
            return false;
        };
        self.now = at;
        self.trace = trace_mix(self.trace, at.as_nanos() as u64);
        self.trace = trace_mix(self.trace, order);
        let now = self.instant();
        match event {
            SimEvent::Timer { node } => {
                if self.nodes[node].alive && self.nodes[node].timer == Some(now) {
                    self.nodes[node].timer = None;
                    self.nodes[node].m.handle_timeout(now);
                    self.drain(node);
                }
            }
            SimEvent::Deliver { to, from, msg } => {
                if self.nodes[to].alive {
                    let from = self.nodes[from].id;
                    self.nodes[to].m.handle(Event::Message { from, msg }, now);
                    self.drain(to);
                }
            }
            SimEvent::Disconnected { node, peer } => {
                if self.nodes[node].alive {
                    let peer = self.nodes[peer].id;
                    self.nodes[node].m.handle(Event::Disconnected { peer }, now);
                    self.drain(node);
                }
            }
            SimEvent::Establish {
                from,
                to,
                addr,
                expect,
            } => self.establish(from, to, addr, expect),
        }
        true
    }

    fn establish(
        &mut self,
        from: usize,
        to: Option<usize>,
        addr: SocketAddr,
        expect: Option<PeerId>,
    ) {
        if !self.nodes[from].alive {
            return;
        }
        let now = self.instant();
        let usable = to.filter(|&to| {
            to != from
                && self.nodes[to].alive
                && expect.is_none_or(|e| e == self.nodes[to].id)
                && !self.links.contains(&Self::link_key(from, to))
        });
        let Some(to) = usable else {
            self.nodes[from].m.handle(Event::DialFailed { addr }, now);
            self.drain(from);
            return;
        };
        self.links.insert(Self::link_key(from, to));
        self.degree[from] += 1;
        self.degree[to] += 1;
        let (from_id, to_id, from_addr) = (
            self.nodes[from].id,
            self.nodes[to].id,
            self.nodes[from].addr,
        );
        self.nodes[from].m.handle(
            Event::Connected {
                peer: to_id,
                addr,
                inbound: false,
            },
            now,
        );
        self.drain(from);
        self.nodes[to].m.handle(
            Event::Connected {
                peer: from_id,
                addr: from_addr,
                inbound: true,
            },
            now,
        );
        self.drain(to);
        for n in [from, to] {
            assert!(
                self.degree[n] <= self.config.max_connections,
                "peer {n} holds {} connections",
                self.degree[n]
            );
        }
    }

    fn run_until(&mut self, deadline: Duration) {
        while self.step(deadline) {}
        self.now = self.now.max(deadline);
    }

    /// Runs until every live peer knows exactly every other live peer; returns when.
    fn run_until_converged(&mut self, deadline: Duration) -> Option<Duration> {
        loop {
            if self.converged() {
                return Some(self.now);
            }
            if !self.step(deadline) {
                return None;
            }
        }
    }

    /// Cross-checks the incremental bookkeeping against the tables themselves.
    fn check_tables(&self) {
        let live: BTreeSet<usize> = self.live_ids().into_iter().collect();
        for &n in &live {
            let table: BTreeSet<usize> = self.nodes[n]
                .m
                .peers()
                .map(|a| self.index_of(&a.peer).expect("known peer"))
                .collect();
            assert_eq!(table, self.nodes[n].known, "peer {n}");
            let mut others = live.clone();
            others.remove(&n);
            assert_eq!(table, others, "peer {n} table differs from the live set");
            assert!(self.nodes[n].m.connection_count() <= self.config.max_connections);
            assert!(self.nodes[n].m.tombstone_count() <= self.config.max_peers);
        }
    }
}

#[derive(Debug, Clone)]
struct Scenario {
    seed: u64,
    peers: usize,
    join_over: Duration,
    crash_fraction: f64,
    late_joins: usize,
    net: NetConfig,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Report {
    join_converged_after: Duration,
    removal_max: Duration,
    removal_mean: Duration,
    crash_converged_after: Duration,
    max_degree: usize,
    flaps: u64,
    sent: u64,
    trace: u64,
}

fn lossy_net(loss: f64) -> NetConfig {
    NetConfig {
        loss,
        min_delay: Duration::from_millis(1),
        max_delay: Duration::from_millis(30),
    }
}

/// Joins `peers` peers over `join_over` (each bootstrapping from one random live peer), waits
/// for convergence, then crashes a fraction of them over one second while a few more join,
/// and waits until every table holds exactly the live peers again.
fn run(scenario: &Scenario) -> Report {
    let config = Config::default();
    let mut sim = Sim::new(scenario.seed, scenario.net.clone(), config.clone());
    sim.add_node(None);
    for i in 1..scenario.peers {
        let at = scenario.join_over * i as u32 / scenario.peers as u32;
        sim.run_until(at);
        let live = sim.live_ids();
        let bootstrap = *sim.rng.choose(&live).expect("someone is alive");
        sim.add_node(Some(bootstrap));
    }
    let last_join = sim.now;
    let converged = sim
        .run_until_converged(last_join + Duration::from_secs(30))
        .unwrap_or_else(|| {
            panic!(
                "seed {}: no convergence 30 s after the last join ({} of {} links)",
                scenario.seed,
                sim.live_known,
                sim.alive * (sim.alive - 1)
            )
        });
    let join_converged_after = converged - last_join;
    sim.check_tables();

    // Let the overlay settle before the crashes.
    let crash_start = sim.now + Duration::from_millis(500);
    sim.run_until(crash_start);
    let crashes = (scenario.peers as f64 * scenario.crash_fraction).round() as usize;
    let events = crashes + scenario.late_joins;
    let mut crashed = Vec::new();
    let mut joins_left = scenario.late_joins;
    for k in 0..events {
        let at = crash_start + Duration::from_secs(1) * k as u32 / events.max(1) as u32;
        sim.run_until(at);
        let live = sim.live_ids();
        let pick = *sim.rng.choose(&live).expect("someone is alive");
        let join = joins_left > 0 && (crashed.len() == crashes || sim.rng.chance(0.5));
        if join {
            joins_left -= 1;
            sim.add_node(Some(pick));
        } else {
            sim.crash(pick);
            crashed.push(pick);
        }
    }
    let last_event = sim.now;
    let bound = config.removal_bound(Duration::from_millis(500));
    let converged = sim
        .run_until_converged(last_event + bound + Duration::from_secs(5))
        .unwrap_or_else(|| {
            panic!(
                "seed {}: tables not exact after crashes ({} dead entries, {} of {} live links)",
                scenario.seed,
                sim.dead_known,
                sim.live_known,
                sim.alive * (sim.alive - 1)
            )
        });
    sim.check_tables();
    let removals: Vec<Duration> = crashed
        .iter()
        .map(|&d| {
            let gone = sim.gone_at[d].expect("converged means gone");
            gone - sim.nodes[d].crashed_at.expect("crashed")
        })
        .collect();
    let removal_max = removals.iter().copied().max().unwrap_or_default();
    let removal_mean = removals.iter().sum::<Duration>() / removals.len().max(1) as u32;
    assert!(
        removal_max <= bound,
        "seed {}: a dead peer lingered {removal_max:?} > {bound:?}",
        scenario.seed
    );
    assert!(sim.max_degree <= config.max_connections);
    Report {
        join_converged_after,
        removal_max,
        removal_mean,
        crash_converged_after: converged - last_event,
        max_degree: sim.max_degree,
        flaps: sim.flaps,
        sent: sim.sent,
        trace: sim.trace,
    }
}

fn print(name: &str, scenario: &Scenario, r: &Report) {
    let rounds = |d: Duration| d.as_secs_f64() / Config::default().gossip_interval.as_secs_f64();
    eprintln!(
        "{name} seed {} peers {} loss {:.0}%: joined-converged {:.2} s ({:.1} rounds) after the \
         last join; dead removed max {:.2} s mean {:.2} s after crash; exact again {:.2} s after \
         the last crash; max connections {}; false removals {}; messages {}",
        scenario.seed,
        scenario.peers,
        scenario.net.loss * 100.0,
        r.join_converged_after.as_secs_f64(),
        rounds(r.join_converged_after),
        r.removal_max.as_secs_f64(),
        r.removal_mean.as_secs_f64(),
        r.crash_converged_after.as_secs_f64(),
        r.max_degree,
        r.flaps,
        r.sent,
    );
}

#[test]
fn ten_peers_on_a_quiet_network() {
    let scenario = Scenario {
        seed: 10,
        peers: 10,
        join_over: Duration::from_secs(1),
        crash_fraction: 0.1,
        late_joins: 0,
        net: NetConfig {
            loss: 0.0,
            min_delay: Duration::from_micros(100),
            max_delay: Duration::from_millis(2),
        },
    };
    let r = run(&scenario);
    print("ten_peers_on_a_quiet_network", &scenario, &r);
    assert!(r.removal_max <= Duration::from_secs(10));
    assert!(r.join_converged_after <= Duration::from_secs(2));
    assert_eq!(r.flaps, 0);
}

#[test]
fn hundred_fifty_peers_several_seeds() {
    for seed in [1, 2, 3] {
        let scenario = Scenario {
            seed,
            peers: 150,
            join_over: Duration::from_secs(3),
            crash_fraction: 0.1,
            late_joins: 8,
            net: lossy_net(0.05),
        };
        let r = run(&scenario);
        print("hundred_fifty_peers_several_seeds", &scenario, &r);
        assert!(r.join_converged_after <= Duration::from_secs(10));
        assert_eq!(r.flaps, 0, "a live peer was dropped somewhere");
    }
}

#[test]
fn five_hundred_peers_with_loss_joins_and_crashes() {
    let scenario = Scenario {
        seed: 500,
        peers: 500,
        join_over: Duration::from_secs(2),
        crash_fraction: 0.1,
        late_joins: 25,
        net: lossy_net(0.05),
    };
    let r = run(&scenario);
    print(
        "five_hundred_peers_with_loss_joins_and_crashes",
        &scenario,
        &r,
    );
    assert!(r.join_converged_after <= Duration::from_secs(10));
    assert_eq!(r.flaps, 0, "a live peer was dropped somewhere");
}

#[test]
fn replay_is_exact_from_the_seed() {
    let scenario = Scenario {
        seed: 77,
        peers: 60,
        join_over: Duration::from_secs(3),
        crash_fraction: 0.1,
        late_joins: 3,
        net: lossy_net(0.1),
    };
    let first = run(&scenario);
    let second = run(&scenario);
    assert_eq!(first, second);
    let other = run(&Scenario {
        seed: 78,
        ..scenario
    });
    assert_ne!(first.trace, other.trace);
}
