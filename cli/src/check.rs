//! `cwctl check`: named checks of an installation, each with a fix hint.
//!
//! Like `linkerd check`: one line per check, ✓ or ✗, and under every ✗ what
//! to do about it. Per cluster: the state ConfigMap is present and
//! readable, the policy is present and valid with weights summing to 1, the
//! webhook configurations exist with a caBundle of PEM certificates that do
//! not expire within 30 days, the webhook runs (ready endpoints behind its
//! Service, or a listener at its URL), the current user holds what `cwctl`
//! needs, the gate Role exists, and the API server's
//! clock agrees with this machine's. Across clusters: every state record is
//! readable and exactly one cluster is active.
//!
//! About clocks, honestly: leases run on each controller's monotonic clock,
//! so wall-clock skew cannot break the one-active guarantee. Skew garbles
//! what people read: Event times and `lastTransition.at` across clusters, the
//! order `cwctl explain` shows, and request ages. The check reads the
//! `Date` header of each API server (one-second resolution), bounds the
//! offset using the request's round trip, and fails only when the offset is
//! certainly beyond `--max-clock-skew`.

use std::time::{Duration, SystemTime};

use counterweight_core::ha::Persisted;
use counterweight_core::names;
use counterweight_core::policy::{Policy, WEIGHT_SUM_TOLERANCE};
use counterweight_core::state::Role;
use futures::future::join_all;
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration, WebhookClientConfig,
};
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec,
};
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::rbac::v1::Role as RbacRole;
use kube::api::{Api, ListParams, PostParams};
use serde::{Deserialize, Serialize};

use crate::clusters::Target;

/// Name of the MutatingWebhookConfiguration that injects the init-gate.
pub const INJECT_WEBHOOK: &str = "counterweight-inject";
/// Name of the ValidatingWebhookConfiguration that validates the policy.
pub const POLICY_WEBHOOK: &str = "counterweight-policy";
/// Name of the Role the init-gates use (the controller's `GATE_ROLE`).
pub const GATE_ROLE: &str = "counterweight-gate";
/// Certificates expiring sooner than this fail the caBundle check.
pub const CERT_MIN_VALIDITY: Duration = Duration::from_secs(30 * 24 * 3600);

/// Outcome of one named check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CheckResult {
    /// The cluster checked; `None` for checks across clusters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<String>,
    /// Name of the check.
    pub name: String,
    /// Passed.
    pub ok: bool,
    /// What was found.
    pub detail: String,
    /// What to do, for a failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
}

/// All results, in the order run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// One per check.
    pub checks: Vec<CheckResult>,
}

impl Report {
    /// Every check passed.
    pub fn passed(&self) -> bool {
        self.checks.iter().all(|c| c.ok)
    }
}

fn pass(cluster: Option<&str>, name: &str, detail: String) -> CheckResult {
    CheckResult {
        cluster: cluster.map(str::to_owned),
        name: name.to_owned(),
        ok: true,
        detail,
        hint: None,
    }
}

fn fail(cluster: Option<&str>, name: &str, detail: String, hint: &str) -> CheckResult {
    CheckResult {
        cluster: cluster.map(str::to_owned),
        name: name.to_owned(),
        ok: false,
        detail,
        hint: Some(hint.to_owned()),
    }
}

/// Runs every check on every cluster.
pub async fn run(targets: &[Target], namespace: &str, max_skew: Duration) -> Report {
    let per_cluster = join_all(
        targets
            .iter()
            .map(|t| cluster_checks(t, namespace, max_skew)),
    )
    .await;
    let mut checks = Vec::new();
    let mut records = Vec::new();
    for (results, record) in per_cluster {
        checks.extend(results);
        records.push(record);
    }
    checks.push(peers(targets, &records));
    Report { checks }
}

/// What the state check learned, for the check across clusters.
type Record = Result<Persisted, String>;

