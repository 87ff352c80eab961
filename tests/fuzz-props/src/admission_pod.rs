//! Properties of the `admission_pod` fuzz target: the mutating webhook on any valid pod.
//!
//! The input is a pod as JSON. Inputs that are not a pod the API server
//! could hand to the webhook (see [`valid`]) are dropped; the rest are
//! serialized the way the API server sends them (from the typed `Pod`, so
//! without `null`s) and wrapped in a pod CREATE AdmissionReview for an
//! opted-in namespace. The answer must be an allowed review that echoes
//! the uid, read the pod (a pod the API server accepts is never
//! "unreadable" to the webhook's `PodView`), and agree with
//! `counterweight_core::inject::inject` on the typed pod. When it carries a
//! patch, the patch is applied with `json_patch` (RFC 6902, as the API
//! server does) and the result must be a pod the API server would accept:
//! it deserializes as a `Pod`, container names are unique across init and
//! app containers, volume names are unique and every volume mount names a
//! volume, the gate (and the lease sidecar right after it) sits where the
//! configuration says, the app containers are untouched, the readiness gate
//! and the status annotation are there once, and a second review of the
//! patched pod adds nothing (idempotence).
//!
//! The webhook's configuration is one of three, chosen by the input's length
//! so that every input has one answer: the default (gate first, lease
//! sidecar), gate last, and no sidecar.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::LazyLock;

use base64::Engine;
use counterweight_core::inject::{
    self, Decision, GatePosition, InjectorConfig, LEASE_CONTAINER, STATUS_INJECTED,
};
use counterweight_core::names::{
    INJECT_ENABLED, INJECT_LABEL, SERVING_CONDITION, STATUS_ANNOTATION,
};
use counterweight_webhook::metrics::Endpoint;
use counterweight_webhook::{Handler, NamespaceLabels};
use k8s_openapi::api::core::v1::{Container, Pod};
use serde_json::{Value, json};

/// The namespace every review is for; opted in.
const NAMESPACE: &str = "shop";

fn configs() -> [InjectorConfig; 3] {
    let default = InjectorConfig {
        cluster_name: "east".into(),
        ..Default::default()
    };
    [
        default.clone(),
        InjectorConfig {
            position: GatePosition::Last,
            ..default.clone()
        },
        InjectorConfig {
            lease_sidecar: false,
            ..default
        },
    ]
}

static HANDLERS: LazyLock<Vec<Handler>> = LazyLock::new(|| {
    configs()
        .into_iter()
        .map(|c| Handler::new(c, NamespaceLabels::TrustSelector))
        .collect()
});

static NAMESPACE_LABELS: LazyLock<BTreeMap<String, String>> =
    LazyLock::new(|| BTreeMap::from([(INJECT_LABEL.to_owned(), INJECT_ENABLED.to_owned())]));

/// Checks the target's properties on one input; panics on a violation.
pub fn check(data: &[u8]) {
    let Ok(pod) = serde_json::from_slice::<Pod>(data) else {
        return;
    };
    if !valid(&pod) {
        return;
    }
    let which = data.len() % HANDLERS.len();
    let handler = &HANDLERS[which];
    let config = handler.injector.config();
    let object = serde_json::to_value(&pod).expect("a typed pod serializes");

    let patch = review(handler, &object).expect("a valid pod gets an answer");
    let expected = inject::inject(&pod, &NAMESPACE_LABELS, NAMESPACE, config);
    let Some(patch) = patch else {
        assert!(
            matches!(expected, Decision::Skip(_)),
            "the webhook skipped a pod the core injects: {expected:?}"
        );
        return;
    };
    let Decision::Inject(core_patch) = expected else {
        panic!("the webhook patched a pod the core skips: {expected:?}");
    };
    assert_eq!(
        patch,
        serde_json::to_value(&core_patch).expect("a patch serializes"),
        "the webhook's patch differs from inject()'s"
    );

    let ops: json_patch::Patch = serde_json::from_value(patch).expect("an RFC 6902 patch");
    let mut patched = object.clone();
    json_patch::patch(&mut patched, &ops).expect("the patch applies to the pod it was made for");
    let after: Pod = serde_json::from_value(patched.clone()).expect("the patched pod is a Pod");
    assert!(valid(&after), "the patched pod is not valid: {patched}");
    check_injected(&pod, &after, config);

    // Idempotence: the API server may call a webhook again (reinvocation).
    assert_eq!(
        review(handler, &patched).expect("the patched pod gets an answer"),
        None,
        "a second review of the patched pod patched it again"
    );
}

