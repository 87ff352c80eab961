//! The webhook registrations of `manifests/base/webhook/` for a webhook
//! process on this machine: the same rules, selectors, timeouts and failure
//! policies, with `clientConfig.url` on 127.0.0.1 instead of a Service and
//! the development CA as the caBundle. Used by the e2e tests and the demo,
//! which both register a real webhook process with a harness cluster.

use std::net::{Ipv4Addr, SocketAddr};

use counterweight_core::names;
use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
};
use serde_json::json;

/// The mutating (pod injection) and validating (policy) configurations for
/// a webhook serving HTTPS on `127.0.0.1:port` with a certificate issued by
/// `ca_pem`.
pub fn loopback_webhook_configs(
    port: u16,
    ca_pem: &[u8],
) -> Result<(MutatingWebhookConfiguration, ValidatingWebhookConfiguration), serde_json::Error> {
    webhook_configs(SocketAddr::from((Ipv4Addr::LOCALHOST, port)), ca_pem)
}

/// The same configurations for a webhook serving HTTPS on `addr`: a real-node
/// cluster's API server runs in a network namespace of its own and reaches a
/// webhook on this machine through the LAN bridge's host address, not 127.0.0.1.
pub fn webhook_configs(
    addr: SocketAddr,
    ca_pem: &[u8],
) -> Result<(MutatingWebhookConfiguration, ValidatingWebhookConfiguration), serde_json::Error> {
    let mut m: MutatingWebhookConfiguration = serde_json::from_value(json!({
        "metadata": {"name": "counterweight-inject"},
        "webhooks": [{
            "name": "inject.counterweight.dev",
            "clientConfig": {"url": format!("https://{addr}/mutate-pods")},
            "rules": [{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"],
                       "resources": ["pods"], "scope": "Namespaced"}],
            "namespaceSelector": {"matchExpressions": [
                {"key": names::INJECT_LABEL, "operator": "In", "values": [names::INJECT_ENABLED]},
                {"key": "kubernetes.io/metadata.name", "operator": "NotIn",
                 "values": ["kube-system", "kube-public", "kube-node-lease", names::SYSTEM_NAMESPACE]}]},
            // Synchronization pods are never gated (claims 6-7).
            "objectSelector": {"matchExpressions": [
                {"key": names::ROLE_LABEL, "operator": "NotIn",
                 "values": ["ha", "database", "file-replication"]}]},
            "sideEffects": "None",
            "admissionReviewVersions": ["v1"],
            "timeoutSeconds": 5,
            "failurePolicy": "Fail",
            "reinvocationPolicy": "Never",
            "matchPolicy": "Equivalent",
        }]
    }))?;
    let mut v: ValidatingWebhookConfiguration = serde_json::from_value(json!({
        "metadata": {"name": "counterweight-policy"},
        "webhooks": [{
            "name": "policy.counterweight.dev",
            "clientConfig": {"url": format!("https://{addr}/validate-policy")},
            "rules": [{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE", "UPDATE"],
                       "resources": ["configmaps"], "scope": "Namespaced"}],
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": names::SYSTEM_NAMESPACE}},
            "objectSelector": {},
            "matchConditions": [{"name": "policy-configmap-only",
                                 "expression": format!("object.metadata.name == '{}'", names::POLICY_CONFIGMAP)}],
            "sideEffects": "None",
            "admissionReviewVersions": ["v1"],
            "timeoutSeconds": 5,
            "failurePolicy": "Ignore",
        }]
    }))?;
    for hook in m.webhooks.iter_mut().flatten() {
        hook.client_config.ca_bundle = Some(ByteString(ca_pem.to_vec()));
    }
    for hook in v.webhooks.iter_mut().flatten() {
        hook.client_config.ca_bundle = Some(ByteString(ca_pem.to_vec()));
    }
    Ok((m, v))
}
