//! The health policy: what counts towards a cluster's weighted health.
//!
//! Operators write the policy as YAML under the `policy.yaml` key of the
//! `counterweight-policy` ConfigMap. This module parses it and validates it
//! against Table 1 and the claims: weights in (0, 1] that sum to 1
//! (Equation 2), a threshold D in [0, 1] that the weights can reach
//! (claims 5 and 15), a retry count K ≥ 0. Validation reports every problem at
//! once, each naming the component and the field, so one `kubectl apply`
//! round trip shows everything to fix. The controller and the admission
//! webhook both call [`Policy::from_yaml`]; there is no second validator.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::bounded::{self, BoundedError, Limits};
use crate::names::{check_dns_label, check_label_key, check_label_value};

/// Tolerance of Equation 2 (Σ w = 1): YAML decimals such as 0.1 + 0.2 are
/// not exact in binary floating point.
pub const WEIGHT_SUM_TOLERANCE: f64 = 1e-9;

/// Shortest evaluation interval accepted: below it, API watch latency and
/// check timeouts dominate and the counter K stops meaning anything.
pub const MIN_INTERVAL: Duration = Duration::from_millis(100);

/// A validated health policy. Construct it with [`Policy::from_yaml`]; every
/// value in it has been checked.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Policy {
    /// Table 1 loop period.
    #[serde(with = "duration_text")]
    pub interval: Duration,
    /// D: the cluster is degraded while S < D.
    pub threshold: f64,
    /// K: how many consecutive degraded intervals are tolerated.
    pub retries: u32,
    /// The weighted components, in the order written.
    pub components: Vec<Component>,
    /// How long after its cluster starts serving a service pod still
    /// waiting at the init-gate, or released by it and still starting,
    /// counts as up: gates release within moments of a promotion, but the
    /// released containers need time to start. Without it a fresh active
    /// would look degraded and hand back.
    #[serde(with = "duration_text")]
    pub gate_release_grace: Duration,
}

/// `gateReleaseGrace` when the policy leaves it out.
pub const DEFAULT_GATE_RELEASE_GRACE: Duration = Duration::from_secs(60);

/// What a component's pods do; decides whether the init-gate applies and
/// which FIG. 8 branch checks it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// Serves users; gated on standby.
    Service,
    /// The HA pod (this controller's peers).
    Ha,
    /// Database synchronization.
    Database,
    /// File replication.
    FileReplication,
}

impl Role {
    /// The name used in labels and policy YAML.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Service => "service",
            Role::Ha => "ha",
            Role::Database => "database",
            Role::FileReplication => "file-replication",
        }
    }
}

/// One weighted term s_j · w_j of S.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Component {
    /// Unique name, shown in explanations and metrics.
    pub name: String,
    /// Namespaces whose pods are considered.
    pub namespaces: Vec<String>,
    /// Which pods belong to the component.
    pub selector: Selector,
    /// w_j in (0, 1].
    pub weight: f64,
    /// What the pods do.
    pub role: Role,
    /// How many Running and Ready pods make s_j = 1.
    pub min_ready: u32,
    /// Active checks; all must pass for s_j = 1.
    pub checks: Vec<Check>,
    /// Time limit of each check, shorter than the interval.
    #[serde(with = "duration_text")]
    pub check_timeout: Duration,
}

/// A Kubernetes-style label selector.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Selector {
    /// Labels that must be present with these values.
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
    /// Set-based requirements.
    #[serde(default)]
    pub match_expressions: Vec<Requirement>,
}

/// One set-based selector requirement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Requirement {
    /// Label key.
    pub key: String,
    /// How the key relates to `values`.
    pub operator: Operator,
    /// Values for `In` and `NotIn`; empty for `Exists` and `DoesNotExist`.
    #[serde(default)]
    pub values: Vec<String>,
}

/// Selector operators, as in Kubernetes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Operator {
    /// The label's value is one of `values`.
    In,
    /// The label is absent or its value is not one of `values`.
    NotIn,
    /// The label is present.
    Exists,
    /// The label is absent.
    DoesNotExist,
}

impl Selector {
    /// Whether a pod with `labels` is selected.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
            && self.match_expressions.iter().all(|r| {
                let value = labels.get(&r.key);
                match r.operator {
                    Operator::In => value.is_some_and(|v| r.values.contains(v)),
                    Operator::NotIn => value.is_none_or(|v| !r.values.contains(v)),
                    Operator::Exists => value.is_some(),
                    Operator::DoesNotExist => value.is_none(),
                }
            })
    }
}

