//! Monte Carlo estimate of π with an integer kernel.
//!
//! Each sample takes one 64-bit draw as two 31-bit coordinates (its top and bottom bits; every
//! bit of xoshiro256** output is of full quality) and counts it when it lies inside the quarter
//! circle of radius 2³¹, tested exactly in integer arithmetic, so the count is bit-identical on
//! every machine; the only float operation is the final division.

use serde::{Deserialize, Serialize};
use task_sdk::{Context, Error, Rng};

/// How many samples to draw, from which seed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Input {
    pub samples: u64,
    pub seed: u64,
}

/// The count of samples inside the quarter circle and the resulting estimate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Output {
    pub samples: u64,
    pub inside: u64,
    /// `4 · inside / samples`, or `0` when there are no samples.
    pub pi: f64,
}

/// Draws `n` samples from `rng` and returns how many fall inside the quarter circle.
fn count_inside(rng: &mut Rng, n: u64) -> u64 {
    let mut outside = 0;
    for _ in 0..n {
        let draw = rng.next_u64();
        let x = draw >> 33;
        let y = draw & 0x7fff_ffff;
        // With 31-bit coordinates `x² + y² < 2^63` cannot overflow, and the sample lies outside
        // the quarter circle exactly when the sum reaches 2^62, so bit 62 is the outside count.
        // A shift and an add are two instructions in every backend, where counting the outcome
        // of a comparison took Cranelift four more instructions than LLVM's x86 output.
        outside += (x * x + y * y) >> 62;
    }
    n - outside
}

fn estimate(samples: u64, inside: u64) -> Output {
    let pi = if samples == 0 {
        0.0
    } else {
        4.0 * inside as f64 / samples as f64
    };
    Output {
        samples,
        inside,
        pi,
    }
}

/// The whole computation, without the SDK.
pub fn compute(input: &Input) -> Output {
    let mut rng = Rng::seed_from_u64(input.seed);
    let inside = count_inside(&mut rng, input.samples);
    estimate(input.samples, inside)
}

const BATCH: u64 = 1 << 20;
const BATCHES_PER_CHECKPOINT: u64 = 64;

/// Where a run stands; `samples` and `seed` tie it to its input.
#[derive(Debug, Serialize, Deserialize)]
struct State {
    samples: u64,
    seed: u64,
    done: u64,
    inside: u64,
    rng: Rng,
}

/// The work unit: [`compute`] in batches, with progress per batch and a checkpoint every 64.
pub fn unit(input: Input, ctx: &mut Context) -> Result<Output, Error> {
    let mut state = match ctx.load_checkpoint::<State>() {
        Some(s) if s.samples == input.samples && s.seed == input.seed && s.done <= s.samples => s,
        _ => State {
            samples: input.samples,
            seed: input.seed,
            done: 0,
            inside: 0,
            rng: Rng::seed_from_u64(input.seed),
        },
    };
    task_sdk::info!(
        ctx,
        "pi: {} samples, starting at {}",
        input.samples,
        state.done
    );
    let mut batches = 0u64;
    while state.done < state.samples {
        let n = (state.samples - state.done).min(BATCH);
        state.inside += count_inside(&mut state.rng, n);
        state.done += n;
        ctx.progress(state.done, state.samples);
        batches += 1;
        if batches.is_multiple_of(BATCHES_PER_CHECKPOINT) && state.done < state.samples {
            ctx.save_checkpoint(&state)?;
        }
    }
    Ok(estimate(state.samples, state.inside))
}

task_sdk::json_unit!(unit);

#[cfg(test)]
mod tests {
    use super::*;
    use task_sdk::native::Harness;

    #[test]
    fn estimate_is_close_and_deterministic() {
        let input = Input {
            samples: 1_000_000,
            seed: 1,
        };
        let out = compute(&input);
        assert_eq!(out.samples, 1_000_000);
        assert!((out.pi - std::f64::consts::PI).abs() < 0.01, "{out:?}");
        assert_eq!(compute(&input), out);
        assert_ne!(compute(&Input { seed: 2, ..input }).inside, out.inside);
    }

    #[test]
    fn boundary_is_exact() {
        // x = y = 2^32 - 1 is outside; x = 2^32 - 1, y = 0 is inside (strictly below 2^64).
        let edge = u128::from(u32::MAX);
        assert!(edge * edge + edge * edge >= 1u128 << 64);
        assert!(edge * edge < 1u128 << 64);
        assert_eq!(
            compute(&Input {
                samples: 0,
                seed: 0
            })
            .pi,
            0.0
        );
    }

    #[test]
    fn unit_matches_compute() {
        let input = Input {
            samples: 3 * BATCH + 17,
            seed: 99,
        };
        let outcome = Harness::json(&input).run_json(unit);
        let expected = serde_json::to_vec(&compute(&input)).unwrap();
        assert_eq!(outcome.result.unwrap(), expected);
        assert_eq!(outcome.progress, Some((input.samples, input.samples)));
    }

    #[test]
    fn unit_resumes_from_checkpoint() {
        let input = Input {
            samples: 2 * BATCH + 5,
            seed: 3,
        };
        let mut rng = Rng::seed_from_u64(input.seed);
        let inside = count_inside(&mut rng, BATCH);
        let state = State {
            samples: input.samples,
            seed: input.seed,
            done: BATCH,
            inside,
            rng,
        };
        let outcome = Harness::json(&input)
            .checkpoint(Some(serde_json::to_vec(&state).unwrap()))
            .run_json(unit);
        let expected = serde_json::to_vec(&compute(&input)).unwrap();
        assert_eq!(outcome.result.unwrap(), expected);
    }
}
