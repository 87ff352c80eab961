//! The sidecar's side of [`counterweight_pgtls`]: `--sslmode` and the
//! `--sslrootcert` file of a connection's parameters, read into the TLS
//! side of its connections.

use counterweight_pgtls::{PgTls, RootCert};

use super::conninfo::ConnParams;
use crate::SyncError;

/// The TLS side of connections made with `params` (libpq's meaning of
/// `sslmode` and `sslrootcert`; the CA file is read now).
pub fn from_params(params: &ConnParams) -> Result<PgTls, SyncError> {
    let pem = match params.sslrootcert.as_deref() {
        Some(path) => Some((
            path,
            std::fs::read(path).map_err(|e| SyncError::Tls {
                what: format!("sslrootcert {path}"),
                message: e.to_string(),
            })?,
        )),
        None => None,
    };
    let root = pem.as_ref().map(|(source, pem)| RootCert { source, pem });
    counterweight_pgtls::from_libpq(params.sslmode.as_deref(), root).map_err(|e| SyncError::Tls {
        what: e.what,
        message: e.message,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_root_file_is_named() {
        let params = ConnParams {
            host: "db.example".into(),
            port: 5432,
            user: "postgres".into(),
            password: None,
            dbname: "postgres".into(),
            sslmode: Some("verify-ca".into()),
            sslrootcert: Some("/nonexistent/ca.crt".into()),
            application_name: None,
        };
        let e = from_params(&params)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("/nonexistent/ca.crt"), "{e}");
    }
}
