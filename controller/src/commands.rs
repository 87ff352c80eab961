//! Operator commands through a request ConfigMap (`cwctl switchover`,
//! `pause`, `resume`).
//!
//! `cwctl` never writes the state ConfigMap: only the HA loop does, so that
//! every change of role or epoch is a decision of the state machine. An
//! operator instead files a request: the ConfigMap [`COMMAND_CONFIGMAP`] in
//! the controller namespace, with data
//!
//! | key | value |
//! |---|---|
//! | `command` | `switchover`, `pause` or `resume` |
//! | `target` | for `switchover`, the cluster to become active |
//! | `id` | a fresh identifier chosen by the requester |
//! | `requestedAt` | RFC 3339 time of the request |
//!
//! This module watches that one object, validates the request, forwards it
//! to the HA loop as a [`Command`], and acknowledges it by writing
//! `handledId` (the `id` handled), `result` (`accepted` or
//! `rejected: <why>`) and `handledAt` into the same ConfigMap. A request
//! whose `id` equals `handledId` has been handled and is ignored, so a
//! controller restart does not replay it. "Accepted" means the HA loop got
//! the command; the state machine may still refuse it (for instance a
//! switchover to a standby that has not answered a recent probe), which it
//! reports as a `CommandRefused` Warning Event on the state ConfigMap.
//!
//! Requests older than [`MAX_REQUEST_AGE`] are rejected rather than
//! executed: a `pause` filed while the controller was down for an hour is
//! more likely to surprise than to help; so are requests dated more than
//! [`MAX_REQUEST_SKEW`] ahead of the controller's clock (the rule is
//! `counterweight_core::request::check_request_age`). The RBAC an operator needs is
//! `create`, `get` and `update` on this one ConfigMap (see
//! `manifests/base/cwctl-rbac.yaml`); the controller needs `get`, `list`,
//! `watch` and `patch` on it.

use std::collections::BTreeMap;
use std::time::Duration;

use counterweight_core::ha::Command;
use counterweight_core::names::check_cluster_name;
use counterweight_core::request::check_request_age;
use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::{WatchStreamExt, watcher};
use tokio::sync::mpsc;
use tracing::{info, warn};

pub use counterweight_core::request::{
    ACCEPTED, COMMAND_CONFIGMAP, COMMAND_KEY, HANDLED_AT_KEY, HANDLED_ID_KEY, ID_KEY,
    MAX_REQUEST_AGE, MAX_REQUEST_SKEW, REJECTED_PREFIX, REQUESTED_AT_KEY, RESULT_KEY, TARGET_KEY,
};
/// Longest accepted `id`.
pub const MAX_ID_LEN: usize = 128;

/// How long forwarding to a busy HA loop may take before the request is
/// rejected; the loop drains its queue every step, so this only trips when
/// it is stuck or gone.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(5);

/// What to do with the current content of the request ConfigMap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Nothing to do: no request, or it was handled already.
    Ignore,
    /// Forward this command, then answer `accepted`.
    Forward {
        /// The request's id.
        id: String,
        /// The command for the HA loop.
        command: Command,
    },
    /// Answer `rejected: <reason>` without forwarding.
    Reject {
        /// The request's id.
        id: String,
        /// Why, for the operator.
        reason: String,
    },
}

/// Decides what a request means, as of `now`. Pure, so that `cwctl` can
/// validate a request the same way before filing it.
pub fn decide(data: &BTreeMap<String, String>, now: Timestamp) -> Decision {
    let Some(id) = data.get(ID_KEY).map(|s| s.trim()).filter(|s| !s.is_empty()) else {
        // Without an id there is nobody to answer; cwctl always sets one.
        return Decision::Ignore;
    };
    if data.get(HANDLED_ID_KEY).map(|s| s.trim()) == Some(id) {
        return Decision::Ignore;
    }
    let id = id.to_owned();
    let reject = |reason: String| Decision::Reject {
        id: id.clone(),
        reason,
    };
    if id.len() > MAX_ID_LEN {
        return reject(format!("`{ID_KEY}` is longer than {MAX_ID_LEN} characters"));
    }
    match data.get(REQUESTED_AT_KEY).map(|s| s.trim()) {
        None | Some("") => {
            return reject(format!(
                "`{REQUESTED_AT_KEY}` is missing; set it to the RFC 3339 time of the request"
            ));
        }
        Some(text) => match text.parse::<Timestamp>() {
            Err(_) => {
                return reject(format!(
                    "`{REQUESTED_AT_KEY}` is {text:?}, expected an RFC 3339 time"
                ));
            }
            Ok(at) => {
                let age = now.duration_since(at).as_secs();
                if let Err(reason) = check_request_age(age, &at.to_string()) {
                    return reject(reason);
                }
            }
        },
    }
    let target = data
        .get(TARGET_KEY)
        .map(|s| s.trim())
        .filter(|s| !s.is_empty());
    let command = match data.get(COMMAND_KEY).map(|s| s.trim()) {
        Some("pause") => Command::Pause,
        Some("resume") => Command::Resume,
        Some("switchover") => match target {
            None => {
                return reject(format!(
                    "a switchover needs `{TARGET_KEY}`: the cluster to become active"
                ));
            }
            Some(t) if check_cluster_name(t).is_err() => {
                return reject(format!(
                    "`{TARGET_KEY}` {t:?} is not a cluster name (a DNS label: lowercase letters, \
                     digits and '-', at most 63)"
                ));
            }
            Some(t) => Command::Switchover {
                target: t.to_owned(),
            },
        },
        None | Some("") => return reject(format!("`{COMMAND_KEY}` is missing")),
        Some(other) => {
            return reject(format!(
                "`{COMMAND_KEY}` is {other:?}; expected switchover, pause or resume"
            ));
        }
    };
    Decision::Forward { id, command }
}

