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
//! Requests older than [`MAX_REQUEST_AGE`](counterweight_core::request::MAX_REQUEST_AGE) are rejected rather than
//! executed: a `pause` filed while the controller was down for an hour is
//! more likely to surprise than to help; so are requests dated more than
//! [`MAX_REQUEST_SKEW`](counterweight_core::request::MAX_REQUEST_SKEW) ahead of the controller's clock (the rule is
//! `counterweight_core::request::check_request_age`, and the request's one
//! codec is `counterweight_core::request`). The RBAC an operator needs is
//! `create`, `get` and `update` on this one ConfigMap (see
//! `manifests/base/cwctl-rbac.yaml`); the controller needs `get`, `list`,
//! `watch` and `patch` on it.

use std::time::Duration;

use counterweight_core::ha::Command;
use counterweight_core::request::{Decision, Outcome, decide};
use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::{WatchStreamExt, watcher};
use tokio::sync::mpsc;
use tracing::{info, warn};

use counterweight_core::request::COMMAND_CONFIGMAP;

/// How long forwarding to a busy HA loop may take before the request is
/// rejected; the loop drains its queue every step, so this only trips when
/// it is stuck or gone.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(5);

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
        let (id, outcome) = match decide(&data, Timestamp::now()) {
            Decision::Ignore => continue,
            Decision::Reject { id, reason } => {
                warn!(%id, %reason, "operator command rejected");
                (id, Outcome::Rejected(reason))
            }
            Decision::Forward { id, command } => {
                if forwarded.as_deref() == Some(id.as_str()) {
                    (id, Outcome::Accepted)
                } else {
                    info!(%id, ?command, "operator command");
                    let outcome =
                        match tokio::time::timeout(FORWARD_TIMEOUT, tx.send(command)).await {
                            Ok(Ok(())) => {
                                forwarded = Some(id.clone());
                                Outcome::Accepted
                            }
                            Ok(Err(_)) => Outcome::Rejected(
                                "the HA loop is not running (no HA configuration?)".to_owned(),
                            ),
                            Err(_) => Outcome::Rejected(format!(
                                "the HA loop did not take the command within {}s",
                                FORWARD_TIMEOUT.as_secs()
                            )),
                        };
                    (id, outcome)
                }
            }
        };
        answer(&api, &cm, &id, &outcome).await;
    }
}

/// Writes the answer, conditional on the version that was decided on: if
/// the requester replaced the request meanwhile, the new one arrives as its
/// own event and this answer must not land on it.
async fn answer(api: &Api<ConfigMap>, cm: &ConfigMap, id: &str, outcome: &Outcome) {
    let patch = serde_json::json!({
        "metadata": {"resourceVersion": cm.metadata.resource_version},
        "data": outcome.answer_data(id, Timestamp::now()),
    });
    let result = outcome.encode();
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
