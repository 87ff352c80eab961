//! Support for the fuzz targets in `fuzz_targets/`: the time bar every
//! input must stay under. What each target checks is in
//! `counterweight-fuzz-props` (`tests/fuzz-props`), which the main
//! workspace's suite also runs on every committed corpus file.
//!
//! libFuzzer's own `-timeout` counts whole seconds, too coarse for the bar of
//! issue 17 (no input may take more than 100 ms), so each target runs its
//! check through [`timed`], which measures every input and fails the run on
//! one that is slow on its own, not because a neighbour took the CPU.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The most one input may take (issue 17).
pub const BAR: Duration = Duration::from_millis(100);

/// The slowest input seen so far in this process, in nanoseconds.
static SLOWEST_NS: AtomicU64 = AtomicU64::new(0);

/// Runs `check` on `data`, timing it.
///
/// An input slower than any before is run twice more and judged by its
/// fastest run: a shared machine can stall any single run, and the first
/// inputs pay for one-time initialization, but a truly slow input is slow
/// every time. A new slowest time is printed to stderr as `SLOWEST <target>
/// <ms> ms (<len> bytes)`, so the last such line of a run is its slowest
/// input. One that stays over [`BAR`] is a failure: the panic makes libFuzzer
/// save it as a crash input.
pub fn timed(target: &str, data: &[u8], check: impl Fn(&[u8])) {
    let started = Instant::now();
    check(data);
    let mut took = started.elapsed();
    let nanos = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
    if nanos(took) <= SLOWEST_NS.load(Ordering::Relaxed) {
        return;
    }
    for _ in 0..2 {
        let again = Instant::now();
        check(data);
        took = took.min(again.elapsed());
    }
    if nanos(took) > SLOWEST_NS.fetch_max(nanos(took), Ordering::Relaxed) {
        eprintln!(
            "SLOWEST {target} {:.3} ms ({} bytes)",
            took.as_secs_f64() * 1000.0,
            data.len()
        );
    }
    assert!(
        took <= BAR,
        "{target}: an input of {} bytes took {took:?} on its fastest of three runs, over the {BAR:?} bar",
        data.len()
    );
}