/// Watches the request ConfigMap of `namespace` until `shutdown` resolves,
/// forwarding valid requests to `tx` and answering each one in the
/// ConfigMap. Watch errors are retried with backoff; a failed answer is
/// retried on the next event or resync without forwarding again.
pub async fn run(
    client: kube::Client,
    namespace: String,
    tx: mpsc::Sender<Command>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let api: Api<ConfigMap> = Api::namespaced(client, &namespace);
    let stream = watcher(
        api.clone(),
        watcher::Config::default().fields(&format!("metadata.name={COMMAND_CONFIGMAP}")),
    )
    .default_backoff();
    let mut stream = std::pin::pin!(stream);
    let mut shutdown = std::pin::pin!(shutdown);
    // The id last forwarded: if writing its answer fails (conflict, API
    // down), the next sighting only retries the answer.
    let mut forwarded: Option<String> = None;
    info!(namespace = %namespace, "watching operator command requests");
    loop {
        let cm = tokio::select! {
            () = &mut shutdown => return,
            item = stream.next() => match item {
                None => {
                    warn!("command watch ended; operator commands are no longer served");
                    return;
                }
                Some(Err(e)) => {
                    warn!(error = %e, "command watch failed; retrying with backoff");
                    continue;
                }
                Some(Ok(watcher::Event::Apply(cm) | watcher::Event::InitApply(cm))) => cm,
                Some(Ok(_)) => continue,
            },
        };
        let data = cm.data.clone().unwrap_or_default();
        let (id, result) = match decide(&data, Timestamp::now()) {
            Decision::Ignore => continue,
            Decision::Reject { id, reason } => {
                warn!(%id, %reason, "operator command rejected");
                (id, format!("{REJECTED_PREFIX}{reason}"))
            }
            Decision::Forward { id, command } => {
                if forwarded.as_deref() == Some(id.as_str()) {
                    (id, ACCEPTED.to_owned())
                } else {
                    info!(%id, ?command, "operator command");
                    let result = match tokio::time::timeout(FORWARD_TIMEOUT, tx.send(command)).await
                    {
                        Ok(Ok(())) => {
                            forwarded = Some(id.clone());
                            ACCEPTED.to_owned()
                        }
                        Ok(Err(_)) => format!(
                            "{REJECTED_PREFIX}the HA loop is not running (no HA configuration?)"
                        ),
                        Err(_) => format!(
                            "{REJECTED_PREFIX}the HA loop did not take the command within {}s",
                            FORWARD_TIMEOUT.as_secs()
                        ),
                    };
                    (id, result)
                }
            }
        };
        answer(&api, &cm, &id, &result).await;
    }
}

