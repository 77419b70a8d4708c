//! Estimating the network's size from the peers the overlay's shuffles name.
//!
//! A shuffle carries a few peers drawn from the views of a peer a random walk ended at: close
//! enough to a uniform sample of the network. Among `k` uniform draws from `N` peers, the
//! expected number of distinct ones is `N (1 − (1 − 1/N)^k)`; the census keeps the last
//! [`MAX_SAMPLES`] draws, counts the distinct ones and solves that for `N` (the birthday
//! estimator: repeats come sooner in a small network). Until some peer has been named twice
//! it only knows a lower bound. No messages are spent on it, so it sharpens only as fast as
//! shuffles arrive; how fast that is in a large network has not been measured.

use std::collections::{HashMap, VecDeque};

use crate::peer_id::PeerId;

/// Draws kept; the oldest are forgotten first, so the estimate follows a changing network.
pub const MAX_SAMPLES: usize = 4096;
/// Draws needed before anything is said.
pub const MIN_SAMPLES: usize = 32;

/// What the census says of the network's size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Estimate {
    /// About this many peers.
    About(u64),
    /// No peer was named twice yet: at least this many.
    AtLeast(u64),
}

impl Estimate {
    /// A size to plan with: the estimate, or the lower bound.
    pub fn peers(self) -> u64 {
        match self {
            Self::About(n) | Self::AtLeast(n) => n,
        }
    }
}

#[derive(Debug, Default)]
pub struct Census {
    samples: VecDeque<PeerId>,
    counts: HashMap<PeerId, u32>,
    /// Worked out when a draw arrives (a few a minute), not each time it is asked for (after
    /// every input of the overlay's driver).
    estimate: Option<Estimate>,
}

impl Census {
    /// Counts one draw.
    pub fn sample(&mut self, peer: PeerId) {
        if self.samples.len() == MAX_SAMPLES
            && let Some(old) = self.samples.pop_front()
            && let Some(count) = self.counts.get_mut(&old)
        {
            *count -= 1;
            if *count == 0 {
                self.counts.remove(&old);
            }
        }
        self.samples.push_back(peer);
        *self.counts.entry(peer).or_insert(0) += 1;
        self.estimate = self.work_out();
    }

    pub fn samples(&self) -> usize {
        self.samples.len()
    }

    pub fn estimate(&self) -> Option<Estimate> {
        self.estimate
    }

    fn work_out(&self) -> Option<Estimate> {
        let k = self.samples.len();
        if k < MIN_SAMPLES {
            return None;
        }
        let distinct = self.counts.len();
        if distinct == k {
            // No repeat in k draws is likely only when N is at least about k²/2.
            let k = k as u64;
            return Some(Estimate::AtLeast(k * k / 2));
        }
        Some(Estimate::About(solve(k as f64, distinct as f64)))
    }
}

/// The `n` whose expected number of distinct peers in `k` draws is `distinct` (the expectation
/// grows with `n`, so bisection finds it).
fn solve(k: f64, distinct: f64) -> u64 {
    let expected = |n: f64| n * (1.0 - (1.0 - 1.0 / n).powf(k));
    let (mut low, mut high) = (distinct.max(1.0), 1e12_f64);
    for _ in 0..200 {
        let mid = (low * high).sqrt();
        if expected(mid) < distinct {
            low = mid;
        } else {
            high = mid;
        }
        if high / low < 1.0 + 1e-6 {
            break;
        }
    }
    high.round() as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    fn id(n: u64) -> PeerId {
        let mut bytes = [0u8; 32];
        bytes[..8].copy_from_slice(&n.to_le_bytes());
        PeerId::from_bytes(bytes)
    }

    /// Uniform draws from networks of several sizes: the estimate lands within 15 % once
    /// hundreds of repeats were seen (25 % for 50 peers, where most draws are repeats and the
    /// few peers not yet named weigh a lot).
    #[test]
    fn uniform_draws_estimate_the_size() {
        let mut rng = Rng::seed_from_u64(7);
        for (n, draws, tolerance) in [
            (50u64, 100, 0.25),
            (200, 400, 0.15),
            (1_000, 1_500, 0.15),
            (5_000, 4_096, 0.15),
        ] {
            let mut census = Census::default();
            for _ in 0..draws {
                census.sample(id(rng.below(n)));
            }
            let Some(Estimate::About(estimate)) = census.estimate() else {
                panic!("{n}: {:?}", census.estimate());
            };
            let error = (estimate as f64 - n as f64).abs() / n as f64;
            assert!(error < tolerance, "{n} peers estimated at {estimate}");
        }
    }

    #[test]
    fn too_few_draws_say_nothing_and_no_repeat_gives_a_lower_bound() {
        let mut census = Census::default();
        for i in 0..(MIN_SAMPLES as u64 - 1) {
            census.sample(id(i));
        }
        assert_eq!(census.estimate(), None);
        census.sample(id(1_000));
        assert_eq!(census.estimate(), Some(Estimate::AtLeast(32 * 32 / 2)));
    }

    #[test]
    fn old_draws_are_forgotten_so_the_estimate_follows_the_network() {
        let mut rng = Rng::seed_from_u64(3);
        let mut census = Census::default();
        for _ in 0..MAX_SAMPLES {
            census.sample(id(rng.below(100)));
        }
        let small = census.estimate().map(Estimate::peers).unwrap();
        assert!((85..=115).contains(&small), "{small}");
        // The network grows to 2,000: once the window holds only new draws, so does the
        // estimate.
        for _ in 0..MAX_SAMPLES {
            census.sample(id(rng.below(2_000)));
        }
        assert_eq!(census.samples(), MAX_SAMPLES);
        let large = census.estimate().map(Estimate::peers).unwrap();
        assert!((1_700..=2_300).contains(&large), "{large}");
    }
}
