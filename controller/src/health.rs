//! The health loop: Table 1 run against the live cluster.
//!
//! It keeps a watch cache of pods (a kube-runtime reflector, stripped to the
//! fields health needs) and feeds each pod event into the core's incremental
//! [`Tally`], so an evaluation never lists pods and costs O(components). It
//! watches the policy ConfigMap and swaps in each new policy only if the core
//! validates it. Every `interval` it runs the active checks concurrently, then
//! advances Table 1's retry counter; between ticks, pod changes re-evaluate S
//! at once (debounced) so a failure shows without waiting for the tick, while
//! K keeps counting ticks only. Each verdict goes to the state ConfigMap (as
//! an explanation), to metrics, to Events, and to whoever subscribes to
//! [`HealthLoop::subscribe`] (the HA protocol).

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use counterweight_core::health::{
    CheckOutcome, HealthReport, Observation, PodFacts, RetryCounter, Tally, Verdict, evaluate,
    pods_up, runs_checks,
};
use counterweight_core::names;
use counterweight_core::policy::{Check, Policy, format_duration};
use counterweight_core::state::{Part, PolicyStatus};
use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::events::EventType;
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher::{self, Event as WEvent};
use kube::runtime::{WatchStreamExt, reflector as reflect_stream};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{Instrument, info, info_span, warn};

use crate::checks::{self, PgCredentials};
use crate::events::EventSink;
use crate::state_store::{StateStore, Written};
use crate::telemetry::{ComponentLabel, Metrics, Probes};

/// How long pod events are gathered before S is re-evaluated between ticks:
/// a rollout touching many pods then costs one write, not one per pod.
const DEBOUNCE: Duration = Duration::from_millis(100);

/// Where the health loop reads and writes.
#[derive(Debug, Clone)]
pub struct HealthSettings {
    /// This cluster's name, for logs and Events.
    pub cluster: String,
    /// Namespace of the state and policy ConfigMaps and of check Secrets.
    pub namespace: String,
    /// Name of the state ConfigMap.
    pub state_name: String,
    /// Name of the policy ConfigMap.
    pub policy_name: String,
}

impl HealthSettings {
    /// The standard names in `namespace`.
    pub fn new(cluster: &str, namespace: &str) -> Self {
        Self {
            cluster: cluster.to_owned(),
            namespace: namespace.to_owned(),
            state_name: names::STATE_CONFIGMAP.to_owned(),
            policy_name: names::POLICY_CONFIGMAP.to_owned(),
        }
    }
}

/// Errors that stop the health loop.
#[derive(Debug, thiserror::Error)]
pub enum HealthError {
    /// A watch stream ended, which kube-runtime watchers never do while the
    /// controller runs; restart the controller.
    #[error("the {0} watch ended unexpectedly; the controller must be restarted")]
    WatchEnded(&'static str),
}

type CheckRound = Pin<Box<dyn std::future::Future<Output = Vec<RoundResult>> + Send>>;

struct RoundResult {
    component: usize,
    check: usize,
    outcome: CheckOutcome,
}

/// The running health evaluation of one cluster.
pub struct HealthLoop {
    client: kube::Client,
    settings: HealthSettings,
    metrics: Arc<Metrics>,
    probes: Arc<Probes>,
    store: StateStore,
    events: EventSink,
    reports: watch::Sender<Option<HealthReport>>,
    stance: Arc<ServingStance>,
}

/// Whether this cluster's service pods are meant to serve, and since when;
/// set by whatever turns serving on and off (the HA loop), read at each
/// evaluation to decide what a pod waiting at the init-gate counts as.
#[derive(Debug, Default)]
pub struct ServingStance {
    since: std::sync::Mutex<Option<std::time::Instant>>,
}

impl ServingStance {
    /// Records that service pods now serve (or not).
    pub fn set(&self, serving: bool) {
        let mut since = self.since.lock().unwrap_or_else(|p| p.into_inner());
        match (serving, *since) {
            (true, None) => *since = Some(std::time::Instant::now()),
            (false, _) => *since = None,
            (true, Some(_)) => {}
        }
    }

