//! Counts the primes in `[start, end)` with a segmented sieve of Eratosthenes over odd numbers.
//!
//! Memory stays small whatever the range: the base primes up to √end plus one segment buffer.
//! The unit checkpoints after every batch of segments, so a long range survives interruption.

use serde::{Deserialize, Serialize};
use task_sdk::{Context, Error};

/// Largest accepted `end`; keeps the base primes (up to √end) to a few megabytes.
pub const MAX_END: u64 = 100_000_000_000_000;
/// Largest accepted range length.
pub const MAX_SPAN: u64 = 10_000_000_000;

/// Numbers covered by one segment (its buffer holds the odd half).
const SEGMENT: u64 = 1 << 20;
/// Segments between checkpoints.
const SEGMENTS_PER_BATCH: u64 = 16;

/// The half-open range `[start, end)` to count primes in.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Input {
    pub start: u64,
    pub end: u64,
}

/// The range and how many primes it holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Output {
    pub start: u64,
    pub end: u64,
    pub count: u64,
}

impl Input {
    /// Rejects reversed, oversized or out-of-range requests.
    pub fn validate(&self) -> Result<(), String> {
        if self.start > self.end {
            return Err(format!("start {} is after end {}", self.start, self.end));
        }
        if self.end > MAX_END {
            return Err(format!("end {} exceeds {MAX_END}", self.end));
        }
        if self.end - self.start > MAX_SPAN {
            return Err(format!(
                "range of {} numbers exceeds {MAX_SPAN}",
                self.end - self.start
            ));
        }
        Ok(())
    }
}

/// All primes `≤ limit`, by a plain sieve (`limit` is at most √[`MAX_END`] = 10⁷).
fn base_primes(limit: u64) -> Vec<u64> {
    let limit = limit as usize;
    let mut composite = vec![false; limit + 1];
    let mut primes = Vec::new();
    for n in 2..=limit {
        if !composite[n] {
            primes.push(n as u64);
            let mut m = n * n;
            while m <= limit {
                composite[m] = true;
                m += n;
            }
        }
    }
    primes
}

/// A sieve for ranges ending at or before `end`.
struct Sieve {
    primes: Vec<u64>,
    segment: Vec<bool>,
}

impl Sieve {
    fn new(end: u64) -> Self {
        Sieve {
            primes: base_primes(end.saturating_sub(1).isqrt()),
            segment: Vec::new(),
        }
    }

    /// The number of primes in `[lo, hi)`; needs every prime `≤ √(hi − 1)` in `self.primes`.
    fn count(&mut self, lo: u64, hi: u64) -> u64 {
        if lo >= hi {
            return 0;
        }
        let two = u64::from(lo <= 2 && 2 < hi);
        // Odd numbers first, first + 2, … below hi; slot i stands for first + 2i.
        let first = lo | 1;
        if first >= hi {
            return two;
        }
        let slots = ((hi - first).div_ceil(2)) as usize;
        self.segment.clear();
        self.segment.resize(slots, true);
        for &p in self.primes.iter().skip(1) {
            if p * p >= hi {
                break;
            }
            // The first odd multiple of p that is at least max(first, p²).
            let mut m = first.div_ceil(p) * p;
            if m.is_multiple_of(2) {
                m += p;
            }
            m = m.max(p * p);
            let mut slot = ((m - first) / 2) as usize;
            while slot < slots {
                self.segment[slot] = false;
                slot += p as usize;
            }
        }
        if first == 1 {
            self.segment[0] = false;
        }
        two + self.segment.iter().filter(|&&is_prime| is_prime).count() as u64
    }
}

/// The whole computation, without the SDK. Expects an input that passed [`Input::validate`].
pub fn compute(input: &Input) -> Output {
    let mut sieve = Sieve::new(input.end);
    let mut count = 0;
    let mut lo = input.start;
    while lo < input.end {
        let hi = lo.saturating_add(SEGMENT).min(input.end);
        count += sieve.count(lo, hi);
        lo = hi;
    }
    Output {
        start: input.start,
        end: input.end,
        count,
    }
}

/// Where a run stands: everything below `next` is counted. `start` and `end` tie it to its input.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub start: u64,
    pub end: u64,
    pub next: u64,
    pub count: u64,
}

/// The work unit: [`compute`] in batches of segments, with a checkpoint and a progress report
/// after each batch, resuming from the checkpoint it is started with.
pub fn unit(input: Input, ctx: &mut Context) -> Result<Output, Error> {
    input.validate()?;
    let mut state = match ctx.load_checkpoint::<Checkpoint>() {
        Some(cp)
            if cp.start == input.start
                && cp.end == input.end
                && (input.start..=input.end).contains(&cp.next) =>
        {
            task_sdk::info!(
                ctx,
                "resuming at {} with {} primes counted",
                cp.next,
                cp.count
            );
            cp
        }
        _ => Checkpoint {
            start: input.start,
            end: input.end,
            next: input.start,
            count: 0,
        },
    };
    let mut sieve = Sieve::new(input.end);
    let total = input.end - input.start;
    while state.next < input.end {
        for _ in 0..SEGMENTS_PER_BATCH {
            let hi = state.next.saturating_add(SEGMENT).min(input.end);
            state.count += sieve.count(state.next, hi);
            state.next = hi;
            if hi == input.end {
                break;
            }
        }
        ctx.save_checkpoint(&state)?;
        ctx.progress(state.next - input.start, total);
    }
    Ok(Output {
        start: input.start,
        end: input.end,
        count: state.count,
    })
}

