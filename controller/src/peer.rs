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

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::{Extension, Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use bytes::Bytes;
use counterweight_core::ha::{Envelope, ProtocolError};
use counterweight_reload::{ReadError, Reload, Watched};
use http::Uri;
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use rustls::client::verify_server_name;
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio::time::Instant;
use tokio_rustls::{TlsAcceptor, TlsConnector};

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

    fn peer(family: &Family<PeerLabel, Counter>, peer: &str) {
        family
            .get_or_create(&PeerLabel {
                peer: peer.to_owned(),
            })
            .inc();
    }

    fn reason(family: &Family<ReasonLabel, Counter>, reason: &'static str) {
        family.get_or_create(&ReasonLabel { reason }).inc();
    }
}

/// Where the TLS material lives: PEM files, as mounted from a Secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsPaths {
    /// Certificate chain this controller presents (leaf first).
    pub cert: PathBuf,
    /// Private key of the leaf.
    pub key: PathBuf,
    /// CA bundle peer certificates must chain to.
    pub ca: PathBuf,
}

struct TlsConfigs {
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
}

impl From<ReadError> for PeerError {
    fn from(e: ReadError) -> Self {
        PeerError::Read {
            path: e.path,
            source: e.source,
        }
    }
}

/// Server and client TLS configurations built from [`TlsPaths`], rebuilt
/// when the files change ([`counterweight_reload::Watched`] follows them and
/// keeps the last good set). Every new connection takes the current ones, so
/// a rotation applies without a restart. [`PeerClient`] replaces its open
/// connections on the next message after a reload; connections accepted by
/// the server keep the configuration they started with until the client
/// closes them.
pub struct PeerTls {
    configs: Arc<Watched<TlsConfigs, PeerError>>,
    metrics: PeerMetrics,
}

impl fmt::Debug for PeerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeerTls")
            .field("configs", &self.configs)
            .finish_non_exhaustive()
    }
}

impl PeerTls {
    /// Loads the files; fails if they are missing or unusable, because a
    /// controller that cannot authenticate its peers must not start.
    pub fn load(paths: TlsPaths, metrics: PeerMetrics) -> Result<Arc<Self>, PeerError> {
        let files = vec![paths.cert.clone(), paths.key.clone(), paths.ca.clone()];
        let configs = Watched::load(files, move |pems| match pems {
            [cert, key, ca] => build_configs(&paths, cert, key, ca),
            // `Watched` hands over one buffer per path, and there are three.
            _ => Err(PeerError::Config(
                "expected certificate, key and CA files".into(),
            )),
        })?;
        Ok(Arc::new(Self {
            configs: Arc::new(configs),
            metrics,
        }))
    }

    /// The configuration for accepting peer connections (client
    /// certificates required and verified against the CA bundle).
    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.configs.current().server.clone()
    }

    /// The configuration for calling peers (presents our certificate,
    /// trusts only the CA bundle).
    pub fn client_config(&self) -> Arc<ClientConfig> {
        self.configs.current().client.clone()
    }

    /// How many times the material was reloaded since [`PeerTls::load`]. A
    /// client connection made with an older generation is replaced, so a
    /// rotated client certificate or CA bundle applies to peers already
    /// connected. Read it *before* the configuration it goes with: the
    /// configuration is swapped first, so that one is at least as new.
    pub fn generation(&self) -> u64 {
        self.configs.swaps()
    }

    /// Reads the files once and swaps in new configurations if they changed
    /// and are good. Returns whether anything was swapped. Blocks on file
    /// I/O: call it from a blocking context, as [`PeerTls::watch`] does.
    pub fn reload_if_changed(&self) -> bool {
        self.report(self.configs.reload_if_changed())
    }

    /// Logs and counts one poll's outcome; whether anything was swapped.
    fn report(&self, outcome: Reload<PeerError>) -> bool {
        match outcome {
            Reload::Unchanged => false,
            Reload::Unreadable(e) => {
                // Missing for an instant during kubelet's symlink swap is
                // normal; the next poll sees the new files.
                tracing::debug!(error = %e, "peer TLS files unreadable; keeping the current ones");
                false
            }
            Reload::Swapped => {
                PeerMetrics::reason(&self.metrics.tls_reloads, "ok");
                tracing::info!(cert = %self.configs.path().display(), "peer TLS material reloaded");
                true
            }
            Reload::Rejected(e) => {
                PeerMetrics::reason(&self.metrics.tls_reloads, "error");
                tracing::warn!(error = %e, "new peer TLS material is unusable; keeping the last good one");
                false
            }
        }
    }

    /// Polls the files every `interval` until `shutdown` resolves.
    pub async fn watch(self: Arc<Self>, interval: Duration, shutdown: impl Future<Output = ()>) {
        let configs = self.configs.clone();
        configs
            .watch(interval, shutdown, |outcome| {
                self.report(outcome);
            })
            .await;
    }
}

