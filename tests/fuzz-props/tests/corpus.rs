//! Replays every committed fuzz corpus (`fuzz/corpus/<target>/`) through the
//! check its fuzz target runs, on stable and without libFuzzer, so that the
//! inputs the fuzzer kept (the ones that reached new code, and every past
//! finding) keep their properties in the normal suite.
//!
//! A corpus directory that is missing or empty fails: a renamed target or a
//! lost corpus must not pass as "nothing to replay". Each replay is bounded
//! by its number of files and by [`BUDGET`].

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use counterweight_fuzz_props::TARGETS;

/// The most one target's replay may take. A debug run took 0.33 s for the
/// slowest corpus (admission_review, 914 files) with the machine's load
/// average at 18; this leaves room for a far busier one, and still ends a
/// check that hangs or has become a hundred times slower.
const BUDGET: Duration = Duration::from_secs(60);

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz")
}

/// The files of `fuzz/corpus/<target>/`, sorted; fails when the directory
/// is missing or holds none.
fn corpus(target: &str) -> Vec<PathBuf> {
    let dir = fuzz_dir().join("corpus").join(target);
    let entries = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("the corpus of {target} is missing ({}): {e}", dir.display()));
    let mut files: Vec<PathBuf> = entries
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    assert!(
        !files.is_empty(),
        "the corpus of {target} ({}) is empty",
        dir.display()
    );
    files
}

fn replay(target: &str) {
    let (_, check) = TARGETS
        .iter()
        .find(|(name, _)| *name == target)
        .unwrap_or_else(|| panic!("no check for {target}"));
    let files = corpus(target);
    let started = Instant::now();
    for (i, file) in files.iter().enumerate() {
        assert!(
            started.elapsed() < BUDGET,
            "{target}: {i} of {} files replayed in {BUDGET:?}, over the budget",
            files.len()
        );
        let data = std::fs::read(file).unwrap();
        if let Err(panic) = catch_unwind(AssertUnwindSafe(|| check(&data))) {
            let message = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("(no message)");
            panic!("{target}: {} breaks a property: {message}", file.display());
        }
    }
    eprintln!(
        "{target}: {} files replayed in {:.2} s",
        files.len(),
        started.elapsed().as_secs_f64()
    );
}

macro_rules! replay_tests {
    ($($target:ident),* $(,)?) => {
        $(
            #[test]
            fn $target() {
                replay(stringify!($target));
            }
        )*
        /// The tests above, the fuzz targets and the corpora name the same
        /// targets, so none is left out of the replay.
        #[test]
        fn every_target_has_a_check_and_a_corpus() {
            let tested: BTreeSet<&str> = [$(stringify!($target)),*].into_iter().collect();
            let checks: BTreeSet<&str> = TARGETS.iter().map(|(name, _)| *name).collect();
            let stems = |sub: &str, want_dir: bool| -> BTreeSet<String> {
                std::fs::read_dir(fuzz_dir().join(sub))
                    .unwrap()
                    .map(|e| e.unwrap().path())
                    .filter(|p| p.is_dir() == want_dir)
                    .filter_map(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
                    .collect()
            };
            let owned = |s: &BTreeSet<&str>| s.iter().map(|n| n.to_string()).collect::<BTreeSet<_>>();
            assert_eq!(owned(&tested), owned(&checks), "tests vs TARGETS");
            assert_eq!(stems("fuzz_targets", false), owned(&checks), "fuzz/fuzz_targets vs TARGETS");
            assert_eq!(stems("corpus", true), owned(&checks), "fuzz/corpus vs TARGETS");
        }
    };
}

replay_tests!(
    admission_pod,
    admission_review,
    command_request,
    ha_config,
    peer_message,
    policy,
    state_record,
);
