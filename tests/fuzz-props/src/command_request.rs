//! Properties of the `command_request` fuzz target: the operator command request decoder.
//!
//! The input is the data of the `counterweight-command` ConfigMap, one
//! `key=value` per line (see `crate::support::config_map`), decided by
//! `counterweight_core::request::decide` (the controller's reading) at a fixed instant (the
//! seeds' requests are filed around it). Whatever the data, the decision
//! must keep the rules its module documents: no `id` (or the one already
//! handled) is ignored; a forwarded command has a trimmed `id` of at most
//! `MAX_ID_LEN` bytes, a `requestedAt` that parses, is at most
//! `MAX_REQUEST_AGE` old and at most `MAX_REQUEST_SKEW` ahead, and, for a
//! switchover, a target that is a cluster name (`check_cluster_name`); a
//! rejection names its `id` and gives a reason.

use std::sync::LazyLock;

use crate::support::config_map;
use counterweight_core::ha::Command;
use counterweight_core::names::check_cluster_name;
use counterweight_core::request::{
    COMMAND_KEY, Decision, HANDLED_ID_KEY, ID_KEY, MAX_ID_LEN, MAX_REQUEST_AGE, MAX_REQUEST_SKEW,
    REQUESTED_AT_KEY, TARGET_KEY, decide,
};
use k8s_openapi::jiff::Timestamp;

static NOW: LazyLock<Timestamp> =
    LazyLock::new(|| "2026-12-05T00:00:00Z".parse().expect("a valid instant"));

/// Checks the target's properties on one input; panics on a violation.
pub fn check(data: &[u8]) {
    let map = config_map(data);
    let id = map.get(ID_KEY).map(|s| s.trim()).filter(|s| !s.is_empty());
    let handled = map.get(HANDLED_ID_KEY).map(|s| s.trim());
    match decide(&map, *NOW) {
        Decision::Ignore => {
            assert!(id.is_none() || id == handled, "ignored {map:?}");
        }
        Decision::Reject {
            id: rejected,
            reason,
        } => {
            assert_eq!(Some(rejected.as_str()), id);
            assert_ne!(id, handled);
            assert!(!reason.is_empty());
        }
        Decision::Forward {
            id: forwarded,
            command,
        } => {
            assert_eq!(Some(forwarded.as_str()), id);
            assert_ne!(id, handled);
            assert!(forwarded.len() <= MAX_ID_LEN);
            let at: Timestamp = map[REQUESTED_AT_KEY]
                .trim()
                .parse()
                .expect("a forwarded request has a valid time");
            let age = NOW.duration_since(at);
            assert!(
                age.as_secs() <= MAX_REQUEST_AGE.as_secs() as i64,
                "forwarded a request filed {age:?} ago"
            );
            assert!(
                age.as_secs() >= -(MAX_REQUEST_SKEW.as_secs() as i64),
                "forwarded a request filed {age:?} in the future"
            );
            let written = map[COMMAND_KEY].trim();
            match command {
                Command::Pause => assert_eq!(written, "pause"),
                Command::Resume => assert_eq!(written, "resume"),
                Command::Switchover { target } => {
                    assert_eq!(written, "switchover");
                    assert_eq!(map[TARGET_KEY].trim(), target);
                    assert_eq!(check_cluster_name(&target), Ok(()), "{target:?}");
                }
            }
        }
    }
}
