//! The names Counterweight shares with Kubernetes objects and with operators.
//!
//! They are fixed by the design notes and appear in manifests, labels and
//! documentation, so they live in one place and are never spelled twice.

/// Namespace label that opts a namespace into init-gate injection.
pub const INJECT_LABEL: &str = "counterweight.dev/inject";
/// Value of [`INJECT_LABEL`] (and of the pod opt-out annotation's opposite) that enables injection.
pub const INJECT_ENABLED: &str = "enabled";
/// Pod annotation with which a pod opts out of injection (value `disabled`).
pub const INJECT_ANNOTATION: &str = "counterweight.dev/inject";
/// Value of [`INJECT_ANNOTATION`] that opts a pod out.
pub const INJECT_DISABLED: &str = "disabled";
/// Pod label naming the pod's role: `service` (the default) or a synchronization role.
pub const ROLE_LABEL: &str = "counterweight.dev/role";
/// Pod annotation marking that the init-gate was injected.
pub const STATUS_ANNOTATION: &str = "counterweight.dev/status";
/// Pod readiness-gate condition type the controller sets while its cluster serves.
pub const SERVING_CONDITION: &str = "counterweight.dev/serving";
/// Namespace the controller, the webhook and the state live in.
pub const SYSTEM_NAMESPACE: &str = "counterweight-system";
/// ConfigMap holding a cluster's active/standby state.
pub const STATE_CONFIGMAP: &str = "counterweight-state";
/// ConfigMap holding the health policy.
pub const POLICY_CONFIGMAP: &str = "counterweight-policy";
/// Key under which the policy YAML is stored in [`POLICY_CONFIGMAP`].
pub const POLICY_KEY: &str = "policy.yaml";