async fn cluster_checks(
    t: &Target,
    namespace: &str,
    max_skew: Duration,
) -> (Vec<CheckResult>, Record) {
    let c = Some(t.name.as_str());
    let client = match &t.client {
        Ok(client) => client.clone(),
        Err(e) => {
            return (
                vec![fail(
                    c,
                    "API server reachable",
                    e.clone(),
                    "fix this context in the kubeconfig (server URL, credentials)",
                )],
                Err(e.clone()),
            );
        }
    };
    let mut out = Vec::new();
    let clock = clock(&client, max_skew).await;
    let reachable = !matches!(&clock, Err(ClockError::Unreachable(_)));
    out.push(match clock {
        Ok(detail) => pass(c, "clock", detail),
        Err(ClockError::Skewed(detail)) => fail(
            c,
            "clock",
            detail,
            "run NTP (chrony, systemd-timesyncd) on the control-plane nodes and on this machine; \
             leases are safe regardless, but Event times across clusters mislead",
        ),
        Err(ClockError::Unreachable(why)) => fail(
            c,
            "API server reachable",
            why,
            "check the kubeconfig context's server URL and that the API server runs",
        ),
    });
    if !reachable {
        return (out, Err("unreachable".to_owned()));
    }
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let (state, record) = state_check(c, namespace, cms.get_opt(names::STATE_CONFIGMAP).await);
    out.push(state);
    out.push(policy_check(
        c,
        namespace,
        cms.get_opt(names::POLICY_CONFIGMAP).await,
    ));
    let now = SystemTime::now();
    let mutating: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let hooks = mutating.get_opt(INJECT_WEBHOOK).await.map(|o| {
        o.map(|w| {
            w.webhooks
                .unwrap_or_default()
                .into_iter()
                .map(|h| (h.name, h.client_config))
                .collect::<Vec<_>>()
        })
    });
    out.extend(webhook_checks(c, &client, INJECT_WEBHOOK, hooks, now).await);
    let validating: Api<ValidatingWebhookConfiguration> = Api::all(client.clone());
    let hooks = validating.get_opt(POLICY_WEBHOOK).await.map(|o| {
        o.map(|w| {
            w.webhooks
                .unwrap_or_default()
                .into_iter()
                .map(|h| (h.name, h.client_config))
                .collect::<Vec<_>>()
        })
    });
    out.extend(webhook_checks(c, &client, POLICY_WEBHOOK, hooks, now).await);
    out.push(operator_rbac(c, &client, namespace).await);
    let roles: Api<RbacRole> = Api::namespaced(client, namespace);
    out.push(match roles.get_opt(GATE_ROLE).await {
        Ok(Some(r)) => {
            let grants = r.rules.unwrap_or_default().iter().any(|rule| {
                rule.resources
                    .as_ref()
                    .is_some_and(|rs| rs.iter().any(|r| r == "configmaps"))
                    && rule.verbs.iter().any(|v| v == "get")
                    && rule.resource_names.as_ref().is_none_or(|n| {
                        n.iter().any(|n| n == names::STATE_CONFIGMAP)
                    })
            });
            if grants {
                pass(c, "gate Role", format!("{namespace}/{GATE_ROLE} grants get on the state ConfigMap"))
            } else {
                fail(
                    c,
                    "gate Role",
                    format!("{namespace}/{GATE_ROLE} does not grant get on {}", names::STATE_CONFIGMAP),
                    "re-apply manifests/base/gate/gate-role.yaml; the controller also re-applies it on start",
                )
            }
        }
        Ok(None) => fail(
            c,
            "gate Role",
            format!("no Role {namespace}/{GATE_ROLE}: init-gates cannot read the state and stay blocked"),
            "kubectl apply -k manifests/overlays/<cluster> (it includes gate/gate-role.yaml), or start the controller, which applies it",
        ),
        Err(e) => fail(c, "gate Role", e.to_string(), "cwctl needs get on roles in the controller namespace"),
    });
    (out, record)
}