fn build_configs(
    paths: &TlsPaths,
    cert_pem: &[u8],
    key_pem: &[u8],
    ca_pem: &[u8],
) -> Result<TlsConfigs, PeerError> {
    let bad = |path: &Path, message: String| PeerError::BadPem {
        path: path.to_owned(),
        message,
    };
    let certs = |pem: &[u8], path: &Path| -> Result<Vec<CertificateDer<'static>>, PeerError> {
        let certs: Vec<_> = CertificateDer::pem_slice_iter(pem)
            .collect::<Result<_, _>>()
            .map_err(|e| bad(path, e.to_string()))?;
        if certs.is_empty() {
            return Err(bad(path, "no CERTIFICATE block".into()));
        }
        Ok(certs)
    };
    let chain = certs(cert_pem, &paths.cert)?;
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| bad(&paths.key, e.to_string()))?;
    let mut roots = RootCertStore::empty();
    for ca in certs(ca_pem, &paths.ca)? {
        roots
            .add(ca)
            .map_err(|e| bad(&paths.ca, format!("not a usable CA certificate: {e}")))?;
    }
    let roots = Arc::new(roots);
    // Explicit provider: the configuration does not depend on which one the
    // process installed, and tests need not install one.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config_err = |e: rustls::Error| PeerError::Config(e.to_string());

    let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
        .build()
        .map_err(|e| PeerError::Config(e.to_string()))?;
    let mut server = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(config_err)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain.clone(), key.clone_key())
        .map_err(|e| {
            bad(
                &paths.key,
                format!(
                    "does not fit {}: {e} (a rotation half written?)",
                    paths.cert.display()
                ),
            )
        })?;
    // HTTP/1.1 too, so that curl with a client certificate can debug a peer.
    server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];

    let mut client = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(config_err)?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(|e| bad(&paths.key, e.to_string()))?;
    client.alpn_protocols = vec![b"h2".to_vec()];
    Ok(TlsConfigs {
        server: Arc::new(server),
        client: Arc::new(client),
    })
}

/// Settings of the peer server.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Largest message body; larger ones get 413.
    pub max_body_bytes: usize,
    /// Time allowed for a TLS handshake.
    pub handshake_timeout: Duration,
    /// Time allowed to receive one message body.
    pub body_timeout: Duration,
    /// Time open connections get to finish at shutdown.
    pub drain_timeout: Duration,
    /// Most connections open at once; more are closed at accept.
    pub max_connections: usize,
    /// Counters.
    pub metrics: PeerMetrics,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            handshake_timeout: Duration::from_secs(2),
            body_timeout: Duration::from_secs(2),
            drain_timeout: Duration::from_secs(1),
            max_connections: 256,
            metrics: PeerMetrics::default(),
        }
    }
}

struct ServerState {
    peers: PeerSet,
    inbox: mpsc::Sender<Envelope>,
    max_body_bytes: usize,
    body_timeout: Duration,
    metrics: PeerMetrics,
}

/// Who is on the other end of one connection, per its verified certificate.
#[derive(Debug)]
struct ClientIdentity {
    remote: SocketAddr,
    /// Configured peers the certificate is valid for.
    names: Vec<String>,
}

/// Serves the peer protocol on `listener` with [`ServerOptions::default`]
/// until `shutdown` resolves. See [`serve_with`].
pub async fn serve(
    listener: TcpListener,
    tls: Arc<PeerTls>,
    peers: PeerSet,
    inbox: mpsc::Sender<Envelope>,
    shutdown: impl Future<Output = ()>,
) {
    serve_with(
        listener,
        tls,
        peers,
        inbox,
        ServerOptions::default(),
        shutdown,
    )
    .await;
}

