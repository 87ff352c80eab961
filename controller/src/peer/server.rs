//! The peer server: accepts `POST /v1/messages` over mutual TLS, checks the
//! sender's certificate against the envelope, and hands envelopes to the HA
//! loop.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Extension, Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use counterweight_core::ha::{Envelope, ProtocolError};
use counterweight_runtime::tls_server::{self, AcceptOptions, Refused, TlsService};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use super::{DEFAULT_MAX_BODY_BYTES, MESSAGES_PATH, PEER_DOMAIN, PeerMetrics, PeerSet, PeerTls};

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
    tracing::info!(
        addr = ?listener.local_addr().ok(),
        peers = %state.peers.list(),
        "peer server listening"
    );
    let service = Arc::new(PeerService { tls, state, router });
    let accept = AcceptOptions {
        handshake_timeout: options.handshake_timeout,
        drain_timeout: options.drain_timeout,
        max_connections: Some(options.max_connections),
    };
    if !tls_server::serve(listener, service, builder, accept, shutdown).await {
        tracing::debug!(timeout = ?options.drain_timeout, "peer connections still open after the drain timeout");
    }
}

/// The peer protocol as the shared accept loop serves it: the TLS material
/// in force at each handshake, and the routes with the client's identity
/// (the peer names its certificate matches) attached.
struct PeerService {
    tls: Arc<PeerTls>,
    state: Arc<ServerState>,
    router: Router,
}

impl TlsService for PeerService {
    fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.tls.server_config())
    }

    fn router(&self, tls: &TlsStream<TcpStream>, remote: SocketAddr) -> Router {
        let names = self
            .state
            .peers
            .matching(tls.get_ref().1.peer_certificates().and_then(|c| c.first()));
        let client = Arc::new(ClientIdentity { remote, names });
        tracing::debug!(%remote, peers = ?client.names, "peer connection");
        self.router.clone().layer(Extension(client))
    }

    fn refused(&self, remote: SocketAddr, why: Refused) {
        match why {
            // Wrong CA, no client certificate, or not TLS at all.
            Refused::Handshake(e) => {
                tracing::info!(%remote, error = %e, "peer TLS handshake refused");
                PeerMetrics::reason(&self.state.metrics.rejected, "tls_handshake");
            }
            Refused::HandshakeTimeout => {
                tracing::info!(%remote, "peer TLS handshake timed out");
                PeerMetrics::reason(&self.state.metrics.rejected, "tls_timeout");
            }
            Refused::TooManyConnections => {
                tracing::warn!(%remote, "too many peer connections; closing the new one");
            }
        }
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
