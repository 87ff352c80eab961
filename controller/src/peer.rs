//! Transport of the peer protocol: HTTPS with mutual TLS between controllers.
//!
//! Work in progress; the server, client and reloadable TLS material land in
//! the following commits.