/// What `cwctl` itself needs, asked of the API server for the current
/// user (SelfSubjectAccessReview), so that a missing grant shows here rather
/// than in the middle of a switchover.
async fn operator_rbac(c: Option<&str>, client: &kube::Client, namespace: &str) -> CheckResult {
    const NAME: &str = "operator RBAC";
    let needs: [(&str, &str, &str, Option<&str>, &str); 4] = [
        (
            "",
            "configmaps",
            "get",
            Some(names::STATE_CONFIGMAP),
            "read the state",
        ),
        ("", "configmaps", "create", None, "file a command request"),
        (
            "",
            "configmaps",
            "update",
            Some(counterweight_core::request::COMMAND_CONFIGMAP),
            "replace a command request",
        ),
        ("events.k8s.io", "events", "list", None, "read Events"),
    ];
    let api: Api<SelfSubjectAccessReview> = Api::all(client.clone());
    let mut missing = Vec::new();
    for (group, resource, verb, name, what) in needs {
        let review = SelfSubjectAccessReview {
            spec: SelfSubjectAccessReviewSpec {
                resource_attributes: Some(ResourceAttributes {
                    group: Some(group.to_owned()),
                    resource: Some(resource.to_owned()),
                    verb: Some(verb.to_owned()),
                    namespace: Some(namespace.to_owned()),
                    name: name.map(str::to_owned),
                    ..Default::default()
                }),
                ..Default::default()
            },
            ..Default::default()
        };
        match api.create(&PostParams::default(), &review).await {
            Ok(r) if r.status.as_ref().is_some_and(|s| s.allowed) => {}
            Ok(_) => missing.push(format!(
                "{verb} {resource}{} ({what})",
                name.map(|n| format!("/{n}")).unwrap_or_default()
            )),
            Err(e) => {
                return fail(
                    c,
                    NAME,
                    format!("cannot ask the API server: {}", crate::describe(&e)),
                    "SelfSubjectAccessReview is open to every authenticated user by default",
                );
            }
        }
    }
    if missing.is_empty() {
        pass(
            c,
            NAME,
            "you may read the state, file command requests and read Events".to_owned(),
        )
    } else {
        fail(
            c,
            NAME,
            format!("you may not {}", missing.join(", ")),
            "bind the Role counterweight-operator of manifests/base/cwctl-rbac.yaml to yourself \
             in counterweight-system",
        )
    }
}

/// The caBundle and the reachability checks of one webhook configuration.
async fn webhook_checks(
    c: Option<&str>,
    client: &kube::Client,
    config: &str,
    got: Result<Option<Vec<(String, WebhookClientConfig)>>, kube::Error>,
    now: SystemTime,
) -> Vec<CheckResult> {
    let name = format!("webhook {config}");
    let hooks = match got {
        Ok(Some(hooks)) => hooks,
        other => return vec![missing(c, &name, other.map(|o| o.is_some()))],
    };
    let bundles = hooks
        .iter()
        .map(|(h, cc)| (h.clone(), cc.ca_bundle.as_ref().map(|b| b.0.clone())))
        .collect();
    let mut out = vec![bundles_check(c, &name, bundles, now)];
    let reach_name = format!("webhook {config} reachable");
    let mut details = Vec::new();
    for (hook, cc) in &hooks {
        match reachable(client, cc).await {
            Ok(d) => details.push(format!("{hook}: {d}")),
            Err(why) => {
                out.push(fail(
                    c,
                    &reach_name,
                    format!("{hook}: {why}"),
                    "start the webhook (kubectl -n counterweight-system get deploy,pods \
                     -l app.kubernetes.io/name=counterweight-webhook); while it is down, pod \
                     creation in opted-in namespaces fails (failurePolicy: Fail)",
                ));
                return out;
            }
        }
    }
    out.push(pass(c, &reach_name, details.join("; ")));
    out
}

/// Whether the API server has something to call: ready endpoints behind a
/// `service` reference, or, for a `url` (local development), a listener
/// this machine can connect to. It does not prove the API server's own
/// network path, only that the webhook runs.
async fn reachable(client: &kube::Client, cc: &WebhookClientConfig) -> Result<String, String> {
    if let Some(svc) = &cc.service {
        let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), &svc.namespace);
        let list = slices
            .list(
                &ListParams::default().labels(&format!("kubernetes.io/service-name={}", svc.name)),
            )
            .await
            .map_err(|e| {
                format!(
                    "cannot list the EndpointSlices of service {}/{}: {e}",
                    svc.namespace, svc.name
                )
            })?;
        let ready = list
            .items
            .iter()
            .flat_map(|s| s.endpoints.iter().flatten())
            .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) != Some(false))
            .count();
        return if ready == 0 {
            Err(format!(
                "service {}/{} has no ready endpoints",
                svc.namespace, svc.name
            ))
        } else {
            Ok(format!(
                "service {}/{}: {ready} ready endpoints",
                svc.namespace, svc.name
            ))
        };
    }
    let Some(url) = &cc.url else {
        return Err("clientConfig has neither service nor url".to_owned());
    };
    let uri: http::Uri = url.parse().map_err(|e| format!("url {url:?}: {e}"))?;
    let host = uri
        .host()
        .ok_or_else(|| format!("url {url:?} has no host"))?;
    let port = uri.port_u16().unwrap_or(443);
    match tokio::time::timeout(
        Duration::from_secs(3),
        tokio::net::TcpStream::connect((host.trim_matches(['[', ']']), port)),
    )
    .await
    {
        Ok(Ok(_)) => Ok(format!("{url} accepts connections")),
        Ok(Err(e)) => Err(format!("{url}: {e}")),
        Err(_) => Err(format!("{url}: no connection within 3s")),
    }
}

