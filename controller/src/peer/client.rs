//! The peer client: one HTTP/2 connection per peer, short retries inside a
//! deadline, and a bound on messages in flight so a slow peer never blocks
//! the HA loop.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use axum::http::header;
use bytes::Bytes;
use counterweight_core::ha::Envelope;
use http::Uri;
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;

use super::backoff::backoff;
use super::{MESSAGES_PATH, PeerEndpoint, PeerError, PeerIdentity, PeerMetrics, PeerTls};

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peer::parse_peers;

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
}
