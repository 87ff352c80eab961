//! The accept loop of an HTTPS server (the webhook's admission endpoint,
//! the controller's peer protocol): one task per connection, TLS with the
//! configuration in force at that connection's handshake (so a rotated
//! certificate takes effect without a restart), bounded handshakes, an
//! optional cap on open connections, and a graceful drain at shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

/// How long a failed `accept` (out of file descriptors and the like) waits
/// before the next: long enough not to spin, short enough to keep serving.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Bounds of the accept loop.
#[derive(Debug, Clone, Copy)]
pub struct AcceptOptions {
    /// Time a client has to complete the TLS handshake.
    pub handshake_timeout: Duration,
    /// Time open connections get to finish after shutdown.
    pub drain_timeout: Duration,
    /// Most connections open at once; a new one beyond is closed at once.
    /// `None` for no cap.
    pub max_connections: Option<usize>,
}

/// Why a connection was closed before it was served.
#[derive(Debug)]
pub enum Refused {
    /// The TLS handshake failed: wrong CA, no client certificate, or not
    /// TLS at all.
    Handshake(std::io::Error),
    /// The handshake did not finish within
    /// [`AcceptOptions::handshake_timeout`].
    HandshakeTimeout,
    /// [`AcceptOptions::max_connections`] were already open.
    TooManyConnections,
}

/// What a server tells the accept loop: its TLS configuration, the routes
/// a connection is served with, and what to do about refusals.
pub trait TlsService: Send + Sync + 'static {
    /// The acceptor for the next connection: the TLS configuration in force
    /// now.
    fn acceptor(&self) -> TlsAcceptor;

    /// The routes for a connection whose handshake completed (the client's
    /// certificate is on `tls`, for servers that identify their clients).
    fn router(&self, tls: &TlsStream<TcpStream>, remote: SocketAddr) -> Router;

    /// Reports a connection closed before it was served; logs it at debug
    /// level by default.
    fn refused(&self, remote: SocketAddr, why: Refused) {
        tracing::debug!(%remote, ?why, "connection refused");
    }
}

/// Serves `service` on `listener` with `builder`'s HTTP settings until
/// `shutdown` resolves, then stops accepting and gives open connections
/// [`AcceptOptions::drain_timeout`] to finish. Returns whether they all did.
pub async fn serve<S: TlsService>(
    listener: TcpListener,
    service: Arc<S>,
    builder: auto::Builder<TokioExecutor>,
    options: AcceptOptions,
    shutdown: impl Future<Output = ()>,
) -> bool {
    let graceful = GracefulShutdown::new();
    let slots = options.max_connections.map(|n| Arc::new(Semaphore::new(n)));
    tokio::pin!(shutdown);
    loop {
        let (tcp, remote) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed; trying again shortly");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
        };
        let slot = match &slots {
            None => None,
            Some(slots) => match slots.clone().try_acquire_owned() {
                Ok(slot) => Some(slot),
                Err(_) => {
                    service.refused(remote, Refused::TooManyConnections);
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = service.acceptor();
        let service = service.clone();
        let builder = builder.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let _slot = slot;
            let tls =
                match tokio::time::timeout(options.handshake_timeout, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => return service.refused(remote, Refused::Handshake(e)),
                    Err(_) => return service.refused(remote, Refused::HandshakeTimeout),
                };
            let routes = TowerToHyperService::new(service.router(&tls, remote));
            let conn = builder.serve_connection(TokioIo::new(tls), routes);
            if let Err(e) = watcher.watch(conn.into_owned()).await {
                tracing::debug!(%remote, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    tokio::time::timeout(options.drain_timeout, graceful.shutdown())
        .await
        .is_ok()
}
