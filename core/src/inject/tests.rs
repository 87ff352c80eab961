//! The injection rules and the wire encoding, property-tested against
//! arbitrary pods.

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
    let json = serde_json::json!({"spec": {"volumes": [{"name": RUN_VOLUME, "emptyDir": null}]}})
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