/// Serves the peer protocol on `listener` until `shutdown` resolves, then
/// drains open connections for [`ServerOptions::drain_timeout`].
///
/// Accepted envelopes are pushed to `inbox` without waiting: when it is full
/// the sender gets 503 and may retry, which keeps a slow HA loop from
/// stalling the connections. The TLS material is taken from `tls` per
/// connection; run [`PeerTls::watch`] next to this to pick up rotations.
pub async fn serve_with(
    listener: TcpListener,
    tls: Arc<PeerTls>,
    peers: PeerSet,
    inbox: mpsc::Sender<Envelope>,
    options: ServerOptions,
    shutdown: impl Future<Output = ()>,
) {
    let state = Arc::new(ServerState {
        peers,
        inbox,
        max_body_bytes: options.max_body_bytes,
        body_timeout: options.body_timeout,
        metrics: options.metrics.clone(),
    });
    let router = Router::new()
        .route(MESSAGES_PATH, post(receive))
        .with_state(state.clone());
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // Pings find dead clients (a partition holds their sockets open
    // forever otherwise); the header timeout bounds slow HTTP/1.1 clients.
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(5));
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(options.body_timeout);
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(options.max_connections));
    tracing::info!(
        addr = ?listener.local_addr().ok(),
        peers = %state.peers.list(),
        "peer server listening"
    );
    tokio::pin!(shutdown);
    loop {
        let (tcp, remote) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off briefly
                    // instead of spinning, then keep serving.
                    tracing::warn!(error = %e, "peer accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!(%remote, max = options.max_connections, "too many peer connections; closing the new one");
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = TlsAcceptor::from(tls.server_config());
        let state = state.clone();
        let router = router.clone();
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let handshake_timeout = options.handshake_timeout;
        tokio::spawn(async move {
            let _slot = slot;
            let stream = match tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    // Wrong CA, no client certificate, or not TLS at all.
                    tracing::info!(%remote, error = %e, "peer TLS handshake refused");
                    PeerMetrics::reason(&state.metrics.rejected, "tls_handshake");
                    return;
                }
                Err(_) => {
                    tracing::info!(%remote, "peer TLS handshake timed out");
                    PeerMetrics::reason(&state.metrics.rejected, "tls_timeout");
                    return;
                }
            };
            let names = state.peers.matching(
                stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first()),
            );
            let client = Arc::new(ClientIdentity { remote, names });
            tracing::debug!(%remote, peers = ?client.names, "peer connection");
            let service = TowerToHyperService::new(router.layer(Extension(client)));
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            if let Err(e) = watcher.watch(conn.into_owned()).await {
                tracing::debug!(%remote, error = %e, "peer connection ended with an error");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(options.drain_timeout, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::debug!(timeout = ?options.drain_timeout, "peer connections still open after the drain timeout");
    }
}

async fn receive(
    State(state): State<Arc<ServerState>>,
    Extension(client): Extension<Arc<ClientIdentity>>,
    request: Request,
) -> Response {
    let span = tracing::info_span!(
        "peer_message",
        remote = %client.remote,
        peer = tracing::field::Empty,
        epoch = tracing::field::Empty,
    );
    let reject = |status: StatusCode, reason: &'static str, message: String| {
        PeerMetrics::reason(&state.metrics.rejected, reason);
        span.in_scope(|| tracing::info!(%status, %message, "peer message refused"));
        (status, message).into_response()
    };
    // Authenticate before reading anything: a certificate for none of the
    // configured peers gets nothing parsed.
    if client.names.is_empty() {
        return reject(
            StatusCode::FORBIDDEN,
            "unknown_peer",
            format!(
                "unknown peer: the client certificate is valid for none of the configured peers ({}); \
                 issue it with the SAN <name>.{PEER_DOMAIN} of a configured peer",
                state.peers.list()
            ),
        );
    }
    let too_large = || {
        format!(
            "peer message larger than {} bytes; envelopes are small, check the sender",
            state.max_body_bytes
        )
    };
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > state.max_body_bytes as u64) {
        return reject(StatusCode::PAYLOAD_TOO_LARGE, "too_large", too_large());
    }
    let body = axum::body::to_bytes(request.into_body(), state.max_body_bytes);
    let bytes = match tokio::time::timeout(state.body_timeout, body).await {
        Ok(Ok(b)) => b,
        Ok(Err(e)) => {
            let inner = e.into_inner();
            if inner
                .downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                return reject(StatusCode::PAYLOAD_TOO_LARGE, "too_large", too_large());
            }
            return reject(
                StatusCode::BAD_REQUEST,
                "body",
                format!("cannot read the message body: {inner}"),
            );
        }
        Err(_) => {
            return reject(
                StatusCode::REQUEST_TIMEOUT,
                "body",
                format!("message body not received within {:?}", state.body_timeout),
            );
        }
    };
    let env = match Envelope::from_json(&bytes) {
        Ok(env) => env,
        Err(e @ ProtocolError::Version { .. }) => {
            return reject(StatusCode::BAD_REQUEST, "version", e.to_string());
        }
        Err(e) => return reject(StatusCode::BAD_REQUEST, "malformed", e.to_string()),
    };
    span.record("peer", env.from.as_str());
    span.record("epoch", env.epoch);
    if !state.peers.contains(&env.from) {
        return reject(
            StatusCode::FORBIDDEN,
            "unknown_peer",
            format!(
                "unknown peer {:?}: not in the configured peer list ({})",
                env.from,
                state.peers.list()
            ),
        );
    }
    if !client.names.contains(&env.from) {
        return reject(
            StatusCode::FORBIDDEN,
            "identity_mismatch",
            format!(
                "identity mismatch: the message says it is from {:?} but the client certificate is for {}",
                env.from,
                client.names.join(", ")
            ),
        );
    }
    let from = env.from.clone();
    match state.inbox.try_send(env) {
        Ok(()) => {
            PeerMetrics::peer(&state.metrics.received, &from);
            span.in_scope(|| tracing::debug!("peer message accepted"));
            StatusCode::ACCEPTED.into_response()
        }
        Err(mpsc::error::TrySendError::Full(_)) => reject(
            StatusCode::SERVICE_UNAVAILABLE,
            "inbox_full",
            "the HA loop is behind; try again shortly".into(),
        ),
        Err(mpsc::error::TrySendError::Closed(_)) => reject(
            StatusCode::SERVICE_UNAVAILABLE,
            "inbox_full",
            "this controller is shutting down".into(),
        ),
    }
}

