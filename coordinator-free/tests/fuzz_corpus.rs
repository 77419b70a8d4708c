//! Replays the committed fuzz corpus (`fuzz/corpus/<target>/`) through the same bodies the
//! fuzz targets run, so every input the fuzzer kept, and every crash it once found, stays a
//! regression test on stable Rust.

use std::fs;
use std::path::{Path, PathBuf};

use coordinator_free::fuzzing::{TARGETS, seeds};

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target)
}

#[test]
fn every_committed_corpus_file_replays() {
    for (target, body) in TARGETS {
        let dir = corpus_dir(target);
        let entries = fs::read_dir(&dir)
            .unwrap_or_else(|err| panic!("no corpus for {target} at {}: {err}", dir.display()));
        let mut replayed = 0;
        for entry in entries {
            let path = entry.expect("corpus directory entry").path();
            if !path.is_file() {
                continue;
            }
            let data = fs::read(&path).expect("corpus file reads");
            let name = path.file_name().unwrap_or_default().to_string_lossy();
            let outcome = std::panic::catch_unwind(|| body(&data));
            assert!(
                outcome.is_ok(),
                "fuzz target {target} panicked on corpus file {name}"
            );
            replayed += 1;
        }
        assert!(replayed > 0, "the corpus of {target} is empty");
        println!("{target}: replayed {replayed} corpus files");
    }
}

#[test]
fn every_target_has_a_fuzz_target_file() {
    let targets = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/fuzz_targets");
    for (target, _) in TARGETS {
        let file = targets.join(format!("{target}.rs"));
        assert!(file.is_file(), "{} is missing", file.display());
    }
}

/// The seeds made with the project's own encoders replay too, and every target has some.
#[test]
fn every_seed_replays() {
    for (target, body) in TARGETS {
        let seeds = seeds(target);
        assert!(!seeds.is_empty(), "{target} has no seeds");
        for (n, seed) in seeds.iter().enumerate() {
            let outcome = std::panic::catch_unwind(|| body(seed));
            assert!(outcome.is_ok(), "fuzz target {target} panicked on seed {n}");
        }
    }
}
