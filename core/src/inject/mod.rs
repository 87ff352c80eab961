//! The init-gate injection decision and its JSON patch.
//!
//! [`inject`] is a pure function from a pod (as the API server hands it to the
//! mutating webhook), its namespace's labels and name, and an
//! [`InjectorConfig`] to either an RFC 6902 [`json_patch::Patch`] that adds
//! the gate, or a named [`Skip`] reason. It owns every rule of *whether* and
//! *how* a pod is gated; the webhook only carries bytes. Because it reads
//! nothing but its arguments, the same rules are property-tested here against
//! arbitrary pods: the patch always applies, puts the gate where configured,
//! and injection of its own output is a no-op.
//!
//! ## hostNetwork pods are injected
//!
//! The gate only needs to reach the API server (it reads the state ConfigMap
//! with the pod's service-account token). A `hostNetwork` pod has that: the
//! kubelet sets `KUBERNETES_SERVICE_HOST`/`PORT` for it too, and the service
//! IP is reachable from the node's network namespace. The gate opens no port;
//! the lease sidecar opens one, [`InjectorConfig::ready_port`], which in a
//! hostNetwork pod is a port of the node: choose one free on every node. Skipping such pods would let a
//! hostNetwork *service* pod serve in a standby cluster, which is exactly the
//! failure Counterweight exists to prevent, so they are gated like any other.
//! Infrastructure daemons that use hostNetwork live in `kube-system` or are
//! marked with a synchronization role or the opt-out annotation; an operator
//! who wants the opposite sets [`InjectorConfig::skip_host_network`].
//!
//! ## Where each part lives
//!
//! This file holds the rules: the configuration, the skip reasons and
//! [`inject`]. What the rules read of a pod is `view.rs` ([`PodView`]);
//! the patch as a plan of steps is `patch.rs`, and the containers and the
//! volume it adds are `containers.rs`. `wire.rs` ([`Injector`]) is only the
//! webhook's encoding of the same plan, serialized once at start-up; a
//! property test holds it byte-equal to [`inject`]'s patch.

use std::borrow::Cow;
use std::collections::BTreeMap;

use json_patch::jsonptr::PointerBuf;
use json_patch::{AddOperation, Patch, PatchOperation};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapProjection, Container, DownwardAPIProjection, DownwardAPIVolumeFile,
    EmptyDirVolumeSource, EnvVar, EnvVarSource, KeyToPath, ObjectFieldSelector, Pod,
    PodReadinessGate, ProjectedVolumeSource, ResourceRequirements, SeccompProfile, SecurityContext,
    ServiceAccountTokenProjection, Volume, VolumeMount, VolumeProjection,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use serde_json::Value;

use crate::names::{
    INJECT_ANNOTATION, INJECT_DISABLED, ROLE_LABEL, SERVING_CONDITION, STATE_CONFIGMAP,
    STATUS_ANNOTATION, SYSTEM_NAMESPACE,
};
use crate::workload::{SERVICE_ROLE, SYNC_ROLES};

mod containers;
mod patch;
mod view;
mod wire;

use containers::*;
use patch::*;
pub use view::{MetaView, Named, PodView, ReadinessGateView, SpecView, StringMap, VolumeView};
pub use wire::{Choice, Injector, PatchPlan};

