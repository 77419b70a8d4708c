//! Escape-time iteration counts for one tile of the Mandelbrot set.
//!
//! Float-heavy but deterministic: only `+ - *` on `f64`, which IEEE 754 rounds identically
//! everywhere (Rust never fuses them into FMA on its own).

use serde::{Deserialize, Serialize};
use task_sdk::{Context, Error};

/// Largest tile accepted, in pixels.
pub const MAX_PIXELS: u64 = 1 << 22;
/// Largest iteration cap accepted.
pub const MAX_ITER: u32 = 1 << 20;

/// A tile of the complex plane: pixel `(i, j)` samples `x0 + i·(x1−x0)/width` and
/// `y0 + j·(y1−y0)/height`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Input {
    pub x0: f64,
    pub y0: f64,
    pub x1: f64,
    pub y1: f64,
    pub width: u32,
    pub height: u32,
    pub max_iter: u32,
}

/// Iteration counts, row-major, and an integer fold of them for quick comparison.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Output {
    pub width: u32,
    pub height: u32,
    pub iterations: Vec<u32>,
    pub checksum: u64,
}

impl Input {
    /// Rejects tiles that are too large or whose coordinates are not finite, before anything is
    /// allocated.
    pub fn validate(&self) -> Result<(), String> {
        let pixels = u64::from(self.width) * u64::from(self.height);
        if pixels > MAX_PIXELS {
            return Err(format!(
                "tile has {pixels} pixels, at most {MAX_PIXELS} allowed"
            ));
        }
        if self.max_iter > MAX_ITER {
            return Err(format!("max_iter {} exceeds {MAX_ITER}", self.max_iter));
        }
        let spans = [self.x1 - self.x0, self.y1 - self.y0];
        if !spans.iter().all(|s| s.is_finite()) {
            return Err("tile coordinates must be finite".to_owned());
        }
        Ok(())
    }
}

/// Iterations before `z ← z² + c` leaves the disc of radius 2, capped at `max_iter`. A point
/// with `|c| > 2` escapes after one step.
pub fn escape_time(cx: f64, cy: f64, max_iter: u32) -> u32 {
    let (mut zx, mut zy) = (0.0f64, 0.0f64);
    let mut n = 0;
    while n < max_iter {
        let (x2, y2) = (zx * zx, zy * zy);
        if x2 + y2 > 4.0 {
            break;
        }
        zy = 2.0 * zx * zy + cy;
        zx = x2 - y2 + cx;
        n += 1;
    }
    n
}

fn push_row(input: &Input, row: u32, out: &mut Vec<u32>) {
    let dx = (input.x1 - input.x0) / f64::from(input.width);
    let dy = (input.y1 - input.y0) / f64::from(input.height);
    let cy = input.y0 + f64::from(row) * dy;
    for col in 0..input.width {
        let cx = input.x0 + f64::from(col) * dx;
        out.push(escape_time(cx, cy, input.max_iter));
    }
}

fn checksum(iterations: &[u32]) -> u64 {
    iterations.iter().fold(0xcbf2_9ce4_8422_2325, |h, &n| {
        (h ^ u64::from(n)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn finish(input: &Input, iterations: Vec<u32>) -> Output {
    Output {
        width: input.width,
        height: input.height,
        checksum: checksum(&iterations),
        iterations,
    }
}

/// The whole computation, without the SDK. Expects an input that passed [`Input::validate`].
pub fn compute(input: &Input) -> Output {
    let mut iterations = Vec::with_capacity(input.width as usize * input.height as usize);
    for row in 0..input.height {
        push_row(input, row, &mut iterations);
    }
    finish(input, iterations)
}

/// The work unit: validates, then computes row by row with progress every 16 rows.
pub fn unit(input: Input, ctx: &mut Context) -> Result<Output, Error> {
    input.validate()?;
    task_sdk::debug!(
        ctx,
        "tile {}x{}, max_iter {}",
        input.width,
        input.height,
        input.max_iter
    );
    let mut iterations = Vec::with_capacity(input.width as usize * input.height as usize);
    for row in 0..input.height {
        push_row(&input, row, &mut iterations);
        if row % 16 == 15 || row + 1 == input.height {
            ctx.progress(u64::from(row) + 1, u64::from(input.height));
        }
    }
    Ok(finish(&input, iterations))
}

task_sdk::json_unit!(unit);

#[cfg(test)]
mod tests {
    use super::*;
    use task_sdk::native::Harness;

    fn tile(width: u32, height: u32, max_iter: u32) -> Input {
        Input {
            x0: -2.0,
            y0: -1.25,
            x1: 0.5,
            y1: 1.25,
            width,
            height,
            max_iter,
        }
    }

    #[test]
    fn inside_points_reach_max_iter() {
        for (cx, cy) in [(0.0, 0.0), (-1.0, 0.0), (-0.1, 0.1), (0.25, 0.0)] {
            assert_eq!(escape_time(cx, cy, 500), 500, "({cx}, {cy})");
        }
    }

    #[test]
    fn far_points_escape_at_once() {
        assert_eq!(escape_time(3.0, 0.0, 500), 1);
        assert_eq!(escape_time(-10.0, 10.0, 500), 1);
        assert_eq!(escape_time(1e300, 0.0, 500), 1);
        assert_eq!(escape_time(0.0, 0.0, 0), 0);
        // c = 1: 0, 1, 2, 5 escapes on the third step.
        assert_eq!(escape_time(1.0, 0.0, 500), 3);
    }

    #[test]
    fn tile_has_both_kinds_and_fixed_checksum() {
        let out = compute(&tile(64, 48, 200));
        assert_eq!(out.iterations.len(), 64 * 48);
        assert!(out.iterations.contains(&200));
        assert!(out.iterations.iter().any(|&n| n <= 2));
        assert_eq!(out.checksum, checksum(&out.iterations));
        assert_eq!(compute(&tile(64, 48, 200)), out);
    }

    #[test]
    fn oversized_input_is_rejected() {
        assert!(tile(1 << 12, 1 << 10, 100).validate().is_ok());
        assert!(tile(1 << 12, (1 << 10) + 1, 100).validate().is_err());
        assert!(tile(u32::MAX, u32::MAX, 100).validate().is_err());
        assert!(tile(10, 10, MAX_ITER + 1).validate().is_err());
        let huge = Input {
            x0: -f64::MAX,
            x1: f64::MAX,
            ..tile(1, 1, 1)
        };
        assert!(huge.validate().is_err());
        let err = Harness::json(&tile(u32::MAX, 2, 1))
            .run_json(unit)
            .result
            .unwrap_err();
        assert_eq!(err.code(), Error::UNIT);
    }

    #[test]
    fn unit_matches_compute() {
        let input = tile(37, 21, 300);
        let outcome = Harness::json(&input).run_json(unit);
        let expected = serde_json::to_vec(&compute(&input)).unwrap();
        assert_eq!(outcome.result.unwrap(), expected);
        assert_eq!(outcome.progress, Some((21, 21)));
    }

    #[test]
    fn empty_tile_is_fine() {
        let out = compute(&tile(0, 5, 10));
        assert!(out.iterations.is_empty());
    }
}