fn missing(c: Option<&str>, name: &str, got: Result<bool, kube::Error>) -> CheckResult {
    match got {
        Ok(_) => fail(
            c,
            name,
            "not found".to_owned(),
            "kubectl apply -k manifests/overlays/<cluster> (it includes the webhook); without it new service pods are not gated",
        ),
        Err(e) => fail(
            c,
            name,
            e.to_string(),
            "cwctl needs get on mutating- and validatingwebhookconfigurations",
        ),
    }
}

/// The state ConfigMap is present and its record parses.
pub fn state_check(
    c: Option<&str>,
    namespace: &str,
    got: Result<Option<ConfigMap>, kube::Error>,
) -> (CheckResult, Record) {
    const NAME: &str = "state ConfigMap";
    match got {
        Ok(Some(cm)) => match Persisted::from_data(cm.data.as_ref()) {
            Ok(p) => (
                pass(
                    c,
                    NAME,
                    format!(
                        "{} in epoch {}{}",
                        p.role,
                        p.epoch,
                        if p.paused { ", paused" } else { "" }
                    ),
                ),
                Ok(p),
            ),
            Err(e) => (
                fail(
                    c,
                    NAME,
                    e.to_string(),
                    "the controller resets an unreadable record to standby on restart; \
                     never edit it by hand",
                ),
                Err(e.to_string()),
            ),
        },
        Ok(None) => (
            fail(
                c,
                NAME,
                format!("no ConfigMap {namespace}/{}", names::STATE_CONFIGMAP),
                "start the controller in this cluster: it creates the record as standby",
            ),
            Err("missing".to_owned()),
        ),
        Err(e) => (
            fail(
                c,
                NAME,
                e.to_string(),
                "cwctl needs get on configmaps in the controller namespace",
            ),
            Err(e.to_string()),
        ),
    }
}

/// The policy ConfigMap is present, valid, and its weights sum to 1.
pub fn policy_check(
    c: Option<&str>,
    namespace: &str,
    got: Result<Option<ConfigMap>, kube::Error>,
) -> CheckResult {
    const NAME: &str = "policy";
    let cm = match got {
        Ok(Some(cm)) => cm,
        Ok(None) => {
            return fail(
                c,
                NAME,
                format!("no ConfigMap {namespace}/{}", names::POLICY_CONFIGMAP),
                "create it with the policy YAML under key policy.yaml (see manifests/ for a sample)",
            );
        }
        Err(e) => {
            return fail(
                c,
                NAME,
                e.to_string(),
                "cwctl needs get on configmaps in the controller namespace",
            );
        }
    };
    match Policy::from_configmap_data(cm.data.as_ref()) {
        Err(e) => fail(
            c,
            NAME,
            e.to_string(),
            "fix the named fields; the controller keeps the last good policy meanwhile",
        ),
        Ok(p) if (p.weight_sum() - 1.0).abs() > WEIGHT_SUM_TOLERANCE => fail(
            c,
            NAME,
            format!("weights sum to {}, not 1", p.weight_sum()),
            "adjust the component weights so that they sum to 1",
        ),
        Ok(p) => pass(
            c,
            NAME,
            format!(
                "{} components, weights sum to 1, D={}, K={}",
                p.components.len(),
                p.threshold,
                p.retries
            ),
        ),
    }
}

/// Every webhook of a configuration has a caBundle of PEM certificates
/// valid for at least [`CERT_MIN_VALIDITY`] more.
pub fn bundles_check(
    c: Option<&str>,
    name: &str,
    bundles: Vec<(String, Option<Vec<u8>>)>,
    now: SystemTime,
) -> CheckResult {
    if bundles.is_empty() {
        return fail(
            c,
            name,
            "the configuration has no webhooks".to_owned(),
            "re-apply manifests/base/webhook",
        );
    }
    let mut details = Vec::new();
    for (hook, bundle) in bundles {
        match ca_bundle(bundle.as_deref().unwrap_or_default(), now) {
            Ok(d) => details.push(format!("{hook}: {d}")),
            Err(why) => {
                return fail(
                    c,
                    name,
                    format!("{hook}: caBundle {why}"),
                    "set clientConfig.caBundle to the PEM of the CA that signed the webhook's \
                     serving certificate (`cw-certs` writes it; with cert-manager, annotate \
                     cert-manager.io/inject-ca-from), and renew certificates before they expire",
                );
            }
        }
    }
    pass(c, name, details.join("; "))
}