/// Settings of the peer client.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Time allowed for TCP connect plus TLS and HTTP/2 handshakes.
    pub connect_timeout: Duration,
    /// Time allowed for one request, from sending to the status.
    pub request_timeout: Duration,
    /// Time allowed for one [`PeerClient::send`] in all, retries included.
    /// Keep it below the HA probe interval: a late message is a lost one.
    pub deadline: Duration,
    /// Most tries per message.
    pub attempts: u32,
    /// Wait before the second try; doubled for each further one, and half of
    /// it randomized so that two controllers do not retry in lockstep.
    pub backoff: Duration,
    /// Most detached sends in flight per peer; more are dropped.
    pub max_in_flight: usize,
    /// HTTP/2 ping interval on idle connections; a connection whose ping is
    /// not answered within the same time is closed.
    pub keep_alive: Duration,
    /// Counters.
    pub metrics: PeerMetrics,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(1),
            request_timeout: Duration::from_secs(1),
            deadline: Duration::from_millis(900),
            attempts: 3,
            backoff: Duration::from_millis(25),
            max_in_flight: 8,
            keep_alive: Duration::from_secs(5),
            metrics: PeerMetrics::default(),
        }
    }
}

/// Aborts a task when dropped, so connection tasks end with their owner.
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// One HTTP/2 connection to a peer.
struct Conn {
    generation: u64,
    /// [`PeerTls::generation`] of the material it was made with.
    tls_generation: u64,
    sender: http2::SendRequest<Full<Bytes>>,
    _task: AbortOnDrop,
}

/// Everything about one peer on the calling side.
struct Link {
    identity: PeerIdentity,
    url: String,
    host: String,
    port: u16,
    messages_uri: Uri,
    conn: tokio::sync::Mutex<Option<Conn>>,
    generations: AtomicU64,
    in_flight: Arc<Semaphore>,
    /// Whether the last send succeeded, to log changes rather than every
    /// failure during a partition.
    reachable: AtomicBool,
}

