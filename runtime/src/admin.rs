//! The admin server every long-running binary has, on a port apart from
//! its real work: `/healthz` (the process answers), `/readyz` (it should
//! get traffic, or why not) and `/metrics` (OpenMetrics text).

use std::future::Future;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use http::{StatusCode, header};
use tokio::net::TcpListener;

/// The content type of `/metrics`.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// What the admin endpoints report; each binary says it its own way.
pub trait Admin: Send + Sync + 'static {
    /// `Ok` when ready for traffic, else why not (served with 503).
    fn readiness(&self) -> Result<(), String>;
    /// The metrics as OpenMetrics text, or why they cannot be encoded.
    fn metrics(&self) -> Result<String, String>;
}

/// The admin routes for `admin`.
pub fn router(admin: Arc<dyn Admin>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(admin)
}

/// Serves the admin routes on `listener` until `shutdown` resolves.
///
/// # Errors
///
/// The listener failed.
pub async fn serve(
    listener: TcpListener,
    admin: Arc<dyn Admin>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(admin))
        .with_graceful_shutdown(shutdown)
        .await
}

async fn readyz(State(admin): State<Arc<dyn Admin>>) -> Response {
    match admin.readiness() {
        Ok(()) => (StatusCode::OK, "ok").into_response(),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, why).into_response(),
    }
}

async fn metrics(State(admin): State<Arc<dyn Admin>>) -> Response {
    match admin.metrics() {
        Ok(text) => (StatusCode::OK, [(header::CONTENT_TYPE, OPENMETRICS)], text).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e).into_response(),
    }
}
