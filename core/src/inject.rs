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

/// The parts of a pod the injector reads, and nothing else.
///
/// [`inject`] takes a whole [`Pod`] and looks at it through this view; the
/// webhook deserializes the view straight from the AdmissionReview's object
/// with [`serde`], and everything else in the pod (containers, probes, env,
/// status) is skipped without being built. The `Cow`s let [`inject`] borrow
/// from a [`Pod`]; from JSON, serde borrows only direct `Cow` fields (the
/// container, volume and condition names) and copies strings inside options
/// and maps, a handful of small allocations. Fields keep the requiredness
/// and types they have in the Kubernetes API (a volume or init container
/// must have a `name`, a readiness gate a `conditionType`), so a pod that is
/// malformed *where the rules look* fails to deserialize just as a [`Pod`]
/// would; one malformed elsewhere (say `containers`) is not this view's
/// concern: the API server decoded the object before sending it and
/// validates the patched pod.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
pub struct PodView<'a> {
    /// The pod's metadata, as far as read.
    #[serde(default, borrow)]
    pub metadata: MetaView<'a>,
    /// The pod's spec, as far as read.
    #[serde(default, borrow)]
    pub spec: Option<SpecView<'a>>,
}

/// Labels or annotations.
pub type StringMap<'a> = BTreeMap<Cow<'a, str>, Cow<'a, str>>;

/// The metadata fields of a [`PodView`].
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MetaView<'a> {
    /// `metadata.name` (often unset at CREATE: see `generate_name`).
    #[serde(default, borrow)]
    pub name: Option<Cow<'a, str>>,
    /// `metadata.generateName`.
    #[serde(default, borrow)]
    pub generate_name: Option<Cow<'a, str>>,
    /// `metadata.namespace`.
    #[serde(default, borrow)]
    pub namespace: Option<Cow<'a, str>>,
    /// `metadata.labels`.
    #[serde(default, borrow)]
    pub labels: Option<StringMap<'a>>,
    /// `metadata.annotations`.
    #[serde(default, borrow)]
    pub annotations: Option<StringMap<'a>>,
}

/// The spec fields of a [`PodView`].
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SpecView<'a> {
    /// Names of `spec.containers`: an app container may not take the name
    /// of a container the injector adds (the API server would refuse the
    /// injected pod for a duplicate name).
    #[serde(default, borrow)]
    pub containers: Option<Vec<Named<'a>>>,
    /// Names of `spec.initContainers`.
    #[serde(default, borrow)]
    pub init_containers: Option<Vec<Named<'a>>>,
    /// `spec.readinessGates`.
    #[serde(default, borrow)]
    pub readiness_gates: Option<Vec<ReadinessGateView<'a>>>,
    /// Names of `spec.volumes`, and which are `emptyDir`s.
    #[serde(default, borrow)]
    pub volumes: Option<Vec<VolumeView<'a>>>,
    /// `spec.hostNetwork`.
    #[serde(default)]
    pub host_network: Option<bool>,
    /// `spec.automountServiceAccountToken`.
    #[serde(default)]
    pub automount_service_account_token: Option<bool>,
}

/// A container, by its (required) name.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct Named<'a> {
    /// The name.
    #[serde(borrow)]
    pub name: Cow<'a, str>,
}

/// A volume, by its (required) name, and whether it is an `emptyDir` (the
/// one kind of [`RUN_VOLUME`] a pod may declare itself).
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeView<'a> {
    /// The name.
    #[serde(borrow)]
    pub name: Cow<'a, str>,
    /// `emptyDir` is set (its content is not read).
    #[serde(default, deserialize_with = "is_present")]
    pub empty_dir: bool,
}

/// Whether a field holds a value (`null` counts as absent, as it does for
/// the API server), without reading the value.
fn is_present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    use serde::Deserialize;
    Ok(Option::<serde::de::IgnoredAny>::deserialize(d)?.is_some())
}

/// A readiness gate, by its (required) condition type.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReadinessGateView<'a> {
    /// The condition type.
    #[serde(borrow)]
    pub condition_type: Cow<'a, str>,
}

impl<'a> From<&'a Pod> for PodView<'a> {
    fn from(pod: &'a Pod) -> Self {
        let borrow = |s: &'a Option<String>| s.as_deref().map(Cow::Borrowed);
        let map = |m: &'a Option<BTreeMap<String, String>>| {
            m.as_ref().map(|m| {
                m.iter()
                    .map(|(k, v)| (Cow::Borrowed(k.as_str()), Cow::Borrowed(v.as_str())))
                    .collect()
            })
        };
        let meta = &pod.metadata;
        Self {
            metadata: MetaView {
                name: borrow(&meta.name),
                generate_name: borrow(&meta.generate_name),
                namespace: borrow(&meta.namespace),
                labels: map(&meta.labels),
                annotations: map(&meta.annotations),
            },
            spec: pod.spec.as_ref().map(|s| SpecView {
                containers: Some(
                    s.containers
                        .iter()
                        .map(|c| Named {
                            name: Cow::Borrowed(&c.name),
                        })
                        .collect(),
                ),
                init_containers: s.init_containers.as_ref().map(|cs| {
                    cs.iter()
                        .map(|c| Named {
                            name: Cow::Borrowed(&c.name),
                        })
                        .collect()
                }),
                readiness_gates: s.readiness_gates.as_ref().map(|gs| {
                    gs.iter()
                        .map(|g| ReadinessGateView {
                            condition_type: Cow::Borrowed(&g.condition_type),
                        })
                        .collect()
                }),
                volumes: s.volumes.as_ref().map(|vs| {
                    vs.iter()
                        .map(|v| VolumeView {
                            name: Cow::Borrowed(&v.name),
                            empty_dir: v.empty_dir.is_some(),
                        })
                        .collect()
                }),
                host_network: s.host_network,
                automount_service_account_token: s.automount_service_account_token,
            }),
        }
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

/// One part of the patch, chosen by the few facts about the pod that shape
/// it. The patch is a short list of these; every step's operations depend on
/// nothing but the step and the [`InjectorConfig`], which is what lets an
/// [`Injector`] serialize each of them once and answer every pod by
/// concatenation. [`patch`] and [`Injector::decide`] share [`plan`] and
/// [`Step::ops`], so they cannot drift apart (a property test checks they
/// produce the same bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// The pod has no annotations: add the map with the marker.
    AnnotationsNew,
    /// Add the marker to the pod's annotations.
    AnnotationAdd,
    /// The pod has no init containers: add the list with the gate.
    GateNew { own_token: bool },
    /// Insert the gate before the pod's init containers.
    GateFirst { own_token: bool },
    /// Append the gate after the pod's init containers.
    GateLast { own_token: bool },
    /// The pod has no readiness gates: add the list with ours.
    ReadinessNew,
    /// Append our readiness gate to the pod's.
    ReadinessAppend,
    /// The pod has no volumes: add the list with the gate's.
    VolumesNew { own_token: bool },
    /// Append the gate's volumes to the pod's.
    VolumesAppend { own_token: bool },
    /// The pod declares the scratch volume itself: append only the token.
    TokenAppend,
}

