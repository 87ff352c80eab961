//! The two HTTP servers: admission over TLS, operations over plain HTTP.
//!
//! This module owns sockets, routes and the server lifecycle. The admission
//! server accepts on a caller-supplied listener, terminates TLS with the
//! certificate the [`CertStore`] holds at handshake time, and serves
//! [`MUTATE_PATH`] and [`VALIDATE_POLICY_PATH`] through the [`Handler`]. The
//! operations server serves `/healthz`, `/readyz` and `/metrics` on a second
//! listener without TLS, so kubelet probes and Prometheus need no
//! certificates. Both stop when the shutdown future resolves: readiness turns
//! false first, no new connection is accepted, and in-flight requests get
//! [`ServeOptions::drain_timeout`] to finish.
//!
//! Memory is bounded by what the admission server holds, not by how many
//! clients call it: [`BodyLimits`] admits a request only when its body fits
//! in a budget (small reviews and large bodies apart), and refuses with 503
//! after a short wait otherwise.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use counterweight_runtime::tls_server::{self, AcceptOptions, TlsService};
use http::{StatusCode, header};
use hyper_util::rt::TokioExecutor;
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::net::TcpStream;
use tokio::sync::{Semaphore, watch};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use crate::Error;
use crate::admission::{Handler, Reply};
use crate::metrics::{Endpoint, Metrics};
use crate::tls::CertStore;

/// Path of the mutating pod endpoint.
pub const MUTATE_PATH: &str = "/mutate-pods";
/// Path of the validating policy endpoint.
pub const VALIDATE_POLICY_PATH: &str = "/validate-policy";

/// Tunables of the servers.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Largest accepted request body; bigger bodies get HTTP 413. The API
    /// server's own limit on objects is 3 MiB, and a review carries at most
    /// two objects.
    pub max_body_bytes: usize,
    /// How often the certificate files are checked for changes.
    pub cert_poll: Duration,
    /// How long in-flight requests may take to finish after shutdown starts.
    pub drain_timeout: Duration,
    /// How long a client may take to complete the TLS handshake.
    pub handshake_timeout: Duration,
    /// Bytes of large request bodies (above [`SMALL_BODY_BYTES`]) held at
    /// once; a large request waits for room, up to [`ServeOptions::queue_wait`].
    /// Must be at least `max_body_bytes`.
    pub inflight_bytes: usize,
    /// Small requests (ordinary pod reviews) held at once, each counted as
    /// [`SMALL_BODY_BYTES`]; they never queue behind large ones.
    pub small_requests: usize,
    /// How long a request waits for room before it is answered 503.
    pub queue_wait: Duration,
}

/// A body up to this size is "small": a pod review is typically 3–20 KB.
pub const SMALL_BODY_BYTES: usize = 64 * 1024;

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            max_body_bytes: 7 * 1024 * 1024,
            cert_poll: Duration::from_secs(2),
            drain_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(10),
            // One largest body and change: with the small requests' 8 MiB,
            // at most 16 MiB of bodies in memory (see README.md, "Resource
            // bounds").
            inflight_bytes: 8 * 1024 * 1024,
            small_requests: 128,
            queue_wait: Duration::from_secs(2),
        }
    }
}

/// The bounds on request bodies held at once: two pools, so that ordinary
/// reviews never wait behind large ones (tokio's semaphore is fair, and a
/// queued large request would otherwise hold up every small one after it).
#[derive(Debug, Clone)]
pub struct BodyLimits {
    max_body: usize,
    /// Permits of 1 KiB for large bodies.
    large: Arc<Semaphore>,
    /// One permit per small request.
    small: Arc<Semaphore>,
    wait: Duration,
}

impl BodyLimits {
    /// The limits `options` describe; refused if one largest body could
    /// never fit.
    pub fn new(options: &ServeOptions) -> Result<Self, Error> {
        if options.inflight_bytes < options.max_body_bytes {
            return Err(Error::Serve(format!(
                "the in-flight budget ({} bytes) is smaller than the largest body ({} bytes): \
                 raise --max-inflight-bytes or lower --max-body-bytes",
                options.inflight_bytes, options.max_body_bytes
            )));
        }
        let kib = u32::try_from(options.inflight_bytes.div_ceil(1024)).unwrap_or(u32::MAX);
        Ok(Self {
            max_body: options.max_body_bytes,
            large: Arc::new(Semaphore::new(kib as usize)),
            small: Arc::new(Semaphore::new(options.small_requests.max(1))),
            wait: options.queue_wait,
        })
    }
}

/// Holds room for the request's body while it is read and answered. A
/// body without a length is charged as the largest allowed; one declaring
/// more than that is passed on for the body limit to answer 413.
async fn hold_room(State(limits): State<BodyLimits>, req: Request, next: Next) -> Response {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    let size = declared.unwrap_or(limits.max_body).min(limits.max_body);
    let permit = if size <= SMALL_BODY_BYTES {
        tokio::time::timeout(limits.wait, limits.small.clone().acquire_owned()).await
    } else {
        let kib = u32::try_from(size.div_ceil(1024)).unwrap_or(u32::MAX);
        tokio::time::timeout(limits.wait, limits.large.clone().acquire_many_owned(kib)).await
    };
    match permit {
        Ok(Ok(permit)) => {
            let response = next.run(req).await;
            drop(permit);
            response
        }
        _ => (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::RETRY_AFTER, "1")],
            format!(
                "the webhook holds as many request bodies as its memory budget allows; a {size}-byte \
                 request waited {:?} for room. Retry; if this persists, look for unusually large \
                 admission requests",
                limits.wait
            ),
        )
            .into_response(),
    }
}

