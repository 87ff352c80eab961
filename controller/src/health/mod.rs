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

mod evaluator;
mod publish;
mod rounds;
mod stance;

use std::sync::Arc;
use std::time::Duration;

use counterweight_core::health::HealthReport;
use counterweight_core::names;
use counterweight_core::policy::{Policy, format_duration};
use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::events::EventType;
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher::{self, Event as WEvent, watcher};
use kube::runtime::{WatchStreamExt, reflector as reflect_stream};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::events::EventSink;
use crate::state_store::StateStore;
use crate::telemetry::{Metrics, Probes};
use evaluator::{Evaluator, strip_pod};
use rounds::CheckRound;
pub use stance::ServingStance;

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
        let mut ev = Evaluator::new();
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

    fn record(&self, type_: EventType, reason: &str, action: &str, note: String) {
        self.metrics.api_requests.inc();
        self.events.record(type_, reason, action, &note);
    }
}

fn new_ticker(interval: Duration) -> tokio::time::Interval {
    // The first tick is one interval away: evaluating before any check has
    // run would count a spurious bad interval.
    let mut t = tokio::time::interval_at(Instant::now() + interval, interval);
    t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    t
}