/// An active check of a component (FIG. 8, stages 803-817).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Check {
    /// TCP connect succeeds.
    Tcp(TcpCheck),
    /// HTTP GET answers 2xx.
    Http(HttpCheck),
    /// PostgreSQL accepts a connection and answers `SELECT 1` (FIG. 8
    /// "database connection return").
    Postgres(PostgresCheck),
}

impl Check {
    /// Short description for explanations, e.g. `tcp :8080`.
    pub fn describe(&self) -> String {
        match self {
            Check::Tcp(c) => format!("tcp {}:{}", c.host.as_deref().unwrap_or(""), c.port),
            Check::Http(c) => format!(
                "http GET {}:{}{}",
                c.host.as_deref().unwrap_or(""),
                c.port,
                c.path
            ),
            Check::Postgres(c) => format!(
                "postgres {}:{}/{}",
                c.host.as_deref().unwrap_or(""),
                c.port,
                c.database
            ),
        }
    }

    fn port(&self) -> u16 {
        match self {
            Check::Tcp(c) => c.port,
            Check::Http(c) => c.port,
            Check::Postgres(c) => c.port,
        }
    }
}

/// TCP connect check. Without `host`, a Running and Ready pod of the
/// component is dialled at its pod IP.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TcpCheck {
    /// Port to connect to.
    pub port: u16,
    /// Fixed host (e.g. a Service name) instead of a pod IP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
}

/// HTTP GET check; any 2xx passes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpCheck {
    /// Port to connect to.
    pub port: u16,
    /// Request path, starting with `/`.
    #[serde(default = "default_http_path")]
    pub path: String,
    /// Fixed host instead of a pod IP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
}

/// Checks an HTTP check's request target: an origin-form path starting
/// with `/`, optionally with a query string (`/ready?maxAgeMs=10000`), in
/// visible ASCII (percent-encode anything else), without a fragment (never
/// sent to a server).
fn http_path_problem(path: &str) -> Result<(), String> {
    if !path.starts_with('/') {
        return Err(format!("{path:?} must start with /"));
    }
    if path.contains('#') {
        return Err(format!(
            "{path:?}: a #fragment is never sent to the server; remove it"
        ));
    }
    if let Some(c) = path.chars().find(|c| !c.is_ascii_graphic()) {
        return Err(format!(
            "{path:?}: {c:?} is not allowed in a request target (percent-encode it)"
        ));
    }
    Ok(())
}

fn default_http_path() -> String {
    "/".to_owned()
}

/// PostgreSQL check: connect, `SELECT 1`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PostgresCheck {
    /// Port of the server.
    #[serde(default = "default_pg_port")]
    pub port: u16,
    /// Fixed host instead of a pod IP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Database to connect to.
    #[serde(default = "default_pg_database")]
    pub database: String,
    /// Where the user name and password are.
    pub secret_ref: SecretRef,
    /// On a hot standby, the most WAL (bytes) received but not yet replayed
    /// for the check to pass, and the WAL receiver must be streaming; a
    /// primary passes. Unset: only `SELECT 1`. This is what makes a lagging
    /// standby refuse a handover (Patroni's `maximum_lag_on_failover`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_lag_bytes: Option<u64>,
    /// TLS to the server, with libpq's meaning of `sslmode`. Default
    /// `prefer` (libpq's): TLS when the server offers it, unverified.
    /// `verify-ca` checks the server's certificate against the CA in
    /// `secretRef.caKey`; `verify-full` its name too, which the pod IPs the
    /// check dials rarely are in (set `host`).
    #[serde(default, skip_serializing_if = "PgSslMode::is_default")]
    pub sslmode: PgSslMode,
}

/// libpq's `sslmode` values, for the PostgreSQL check.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PgSslMode {
    /// No TLS.
    Disable,
    /// As libpq's `allow`: here the same as `prefer`.
    Allow,
    /// TLS if the server offers it; no verification.
    #[default]
    Prefer,
    /// TLS or fail; no verification (the chain if a CA is given).
    Require,
    /// TLS, the chain checked against the CA.
    VerifyCa,
    /// TLS, the chain and the host name checked.
    VerifyFull,
}

impl PgSslMode {
    /// The libpq spelling (`verify-ca`).
    pub fn as_str(self) -> &'static str {
        match self {
            PgSslMode::Disable => "disable",
            PgSslMode::Allow => "allow",
            PgSslMode::Prefer => "prefer",
            PgSslMode::Require => "require",
            PgSslMode::VerifyCa => "verify-ca",
            PgSslMode::VerifyFull => "verify-full",
        }
    }

    /// Whether the server's certificate is checked against a CA, which
    /// must then be given.
    pub fn verifies(self) -> bool {
        matches!(self, PgSslMode::VerifyCa | PgSslMode::VerifyFull)
    }

    fn is_default(&self) -> bool {
        *self == PgSslMode::default()
    }
}

