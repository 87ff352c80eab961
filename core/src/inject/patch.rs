//! The patch, as a short plan of steps chosen by the few facts about a pod
//! that shape it; each step's operations depend only on the step and the
//! [`InjectorConfig`].

use super::*;

/// One part of the patch, chosen by the few facts about the pod that shape
/// it. The patch is a short list of these; every step's operations depend on
/// nothing but the step and the [`InjectorConfig`], which is what lets an
/// [`Injector`] serialize each of them once and answer every pod by
/// concatenation. [`patch`] and [`Injector::decide`] share [`plan`] and
/// [`Step::ops`], so they cannot drift apart (a property test checks they
/// produce the same bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Step {
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
    pub(super) const COUNT: usize = 15;
    pub(super) const ALL: [Step; Step::COUNT] = [
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
    pub(super) fn index(self) -> usize {
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
    pub(super) fn ops(self, config: &InjectorConfig) -> Vec<PatchOperation> {
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
pub(super) fn plan(pod: &PodView<'_>, config: &InjectorConfig) -> [Option<Step>; 4] {
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

pub(super) fn patch(pod: &PodView<'_>, config: &InjectorConfig) -> Patch {
    Patch(
        plan(pod, config)
            .into_iter()
            .flatten()
            .flat_map(|step| step.ops(config))
            .collect(),
    )
}

/// The gate's volumes: scratch for the epoch file, and the token if the pod has none.
pub(super) fn gate_volumes(config: &InjectorConfig, own_token: bool) -> Vec<Value> {
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
