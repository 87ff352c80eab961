//! What several targets share: the text form in which the targets for
//! ConfigMap-based records receive their key/value data, a node driven
//! through its timers with every message it sends checked, and which text
//! a JSON document cannot carry through the YAML 1.1 reader.

use std::collections::BTreeMap;

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

/// Whether `text`, written raw into JSON (as `serde_json` writes every
/// character but the C0 controls, `"` and `\`), does not read back the
/// same through the YAML 1.1 reader that reads the policy and the HA
/// configuration: that reader folds U+0085, U+2028 and U+2029 into a space
/// even inside a quoted string, and refuses DEL, the other C1 controls,
/// U+FFFE and U+FFFF outright ("control characters are not allowed"; YAML's
/// printable set leaves them out). Both were found by the targets' round
/// trips; neither is a fault of the readers under test.
pub fn yaml_cannot_carry(text: &str) -> bool {
    text.chars().any(|c| {
        matches!(
            c,
            '\u{7f}'..='\u{9f}' | '\u{2028}' | '\u{2029}' | '\u{fffe}' | '\u{ffff}'
        )
    })
}