fn default_pg_port() -> u16 {
    5432
}

fn default_pg_database() -> String {
    "postgres".to_owned()
}

/// Reference to credentials in a Secret of the controller's namespace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SecretRef {
    /// Secret name.
    pub name: String,
    /// Key holding the user name.
    #[serde(default = "default_user_key")]
    pub user_key: String,
    /// Key holding the password.
    #[serde(default = "default_password_key")]
    pub password_key: String,
    /// Key holding the CA bundle (PEM) that signs the server's certificate;
    /// needed by `sslmode` `verify-ca` and `verify-full`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_key: Option<String>,
}

fn default_user_key() -> String {
    "username".to_owned()
}

fn default_password_key() -> String {
    "password".to_owned()
}

/// One problem found in a policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Where: `threshold`, `components[1] (db).weight`, ...
    pub field: String,
    /// What is wrong and what would be right.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// Every problem of a rejected policy, in document order.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct PolicyErrors(Vec<Problem>);

impl PolicyErrors {
    /// The problems, at least one.
    pub fn problems(&self) -> &[Problem] {
        &self.0
    }
}

impl fmt::Display for PolicyErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0.len();
        write!(
            f,
            "invalid policy ({n} problem{}):",
            if n == 1 { "" } else { "s" }
        )?;
        for p in &self.0 {
            write!(f, "\n  - {p}")?;
        }
        Ok(())
    }
}

/// The policy as written, before validation. Field types are loose where a
/// wrong value deserves a better message than serde's.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawPolicy {
    interval: Option<String>,
    threshold: Option<f64>,
    retries: Option<i64>,
    gate_release_grace: Option<String>,
    #[serde(default)]
    components: Vec<RawComponent>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawComponent {
    name: Option<String>,
    #[serde(default)]
    namespaces: Vec<String>,
    selector: Option<Selector>,
    weight: Option<f64>,
    role: Option<Role>,
    min_ready: Option<i64>,
    #[serde(default)]
    checks: Vec<RawCheck>,
    check_timeout: Option<String>,
}

/// A check as written: a map with exactly one of its keys.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCheck {
    tcp: Option<TcpCheck>,
    http: Option<HttpCheck>,
    postgres: Option<PostgresCheck>,
}

impl RawCheck {
    fn into_check(self) -> Result<Check, &'static str> {
        match (self.tcp, self.http, self.postgres) {
            (Some(t), None, None) => Ok(Check::Tcp(t)),
            (None, Some(h), None) => Ok(Check::Http(h)),
            (None, None, Some(pg)) => Ok(Check::Postgres(pg)),
            _ => Err("write exactly one of `tcp`, `http` or `postgres`"),
        }
    }
}

impl Policy {
    /// Parses and validates policy YAML. Syntax and type errors are one
    /// problem (with serde's location); otherwise every semantic problem is
    /// reported.
    pub fn from_yaml(text: &str) -> Result<Self, PolicyErrors> {
        // Bounded: the policy comes from a ConfigMap anyone with write
        // access to it can fill, and is parsed by the webhook in the path of
        // pod creation and by the controller (see `crate::bounded`).
        let raw: RawPolicy = bounded::from_yaml(text, Limits::CONFIG).map_err(|e| {
            let field = match &e {
                BoundedError::Yaml(y) => y
                    .location()
                    .map(|l| format!("line {} column {}", l.line(), l.column())),
                BoundedError::TooLarge { .. } | BoundedError::NotUtf8(_) => None,
            };
            PolicyErrors(vec![Problem {
                field: field.unwrap_or_else(|| "document".to_owned()),
                message: e.to_string(),
            }])
        })?;
        raw.validate()
    }

    /// Reads the policy from the `data` of its ConfigMap
    /// ([`crate::names::POLICY_CONFIGMAP`]), as every reader must: the
    /// validating webhook, the controller and `cwctl check` call this one
    /// function, so they cannot disagree about the same bytes.
    pub fn from_configmap_data(
        data: Option<&BTreeMap<String, String>>,
    ) -> Result<Self, PolicyErrors> {
        match data.and_then(|d| d.get(crate::names::POLICY_KEY)) {
            Some(text) => Self::from_yaml(text),
            None => Err(PolicyErrors(vec![Problem {
                field: "data".to_owned(),
                message: format!(
                    "ConfigMap {} must hold the policy YAML under data key `{}`",
                    crate::names::POLICY_CONFIGMAP,
                    crate::names::POLICY_KEY
                ),
            }])),
        }
    }

