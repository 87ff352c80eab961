//! The serving certificate, reloaded from disk while the server runs.
//!
//! This module owns turning PEM files into a rustls [`CertifiedKey`] and the
//! [`CertStore`] that hands the current one to every TLS handshake (it is the
//! server's certificate resolver, so a new certificate applies to the next
//! handshake without restarting anything). Following the files is
//! [`counterweight_reload::Watched`]'s job: contents compared through
//! kubelet's symlinks, and a pair that does not parse or whose key does not
//! match its certificate (a rotation caught half written) logged, counted
//! and ignored while the last good pair keeps serving.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use counterweight_reload::{ReadError, Reload, Watched};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::Error;
use crate::metrics::Metrics;

impl From<ReadError> for Error {
    fn from(e: ReadError) -> Self {
        Error::ReadFile {
            path: e.path,
            source: e.source,
        }
    }
}

fn parse_pair(
    cert_pem: &[u8],
    key_pem: &[u8],
    cert_path: &Path,
    key_path: &Path,
) -> Result<CertifiedKey, Error> {
    let bad = |path: &Path, message: String| Error::BadCertificate {
        path: path.to_owned(),
        message,
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| bad(cert_path, e.to_string()))?;
    if chain.is_empty() {
        return Err(bad(cert_path, "no CERTIFICATE block".into()));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| bad(key_path, e.to_string()))?;
    let signing = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|e| bad(key_path, e.to_string()))?;
    let certified = CertifiedKey::new(chain, signing);
    certified.keys_match().map_err(|e| {
        bad(
            key_path,
            format!(
                "key does not belong to {}: {e} (a rotation half written?)",
                cert_path.display()
            ),
        )
    })?;
    Ok(certified)
}

/// The current serving certificate, shared by the TLS acceptor and the reloader.
#[derive(Debug)]
pub struct CertStore {
    pair: Arc<Watched<CertifiedKey, Error>>,
    metrics: Metrics,
}

impl CertStore {
    /// Loads the pair; fails if the initial files are missing or broken,
    /// because a webhook without a certificate must not report ready.
    pub fn load(cert_path: &Path, key_path: &Path, metrics: Metrics) -> Result<Self, Error> {
        let (cert, key): (PathBuf, PathBuf) = (cert_path.to_owned(), key_path.to_owned());
        let pair = Watched::load(vec![cert.clone(), key.clone()], move |files| match files {
            [cert_pem, key_pem] => parse_pair(cert_pem, key_pem, &cert, &key),
            // `Watched` hands over one buffer per path, and there are two.
            _ => Err(Error::Tls("expected a certificate and a key file".into())),
        })?;
        Ok(Self {
            pair: Arc::new(pair),
            metrics,
        })
    }

    /// The certificate currently served.
    pub fn current(&self) -> Arc<CertifiedKey> {
        self.pair.current()
    }

    /// Checks the files once; swaps in a new pair if it changed and is good.
    /// Returns whether the served certificate changed.
    pub fn reload_if_changed(&self) -> bool {
        self.report(self.pair.reload_if_changed())
    }

    /// Logs and counts one poll's outcome; whether the certificate changed.
    fn report(&self, outcome: Reload<Error>) -> bool {
        let counted = outcome.log("serving certificate", self.pair.path());
        if let Some(ok) = counted {
            self.metrics.cert_reload(ok);
        }
        counted == Some(true)
    }

    /// Polls the files every `interval` until `shutdown` resolves.
    pub async fn watch(self: Arc<Self>, interval: Duration, shutdown: impl Future<Output = ()>) {
        let pair = self.pair.clone();
        pair.watch(interval, shutdown, |outcome| {
            self.report(outcome);
        })
        .await;
    }

    /// A rustls server configuration that serves whatever this store holds,
    /// speaking HTTP/2 and HTTP/1.1.
    pub fn server_config(self: &Arc<Self>) -> Result<rustls::ServerConfig, Error> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::Tls(e.to_string()))?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(Resolver(self.clone())));
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(config)
    }
}

#[derive(Debug)]
struct Resolver(Arc<CertStore>);

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.current())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use counterweight_certs::{CertificateAuthority, LeafSpec, Usage};

    fn leaf(ca: &CertificateAuthority, cn: &str) -> counterweight_certs::PemPair {
        ca.issue(&LeafSpec::new(cn, Usage::Server).sans(["127.0.0.1"]))
            .unwrap()
    }

    fn served_der(store: &CertStore) -> Vec<u8> {
        store.current().cert[0].as_ref().to_vec()
    }

    #[test]
    fn reloads_changed_files_and_keeps_last_good_on_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let ca = CertificateAuthority::new("t").unwrap();
        leaf(&ca, "one").write(dir.path(), "tls").unwrap();
        let (crt, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
        let metrics = Metrics::new();
        let store = CertStore::load(&crt, &key, metrics.clone()).unwrap();
        let first = served_der(&store);
        assert!(
            !store.reload_if_changed(),
            "unchanged files are not reloaded"
        );

        // A key that does not match the certificate: kept the old one.
        let other = leaf(&ca, "two");
        std::fs::write(&key, &other.key_pem).unwrap();
        assert!(!store.reload_if_changed());
        assert_eq!(served_der(&store), first);
        // Garbage: kept the old one.
        std::fs::write(&crt, "not a certificate").unwrap();
        assert!(!store.reload_if_changed());
        assert_eq!(served_der(&store), first);
        // The completed rotation is picked up.
        other.write(dir.path(), "tls").unwrap();
        assert!(store.reload_if_changed());
        assert_ne!(served_der(&store), first);
        let text = metrics.encode().unwrap();
        assert!(
            text.contains(r#"cert_reloads_total{result="error"} 2"#),
            "{text}"
        );
        assert!(
            text.contains(r#"cert_reloads_total{result="ok"} 1"#),
            "{text}"
        );
    }

    /// kubelet's atomic writer: files are symlinks through `..data`, which is
    /// itself a symlink to a timestamped directory, swapped by rename.
    #[cfg(unix)]
    #[test]
    fn survives_the_kubelet_data_symlink_swap() {
        use std::os::unix::fs::symlink;
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let ca = CertificateAuthority::new("t").unwrap();
        let v1 = root.join("..2024_01_01_v1");
        std::fs::create_dir(&v1).unwrap();
        leaf(&ca, "one").write(&v1, "tls").unwrap();
        symlink("..2024_01_01_v1", root.join("..data")).unwrap();
        symlink("..data/tls.crt", root.join("tls.crt")).unwrap();
        symlink("..data/tls.key", root.join("tls.key")).unwrap();
        let store =
            CertStore::load(&root.join("tls.crt"), &root.join("tls.key"), Metrics::new()).unwrap();
        let first = served_der(&store);

        let v2 = root.join("..2024_01_02_v2");
        std::fs::create_dir(&v2).unwrap();
        leaf(&ca, "two").write(&v2, "tls").unwrap();
        symlink("..2024_01_02_v2", root.join("..data_tmp")).unwrap();
        std::fs::rename(root.join("..data_tmp"), root.join("..data")).unwrap();
        std::fs::remove_dir_all(&v1).unwrap();
        assert!(store.reload_if_changed());
        assert_ne!(served_der(&store), first);
    }

    #[test]
    fn broken_initial_files_are_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let crt = dir.path().join("tls.crt");
        std::fs::write(&crt, "junk").unwrap();
        let e = CertStore::load(&crt, &dir.path().join("tls.key"), Metrics::new()).unwrap_err();
        assert!(e.to_string().contains("tls.key"), "{e}");
    }
}