/// Value written to [`STATUS_ANNOTATION`] on injected pods. Versioned so a
/// later injector can tell its own older patches apart.
pub const STATUS_INJECTED: &str = "injected-v1";
/// Default name of the injected init container.
pub const GATE_CONTAINER: &str = "counterweight-gate";
/// Name of the injected lease sidecar: the gate binary in `hold` mode, as a
/// native sidecar (an init container with `restartPolicy: Always`) right
/// after the gate. Its readiness follows the cluster's serving lease
/// (`crate::serving`), so the pod leaves its Services when the lease ends
/// even if no controller is left to say so, and it keeps the lease file
/// the application may read.
pub const LEASE_CONTAINER: &str = "counterweight-lease";
/// Default port of the lease sidecar's readiness endpoint.
pub const DEFAULT_READY_PORT: u16 = 9877;
/// Path of the lease file in the shared scratch volume.
pub const LEASE_FILE_PATH: &str = "/var/run/counterweight/lease";
/// Name of the projected token volume added when the pod disables token automount.
pub const TOKEN_VOLUME: &str = "counterweight-gate-token";
/// Name of the writable scratch volume the gate writes its release epoch to
/// (the gate's root filesystem is read-only), and the lease sidecar its
/// lease file.
///
/// The application's contract is to read both files, so its container
/// mounts this volume. A Deployment (any pod template) can mount only a
/// volume it declares: its template is validated when it is created, long
/// before the webhook sees a pod. A pod may therefore declare the volume
/// itself, as an `emptyDir`; the injector then uses that one instead of
/// adding its own. Declared as anything else it is a
/// [`Skip::NameConflict`]: the gate must write to scratch space of the pod's
/// own, not to a host path or a shared volume.
pub const RUN_VOLUME: &str = "counterweight-gate-run";
/// Where the gate's scratch volume is mounted; the gate's default epoch file lives here.
pub const RUN_MOUNT_PATH: &str = "/var/run/counterweight";
/// Where Kubernetes clients look for the service-account token.
pub const TOKEN_MOUNT_PATH: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
/// Namespaces that are never injected, whatever their labels say: gating
/// cluster infrastructure could keep a cluster from ever starting.
pub const SYSTEM_NAMESPACES: [&str; 3] = ["kube-system", "kube-public", "kube-node-lease"];
/// Environment variable names the gate reads (they match its flags).
pub mod env {
    /// Namespace of the state ConfigMap.
    pub const STATE_NAMESPACE: &str = "COUNTERWEIGHT_STATE_NAMESPACE";
    /// Name of the state ConfigMap.
    pub const STATE_NAME: &str = "COUNTERWEIGHT_STATE_NAME";
    /// The cluster this pod expects to run in; the gate refuses a state record of another cluster.
    pub const EXPECTED_CLUSTER: &str = "COUNTERWEIGHT_EXPECTED_CLUSTER";
    /// File the gate writes the release epoch to.
    pub const EPOCH_FILE: &str = "COUNTERWEIGHT_EPOCH_FILE";
    /// The pod's own name, from the downward API, for the gate's logs.
    pub const POD_NAME: &str = "COUNTERWEIGHT_POD_NAME";
    /// The pod's own namespace, from the downward API.
    pub const POD_NAMESPACE: &str = "COUNTERWEIGHT_POD_NAMESPACE";
    /// Set to `true` in the lease sidecar: run in `hold` mode.
    pub const HOLD: &str = "COUNTERWEIGHT_GATE_HOLD";
    /// File the lease sidecar keeps the serving lease in, for the application.
    pub const LEASE_FILE: &str = "COUNTERWEIGHT_LEASE_FILE";
    /// Address the lease sidecar answers readiness probes on.
    pub const READY_LISTEN: &str = "COUNTERWEIGHT_READY_LISTEN";
    /// Name of the serving lease ConfigMap (in the state's namespace).
    pub const SERVING_NAME: &str = "COUNTERWEIGHT_SERVING_NAME";
}

/// Where among the pod's init containers the gate goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GatePosition {
    /// Before every other init container (the default): nothing of the pod
    /// runs in a standby cluster, not even migrations in init containers.
    #[default]
    First,
    /// After the pod's own init containers, e.g. when one of them must set up
    /// networking (a mesh's iptables init) before the gate can reach the API.
    Last,
}

/// CPU and memory requests and limits of the gate container, as Kubernetes quantities.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GateResources {
    /// CPU request, e.g. `10m`.
    pub cpu_request: String,
    /// Memory request, e.g. `16Mi`.
    pub memory_request: String,
    /// CPU limit, e.g. `100m`.
    pub cpu_limit: String,
    /// Memory limit, e.g. `64Mi`.
    pub memory_limit: String,
}

impl Default for GateResources {
    fn default() -> Self {
        Self {
            cpu_request: "10m".into(),
            memory_request: "16Mi".into(),
            cpu_limit: "100m".into(),
            memory_limit: "64Mi".into(),
        }
    }
}

/// Everything the injector needs besides the pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InjectorConfig {
    /// Image of the gate container.
    pub image: String,
    /// Image pull policy of the gate container, if set.
    pub image_pull_policy: Option<String>,
    /// Name of the gate container.
    pub container_name: String,
    /// Where the gate goes among the init containers.
    pub position: GatePosition,
    /// Namespace of the state ConfigMap (and of the controller; never injected).
    pub state_namespace: String,
    /// Name of the state ConfigMap.
    pub state_name: String,
    /// The cluster the injected pods expect to run in.
    pub cluster_name: String,
    /// Resources of the gate container.
    pub resources: GateResources,
    /// UID the gate runs as; a numeric UID lets `runAsNonRoot` be verified
    /// whatever the image's `USER` says.
    pub run_as_user: i64,
    /// Lifetime requested for the projected token (the kubelet refreshes it).
    pub token_expiration_seconds: i64,
    /// Skip hostNetwork pods (default false; see the module docs for why).
    pub skip_host_network: bool,
    /// Inject the lease sidecar after the gate (default true). Without it
    /// a pod released by the gate serves until a controller turns its
    /// serving condition off: nothing stops it if the active's controller
    /// dies. Turn it off only on clusters without native sidecars
    /// (Kubernetes before 1.29).
    pub lease_sidecar: bool,
    /// Port of the lease sidecar's readiness endpoint, in the pod's network.
    pub ready_port: u16,
}

