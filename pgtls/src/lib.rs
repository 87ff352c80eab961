//! TLS for `tokio-postgres` connections, with rustls, following libpq's
//! `sslmode`, so that one `sslmode` / `sslrootcert` pair means the same for
//! libpq's tools and for Counterweight's own connections: the sync
//! sidecar's probes of its peers (`counterweight-sync db`) and the
//! controller's PostgreSQL health check (the policy's `postgres` check).
//!
//! | sslmode | TLS | chain checked against sslrootcert | host name checked |
//! |---|---|---|---|
//! | `disable` | no | | |
//! | `allow`, `prefer` | if the server offers it | no | no |
//! | `require` | yes | only if `sslrootcert` is given (as libpq) | no |
//! | `verify-ca` | yes | yes | no |
//! | `verify-full` | yes | yes | yes (DNS name or IP address SAN) |
//!
//! Without an `sslmode` the connection is plain: that is the sidecar's
//! loopback connection to its own server (the same pod). A small
//! [`MakeTlsConnect`] of our own rather than a crate: it is a few dozen
//! lines over `tokio-rustls`, which the workspace already builds, and the
//! libpq modes need custom verifiers anyway. No channel binding (SCRAM
//! without `-PLUS`), as libpq's default `channel_binding=prefer` allows.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ClientConfig, WebPkiServerVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::config::SslMode;
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect, TlsStream};
use tokio_postgres::{Client, Config, NoTls};

/// Why the TLS side of a PostgreSQL connection cannot be built.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {message}")]
pub struct PgTlsError {
    /// The setting at fault (`sslmode "x"`, `sslrootcert <where>`).
    pub what: String,
    /// What is wrong with it, and what to do.
    pub message: String,
}

/// The TLS side of a connection: the mode for `tokio-postgres` and, unless
/// TLS is off, the connector. Cheap to clone (the rustls configuration is
/// shared).
#[derive(Clone)]
pub struct PgTls {
    /// Whether TLS is off, attempted, or required.
    pub mode: SslMode,
    /// The connector (`None` when `mode` is `Disable`).
    pub connector: Option<RustlsConnect>,
}

impl std::fmt::Debug for PgTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgTls")
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

/// A CA bundle in PEM, and where it came from (for errors): the
/// `sslrootcert` of [`from_libpq`].
#[derive(Debug, Clone, Copy)]
pub struct RootCert<'a> {
    /// Where the bundle came from: a file name, a Secret key.
    pub source: &'a str,
    /// The PEM text.
    pub pem: &'a [u8],
}