/// Writes the answer, conditional on the version that was decided on: if
/// the requester replaced the request meanwhile, the new one arrives as its
/// own event and this answer must not land on it.
async fn answer(api: &Api<ConfigMap>, cm: &ConfigMap, id: &str, result: &str) {
    let patch = serde_json::json!({
        "metadata": {"resourceVersion": cm.metadata.resource_version},
        "data": {
            HANDLED_ID_KEY: id,
            RESULT_KEY: result,
            HANDLED_AT_KEY: Timestamp::now().to_string(),
        },
    });
    match api
        .patch(
            COMMAND_CONFIGMAP,
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
    {
        Ok(_) => info!(%id, %result, "operator command answered"),
        Err(e) => warn!(%id, error = %e, "could not answer the operator command; will retry"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> Timestamp {
        "2026-11-24T12:00:00Z".parse().expect("time")
    }

    fn req(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        let mut d: BTreeMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        d.entry(REQUESTED_AT_KEY.to_owned())
            .or_insert_with(|| "2026-11-24T11:59:58Z".to_owned());
        d
    }

    fn rejected(d: Decision) -> String {
        match d {
            Decision::Reject { reason, .. } => reason,
            other => panic!("expected a rejection, got {other:?}"),
        }
    }

    #[test]
    fn valid_requests_are_forwarded() {
        assert_eq!(
            decide(
                &req(&[("command", "switchover"), ("target", "west"), ("id", "a1")]),
                now()
            ),
            Decision::Forward {
                id: "a1".into(),
                command: Command::Switchover {
                    target: "west".into()
                }
            }
        );
        assert_eq!(
            decide(&req(&[("command", "pause"), ("id", "a2")]), now()),
            Decision::Forward {
                id: "a2".into(),
                command: Command::Pause
            }
        );
        assert_eq!(
            decide(&req(&[("command", "resume"), ("id", "a3")]), now()),
            Decision::Forward {
                id: "a3".into(),
                command: Command::Resume
            }
        );
    }

    #[test]
    fn handled_and_anonymous_requests_are_ignored() {
        let d = req(&[("command", "pause"), ("id", "a1"), ("handledId", "a1")]);
        assert_eq!(decide(&d, now()), Decision::Ignore);
        assert_eq!(
            decide(&req(&[("command", "pause")]), now()),
            Decision::Ignore
        );
        assert_eq!(decide(&BTreeMap::new(), now()), Decision::Ignore);
    }

    #[test]
    fn bad_requests_are_rejected_with_the_key_named() {
        let r = rejected(decide(&req(&[("command", "reboot"), ("id", "x")]), now()));
        assert!(r.contains("`command`") && r.contains("reboot"), "{r}");
        let r = rejected(decide(&req(&[("id", "x")]), now()));
        assert!(r.contains("`command` is missing"), "{r}");
        let r = rejected(decide(
            &req(&[("command", "switchover"), ("id", "x")]),
            now(),
        ));
        assert!(r.contains("`target`"), "{r}");
        let r = rejected(decide(
            &req(&[("command", "switchover"), ("target", "West!"), ("id", "x")]),
            now(),
        ));
        assert!(r.contains("not a cluster name"), "{r}");
        let r = rejected(decide(
            &req(&[
                ("command", "pause"),
                ("id", "x"),
                ("requestedAt", "yesterday"),
            ]),
            now(),
        ));
        assert!(r.contains("`requestedAt`"), "{r}");
        let long = "x".repeat(MAX_ID_LEN + 1);
        let r = rejected(decide(&req(&[("command", "pause"), ("id", &long)]), now()));
        assert!(r.contains("`id`"), "{r}");
    }

    #[test]
    fn stale_requests_are_rejected() {
        let r = rejected(decide(
            &req(&[
                ("command", "pause"),
                ("id", "x"),
                ("requestedAt", "2026-11-24T11:00:00Z"),
            ]),
            now(),
        ));
        assert!(r.contains("send it again"), "{r}");
    }

    /// Issue 17: a request dated in the future was forwarded, however far
    /// ahead; now only within the clock skew allowed.
    #[test]
    fn requests_from_the_future_are_rejected_beyond_the_skew() {
        let at = |t: &str| req(&[("command", "pause"), ("id", "x"), ("requestedAt", t)]);
        assert!(matches!(
            decide(&at("2026-11-24T12:01:00Z"), now()),
            Decision::Forward { .. }
        ));
        let r = rejected(decide(&at("2026-11-24T12:01:01Z"), now()));
        assert!(r.contains("61s in the future"), "{r}");
        let r = rejected(decide(&at("2099-01-01T00:00:00Z"), now()));
        assert!(r.contains("`requestedAt`") && r.contains("clock"), "{r}");
    }

    /// A switchover target is a cluster name by the HA configuration's rule
    /// (a DNS label), not any DNS name.
    #[test]
    fn switchover_targets_are_dns_labels() {
        let to = |t: &str| req(&[("command", "switchover"), ("target", t), ("id", "x")]);
        assert!(matches!(
            decide(&to("west-2"), now()),
            Decision::Forward { .. }
        ));
        for bad in ["west.example", "-west", &"w".repeat(64)] {
            let r = rejected(decide(&to(bad), now()));
            assert!(r.contains("not a cluster name"), "{bad}: {r}");
        }
    }
}
