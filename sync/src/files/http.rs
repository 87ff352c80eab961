//! The `files` sidecar's small plain-HTTP endpoint, so that the controller
//! can check file replication with an ordinary policy `http` check
//! (`http: {port: 8081, path: "/ready?maxAgeMs=10000"}`) and operators can
//! read the watermark:
//!
//! - `GET /watermark`: the [`Watermark`] as JSON (on a standby with the
//!   [`super::Marker`] received from the active under `received`);
//! - `GET /ready[?maxAgeMs=N]`: `200` and a note when this side's files are
//!   current by [`super::freshness`], `503` and the one-line reason if
//!   not. Without `maxAgeMs` the server's default applies.
//!
//! Plain HTTP: it carries no secret and changes nothing; keep it on the pod
//! network (the controller dials the pod IP).

use std::path::PathBuf;

use axum::Router;
use axum::extract::{RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use counterweight_core::clock::unix_ms;
use tokio::sync::watch;

use super::{Watermark, freshness, read_marker};
use crate::SyncError;

/// What the endpoint reads.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// The supervisor's watermark ([`super::FilesSupervisor::subscribe`]).
    pub watermark: watch::Receiver<Watermark>,
    /// The replicated directory, where a standby finds the active's marker.
    pub dir: PathBuf,
    /// `maxAgeMs` when a request gives none.
    pub default_max_age_ms: u64,
}

/// `maxAgeMs` from a query string: `Ok(None)` when absent, `Err` when not
/// a number. Parsed by hand: axum's `Query` needs a feature the workspace
/// does not enable, and one key does not justify it.
fn max_age_param(query: Option<&str>) -> Result<Option<u64>, String> {
    let Some(query) = query else {
        return Ok(None);
    };
    match query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == "maxAgeMs")
    {
        None => Ok(None),
        Some((_, v)) => v
            .parse()
            .map(Some)
            .map_err(|_| format!("maxAgeMs={v:?} is not a number of milliseconds")),
    }
}

impl Endpoint {
    /// The local watermark with the received marker filled in (a standby's
    /// only view of how current its copy is).
    fn view(&self) -> Result<Watermark, SyncError> {
        let mut w = self.watermark.borrow().clone();
        w.received = read_marker(&self.dir)?;
        Ok(w)
    }
}

async fn watermark(State(ep): State<Endpoint>) -> Response {
    match ep.view() {
        Ok(w) => axum::Json(w).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
    }
}

async fn ready(State(ep): State<Endpoint>, RawQuery(query): RawQuery) -> Response {
    let max_age_ms = match max_age_param(query.as_deref()) {
        Ok(m) => m.unwrap_or(ep.default_max_age_ms),
        Err(e) => return (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response(),
    };
    let verdict = ep
        .view()
        .map_err(|e| e.to_string())
        .and_then(|w| freshness(&w, w.received.as_ref(), unix_ms(), max_age_ms));
    match verdict {
        Ok(note) => (StatusCode::OK, format!("{note}\n")).into_response(),
        Err(reason) => (StatusCode::SERVICE_UNAVAILABLE, format!("{reason}\n")).into_response(),
    }
}

/// The endpoint's routes.
pub fn router(endpoint: Endpoint) -> Router {
    Router::new()
        .route("/watermark", get(watermark))
        .route("/ready", get(ready))
        .with_state(endpoint)
}

/// Serves [`router`] on `listener` until `shutdown` turns true (or its
/// sender is dropped).
pub async fn serve(
    listener: tokio::net::TcpListener,
    endpoint: Endpoint,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), SyncError> {
    let addr = listener.local_addr().ok();
    axum::serve(listener, router(endpoint))
        .with_graceful_shutdown(async move {
            // Bounded: ends when the flag turns true or the sender is gone.
            while !*shutdown.borrow_and_update() {
                if shutdown.changed().await.is_err() {
                    break;
                }
            }
        })
        .await
        .map_err(|e| {
            SyncError::io(
                "serving the files endpoint",
                addr.map(|a| a.to_string()).unwrap_or_default(),
                e,
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_age_comes_from_the_query() {
        assert_eq!(max_age_param(None), Ok(None));
        assert_eq!(max_age_param(Some("")), Ok(None));
        assert_eq!(max_age_param(Some("maxAgeMs=10000")), Ok(Some(10_000)));
        assert_eq!(max_age_param(Some("x=1&maxAgeMs=5")), Ok(Some(5)));
        assert!(
            max_age_param(Some("maxAgeMs=ten"))
                .unwrap_err()
                .contains("\"ten\"")
        );
    }
}