impl Step {
    const COUNT: usize = 15;
    const ALL: [Step; Step::COUNT] = [
        Step::AnnotationsNew,
        Step::AnnotationAdd,
        Step::GateNew { own_token: false },
        Step::GateNew { own_token: true },
        Step::GateFirst { own_token: false },
        Step::GateFirst { own_token: true },
        Step::GateLast { own_token: false },
        Step::GateLast { own_token: true },
        Step::ReadinessNew,
        Step::ReadinessAppend,
        Step::VolumesNew { own_token: false },
        Step::VolumesNew { own_token: true },
        Step::VolumesAppend { own_token: false },
        Step::VolumesAppend { own_token: true },
        Step::TokenAppend,
    ];

    /// Position in [`Step::ALL`].
    fn index(self) -> usize {
        let t = |own_token: bool| usize::from(own_token);
        match self {
            Step::AnnotationsNew => 0,
            Step::AnnotationAdd => 1,
            Step::GateNew { own_token } => 2 + t(own_token),
            Step::GateFirst { own_token } => 4 + t(own_token),
            Step::GateLast { own_token } => 6 + t(own_token),
            Step::ReadinessNew => 8,
            Step::ReadinessAppend => 9,
            Step::VolumesNew { own_token } => 10 + t(own_token),
            Step::VolumesAppend { own_token } => 12 + t(own_token),
            Step::TokenAppend => 14,
        }
    }

    /// The RFC 6902 operations of this step.
    fn ops(self, config: &InjectorConfig) -> Vec<PatchOperation> {
        let add = |tokens: &[&str], value: Value| {
            PatchOperation::Add(AddOperation {
                path: PointerBuf::from_tokens(tokens.iter().copied()),
                value,
            })
        };
        let gate = |own_token| to_value(&gate_container(config, own_token));
        // The lease sidecar goes right after the gate, wherever the gate goes.
        let sidecar = |own_token| {
            config
                .lease_sidecar
                .then(|| to_value(&lease_container(config, own_token)))
        };
        let readiness = || {
            to_value(&PodReadinessGate {
                condition_type: SERVING_CONDITION.into(),
            })
        };
        match self {
            // `from_tokens` escapes the `/` in the key as `~1`.
            Step::AnnotationAdd => vec![add(
                &["metadata", "annotations", STATUS_ANNOTATION],
                Value::String(STATUS_INJECTED.into()),
            )],
            Step::AnnotationsNew => vec![add(
                &["metadata", "annotations"],
                serde_json::json!({ STATUS_ANNOTATION: STATUS_INJECTED }),
            )],
            Step::GateNew { own_token } => vec![add(
                &["spec", "initContainers"],
                Value::Array(
                    std::iter::once(gate(own_token))
                        .chain(sidecar(own_token))
                        .collect(),
                ),
            )],
            Step::GateFirst { own_token } => {
                std::iter::once(add(&["spec", "initContainers", "0"], gate(own_token)))
                    .chain(sidecar(own_token).map(|c| add(&["spec", "initContainers", "1"], c)))
                    .collect()
            }
            Step::GateLast { own_token } => {
                std::iter::once(add(&["spec", "initContainers", "-"], gate(own_token)))
                    .chain(sidecar(own_token).map(|c| add(&["spec", "initContainers", "-"], c)))
                    .collect()
            }
            Step::ReadinessNew => vec![add(
                &["spec", "readinessGates"],
                Value::Array(vec![readiness()]),
            )],
            Step::ReadinessAppend => vec![add(&["spec", "readinessGates", "-"], readiness())],
            Step::VolumesNew { own_token } => vec![add(
                &["spec", "volumes"],
                Value::Array(gate_volumes(config, own_token)),
            )],
            Step::VolumesAppend { own_token } => gate_volumes(config, own_token)
                .into_iter()
                .map(|v| add(&["spec", "volumes", "-"], v))
                .collect(),
            Step::TokenAppend => vec![add(
                &["spec", "volumes", "-"],
                to_value(&token_volume(config)),
            )],
        }
    }
}

/// The steps of the patch for `pod`, in order: marker, gate, readiness gate
/// (unless the pod already declares it), volumes (none when the pod brings
/// its own scratch volume and needs no token).
fn plan(pod: &PodView<'_>, config: &InjectorConfig) -> [Option<Step>; 4] {
    let own_token = needs_own_token(pod);
    let spec = pod.spec.as_ref();
    let annotation = match pod.metadata.annotations {
        Some(_) => Step::AnnotationAdd,
        None => Step::AnnotationsNew,
    };
    let gate = match spec.and_then(|s| s.init_containers.as_ref()) {
        None => Step::GateNew { own_token },
        Some(_) => match config.position {
            GatePosition::First => Step::GateFirst { own_token },
            GatePosition::Last => Step::GateLast { own_token },
        },
    };
    let readiness = match spec.and_then(|s| s.readiness_gates.as_ref()) {
        None => Some(Step::ReadinessNew),
        Some(gates) if gates.iter().any(|g| g.condition_type == SERVING_CONDITION) => None,
        Some(_) => Some(Step::ReadinessAppend),
    };
    let volumes = match spec.and_then(|s| s.volumes.as_ref()) {
        None => Some(Step::VolumesNew { own_token }),
        // `skip_reason` let it through, so it is an emptyDir.
        Some(vs) if vs.iter().any(|v| v.name == RUN_VOLUME) => {
            own_token.then_some(Step::TokenAppend)
        }
        Some(_) => Some(Step::VolumesAppend { own_token }),
    };
    [Some(annotation), Some(gate), readiness, volumes]
}

fn patch(pod: &PodView<'_>, config: &InjectorConfig) -> Patch {
    Patch(
        plan(pod, config)
            .into_iter()
            .flatten()
            .flat_map(|step| step.ops(config))
            .collect(),
    )
}

/// The gate's volumes: scratch for the epoch file, and the token if the pod has none.
fn gate_volumes(config: &InjectorConfig, own_token: bool) -> Vec<Value> {
    let mut volumes = vec![to_value(&Volume {
        name: RUN_VOLUME.into(),
        empty_dir: Some(EmptyDirVolumeSource {
            size_limit: Some(Quantity("1Mi".into())),
            ..Default::default()
        }),
        ..Default::default()
    })];
    if own_token {
        volumes.push(to_value(&token_volume(config)));
    }
    volumes
}

