//! Active health checks of FIG. 8: TCP connect, HTTP GET, and the PostgreSQL
//! "database connection return".
//!
//! Each check has a hard timeout shorter than the evaluation interval and
//! never panics: every failure becomes a [`CheckOutcome`] with a message an
//! operator can act on. All checks of a round run concurrently, so a round
//! takes as long as its slowest check, not the sum.

use std::time::Duration;

use counterweight_core::health::CheckOutcome;
use counterweight_core::policy::{Check, HttpCheck, PostgresCheck};
use counterweight_core::replication::{Lag, STANDBY_QUERY};
use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use tokio::net::TcpStream;

/// PostgreSQL user and password, read from the Secret a check references.
#[derive(Clone)]
pub struct PgCredentials {
    /// User name.
    pub user: String,
    /// Password.
    pub password: String,
    /// The CA bundle (PEM) from the Secret's `caKey`, if the check names
    /// one, and where it came from.
    pub ca: Option<(String, Vec<u8>)>,
}

impl std::fmt::Debug for PgCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgCredentials")
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

/// Runs one check against `host` (a fixed host from the policy, or a ready
/// pod's IP). `credentials` is required for PostgreSQL checks.
pub async fn run(
    check: &Check,
    host: &str,
    timeout: Duration,
    credentials: Option<&PgCredentials>,
) -> CheckOutcome {
    let mut described = match check {
        Check::Tcp(c) => format!("tcp {host}:{}", c.port),
        Check::Http(c) => format!("http GET {host}:{}{}", c.port, c.path),
        Check::Postgres(c) => format!("postgres {host}:{}/{}", c.port, c.database),
    };
    let attempt = async {
        match check {
            Check::Tcp(c) => TcpStream::connect((host, c.port))
                .await
                .map(|_| None)
                .map_err(|e| format!("connect failed: {e}")),
            Check::Http(c) => http_get(host, c).await.map(|()| None),
            Check::Postgres(c) => match credentials {
                Some(creds) => postgres(host, c, creds, timeout).await,
                None => Err(format!(
                    "no credentials: Secret {:?} missing or lacks keys {:?}/{:?}",
                    c.secret_ref.name, c.secret_ref.user_key, c.secret_ref.password_key
                )),
            },
        }
    };
    let error = match tokio::time::timeout(timeout, attempt).await {
        Ok(Ok(None)) => None,
        Ok(Ok(Some(note))) => {
            // What replication looked like, kept in the explanation: the
            // data-loss estimate if this cluster takes over now.
            described = format!("{described} ({note})");
            None
        }
        Ok(Err(e)) => Some(e),
        Err(_) => Some(format!("timed out after {timeout:?}")),
    };
    CheckOutcome {
        check: described,
        error,
    }
}

async fn http_get(host: &str, check: &HttpCheck) -> Result<(), String> {
    let stream = TcpStream::connect((host, check.port))
        .await
        .map_err(|e| format!("connect failed: {e}"))?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| format!("HTTP handshake failed: {e}"))?;
    // The connection future must be polled for the request to make progress;
    // it ends when `sender` is dropped.
    let driver = tokio::spawn(conn);
    let req = http::Request::get(check.path.as_str())
        .header(http::header::HOST, format!("{host}:{}", check.port))
        .header(http::header::USER_AGENT, "counterweight-controller")
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("bad request for path {:?}: {e}", check.path))?;
    let result = async {
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| format!("request failed: {e}"))?;
        if resp.status().is_success() {
            return Ok(());
        }
        // A failing endpoint often says why in its body (the files
        // sidecar's `/ready` does, e.g. how old the copy is): keep its
        // first line in the explanation. Bounded: at most BODY_LIMIT bytes
        // are read, and the whole check is under the check timeout.
        let status = resp.status();
        let reason = Limited::new(resp.into_body(), BODY_LIMIT)
            .collect()
            .await
            .ok()
            .map(|b| first_line(&b.to_bytes()))
            .filter(|l| !l.is_empty());
        Err(match reason {
            Some(r) => format!("answered {status}: {r}"),
            None => format!("answered {status}"),
        })
    }
    .await;
    drop(sender);
    driver.abort();
    result
}

/// Most of a failing answer's body read for its reason.
const BODY_LIMIT: usize = 1024;

/// The first non-empty line of `body`, as text, at most 300 characters.
fn first_line(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let line = text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or_default();
    line.chars().take(300).collect()
}

