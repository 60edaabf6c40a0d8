//! The budget of the property tests that feed hostile input (archives, env
//! files) to the parsers and extractors: a bounded number of cases in CI, or
//! batches until `COVET_FUZZ_SECS` have passed (`scripts/fuzz.sh`).

#![allow(dead_code)] // until every fuzz_* test uses it

use std::fmt::Debug;
use std::time::{Duration, Instant};

use proptest::strategy::Strategy;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

/// One case taking longer than this counts as a hang.
const CASE_LIMIT: Duration = Duration::from_secs(10);

/// Runs `test` on `cases` values drawn from `strategy` (a fresh random seed
/// per batch), repeating batches while `COVET_FUZZ_SECS` allows. A failing
/// case panics with proptest's minimal input; a case slower than
/// `CASE_LIMIT` fails as a hang.
pub(crate) fn run<S>(cases: u32, strategy: S, test: impl Fn(S::Value) -> Result<(), TestCaseError>)
where
    S: Strategy,
    S::Value: Debug,
{
    let deadline = std::env::var("COVET_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .map(|secs| Instant::now() + Duration::from_secs(secs));
    let mut batches = 0u64;
    loop {
        let mut runner = TestRunner::new(Config {
            cases,
            failure_persistence: None,
            ..Config::default()
        });
        let result = runner.run(&strategy, |value| {
            let started = Instant::now();
            test(value)?;
            if started.elapsed() > CASE_LIMIT {
                return Err(TestCaseError::fail(format!(
                    "one case took {:?}: a hang",
                    started.elapsed()
                )));
            }
            Ok(())
        });
        if let Err(e) = result {
            panic!("property failed after {batches} full batches: {e}");
        }
        batches += 1;
        match deadline {
            Some(d) if Instant::now() < d => continue,
            _ => break,
        }
    }
    if deadline.is_some() {
        eprintln!("fuzzing: {batches} batches of {cases} cases passed");
    }
}