/// An injector with its patch pieces serialized in advance.
///
/// [`inject`] builds the gate container, volumes and readiness gate as
/// Kubernetes structs, converts them to JSON values and collects a
/// [`Patch`] on every call: several microseconds of allocation, for output
/// that depends only on the configuration and four facts about the pod. An
/// `Injector` serializes each of the patch's possible parts once, at
/// construction, and [`Injector::decide`] answers a [`PodView`] with the
/// [`PatchPlan`] its facts select. The rules are the same code as
/// [`inject`]'s; [`Injector::json`] writes the bytes of
/// `serde_json::to_vec` of [`inject`]'s patch.
///
/// ## The base64 form
///
/// An AdmissionReview carries the patch base64-encoded, and encoding 1.4 KB
/// for every pod was the largest single cost left in the webhook's handler.
/// Base64 maps every 3 input bytes to 4 output characters on their own, so
/// the encoding of a concatenation is the concatenation of the encodings
/// whenever each piece but the last is a multiple of 3 bytes long. Each part
/// is therefore stored with its separator (`[` first, `,` after) and padded
/// with JSON whitespace after its last value to a multiple of 3, and encoded
/// once; [`Injector::write_base64`] only copies. The decoded patch differs
/// from [`Injector::json`]'s only by that insignificant whitespace (RFC 8259
/// section 2), which a property test checks, and the API server's e2e tests
/// apply it.
#[derive(Debug, Clone)]
pub struct Injector {
    config: InjectorConfig,
    /// `Step::ALL[i]`'s operations as JSON, comma-separated, without brackets.
    fragments: [String; Step::COUNT],
    /// Base64 of `[` + `fragments[i]` + padding, for the first part.
    first_base64: [String; Step::COUNT],
    /// Base64 of `,` + `fragments[i]` + padding, for every later part.
    next_base64: [String; Step::COUNT],
}

/// Base64 of the `]` that closes every patch: the last piece, so it needs
/// no padding of its own.
const CLOSE_BASE64: &str = "XQ==";
/// Base64 of `[]`, the patch of an empty plan.
const EMPTY_BASE64: &str = "W10=";

/// The parts of one pod's patch, in order, as [`Injector::decide`] chose
/// them. Small and `Copy`: the bytes are written only by [`Injector::json`]
/// or [`Injector::write_base64`], straight into the caller's buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PatchPlan([Option<Step>; 4]);

impl PatchPlan {
    fn parts(&self) -> impl Iterator<Item = usize> + '_ {
        self.0.iter().flatten().map(|s| s.index())
    }
}

/// What [`Injector::decide`] answers: the patch to write, or why not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Choice {
    /// Apply the RFC 6902 patch of this plan to the pod.
    Inject(PatchPlan),
    /// Leave the pod as it is, for this reason.
    Skip(Skip),
}

impl Injector {
    /// Serializes every patch part `config` can produce, as JSON and as base64.
    pub fn new(config: InjectorConfig) -> Self {
        use base64::Engine;
        let fragments = Step::ALL.map(|step| {
            // A list of operations serializes as `[op,op]`; keep the inside
            // so steps join with commas. Serializing JSON values with string
            // keys cannot fail; `null`, like `to_value`'s fallback, would make
            // the API server reject the patch loudly, never apply a wrong one.
            let text = serde_json::to_string(&step.ops(&config)).unwrap_or_default();
            text.strip_prefix('[')
                .and_then(|t| t.strip_suffix(']'))
                .map_or_else(|| "null".to_owned(), str::to_owned)
        });
        let encoded = |separator: char| {
            std::array::from_fn(|i| {
                let mut piece = format!("{separator}{}", fragments[i]);
                while piece.len() % 3 != 0 {
                    piece.push(' ');
                }
                base64::engine::general_purpose::STANDARD.encode(piece)
            })
        };
        Self {
            first_base64: encoded('['),
            next_base64: encoded(','),
            config,
            fragments,
        }
    }

    /// The configuration the parts were built from.
    pub fn config(&self) -> &InjectorConfig {
        &self.config
    }

    /// The same decision as [`inject`] with this injector's configuration:
    /// which parts the patch is made of, or why the pod is skipped.
    pub fn decide(
        &self,
        pod: &PodView<'_>,
        namespace_labels: &BTreeMap<String, String>,
        namespace: &str,
    ) -> Choice {
        match skip_reason(pod, namespace_labels, namespace, &self.config) {
            Some(reason) => Choice::Skip(reason),
            None => Choice::Inject(PatchPlan(plan(pod, &self.config))),
        }
    }

    /// The patch of `plan` as compact JSON: the bytes of `serde_json::to_vec`
    /// of [`inject`]'s patch for the same pod.
    pub fn json(&self, plan: &PatchPlan) -> Vec<u8> {
        let len = plan
            .parts()
            .map(|i| self.fragments[i].len() + 1)
            .sum::<usize>()
            + 1;
        let mut out = Vec::with_capacity(len);
        for (n, i) in plan.parts().enumerate() {
            out.push(if n == 0 { b'[' } else { b',' });
            out.extend_from_slice(self.fragments[i].as_bytes());
        }
        if out.is_empty() {
            out.push(b'[');
        }
        out.push(b']');
        out
    }

    /// How many bytes [`Injector::write_base64`] appends for `plan`.
    pub fn base64_len(&self, plan: &PatchPlan) -> usize {
        self.base64_pieces(plan).map(str::len).sum()
    }

    /// Appends the base64 encoding of `plan`'s patch (standard alphabet,
    /// padded) to `out`: the JSON of [`Injector::json`] with whitespace
    /// between its parts, see the type's documentation.
    pub fn write_base64(&self, plan: &PatchPlan, out: &mut Vec<u8>) {
        out.reserve(self.base64_len(plan));
        for piece in self.base64_pieces(plan) {
            out.extend_from_slice(piece.as_bytes());
        }
    }

    fn base64_pieces<'a>(&'a self, plan: &'a PatchPlan) -> impl Iterator<Item = &'a str> + 'a {
        let parts = plan.parts().enumerate().map(|(n, i)| {
            if n == 0 {
                self.first_base64[i].as_str()
            } else {
                self.next_base64[i].as_str()
            }
        });
        // A plan always holds the marker and the gate; were it empty, the
        // patch would be `[]`, whose `[` has no padded piece to ride in.
        let close = if plan.parts().next().is_none() {
            EMPTY_BASE64
        } else {
            CLOSE_BASE64
        };
        parts.chain(std::iter::once(close))
    }
}

fn to_value<T: serde::Serialize>(v: &T) -> Value {
    // Serializing k8s-openapi structs into a Value cannot fail: they are plain
    // data with string keys. Null is a harmless fallback that the API server
    // would reject loudly, never a silent wrong patch.
    serde_json::to_value(v).unwrap_or(Value::Null)
}

