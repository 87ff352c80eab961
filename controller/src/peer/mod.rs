//! Transport of the peer protocol: HTTPS with mutual TLS between controllers.
//!
//! Every controller both serves and calls. A message is one
//! [`Envelope`](counterweight_core::ha::Envelope) as JSON in a
//! `POST /v1/messages`; the answer is only an acknowledgement (`202`), since
//! replies travel as envelopes of their own. Peers are authenticated twice:
//! the TLS layer checks that the client certificate chains to the configured
//! CA bundle, and the handler checks that the certificate is valid for the DNS
//! name `<from>.peers.counterweight.dev` ([`PeerIdentity`]) of the envelope's
//! sender, who must be in the configured peer list ([`PeerSet`]). The client
//! mirrors this: it connects to whatever host and port `--peer name=url` says
//! but verifies the server's certificate against the *identity* of `name`, so
//! a URL pointing at the wrong controller fails loudly instead of delivering
//! messages to the wrong member.
//!
//! The HA state machine retries on its own and tolerates loss, so this layer
//! keeps retries short (a few tries inside one deadline) and never lets a
//! slow peer block the caller: [`PeerClient::send_detached`] bounds the
//! messages in flight per peer and drops the rest. Each peer gets one HTTP/2
//! connection, reused across messages and thrown away after any timeout or
//! error, because a connection that stalled once (a partition, a dead peer)
//! would otherwise swallow every later message until TCP gives up.
//!
//! Certificates, keys and the CA bundle are files (a mounted Secret);
//! [`PeerTls`] rebuilds both rustls configurations when their bytes change
//! and keeps the last good ones when a rotation is caught half written.
//!
//! The parts, one file each: `tls` (the material), `server` (accepting
//! messages), `client` (sending them), `metrics` (counting both).

mod backoff;
mod client;
mod metrics;
mod server;
mod tls;

pub use client::{ClientOptions, PeerClient};
pub use metrics::{PeerLabel, PeerMetrics, ReasonLabel};
pub use server::{ServerOptions, serve, serve_with};
pub use tls::{PeerTls, TlsPaths};

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use axum::http::StatusCode;
use counterweight_core::ha::ProtocolError;
use http::Uri;
use rustls::client::verify_server_name;
use rustls::server::ParsedCertificate;
use rustls_pki_types::{CertificateDer, ServerName};

/// DNS domain under which every peer's certificate names it:
/// peer `east` presents a certificate valid for `east.peers.counterweight.dev`.
pub const PEER_DOMAIN: &str = "peers.counterweight.dev";

/// Path of the message endpoint.
pub const MESSAGES_PATH: &str = "/v1/messages";

/// Default largest accepted message body; real envelopes are a few hundred
/// bytes, so anything near this is a bug or an attack.
pub const DEFAULT_MAX_BODY_BYTES: usize = 64 * 1024;

/// Everything that can go wrong in the peer transport. Each message says
/// what to check or change.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// A TLS file could not be read.
    #[error(
        "cannot read {path}: {source}; check --tls-cert, --tls-key and --tls-ca and that the Secret is mounted"
    )]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A TLS file did not hold what it should.
    #[error("{path}: {message}")]
    BadPem {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// rustls refused the material (key does not match, CA bundle unusable).
    #[error(
        "cannot build the peer TLS configuration: {0}; check that the key belongs to the certificate and the CA bundle holds CA certificates"
    )]
    Config(String),
    /// A peer name that cannot be part of a DNS name.
    #[error(
        "peer name {name:?} does not make a valid DNS name {name}.{PEER_DOMAIN}: {message}; use lowercase letters, digits and '-'"
    )]
    BadPeerName {
        /// The name.
        name: String,
        /// Why.
        message: String,
    },
    /// A `--peer` argument that does not parse.
    #[error("--peer {arg:?}: {message}; expected name=https://host:port")]
    BadPeerArg {
        /// The argument.
        arg: String,
        /// What is wrong.
        message: String,
    },
    /// A message for a peer without a configured URL.
    #[error("no URL configured for peer {name:?}; add --peer {name}=https://host:port")]
    UnknownPeer {
        /// The addressee.
        name: String,
    },
    /// The message could not be encoded.
    #[error(transparent)]
    Encode(#[from] ProtocolError),
    /// No TCP connection to the peer.
    #[error(
        "cannot connect to peer {peer} at {url}: {source}; is it running, and does the URL point at its peer port?"
    )]
    Connect {
        /// The peer.
        peer: String,
        /// Its URL.
        url: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// TLS failed: one side does not trust the other's certificate.
    #[error(
        "TLS with peer {peer} at {url} failed: {message}; its certificate must chain to our --tls-ca and be valid for {identity}, and ours must chain to its CA bundle"
    )]
    Tls {
        /// The peer.
        peer: String,
        /// Its URL.
        url: String,
        /// The DNS name its certificate must be valid for.
        identity: String,
        /// rustls' description.
        message: String,
    },
    /// A step took longer than allowed.
    #[error(
        "peer {peer} at {url} did not {what} within {after:?}; it may be down or cut off (the HA machine retries on its own)"
    )]
    Timeout {
        /// The peer.
        peer: String,
        /// Its URL.
        url: String,
        /// What did not finish: "connect" or "answer".
        what: &'static str,
        /// The time allowed.
        after: Duration,
    },
    /// The HTTP/2 connection broke.
    #[error("HTTP to peer {peer} at {url} failed: {message}; the next message reconnects")]
    Http {
        /// The peer.
        peer: String,
        /// Its URL.
        url: String,
        /// hyper's description.
        message: String,
    },
    /// The peer answered with an error status.
    #[error("peer {peer} refused the message with {status}: {message}")]
    Rejected {
        /// The peer.
        peer: String,
        /// The HTTP status.
        status: StatusCode,
        /// The peer's explanation.
        message: String,
    },
}