    /// The stance for the core's health evaluation.
    pub fn get(&self) -> counterweight_core::health::Stance {
        let since = *self.since.lock().unwrap_or_else(|p| p.into_inner());
        match since {
            None => counterweight_core::health::Stance::Standby,
            Some(t) => counterweight_core::health::Stance::Serving {
                for_ms: u64::try_from(t.elapsed().as_millis()).unwrap_or(u64::MAX),
            },
        }
    }
}

/// Mutable state of the loop, apart from its I/O handles.
struct Evaluator {
    policy: Option<Arc<Policy>>,
    policy_version: String,
    tally: Option<Tally>,
    // Pods seen during a relist, swapped in at InitDone.
    relist: Option<Vec<(String, PodFacts)>>,
    synced: bool,
    counter: RetryCounter,
    last_verdict: Verdict,
    checks: Vec<Vec<Option<CheckOutcome>>>,
    credentials: HashMap<String, PgCredentials>,
    published_health: Option<String>,
    published_policy: Option<String>,
}

impl HealthLoop {
    /// Prepares the loop; nothing runs until [`HealthLoop::run`].
    pub fn new(
        client: kube::Client,
        settings: HealthSettings,
        metrics: Arc<Metrics>,
        probes: Arc<Probes>,
    ) -> Self {
        let store = StateStore::new(client.clone(), &settings.namespace, &settings.state_name);
        let events = EventSink::new(
            client.clone(),
            &settings.cluster,
            &settings.namespace,
            &settings.state_name,
        );
        Self {
            client,
            settings,
            metrics,
            probes,
            store,
            events,
            reports: watch::channel(None).0,
            stance: Arc::default(),
        }
    }

    /// The serving stance this loop evaluates under; whoever switches
    /// serving must keep it current.
    pub fn stance(&self) -> Arc<ServingStance> {
        self.stance.clone()
    }

    /// Receives every health report, at ticks and between them.
    pub fn subscribe(&self) -> watch::Receiver<Option<HealthReport>> {
        self.reports.subscribe()
    }

