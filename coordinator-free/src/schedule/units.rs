//! The scheduler's units, in memory that grows with the units under way rather than with the
//! job: a unit never leased has no record (it reads as the blank one), a decided unit keeps
//! one bit, and only units leased and not yet decided hold a [`UnitState`].

use std::collections::HashMap;

use super::UnitState;
use crate::bitset::BitSet;

/// Every unit of a job, by index.
#[derive(Debug)]
pub(super) struct UnitTable {
    /// What a unit never touched looks like.
    blank: UnitState,
    /// Units leased (or reopened) and not decided since.
    live: HashMap<u32, UnitState>,
    /// Units decided whose state was dropped.
    closed: BitSet,
}

impl UnitTable {
    pub(super) fn new(count: u32, blank: UnitState) -> Self {
        Self {
            blank,
            live: HashMap::new(),
            closed: BitSet::new(count),
        }
    }

    pub(super) fn count(&self) -> u32 {
        self.closed.capacity()
    }

    /// The unit's state: `None` when it is decided (or out of range).
    pub(super) fn get(&self, unit: u32) -> Option<&UnitState> {
        if let Some(state) = self.live.get(&unit) {
            return Some(state);
        }
        (unit < self.count() && !self.closed.contains(unit)).then_some(&self.blank)
    }

    /// The unit's state to change, made from the blank one the first time: `None` when it is
    /// decided (or out of range).
    pub(super) fn get_mut(&mut self, unit: u32) -> Option<&mut UnitState> {
        if unit >= self.count() || self.closed.contains(unit) {
            return None;
        }
        Some(self.live.entry(unit).or_insert_with(|| self.blank.clone()))
    }

    /// A copy of the blank state.
    pub(super) fn blank(&self) -> UnitState {
        self.blank.clone()
    }

    /// Whether the unit is decided and its state dropped.
    pub(super) fn is_closed(&self, unit: u32) -> bool {
        self.closed.contains(unit)
    }

    /// Drops a decided unit's state.
    pub(super) fn close(&mut self, unit: u32) {
        self.live.remove(&unit);
        self.closed.insert(unit);
    }

    /// Makes a decided unit open again with `state` (its result was taken back).
    pub(super) fn reopen(&mut self, unit: u32, state: UnitState) {
        if unit < self.count() {
            self.closed.remove(unit);
            self.live.insert(unit, state);
        }
    }

    /// The units holding a state, in no particular order.
    pub(super) fn live(&self) -> impl Iterator<Item = (u32, &UnitState)> {
        self.live.iter().map(|(u, s)| (*u, s))
    }

    /// How many units hold a state.
    pub(super) fn live_count(&self) -> usize {
        self.live.len()
    }
}

/// Open units never leased, as bits, with the lowest one remembered: the dispatcher takes
/// them from the front.
#[derive(Debug)]
pub(super) struct FreshSet {
    bits: BitSet,
    /// No member is below it.
    low: u32,
}

impl FreshSet {
    /// Every unit of a job of `count` units.
    pub(super) fn full(count: u32) -> Self {
        Self {
            bits: BitSet::full(count),
            low: 0,
        }
    }

    pub(super) fn len(&self) -> usize {
        self.bits.count() as usize
    }

    pub(super) fn is_empty(&self) -> bool {
        self.bits.is_empty()
    }

    pub(super) fn insert(&mut self, unit: u32) -> bool {
        let new = self.bits.insert(unit);
        if new {
            self.low = self.low.min(unit);
        }
        new
    }

    pub(super) fn remove(&mut self, unit: u32) -> bool {
        let was = self.bits.remove(unit);
        if was && unit == self.low {
            self.low = self
                .bits
                .next_from(unit.saturating_add(1))
                .unwrap_or(self.bits.capacity());
        }
        was
    }

    /// The first `n` members, in order.
    pub(super) fn first(&self, n: usize) -> Vec<u32> {
        let mut out = Vec::with_capacity(n.min(self.len()));
        let mut at = self.low;
        while out.len() < n {
            let Some(unit) = self.bits.next_from(at) else {
                break;
            };
            out.push(unit);
            let Some(next) = unit.checked_add(1) else {
                break;
            };
            at = next;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    proptest! {
        #[test]
        fn fresh_set_takes_from_the_front_like_an_ordered_set(
            count in 1u32..300,
            ops in proptest::collection::vec((any::<bool>(), 0u32..300), 0..300),
            n in 0usize..20,
        ) {
            let mut fresh = FreshSet::full(count);
            let mut model: BTreeSet<u32> = (0..count).collect();
            for (add, u) in ops {
                if add && u < count {
                    prop_assert_eq!(fresh.insert(u), model.insert(u));
                } else if !add {
                    prop_assert_eq!(fresh.remove(u), model.remove(&u));
                }
                prop_assert_eq!(fresh.len(), model.len());
                prop_assert_eq!(fresh.first(n), model.iter().copied().take(n).collect::<Vec<_>>());
            }
        }
    }
}
