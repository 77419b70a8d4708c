//! The worker's prepared modules: kept per digest *and* metering mode (the same bytes compile
//! differently with fuel), with a share per submitter so one submitter cycling through modules
//! evicts its own first, and none evicted while leases held here still need it.

use std::collections::{HashMap, HashSet, VecDeque};

use crate::digest::Digest;
use crate::peer_id::PeerId;
use crate::sandbox::Metering;

/// A module as prepared for one metering mode.
pub(super) type ModuleKey = (Digest, Metering);

/// Prepared modules `M`, oldest first, each with the submitter it was made for.
#[derive(Debug)]
pub(super) struct ModuleCache<M> {
    modules: HashMap<ModuleKey, M>,
    order: VecDeque<(ModuleKey, PeerId)>,
    capacity: usize,
    share: usize,
}

impl<M> ModuleCache<M> {
    /// Keeps `capacity` modules, at most `share` of them made for one submitter while others
    /// could be evicted instead.
    pub(super) fn new(capacity: usize, share: usize) -> Self {
        Self {
            modules: HashMap::new(),
            order: VecDeque::new(),
            capacity,
            share,
        }
    }

    pub(super) fn contains(&self, key: &ModuleKey) -> bool {
        self.modules.contains_key(key)
    }

    pub(super) fn get(&self, key: &ModuleKey) -> Option<&M> {
        self.modules.get(key)
    }

    /// Caches `module` made for `owner`'s job. Modules in `in_use` are never evicted (there
    /// are at most as many as jobs, so the cache may then run over its capacity); otherwise
    /// the owner's oldest goes first once it holds its share, else the oldest of all.
    pub(super) fn insert(
        &mut self,
        key: ModuleKey,
        module: M,
        owner: PeerId,
        in_use: &HashSet<ModuleKey>,
    ) {
        self.order.retain(|(k, _)| *k != key);
        let theirs = self.order.iter().filter(|(_, o)| *o == owner).count();
        while self.order.len() >= self.capacity {
            let evictable = |(k, o): &(ModuleKey, PeerId)| {
                !in_use.contains(k) && (theirs < self.share || *o == owner)
            };
            let Some(at) = self.order.iter().position(evictable) else {
                break;
            };
            if let Some((old, _)) = self.order.remove(at) {
                self.modules.remove(&old);
            }
        }
        self.modules.insert(key, module);
        self.order.push_back((key, owner));
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.modules.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u32) -> ModuleKey {
        (Digest::of(&n.to_le_bytes()), Metering::Off)
    }

    fn peer(n: u8) -> PeerId {
        PeerId::from_bytes([n; 32])
    }

    #[test]
    fn one_submitter_cycling_through_modules_evicts_only_its_own() {
        let mut cache = ModuleCache::new(16, 4);
        let none = HashSet::new();
        for n in 0..8 {
            cache.insert(key(n), n, peer(1), &none);
        }
        for n in 100..300 {
            cache.insert(key(n), n, peer(66), &none);
        }
        assert_eq!(cache.len(), 16);
        for n in 0..8 {
            assert!(
                cache.contains(&key(n)),
                "the honest submitter's module {n} stayed"
            );
        }
        assert!(cache.contains(&key(299)), "the newest is kept");
    }

    #[test]
    fn modules_in_use_are_never_evicted() {
        let mut cache = ModuleCache::new(4, 2);
        let in_use: HashSet<ModuleKey> = (0..4).map(key).collect();
        for n in 0..4 {
            cache.insert(key(n), n, peer(n as u8), &in_use);
        }
        cache.insert(key(9), 9, peer(9), &in_use);
        assert_eq!(
            cache.len(),
            5,
            "over capacity rather than evict what leases need"
        );
        for n in 0..4 {
            assert!(cache.contains(&key(n)));
        }
    }

    #[test]
    fn under_its_share_a_submitter_evicts_the_oldest_of_all() {
        let mut cache = ModuleCache::new(3, 2);
        let none = HashSet::new();
        cache.insert(key(0), 0, peer(1), &none);
        cache.insert(key(1), 1, peer(2), &none);
        cache.insert(key(2), 2, peer(2), &none);
        cache.insert(key(3), 3, peer(3), &none);
        assert!(!cache.contains(&key(0)), "the oldest went");
        // Peer 2 now holds its share: its next module evicts its own oldest.
        cache.insert(key(4), 4, peer(2), &none);
        assert!(cache.contains(&key(3)));
        assert!(!cache.contains(&key(1)));
        assert!(cache.contains(&key(2)) && cache.contains(&key(4)));
        // The same module and metering again replaces its entry, it is not counted twice.
        cache.insert(key(4), 44, peer(2), &none);
        assert_eq!(cache.get(&key(4)), Some(&44));
        assert_eq!(cache.len(), 3);
    }

    #[test]
    fn the_same_bytes_under_another_metering_are_another_module() {
        let mut cache = ModuleCache::new(4, 4);
        let none = HashSet::new();
        let d = Digest::of(b"module");
        cache.insert((d, Metering::Off), 1, peer(1), &none);
        cache.insert((d, Metering::Fuel), 2, peer(1), &none);
        assert_eq!(cache.get(&(d, Metering::Off)), Some(&1));
        assert_eq!(cache.get(&(d, Metering::Fuel)), Some(&2));
    }
}
