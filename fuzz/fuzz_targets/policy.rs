//! Fuzz target: the health policy parser and validator.
//!
//! The input is the text of `policy.yaml`. `Policy::from_yaml` must return,
//! within the time bar, either a policy that keeps every rule the validator
//! promises (weights in (0, 1] summing to 1, D in [0, 1], an interval of at
//! least `MIN_INTERVAL`, unique DNS-label component names, namespaces,
//! check timeouts above zero and below the interval) or at least one
//! problem. An accepted policy, written in its serialized (JSON) form,
//! must read back through `Policy::from_yaml` (JSON is YAML) as the same
//! policy, so that its `Serialize` (durations as text, defaults filled in)
//! says what the validator accepted. Not through `serde_yaml_ng`'s writer:
//! it writes the checks as YAML tags (`!postgres`), which the policy format
//! does not use, and nothing in Counterweight writes a policy as YAML.
//!
//! The check itself is `counterweight_fuzz_props::policy::check`, which the
//! normal suite also runs on every file of `fuzz/corpus/policy/`.

#![no_main]

use counterweight_fuzz::timed;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| timed("policy", data, counterweight_fuzz_props::policy::check));