task_sdk::json_unit!(unit);

#[cfg(test)]
mod tests {
    use super::*;
    use task_sdk::native::Harness;

    fn count(start: u64, end: u64) -> u64 {
        compute(&Input { start, end }).count
    }

    fn is_prime_by_division(n: u64) -> bool {
        if n < 2 {
            return false;
        }
        let mut d = 2;
        while d * d <= n {
            if n.is_multiple_of(d) {
                return false;
            }
            d += 1;
        }
        true
    }

    #[test]
    fn known_counts() {
        assert_eq!(count(0, 100), 25);
        assert_eq!(count(0, 1_000_000), 78_498);
        assert_eq!(count(0, 10_000_000), 664_579);
        assert_eq!(count(0, 0), 0);
        assert_eq!(count(2, 3), 1);
        assert_eq!(count(0, 2), 0);
        assert_eq!(count(1, 2), 0);
        assert_eq!(count(3, 4), 1);
        assert_eq!(count(4, 5), 0);
    }

    #[test]
    fn small_ranges_match_trial_division() {
        for start in 0..60 {
            for end in start..start + 60 {
                let expected = (start..end).filter(|&n| is_prime_by_division(n)).count() as u64;
                assert_eq!(count(start, end), expected, "[{start}, {end})");
            }
        }
    }

    #[test]
    fn range_above_a_billion_matches_plain_sieves() {
        let (start, end): (u64, u64) = (1_000_000_000, 1_000_000_000 + 1_000_000);
        // A second method: one flat array for the whole window, every number (not only the
        // odd ones), struck out by every base prime.
        let mut is_prime = vec![true; (end - start) as usize];
        for p in base_primes(end.isqrt()) {
            let mut m = start.div_ceil(p) * p;
            while m < end {
                is_prime[(m - start) as usize] = false;
                m += p;
            }
        }
        let expected = is_prime.iter().filter(|&&b| b).count() as u64;
        assert_eq!(expected, 48_155);
        assert_eq!(count(start, end), expected);

        // And trial division on a slice of it.
        let slice_end = start + 20_000;
        let by_division = (start..slice_end)
            .filter(|&n| is_prime_by_division(n))
            .count();
        assert_eq!(count(start, slice_end), by_division as u64);
    }

    #[test]
    fn absurd_input_is_rejected() {
        assert!(Input { start: 5, end: 4 }.validate().is_err());
        assert!(
            Input {
                start: 0,
                end: MAX_SPAN + 1
            }
            .validate()
            .is_err()
        );
        assert!(
            Input {
                start: MAX_END,
                end: MAX_END + 1
            }
            .validate()
            .is_err()
        );
        assert!(
            Input {
                start: MAX_END - MAX_SPAN,
                end: MAX_END
            }
            .validate()
            .is_ok()
        );
        let err = Harness::json(&Input {
            start: 0,
            end: u64::MAX,
        })
        .run_json(unit);
        assert_eq!(err.result.unwrap_err().code(), Error::UNIT);
    }

    #[test]
    fn unit_matches_compute_and_checkpoints() {
        let input = Input {
            start: 10_000_000,
            end: 10_000_000 + 40 * SEGMENT + 123,
        };
        let outcome = Harness::json(&input).run_json(unit);
        let expected = serde_json::to_vec(&compute(&input)).unwrap();
        assert_eq!(outcome.result.unwrap(), expected);
        let total = input.end - input.start;
        assert_eq!(outcome.progress, Some((total, total)));
        let last: Checkpoint = serde_json::from_slice(&outcome.checkpoint.unwrap()).unwrap();
        assert_eq!(last.next, input.end);
    }

    #[test]
    fn unit_resumes_from_midway_checkpoint() {
        let input = Input {
            start: 1_000,
            end: 1_000 + 3 * SEGMENTS_PER_BATCH * SEGMENT,
        };
        let next = input.start + SEGMENTS_PER_BATCH * SEGMENT + 77;
        let midway = Checkpoint {
            start: input.start,
            end: input.end,
            next,
            count: count(input.start, next),
        };
        let resumed = Harness::json(&input)
            .checkpoint(Some(serde_json::to_vec(&midway).unwrap()))
            .run_json(unit);
        assert!(
            resumed
                .logs
                .iter()
                .any(|(_, line)| line.contains("resuming"))
        );
        let expected = serde_json::to_vec(&compute(&input)).unwrap();
        assert_eq!(resumed.result.unwrap(), expected);

        // A checkpoint of another range is ignored rather than trusted.
        let foreign = Checkpoint { start: 0, ..midway };
        let fresh = Harness::json(&input)
            .checkpoint(Some(serde_json::to_vec(&foreign).unwrap()))
            .run_json(unit);
        assert_eq!(fresh.result.unwrap(), expected);
    }
}
