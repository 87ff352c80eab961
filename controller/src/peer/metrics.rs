//! Counters of the peer transport, registered in the controller's `/metrics`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

/// Label of per-peer metrics.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabel {
    /// The configured peer name (never a name taken from an unauthenticated
    /// message, so the label set stays bounded).
    pub peer: String,
}

/// Label of rejection and reload metrics.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// Why, from a fixed set of words.
    pub reason: &'static str,
}

/// Counters of the peer transport. [`PeerMetrics::default`] counts without
/// exporting; [`PeerMetrics::register`] also exports.
#[derive(Debug, Clone, Default)]
pub struct PeerMetrics {
    /// Messages a peer accepted (202).
    pub sent: Family<PeerLabel, Counter>,
    /// Messages given up on after the last try.
    pub send_failures: Family<PeerLabel, Counter>,
    /// Detached sends dropped because too many were in flight to that peer.
    pub dropped: Family<PeerLabel, Counter>,
    /// Messages accepted from an authenticated peer into the inbox.
    pub received: Family<PeerLabel, Counter>,
    /// Incoming requests refused, by reason (`tls_handshake`, `tls_timeout`,
    /// `unknown_peer`, `identity_mismatch`, `malformed`, `version`,
    /// `too_large`, `body`, `inbox_full`).
    pub rejected: Family<ReasonLabel, Counter>,
    /// TLS material reloads, by result (`ok`, `error`).
    pub tls_reloads: Family<ReasonLabel, Counter>,
}

impl PeerMetrics {
    /// Creates the counters and registers them in `registry`; pass a
    /// sub-registry, e.g. `registry.sub_registry_with_prefix("peer")`, to get
    /// `counterweight_peer_messages_sent_total` and so on.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register("messages_sent", "Messages a peer accepted", m.sent.clone());
        registry.register(
            "send_failures",
            "Messages given up on after the last try",
            m.send_failures.clone(),
        );
        registry.register(
            "messages_dropped",
            "Messages dropped because too many were in flight to the peer",
            m.dropped.clone(),
        );
        registry.register(
            "messages_received",
            "Messages accepted from authenticated peers",
            m.received.clone(),
        );
        registry.register(
            "messages_rejected",
            "Incoming peer requests refused, by reason",
            m.rejected.clone(),
        );
        registry.register(
            "tls_reloads",
            "Reloads of the peer certificate, key and CA bundle, by result",
            m.tls_reloads.clone(),
        );
        m
    }

    pub(super) fn peer(family: &Family<PeerLabel, Counter>, peer: &str) {
        family
            .get_or_create(&PeerLabel {
                peer: peer.to_owned(),
            })
            .inc();
    }

    pub(super) fn reason(family: &Family<ReasonLabel, Counter>, reason: &'static str) {
        family.get_or_create(&ReasonLabel { reason }).inc();
    }
}