fn tls_error(what: impl Into<String>, message: impl ToString) -> PgTlsError {
    PgTlsError {
        what: what.into(),
        message: message.to_string(),
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads a PEM CA bundle into a root store; an empty or unreadable bundle
/// is an error (it would make every server untrusted, confusingly).
fn roots(root: RootCert<'_>) -> Result<RootCertStore, PgTlsError> {
    let what = || format!("sslrootcert {}", root.source);
    let mut store = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(root.pem) {
        let cert = cert.map_err(|e| tls_error(what(), e))?;
        store.add(cert).map_err(|e| tls_error(what(), e))?;
    }
    if store.is_empty() {
        return Err(tls_error(what(), "no certificate in it"));
    }
    Ok(store)
}

/// Connects with `config` and `tls` (its `sslmode` is set from `tls`), and
/// drives the connection in a task that ends when the returned client is
/// dropped. Not bounded in time beyond `config`'s connect timeout: wrap it
/// in a timeout.
pub async fn connect(mut config: Config, tls: &PgTls) -> Result<Client, tokio_postgres::Error> {
    config.ssl_mode(tls.mode);
    // Two arms: the connection future's type depends on the connector.
    Ok(match &tls.connector {
        None => {
            let (client, connection) = config.connect(NoTls).await?;
            tokio::spawn(drive(connection));
            client
        }
        Some(connector) => {
            let (client, connection) = config.connect(connector.clone()).await?;
            tokio::spawn(drive(connection));
            client
        }
    })
}

/// Drives a connection until its client is dropped.
async fn drive<F>(connection: F)
where
    F: Future<Output = Result<(), tokio_postgres::Error>>,
{
    if let Err(e) = connection.await {
        tracing::debug!(error = %e, "PostgreSQL connection ended");
    }
}

/// Builds the TLS side from libpq's `sslmode` and `sslrootcert` (see the
/// module's table).
pub fn from_libpq(
    sslmode: Option<&str>,
    sslrootcert: Option<RootCert<'_>>,
) -> Result<PgTls, PgTlsError> {
    enum Check {
        Nothing,
        Chain,
        ChainAndName,
    }
    let (mode, check) = match (sslmode, sslrootcert) {
        (None | Some("disable"), _) => {
            return Ok(PgTls {
                mode: SslMode::Disable,
                connector: None,
            });
        }
        (Some("allow" | "prefer"), _) => (SslMode::Prefer, Check::Nothing),
        (Some("require"), None) => (SslMode::Require, Check::Nothing),
        (Some("require" | "verify-ca"), Some(_)) => (SslMode::Require, Check::Chain),
        (Some("verify-full"), Some(_)) => (SslMode::Require, Check::ChainAndName),
        (Some(m @ ("verify-ca" | "verify-full")), None) => {
            return Err(tls_error(
                format!("sslmode {m}"),
                "needs sslrootcert: the CA that signs the servers' certificates",
            ));
        }
        (Some(other), _) => {
            return Err(tls_error(
                format!("sslmode {other:?}"),
                "unknown; use disable, allow, prefer, require, verify-ca or verify-full",
            ));
        }
    };
    let provider = provider();
    let verifier: Arc<dyn ServerCertVerifier> = match (check, sslrootcert) {
        (Check::Nothing, _) | (_, None) => Arc::new(AnyCertificate {
            provider: provider.clone(),
        }),
        (check, Some(root)) => {
            let webpki = WebPkiServerVerifier::builder_with_provider(
                Arc::new(roots(root)?),
                provider.clone(),
            )
            .build()
            .map_err(|e| tls_error(format!("sslrootcert {}", root.source), e))?;
            match check {
                Check::ChainAndName => webpki,
                _ => Arc::new(ChainOnly { inner: webpki }),
            }
        }
    };
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_error("protocol versions", e))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(PgTls {
        mode,
        connector: Some(RustlsConnect {
            config: Arc::new(config),
        }),
    })
}

/// `sslmode=prefer`/`require` without a CA: encryption without
/// authentication, as libpq. Handshake signatures are still verified (the
/// peer must hold the key of the certificate it shows).
#[derive(Debug)]
struct AnyCertificate {
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// `sslmode=verify-ca`: the chain must lead to the CA; the name is not
/// checked (the only difference from `verify-full`).
#[derive(Debug)]
struct ChainOnly {
    inner: Arc<WebPkiServerVerifier>,
}

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            // webpki checks the name last, after the chain: a name error
            // means the chain was fine.
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// A [`MakeTlsConnect`] over rustls for `tokio-postgres`.
#[derive(Clone)]
pub struct RustlsConnect {
    config: Arc<ClientConfig>,
}

impl<S> MakeTlsConnect<S> for RustlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type TlsConnect = RustlsConnector;
    type Error = rustls::pki_types::InvalidDnsNameError;

    fn make_tls_connect(&mut self, domain: &str) -> Result<RustlsConnector, Self::Error> {
        // An IP address parses as one, so verify-full checks IP SANs.
        let name = ServerName::try_from(domain.to_owned())?;
        Ok(RustlsConnector {
            name,
            connector: tokio_rustls::TlsConnector::from(self.config.clone()),
        })
    }
}

/// One connection's TLS handshake.
pub struct RustlsConnector {
    name: ServerName<'static>,
    connector: tokio_rustls::TlsConnector,
}

impl<S> TlsConnect<S> for RustlsConnector
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<RustlsStream<S>>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            self.connector
                .connect(self.name, stream)
                .await
                .map(RustlsStream)
        })
    }
}

/// A TLS stream as `tokio-postgres` wants it.
pub struct RustlsStream<S>(tokio_rustls::client::TlsStream<S>);

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for RustlsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for RustlsStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> TlsStream for RustlsStream<S> {
    fn channel_binding(&self) -> ChannelBinding {
        ChannelBinding::none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_follow_libpq() {
        let mode = |m: Option<&str>| from_libpq(m, None).map(|t| t.mode);
        assert!(matches!(mode(None), Ok(SslMode::Disable)));
        assert!(matches!(mode(Some("disable")), Ok(SslMode::Disable)));
        assert!(matches!(mode(Some("prefer")), Ok(SslMode::Prefer)));
        assert!(matches!(mode(Some("require")), Ok(SslMode::Require)));
        let e = from_libpq(Some("verify-full"), None)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("needs sslrootcert"), "{e}");
        let e = from_libpq(Some("verify_full"), None)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("unknown"), "{e}");
    }

    #[test]
    fn a_root_bundle_without_a_certificate_is_named_in_the_error() {
        let root = RootCert {
            source: "Secret ems-db-monitor key ca.crt",
            pem: b"not a certificate",
        };
        let e = from_libpq(Some("verify-ca"), Some(root))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            e.contains("Secret ems-db-monitor key ca.crt") && e.contains("no certificate"),
            "{e}"
        );
    }
}
