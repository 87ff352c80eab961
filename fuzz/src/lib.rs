//! Support shared by the fuzz targets in `fuzz_targets/`: the time bar every
//! input must stay under, and the text form in which the targets for
//! ConfigMap-based records receive their key/value data.
//!
//! libFuzzer's own `-timeout` counts whole seconds, too coarse for the bar of
//! issue 17 (no input may take more than 100 ms), so each target runs its
//! check through [`timed`], which measures every input and fails the run on
//! one that is slow on its own, not because a neighbour took the CPU.

use std::collections::BTreeMap;
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

/// ConfigMap data from fuzz input: one `key=value` per line, split at the
/// first `=`; a line without one is a key with an empty value, and a later
/// line overrides an earlier one of the same key (a map has one value per
/// key). Values keep their spaces, so the decoders' trimming is exercised.
/// Bytes that are not UTF-8 become U+FFFD: ConfigMap `data` is text.
///
/// A line-oriented text form, rather than a structured decoding of the
/// bytes, keeps the seeds readable (`state=active`) and lets libFuzzer's
/// dictionary-like mutations (inserting bytes seen in comparisons) build
/// keys and values.
pub fn config_map(data: &[u8]) -> BTreeMap<String, String> {
    String::from_utf8_lossy(data)
        .split('\n')
        .filter(|line| !line.is_empty())
        .map(|line| match line.split_once('=') {
            Some((k, v)) => (k.to_owned(), v.to_owned()),
            None => (line.to_owned(), String::new()),
        })
        .collect()
}

/// A health verdict that lets a member stand for election.
pub const HEALTHY: counterweight_core::ha::HealthVerdict = counterweight_core::ha::HealthVerdict {
    abnormal: false,
    meets_threshold: true,
    data_behind: false,
};

/// Runs `node` alone for `steps` timer wake-ups from `*now_ms`, as the
/// controller's HA loop does (it sleeps until [`Node::next_tick_ms`] and
/// ticks), checking every action on the way with [`check_actions`]. Time
/// moves forward at least 1 ms per step and at most one lease, so a node
/// with nothing to wait for still sees its lease and election timers run.
///
/// [`Node::next_tick_ms`]: counterweight_core::ha::Node::next_tick_ms
pub fn drive(node: &mut counterweight_core::ha::Node, now_ms: &mut u64, steps: usize) {
    use counterweight_core::ha::Event;
    check_actions(&node.handle(*now_ms, Event::Health(HEALTHY)));
    for _ in 0..steps {
        let lease = node.config().lease_ms;
        let next = node
            .next_tick_ms()
            .clamp(now_ms.saturating_add(1), now_ms.saturating_add(lease));
        *now_ms = next;
        check_actions(&node.handle(next, Event::Tick));
    }
}

/// Every message a node sends encodes, and decodes to itself: a peer must
/// be able to read what this node says.
pub fn check_actions(actions: &[counterweight_core::ha::Action]) {
    use counterweight_core::ha::{Action, Envelope};
    for action in actions {
        if let Action::Send(env) = action {
            let bytes = env.to_json().expect("an envelope encodes");
            let back = Envelope::from_json(&bytes).expect("an envelope decodes");
            assert_eq!(&back, env, "envelope round trip");
        }
    }
}
