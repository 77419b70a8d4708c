//! The machine a peer runs on, as the submitter observes it.
//!
//! Keys are free, so "distinct peers" says nothing about independence: one machine can hold a
//! thousand identities. What a peer cannot choose as freely is the address its connections come
//! from. A submitter therefore groups peers by the remote address of the connection that
//! carries their leases — never by an address a peer advertises — and treats each group as one
//! witness:
//!
//! * public IPv4 addresses by /24 and public IPv6 addresses by /48, the blocks one operator
//!   usually holds together;
//! * loopback, private, shared (carrier-grade NAT), unique-local and link-local addresses by
//!   the exact address, so each machine of a lab's LAN is a host of its own (and so are the
//!   loopback addresses 127.0.0.2, 127.0.0.3, … that tests bind to play several machines);
//! * [`Host::Peer`] for a peer counted as its own host: `placement = "peer"`, or the simulated
//!   execution slots of a job run on one machine.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use serde::{Deserialize, Serialize};

use crate::peer_id::PeerId;

/// One witness for placement and quorum: a block of public addresses, one local address, or a
/// peer standing for itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Host {
    /// A public IPv4 /24: its first three octets.
    V4Block([u8; 3]),
    /// A public IPv6 /48: its first six octets.
    V6Block([u8; 6]),
    /// A loopback, private or link-local address, exactly.
    Local(IpAddr),
    /// A peer that is its own host.
    Peer(PeerId),
}

impl Host {
    /// The host of a peer whose connection comes from `ip`.
    pub fn of(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(v4) => Self::of_v4(v4),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                // A dual-stack socket reports IPv4 peers as ::ffff:a.b.c.d.
                Some(v4) => Self::of_v4(v4),
                None => Self::of_v6(v6),
            },
        }
    }

    fn of_v4(v4: Ipv4Addr) -> Self {
        let o = v4.octets();
        let shared = o[0] == 100 && (o[1] & 0xc0) == 64; // 100.64.0.0/10
        if v4.is_loopback()
            || v4.is_private()
            || v4.is_link_local()
            || shared
            || v4.is_unspecified()
        {
            Self::Local(IpAddr::V4(v4))
        } else {
            Self::V4Block([o[0], o[1], o[2]])
        }
    }

    fn of_v6(v6: Ipv6Addr) -> Self {
        let s = v6.segments();
        let unique_local = (s[0] & 0xfe00) == 0xfc00;
        let link_local = (s[0] & 0xffc0) == 0xfe80;
        if v6.is_loopback() || v6.is_unspecified() || unique_local || link_local {
            Self::Local(IpAddr::V6(v6))
        } else {
            let o = v6.octets();
            Self::V6Block([o[0], o[1], o[2], o[3], o[4], o[5]])
        }
    }

    /// Whether this host is a loopback, private or link-local address: one a peer on a public
    /// address has no business naming.
    pub fn is_local(&self) -> bool {
        matches!(self, Self::Local(_))
    }
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::V4Block([a, b, c]) => write!(f, "{a}.{b}.{c}.0/24"),
            Self::V6Block(o) => {
                let seg = |i: usize| u16::from_be_bytes([o[i], o[i + 1]]);
                write!(f, "{:x}:{:x}:{:x}::/48", seg(0), seg(2), seg(4))
            }
            Self::Local(ip) => write!(f, "{ip}"),
            Self::Peer(peer) => write!(f, "peer {peer}"),
        }
    }
}

/// Where a job's replicas may go: on distinct hosts (the default), or on distinct peers only
/// (for experiments whose peers all run on one machine).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Placement {
    #[default]
    Host,
    Peer,
}

impl Placement {
    /// The witness `peer` counts as when its connection comes from `host`.
    pub fn witness(self, peer: PeerId, host: Host) -> Host {
        match self {
            Self::Host => host,
            Self::Peer => Host::Peer(peer),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(text: &str) -> Host {
        Host::of(text.parse().expect("test address"))
    }

    #[test]
    fn public_addresses_group_by_block_and_local_ones_stand_alone() {
        assert_eq!(host("203.0.113.7"), host("203.0.113.200"));
        assert_ne!(host("203.0.113.7"), host("203.0.114.7"));
        assert_eq!(host("2001:db8:1:2::1"), host("2001:db8:1:ffff::9"));
        assert_ne!(host("2001:db8:1::1"), host("2001:db8:2::1"));
        for (a, b) in [
            ("127.0.0.2", "127.0.0.3"),
            ("10.0.0.1", "10.0.0.2"),
            ("192.168.1.5", "192.168.1.6"),
            ("172.16.0.1", "172.16.0.2"),
            ("169.254.1.1", "169.254.1.2"),
            ("100.64.0.1", "100.64.0.2"),
            ("fd00::1", "fd00::2"),
            ("fe80::1", "fe80::2"),
        ] {
            assert_ne!(host(a), host(b), "{a} and {b} are two lab machines");
            assert!(host(a).is_local(), "{a}");
        }
        assert!(!host("203.0.113.7").is_local());
        assert!(!host("100.128.0.1").is_local(), "outside 100.64.0.0/10");
    }

    #[test]
    fn mapped_ipv4_is_the_same_host_as_ipv4() {
        assert_eq!(host("::ffff:203.0.113.9"), host("203.0.113.1"));
        assert_eq!(host("::ffff:127.0.0.2"), host("127.0.0.2"));
    }

    #[test]
    fn hosts_print_as_their_block() {
        assert_eq!(host("203.0.113.7").to_string(), "203.0.113.0/24");
        assert_eq!(host("2001:db8:a::1").to_string(), "2001:db8:a::/48");
        assert_eq!(host("127.0.0.2").to_string(), "127.0.0.2");
    }

    #[test]
    fn placement_by_peer_makes_every_peer_its_own_witness() {
        let (a, b) = (PeerId::from_bytes([1; 32]), PeerId::from_bytes([2; 32]));
        let h = host("127.0.0.1");
        assert_eq!(Placement::Host.witness(a, h), Placement::Host.witness(b, h));
        assert_ne!(Placement::Peer.witness(a, h), Placement::Peer.witness(b, h));
    }
}
