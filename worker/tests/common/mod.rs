//! Helpers shared by the tests that run `worker submit` as a process.

use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

/// What a finished `worker submit` left behind.
pub struct Run {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

/// Waits for `child`, whose output goes to `dir/TAG.stdout` and `dir/TAG.stderr`, at most
/// `limit`; past that it is killed and the test fails with its stderr.
pub fn finish(mut child: Child, dir: &Path, tag: &str, limit: Duration) -> Run {
    let read = |stream: &str| {
        std::fs::read_to_string(dir.join(format!("{tag}.{stream}"))).unwrap_or_default()
    };
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "worker submit did not finish within {limit:?}; stderr: {}",
                read("stderr")
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Run {
        code: status.code(),
        stdout: read("stdout"),
        stderr: read("stderr"),
    }
}

/// The number before `label` in a summary, e.g. "12 units run this time".
pub fn count_before(stdout: &str, label: &str) -> u64 {
    let at = stdout
        .find(label)
        .unwrap_or_else(|| panic!("{label:?} in {stdout}"));
    stdout[..at]
        .split_whitespace()
        .last()
        .and_then(|w| w.parse().ok())
        .unwrap_or_else(|| panic!("a count before {label:?} in {stdout}"))
}