impl PeerError {
    /// Whether another try may succeed: transient network trouble or an
    /// overloaded peer, but not a refused identity or a malformed message.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Connect { .. } | Self::Timeout { .. } | Self::Http { .. } => true,
            Self::Rejected { status, .. } => status.is_server_error(),
            _ => false,
        }
    }
}

/// The identity a peer's certificate must carry: the DNS SAN
/// `<name>.peers.counterweight.dev`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    name: String,
    dns: ServerName<'static>,
}

impl PeerIdentity {
    /// The identity of peer `name`; fails if the name cannot be a DNS label.
    pub fn new(name: &str) -> Result<Self, PeerError> {
        let bad = |message: String| PeerError::BadPeerName {
            name: name.to_owned(),
            message,
        };
        // A dot would let "a.b" claim to be a sub-domain of another name.
        if name.is_empty() || name.contains('.') {
            return Err(bad("must be one non-empty DNS label".into()));
        }
        let dns = ServerName::try_from(format!("{name}.{PEER_DOMAIN}"))
            .map_err(|e| bad(e.to_string()))?;
        if !matches!(dns, ServerName::DnsName(_)) {
            return Err(bad("must be a DNS name, not an address".into()));
        }
        Ok(Self {
            name: name.to_owned(),
            dns,
        })
    }

    /// The peer's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The DNS name its certificate must be valid for.
    pub fn dns_name(&self) -> String {
        format!("{}.{PEER_DOMAIN}", self.name)
    }

    /// The name as rustls checks it.
    pub fn server_name(&self) -> ServerName<'static> {
        self.dns.clone()
    }

    /// Whether a (CA-verified) certificate is valid for this identity.
    fn matches(&self, cert: &ParsedCertificate<'_>) -> bool {
        verify_server_name(cert, &self.dns).is_ok()
    }
}

impl fmt::Display for PeerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.dns_name())
    }
}

/// The peers this controller accepts messages from.
#[derive(Debug, Clone, Default)]
pub struct PeerSet {
    peers: BTreeMap<String, PeerIdentity>,
}

impl PeerSet {
    /// A set of peer names; fails on a name that cannot be an identity.
    pub fn new<I, S>(names: I) -> Result<Self, PeerError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let peers = names
            .into_iter()
            .map(|n| PeerIdentity::new(n.as_ref()).map(|id| (id.name.clone(), id)))
            .collect::<Result<_, _>>()?;
        Ok(Self { peers })
    }

    /// Whether `name` is a configured peer.
    pub fn contains(&self, name: &str) -> bool {
        self.peers.contains_key(name)
    }

    /// The configured names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.peers.keys().map(String::as_str)
    }

    /// The configured peers whose identity the certificate is valid for
    /// (normally exactly one).
    fn matching(&self, cert: Option<&CertificateDer<'_>>) -> Vec<String> {
        let Some(parsed) = cert.and_then(|c| ParsedCertificate::try_from(c).ok()) else {
            return Vec::new();
        };
        self.peers
            .values()
            .filter(|id| id.matches(&parsed))
            .map(|id| id.name.clone())
            .collect()
    }

    fn list(&self) -> String {
        self.names().collect::<Vec<_>>().join(", ")
    }
}

/// A peer's name and URL, as given by `--peer name=https://host:port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerEndpoint {
    /// The peer's name; its certificate must be valid for its [`PeerIdentity`].
    pub name: String,
    /// Base URL of its peer port.
    pub url: Uri,
}

impl FromStr for PeerEndpoint {
    type Err = PeerError;

    fn from_str(arg: &str) -> Result<Self, PeerError> {
        let bad = |message: &str| PeerError::BadPeerArg {
            arg: arg.to_owned(),
            message: message.to_owned(),
        };
        let (name, url) = arg.split_once('=').ok_or_else(|| bad("no '='"))?;
        let name = name.trim();
        PeerIdentity::new(name)?;
        let url: Uri = url
            .trim()
            .parse()
            .map_err(|e: http::uri::InvalidUri| bad(&e.to_string()))?;
        if url.scheme_str() != Some("https") {
            return Err(bad("the URL must start with https://"));
        }
        if url.host().is_none() {
            return Err(bad("the URL has no host"));
        }
        Ok(Self {
            name: name.to_owned(),
            url,
        })
    }
}

/// Parses the `--peer` arguments; fails on a malformed or repeated name.
pub fn parse_peers(args: &[String]) -> Result<Vec<PeerEndpoint>, PeerError> {
    let mut seen = std::collections::BTreeSet::new();
    args.iter()
        .map(|arg| {
            let endpoint: PeerEndpoint = arg.parse()?;
            if !seen.insert(endpoint.name.clone()) {
                return Err(PeerError::BadPeerArg {
                    arg: arg.clone(),
                    message: format!("peer {} is given twice", endpoint.name),
                });
            }
            Ok(endpoint)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_is_the_name_under_the_peer_domain() {
        let id = PeerIdentity::new("east").unwrap();
        assert_eq!(id.dns_name(), "east.peers.counterweight.dev");
        assert_eq!(id.to_string(), "east.peers.counterweight.dev");
        for bad in ["", "a.b", "bad name", "127.0.0.1"] {
            assert!(PeerIdentity::new(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn only_transient_errors_are_retried() {
        let rejected = |status| PeerError::Rejected {
            peer: "p".into(),
            status,
            message: String::new(),
        };
        assert!(rejected(StatusCode::SERVICE_UNAVAILABLE).is_retryable());
        assert!(!rejected(StatusCode::FORBIDDEN).is_retryable());
        assert!(!PeerError::UnknownPeer { name: "x".into() }.is_retryable());
    }
}
