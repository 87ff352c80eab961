//! The controller's Prometheus metrics and its plain-HTTP probe endpoints.
//!
//! `/metrics`, `/healthz` and `/readyz` are served on their own port, apart
//! from the mTLS peer port, so that kubelet probes and Prometheus need no
//! client certificate. Readiness means "the pod watch cache has synced":
//! before that, every health number would be a guess.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

/// Label set of per-component metrics.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ComponentLabel {
    /// Component name from the policy.
    pub component: String,
}

/// Every metric the controller exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// S, the weighted health score.
    pub health_score: Gauge<f64, AtomicU64>,
    /// D, the threshold in force.
    pub health_threshold: Gauge<f64, AtomicU64>,
    /// Table 1's retryCount.
    pub health_retry_count: Gauge,
    /// s_j per component (1 up, 0 down).
    pub component_up: Family<ComponentLabel, Gauge>,
    /// Evaluations at interval ticks.
    pub evaluations: Counter,
    /// CPU time of one evaluation (score, verdict, explanation), without I/O.
    pub evaluation_seconds: Histogram,
    /// Policies rejected by validation.
    pub policy_rejections: Counter,
    /// Kubernetes API requests the controller made for health (state writes,
    /// Secret reads, Events); stays flat in steady state.
    pub api_requests: Counter,
    /// The mTLS peer transport's counters, exported as `counterweight_peer_*`.
    pub peer: crate::peer::PeerMetrics,
    /// 1 while this replica acts (it holds the leader Lease, or runs alone).
    pub leader: Gauge,
}

impl Metrics {
    /// Creates and registers all metrics.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("counterweight");
        let health_score = Gauge::<f64, AtomicU64>::default();
        let health_threshold = Gauge::<f64, AtomicU64>::default();
        let health_retry_count = Gauge::default();
        let component_up = Family::<ComponentLabel, Gauge>::default();
        let evaluations = Counter::default();
        let policy_rejections = Counter::default();
        // 1 µs .. ~16 ms: an evaluation is O(components), so anything in the
        // upper buckets is a regression worth seeing.
        let evaluation_seconds = Histogram::new(
            prometheus_client::metrics::histogram::exponential_buckets(1e-6, 2.0, 15),
        );
        let api_requests = Counter::default();
        registry.register(
            "health_score",
            "Weighted health S = sum of s_j * w_j (Table 1)",
            health_score.clone(),
        );
        registry.register(
            "health_threshold",
            "Threshold D below which an interval counts as degraded",
            health_threshold.clone(),
        );
        registry.register(
            "health_retry_count",
            "Consecutive intervals with S below D (Table 1 retryCount)",
            health_retry_count.clone(),
        );
        registry.register(
            "component_up",
            "s_j of each policy component: 1 up, 0 down",
            component_up.clone(),
        );
        registry.register(
            "health_evaluations",
            "Interval evaluations of Table 1",
            evaluations.clone(),
        );
        registry.register(
            "health_evaluation_seconds",
            "Time to compute one evaluation, excluding API writes",
            evaluation_seconds.clone(),
        );
        registry.register(
            "policy_rejections",
            "Policies rejected by validation (the last good one stays in force)",
            policy_rejections.clone(),
        );
        registry.register(
            "health_api_requests",
            "Kubernetes API requests made by the health loop",
            api_requests.clone(),
        );
        let peer = crate::peer::PeerMetrics::register(registry.sub_registry_with_prefix("peer"));
        let leader = Gauge::default();
        registry.register(
            "leader",
            "1 while this replica acts: it holds the leader Lease or runs without election",
            leader.clone(),
        );
        Self {
            registry,
            health_score,
            health_threshold,
            health_retry_count,
            component_up,
            evaluations,
            evaluation_seconds,
            policy_rejections,
            api_requests,
            peer,
            leader,
        }
    }

    /// The text exposition format.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// What the probe endpoints report.
#[derive(Debug, Default)]
pub struct Probes {
    ready: AtomicBool,
    follower: AtomicBool,
    // Why the controller is going down (its HA loop stopped): once set,
    // /readyz fails with it until the process exits.
    failed: std::sync::Mutex<Option<String>>,
}

impl Probes {
    /// Marks the controller ready (or not).
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Release);
    }

    /// Whether the controller is ready.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
            && !self.follower.load(Ordering::Acquire)
            && self.failure().is_none()
    }

    /// Marks the controller as failed (fail-stop under way), with the reason
    /// `/readyz` reports.
    pub fn set_failed(&self, why: String) {
        if let Ok(mut f) = self.failed.lock() {
            *f = Some(why);
        }
    }

    /// Why the controller failed, if it did.
    pub fn failure(&self) -> Option<String> {
        self.failed.lock().ok().and_then(|f| f.clone())
    }

    /// Marks a replica that waits for the leader Lease: it is alive but
    /// not ready, so Services (the peer port) reach only the leader.
    pub fn set_follower(&self, follower: bool) {
        self.follower.store(follower, Ordering::Release);
    }
}

/// The controller's answers on the admin port.
struct ControllerAdmin {
    metrics: Arc<Metrics>,
    probes: Arc<Probes>,
}

impl counterweight_runtime::admin::Admin for ControllerAdmin {
    fn readiness(&self) -> Result<(), String> {
        if let Some(why) = self.probes.failure() {
            Err(why)
        } else if self.probes.is_ready() {
            Ok(())
        } else if self.probes.follower.load(Ordering::Acquire) {
            Err("following: another replica holds the leader Lease".into())
        } else {
            Err("pod cache not synced yet".into())
        }
    }

    fn metrics(&self) -> Result<String, String> {
        self.metrics
            .encode()
            .map_err(|_| "could not encode metrics".to_owned())
    }
}

/// A controller's metrics registry and probes, and the task serving them.
pub struct AdminServer {
    /// The registry `/metrics` serves.
    pub metrics: Arc<Metrics>,
    /// What `/healthz` and `/readyz` answer.
    pub probes: Arc<Probes>,
    /// The server, which ends at shutdown.
    pub task: tokio::task::JoinHandle<std::io::Result<()>>,
}

/// Starts serving a fresh registry and probes on `listener` until
/// `shutdown` resolves.
pub fn start(
    listener: TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> AdminServer {
    let metrics = Arc::new(Metrics::new());
    let probes = Arc::new(Probes::default());
    let task = tokio::spawn(serve(listener, metrics.clone(), probes.clone(), shutdown));
    AdminServer {
        metrics,
        probes,
        task,
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `listener` until
/// `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    probes: Arc<Probes>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let admin = Arc::new(ControllerAdmin { metrics, probes });
    counterweight_runtime::admin::serve(listener, admin, shutdown).await
}