impl InjectorConfig {
    /// Container and volume names the injection adds: a pod that already
    /// uses one is a [`Skip::NameConflict`], and a warning names them. The
    /// one exception is [`RUN_VOLUME`] declared as an `emptyDir`, which the
    /// pod may bring so its app can mount it.
    pub fn reserved_names(&self) -> Vec<&str> {
        let mut names = vec![self.container_name.as_str()];
        if self.lease_sidecar {
            names.push(LEASE_CONTAINER);
        }
        names.extend([TOKEN_VOLUME, RUN_VOLUME]);
        names
    }
}

impl Default for InjectorConfig {
    fn default() -> Self {
        Self {
            image: "counterweight/gate:latest".into(),
            image_pull_policy: None,
            container_name: GATE_CONTAINER.into(),
            position: GatePosition::First,
            state_namespace: SYSTEM_NAMESPACE.into(),
            state_name: STATE_CONFIGMAP.into(),
            cluster_name: String::new(),
            resources: GateResources::default(),
            run_as_user: 65532,
            token_expiration_seconds: 3607,
            skip_host_network: false,
            lease_sidecar: true,
            ready_port: DEFAULT_READY_PORT,
        }
    }
}

/// Why a pod was left alone. [`Skip::as_str`] is stable: it is a metrics
/// label value and appears in logs and warnings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Skip {
    /// kube-system, kube-public or kube-node-lease.
    SystemNamespace,
    /// The controller's own namespace (the state ConfigMap's namespace).
    ControllerNamespace,
    /// The namespace lacks `counterweight.dev/inject=enabled`.
    NamespaceNotEnabled,
    /// The pod carries `counterweight.dev/inject: disabled`.
    OptedOut,
    /// The pod has a synchronization role (`ha`, `database`, `file-replication`).
    SyncRole,
    /// The pod's role label has a value Counterweight does not know. Neither
    /// gating nor not gating is safe for a typo, so the pod is left alone and
    /// the webhook returns a warning naming the label.
    UnknownRole,
    /// The pod already carries the status annotation or the gate container.
    AlreadyInjected,
    /// A mirror (static) pod: the kubelet owns its spec.
    MirrorPod,
    /// hostNetwork pod, and the config says to skip those.
    HostNetwork,
    /// The pod already has a volume, or an app container, with a name the
    /// gate or its lease sidecar needs (a [`RUN_VOLUME`] that is an
    /// `emptyDir` is not a conflict: the injector uses it).
    NameConflict,
}

impl Skip {
    /// Every skip reason, for pre-registering metrics.
    pub const ALL: [Skip; 10] = [
        Skip::SystemNamespace,
        Skip::ControllerNamespace,
        Skip::NamespaceNotEnabled,
        Skip::OptedOut,
        Skip::SyncRole,
        Skip::UnknownRole,
        Skip::AlreadyInjected,
        Skip::MirrorPod,
        Skip::HostNetwork,
        Skip::NameConflict,
    ];

    /// The stable kebab-case name of the reason.
    pub fn as_str(self) -> &'static str {
        match self {
            Skip::SystemNamespace => "system-namespace",
            Skip::ControllerNamespace => "controller-namespace",
            Skip::NamespaceNotEnabled => "namespace-not-enabled",
            Skip::OptedOut => "opted-out",
            Skip::SyncRole => "sync-role",
            Skip::UnknownRole => "unknown-role",
            Skip::AlreadyInjected => "already-injected",
            Skip::MirrorPod => "mirror-pod",
            Skip::HostNetwork => "host-network",
            Skip::NameConflict => "name-conflict",
        }
    }

    /// Whether the skip hides a probable user mistake worth a warning back to
    /// the client (as opposed to an ordinary, intended skip).
    pub fn is_suspicious(self) -> bool {
        matches!(self, Skip::UnknownRole | Skip::NameConflict)
    }
}