fn gate_container(config: &InjectorConfig, own_token: bool) -> Container {
    let plain = |name: &str, value: &str| EnvVar {
        name: name.into(),
        value: Some(value.into()),
        value_from: None,
    };
    let field = |name: &str, path: &str| EnvVar {
        name: name.into(),
        value: None,
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                api_version: Some("v1".into()),
                field_path: path.into(),
            }),
            ..Default::default()
        }),
    };
    let r = &config.resources;
    let quantities = |cpu: &str, mem: &str| {
        BTreeMap::from([
            ("cpu".to_owned(), Quantity(cpu.to_owned())),
            ("memory".to_owned(), Quantity(mem.to_owned())),
        ])
    };
    let mut mounts = vec![VolumeMount {
        name: RUN_VOLUME.into(),
        mount_path: RUN_MOUNT_PATH.into(),
        ..Default::default()
    }];
    if own_token {
        mounts.push(VolumeMount {
            name: TOKEN_VOLUME.into(),
            mount_path: TOKEN_MOUNT_PATH.into(),
            read_only: Some(true),
            ..Default::default()
        });
    }
    Container {
        name: config.container_name.clone(),
        image: Some(config.image.clone()),
        image_pull_policy: config.image_pull_policy.clone(),
        env: Some(vec![
            plain(env::STATE_NAMESPACE, &config.state_namespace),
            plain(env::STATE_NAME, &config.state_name),
            plain(env::EXPECTED_CLUSTER, &config.cluster_name),
            plain(env::EPOCH_FILE, &format!("{RUN_MOUNT_PATH}/epoch")),
            field(env::POD_NAME, "metadata.name"),
            field(env::POD_NAMESPACE, "metadata.namespace"),
        ]),
        resources: Some(ResourceRequirements {
            requests: Some(quantities(&r.cpu_request, &r.memory_request)),
            limits: Some(quantities(&r.cpu_limit, &r.memory_limit)),
            ..Default::default()
        }),
        security_context: Some(SecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(config.run_as_user),
            run_as_group: Some(config.run_as_user),
            read_only_root_filesystem: Some(true),
            allow_privilege_escalation: Some(false),
            privileged: Some(false),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                add: None,
            }),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".into(),
                localhost_profile: None,
            }),
            ..Default::default()
        }),
        volume_mounts: Some(mounts),
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        ..Default::default()
    }
}

/// The lease sidecar: the gate's container in `hold` mode, restarted
/// always (a native sidecar), ready only while the serving lease lets the
/// pod serve. The probe runs every second, the shortest period Kubernetes
/// has, and one failure takes the pod out: the serving horizon
/// (`crate::serving`) leaves `marginMs` for it.
fn lease_container(config: &InjectorConfig, own_token: bool) -> Container {
    use k8s_openapi::api::core::v1::{HTTPGetAction, Probe};
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    let mut c = gate_container(config, own_token);
    c.name = LEASE_CONTAINER.into();
    c.restart_policy = Some("Always".into());
    let plain = |name: &str, value: String| EnvVar {
        name: name.into(),
        value: Some(value),
        value_from: None,
    };
    c.env.get_or_insert_with(Vec::new).extend([
        plain(env::HOLD, "true".into()),
        plain(env::LEASE_FILE, LEASE_FILE_PATH.into()),
        plain(env::READY_LISTEN, format!("0.0.0.0:{}", config.ready_port)),
    ]);
    c.readiness_probe = Some(Probe {
        http_get: Some(HTTPGetAction {
            path: Some("/ready".into()),
            port: IntOrString::Int(i32::from(config.ready_port)),
            ..Default::default()
        }),
        period_seconds: Some(1),
        timeout_seconds: Some(1),
        success_threshold: Some(1),
        failure_threshold: Some(1),
        ..Default::default()
    });
    c
}

