//! Properties of the `policy` fuzz target: the health policy parser and validator.
//!
//! The input is the text of `policy.yaml`. `Policy::from_yaml` must return,
//! within the time bar, either a policy that keeps every rule the validator
//! promises (weights in (0, 1] summing to 1, D in [0, 1], an interval of at
//! least `MIN_INTERVAL`, unique DNS-label component names, namespaces,
//! selector label keys Kubernetes allows, check timeouts above zero and
//! below the interval) or at least one
//! problem. An accepted policy, written in its serialized (JSON) form,
//! must read back through `Policy::from_yaml` (JSON is YAML) as the same
//! policy, so that its `Serialize` (durations as text, defaults filled in)
//! says what the validator accepted. Not through `serde_yaml_ng`'s writer:
//! it writes the checks as YAML tags (`!postgres`), which the policy format
//! does not use, and nothing in Counterweight writes a policy as YAML.

use std::collections::BTreeSet;
use std::time::Duration;

use counterweight_core::names::check_label_key;
use counterweight_core::policy::{MIN_INTERVAL, Policy, WEIGHT_SUM_TOLERANCE};

use crate::support::yaml_cannot_carry;

/// Checks the target's properties on one input; panics on a violation.
pub fn check(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let policy = match Policy::from_yaml(text) {
        Ok(p) => p,
        Err(e) => {
            assert!(!e.problems().is_empty(), "a refusal names a problem");
            assert!(!e.to_string().is_empty());
            return;
        }
    };
    assert!((0.0..=1.0).contains(&policy.threshold), "{policy:?}");
    assert!(policy.interval >= MIN_INTERVAL, "{policy:?}");
    assert!(!policy.components.is_empty());
    assert!(
        (policy.weight_sum() - 1.0).abs() <= WEIGHT_SUM_TOLERANCE,
        "{policy:?}"
    );
    let mut names = BTreeSet::new();
    for c in &policy.components {
        assert!(names.insert(c.name.as_str()), "duplicate {}", c.name);
        assert!(dns_label(&c.name), "{:?}", c.name);
        assert!(c.weight > 0.0 && c.weight <= 1.0, "{c:?}");
        assert!(!c.namespaces.is_empty() && c.namespaces.iter().all(|n| dns_label(n)));
        assert!(c.min_ready >= 1);
        assert!(c.check_timeout > Duration::ZERO && c.check_timeout < policy.interval);
        assert!(policy.component(&c.name).is_some());
        for key in c
            .selector
            .match_labels
            .keys()
            .chain(c.selector.match_expressions.iter().map(|r| &r.key))
        {
            assert_eq!(check_label_key(key), Ok(()), "{key:?}");
        }
        for check in &c.checks {
            assert!(!check.describe().is_empty());
        }
    }

    let written = serde_json::to_string(&policy).expect("a policy serializes");
    // Unless it holds text JSON carries raw and the YAML 1.1 reader does
    // not read back (see `yaml_cannot_carry`; found by this target in a
    // selector's label key, which is now refused; see README.md).
    if yaml_cannot_carry(&written) {
        return;
    }
    match Policy::from_yaml(&written) {
        Ok(again) => assert_eq!(again, policy, "round trip through:\n{written}"),
        Err(e) => panic!("a written policy does not read back: {e}\n{written}"),
    }
}

fn dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}
