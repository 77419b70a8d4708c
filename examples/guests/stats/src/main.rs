//! Summary statistics of the numbers on stdin, written as one JSON object on stdout: a plain
//! Rust program with `std`, nothing of the task SDK. Built for `wasm32-wasip1` it runs as a work
//! unit unchanged (stdin is the unit's input, stdout its output, stderr its log); built for the
//! host it is its own native cross-check: `echo 1 2 3 | cargo run -p example-stats`.
//!
//! Exit code 2 when there are no numbers, 3 for a word that is not a number.

use std::io::{Read, Write};

fn main() {
    let mut text = String::new();
    if let Err(e) = std::io::stdin().read_to_string(&mut text) {
        eprintln!("cannot read stdin: {e}");
        std::process::exit(1);
    }
    match example_stats::summarize(&text) {
        Ok((json, n)) => {
            eprintln!("{n} numbers");
            if std::io::stdout().write_all(json.as_bytes()).is_err() {
                std::process::exit(1);
            }
        }
        Err(refusal) => {
            eprintln!("no statistics: {refusal:?}");
            std::process::exit(refusal.code());
        }
    }
}