/// Checks one caBundle: at least one PEM certificate, all parseable, none
/// expired or expiring within [`CERT_MIN_VALIDITY`] of `now`. Returns a
/// summary, or why the bundle is bad.
pub fn ca_bundle(pem: &[u8], now: SystemTime) -> Result<String, String> {
    if pem.iter().all(u8::is_ascii_whitespace) {
        return Err("is empty".to_owned());
    }
    let now_s = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    let min = i64::try_from(CERT_MIN_VALIDITY.as_secs()).unwrap_or(i64::MAX);
    let mut soonest: Option<(i64, String)> = None;
    let mut n = 0;
    for block in x509_parser::pem::Pem::iter_from_buffer(pem) {
        let block = block.map_err(|e| format!("is not valid PEM: {e}"))?;
        if block.label != "CERTIFICATE" {
            continue;
        }
        let cert = block
            .parse_x509()
            .map_err(|e| format!("holds a certificate that does not parse: {e}"))?;
        n += 1;
        let subject = cert.subject().to_string();
        let not_after = cert.validity().not_after.timestamp();
        if not_after <= now_s {
            return Err(format!(
                "certificate {subject:?} expired at {}",
                cert.validity().not_after
            ));
        }
        if not_after - now_s < min {
            return Err(format!(
                "certificate {subject:?} expires at {}, within {} days",
                cert.validity().not_after,
                CERT_MIN_VALIDITY.as_secs() / 86400
            ));
        }
        if soonest.as_ref().is_none_or(|(t, _)| not_after < *t) {
            soonest = Some((not_after, cert.validity().not_after.to_string()));
        }
    }
    match soonest {
        None => Err("holds no PEM certificate".to_owned()),
        Some((t, text)) => Ok(format!(
            "{n} certificate{}, valid {} more days (until {text})",
            if n == 1 { "" } else { "s" },
            (t - now_s) / 86400
        )),
    }
}

/// Across clusters: every record readable, exactly one active.
fn peers(targets: &[Target], records: &[Record]) -> CheckResult {
    const NAME: &str = "peers";
    let unreadable: Vec<&str> = targets
        .iter()
        .zip(records)
        .filter(|(_, r)| r.is_err())
        .map(|(t, _)| t.name.as_str())
        .collect();
    let actives: Vec<String> = targets
        .iter()
        .zip(records)
        .filter_map(|(t, r)| match r {
            Ok(p) if p.role == Role::Active => Some(format!("{} (epoch {})", t.name, p.epoch)),
            _ => None,
        })
        .collect();
    if !unreadable.is_empty() {
        return fail(
            None,
            NAME,
            format!("cannot read the state of {}", unreadable.join(", ")),
            "see the failed checks of those clusters above",
        );
    }
    match actives.len() {
        1 => pass(
            None,
            NAME,
            format!("{} clusters, one active: {}", targets.len(), actives[0]),
        ),
        0 => fail(
            None,
            NAME,
            "no cluster is active".to_owned(),
            "are the controllers running and able to reach each other (peer port, mTLS)? \
             An election needs a majority; see `cwctl explain`",
        ),
        _ => fail(
            None,
            NAME,
            format!("several records say active: {}", actives.join(", ")),
            "the lower epochs are stale records of fenced actives, corrected on their \
             controller's next step; if this persists, that controller is not running",
        ),
    }
}

enum ClockError {
    Unreachable(String),
    Skewed(String),
}

