//! The peer mTLS material: server and client rustls configurations built
//! from PEM files, followed by [`counterweight_reload::Watched`].

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use counterweight_reload::{ReadError, Reload, Watched};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use super::{PeerError, PeerMetrics};

/// Where the TLS material lives: PEM files, as mounted from a Secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsPaths {
    /// Certificate chain this controller presents (leaf first).
    pub cert: PathBuf,
    /// Private key of the leaf.
    pub key: PathBuf,
    /// CA bundle peer certificates must chain to.
    pub ca: PathBuf,
}

struct TlsConfigs {
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
}

impl From<ReadError> for PeerError {
    fn from(e: ReadError) -> Self {
        PeerError::Read {
            path: e.path,
            source: e.source,
        }
    }
}

/// Server and client TLS configurations built from [`TlsPaths`], rebuilt
/// when the files change ([`counterweight_reload::Watched`] follows them and
/// keeps the last good set). Every new connection takes the current ones, so
/// a rotation applies without a restart. [`PeerClient`](super::PeerClient) replaces its open
/// connections on the next message after a reload; connections accepted by
/// the server keep the configuration they started with until the client
/// closes them.
pub struct PeerTls {
    configs: Arc<Watched<TlsConfigs, PeerError>>,
    metrics: PeerMetrics,
}

impl fmt::Debug for PeerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeerTls")
            .field("configs", &self.configs)
            .finish_non_exhaustive()
    }
}

impl PeerTls {
    /// Loads the files; fails if they are missing or unusable, because a
    /// controller that cannot authenticate its peers must not start.
    pub fn load(paths: TlsPaths, metrics: PeerMetrics) -> Result<Arc<Self>, PeerError> {
        let files = vec![paths.cert.clone(), paths.key.clone(), paths.ca.clone()];
        let configs = Watched::load(files, move |pems| match pems {
            [cert, key, ca] => build_configs(&paths, cert, key, ca),
            // `Watched` hands over one buffer per path, and there are three.
            _ => Err(PeerError::Config(
                "expected certificate, key and CA files".into(),
            )),
        })?;
        Ok(Arc::new(Self {
            configs: Arc::new(configs),
            metrics,
        }))
    }

    /// The configuration for accepting peer connections (client
    /// certificates required and verified against the CA bundle).
    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.configs.current().server.clone()
    }

    /// The configuration for calling peers (presents our certificate,
    /// trusts only the CA bundle).
    pub fn client_config(&self) -> Arc<ClientConfig> {
        self.configs.current().client.clone()
    }

    /// How many times the material was reloaded since [`PeerTls::load`]. A
    /// client connection made with an older generation is replaced, so a
    /// rotated client certificate or CA bundle applies to peers already
    /// connected. Read it *before* the configuration it goes with: the
    /// configuration is swapped first, so that one is at least as new.
    pub fn generation(&self) -> u64 {
        self.configs.swaps()
    }

    /// Reads the files once and swaps in new configurations if they changed
    /// and are good. Returns whether anything was swapped. Blocks on file
    /// I/O: call it from a blocking context, as [`PeerTls::watch`] does.
    pub fn reload_if_changed(&self) -> bool {
        self.report(self.configs.reload_if_changed())
    }

    /// Logs and counts one poll's outcome; whether anything was swapped.
    fn report(&self, outcome: Reload<PeerError>) -> bool {
        let counted = outcome.log("peer TLS material", self.configs.path());
        if let Some(ok) = counted {
            PeerMetrics::reason(&self.metrics.tls_reloads, if ok { "ok" } else { "error" });
        }
        counted == Some(true)
    }

    /// Polls the files every `interval` until `shutdown` resolves.
    pub async fn watch(self: Arc<Self>, interval: Duration, shutdown: impl Future<Output = ()>) {
        let configs = self.configs.clone();
        configs
            .watch(interval, shutdown, |outcome| {
                self.report(outcome);
            })
            .await;
    }
}

fn build_configs(
    paths: &TlsPaths,
    cert_pem: &[u8],
    key_pem: &[u8],
    ca_pem: &[u8],
) -> Result<TlsConfigs, PeerError> {
    let bad = |path: &Path, message: String| PeerError::BadPem {
        path: path.to_owned(),
        message,
    };
    let certs = |pem: &[u8], path: &Path| -> Result<Vec<CertificateDer<'static>>, PeerError> {
        let certs: Vec<_> = CertificateDer::pem_slice_iter(pem)
            .collect::<Result<_, _>>()
            .map_err(|e| bad(path, e.to_string()))?;
        if certs.is_empty() {
            return Err(bad(path, "no CERTIFICATE block".into()));
        }
        Ok(certs)
    };
    let chain = certs(cert_pem, &paths.cert)?;
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| bad(&paths.key, e.to_string()))?;
    let mut roots = RootCertStore::empty();
    for ca in certs(ca_pem, &paths.ca)? {
        roots
            .add(ca)
            .map_err(|e| bad(&paths.ca, format!("not a usable CA certificate: {e}")))?;
    }
    let roots = Arc::new(roots);
    // Explicit provider: the configuration does not depend on which one the
    // process installed, and tests need not install one.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config_err = |e: rustls::Error| PeerError::Config(e.to_string());

    let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
        .build()
        .map_err(|e| PeerError::Config(e.to_string()))?;
    let mut server = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(config_err)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain.clone(), key.clone_key())
        .map_err(|e| {
            bad(
                &paths.key,
                format!(
                    "does not fit {}: {e} (a rotation half written?)",
                    paths.cert.display()
                ),
            )
        })?;
    // HTTP/1.1 too, so that curl with a client certificate can debug a peer.
    server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];

    let mut client = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(config_err)?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(|e| bad(&paths.key, e.to_string()))?;
    client.alpn_protocols = vec![b"h2".to_vec()];
    Ok(TlsConfigs {
        server: Arc::new(server),
        client: Arc::new(client),
    })
}
