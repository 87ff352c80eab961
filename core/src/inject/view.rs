//! What the injector reads of a pod, and nothing else: a borrowed view the
//! webhook deserializes straight from the AdmissionReview, and that
//! [`super::inject`] takes from a whole [`Pod`].

use super::*;

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
pub(super) fn is_present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
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
