//! A token bucket: how many of something a peer may still take now, refilled at a rate up to
//! a burst (adverts a link may bring, survey questions a peer answers).

use std::time::Instant;

#[derive(Debug, Clone, Copy)]
pub(crate) struct Budget {
    tokens: f64,
    at: Instant,
    rate: f64,
    burst: f64,
}

impl Budget {
    /// A full bucket of `burst`, refilled at `rate` a second.
    pub(crate) fn new(rate: f64, burst: f64, now: Instant) -> Self {
        Self {
            tokens: burst,
            at: now,
            rate,
            burst,
        }
    }

    /// Takes one, if one is left at `now`.
    pub(crate) fn take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_burst_then_the_rate() {
        let start = Instant::now();
        let mut budget = Budget::new(10.0, 3.0, start);
        assert_eq!((0..5).filter(|_| budget.take(start)).count(), 3);
        // A tenth of a second later, one more; a long wait refills no more than the burst.
        assert!(budget.take(start + Duration::from_millis(100)));
        assert!(!budget.take(start + Duration::from_millis(100)));
        let later = start + Duration::from_secs(60);
        assert_eq!((0..5).filter(|_| budget.take(later)).count(), 3);
    }
}