    /// Sum of all weights; 1 within [`WEIGHT_SUM_TOLERANCE`] once validated.
    pub fn weight_sum(&self) -> f64 {
        self.components.iter().map(|c| c.weight).sum()
    }

    /// Looks a component up by name.
    pub fn component(&self, name: &str) -> Option<&Component> {
        self.components.iter().find(|c| c.name == name)
    }
}

struct Problems(Vec<Problem>);

impl Problems {
    fn push(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.0.push(Problem {
            field: field.into(),
            message: message.into(),
        });
    }
}

impl RawPolicy {
    fn validate(self) -> Result<Policy, PolicyErrors> {
        let mut p = Problems(Vec::new());

        let interval = match self.interval.as_deref().map(parse_duration) {
            None => {
                p.push("interval", "is required, e.g. `interval: 5s`");
                None
            }
            Some(Err(e)) => {
                p.push("interval", e);
                None
            }
            Some(Ok(d)) if d < MIN_INTERVAL => {
                p.push(
                    "interval",
                    format!("{d:?} is too short; use at least {MIN_INTERVAL:?}"),
                );
                None
            }
            Some(Ok(d)) => Some(d),
        };
        let threshold = match self.threshold {
            None => {
                p.push("threshold", "is required: D, a number in [0, 1]");
                None
            }
            Some(d) if !(0.0..=1.0).contains(&d) => {
                p.push("threshold", format!("{d} is outside [0, 1]"));
                None
            }
            Some(d) => Some(d),
        };
        let retries = match self.retries {
            None => {
                p.push("retries", "is required: K, an integer ≥ 0");
                None
            }
            Some(k) => match u32::try_from(k) {
                Ok(k) => Some(k),
                Err(_) => {
                    p.push(
                        "retries",
                        format!("{k} is not an integer in [0, {}]", u32::MAX),
                    );
                    None
                }
            },
        };
        if self.components.is_empty() {
            p.push("components", "at least one component is required");
        }

        // Equation 2 is only worth checking when every weight is itself valid;
        // otherwise the sum would repeat a problem already reported.
        let weights: Option<Vec<(String, f64)>> = self
            .components
            .iter()
            .map(|c| {
                c.weight
                    .filter(|w| *w > 0.0 && *w <= 1.0)
                    .map(|w| (c.name.clone().unwrap_or_default(), w))
            })
            .collect();

        let mut seen = BTreeSet::new();
        let mut components = Vec::with_capacity(self.components.len());
        for (i, raw) in self.components.into_iter().enumerate() {
            let label = match &raw.name {
                Some(n) => format!("components[{i}] ({n})"),
                None => format!("components[{i}]"),
            };
            if let Some(c) = raw.validate(&label, interval, &mut seen, &mut p) {
                components.push(c);
            }
        }

        if let Some(weights) = weights.filter(|w| !w.is_empty()) {
            let sum: f64 = weights.iter().map(|(_, w)| w).sum();
            if (sum - 1.0).abs() > WEIGHT_SUM_TOLERANCE {
                let terms: Vec<String> = weights.iter().map(|(n, w)| format!("{n}={w}")).collect();
                p.push(
                    "components[*].weight",
                    format!(
                        "weights sum to {sum}, but must sum to 1 (Equation 2): {}",
                        terms.join(" + ")
                    ),
                );
            }
        }

        let gate_release_grace = match self.gate_release_grace.as_deref().map(parse_duration) {
            None => Some(DEFAULT_GATE_RELEASE_GRACE),
            Some(Ok(d)) => Some(d),
            Some(Err(e)) => {
                p.push("gateReleaseGrace", e);
                None
            }
        };
        match (
            interval,
            threshold,
            retries,
            gate_release_grace,
            p.0.is_empty(),
        ) {
            (Some(interval), Some(threshold), Some(retries), Some(gate_release_grace), true) => {
                Ok(Policy {
                    interval,
                    threshold,
                    retries,
                    components,
                    gate_release_grace,
                })
            }
            _ => Err(PolicyErrors(p.0)),
        }
    }
}

