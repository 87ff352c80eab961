//! Reading and patching service pods: the fresh LIST the fence and the
//! promotion start from, and the serving-condition patches, sent at a
//! bounded concurrency and checked against the desired state at their turn.

use super::*;

/// A pod to restart: its coordinates and the incarnation meant.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PodRef {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Uid of the incarnation that served.
    pub uid: String,
}

impl PodRef {
    pub(super) fn of(pod: &Pod) -> Option<Self> {
        Some(Self {
            namespace: pod.metadata.namespace.clone()?,
            name: pod.metadata.name.clone()?,
            uid: pod.metadata.uid.clone()?,
        })
    }
}

/// Service pods, read fresh from the API server: a quorum read, so the
/// fence cannot miss a pod a stale cache does not know yet (see the
/// `fence` module for why the controller's own cache will not do). The
/// namespaces and the pods are listed side by side.
pub(super) async fn list_service_pods(client: &kube::Client) -> Result<Vec<Pod>, ServingError> {
    let nss: Api<Namespace> = Api::all(client.clone());
    let opted_params = ListParams::default().labels(&opted_in_selector());
    let (ns_list, pods) = futures::join!(nss.list(&opted_params), list_pages(client));
    let ns_list = ns_list.map_err(|e| ServingError::List {
        what: "namespaces",
        source: Box::new(e),
    })?;
    let pods = pods.map_err(|e| ServingError::List {
        what: "pods",
        source: Box::new(e),
    })?;
    let opted = opted_in(&ns_list.items);
    Ok(pods
        .into_iter()
        .filter(|p| is_service_pod(p, &opted))
        .collect())
}

/// Pods per page of [`list_service_pods`]: one answer of 10,000 pods would
/// be held whole, beside the cache, while it is decoded.
const LIST_PAGE: u32 = 500;

/// Every pod of the service-pod selector, [`LIST_PAGE`] at a time. The
/// first page is a consistent read; the rest continue from its
/// resourceVersion, so the pages form one snapshot.
async fn list_pages(client: &kube::Client) -> Result<Vec<Pod>, kube::Error> {
    let api: Api<Pod> = Api::all(client.clone());
    let mut params = ListParams::default()
        .labels(&service_pod_selector())
        .limit(LIST_PAGE);
    let mut pods = Vec::new();
    loop {
        let page = api.list(&params).await?;
        pods.extend(page.items.into_iter().map(|mut p| {
            strip(&mut p);
            p
        }));
        match page.metadata.continue_ {
            Some(token) if !token.is_empty() => params = params.continue_token(&token),
            _ => return Ok(pods),
        }
    }
}

/// Drops from a pod what no decision about it reads and every writer adds
/// to: the managed-fields record. Pods enter the cache and the LISTs'
/// answers through it.
pub(super) fn strip(pod: &mut Pod) {
    pod.metadata.managed_fields = None;
}

/// Sets the serving condition of one pod. `Ok(false)` if the pod is gone or
/// was replaced.
pub(super) async fn patch_condition(
    client: &kube::Client,
    pod: &PodRef,
    serve: bool,
    reason: &str,
) -> Result<bool, kube::Error> {
    let api: Api<Pod> = Api::namespaced(client.clone(), &pod.namespace);
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let body = condition_patch(&pod.uid, serve, reason, &now);
    let params = PatchParams {
        field_manager: Some(FIELD_MANAGER.to_owned()),
        ..Default::default()
    };
    match api
        .patch_status(&pod.name, &params, &Patch::Strategic(body))
        .await
    {
        Ok(_) => Ok(true),
        // 404: gone; 409/422: a namesake with another uid.
        Err(kube::Error::Api(s)) if matches!(s.code, 404 | 409 | 422) => Ok(false),
        Err(e) => Err(e),
    }
}

/// One serving-condition patch: the pod, whether it is to serve, and why.
pub(super) type ConditionPatch = (PodRef, bool, &'static str);

/// Sends `patches`, at most `concurrency` at once, and returns each with its
/// outcome. `Ok(false)`: the pod is gone or replaced, or it was to serve and
/// the cluster no longer is meant to. That is checked when the patch's turn
/// comes, because a demotion may have begun while it waited, and a
/// condition must never turn True then.
pub(super) async fn send_conditions(
    shared: &Shared,
    patches: Vec<ConditionPatch>,
) -> Vec<(ConditionPatch, Result<bool, kube::Error>)> {
    // Futures are built first, so the stream holds no closure over borrowed
    // data, which keeps the future `Send`.
    let futures: Vec<_> = patches
        .into_iter()
        .map(|patch| async move {
            let (r, serve, reason) = &patch;
            let res = if *serve && *shared.desired.borrow() != Some(true) {
                Ok(false)
            } else {
                patch_condition(&shared.client, r, *serve, reason).await
            };
            (patch, res)
        })
        .collect();
    let results: Vec<(ConditionPatch, Result<bool, kube::Error>)> = stream::iter(futures)
        .buffer_unordered(shared.config.concurrency.max(1))
        .collect()
        .await;
    if let Ok(mut memo) = shared.memo.lock() {
        let now = Instant::now();
        for ((r, serve, _), res) in &results {
            if matches!(res, Ok(true)) {
                memo.record(&r.uid, *serve, now);
            }
        }
    }
    results
}