/// The same three sources the kubelet projects for an automounted token,
/// so the gate's Kubernetes client finds token, CA and namespace where it
/// always looks.
fn token_volume(config: &InjectorConfig) -> Volume {
    Volume {
        name: TOKEN_VOLUME.into(),
        projected: Some(ProjectedVolumeSource {
            default_mode: Some(0o444),
            sources: Some(vec![
                VolumeProjection {
                    service_account_token: Some(ServiceAccountTokenProjection {
                        path: "token".into(),
                        expiration_seconds: Some(config.token_expiration_seconds),
                        audience: None,
                    }),
                    ..Default::default()
                },
                VolumeProjection {
                    config_map: Some(ConfigMapProjection {
                        name: "kube-root-ca.crt".into(),
                        items: Some(vec![KeyToPath {
                            key: "ca.crt".into(),
                            path: "ca.crt".into(),
                            mode: None,
                        }]),
                        optional: None,
                    }),
                    ..Default::default()
                },
                VolumeProjection {
                    downward_api: Some(DownwardAPIProjection {
                        items: Some(vec![DownwardAPIVolumeFile {
                            path: "namespace".into(),
                            field_ref: Some(ObjectFieldSelector {
                                api_version: Some("v1".into()),
                                field_path: "metadata.namespace".into(),
                            }),
                            ..Default::default()
                        }]),
                    }),
                    ..Default::default()
                },
            ]),
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::names::{INJECT_ENABLED, INJECT_LABEL};
    use k8s_openapi::api::core::v1::PodSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use proptest::prelude::*;

    const NS: &str = "shop";

    fn enabled() -> BTreeMap<String, String> {
        BTreeMap::from([(INJECT_LABEL.to_owned(), INJECT_ENABLED.to_owned())])
    }

    fn config() -> InjectorConfig {
        InjectorConfig {
            cluster_name: "east".into(),
            ..Default::default()
        }
    }

    fn container(name: &str) -> Container {
        Container {
            name: name.into(),
            image: Some("registry.invalid/app:1".into()),
            ..Default::default()
        }
    }

    /// The barest pod the API server accepts: no labels, no annotations, no
    /// init containers, no readiness gates, no volumes.
    fn bare_pod() -> Pod {
        Pod {
            metadata: ObjectMeta::default(),
            spec: Some(PodSpec {
                containers: vec![container("app")],
                ..Default::default()
            }),
            status: None,
        }
    }

    fn apply(pod: &Pod, p: &Patch) -> Result<Pod, String> {
        let mut doc = serde_json::to_value(pod).map_err(|e| e.to_string())?;
        json_patch::patch(&mut doc, p).map_err(|e| e.to_string())?;
        serde_json::from_value(doc).map_err(|e| e.to_string())
    }

    fn injected(pod: &Pod, cfg: &InjectorConfig) -> Pod {
        match inject(pod, &enabled(), NS, cfg) {
            Decision::Inject(p) => apply(pod, &p).unwrap(),
            Decision::Skip(s) => panic!("expected injection, got skip {s}"),
        }
    }

    fn with_labels(mut pod: Pod, pairs: &[(&str, &str)]) -> Pod {
        pod.metadata.labels = Some(
            pairs
                .iter()
                .map(|(k, v)| ((*k).into(), (*v).into()))
                .collect(),
        );
        pod
    }

    fn with_annotations(mut pod: Pod, pairs: &[(&str, &str)]) -> Pod {
        pod.metadata.annotations = Some(
            pairs
                .iter()
                .map(|(k, v)| ((*k).into(), (*v).into()))
                .collect(),
        );
        pod
    }

    #[test]
    fn bare_pod_gets_gate_readiness_gate_marker_and_env() {
        let out = injected(&bare_pod(), &config());
        let spec = out.spec.as_ref().unwrap();
        let ics = spec.init_containers.as_ref().unwrap();
        assert_eq!(ics.len(), 2, "the gate and its lease sidecar");
        let gate = &ics[0];
        assert_eq!(gate.name, GATE_CONTAINER);
        assert_eq!(gate.restart_policy, None, "the gate runs once");
        let env: BTreeMap<_, _> = gate
            .env
            .as_ref()
            .unwrap()
            .iter()
            .map(|e| (e.name.as_str(), e.value.clone()))
            .collect();
        assert_eq!(
            env[env::STATE_NAMESPACE].as_deref(),
            Some("counterweight-system")
        );
        assert_eq!(env[env::STATE_NAME].as_deref(), Some("counterweight-state"));
        assert_eq!(env[env::EXPECTED_CLUSTER].as_deref(), Some("east"));
        let sc = gate.security_context.as_ref().unwrap();
        assert_eq!(sc.run_as_non_root, Some(true));
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(
            sc.capabilities.as_ref().unwrap().drop.as_deref(),
            Some(&["ALL".to_owned()][..])
        );
        let res = gate.resources.as_ref().unwrap();
        assert_eq!(res.limits.as_ref().unwrap()["memory"].0, "64Mi");
        assert_eq!(
            spec.readiness_gates.as_ref().unwrap(),
            &vec![PodReadinessGate {
                condition_type: SERVING_CONDITION.into()
            }]
        );
        assert_eq!(
            out.metadata.annotations.as_ref().unwrap()[STATUS_ANNOTATION],
            STATUS_INJECTED
        );
        // The app container is untouched, and no token volume without need.
        assert_eq!(spec.containers, vec![container("app")]);
        let vols: Vec<_> = spec
            .volumes
            .as_ref()
            .unwrap()
            .iter()
            .map(|v| v.name.as_str())
            .collect();
        assert_eq!(vols, vec![RUN_VOLUME]);
    }

    #[test]
    fn annotation_key_slash_is_escaped_in_the_pointer() {
        let pod = with_annotations(bare_pod(), &[("a", "b")]);
        let Decision::Inject(p) = inject(&pod, &enabled(), NS, &config()) else {
            panic!("expected injection");
        };
        let text = serde_json::to_string(&p).unwrap();
        assert!(
            text.contains("/metadata/annotations/counterweight.dev~1status"),
            "{text}"
        );
        let out = apply(&pod, &p).unwrap();
        let ann = out.metadata.annotations.unwrap();
        assert_eq!(ann["a"], "b", "existing annotations are kept");
        assert_eq!(ann[STATUS_ANNOTATION], STATUS_INJECTED);
    }

    #[test]
    fn the_lease_sidecar_is_a_native_sidecar_ready_only_under_the_lease() {
        let out = injected(&bare_pod(), &config());
        let ics = out.spec.unwrap().init_containers.unwrap();
        let lease = &ics[1];
        assert_eq!(lease.name, LEASE_CONTAINER);
        assert_eq!(lease.restart_policy.as_deref(), Some("Always"));
        assert_eq!(lease.image, ics[0].image, "the gate's binary");
        let env: BTreeMap<_, _> = lease
            .env
            .iter()
            .flatten()
            .map(|e| (e.name.as_str(), e.value.clone()))
            .collect();
        assert_eq!(env[env::HOLD].as_deref(), Some("true"));
        assert_eq!(env[env::LEASE_FILE].as_deref(), Some(LEASE_FILE_PATH));
        assert_eq!(env[env::READY_LISTEN].as_deref(), Some("0.0.0.0:9877"));
        assert_eq!(env[env::EPOCH_FILE], ics[0].env.as_ref().unwrap()[3].value);
        let probe = lease.readiness_probe.as_ref().unwrap();
        let get = probe.http_get.as_ref().unwrap();
        assert_eq!(
            get.port,
            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(9877)
        );
        assert_eq!(probe.period_seconds, Some(1));
        assert_eq!(probe.failure_threshold, Some(1));
        // It reads the epoch file the gate wrote: same scratch volume.
        assert!(
            lease
                .volume_mounts
                .iter()
                .flatten()
                .any(|m| m.name == RUN_VOLUME && m.mount_path == RUN_MOUNT_PATH)
        );
    }

    #[test]
    fn a_pod_with_a_container_named_like_the_lease_sidecar_is_not_injected() {
        let mut pod = bare_pod();
        pod.spec.as_mut().unwrap().init_containers = Some(vec![container(LEASE_CONTAINER)]);
        assert_eq!(
            inject(&pod, &enabled(), NS, &config()),
            Decision::Skip(Skip::NameConflict)
        );
    }

    #[test]
    fn an_app_container_named_like_the_gate_or_the_sidecar_is_a_name_conflict() {
        // Before, the gate was injected beside an app container of its name
        // and the API server refused the pod: "spec.initContainers[0].name:
        // Duplicate value: \"counterweight-gate\"".
        for name in [GATE_CONTAINER, LEASE_CONTAINER] {
            let mut pod = bare_pod();
            pod.spec.as_mut().unwrap().containers = vec![container(name)];
            assert_eq!(
                inject(&pod, &enabled(), NS, &config()),
                Decision::Skip(Skip::NameConflict),
                "{name}"
            );
        }
        // The sidecar's name is free when there is no sidecar.
        let mut pod = bare_pod();
        pod.spec.as_mut().unwrap().containers = vec![container(LEASE_CONTAINER)];
        let cfg = InjectorConfig {
            lease_sidecar: false,
            ..config()
        };
        assert!(matches!(
            inject(&pod, &enabled(), NS, &cfg),
            Decision::Inject(_)
        ));
        // And a renamed gate checks its own name.
        let mut pod = bare_pod();
        pod.spec.as_mut().unwrap().containers = vec![container("gatekeeper")];
        let cfg = InjectorConfig {
            container_name: "gatekeeper".into(),
            ..config()
        };
        assert_eq!(
            inject(&pod, &enabled(), NS, &cfg),
            Decision::Skip(Skip::NameConflict)
        );
    }

    #[test]
    fn gate_goes_first_or_last_as_configured() {
        let mut pod = bare_pod();
        pod.spec.as_mut().unwrap().init_containers =
            Some(vec![container("migrate"), container("warm")]);
        let names = |p: &Pod| -> Vec<String> {
            p.spec
                .as_ref()
                .unwrap()
                .init_containers
                .as_ref()
                .unwrap()
                .iter()
                .map(|c| c.name.clone())
                .collect()
        };
        assert_eq!(
            names(&injected(&pod, &config())),
            [GATE_CONTAINER, LEASE_CONTAINER, "migrate", "warm"]
        );
        let last = InjectorConfig {
            position: GatePosition::Last,
            ..config()
        };
        assert_eq!(
            names(&injected(&pod, &last)),
            ["migrate", "warm", GATE_CONTAINER, LEASE_CONTAINER]
        );
        let without = InjectorConfig {
            lease_sidecar: false,
            ..config()
        };
        assert_eq!(
            names(&injected(&pod, &without)),
            [GATE_CONTAINER, "migrate", "warm"]
        );
    }

    #[test]
    fn existing_readiness_gate_is_not_duplicated() {
        let mut pod = bare_pod();
        pod.spec.as_mut().unwrap().readiness_gates = Some(vec![
            PodReadinessGate {
                condition_type: "other".into(),
            },
            PodReadinessGate {
                condition_type: SERVING_CONDITION.into(),
            },
        ]);
        let out = injected(&pod, &config());
        assert_eq!(out.spec.unwrap().readiness_gates.unwrap().len(), 2);
    }

    #[test]
    fn disabled_automount_gets_a_projected_token_for_the_gate_only() {
        let mut pod = bare_pod();
        let spec = pod.spec.as_mut().unwrap();
        spec.automount_service_account_token = Some(false);
        spec.volumes = Some(vec![Volume {
            name: "data".into(),
            ..Default::default()
        }]);
        let out = injected(&pod, &config());
        let spec = out.spec.unwrap();
        let vols: Vec<_> = spec.volumes.unwrap().into_iter().map(|v| v.name).collect();
        assert_eq!(vols, ["data", RUN_VOLUME, TOKEN_VOLUME]);
        let gate = &spec.init_containers.unwrap()[0];
        assert!(
            gate.volume_mounts
                .as_ref()
                .unwrap()
                .iter()
                .any(|m| m.name == TOKEN_VOLUME && m.mount_path == TOKEN_MOUNT_PATH)
        );
        assert!(
            spec.containers[0].volume_mounts.is_none(),
            "the app container must not get the token"
        );
        assert_eq!(
            spec.automount_service_account_token,
            Some(false),
            "the pod's choice stands"
        );
    }

    #[test]
    fn a_pod_that_declares_the_scratch_volume_as_an_empty_dir_is_injected_with_it() {
        // An app reads the epoch and lease files (the application's
        // contract), so it mounts the scratch volume, and a Deployment must
        // declare what its containers mount. Before, such a pod was a
        // name conflict: skipped, so it ran ungated on a standby (and the
        // Deployment without the declaration is refused by the API server).
        let mounted = |mut pod: Pod, empty: bool| {
            let spec = pod.spec.as_mut().unwrap();
            spec.containers[0].volume_mounts = Some(vec![VolumeMount {
                name: RUN_VOLUME.into(),
                mount_path: RUN_MOUNT_PATH.into(),
                read_only: Some(true),
                ..Default::default()
            }]);
            spec.volumes = Some(vec![Volume {
                name: RUN_VOLUME.into(),
                empty_dir: empty.then(EmptyDirVolumeSource::default),
                ..Default::default()
            }]);
            pod
        };
        for automount in [None, Some(false)] {
            let mut pod = mounted(bare_pod(), true);
            pod.spec.as_mut().unwrap().automount_service_account_token = automount;
            let out = injected(&pod, &config());
            let spec = out.spec.unwrap();
            let vols: Vec<_> = spec
                .volumes
                .iter()
                .flatten()
                .map(|v| v.name.as_str())
                .collect();
            let want: &[&str] = if automount == Some(false) {
                &[RUN_VOLUME, TOKEN_VOLUME]
            } else {
                &[RUN_VOLUME]
            };
            assert_eq!(vols, want, "the pod's own scratch volume, not a second one");
            // The gate and the sidecar write into it, the app reads it.
            for c in spec.init_containers.iter().flatten() {
                assert!(
                    c.volume_mounts
                        .iter()
                        .flatten()
                        .any(|m| m.name == RUN_VOLUME && m.mount_path == RUN_MOUNT_PATH),
                    "{}",
                    c.name
                );
            }
            // The injector's bytes agree.
            let json = serde_json::to_string(&pod).unwrap();
            let view: PodView<'_> = serde_json::from_str(&json).unwrap();
            let Choice::Inject(plan) = Injector::new(config()).decide(&view, &enabled(), NS) else {
                panic!("the injector must inject");
            };
            let Decision::Inject(p) = inject(&pod, &enabled(), NS, &config()) else {
                panic!("inject must inject");
            };
            assert_eq!(
                Injector::new(config()).json(&plan),
                serde_json::to_vec(&p).unwrap()
            );
        }
        // Any other kind of volume under that name stays a conflict: the gate
        // writes there, and it must be the pod's own scratch space.
        let p = mounted(bare_pod(), false);
        assert_eq!(
            inject(&p, &enabled(), NS, &config()),
            Decision::Skip(Skip::NameConflict)
        );
        // `emptyDir: null` is no emptyDir.
        let json =
            serde_json::json!({"spec": {"volumes": [{"name": RUN_VOLUME, "emptyDir": null}]}})
                .to_string();
        let view: PodView<'_> = serde_json::from_str(&json).unwrap();
        assert!(!view.spec.unwrap().volumes.unwrap()[0].empty_dir);
    }

    #[test]
    fn named_skip_reasons() {
        let cfg = config();
        let pod = bare_pod();
        let plain = BTreeMap::new();
        for ns in SYSTEM_NAMESPACES {
            assert_eq!(
                inject(&pod, &enabled(), ns, &cfg),
                Decision::Skip(Skip::SystemNamespace)
            );
        }
        assert_eq!(
            inject(&pod, &enabled(), SYSTEM_NAMESPACE, &cfg),
            Decision::Skip(Skip::ControllerNamespace)
        );
        assert_eq!(
            inject(&pod, &plain, NS, &cfg),
            Decision::Skip(Skip::NamespaceNotEnabled)
        );
        let wrong_value = BTreeMap::from([(INJECT_LABEL.to_owned(), "true".to_owned())]);
        assert_eq!(
            inject(&pod, &wrong_value, NS, &cfg),
            Decision::Skip(Skip::NamespaceNotEnabled)
        );
        let out = with_annotations(bare_pod(), &[(INJECT_ANNOTATION, INJECT_DISABLED)]);
        assert_eq!(
            inject(&out, &enabled(), NS, &cfg),
            Decision::Skip(Skip::OptedOut)
        );
        for role in SYNC_ROLES {
            let p = with_labels(bare_pod(), &[(ROLE_LABEL, role)]);
            assert_eq!(
                inject(&p, &enabled(), NS, &cfg),
                Decision::Skip(Skip::SyncRole)
            );
        }
        let p = with_labels(bare_pod(), &[(ROLE_LABEL, "servce")]);
        assert_eq!(
            inject(&p, &enabled(), NS, &cfg),
            Decision::Skip(Skip::UnknownRole)
        );
        let p = with_labels(bare_pod(), &[(ROLE_LABEL, SERVICE_ROLE)]);
        assert!(matches!(
            inject(&p, &enabled(), NS, &cfg),
            Decision::Inject(_)
        ));
        let p = with_annotations(bare_pod(), &[(MIRROR_ANNOTATION, "x")]);
        assert_eq!(
            inject(&p, &enabled(), NS, &cfg),
            Decision::Skip(Skip::MirrorPod)
        );
        let mut p = bare_pod();
        p.spec.as_mut().unwrap().volumes = Some(vec![Volume {
            name: RUN_VOLUME.into(),
            ..Default::default()
        }]);
        assert_eq!(
            inject(&p, &enabled(), NS, &cfg),
            Decision::Skip(Skip::NameConflict)
        );
        // A pod that kept the gate container but lost the marker is not injected twice.
        let mut p = bare_pod();
        p.spec.as_mut().unwrap().init_containers = Some(vec![container(GATE_CONTAINER)]);
        assert_eq!(
            inject(&p, &enabled(), NS, &cfg),
            Decision::Skip(Skip::AlreadyInjected)
        );
    }

    #[test]
    fn host_network_is_injected_unless_configured_otherwise() {
        let mut p = bare_pod();
        p.spec.as_mut().unwrap().host_network = Some(true);
        assert!(matches!(
            inject(&p, &enabled(), NS, &config()),
            Decision::Inject(_)
        ));
        let skip = InjectorConfig {
            skip_host_network: true,
            ..config()
        };
        assert_eq!(
            inject(&p, &enabled(), NS, &skip),
            Decision::Skip(Skip::HostNetwork)
        );
    }

    #[test]
    fn every_injector_fragment_is_a_list_of_add_operations() {
        let injector = Injector::new(config());
        for (step, fragment) in Step::ALL.iter().zip(&injector.fragments) {
            assert_eq!(Step::ALL[step.index()], *step, "index of {step:?}");
            let ops: Patch = serde_json::from_str(&format!("[{fragment}]"))
                .unwrap_or_else(|e| panic!("{step:?}: {e}: {fragment}"));
            assert!(!ops.0.is_empty(), "{step:?}");
            assert!(
                ops.0.iter().all(|op| matches!(op, PatchOperation::Add(_))),
                "{step:?}"
            );
        }
    }

    #[test]
    fn an_empty_plan_is_an_empty_patch_in_both_forms() {
        let injector = Injector::new(config());
        let empty = PatchPlan([None; 4]);
        assert_eq!(injector.json(&empty), b"[]");
        let mut out = Vec::new();
        injector.write_base64(&empty, &mut out);
        assert_eq!(out, b"W10=");
        assert_eq!(injector.base64_len(&empty), 4);
    }

    #[test]
    fn every_padded_part_is_whole_base64_blocks() {
        // Concatenating encodings is only the encoding of the concatenation
        // if no part but the last ends in `=` padding.
        let injector = Injector::new(config());
        for encoded in injector.first_base64.iter().chain(&injector.next_base64) {
            assert!(!encoded.contains('='), "{encoded}");
        }
    }

    #[test]
    fn skip_names_are_stable_and_distinct() {
        let names: std::collections::BTreeSet<_> = Skip::ALL.iter().map(|s| s.as_str()).collect();
        assert_eq!(names.len(), Skip::ALL.len());
        for required in [
            "namespace-not-enabled",
            "opted-out",
            "sync-role",
            "already-injected",
            "system-namespace",
        ] {
            assert!(names.contains(required), "{required}");
        }
    }

    fn arb_name() -> impl Strategy<Value = String> {
        "[a-z][a-z0-9-]{0,8}"
    }

    fn arb_map() -> impl Strategy<Value = Option<BTreeMap<String, String>>> {
        // Keys include `/` and `~`, the two characters JSON pointers escape.
        proptest::option::of(proptest::collection::btree_map(
            "[a-z~/.]{1,12}",
            "[a-z0-9]{0,6}",
            0..4,
        ))
    }

    prop_compose! {
        fn arb_pod()(
            labels in arb_map(),
            annotations in arb_map(),
            role in proptest::option::of(prop_oneof![Just("service".to_owned()), Just("database".to_owned()), arb_name()]),
            inits in proptest::option::of(proptest::collection::vec(arb_name(), 0..4)),
            gates in proptest::option::of(proptest::collection::vec(prop_oneof![Just(SERVING_CONDITION.to_owned()), arb_name()], 0..3)),
            volumes in proptest::option::of(proptest::collection::vec(
                (prop_oneof![3 => arb_name(), 1 => Just(RUN_VOLUME.to_owned())], any::<bool>()),
                0..3,
            )),
            automount in proptest::option::of(any::<bool>()),
            host_network in proptest::option::of(any::<bool>()),
        ) -> Pod {
            let mut labels = labels;
            if let Some(role) = role {
                labels.get_or_insert_with(BTreeMap::new).insert(ROLE_LABEL.into(), role);
            }
            Pod {
                metadata: ObjectMeta { labels, annotations, ..Default::default() },
                spec: Some(PodSpec {
                    containers: vec![container("app")],
                    init_containers: inits.map(|v| v.iter().map(|n| container(n)).collect()),
                    readiness_gates: gates.map(|v| v.into_iter().map(|condition_type| PodReadinessGate { condition_type }).collect()),
                    volumes: volumes.map(|v| v.into_iter().map(|(name, empty)| Volume {
                        name,
                        empty_dir: empty.then(EmptyDirVolumeSource::default),
                        ..Default::default()
                    }).collect()),
                    automount_service_account_token: automount,
                    host_network,
                    ..Default::default()
                }),
                status: None,
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// The patch applies to the very pod it was made for, puts the gate
        /// first, adds exactly one readiness gate and the marker, keeps every
        /// original init container in order, and injecting the result again
        /// is a no-op (`already-injected`).
        #[test]
        fn patch_applies_gate_first_and_is_idempotent(pod in arb_pod()) {
            let cfg = config();
            match inject(&pod, &enabled(), NS, &cfg) {
                Decision::Skip(reason) => {
                    // Only pod-level reasons are possible with an enabled namespace.
                    prop_assert!(matches!(reason,
                        Skip::OptedOut | Skip::SyncRole | Skip::UnknownRole
                        | Skip::AlreadyInjected | Skip::NameConflict | Skip::MirrorPod),
                        "unexpected {reason}");
                }
                Decision::Inject(p) => {
                    let out = apply(&pod, &p).map_err(TestCaseError::fail)?;
                    let spec = out.spec.as_ref().unwrap();
                    let ics = spec.init_containers.as_ref().unwrap();
                    prop_assert_eq!(&ics[0].name, GATE_CONTAINER);
                    prop_assert_eq!(&ics[1].name, LEASE_CONTAINER);
                    let before: Vec<_> = pod.spec.as_ref().unwrap().init_containers.iter().flatten().map(|c| c.name.clone()).collect();
                    let after: Vec<_> = ics[2..].iter().map(|c| c.name.clone()).collect();
                    prop_assert_eq!(before, after);
                    let serving = spec.readiness_gates.as_ref().unwrap().iter().filter(|g| g.condition_type == SERVING_CONDITION).count();
                    // Exactly one is added, unless the pod already asked for it.
                    let had = pod.spec.as_ref().unwrap().readiness_gates.iter().flatten().filter(|g| g.condition_type == SERVING_CONDITION).count();
                    prop_assert_eq!(serving, had.max(1));
                    prop_assert_eq!(out.metadata.annotations.as_ref().unwrap().get(STATUS_ANNOTATION).map(String::as_str), Some(STATUS_INJECTED));
                    // Everything the pod had is still there.
                    for (k, v) in pod.metadata.annotations.iter().flatten() {
                        prop_assert_eq!(out.metadata.annotations.as_ref().unwrap().get(k), Some(v));
                    }
                    prop_assert_eq!(&out.metadata.labels, &pod.metadata.labels);
                    prop_assert_eq!(&spec.containers, &pod.spec.as_ref().unwrap().containers);
                    let token = spec.volumes.iter().flatten().any(|v| v.name == TOKEN_VOLUME);
                    prop_assert_eq!(token, spec.automount_service_account_token == Some(false));
                    // One scratch volume more than the pod had, unless it
                    // brought its own (an emptyDir, else it was skipped).
                    let scratch = |p: &Pod| p.spec.iter().flat_map(|s| s.volumes.iter().flatten()).filter(|v| v.name == RUN_VOLUME).count();
                    prop_assert_eq!(scratch(&out), scratch(&pod).max(1));
                    prop_assert_eq!(inject(&out, &enabled(), NS, &cfg), Decision::Skip(Skip::AlreadyInjected));
                }
            }
        }

        /// With the gate configured last, it is the last init container.
        #[test]
        fn gate_last_when_configured(pod in arb_pod()) {
            let cfg = InjectorConfig { position: GatePosition::Last, ..config() };
            if let Decision::Inject(p) = inject(&pod, &enabled(), NS, &cfg) {
                let out = apply(&pod, &p).map_err(TestCaseError::fail)?;
                let ics = out.spec.unwrap().init_containers.unwrap();
                prop_assert_eq!(&ics[ics.len() - 2].name, GATE_CONTAINER);
                prop_assert_eq!(&ics[ics.len() - 1].name, LEASE_CONTAINER);
            }
        }

        /// The pod view deserialized from a pod's JSON reads what [`inject`]
        /// reads, and the pre-serialized injector answers it exactly as
        /// [`inject`] answers the pod, byte for byte, whatever the configuration.
        #[test]
        fn injector_bytes_are_injects_patch(
            pod in arb_pod(),
            last in any::<bool>(),
            skip_host_network in any::<bool>(),
            ns in prop_oneof![Just(NS), Just("kube-system"), Just(SYSTEM_NAMESPACE)],
            ns_enabled in any::<bool>(),
        ) {
            let cfg = InjectorConfig {
                position: if last { GatePosition::Last } else { GatePosition::First },
                skip_host_network,
                ..config()
            };
            let labels = if ns_enabled { enabled() } else { BTreeMap::new() };
            let injector = Injector::new(cfg.clone());
            // The view as the webhook gets it: deserialized from the pod's JSON.
            let json = serde_json::to_string(&pod).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let view: PodView<'_> = serde_json::from_str(&json).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(&view, &PodView::from(&pod));
            match (inject(&pod, &labels, ns, &cfg), injector.decide(&view, &labels, ns)) {
                (Decision::Inject(p), Choice::Inject(plan)) => {
                    let expected = serde_json::to_vec(&p).map_err(|e| TestCaseError::fail(e.to_string()))?;
                    let bytes = injector.json(&plan);
                    prop_assert_eq!(String::from_utf8_lossy(&bytes), String::from_utf8_lossy(&expected));
                    // The base64 form decodes to the same patch, with only
                    // whitespace added, and its announced length is exact.
                    let mut encoded = b"prefix".to_vec();
                    injector.write_base64(&plan, &mut encoded);
                    prop_assert_eq!(encoded.len() - 6, injector.base64_len(&plan));
                    let decoded = base64::Engine::decode(&base64::engine::general_purpose::STANDARD, &encoded[6..])
                        .map_err(|e| TestCaseError::fail(e.to_string()))?;
                    let reparsed: Patch = serde_json::from_slice(&decoded).map_err(|e| TestCaseError::fail(e.to_string()))?;
                    prop_assert_eq!(&reparsed, &p);
                    let squeezed: Vec<u8> = decoded.iter().copied().filter(|b| *b != b' ').collect();
                    let expected_squeezed: Vec<u8> = expected.iter().copied().filter(|b| *b != b' ').collect();
                    prop_assert_eq!(squeezed, expected_squeezed);
                }
                (Decision::Skip(a), Choice::Skip(b)) => prop_assert_eq!(a, b),
                (a, b) => prop_assert!(false, "inject said {a:?}, the injector {b:?}"),
            }
        }

        /// Namespace rules win over anything the pod says.
        #[test]
        fn never_in_system_namespaces(pod in arb_pod(), idx in 0usize..4) {
            let ns = [SYSTEM_NAMESPACES[0], SYSTEM_NAMESPACES[1], SYSTEM_NAMESPACES[2], SYSTEM_NAMESPACE][idx];
            prop_assert!(matches!(inject(&pod, &enabled(), ns, &config()), Decision::Skip(Skip::SystemNamespace | Skip::ControllerNamespace)));
        }
    }
}