async fn postgres(
    host: &str,
    check: &PostgresCheck,
    creds: &PgCredentials,
    timeout: Duration,
) -> Result<Option<String>, String> {
    let mut config = tokio_postgres::Config::new();
    config
        .host(host)
        .port(check.port)
        .dbname(&check.database)
        .user(&creds.user)
        .password(&creds.password)
        .application_name("counterweight-health")
        .connect_timeout(timeout);
    let root = creds
        .ca
        .as_ref()
        .map(|(source, pem)| counterweight_pgtls::RootCert { source, pem });
    let tls = counterweight_pgtls::from_libpq(Some(check.sslmode.as_str()), root)
        .map_err(|e| e.to_string())?;
    let client = counterweight_pgtls::connect(config, &tls)
        .await
        .map_err(|e| format!("connect failed: {}", pg_message(&e)))?;
    let result = match check.max_lag_bytes {
        None => client
            .simple_query("SELECT 1")
            .await
            .map(|_| None)
            .map_err(|e| format!("SELECT 1 failed: {}", pg_message(&e))),
        Some(max) => standby_lag(&client)
            .await
            .and_then(|lag| lag.kept_current(max).map(Some)),
    };
    drop(client);
    result
}

/// Reads the server's replication state ([`STANDBY_QUERY`], one round
/// trip), which [`Lag::kept_current`] judges.
pub async fn standby_lag(client: &tokio_postgres::Client) -> Result<Lag, String> {
    let row = client
        .query_one(STANDBY_QUERY, &[])
        .await
        .map_err(|e| format!("replication query failed: {}", pg_message(&e)))?;
    Lag::from_columns(
        row.get(0),
        row.get(1),
        row.get(2),
        row.get(3),
        row.get(4),
        row.get(5),
    )
    .map_err(|e| format!("replication query: {e}"))
}

// tokio-postgres' Display is just "db error"; the server's message is in
// the source, and that is what an operator needs.
fn pg_message(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => {
            let mut s = e.to_string();
            let mut src = std::error::Error::source(e);
            while let Some(inner) = src {
                s.push_str(": ");
                s.push_str(&inner.to_string());
                src = inner.source();
            }
            s
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use counterweight_core::policy::TcpCheck;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    #[tokio::test]
    async fn tcp_check_passes_on_a_listener_and_names_the_failure_otherwise() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let check = Check::Tcp(TcpCheck { port, host: None });
        let ok = run(&check, "127.0.0.1", Duration::from_secs(1), None).await;
        assert_eq!(ok.error, None, "{ok:?}");
        drop(l);
        let bad = run(&check, "127.0.0.1", Duration::from_secs(1), None).await;
        assert!(bad.error.unwrap().contains("connect failed"));
        assert_eq!(bad.check, format!("tcp 127.0.0.1:{port}"));
    }

    async fn one_shot_http(status: &'static str) -> u16 {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(async move {
            if let Ok((mut s, _)) = l.accept().await {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let resp = format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\n\r\n");
                let _ = s.write_all(resp.as_bytes()).await;
            }
        });
        port
    }

    #[tokio::test]
    async fn http_check_wants_2xx() {
        let path = "/healthz".to_owned();
        let port = one_shot_http("204 No Content").await;
        let check = Check::Http(HttpCheck {
            port,
            path: path.clone(),
            host: None,
        });
        let ok = run(&check, "127.0.0.1", Duration::from_secs(1), None).await;
        assert_eq!(ok.error, None, "{ok:?}");
        let port = one_shot_http("503 Service Unavailable").await;
        let check = Check::Http(HttpCheck {
            port,
            path,
            host: None,
        });
        let bad = run(&check, "127.0.0.1", Duration::from_secs(1), None).await;
        assert!(bad.error.unwrap().contains("503"));
    }

    /// A query string reaches the server as written, and a failing
    /// answer's first body line becomes the reason.
    #[tokio::test]
    async fn http_check_sends_the_query_and_keeps_the_reason() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let n = s.read(&mut buf).await.unwrap();
            let body = "standby: copy is 12000 ms old > maxAgeMs 10000\nmore\n";
            let resp = format!(
                "HTTP/1.1 503 Service Unavailable\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            );
            s.write_all(resp.as_bytes()).await.unwrap();
            String::from_utf8_lossy(&buf[..n]).into_owned()
        });
        let check = Check::Http(HttpCheck {
            port,
            path: "/ready?maxAgeMs=10000".into(),
            host: None,
        });
        let out = run(&check, "127.0.0.1", Duration::from_secs(2), None).await;
        assert_eq!(
            out.error.as_deref(),
            Some(
                "answered 503 Service Unavailable: standby: copy is 12000 ms old > maxAgeMs 10000"
            )
        );
        let request = server.await.unwrap();
        assert!(
            request.starts_with("GET /ready?maxAgeMs=10000 HTTP/1.1"),
            "{request}"
        );
    }

    #[tokio::test]
    async fn a_silent_server_times_out() {
        // Accepts but never answers.
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let check = Check::Http(HttpCheck {
            port,
            path: "/".into(),
            host: None,
        });
        let out = run(&check, "127.0.0.1", Duration::from_millis(200), None).await;
        assert_eq!(out.error.as_deref(), Some("timed out after 200ms"));
        drop(l);
    }
}
