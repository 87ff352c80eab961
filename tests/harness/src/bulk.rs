//! Many KWOK pods at once, for the scale tests and benchmarks.
//!
//! One pod builder ([`kwok_pod`]) and one bounded-concurrency creator
//! ([`create_pods`]) so that every test or bench that needs a thousand pods
//! makes them the same way: bound to the KWOK node (no scheduler in the
//! path), with an image nothing pulls, and optionally the readiness gates a
//! Counterweight service pod carries. Also what the API server allows for
//! them: one status write per pod ([`status_write_floor`]) and its own
//! request counters ([`apiserver_metric`]). And the opted-in namespace
//! they go in ([`create_namespace`]).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Container, Namespace, Pod, PodReadinessGate, PodSpec};
use kube::api::{Api, ListParams, ObjectMeta, Patch, PatchParams, PostParams};

use crate::{HarnessError, NODE_NAME};

/// A pod named `name` with `labels`, bound to the KWOK node, with the
/// readiness gates `gates` (condition types).
pub fn kwok_pod(name: &str, labels: &[(&str, &str)], gates: &[&str]) -> Pod {
    Pod {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            labels: Some(
                labels
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect::<BTreeMap<_, _>>(),
            ),
            ..Default::default()
        },
        spec: Some(PodSpec {
            node_name: Some(NODE_NAME.into()),
            readiness_gates: (!gates.is_empty()).then(|| {
                gates
                    .iter()
                    .map(|g| PodReadinessGate {
                        condition_type: (*g).to_owned(),
                    })
                    .collect()
            }),
            containers: vec![Container {
                name: "app".into(),
                image: Some("registry.invalid/bulk:1".into()),
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Creates namespace `name`, opted in to injection (and so to the
/// workload effects) when `opted_in`.
pub async fn create_namespace(
    client: &kube::Client,
    name: &str,
    opted_in: bool,
) -> Result<(), HarnessError> {
    let labels = opted_in.then(|| {
        [(
            counterweight_core::names::INJECT_LABEL.to_owned(),
            counterweight_core::names::INJECT_ENABLED.to_owned(),
        )]
        .into()
    });
    let namespace = Namespace {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            labels,
            ..Default::default()
        },
        ..Default::default()
    };
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &namespace)
        .await
        .map(drop)
        .map_err(|e| HarnessError::Command {
            what: format!("creating namespace {name}"),
            status: "refused".into(),
            stderr: e.to_string(),
        })
}

/// Creates `pods` in `api`'s namespace, `concurrency` at a time; fails
/// naming the first pod that could not be created.
pub async fn create_pods(
    api: &Api<Pod>,
    pods: Vec<Pod>,
    concurrency: usize,
) -> Result<usize, HarnessError> {
    let results: Vec<Result<(), String>> = futures::stream::iter(pods)
        .map(|pod| {
            let api = api.clone();
            async move {
                let name = pod.metadata.name.clone().unwrap_or_default();
                api.create(&PostParams::default(), &pod)
                    .await
                    .map(drop)
                    .map_err(|e| format!("pod {name}: {e}"))
            }
        })
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await;
    let created = results.iter().filter(|r| r.is_ok()).count();
    match results.into_iter().find_map(Result::err) {
        None => Ok(created),
        Some(first) => Err(HarnessError::Command {
            what: "creating pods".into(),
            status: format!("{created} created"),
            stderr: first,
        }),
    }
}

/// Waits until `n` pods matching `labels` in `api`'s namespace are
/// `Running` (KWOK's stages), polling every half second up to `timeout`.
pub async fn wait_running(
    api: &Api<Pod>,
    labels: &str,
    n: usize,
    timeout: Duration,
) -> Result<(), HarnessError> {
    let deadline = Instant::now() + timeout;
    let mut running = 0;
    while Instant::now() < deadline {
        if let Ok(list) = api.list(&ListParams::default().labels(labels)).await {
            running = list
                .items
                .iter()
                .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
                .count();
            if running >= n {
                return Ok(());
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Err(HarnessError::Timeout {
        cluster: "-".into(),
        what: format!("{n} pods {labels} Running ({running} are)"),
        after: timeout,
    })
}

/// The condition type of [`status_write_floor`]'s patches: no controller
/// reads it.
pub const PROBE_CONDITION: &str = "probe.counterweight.dev/write";

/// Sends one bare status PATCH per pod of `pods` (namespace, name) (the
/// condition [`PROBE_CONDITION`] with `reason`, the strategic-merge shape
/// of the controller's serving condition), `concurrency` at a time, and
/// returns how long they took: the least time in which any controller can
/// make that many pods serve on this API server. A `reason` different from
/// the last round's makes every patch a real write.
pub async fn status_write_floor(
    client: &kube::Client,
    pods: &[(String, String)],
    concurrency: usize,
    reason: &str,
) -> Result<Duration, HarnessError> {
    let started = Instant::now();
    let body = serde_json::json!({"status": {"conditions": [{
        "type": PROBE_CONDITION, "status": "True", "reason": reason}]}});
    let failed: Vec<String> = futures::stream::iter(pods)
        .map(|(namespace, name)| {
            let api: Api<Pod> = Api::namespaced(client.clone(), namespace);
            let body = body.clone();
            async move {
                api.patch_status(name, &PatchParams::default(), &Patch::Strategic(body))
                    .await
                    .err()
                    .map(|e| format!("pod {namespace}/{name}: {e}"))
            }
        })
        .buffer_unordered(concurrency.max(1))
        .filter_map(futures::future::ready)
        .collect()
        .await;
    match failed.first() {
        None => Ok(started.elapsed()),
        Some(first) => Err(HarnessError::Command {
            what: "probe status PATCHes".into(),
            status: format!("{} of {} failed", failed.len(), pods.len()),
            stderr: first.clone(),
        }),
    }
}

/// The sum of the API server's metric `metric` (a counter or gauge such as
/// `apiserver_request_total`) over the series whose labels include every
/// `labels` pair (`("subresource", "")` for none), from its `/metrics`; 0
/// if that cannot be read.
pub async fn apiserver_metric(client: &kube::Client, metric: &str, labels: &[(&str, &str)]) -> u64 {
    let Ok(req) = http::Request::get("/metrics").body(Vec::new()) else {
        return 0;
    };
    let Ok(text) = client.request_text(req).await else {
        return 0;
    };
    let series = format!("{metric}{{");
    let pairs: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    text.lines()
        .filter(|l| l.starts_with(&series) && pairs.iter().all(|p| l.contains(p.as_str())))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// Peak resident set (`VmHWM` of `/proc/<pid>/status`) of process `pid`
/// (`"self"` for this one), in MiB; `None` if the process is gone or the
/// field unreadable.
pub fn peak_rss_mib(pid: &str) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kib / 1024.0)
}