/// Compares the API server's `Date` header with this machine's clock.
async fn clock(client: &kube::Client, max_skew: Duration) -> Result<String, ClockError> {
    let request = http::Request::get("/version")
        .body(kube::client::Body::from(Vec::new()))
        .map_err(|e| ClockError::Unreachable(e.to_string()))?;
    let t0 = SystemTime::now();
    let response = tokio::time::timeout(Duration::from_secs(15), client.send(request))
        .await
        .map_err(|_| ClockError::Unreachable("no answer within 15s".to_owned()))?
        .map_err(|e| ClockError::Unreachable(crate::describe(&e)))?;
    let t1 = SystemTime::now();
    let Some(date) = response
        .headers()
        .get(http::header::DATE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| httpdate::parse_http_date(v).ok())
    else {
        return Ok("the API server sends no Date header; skew not measured".to_owned());
    };
    clock_verdict(t0, t1, date, max_skew).map_err(ClockError::Skewed)
}

/// Bounds the offset server − local: the server's clock read some time in
/// `[date, date + 1s)` (the header has whole seconds) while ours was in
/// `[t0, t1]`. Fails only if every offset consistent with that exceeds
/// `max_skew`.
pub fn clock_verdict(
    t0: SystemTime,
    t1: SystemTime,
    date: SystemTime,
    max_skew: Duration,
) -> Result<String, String> {
    let ms = |t: SystemTime| -> i128 {
        match t.duration_since(SystemTime::UNIX_EPOCH) {
            Ok(d) => d.as_millis() as i128,
            Err(e) => -(e.duration().as_millis() as i128),
        }
    };
    let (t0, t1, d) = (ms(t0), ms(t1), ms(date));
    let low = d - t1;
    let high = d + 1000 - t0;
    let max = max_skew.as_millis() as i128;
    // The offset lies in [low, high); its smallest magnitude is what the
    // evidence forces.
    let least = if low > 0 {
        low
    } else if high < 0 {
        -high
    } else {
        0
    };
    if least > max {
        Err(format!(
            "the API server's clock is {}off this machine's by at least {least} ms \
             (Date header, round trip {} ms), more than {} ms",
            if low > 0 { "ahead: " } else { "behind: " },
            t1 - t0,
            max
        ))
    } else {
        Ok(format!(
            "offset within [{low}, {high}) ms of this machine (Date header, 1 s resolution)"
        ))
    }
}

