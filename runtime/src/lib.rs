//! The edges every Counterweight binary shares, written once: how a
//! binary builds its Kubernetes client from a kubeconfig
//! ([`kube_client`]), sets up its logs ([`logging`]) and learns that it
//! must stop ([`shutdown`]).
//!
//! Nothing here decides anything about high availability; that is
//! `counterweight-core`. This crate is what kubert is to linkerd's
//! controllers: the plumbing, so that each `main.rs` stays a few lines and
//! the controller and `cwctl` read a kubeconfig the same way.

pub mod kube_client;
pub mod logging;
pub mod shutdown;

pub use kube_client::ClientError;
