//! A set of unit indices below a fixed bound, one bit each: what a job of a hundred million
//! units can afford to keep per unit (12.5 MB), where a tree or a vector of records cannot.

/// Members of `0..capacity`, as bits; counts its members.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BitSet {
    words: Vec<u64>,
    capacity: u32,
    count: u32,
}

impl BitSet {
    /// An empty set of indices below `capacity`.
    pub fn new(capacity: u32) -> Self {
        Self {
            words: vec![0; (capacity as usize).div_ceil(64)],
            capacity,
            count: 0,
        }
    }

    /// The set of every index below `capacity`.
    pub fn full(capacity: u32) -> Self {
        let mut words = vec![u64::MAX; (capacity as usize).div_ceil(64)];
        let rem = capacity % 64;
        if rem != 0
            && let Some(last) = words.last_mut()
        {
            *last = (1u64 << rem) - 1;
        }
        Self {
            words,
            capacity,
            count: capacity,
        }
    }

    /// The bound every member is below.
    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    /// How many members it has.
    pub fn count(&self) -> u32 {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    pub fn contains(&self, i: u32) -> bool {
        self.words
            .get((i / 64) as usize)
            .is_some_and(|w| w & (1 << (i % 64)) != 0)
    }

    /// Adds `i`; returns whether it was not a member (an index out of bounds is never one).
    pub fn insert(&mut self, i: u32) -> bool {
        if i >= self.capacity {
            return false;
        }
        let Some(w) = self.words.get_mut((i / 64) as usize) else {
            return false;
        };
        let bit = 1 << (i % 64);
        let new = *w & bit == 0;
        *w |= bit;
        self.count += u32::from(new);
        new
    }

    /// Removes `i`; returns whether it was a member.
    pub fn remove(&mut self, i: u32) -> bool {
        let Some(w) = self.words.get_mut((i / 64) as usize) else {
            return false;
        };
        let bit = 1 << (i % 64);
        let was = *w & bit != 0;
        *w &= !bit;
        self.count -= u32::from(was);
        was
    }

    /// The smallest member at or above `from`.
    pub fn next_from(&self, from: u32) -> Option<u32> {
        if from >= self.capacity {
            return None;
        }
        let mut word = (from / 64) as usize;
        let mut bits = self.words.get(word)? & (u64::MAX << (from % 64));
        loop {
            if bits != 0 {
                let i = word as u32 * 64 + bits.trailing_zeros();
                return (i < self.capacity).then_some(i);
            }
            word += 1;
            bits = *self.words.get(word)?;
        }
    }

    /// Members in increasing order.
    pub fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        let mut next = self.next_from(0);
        std::iter::from_fn(move || {
            let i = next?;
            next = i.checked_add(1).and_then(|n| self.next_from(n));
            Some(i)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    #[test]
    fn full_holds_exactly_the_indices_below_its_capacity() {
        for capacity in [0, 1, 63, 64, 65, 200] {
            let set = BitSet::full(capacity);
            assert_eq!(set.count(), capacity);
            assert_eq!(set.iter().count() as u32, capacity);
            assert!(!set.contains(capacity));
            assert_eq!(set.next_from(capacity), None);
        }
    }

    proptest! {
        #[test]
        fn behaves_as_a_set_of_indices(
            capacity in 0u32..300,
            ops in proptest::collection::vec((any::<bool>(), 0u32..320), 0..200),
            from in 0u32..320,
        ) {
            let mut set = BitSet::new(capacity);
            let mut model = BTreeSet::new();
            for (add, i) in ops {
                if add {
                    prop_assert_eq!(set.insert(i), i < capacity && model.insert(i));
                } else {
                    prop_assert_eq!(set.remove(i), model.remove(&i));
                }
            }
            prop_assert_eq!(set.count() as usize, model.len());
            prop_assert_eq!(set.iter().collect::<Vec<_>>(), model.iter().copied().collect::<Vec<_>>());
            prop_assert_eq!(set.next_from(from), model.range(from..).next().copied());
        }
    }
}