impl Link {
    fn new(endpoint: &PeerEndpoint, max_in_flight: usize) -> Result<Self, PeerError> {
        let identity = PeerIdentity::new(&endpoint.name)?;
        let bad = |message: &str| PeerError::BadPeerArg {
            arg: format!("{}={}", endpoint.name, endpoint.url),
            message: message.to_owned(),
        };
        let authority = endpoint
            .url
            .authority()
            .ok_or_else(|| bad("the URL has no host"))?;
        // `host()` keeps IPv6 brackets, which the resolver does not take.
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = authority.port_u16().unwrap_or(443);
        let base = endpoint.url.path().trim_end_matches('/');
        let messages_uri = format!("https://{authority}{base}{MESSAGES_PATH}")
            .parse()
            .map_err(|e: http::uri::InvalidUri| bad(&e.to_string()))?;
        Ok(Self {
            identity,
            url: endpoint.url.to_string(),
            host,
            port,
            messages_uri,
            conn: tokio::sync::Mutex::new(None),
            generations: AtomicU64::new(0),
            in_flight: Arc::new(Semaphore::new(max_in_flight)),
            reachable: AtomicBool::new(true),
        })
    }

    fn name(&self) -> &str {
        self.identity.name()
    }

    /// The current connection, or a new one. The lock is held while
    /// connecting so that concurrent sends share one connection attempt.
    async fn connection(
        &self,
        tls: &PeerTls,
        options: &ClientOptions,
    ) -> Result<(u64, http2::SendRequest<Full<Bytes>>), PeerError> {
        let mut slot = self.conn.lock().await;
        if let Some(conn) = slot.as_ref()
            && !conn.sender.is_closed()
            && conn.tls_generation == tls.generation()
        {
            return Ok((conn.generation, conn.sender.clone()));
        }
        *slot = None;
        let conn = self.connect(tls, options).await?;
        let out = (conn.generation, conn.sender.clone());
        *slot = Some(conn);
        Ok(out)
    }

    async fn connect(&self, tls: &PeerTls, options: &ClientOptions) -> Result<Conn, PeerError> {
        let tcp = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|source| PeerError::Connect {
                peer: self.name().to_owned(),
                url: self.url.clone(),
                source,
            })?;
        let _ = tcp.set_nodelay(true);
        let tls_generation = tls.generation();
        let client_config = tls.client_config();
        // The TCP target is the URL, but the certificate must name the
        // peer's identity: a URL pointing at the wrong member fails here.
        let stream = TlsConnector::from(client_config)
            .connect(self.identity.server_name(), tcp)
            .await
            .map_err(|e| self.handshake_error(e))?;
        let (sender, connection) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(options.keep_alive)
            .keep_alive_timeout(options.keep_alive)
            .keep_alive_while_idle(true)
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| self.http_error(&e))?;
        let peer = self.name().to_owned();
        let task = tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(%peer, error = %e, "peer connection closed");
            }
        });
        Ok(Conn {
            generation: self.generations.fetch_add(1, Ordering::Relaxed),
            tls_generation,
            sender,
            _task: AbortOnDrop(task.abort_handle()),
        })
    }

    /// Forgets connection `generation` (if still current) and closes it.
    async fn evict(&self, generation: u64) {
        let mut slot = self.conn.lock().await;
        if slot.as_ref().is_some_and(|c| c.generation == generation) {
            *slot = None;
        }
    }

    fn tls_error(&self, message: String) -> PeerError {
        PeerError::Tls {
            peer: self.name().to_owned(),
            url: self.url.clone(),
            identity: self.identity.dns_name(),
            message,
        }
    }

    /// A failed TLS handshake: refused certificates are TLS errors, a reset
    /// or EOF in the middle is the network's.
    fn handshake_error(&self, e: std::io::Error) -> PeerError {
        match e
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            Some(tls) => self.tls_error(tls.to_string()),
            None => PeerError::Connect {
                peer: self.name().to_owned(),
                url: self.url.clone(),
                source: e,
            },
        }
    }

    /// Classifies a hyper error: a TLS alert (the peer refused our
    /// certificate after the handshake, as TLS 1.3 does) or a broken link.
    fn http_error(&self, e: &hyper::Error) -> PeerError {
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
        while let Some(err) = source {
            // h2 keeps only the kind and text of the I/O error under it; TLS
            // errors are the InvalidData ones (tokio-rustls' mapping).
            let io = err
                .downcast_ref::<std::io::Error>()
                .or_else(|| err.downcast_ref::<h2::Error>().and_then(h2::Error::get_io));
            if let Some(io) = io
                && io.kind() == std::io::ErrorKind::InvalidData
            {
                return self.tls_error(io.to_string());
            }
            source = err.source();
        }
        PeerError::Http {
            peer: self.name().to_owned(),
            url: self.url.clone(),
            message: e.to_string(),
        }
    }

    /// One try: connect if needed, POST, read the status.
    async fn attempt(
        &self,
        tls: &PeerTls,
        options: &ClientOptions,
        body: Bytes,
        budget: Duration,
    ) -> Result<(), PeerError> {
        let timeout = |what: &'static str, after: Duration| PeerError::Timeout {
            peer: self.name().to_owned(),
            url: self.url.clone(),
            what,
            after,
        };
        let started = Instant::now();
        let connect_for = options.connect_timeout.min(budget);
        let (generation, mut sender) =
            tokio::time::timeout(connect_for, self.connection(tls, options))
                .await
                .map_err(|_| timeout("connect", connect_for))??;
        let request = http::Request::post(self.messages_uri.clone())
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(body))
            .map_err(|e| PeerError::Http {
                peer: self.name().to_owned(),
                url: self.url.clone(),
                message: e.to_string(),
            })?;
        let exchange = async {
            sender.ready().await?;
            let response = sender.send_request(request).await?;
            let status = response.status();
            // The explanation of a refusal is short; do not let a confused
            // server make us buffer more.
            let text = match Limited::new(response.into_body(), 4096).collect().await {
                Ok(b) => String::from_utf8_lossy(&b.to_bytes()).into_owned(),
                Err(_) => String::new(),
            };
            Ok::<_, hyper::Error>((status, text))
        };
        let request_for = options
            .request_timeout
            .min(budget.saturating_sub(started.elapsed()));
        match tokio::time::timeout(request_for, exchange).await {
            Ok(Ok((status, _))) if status.is_success() => Ok(()),
            Ok(Ok((status, message))) => Err(PeerError::Rejected {
                peer: self.name().to_owned(),
                status,
                message,
            }),
            Ok(Err(e)) => {
                self.evict(generation).await;
                Err(self.http_error(&e))
            }
            Err(_) => {
                // A stalled connection stays stalled: start afresh next time.
                self.evict(generation).await;
                Err(timeout("answer", request_for))
            }
        }
    }
}

