//! The edges every Counterweight binary shares, written once: how a
//! binary builds its Kubernetes client from a kubeconfig
//! ([`kube_client`], with the `kube` feature), sets up its logs ([`logging`]), learns that it must
//! stop ([`shutdown`]), serves `/healthz`, `/readyz` and `/metrics`
//! ([`admin`]) and accepts TLS connections ([`tls_server`]).
//!
//! Nothing here decides anything about high availability; that is
//! `counterweight-core`. This crate is what kubert is to linkerd's
//! controllers: the plumbing, so that each `main.rs` stays a few lines and
//! the controller and `cwctl` read a kubeconfig the same way.

pub mod admin;
#[cfg(feature = "kube")]
pub mod kube_client;
pub mod logging;
pub mod shutdown;
pub mod tls_server;

#[cfg(feature = "kube")]
pub use kube_client::ClientError;
