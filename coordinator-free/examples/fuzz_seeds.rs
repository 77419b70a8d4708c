//! Writes the fuzz targets' seed inputs, made with the project's own encoders, into
//! `fuzz/corpus/<target>/seed-NN`: run once before a first fuzzing session.
//!
//! ```sh
//! cargo run -p coordinator-free --example fuzz_seeds
//! ```

use std::path::Path;

use coordinator_free::fuzzing::{TARGETS, seeds};

fn main() -> std::io::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
    for (target, _) in TARGETS {
        let dir = root.join(target);
        std::fs::create_dir_all(&dir)?;
        let seeds = seeds(target);
        for (n, seed) in seeds.iter().enumerate() {
            std::fs::write(dir.join(format!("seed-{n:02}")), seed)?;
        }
        println!("{target}: {} seeds in {}", seeds.len(), dir.display());
    }
    Ok(())
}