struct ClientInner {
    links: BTreeMap<String, Link>,
    tls: Arc<PeerTls>,
    options: ClientOptions,
}

/// Sends envelopes to peers over mutual TLS. Cheap to clone; clones share
/// connections and limits. Connections close when the last clone and the
/// last detached send are gone.
#[derive(Clone)]
pub struct PeerClient {
    inner: Arc<ClientInner>,
}

impl fmt::Debug for PeerClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeerClient")
            .field("peers", &self.inner.links.keys().collect::<Vec<_>>())
            .field("options", &self.inner.options)
            .finish_non_exhaustive()
    }
}

impl PeerClient {
    /// A client for `endpoints`, presenting and trusting what `tls` holds.
    pub fn new(
        endpoints: impl IntoIterator<Item = PeerEndpoint>,
        tls: Arc<PeerTls>,
        options: ClientOptions,
    ) -> Result<Self, PeerError> {
        let links = endpoints
            .into_iter()
            .map(|e| Link::new(&e, options.max_in_flight).map(|l| (e.name, l)))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            inner: Arc::new(ClientInner {
                links,
                tls,
                options,
            }),
        })
    }

    /// Sends `env` to the peer named `env.to` and waits until it accepted
    /// the message (202), retrying transient failures with backoff within
    /// [`ClientOptions::deadline`].
    pub async fn send(&self, env: &Envelope) -> Result<(), PeerError> {
        let inner = &*self.inner;
        let link = inner
            .links
            .get(&env.to)
            .ok_or_else(|| PeerError::UnknownPeer {
                name: env.to.clone(),
            })?;
        let body = Bytes::from(env.to_json()?);
        let options = &inner.options;
        let deadline = Instant::now() + options.deadline;
        let mut attempt = 1;
        let result = loop {
            let budget = deadline.saturating_duration_since(Instant::now());
            let result = link
                .attempt(&inner.tls, options, body.clone(), budget)
                .await;
            match result {
                Err(e) if e.is_retryable() && attempt < options.attempts => {
                    let wait = backoff(options.backoff, attempt);
                    if Instant::now() + wait >= deadline {
                        break Err(e);
                    }
                    tracing::debug!(peer = %env.to, attempt, error = %e, ?wait, "peer send failed; retrying");
                    tokio::time::sleep(wait).await;
                    attempt += 1;
                }
                other => break other,
            }
        };
        match &result {
            Ok(()) => {
                PeerMetrics::peer(&options.metrics.sent, &env.to);
                if !link.reachable.swap(true, Ordering::Relaxed) {
                    tracing::info!(peer = %env.to, "peer reachable again");
                }
            }
            Err(e) => {
                PeerMetrics::peer(&options.metrics.send_failures, &env.to);
                if link.reachable.swap(false, Ordering::Relaxed) {
                    tracing::warn!(peer = %env.to, error = %e, "peer unreachable");
                } else {
                    tracing::debug!(peer = %env.to, error = %e, "peer send failed");
                }
            }
        }
        result
    }

    /// Sends `env` in a background task and returns at once. Returns false
    /// when the message was dropped instead: no such peer, or already
    /// [`ClientOptions::max_in_flight`] messages under way to it (a slow or
    /// cut-off peer). Loss is fine for the protocol, blocking the HA loop is
    /// not. Must be called inside a Tokio runtime.
    pub fn send_detached(&self, env: Envelope) -> bool {
        let Some(link) = self.inner.links.get(&env.to) else {
            tracing::warn!(peer = %env.to, "no URL configured for peer; message dropped");
            return false;
        };
        let Ok(permit) = link.in_flight.clone().try_acquire_owned() else {
            PeerMetrics::peer(&self.inner.options.metrics.dropped, &env.to);
            tracing::debug!(peer = %env.to, "too many messages in flight to peer; dropped");
            return false;
        };
        let client = self.clone();
        tokio::spawn(async move {
            let _permit = permit;
            // Failures are counted and logged by `send`.
            let _ = client.send(&env).await;
        });
        true
    }

    /// The peers this client can reach, sorted.
    pub fn peers(&self) -> impl Iterator<Item = &str> {
        self.inner.links.keys().map(String::as_str)
    }
}