impl RawComponent {
    fn validate(
        self,
        label: &str,
        interval: Option<Duration>,
        seen: &mut BTreeSet<String>,
        p: &mut Problems,
    ) -> Option<Component> {
        let before = p.0.len();
        let field = |f: &str| format!("{label}.{f}");

        let name = match self.name {
            None => {
                p.push(field("name"), "is required");
                String::new()
            }
            Some(n) => {
                if let Err(e) = check_dns_label(&n) {
                    p.push(field("name"), e);
                }
                if !seen.insert(n.clone()) {
                    p.push(field("name"), format!("{n:?} is used by another component"));
                }
                n
            }
        };
        if self.namespaces.is_empty() {
            p.push(field("namespaces"), "list at least one namespace");
        }
        for (j, ns) in self.namespaces.iter().enumerate() {
            if let Err(e) = check_dns_label(ns) {
                p.push(field(&format!("namespaces[{j}]")), e);
            }
        }
        let selector = match self.selector {
            None => {
                p.push(
                    field("selector"),
                    "is required (matchLabels or matchExpressions)",
                );
                Selector::default()
            }
            Some(s) if s.match_labels.is_empty() && s.match_expressions.is_empty() => {
                p.push(
                    field("selector"),
                    "is empty and would select every pod; name the component's pods",
                );
                s
            }
            Some(s) => {
                for (key, value) in &s.match_labels {
                    if let Err(e) = check_label_key(key).and(check_label_value(value)) {
                        p.push(field("selector.matchLabels"), e);
                    }
                }
                for (j, r) in s.match_expressions.iter().enumerate() {
                    if let Err(e) = check_label_key(&r.key) {
                        p.push(field(&format!("selector.matchExpressions[{j}].key")), e);
                    }
                    for value in &r.values {
                        if let Err(e) = check_label_value(value) {
                            p.push(field(&format!("selector.matchExpressions[{j}].values")), e);
                        }
                    }
                    let needs_values = matches!(r.operator, Operator::In | Operator::NotIn);
                    if needs_values == r.values.is_empty() {
                        p.push(
                            field(&format!("selector.matchExpressions[{j}].values")),
                            if needs_values {
                                format!("{:?} needs at least one value", r.operator)
                            } else {
                                format!("{:?} takes no values", r.operator)
                            },
                        );
                    }
                }
                s
            }
        };
        let weight = match self.weight {
            None => {
                p.push(field("weight"), "is required: w, a number in (0, 1]");
                0.0
            }
            Some(w) if !(w > 0.0 && w <= 1.0) => {
                p.push(field("weight"), format!("{w} is outside (0, 1]"));
                0.0
            }
            Some(w) => w,
        };
        let role = self.role.unwrap_or(Role::Service);
        let min_ready = match self.min_ready {
            None => 1,
            Some(m) => match u32::try_from(m) {
                Ok(m) if m >= 1 => m,
                _ => {
                    p.push(
                        field("minReady"),
                        format!("{m} must be at least 1 (a component with no pods is down)"),
                    );
                    1
                }
            },
        };
        let mut checks = Vec::with_capacity(self.checks.len());
        for (j, raw) in self.checks.into_iter().enumerate() {
            let cf = |f: &str| field(&format!("checks[{j}].{f}"));
            let c = match raw.into_check() {
                Ok(c) => c,
                Err(e) => {
                    p.push(field(&format!("checks[{j}]")), e);
                    continue;
                }
            };
            if c.port() == 0 {
                p.push(cf("port"), "must be in 1..=65535");
            }
            match &c {
                Check::Http(h) => {
                    if let Err(e) = http_path_problem(&h.path) {
                        p.push(cf("path"), e);
                    }
                }
                Check::Postgres(pg) => {
                    if pg.secret_ref.name.is_empty() {
                        p.push(cf("secretRef.name"), "must name a Secret");
                    }
                    if pg.database.is_empty() {
                        p.push(cf("database"), "must not be empty");
                    }
                    if pg.sslmode.verifies() && pg.secret_ref.ca_key.is_none() {
                        p.push(
                            cf("secretRef.caKey"),
                            format!(
                                "sslmode {} checks the server's certificate: name the Secret's key \
                                 that holds the CA (e.g. ca.crt)",
                                pg.sslmode.as_str()
                            ),
                        );
                    }
                }
                _ => {}
            }
            checks.push(c);
        }
        // Checks must finish before the next tick, or a slow check would make
        // the interval, and so K, meaningless.
        let default_timeout = interval
            .map(|i| (i / 2).min(Duration::from_secs(5)))
            .unwrap_or(Duration::from_secs(1));
        let check_timeout = match self.check_timeout.as_deref().map(parse_duration) {
            None => default_timeout,
            Some(Err(e)) => {
                p.push(field("checkTimeout"), e);
                default_timeout
            }
            Some(Ok(t)) => {
                if t.is_zero() || interval.is_some_and(|i| t >= i) {
                    p.push(
                        field("checkTimeout"),
                        format!("{t:?} must be above zero and shorter than the interval"),
                    );
                }
                t
            }
        };

        (p.0.len() == before).then_some(Component {
            name,
            namespaces: self.namespaces,
            selector,
            weight,
            role,
            min_ready,
            checks,
            check_timeout,
        })
    }
}

