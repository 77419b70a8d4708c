//! Summary statistics of the numbers in a text, as one JSON object: the computation of the
//! `example-stats` program, kept here so tests can run it natively beside the wasm build.
//!
//! The distinct values are counted with a `HashMap`, whose hasher `std` seeds from the system's
//! randomness: in the sandbox that is a stream keyed by the unit's input, so every peer counts
//! alike (and the count does not depend on the seed anyway).

use std::collections::HashMap;

/// Why a text has no statistics, with the exit code the program ends with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// No numbers at all (exit code 2).
    Empty,
    /// A word that is not a finite number (exit code 3).
    NotANumber(String),
}

impl Refusal {
    pub fn code(&self) -> i32 {
        match self {
            Self::Empty => 2,
            Self::NotANumber(_) => 3,
        }
    }
}

/// The statistics of the whitespace-separated numbers of `text`, and how many distinct values
/// there were.
pub fn summarize(text: &str) -> Result<(String, usize), Refusal> {
    let mut values = Vec::new();
    for word in text.split_whitespace() {
        match word.parse::<f64>() {
            Ok(v) if v.is_finite() => values.push(v),
            _ => return Err(Refusal::NotANumber(word.to_owned())),
        }
    }
    if values.is_empty() {
        return Err(Refusal::Empty);
    }
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    let variance = values.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n;
    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let mut counts: HashMap<u64, u32> = HashMap::new();
    for v in &values {
        *counts.entry(v.to_bits()).or_default() += 1;
    }
    let json = format!(
        "{{\"n\":{},\"distinct\":{},\"mean\":{mean:?},\"variance\":{variance:?},\"min\":{min:?},\"max\":{max:?}}}\n",
        values.len(),
        counts.len()
    );
    Ok((json, values.len()))
}
