//! Properties of the `admission_review` fuzz target: the AdmissionReview reader, on any bytes.
//!
//! The input is a whole request body, sent to both endpoints (the pod
//! mutator and the policy validator) of a webhook configured like the one
//! in `webhook/tests/common`. Whatever the bytes, the handler must answer
//! 200 or 400 (never panic, never 500), with a body; a 200 must be an
//! `admission.k8s.io/v1` AdmissionReview that echoes the request's uid and
//! says whether it is allowed, and any patch must be base64 of a non-empty
//! JSON array of operations, typed `JSONPatch`. For the policy endpoint a
//! review of the policy ConfigMap is denied exactly when
//! `Policy::from_configmap_data` refuses its data, so the webhook and the
//! controller cannot disagree about the same bytes.
//!
//! `webhook/tests/fuzz.rs` checks the same contract with proptest on
//! stable; this target explores from real reviews by coverage instead.

use std::sync::LazyLock;

use base64::Engine;
use counterweight_core::inject::InjectorConfig;
use counterweight_core::names::POLICY_CONFIGMAP;
use counterweight_core::policy::Policy;
use counterweight_webhook::metrics::Endpoint;
use counterweight_webhook::{Handler, NamespaceLabels};
use k8s_openapi::api::core::v1::ConfigMap;
use serde_json::Value;

static HANDLER: LazyLock<Handler> = LazyLock::new(|| {
    Handler::new(
        InjectorConfig {
            cluster_name: "east".into(),
            ..Default::default()
        },
        NamespaceLabels::TrustSelector,
    )
});

/// Checks the target's properties on one input; panics on a violation.
pub fn check(data: &[u8]) {
    for endpoint in [Endpoint::Mutate, Endpoint::ValidatePolicy] {
        let reply = HANDLER.handle(endpoint, data);
        assert!(
            reply.status == 200 || reply.status == 400,
            "status {}: {}",
            reply.status,
            String::from_utf8_lossy(&reply.body)
        );
        assert!(!reply.body.is_empty());
        if reply.status != 200 {
            continue;
        }
        let answer: Value = serde_json::from_slice(&reply.body).expect("the answer is JSON");
        assert_eq!(answer["apiVersion"], "admission.k8s.io/v1");
        assert_eq!(answer["kind"], "AdmissionReview");
        let response = &answer["response"];
        // A 200 means the body was read as a review, so it is JSON, unless
        // it holds a number out of `Value`'s range in a part the webhook
        // skips without reading (serde's `IgnoredAny`).
        let Ok(request) = serde_json::from_slice::<Value>(data) else {
            continue;
        };
        let request = &request["request"];
        assert_eq!(response["uid"], request["uid"], "uid not echoed");
        let allowed = response["allowed"].as_bool().expect("allowed is a bool");
        if let Some(patch) = response.get("patch") {
            assert_eq!(endpoint, Endpoint::Mutate);
            assert_eq!(response["patchType"], "JSONPatch");
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(patch.as_str().expect("the patch is a string"))
                .expect("the patch is base64");
            let ops: Value = serde_json::from_slice(&bytes).expect("the patch is JSON");
            assert!(ops.as_array().is_some_and(|a| !a.is_empty()), "{ops}");
        }
        if endpoint == Endpoint::Mutate {
            assert!(allowed, "the pod webhook never denies");
        } else {
            check_policy_verdict(request, allowed, response);
        }
    }
}

/// The validating endpoint's verdict on a policy CREATE or UPDATE equals
/// the core's on the same data.
fn check_policy_verdict(request: &Value, allowed: bool, response: &Value) {
    let is_policy = request["kind"]["kind"] == "ConfigMap"
        && request["name"] == POLICY_CONFIGMAP
        && request["operation"] != "DELETE";
    // The webhook reads the object from the body's text, where a key given
    // twice (which the API server never sends) makes it unreadable, while
    // `Value` keeps the last one: compare only what the webhook did read.
    let unreadable = response["warnings"]
        .to_string()
        .contains("unreadable ConfigMap");
    let config_map = serde_json::from_value::<ConfigMap>(request["object"].clone());
    let (true, false, Ok(config_map)) = (is_policy, unreadable, config_map) else {
        assert!(allowed, "only a readable policy ConfigMap is ever denied");
        return;
    };
    let verdict = Policy::from_configmap_data(config_map.data.as_ref());
    assert_eq!(
        allowed,
        verdict.is_ok(),
        "webhook and core disagree: {response} vs {verdict:?}"
    );
}
