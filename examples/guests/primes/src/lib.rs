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

/// The smallest odd primes, struck out by copying a pattern instead of one by one.
const PRESIEVED: [u64; 5] = [3, 5, 7, 11, 13];
/// The pattern's period, in odd numbers: 3 · 5 · 7 · 11 · 13.
const PERIOD: usize = 15_015;

/// One period of odd numbers 1, 3, 5, … with those having a factor in [`PRESIEVED`] struck out:
/// 2j + 1 is a multiple of odd p exactly when j = (p − 1)/2 + k·p.
fn presieve_pattern() -> Vec<bool> {
    let mut pattern = vec![true; PERIOD];
    for p in PRESIEVED {
        let p = p as usize;
        for j in ((p - 1) / 2..PERIOD).step_by(p) {
            pattern[j] = false;
        }
    }
    pattern
}

/// A segmented sieve walking `[lo, end)` one segment at a time.
///
/// A segment starts as a copy of the odd numbers with no factor in [`PRESIEVED`] (a repeating
/// pattern), which removes about two fifths of all the strikes; the other odd base primes then
/// strike their multiples. Each keeps the next odd multiple it strikes, carried from one
/// segment to the next, so only the first segment divides, once per prime.
struct Sieve {
    /// The odd primes above 13 up to √(end − 1).
    primes: Vec<u64>,
    /// For each of `primes`, its next odd multiple at or above `max(lo | 1, p²)`.
    next: Vec<u64>,
    segment: Vec<bool>,
    /// `pattern[j]`: whether 2j + 1 has no factor in [`PRESIEVED`]; `PERIOD` entries.
    pattern: Vec<bool>,
    /// Where the next segment starts.
    lo: u64,
}

impl Sieve {
    /// A sieve for `[start, end)`, positioned at `start`.
    fn new(start: u64, end: u64) -> Self {
        let primes: Vec<u64> = base_primes(end.saturating_sub(1).isqrt())
            .into_iter()
            .filter(|&p| p > PRESIEVED[PRESIEVED.len() - 1])
            .collect();
        let first = start | 1;
        let next = primes
            .iter()
            .map(|&p| {
                let mut m = first.div_ceil(p) * p;
                if m.is_multiple_of(2) {
                    m += p;
                }
                m.max(p * p)
            })
            .collect();
        Sieve {
            primes,
            next,
            segment: Vec::new(),
            pattern: presieve_pattern(),
            lo: start,
        }
    }

    /// The number of primes in `[self.lo, hi)`, moving the sieve on to `hi`.
    fn count_to(&mut self, hi: u64) -> u64 {
        let lo = self.lo;
        self.lo = hi.max(lo);
        if lo >= hi {
            return 0;
        }
        let two = u64::from(lo <= 2 && 2 < hi);
        // Odd numbers first, first + 2, … below hi; slot i stands for first + 2i. Segments
        // after this one start at `first + 2 · slots`, which is `hi | 1`: the carried multiples
        // stay aligned with their slots.
        let first = lo | 1;
        if first >= hi {
            return two;
        }
        let slots = ((hi - first).div_ceil(2)) as usize;
        self.segment.clear();
        let mut offset = ((first / 2) % PERIOD as u64) as usize;
        while self.segment.len() < slots {
            let take = (PERIOD - offset).min(slots - self.segment.len());
            self.segment
                .extend_from_slice(&self.pattern[offset..offset + take]);
            offset = 0;
        }
        // A plain slice, so the marking loop keeps its pointer and length in registers rather
        // than reloading them from `self` after every store.
        let segment = &mut self.segment[..];
        for (&p, next) in self.primes.iter().zip(self.next.iter_mut()) {
            if p * p >= hi {
                break;
            }
            if *next >= hi {
                continue;
            }
            let mut slot = ((*next - first) / 2) as usize;
            while slot < segment.len() {
                segment[slot] = false;
                slot += p as usize;
            }
            *next = first + 2 * slot as u64;
        }
        // The pattern struck the presieved primes themselves, and left 1.
        for p in PRESIEVED {
            if first <= p && p < hi {
                segment[((p - first) / 2) as usize] = true;
            }
        }
        if first == 1 {
            segment[0] = false;
        }
        two + count_true(segment)
    }
}

/// How many of `flags` are `true`, eight at a time: a `bool` is the byte 0 or 1, so the top byte
/// of a word times `0x0101…01` is the sum of its eight bytes. Faster than counting byte by byte
/// natively, and much faster on wasm32, where the byte-wise count vectorised four bytes wide.
fn count_true(flags: &[bool]) -> u64 {
    let mut words = flags.chunks_exact(8);
    let mut count = 0;
    for word in &mut words {
        let bytes: [u8; 8] = std::array::from_fn(|i| u8::from(word[i]));
        count += u64::from_le_bytes(bytes).wrapping_mul(0x0101_0101_0101_0101) >> 56;
    }
    count + words.remainder().iter().filter(|&&b| b).count() as u64
}

/// The whole computation, without the SDK. Expects an input that passed [`Input::validate`].
pub fn compute(input: &Input) -> Output {
    let mut sieve = Sieve::new(input.start, input.end);
    let mut count = 0;
    let mut lo = input.start;
    while lo < input.end {
        let hi = lo.saturating_add(SEGMENT).min(input.end);
        count += sieve.count_to(hi);
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
    let mut sieve = Sieve::new(state.next, input.end);
    let total = input.end - input.start;
    while state.next < input.end {
        for _ in 0..SEGMENTS_PER_BATCH {
            let hi = state.next.saturating_add(SEGMENT).min(input.end);
            state.count += sieve.count_to(hi);
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

    /// A second method for ranges above √end: one flat array for the whole window, every number
    /// (not only the odd ones), struck out by every base prime.
    fn count_by_flat_sieve(start: u64, end: u64) -> u64 {
        let mut is_prime = vec![true; (end - start) as usize];
        for p in base_primes(end.isqrt()) {
            let mut m = start.div_ceil(p) * p;
            while m < end {
                is_prime[(m - start) as usize] = false;
                m += p;
            }
        }
        is_prime.iter().filter(|&&b| b).count() as u64
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
        let expected = count_by_flat_sieve(start, end);
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
    fn multiples_carried_across_segments_match_a_flat_sieve() {
        // Odd and even starts, several segments, a short last one: the multiples each prime
        // carries from segment to segment must land on the same numbers a flat sieve strikes.
        for start in [1_000_000_001u64, 2_000_000_000] {
            let end = start + 3 * SEGMENT + 1_234;
            assert_eq!(
                count(start, end),
                count_by_flat_sieve(start, end),
                "[{start}, {end})"
            );
        }
    }

    #[test]
    fn counting_by_words_matches_counting_one_by_one() {
        let mut rng = task_sdk::Rng::seed_from_u64(7);
        for len in (0..40).chain([1 << 10, (1 << 10) + 5]) {
            let flags: Vec<bool> = (0..len).map(|_| rng.next_u32().is_multiple_of(3)).collect();
            let expected = flags.iter().filter(|&&b| b).count() as u64;
            assert_eq!(count_true(&flags), expected, "length {len}");
        }
        assert_eq!(count_true(&[true; 64]), 64);
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
