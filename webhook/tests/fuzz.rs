//! Fuzzing of the AdmissionReview handler with proptest: random bytes,
//! random JSON, and valid reviews with random parts replaced. The handler
//! must never panic, must answer 200 or 400 (413 is the HTTP layer's), and
//! every 200 must be an AdmissionReview echoing the request uid, with any
//! patch base64 of a non-empty JSON array. The number of executions is
//! printed; set `FUZZ_CASES` to run more.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::atomic::{AtomicU64, Ordering};

use counterweight_webhook::metrics::Endpoint;
use proptest::prelude::*;
use serde_json::{Value, json};

static EXECUTIONS: AtomicU64 = AtomicU64::new(0);

fn cases() -> u32 {
    std::env::var("FUZZ_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(4000)
}

fn arb_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>().prop_map(|f| json!(f)),
        ".{0,12}".prop_map(Value::String),
        // Strings the handler looks at.
        prop_oneof![
            Just("Pod"),
            Just("ConfigMap"),
            Just("CREATE"),
            Just("UPDATE"),
            Just("DELETE"),
            Just("admission.k8s.io/v1"),
            Just("AdmissionReview"),
            Just("counterweight-policy"),
            Just("counterweight.dev/role"),
            Just("database"),
            Just("kube-system"),
        ]
        .prop_map(|s| Value::String(s.into())),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            proptest::collection::btree_map(
                prop_oneof![
                    "[a-zA-Z]{1,8}",
                    prop_oneof![
                        Just("apiVersion"),
                        Just("kind"),
                        Just("request"),
                        Just("uid"),
                        Just("object"),
                        Just("metadata"),
                        Just("spec"),
                        Just("labels"),
                        Just("annotations"),
                        Just("initContainers"),
                        Just("containers"),
                        Just("operation"),
                        Just("namespace"),
                        Just("data"),
                        Just("policy.yaml"),
                    ]
                    .prop_map(String::from),
                ],
                inner,
                0..6,
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A valid pod review with one path replaced by arbitrary JSON.
fn arb_mutated_review() -> impl Strategy<Value = Value> {
    let paths: &[&[&str]] = &[
        &["request"],
        &["request", "uid"],
        &["request", "kind"],
        &["request", "kind", "kind"],
        &["request", "operation"],
        &["request", "namespace"],
        &["request", "object"],
        &["request", "object", "metadata"],
        &["request", "object", "metadata", "labels"],
        &["request", "object", "metadata", "annotations"],
        &["request", "object", "spec"],
        &["request", "object", "spec", "initContainers"],
        &["request", "object", "spec", "readinessGates"],
        &["request", "object", "spec", "volumes"],
        &["request", "object", "spec", "automountServiceAccountToken"],
        &["request", "object", "data"],
    ];
    (0..paths.len(), arb_json()).prop_map(move |(i, replacement)| {
        let mut review: Value = serde_json::from_slice(&common::pod_review("fz", "shop")).unwrap();
        let path = paths[i];
        let mut at = &mut review;
        for key in &path[..path.len() - 1] {
            at = &mut at[*key];
        }
        at[path[path.len() - 1]] = replacement;
        review
    })
}

fn check(body: &[u8]) -> Result<(), TestCaseError> {
    EXECUTIONS.fetch_add(1, Ordering::Relaxed);
    let handler = common::handler();
    let request_uid = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v["request"]["uid"].as_str().map(String::from));
    for endpoint in [Endpoint::Mutate, Endpoint::ValidatePolicy] {
        let reply = handler.handle(endpoint, body);
        prop_assert!(
            reply.status == 200 || reply.status == 400,
            "status {}",
            reply.status
        );
        prop_assert!(!reply.body.is_empty());
        if reply.status == 200 {
            let v: Value = serde_json::from_slice(&reply.body).unwrap();
            prop_assert_eq!(&v["kind"], "AdmissionReview");
            prop_assert_eq!(
                v["response"]["uid"].as_str().map(String::from),
                request_uid.clone()
            );
            prop_assert!(v["response"]["allowed"].is_boolean());
            // A patch is base64 of a JSON array of operations, typed as such.
            if let Some(patch) = v["response"].get("patch") {
                use base64::Engine;
                prop_assert_eq!(&v["response"]["patchType"], "JSONPatch");
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(patch.as_str().unwrap_or_default())
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                let ops: Value = serde_json::from_slice(&bytes)
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                prop_assert!(ops.as_array().is_some_and(|a| !a.is_empty()), "{}", ops);
            }
        }
    }
    Ok(())
}

fn run<S: Strategy>(name: &str, strategy: S, to_bytes: impl Fn(S::Value) -> Vec<u8>) -> u64 {
    let before = EXECUTIONS.load(Ordering::Relaxed);
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: cases(),
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    if let Err(e) = runner.run(&strategy, |v| check(&to_bytes(v))) {
        panic!("{name}: {e}");
    }
    EXECUTIONS.load(Ordering::Relaxed) - before
}

/// One test so the execution count it prints is complete and deterministic.
#[test]
fn fuzz_admission_handler() {
    let bytes = run(
        "random bytes",
        proptest::collection::vec(any::<u8>(), 0..512),
        |b| b,
    );
    let json = run("random JSON", arb_json(), |v| {
        serde_json::to_vec(&v).unwrap()
    });
    let mutated = run("mutated reviews", arb_mutated_review(), |v| {
        serde_json::to_vec(&v).unwrap()
    });
    eprintln!(
        "fuzz: {} executions without a crash ({bytes} random bytes, {json} random JSON, {mutated} mutated reviews), each through both endpoints",
        bytes + json + mutated
    );
    assert!(bytes > 0 && json > 0 && mutated > 0);
}
