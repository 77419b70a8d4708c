//! The event queue shared by the seeded simulations of the sans-IO cores: events ordered by
//! virtual time, ties broken by the order they were scheduled in, so a run replays exactly.

use std::cmp::Ordering;
use std::time::Duration;

/// An event due at a virtual time.
#[derive(Debug)]
pub(crate) struct Scheduled<E> {
    pub(crate) at: Duration,
    pub(crate) order: u64,
    pub(crate) event: E,
}

impl<E> PartialEq for Scheduled<E> {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.order) == (other.at, other.order)
    }
}

impl<E> Eq for Scheduled<E> {}

impl<E> PartialOrd for Scheduled<E> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl<E> Ord for Scheduled<E> {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.at, self.order).cmp(&(other.at, other.order))
    }
}