/// The text shown by `cwctl check`.
pub fn render(report: &Report) -> String {
    let mut out = String::new();
    let mut current: Option<Option<&str>> = None;
    for c in &report.checks {
        let group = c.cluster.as_deref();
        if current != Some(group) {
            let heading = match group {
                Some(name) => format!("{name}\n{}\n", "-".repeat(name.chars().count())),
                None => "across clusters\n---------------\n".to_owned(),
            };
            if current.is_some() {
                out.push('\n');
            }
            out.push_str(&heading);
            current = Some(group);
        }
        out.push_str(&format!(
            "{} {}: {}\n",
            if c.ok { "✓" } else { "✗" },
            c.name,
            c.detail
        ));
        if let Some(h) = &c.hint {
            out.push_str(&format!("    hint: {h}\n"));
        }
    }
    let failed = report.checks.iter().filter(|c| !c.ok).count();
    out.push_str(&if failed == 0 {
        format!(
            "\nStatus check results are ✓ ({} checks)\n",
            report.checks.len()
        )
    } else {
        format!("\n{failed} of {} checks failed ✗\n", report.checks.len())
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn cert(days: i64) -> String {
        let ca = counterweight_certs::CertificateAuthority::new("test-ca").expect("ca");
        ca.issue(
            &counterweight_certs::LeafSpec::new("webhook", counterweight_certs::Usage::Server)
                .sans(["localhost"])
                .valid_for(time::Duration::days(days)),
        )
        .expect("leaf")
        .cert_pem
    }

    #[test]
    fn ca_bundle_accepts_long_lived_certificates() {
        let ca = counterweight_certs::CertificateAuthority::new("test-ca").expect("ca");
        let pem = ca.pem().cert_pem.clone();
        let d = ca_bundle(pem.as_bytes(), SystemTime::now()).expect("valid");
        assert!(d.starts_with("1 certificate"), "{d}");
    }

    #[test]
    fn ca_bundle_rejects_garbage_empty_and_soon_expiring() {
        let now = SystemTime::now();
        assert_eq!(ca_bundle(b"", now), Err("is empty".to_owned()));
        let e = ca_bundle(b"not a certificate at all", now).expect_err("garbage");
        assert!(
            e.contains("no PEM certificate") || e.contains("not valid PEM"),
            "{e}"
        );
        let e = ca_bundle(
            b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
            now,
        )
        .expect_err("bad der");
        assert!(e.contains("does not parse"), "{e}");
        let soon = cert(10);
        let e = ca_bundle(soon.as_bytes(), now).expect_err("expiring");
        assert!(e.contains("within 30 days"), "{e}");
        let later = now + Duration::from_secs(400 * 24 * 3600);
        let long = cert(365);
        let e = ca_bundle(long.as_bytes(), later).expect_err("expired");
        assert!(e.contains("expired"), "{e}");
    }

    #[test]
    fn bundle_check_names_the_webhook_and_hints() {
        let r = bundles_check(
            Some("east"),
            "webhook counterweight-inject",
            vec![("inject.counterweight.dev".into(), Some(b"garbage".to_vec()))],
            SystemTime::now(),
        );
        assert!(!r.ok);
        assert!(
            r.detail.contains("inject.counterweight.dev: caBundle"),
            "{r:?}"
        );
        assert!(r.hint.as_deref().is_some_and(|h| h.contains("caBundle")));
    }

    fn cm(key: &str, value: &str) -> ConfigMap {
        ConfigMap {
            data: Some(BTreeMap::from([(key.to_owned(), value.to_owned())])),
            ..Default::default()
        }
    }

    #[test]
    fn policy_check_reports_problems() {
        let ok = "interval: 1s\nthreshold: 0.5\nretries: 1\ncomponents:\n  - name: a\n    namespaces: [x]\n    selector: {matchLabels: {app: a}}\n    weight: 1\n";
        let r = policy_check(None, "ns", Ok(Some(cm("policy.yaml", ok))));
        assert!(r.ok, "{r:?}");
        assert!(r.detail.contains("weights sum to 1"), "{r:?}");
        let bad = ok.replace("weight: 1", "weight: 0.7");
        let r = policy_check(None, "ns", Ok(Some(cm("policy.yaml", &bad))));
        assert!(!r.ok && r.detail.contains("weight"), "{r:?}");
        let r = policy_check(None, "ns", Ok(Some(cm("other", ok))));
        assert!(!r.ok && r.detail.contains("policy.yaml"), "{r:?}");
        let r = policy_check(None, "ns", Ok(None));
        assert!(!r.ok && r.hint.is_some());
    }

    #[test]
    fn state_check_reads_the_record() {
        let mut c = cm("state", "active");
        c.data
            .as_mut()
            .expect("data")
            .insert("epoch".into(), "4".into());
        let (r, rec) = state_check(Some("east"), "ns", Ok(Some(c)));
        assert!(r.ok && r.detail == "active in epoch 4", "{r:?}");
        assert!(rec.is_ok());
        let (r, rec) = state_check(Some("east"), "ns", Ok(Some(cm("state", "boss"))));
        assert!(!r.ok && rec.is_err());
    }

    #[test]
    fn clock_verdict_fails_only_when_certain() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let max = Duration::from_secs(2);
        // Same second, short round trip: fine.
        assert!(clock_verdict(t, t + Duration::from_millis(20), t, max).is_ok());
        // Server 5 s ahead.
        let e = clock_verdict(
            t,
            t + Duration::from_millis(20),
            t + Duration::from_secs(5),
            max,
        )
        .expect_err("ahead");
        assert!(e.contains("ahead"), "{e}");
        // Server 5 s behind.
        let e = clock_verdict(
            t,
            t + Duration::from_millis(20),
            t - Duration::from_secs(5),
            max,
        )
        .expect_err("behind");
        assert!(e.contains("behind"), "{e}");
        // 2.5 s behind but the round trip was 1 s: cannot be sure, pass.
        assert!(
            clock_verdict(
                t,
                t + Duration::from_millis(1000),
                t - Duration::from_millis(2500),
                max
            )
            .is_ok()
        );
    }

    #[test]
    fn render_marks_failures_with_hints() {
        let report = Report {
            checks: vec![
                pass(Some("east"), "clock", "fine".into()),
                fail(Some("east"), "policy", "bad".into(), "fix it"),
                pass(None, "peers", "one active".into()),
            ],
        };
        let text = render(&report);
        assert!(text.contains("east\n----\n"), "{text}");
        assert!(text.contains("✓ clock: fine"), "{text}");
        assert!(text.contains("✗ policy: bad\n    hint: fix it"), "{text}");
        assert!(text.contains("across clusters"), "{text}");
        assert!(text.contains("1 of 3 checks failed"), "{text}");
        assert!(!report.passed());
    }
}
