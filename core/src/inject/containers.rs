//! The containers and the volume the patch adds: the init-gate, the lease
//! sidecar, and the projected service-account token for pods that do not
//! mount their own.

use super::*;

pub(super) fn to_value<T: serde::Serialize>(v: &T) -> Value {
    // Serializing k8s-openapi structs into a Value cannot fail: they are plain
    // data with string keys. Null is a harmless fallback that the API server
    // would reject loudly, never a silent wrong patch.
    serde_json::to_value(v).unwrap_or(Value::Null)
}

pub(super) fn gate_container(config: &InjectorConfig, own_token: bool) -> Container {
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
pub(super) fn lease_container(config: &InjectorConfig, own_token: bool) -> Container {
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
pub(super) fn token_volume(config: &InjectorConfig) -> Volume {
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