/// The sockets the webhook serves on, bound by the caller (port 0 in tests).
#[derive(Debug)]
pub struct Listeners {
    /// HTTPS admission endpoints.
    pub admission: TcpListener,
    /// Plain-HTTP `/healthz`, `/readyz`, `/metrics`.
    pub ops: TcpListener,
}

/// The admission routes, without TLS; useful on its own for benchmarks.
pub fn admission_router(handler: Arc<Handler>, limits: BodyLimits) -> Router {
    let max_body = limits.max_body;
    Router::new()
        .route(MUTATE_PATH, post(mutate))
        .route(VALIDATE_POLICY_PATH, post(validate_policy))
        .layer(DefaultBodyLimit::max(max_body))
        .layer(middleware::from_fn_with_state(limits, hold_room))
        .with_state(handler)
}

/// An ordinary pod review (up to [`SMALL_BODY_BYTES`]) is answered on the
/// async worker: tens of microseconds. A larger body goes to the blocking
/// pool, as a policy does: reading a review at `--max-body-bytes` takes
/// milliseconds in a release build and over 100 ms in a debug one, and on
/// an async worker it holds up the ordinary reviews queued on that worker.
async fn mutate(State(handler): State<Arc<Handler>>, body: Bytes) -> Response {
    if body.len() <= SMALL_BODY_BYTES {
        return reply(handler.handle(Endpoint::Mutate, &body));
    }
    off_the_workers(handler, Endpoint::Mutate, body).await
}

/// Parsing a policy is CPU work bounded by its size (the bounded YAML
/// reader caps what aliases expand to), not by time: tens to hundreds of
/// milliseconds for a large one. On the blocking pool it cannot hold up the
/// pod reviews that share the async workers, which sit in the path of every
/// pod creation with `failurePolicy: Fail`.
async fn validate_policy(State(handler): State<Arc<Handler>>, body: Bytes) -> Response {
    off_the_workers(handler, Endpoint::ValidatePolicy, body).await
}

/// Answers on the blocking pool.
async fn off_the_workers(handler: Arc<Handler>, endpoint: Endpoint, body: Bytes) -> Response {
    match tokio::task::spawn_blocking(move || handler.handle(endpoint, &body)).await {
        Ok(r) => reply(r),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            format!("the review did not finish: {e}"),
        )
            .into_response(),
    }
}

fn reply(r: Reply) -> Response {
    let status = StatusCode::from_u16(r.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let content_type = if status == StatusCode::OK {
        "application/json"
    } else {
        "text/plain; charset=utf-8"
    };
    (status, [(header::CONTENT_TYPE, content_type)], r.body).into_response()
}

/// The webhook's answers on the operations port.
struct OpsState {
    metrics: Metrics,
    ready: Arc<AtomicBool>,
}

impl counterweight_runtime::admin::Admin for OpsState {
    fn readiness(&self) -> Result<(), String> {
        if self.ready.load(Ordering::SeqCst) {
            Ok(())
        } else {
            Err("not ready".into())
        }
    }

    fn metrics(&self) -> Result<String, String> {
        self.metrics.encode().map_err(|e| e.to_string())
    }
}

/// The admission endpoint as the shared accept loop serves it: one
/// acceptor (its [`CertStore`] resolves the certificate in force at each
/// handshake) and the same routes for every connection.
struct AdmissionService {
    acceptor: TlsAcceptor,
    router: Router,
}

impl TlsService for AdmissionService {
    fn acceptor(&self) -> TlsAcceptor {
        self.acceptor.clone()
    }

    fn router(&self, _tls: &TlsStream<TcpStream>, _remote: std::net::SocketAddr) -> Router {
        self.router.clone()
    }
}

/// Serves until `shutdown` resolves, then drains and returns.
pub async fn serve(
    listeners: Listeners,
    certs: Arc<CertStore>,
    handler: Arc<Handler>,
    options: ServeOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Error> {
    let acceptor = TlsAcceptor::from(Arc::new(certs.server_config()?));
    let ready = Arc::new(AtomicBool::new(false));
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = move |mut rx: watch::Receiver<bool>| async move {
        // Resolves on `true` or when the sender is gone, whichever first.
        let _ = rx.wait_for(|s| *s).await;
    };

    let ops = tokio::spawn(counterweight_runtime::admin::serve(
        listeners.ops,
        Arc::new(OpsState {
            metrics: handler.metrics.clone(),
            ready: ready.clone(),
        }),
        stopped(stop_rx.clone()),
    ));
    let reloader = tokio::spawn(
        certs
            .clone()
            .watch(options.cert_poll, stopped(stop_rx.clone())),
    );

    let limits = BodyLimits::new(&options)?;
    let builder = auto::Builder::new(TokioExecutor::new());
    let admission = listeners.admission;
    ready.store(true, Ordering::SeqCst);
    tracing::info!(
        admission = ?admission.local_addr().ok(),
        "webhook serving"
    );
    let service = Arc::new(AdmissionService {
        acceptor,
        router: admission_router(handler, limits),
    });
    let accept = AcceptOptions {
        handshake_timeout: options.handshake_timeout,
        drain_timeout: options.drain_timeout,
        max_connections: None,
    };
    let stopping = async {
        shutdown.await;
        tracing::info!("shutting down: not ready, draining connections");
        ready.store(false, Ordering::SeqCst);
    };
    if !tls_server::serve(admission, service, builder, accept, stopping).await {
        tracing::warn!(timeout = ?options.drain_timeout, "connections still open after the drain timeout");
    }
    let _ = stop_tx.send(true);
    let _ = reloader.await;
    match ops.await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(Error::Serve(e.to_string())),
        Err(e) => Err(Error::Serve(format!("operations server task: {e}"))),
    }
}
