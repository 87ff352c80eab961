//! The Counterweight admission webhook.
//!
//! A mutating endpoint injects the init-gate into service pods of opted-in
//! namespaces, and a validating endpoint checks the `counterweight-policy`
//! ConfigMap with the same core validation the controller uses. The patch and
//! the verdicts come from `counterweight-core`; this crate owns TLS, HTTP and
//! AdmissionReview plumbing.

use std::net::SocketAddr;
use std::path::PathBuf;

/// Command-line and environment configuration of the webhook.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "counterweight-webhook", version, about, long_about = None)]
pub struct Args {
    /// Address of the HTTPS admission endpoint.
    #[arg(
        long,
        env = "COUNTERWEIGHT_WEBHOOK_LISTEN",
        default_value = "0.0.0.0:8443"
    )]
    pub listen: SocketAddr,

    /// Address of the plain-HTTP /healthz, /readyz and /metrics endpoints.
    #[arg(
        long,
        env = "COUNTERWEIGHT_METRICS_LISTEN",
        default_value = "0.0.0.0:9090"
    )]
    pub metrics_listen: SocketAddr,

    /// PEM serving certificate chain; reloaded when the file changes.
    #[arg(long, env = "COUNTERWEIGHT_TLS_CERT")]
    pub tls_cert: PathBuf,

    /// PEM private key of `--tls-cert`; reloaded with it.
    #[arg(long, env = "COUNTERWEIGHT_TLS_KEY")]
    pub tls_key: PathBuf,

    /// Image of the init-gate container to inject.
    #[arg(
        long,
        env = "COUNTERWEIGHT_GATE_IMAGE",
        default_value = "counterweight/gate:latest"
    )]
    pub gate_image: String,
}

/// Errors the webhook reports to its binary.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A part of the webhook that is not built yet was asked for.
    #[error("{0} is not implemented yet; see the open issues")]
    NotImplemented(&'static str),
}

/// Serves admission requests until `shutdown` resolves.
pub async fn run(args: Args, shutdown: impl std::future::Future<Output = ()>) -> Result<(), Error> {
    tracing::info!(listen = %args.listen, "starting webhook");
    drop(shutdown);
    Err(Error::NotImplemented("the admission server"))
}
