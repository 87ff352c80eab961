//! Prometheus metrics of the webhook.
//!
//! This module owns the registry and every metric the webhook exports on the
//! plain-HTTP `/metrics` endpoint: requests by endpoint and result, injections,
//! skips by reason, policy rejections, certificate reloads and request
//! latency. Label sets are small closed enums so the series count is bounded
//! whatever clients send.

use counterweight_core::inject::Skip;
use std::sync::Arc;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Which admission endpoint served a request.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum Endpoint {
    /// The mutating pod endpoint.
    Mutate,
    /// The validating policy endpoint.
    ValidatePolicy,
}

/// How a request ended.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum Outcome {
    /// A review was answered normally (patched, skipped, allowed or denied).
    Answered,
    /// The review could not be handled; it was allowed unchanged with a warning.
    Unhandled,
    /// The body was not an AdmissionReview; HTTP 400.
    BadRequest,
}

impl Endpoint {
    /// Every endpoint, in [`Endpoint::index`] order.
    pub const ALL: [Endpoint; 2] = [Endpoint::Mutate, Endpoint::ValidatePolicy];

    fn index(self) -> usize {
        self as usize
    }

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Endpoint::Mutate => "mutate",
            Endpoint::ValidatePolicy => "validate-policy",
        }
    }
}

impl Outcome {
    /// Every outcome, in [`Outcome::index`] order.
    pub const ALL: [Outcome; 3] = [Outcome::Answered, Outcome::Unhandled, Outcome::BadRequest];

    fn index(self) -> usize {
        self as usize
    }

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Answered => "answered",
            Outcome::Unhandled => "unhandled",
            Outcome::BadRequest => "bad-request",
        }
    }
}

impl EncodeLabelValue for Endpoint {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        EncodeLabelValue::encode(&self.as_str(), encoder)
    }
}

impl EncodeLabelValue for Outcome {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        EncodeLabelValue::encode(&self.as_str(), encoder)
    }
}

/// Labels of the request counter.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// The endpoint.
    pub endpoint: Endpoint,
    /// How it ended.
    pub outcome: Outcome,
}

/// Labels of the skip counter.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SkipLabels {
    /// [`Skip::as_str`] of the reason.
    pub reason: &'static str,
}

/// Labels of the certificate reload counter.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabels {
    /// `ok` or `error`.
    pub result: &'static str,
}

/// Labels of the latency histogram.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LatencyLabels {
    /// The endpoint.
    pub endpoint: Endpoint,
}

/// Every metric of the webhook, cheap to clone (the metrics are shared).
#[derive(Clone)]
pub struct Metrics {
    /// Requests by endpoint and outcome.
    pub requests: Family<RequestLabels, Counter>,
    /// Pods that were patched.
    pub injections: Counter,
    /// Pods that were left alone, by reason.
    pub skips: Family<SkipLabels, Counter>,
    /// Policy ConfigMaps that were refused.
    pub policy_rejections: Counter,
    /// Certificate reload attempts by result.
    pub cert_reloads: Family<ReloadLabels, Counter>,
    /// Handler latency in seconds, from body received to response built.
    pub latency: Family<LatencyLabels, Histogram>,
    // The request path's series, looked up once: a `Family` lookup hashes
    // the labels and takes a lock, which was 1.3% of a review's CPU in the
    // benchmark. They share their values with the families above, and exist
    // (at zero) from the start, so dashboards see them before traffic.
    requests_by: Arc<[[Counter; 3]; 2]>,
    latency_by: Arc<[Histogram; 2]>,
    registry: Arc<Registry>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics")
            .field("injections", &self.injections.get())
            .finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates the metrics with every skip reason pre-registered at zero, so
    /// dashboards see the series before the first skip happens.
    pub fn new() -> Self {
        let requests = Family::<RequestLabels, Counter>::default();
        let injections = Counter::default();
        let skips = Family::<SkipLabels, Counter>::default();
        let policy_rejections = Counter::default();
        let cert_reloads = Family::<ReloadLabels, Counter>::default();
        // 50 µs .. ~1.6 s: admission must answer within the webhook timeout;
        // anything above a second is an incident anyway.
        let latency = Family::<LatencyLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.000_05, 2.0, 16))
        });
        for reason in Skip::ALL {
            let _ = skips.get_or_create(&SkipLabels {
                reason: reason.as_str(),
            });
        }
        let requests_by = Arc::new(Endpoint::ALL.map(|endpoint| {
            Outcome::ALL.map(|outcome| {
                requests
                    .get_or_create(&RequestLabels { endpoint, outcome })
                    .clone()
            })
        }));
        let latency_by = Arc::new(
            Endpoint::ALL
                .map(|endpoint| latency.get_or_create(&LatencyLabels { endpoint }).clone()),
        );
        let mut registry = Registry::with_prefix("counterweight_webhook");
        registry.register(
            "requests",
            "Admission requests by endpoint and outcome",
            requests.clone(),
        );
        registry.register(
            "injections",
            "Pods patched with the init-gate",
            injections.clone(),
        );
        registry.register("skips", "Pods left alone, by reason", skips.clone());
        registry.register(
            "policy_rejections",
            "Policy ConfigMaps refused",
            policy_rejections.clone(),
        );
        registry.register(
            "cert_reloads",
            "Serving certificate reload attempts by result",
            cert_reloads.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Admission handler latency",
            latency.clone(),
        );
        Self {
            requests,
            injections,
            skips,
            policy_rejections,
            cert_reloads,
            latency,
            requests_by,
            latency_by,
            registry: Arc::new(registry),
        }
    }

    /// Counts a skip.
    pub fn skip(&self, reason: Skip) {
        self.skips
            .get_or_create(&SkipLabels {
                reason: reason.as_str(),
            })
            .inc();
    }

    /// Counts a finished request and records its latency.
    pub fn request(&self, endpoint: Endpoint, outcome: Outcome, seconds: f64) {
        self.requests_by[endpoint.index()][outcome.index()].inc();
        self.latency_by[endpoint.index()].observe(seconds);
    }

    /// Counts a certificate reload attempt.
    pub fn cert_reload(&self, ok: bool) {
        let result = if ok { "ok" } else { "error" };
        self.cert_reloads
            .get_or_create(&ReloadLabels { result })
            .inc();
    }

    /// Renders the metrics in the OpenMetrics text format.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_series_exist_at_zero_and_count_into_the_families() {
        let m = Metrics::new();
        let text = m.encode().unwrap();
        for e in Endpoint::ALL {
            for o in Outcome::ALL {
                let series = format!(
                    r#"counterweight_webhook_requests_total{{endpoint="{}",outcome="{}"}} 0"#,
                    e.as_str(),
                    o.as_str()
                );
                assert!(text.contains(&series), "{series} missing in\n{text}");
            }
        }
        m.request(Endpoint::ValidatePolicy, Outcome::Unhandled, 0.001);
        m.request(Endpoint::ValidatePolicy, Outcome::Unhandled, 0.001);
        m.request(Endpoint::Mutate, Outcome::BadRequest, 0.001);
        let text = m.encode().unwrap();
        for series in [
            r#"requests_total{endpoint="validate-policy",outcome="unhandled"} 2"#,
            r#"requests_total{endpoint="mutate",outcome="bad-request"} 1"#,
            r#"requests_total{endpoint="mutate",outcome="answered"} 0"#,
            r#"request_duration_seconds_count{endpoint="validate-policy"} 2"#,
            r#"request_duration_seconds_count{endpoint="mutate"} 1"#,
        ] {
            assert!(text.contains(series), "{series} missing in\n{text}");
        }
    }
}