/// Parses `250ms`, `5s`, `2m` or `1h`. A bare number is seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{text:?} is not a duration; write e.g. 500ms, 5s or 1m"))?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "" | "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        "h" => Duration::from_secs(n.saturating_mul(3600)),
        other => {
            return Err(format!(
                "unknown unit {other:?} in {text:?}; use ms, s, m or h"
            ));
        }
    };
    Ok(d)
}

/// Formats a duration the way [`parse_duration`] reads it.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if !ms.is_multiple_of(1000) {
        format!("{ms}ms")
    } else if !ms.is_multiple_of(60_000) || ms == 0 {
        format!("{}s", ms / 1000)
    } else {
        format!("{}m", ms / 60_000)
    }
}

mod duration_text {
    use std::time::Duration;

    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::format_duration(*d))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
interval: 2s
threshold: 0.6
retries: 2
components:
  - name: web
    namespaces: [ems]
    selector: {matchLabels: {app: web}}
    weight: 0.5
  - name: db
    namespaces: [ems]
    selector:
      matchExpressions:
        - {key: app, operator: In, values: [db]}
    weight: 0.3
    role: database
    checks:
      - postgres: {host: 127.0.0.1, port: 5432, secretRef: {name: db-cred}}
  - name: files
    namespaces: [ems]
    selector: {matchLabels: {app: files}}
    weight: 0.2
    role: file-replication
    minReady: 2
    checks:
      - tcp: {port: 873}
      - http: {port: 8080, path: /healthz}