    /// Runs until `shutdown` resolves.
    pub async fn run(
        self,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<(), HealthError> {
        let (pod_store, writer) = reflector::store::<Pod>();
        let pods = reflect_stream(
            writer,
            watcher(
                Api::<Pod>::all(self.client.clone()),
                // Streaming lists send the initial state object by object
                // instead of in pages of full pods, the largest allocation
                // the controller would otherwise make at 10,000 pods.
                watcher::Config::default().streaming_lists(),
            )
            .modify(strip_pod),
        )
        .default_backoff();
        let policies = watcher(
            Api::<ConfigMap>::namespaced(self.client.clone(), &self.settings.namespace),
            watcher::Config::default()
                .fields(&format!("metadata.name={}", self.settings.policy_name)),
        )
        .default_backoff();
        self.run_streams(pods, policies, pod_store, shutdown).await
    }

    async fn run_streams(
        self,
        pods: impl Stream<Item = Result<WEvent<Pod>, watcher::Error>>,
        policies: impl Stream<Item = Result<WEvent<ConfigMap>, watcher::Error>>,
        pod_store: Store<Pod>,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<(), HealthError> {
        let mut pods = std::pin::pin!(pods);
        let mut policies = std::pin::pin!(policies);
        let mut shutdown = std::pin::pin!(shutdown);
        let mut ev = Evaluator {
            policy: None,
            policy_version: String::new(),
            tally: None,
            relist: None,
            synced: false,
            counter: RetryCounter::default(),
            last_verdict: Verdict::Healthy,
            checks: Vec::new(),
            credentials: HashMap::new(),
            published_health: None,
            published_policy: None,
        };
        let mut ticker = new_ticker(Duration::from_secs(3600));
        let mut round: Option<CheckRound> = None;
        let mut debounce: Option<Instant> = None;
        info!(cluster = %self.settings.cluster, "health loop started");

        loop {
            tokio::select! {
                () = &mut shutdown => {
                    info!("health loop stopping");
                    return Ok(());
                }
                item = pods.next() => {
                    let Some(item) = item else { return Err(HealthError::WatchEnded("pod")) };
                    match item {
                        Ok(event) => {
                            if ev.on_pod_event(event) {
                                self.probes.set_ready(ev.synced);
                                debounce.get_or_insert_with(|| Instant::now() + DEBOUNCE);
                            }
                        }
                        Err(e) => warn!(error = %e, "pod watch failed; retrying with backoff"),
                    }
                }
                item = policies.next() => {
                    let Some(item) = item else { return Err(HealthError::WatchEnded("policy")) };
                    match item {
                        Ok(event) => {
                            if let Some(interval) = self.on_policy_event(&mut ev, event, &pod_store).await {
                                ticker = new_ticker(interval);
                                round = None;
                                debounce.get_or_insert_with(Instant::now);
                            }
                        }
                        Err(e) => warn!(error = %e, "policy watch failed; retrying with backoff"),
                    }
                }
                _ = ticker.tick(), if ev.policy.is_some() && ev.synced && round.is_none() => {
                    round = Some(self.start_round(&mut ev).await);
                }
                Some(results) = futures::future::OptionFuture::from(round.as_mut()), if round.is_some() => {
                    round = None;
                    self.finish_round(&mut ev, results).await;
                    debounce = None;
                }
                Some(()) = futures::future::OptionFuture::from(debounce.map(tokio::time::sleep_until)), if debounce.is_some() => {
                    debounce = None;
                    self.publish(&mut ev, false).await;
                }
            }
        }
    }

    /// Handles a policy ConfigMap event; returns the new interval when a new
    /// policy took effect.
    async fn on_policy_event(
        &self,
        ev: &mut Evaluator,
        event: WEvent<ConfigMap>,
        pod_store: &Store<Pod>,
    ) -> Option<Duration> {
        let cm = match event {
            WEvent::Apply(cm) | WEvent::InitApply(cm) => cm,
            WEvent::Delete(_) => {
                let status = match &ev.policy {
                    Some(_) => format!(
                        "policy ConfigMap deleted; the last good policy (resourceVersion {}) stays in force",
                        ev.policy_version
                    ),
                    None => "no policy: create ConfigMap counterweight-policy".to_owned(),
                };
                self.write_policy_status(ev, status).await;
                return None;
            }
            WEvent::Init => return None,
            WEvent::InitDone => {
                if ev.policy.is_none() {
                    let status = format!(
                        "no policy: create ConfigMap {}/{} with key {}",
                        self.settings.namespace,
                        self.settings.policy_name,
                        names::POLICY_KEY
                    );
                    self.write_policy_status(ev, status).await;
                }
                return None;
            }
        };
        let version = cm.resource_version().unwrap_or_default();
        if version == ev.policy_version {
            return None;
        }
        let parsed = Policy::from_configmap_data(cm.data.as_ref()).map_err(|e| e.to_string());
        match parsed {
            Ok(policy) => {
                info!(version = %version, components = policy.components.len(),
                      interval = %format_duration(policy.interval), threshold = policy.threshold,
                      retries = policy.retries, "policy in force");
                let interval = policy.interval;
                ev.install(Arc::new(policy), version.clone(), pod_store);
                self.write_policy_status(ev, format!("in force: resourceVersion {version}"))
                    .await;
                Some(interval)
            }
            Err(problems) => {
                self.metrics.policy_rejections.inc();
                let keeping = match &ev.policy {
                    Some(_) => format!(
                        "keeping the last good policy (resourceVersion {})",
                        ev.policy_version
                    ),
                    None => "no policy is in force".to_owned(),
                };
                warn!(version = %version, %problems, "policy rejected; {keeping}");
                self.record(
                    EventType::Warning,
                    "PolicyRejected",
                    "ValidatePolicy",
                    format!("policy resourceVersion {version} rejected, {keeping}. {problems}"),
                );
                self.write_policy_status(
                    ev,
                    format!("rejected resourceVersion {version}, {keeping}: {problems}"),
                )
                .await;
                None
            }
        }
    }

    async fn start_round(&self, ev: &mut Evaluator) -> CheckRound {
        let Some(policy) = ev.policy.clone() else {
            return Box::pin(async { Vec::new() });
        };
        let Some(tally) = &ev.tally else {
            return Box::pin(async { Vec::new() });
        };
        // Hosts first: the tally borrow must end before credentials are
        // fetched (which may update the credential cache).
        let mut specs = Vec::new();
        let stance = self.stance.get();
        let grace_ms = u64::try_from(policy.gate_release_grace.as_millis()).unwrap_or(u64::MAX);
        for (i, component) in policy.components.iter().enumerate() {
            // A standby's service pods serve nothing to check (core's
            // `runs_checks`): their checks pass as not run.
            let runs = runs_checks(component.role, stance, grace_ms, tally.counts(i).1);
            for (k, check) in component.checks.iter().enumerate() {
                let host = check_host(check).or_else(|| tally.ready_ip(i).map(str::to_owned));
                specs.push((i, k, check.clone(), host, component.check_timeout, runs));
            }
        }
        let mut jobs = Vec::with_capacity(specs.len());
        for (i, k, check, host, timeout, runs) in specs {
            let creds = match &check {
                Check::Postgres(pg) if runs => self.credentials(ev, &pg.secret_ref).await,
                _ => None,
            };
            jobs.push(async move {
                let outcome = match host {
                    _ if !runs => CheckOutcome {
                        check: format!(
                            "{} not run: no service pod is meant to serve yet",
                            check.describe()
                        ),
                        error: None,
                    },
                    Some(host) => checks::run(&check, &host, timeout, creds.as_ref()).await,
                    None => CheckOutcome {
                        check: check.describe(),
                        error: Some("no Running and Ready pod with an IP to check".into()),
                    },
                };
                RoundResult {
                    component: i,
                    check: k,
                    outcome,
                }
            });
        }
        Box::pin(futures::future::join_all(jobs))
    }

    async fn finish_round(&self, ev: &mut Evaluator, results: Vec<RoundResult>) {
        for r in results {
            // Drop cached credentials the server refused, so a rotated
            // Secret is picked up on the next round.
            if let Some(err) = &r.outcome.error
                && (err.contains("28P01") || err.contains("28000"))
                && let Some(Check::Postgres(pg)) = ev
                    .policy
                    .as_ref()
                    .and_then(|p| p.components.get(r.component))
                    .and_then(|c| c.checks.get(r.check))
            {
                ev.credentials.remove(&pg.secret_ref.name);
            }
            if let Some(slot) = ev
                .checks
                .get_mut(r.component)
                .and_then(|c| c.get_mut(r.check))
            {
                *slot = Some(r.outcome);
            }
        }
        self.publish(ev, true).await;
    }

    /// Evaluates S; at a tick also advances Table 1's counter. Publishes the
    /// explanation, metrics, Events and the report channel.
    async fn publish(&self, ev: &mut Evaluator, tick: bool) {
        // Before the pod cache has synced every component would look down:
        // say nothing rather than something false.
        if !ev.synced {
            return;
        }
        let Some(policy) = ev.policy.clone() else {
            return;
        };
        let Some(tally) = &ev.tally else { return };
        let span = info_span!("evaluation", cluster = %self.settings.cluster, tick);
        async {
            let started = std::time::Instant::now();
            let stance = self.stance.get();
            let grace_ms =
                u64::try_from(policy.gate_release_grace.as_millis()).unwrap_or(u64::MAX);
            let observations: Vec<Observation> = (0..policy.components.len())
                .map(|i| {
                    let (selected, ready) = tally.counts(i);
                    Observation {
                        selected,
                        ready: pods_up(
                            ready,
                            tally.at_gate(i),
                            tally.released(i),
                            stance,
                            grace_ms,
                        ),
                        checks: ev.checks.get(i).cloned().unwrap_or_default(),
                    }
                })
                .collect();
            let score = evaluate(&policy, &observations);
            let previous = ev.last_verdict;
            let verdict = if tick {
                self.metrics.evaluations.inc();
                ev.counter.tick(score.score, policy.threshold, policy.retries)
            } else {
                ev.last_verdict
            };
            ev.last_verdict = verdict;
            let report = HealthReport::new(&policy, score, verdict);

            self.metrics.health_score.set(report.score);
            self.metrics.health_threshold.set(report.threshold);
            self.metrics
                .health_retry_count
                .set(i64::from(report.retry_count));
            for c in &report.components {
                self.metrics
                    .component_up
                    .get_or_create(&ComponentLabel {
                        component: c.name.clone(),
                    })
                    .set(i64::from(c.up));
            }
            if tick {
                tracing::debug!(score = report.score, retry_count = report.retry_count, ?verdict, "interval evaluated");
            }

            // The HA loop hears the verdict first: a handover must not wait
            // for the Event and the explanation to be written.
            self.reports.send_replace(Some(report.clone()));
            let serialized = report.encode();
            self.metrics
                .evaluation_seconds
                .observe(started.elapsed().as_secs_f64());
            match verdict {
                Verdict::Abnormal { .. } if tick => {
                    warn!(summary = %report.summary(), "cluster abnormal");
                    self.record(
                        EventType::Warning,
                        "ClusterAbnormal",
                        "EvaluateHealth",
                        format!(
                            "weighted health stayed below the threshold for more than K={} intervals: {}",
                            report.retries,
                            report.summary()
                        ),
                    );
                }
                Verdict::Healthy if tick && previous != Verdict::Healthy => {
                    info!(summary = %report.summary(), "cluster healthy again");
                    self.record(
                        EventType::Normal,
                        "HealthRecovered",
                        "EvaluateHealth",
                        format!("weighted health is back at or above the threshold: {}", report.summary()),
                    );
                }
                _ => {}
            }

            if ev.published_health.as_deref() != Some(serialized.as_str())
                && self.write_key(HealthReport::KEY, serialized.clone()).await
            {
                ev.published_health = Some(serialized);
            }
        }
        .instrument(span)
        .await;
    }

    async fn write_policy_status(&self, ev: &mut Evaluator, status: String) {
        if ev.published_policy.as_deref() == Some(status.as_str()) {
            return;
        }
        if self.write_key(PolicyStatus::KEY, status.clone()).await {
            ev.published_policy = Some(status);
        }
    }

    /// Writes one key of the state ConfigMap; returns whether it is stored.
    async fn write_key(&self, key: &'static str, value: String) -> bool {
        self.metrics.api_requests.inc();
        match self
            .store
            .update(|data| {
                data.insert(key.to_owned(), value.clone());
            })
            .await
        {
            Ok((_, Written::Created)) => {
                warn!("state ConfigMap was missing; recreated as standby");
                true
            }
            Ok(_) => true,
            Err(e) => {
                warn!(error = %e, key, "could not write the state ConfigMap; will retry");
                false
            }
        }
    }

    async fn credentials(
        &self,
        ev: &mut Evaluator,
        secret: &counterweight_core::policy::SecretRef,
    ) -> Option<PgCredentials> {
        if let Some(c) = ev.credentials.get(&secret.name) {
            return Some(c.clone());
        }
        self.metrics.api_requests.inc();
        let api: Api<Secret> = Api::namespaced(self.client.clone(), &self.settings.namespace);
        let s = match api.get_opt(&secret.name).await {
            Ok(Some(s)) => s,
            Ok(None) => {
                warn!(secret = %secret.name, "check credentials Secret not found");
                return None;
            }
            Err(e) => {
                warn!(secret = %secret.name, error = %e, "could not read check credentials");
                return None;
            }
        };
        let data = s.data.unwrap_or_default();
        let get = |k: &str| {
            data.get(k)
                .and_then(|v| String::from_utf8(v.0.clone()).ok())
        };
        let ca = match &secret.ca_key {
            None => None,
            Some(key) => match data.get(key) {
                Some(v) => Some((format!("Secret {} key {key}", secret.name), v.0.clone())),
                None => {
                    warn!(secret = %secret.name, key = %key, "check credentials Secret lacks the CA key the check names");
                    return None;
                }
            },
        };
        let creds = PgCredentials {
            user: get(&secret.user_key)?,
            password: get(&secret.password_key)?,
            ca,
        };
        ev.credentials.insert(secret.name.clone(), creds.clone());
        Some(creds)
    }

    fn record(&self, type_: EventType, reason: &str, action: &str, note: String) {
        self.metrics.api_requests.inc();
        self.events.record(type_, reason, action, &note);
    }
}

impl Evaluator {
    /// Applies one pod watch event; returns whether health may have changed.
    fn on_pod_event(&mut self, event: WEvent<Pod>) -> bool {
        match event {
            WEvent::Init => {
                self.relist = Some(Vec::new());
                false
            }
            WEvent::InitApply(pod) => {
                if let Some(buf) = &mut self.relist {
                    buf.push((pod_key(&pod), PodFacts::of(&pod)));
                }
                false
            }
            WEvent::InitDone => {
                let pods = self.relist.take().unwrap_or_default();
                if let Some(policy) = &self.policy {
                    let mut tally = Tally::new(policy);
                    for (key, facts) in &pods {
                        tally.upsert(key, facts);
                    }
                    self.tally = Some(tally);
                }
                self.synced = true;
                true
            }
            WEvent::Apply(pod) => {
                if let Some(t) = &mut self.tally {
                    t.upsert(&pod_key(&pod), &PodFacts::of(&pod));
                }
                self.synced
            }
            WEvent::Delete(pod) => {
                if let Some(t) = &mut self.tally {
                    t.remove(&pod_key(&pod));
                }
                self.synced
            }
        }
    }

    /// Puts a validated policy in force, recounting pods from the cache.
    fn install(&mut self, policy: Arc<Policy>, version: String, pod_store: &Store<Pod>) {
        let mut tally = Tally::new(&policy);
        for pod in pod_store.state() {
            tally.upsert(&pod_key(&pod), &PodFacts::of(&pod));
        }
        // Keep check results of components whose checks did not change.
        let old = self.policy.as_ref();
        self.checks = policy
            .components
            .iter()
            .map(|c| {
                let same = old
                    .and_then(|o| o.component(&c.name))
                    .is_some_and(|o| o.checks == c.checks);
                let old_index =
                    old.and_then(|o| o.components.iter().position(|x| x.name == c.name));
                match (same, old_index) {
                    (true, Some(i)) => self.checks.get(i).cloned().unwrap_or_default(),
                    _ => vec![None; c.checks.len()],
                }
            })
            .collect();
        self.tally = Some(tally);
        self.policy = Some(policy);
        self.policy_version = version;
    }
}

fn check_host(check: &Check) -> Option<String> {
    match check {
        Check::Tcp(c) => c.host.clone(),
        Check::Http(c) => c.host.clone(),
        Check::Postgres(c) => c.host.clone(),
    }
}

fn new_ticker(interval: Duration) -> tokio::time::Interval {
    // The first tick is one interval away: evaluating before any check has
    // run would count a spurious bad interval.
    let mut t = tokio::time::interval_at(Instant::now() + interval, interval);
    t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    t
}

fn pod_key(pod: &Pod) -> String {
    format!(
        "{}/{}",
        pod.metadata.namespace.as_deref().unwrap_or_default(),
        pod.metadata.name.as_deref().unwrap_or_default()
    )
}

/// Drops everything health does not read, before the pod enters the cache:
/// at 10,000 pods the full objects would cost hundreds of megabytes.
pub fn strip_pod(pod: &mut Pod) {
    let meta = &mut pod.metadata;
    meta.managed_fields = None;
    meta.annotations = None;
    meta.owner_references = None;
    meta.finalizers = None;
    pod.spec = None;
    if let Some(status) = &mut pod.status {
        // Only what `PodFacts::of` reads: ContainersReady, and whether the
        // init-gate is running or exited (and its exit code).
        let conditions = status.conditions.take().map(|cs| {
            cs.into_iter()
                .filter(|c| c.type_ == "ContainersReady")
                .collect()
        });
        let gate = status.init_container_statuses.take().map(|ics| {
            ics.into_iter()
                .filter(|c| c.name == counterweight_core::inject::GATE_CONTAINER)
                .map(|c| k8s_openapi::api::core::v1::ContainerStatus {
                    name: c.name,
                    state: c
                        .state
                        .map(|st| k8s_openapi::api::core::v1::ContainerState {
                            running: st.running,
                            terminated: st.terminated.map(|t| {
                                k8s_openapi::api::core::v1::ContainerStateTerminated {
                                    exit_code: t.exit_code,
                                    ..Default::default()
                                }
                            }),
                            ..Default::default()
                        }),
                    ..Default::default()
                })
                .collect()
        });
        *status = k8s_openapi::api::core::v1::PodStatus {
            phase: status.phase.take(),
            pod_ip: status.pod_ip.take(),
            conditions,
            init_container_statuses: gate,
            ..Default::default()
        };
    }
}

use kube::runtime::watcher::watcher;