/// Sends `object` through the mutating endpoint; the decoded patch, if any.
fn review(handler: &Handler, object: &Value) -> Option<Option<Value>> {
    let body = json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "fuzz-uid",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": NAMESPACE,
            "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": object,
            "oldObject": null,
            "dryRun": false
        }
    });
    let body = serde_json::to_vec(&body).expect("a review serializes");
    let reply = handler.handle(Endpoint::Mutate, &body);
    assert_eq!(
        reply.status,
        200,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    let answer: Value = serde_json::from_slice(&reply.body).expect("the answer is JSON");
    let response = &answer["response"];
    assert_eq!(response["uid"], "fuzz-uid");
    assert_eq!(response["allowed"], true);
    if let Some(warnings) = response.get("warnings") {
        let text = warnings.to_string();
        assert!(
            !text.contains("pod not injected"),
            "a valid pod was not read: {text}"
        );
    }
    let Some(patch) = response.get("patch") else {
        assert!(response.get("patchType").is_none());
        return Some(None);
    };
    assert_eq!(response["patchType"], "JSONPatch");
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(patch.as_str().expect("the patch is a string"))
        .expect("the patch is base64");
    Some(Some(
        serde_json::from_slice(&bytes).expect("the patch is JSON"),
    ))
}

/// A pod the API server could send to a mutating webhook at CREATE and
/// would accept as it is: a spec with containers, every container name
/// non-empty and unique (init, app and ephemeral containers share one
/// namespace of names), no ephemeral containers (refused at CREATE),
/// unique non-empty volume names, and volume mounts that name declared
/// volumes.
fn valid(pod: &Pod) -> bool {
    let Some(spec) = &pod.spec else { return false };
    if spec.containers.is_empty()
        || spec
            .ephemeral_containers
            .as_ref()
            .is_some_and(|e| !e.is_empty())
    {
        return false;
    }
    let all: Vec<&Container> = spec
        .init_containers
        .iter()
        .flatten()
        .chain(&spec.containers)
        .collect();
    let mut names = BTreeSet::new();
    if !all
        .iter()
        .all(|c| !c.name.is_empty() && names.insert(c.name.as_str()))
    {
        return false;
    }
    let mut volumes = BTreeSet::new();
    if !spec
        .volumes
        .iter()
        .flatten()
        .all(|v| !v.name.is_empty() && volumes.insert(v.name.as_str()))
    {
        return false;
    }
    all.iter()
        .flat_map(|c| c.volume_mounts.iter().flatten())
        .all(|m| volumes.contains(m.name.as_str()))
}

/// What an injection must have done to `before` to make `after`.
fn check_injected(before: &Pod, after: &Pod, config: &InjectorConfig) {
    let (b, a) = (
        before.spec.as_ref().expect("valid"),
        after.spec.as_ref().expect("valid"),
    );
    assert_eq!(a.containers, b.containers, "app containers changed");
    let names = |cs: &Option<Vec<Container>>| -> Vec<String> {
        cs.iter().flatten().map(|c| c.name.clone()).collect()
    };
    let mut added = vec![config.container_name.clone()];
    if config.lease_sidecar {
        added.push(LEASE_CONTAINER.to_owned());
    }
    let own = names(&b.init_containers);
    let expected: Vec<String> = match config.position {
        GatePosition::First => added.iter().chain(&own).cloned().collect(),
        GatePosition::Last => own.iter().chain(&added).cloned().collect(),
    };
    assert_eq!(names(&a.init_containers), expected, "init containers");
    // The pod's own init containers are kept as they were.
    let kept: Vec<&Container> = a
        .init_containers
        .iter()
        .flatten()
        .filter(|c| !added.contains(&c.name))
        .collect();
    assert_eq!(
        kept,
        b.init_containers.iter().flatten().collect::<Vec<_>>(),
        "the pod's own init containers changed"
    );
    let serving = |s: &k8s_openapi::api::core::v1::PodSpec| {
        s.readiness_gates
            .iter()
            .flatten()
            .filter(|g| g.condition_type == SERVING_CONDITION)
            .count()
    };
    // Added when missing, never twice.
    assert_eq!(
        serving(a),
        serving(b).max(1),
        "readiness gate {SERVING_CONDITION}"
    );
    assert_eq!(
        after
            .metadata
            .annotations
            .as_ref()
            .and_then(|m| m.get(STATUS_ANNOTATION))
            .map(String::as_str),
        Some(STATUS_INJECTED)
    );
}
