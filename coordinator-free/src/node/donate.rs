//! Changing what a running peer donates: its advert says so at once, and its work task takes
//! new units by the new number of slots (a smaller one never stops a running unit, it only
//! waits for units to end until they fit).

use std::time::Instant;

use crate::membership::{Capacity, Event};
use crate::sandbox::UnitHostCommand;

use super::work::WorkInput;
use super::{Actor, Node, NodeError, Request};

/// What a running peer donates, as [`Node::donate`] changes it.
#[derive(Debug, Clone)]
pub struct Donation {
    /// Cores donated: how many units run at once.
    pub cores: u16,
    /// Memory offered, in MiB; it is advertised, and a unit may have one core's share.
    pub memory_mb: u32,
    /// The command unit hosts are started with from now on (their limits follow the share);
    /// `None` keeps the current one. A peer that runs units in its own process ignores it.
    pub unit_host: Option<UnitHostCommand>,
}

impl Donation {
    /// One core's share of the memory, in bytes: the most a unit may have.
    pub fn memory_per_slot(&self) -> u64 {
        (u64::from(self.memory_mb) << 20) / u64::from(self.cores.max(1))
    }
}

impl Node {
    /// Changes what this peer donates while it runs: the advert is re-signed with the new
    /// capacity and, on a peer that runs units, the slots are resized. Units already running
    /// finish where they are.
    pub async fn donate(&self, donation: Donation) -> Result<(), NodeError> {
        let capacity = Capacity {
            cores_donated: donation.cores,
            cores_free: donation.cores,
            memory_mb: donation.memory_mb,
            // The actor keeps the profile the node advertises.
            profile: 0,
        };
        if let Some(work) = &self.work {
            work.send(WorkInput::Donate(donation))
                .await
                .map_err(|_| NodeError::Stopped)?;
        }
        self.requests
            .send(Request::Donate(capacity))
            .await
            .map_err(|_| NodeError::Stopped)
    }
}

impl Actor {
    pub(super) fn donate(&mut self, mut capacity: Capacity) {
        capacity.profile = self.membership.local_advert().advert.profile;
        tracing::info!(
            cores = capacity.cores_donated,
            memory_mb = capacity.memory_mb,
            "donated capacity changed"
        );
        self.membership
            .handle(Event::CapacityChanged(capacity), Instant::now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Identity;
    use crate::node::{NodeConfig, WorkConfig, WorkRunner};
    use crate::sandbox::SandboxConfig;

    #[tokio::test]
    async fn a_new_donation_is_advertised_and_resizes_the_slots() {
        let mut config = NodeConfig::new("127.0.0.1:0".parse().expect("addr"));
        config.mdns = false;
        config.capacity.cores_donated = 2;
        config.capacity.cores_free = 2;
        config.capacity.memory_mb = 1024;
        let sandbox = SandboxConfig {
            max_concurrent_units: 4,
            ..SandboxConfig::default()
        };
        config.work = Some(WorkConfig::new(WorkRunner::InProcess(sandbox), 2));
        let node = Node::start(Identity::generate().expect("identity"), config)
            .await
            .expect("node starts");
        let before = node.status().await.expect("status");
        assert_eq!((before.cores_donated, before.memory_mb), (2, 1024));
        assert_eq!(before.work.map(|w| w.slots), Some(2));

        for (cores, memory_mb) in [(1, 300), (3, 1536)] {
            node.donate(Donation {
                cores,
                memory_mb,
                unit_host: None,
            })
            .await
            .expect("donate");
            let after = node.status().await.expect("status");
            assert_eq!(
                (after.cores_donated, after.cores_free, after.memory_mb),
                (cores, cores, memory_mb)
            );
            assert!(after.seq > before.seq, "the advert is issued again");
            assert_eq!(after.work.map(|w| w.slots), Some(u32::from(cores)));
        }
        node.shutdown().await;
    }
}