/// Exponential backoff for try `attempt` (1-based): `base · 2^(attempt-1)`,
/// the upper half of it random.
fn backoff(base: Duration, attempt: u32) -> Duration {
    let full = base.saturating_mul(1 << attempt.saturating_sub(1).min(16));
    full / 2 + jitter(full / 2)
}

/// A random duration in `[0, max]`. Std's per-instance random hash keys are
/// plenty for spreading retries, and need no extra dependency.
fn jitter(max: Duration) -> Duration {
    use std::hash::BuildHasher;
    let r = std::collections::hash_map::RandomState::new().hash_one(0u8);
    max.mul_f64(r as f64 / u64::MAX as f64)
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
    fn peer_args_parse_and_name_the_problem() {
        let peers = parse_peers(&[
            "west=https://127.0.0.1:9443".into(),
            "north=https://north.example:8443/base/".into(),
        ])
        .unwrap();
        assert_eq!(peers[0].name, "west");
        let link = Link::new(&peers[1], 1).unwrap();
        assert_eq!(
            link.messages_uri.to_string(),
            "https://north.example:8443/base/v1/messages"
        );
        assert_eq!((link.host.as_str(), link.port), ("north.example", 8443));
        let v6 = Link::new(&"v=https://[::1]:1".parse().unwrap(), 1).unwrap();
        assert_eq!(v6.host, "::1");

        for (arg, needle) in [
            ("west", "no '='"),
            ("west=http://127.0.0.1:1", "https://"),
            ("we.st=https://127.0.0.1:1", "DNS"),
        ] {
            let e = parse_peers(&[arg.into()]).unwrap_err().to_string();
            assert!(e.contains(needle), "{arg}: {e}");
        }
        let e = parse_peers(&["a=https://h:1".into(), "a=https://h:2".into()]).unwrap_err();
        assert!(e.to_string().contains("twice"), "{e}");
    }

    #[test]
    fn backoff_grows_and_stays_within_bounds() {
        let base = Duration::from_millis(20);
        for attempt in 1..=4 {
            let full = base * (1 << (attempt - 1));
            for _ in 0..50 {
                let b = backoff(base, attempt);
                assert!(b >= full / 2 && b <= full, "{attempt}: {b:?}");
            }
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
