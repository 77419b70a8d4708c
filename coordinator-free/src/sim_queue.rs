//! The event queue shared by the seeded simulations of the sans-IO cores: events ordered by
//! virtual time, ties broken by the order they were scheduled in, so a run replays exactly.

use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;
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

/// Events by virtual time; equal times come out in the order they went in.
#[derive(Debug)]
pub(crate) struct EventQueue<E> {
    heap: BinaryHeap<Reverse<Scheduled<E>>>,
    order: u64,
}

impl<E> EventQueue<E> {
    pub(crate) fn new() -> Self {
        Self {
            heap: BinaryHeap::new(),
            order: 0,
        }
    }

    /// Schedules `event` at virtual time `at`.
    pub(crate) fn push(&mut self, at: Duration, event: E) {
        self.order += 1;
        self.heap.push(Reverse(Scheduled {
            at,
            order: self.order,
            event,
        }));
    }

    /// When the next event is due.
    #[cfg(test)]
    pub(crate) fn next_at(&self) -> Option<Duration> {
        self.heap.peek().map(|Reverse(s)| s.at)
    }

    /// The next event.
    pub(crate) fn pop(&mut self) -> Option<Scheduled<E>> {
        self.heap.pop().map(|Reverse(s)| s)
    }
}