"#;

    /// Issue 17: a selector's label key that no pod can carry (found by
    /// fuzzing: `ap''''#'b''p`) was accepted, and the component then never
    /// matched. Both forms of selector are checked, each problem named.
    #[test]
    fn selectors_with_invalid_label_keys_are_refused_with_the_field() {
        let bad = GOOD
            .replace(
                "{matchLabels: {app: web}}",
                "{matchLabels: {\"ap'#b\": web}}",
            )
            .replace("{key: app, operator: In", "{key: \"-app\", operator: In");
        let e = Policy::from_yaml(&bad).unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains("components[0] (web).selector.matchLabels")
                && text.contains("\"ap'#b\" is not a label key"),
            "{text}"
        );
        assert!(
            text.contains("components[1] (db).selector.matchExpressions[0].key")
                && text.contains("\"-app\" is not a label key"),
            "{text}"
        );
        // Prefixed keys, as Kubernetes writes them, stay valid.
        let good = GOOD.replace(
            "{matchLabels: {app: web}}",
            "{matchLabels: {app.kubernetes.io/name: web, example.com/tier_1.x: a}}",
        );
        assert!(Policy::from_yaml(&good).is_ok());
    }

    /// Issue 17: a selector's label value that no pod can carry (a space, a
    /// slash, over 63 characters) was accepted, and the component then
    /// never matched: 0 of 0 ready, silently. Both forms are checked.
    #[test]
    fn selectors_with_invalid_label_values_are_refused_with_the_field() {
        let bad = GOOD
            .replace(
                "{matchLabels: {app: web}}",
                "{matchLabels: {app: \"web server\"}}",
            )
            .replace(
                "operator: In, values: [db]",
                "operator: In, values: [db, \"db/1\"]",
            );
        let text = Policy::from_yaml(&bad).unwrap_err().to_string();
        assert!(
            text.contains("components[0] (web).selector.matchLabels")
                && text.contains("\"web server\" is not a label value"),
            "{text}"
        );
        assert!(
            text.contains("components[1] (db).selector.matchExpressions[0].values")
                && text.contains("\"db/1\" is not a label value"),
            "{text}"
        );
        // An empty value is a value Kubernetes allows (`app: ""`).
        let empty = GOOD.replace("{matchLabels: {app: web}}", "{matchLabels: {app: \"\"}}");
        assert!(Policy::from_yaml(&empty).is_ok());
    }

    #[test]
    fn http_paths_may_carry_a_query_but_no_fragment_or_spaces() {
        for ok in ["/", "/healthz", "/ready?maxAgeMs=10000", "/a%20b?x=1&y=2"] {
            assert_eq!(http_path_problem(ok), Ok(()), "{ok}");
        }
        for (bad, why) in [
            ("ready", "must start with /"),
            ("/ready#top", "fragment"),
            ("/a b", "percent-encode"),
            ("/caf\u{e9}", "percent-encode"),
        ] {
            let e = http_path_problem(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
        let yaml = GOOD.replace("path: /healthz", "path: \"/ready?maxAgeMs=10000\"");
        let p = Policy::from_yaml(&yaml).unwrap();
        let Check::Http(h) = &p.component("files").unwrap().checks[1] else {
            panic!("expected an http check")
        };
        assert_eq!(h.path, "/ready?maxAgeMs=10000");
    }

    #[test]
    fn the_postgres_check_takes_libpqs_sslmode_and_a_ca_for_verification() {
        let line = "postgres: {host: 127.0.0.1, port: 5432, secretRef: {name: db-cred}}";
        assert!(GOOD.contains(line));
        let with = |check: &str| GOOD.replace(line, &format!("postgres: {{{check}}}"));
        let pg = |p: &Policy| match &p.component("db").unwrap().checks[0] {
            Check::Postgres(pg) => pg.clone(),
            _ => panic!("expected a postgres check"),
        };
        let p = Policy::from_yaml(GOOD).unwrap();
        assert_eq!(pg(&p).sslmode, PgSslMode::Prefer, "libpq's default");
        let p = Policy::from_yaml(&with(
            "port: 5432, sslmode: verify-ca, secretRef: {name: db-cred, caKey: ca.crt}",
        ))
        .unwrap();
        assert_eq!(pg(&p).sslmode, PgSslMode::VerifyCa);
        assert_eq!(pg(&p).secret_ref.ca_key.as_deref(), Some("ca.crt"));
        let e = Policy::from_yaml(&with(
            "port: 5432, sslmode: verify-full, secretRef: {name: db-cred}",
        ))
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("secretRef.caKey") && e.contains("verify-full"),
            "{e}"
        );
        let e = Policy::from_yaml(&with(
            "port: 5432, sslmode: verify_ca, secretRef: {name: db-cred}",
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("verify_ca"), "{e}");
    }

    #[test]
    fn a_good_policy_parses_with_defaults() {
        let p = Policy::from_yaml(GOOD).unwrap();
        assert_eq!(p.interval, Duration::from_secs(2));
        assert_eq!(p.threshold, 0.6);
        assert_eq!(p.retries, 2);
        assert_eq!(p.components.len(), 3);
        let web = p.component("web").unwrap();
        assert_eq!(web.role, Role::Service);
        assert_eq!(web.min_ready, 1);
        assert_eq!(web.check_timeout, Duration::from_secs(1));
        let db = p.component("db").unwrap();
        assert_eq!(db.role, Role::Database);
        let Check::Postgres(pg) = &db.checks[0] else {
            panic!("expected a postgres check")
        };
        assert_eq!(pg.database, "postgres");
        assert_eq!(pg.secret_ref.user_key, "username");
        assert_eq!(p.component("files").unwrap().min_ready, 2);
        assert!((p.weight_sum() - 1.0).abs() < WEIGHT_SUM_TOLERANCE);
    }

    #[test]
    fn every_problem_is_reported_at_once_with_its_component_and_field() {
        let bad = r#"
interval: 5x
threshold: 1.5
retries: -1
components:
  - name: web
    namespaces: [ems]
    selector: {matchLabels: {app: web}}
    weight: 0
  - name: web
    namespaces: [Bad_NS]
    selector: {}
    weight: 1.2
    minReady: 0
    checks:
      - http: {port: 0, path: healthz}
"#;
        let err = Policy::from_yaml(bad).unwrap_err();
        let fields: Vec<&str> = err.problems().iter().map(|p| p.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "interval",
                "threshold",
                "retries",
                "components[0] (web).weight",
                "components[1] (web).name",
                "components[1] (web).namespaces[0]",
                "components[1] (web).selector",
                "components[1] (web).weight",
                "components[1] (web).minReady",
                "components[1] (web).checks[0].port",
                "components[1] (web).checks[0].path",
            ]
        );
        let text = err.to_string();
        assert!(text.starts_with("invalid policy (11 problems):"), "{text}");
        assert!(text.contains("unknown unit \"x\""), "{text}");
        assert!(text.contains("used by another component"), "{text}");
    }

    #[test]
    fn weights_must_sum_to_one_within_tolerance() {
        let policy = |w: [f64; 3]| {
            format!(
                "interval: 1s\nthreshold: 0.5\nretries: 0\ncomponents:\n{}",
                w.iter()
                    .enumerate()
                    .map(|(i, w)| format!(
                        "  - {{name: c{i}, namespaces: [x], selector: {{matchLabels: {{a: b}}}}, weight: {w}}}\n"
                    ))
                    .collect::<String>()
            )
        };
        // 0.1 + 0.2 + 0.7 is not exactly 1.0 in binary; it must still pass.
        assert!(Policy::from_yaml(&policy([0.1, 0.2, 0.7])).is_ok());
        let err = Policy::from_yaml(&policy([0.1, 0.2, 0.6])).unwrap_err();
        assert_eq!(err.problems().len(), 1, "{err}");
        assert_eq!(err.problems()[0].field, "components[*].weight");
        assert!(
            err.to_string().contains("c0=0.1 + c1=0.2 + c2=0.6"),
            "{err}"
        );
    }

    #[test]
    fn typos_and_type_errors_are_named() {
        let err = Policy::from_yaml("interval: 1s\nthreshhold: 0.5\n").unwrap_err();
        assert!(
            err.to_string().contains("unknown field `threshhold`"),
            "{err}"
        );
        let err = Policy::from_yaml("interval: 1s\nthreshold: high\n").unwrap_err();
        assert!(err.to_string().contains("threshold"), "{err}");
        let err = Policy::from_yaml("components:\n  - role: leader\n").unwrap_err();
        assert!(
            err.to_string().contains("unknown variant `leader`"),
            "{err}"
        );
    }

    #[test]
    fn missing_required_fields_are_each_reported() {
        let err = Policy::from_yaml("components:\n  - {}\n").unwrap_err();
        let fields: Vec<&str> = err.problems().iter().map(|p| p.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "interval",
                "threshold",
                "retries",
                "components[0].name",
                "components[0].namespaces",
                "components[0].selector",
                "components[0].weight",
            ]
        );
    }

    #[test]
    fn check_timeout_must_be_shorter_than_the_interval() {
        let yaml = GOOD.replace("minReady: 2", "minReady: 2\n    checkTimeout: 2s");
        let err = Policy::from_yaml(&yaml).unwrap_err();
        assert_eq!(
            err.problems()[0].field,
            "components[2] (files).checkTimeout"
        );
    }

    #[test]
    fn selectors_follow_kubernetes_semantics() {
        let labels: BTreeMap<String, String> = [("app", "web"), ("tier", "front")]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        let req = |key: &str, operator, values: &[&str]| Requirement {
            key: key.into(),
            operator,
            values: values.iter().map(|v| (*v).to_owned()).collect(),
        };
        let sel = |reqs: Vec<Requirement>| Selector {
            match_labels: BTreeMap::new(),
            match_expressions: reqs,
        };
        assert!(sel(vec![req("app", Operator::In, &["web", "api"])]).matches(&labels));
        assert!(!sel(vec![req("app", Operator::NotIn, &["web"])]).matches(&labels));
        assert!(sel(vec![req("missing", Operator::NotIn, &["x"])]).matches(&labels));
        assert!(sel(vec![req("tier", Operator::Exists, &[])]).matches(&labels));
        assert!(!sel(vec![req("tier", Operator::DoesNotExist, &[])]).matches(&labels));
        let mut s = sel(vec![]);
        s.match_labels.insert("app".into(), "db".into());
        assert!(!s.matches(&labels));
    }

    #[test]
    fn a_policy_that_expands_through_aliases_is_refused_with_a_reason() {
        // Issue 17: one component's 3,000 namespaces behind an anchor,
        // repeated by 3,000 aliases, is 9 million strings from 27 KB; it
        // took 16 s and 397 MB before, in the path of pod creation.
        let mut text = String::from("interval: 1s\nthreshold: 0.5\nretries: 1\ncomponents:\n");
        let namespaces = (0..3000)
            .map(|i| format!("n{i}"))
            .collect::<Vec<_>>()
            .join(",");
        text.push_str(&format!(
            "  - {{name: c0, weight: 1, selector: {{matchLabels: {{app: x}}}}, namespaces: &ns [{namespaces}]}}\n"
        ));
        for i in 1..3000 {
            text.push_str(&format!("  - {{name: c{i}, weight: 0, namespaces: *ns}}\n"));
        }
        let err = Policy::from_yaml(&text).expect_err("refused");
        let message = err.to_string();
        assert!(message.contains("expands to more than"), "{message}");
    }

    #[test]
    fn durations_round_trip() {
        for text in ["250ms", "5s", "2m", "0s"] {
            assert_eq!(format_duration(parse_duration(text).unwrap()), text);
        }
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert!(parse_duration("").is_err());
        assert!(parse_duration("-1s").is_err());
    }

    #[test]
    fn gate_release_grace_defaults_and_parses() {
        let p = Policy::from_yaml(GOOD).unwrap();
        assert_eq!(p.gate_release_grace, DEFAULT_GATE_RELEASE_GRACE);
        let p = Policy::from_yaml(&format!("gateReleaseGrace: 90s\n{GOOD}")).unwrap();
        assert_eq!(p.gate_release_grace, Duration::from_secs(90));
        let e = Policy::from_yaml(&format!("gateReleaseGrace: soon\n{GOOD}")).unwrap_err();
        assert!(e.to_string().contains("gateReleaseGrace"), "{e}");
    }
}