impl std::fmt::Display for Skip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The injector's verdict for one pod.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Apply this patch to the pod.
    Inject(Patch),
    /// Leave the pod as it is, for this reason.
    Skip(Skip),
}

/// Annotation the kubelet puts on mirror pods of static pods.
const MIRROR_ANNOTATION: &str = "kubernetes.io/config.mirror";

/// Decides whether `pod`, created in `namespace` whose labels are
/// `namespace_labels`, gets the init-gate, and returns the patch if so.
///
/// The order of checks is the order of their authority: namespaces that are
/// never injected first, then the namespace's opt-in, then the pod's own
/// wishes, then idempotence.
pub fn inject(
    pod: &Pod,
    namespace_labels: &BTreeMap<String, String>,
    namespace: &str,
    config: &InjectorConfig,
) -> Decision {
    let view = PodView::from(pod);
    match skip_reason(&view, namespace_labels, namespace, config) {
        Some(reason) => Decision::Skip(reason),
        None => Decision::Inject(patch(&view, config)),
    }
}

fn skip_reason(
    pod: &PodView<'_>,
    namespace_labels: &BTreeMap<String, String>,
    namespace: &str,
    config: &InjectorConfig,
) -> Option<Skip> {
    if SYSTEM_NAMESPACES.contains(&namespace) {
        return Some(Skip::SystemNamespace);
    }
    if namespace == config.state_namespace || namespace == SYSTEM_NAMESPACE {
        return Some(Skip::ControllerNamespace);
    }
    if !crate::workload::namespace_opted_in(Some(namespace_labels)) {
        return Some(Skip::NamespaceNotEnabled);
    }
    let meta = &pod.metadata;
    let annotation = |key: &str| {
        meta.annotations
            .as_ref()
            .and_then(|a| a.get(key))
            .map(|v| &**v)
    };
    if annotation(MIRROR_ANNOTATION).is_some() {
        return Some(Skip::MirrorPod);
    }
    if annotation(INJECT_ANNOTATION) == Some(INJECT_DISABLED) {
        return Some(Skip::OptedOut);
    }
    match meta.labels.as_ref().and_then(|l| l.get(ROLE_LABEL)) {
        None => {}
        Some(role) if role == SERVICE_ROLE => {}
        Some(role) if SYNC_ROLES.contains(&&**role) => return Some(Skip::SyncRole),
        Some(_) => return Some(Skip::UnknownRole),
    }
    let spec = pod.spec.as_ref();
    let has_gate = spec
        .and_then(|s| s.init_containers.as_ref())
        .is_some_and(|ics| ics.iter().any(|c| c.name == config.container_name));
    if annotation(STATUS_ANNOTATION).is_some() || has_gate {
        return Some(Skip::AlreadyInjected);
    }
    if config.skip_host_network && spec.and_then(|s| s.host_network) == Some(true) {
        return Some(Skip::HostNetwork);
    }
    // The pod's own emptyDir scratch volume is used, not a conflict: its app
    // mounts it to read the epoch and lease files (see `RUN_VOLUME`).
    let volume_taken = spec.and_then(|s| s.volumes.as_ref()).is_some_and(|vs| {
        vs.iter()
            .any(|v| v.name == TOKEN_VOLUME || (v.name == RUN_VOLUME && !v.empty_dir))
    });
    // An app container named like the gate, or any container named like
    // the lease sidecar, would make the injected pod one the API server
    // refuses (duplicate container name): the pod could not be created at
    // all, while outside an opted-in namespace it can.
    let named = |name: &str| {
        let Some(s) = spec else { return false };
        let app = s.containers.iter().flatten().any(|c| c.name == name);
        app || (name == LEASE_CONTAINER
            && s.init_containers.iter().flatten().any(|c| c.name == name))
    };
    let container_taken =
        named(&config.container_name) || (config.lease_sidecar && named(LEASE_CONTAINER));
    if volume_taken || container_taken {
        return Some(Skip::NameConflict);
    }
    None
}

/// Whether the pod turned off the service-account token, so the gate needs
/// its own. The pod's setting wins over the service account's; when the pod
/// says nothing we cannot see the ServiceAccount from here, so the gate gets
/// the token the pod gets (an SA with automount off and a pod that does not
/// override it is documented as unsupported).
fn needs_own_token(pod: &PodView<'_>) -> bool {
    pod.spec
        .as_ref()
        .and_then(|s| s.automount_service_account_token)
        == Some(false)
}

#[cfg(test)]
mod tests;
