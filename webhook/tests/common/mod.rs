//! Test and benchmark support: a minimal HTTPS/HTTP client over loopback,
//! a webhook started on port 0, and AdmissionReview bodies.
//!
//! The client is hyper's connection-level API over tokio-rustls, so tests
//! decide exactly when a connection (and a TLS handshake) is made: one per
//! request to observe certificate rotation, or one kept alive for load.

#![allow(dead_code, missing_docs, clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use counterweight_certs::{CertificateAuthority, LeafSpec, PemPair, Usage};
use counterweight_core::inject::InjectorConfig;
use counterweight_webhook::{CertStore, Handler, Listeners, NamespaceLabels, ServeOptions};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::net::{TcpListener, TcpStream};

/// A rustls client trusting only `ca_pem`, HTTP/1.1 over ALPN.
pub fn client_config(ca_pem: &str) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

/// Like [`client_config`], without TLS session resumption: a resumed session
/// reports the certificate of the session it resumes, not the one served now.
pub fn client_config_no_resume(ca_pem: &str) -> Arc<rustls::ClientConfig> {
    let mut config = (*client_config(ca_pem)).clone();
    config.resumption = rustls::client::Resumption::disabled();
    Arc::new(config)
}

/// An HTTP/1.1 connection to `addr` (TLS when `tls` is given). Also returns
/// the DER of the server's leaf certificate for TLS connections.
/// A TLS connection to `addr`, for tests that write raw HTTP.
pub async fn tls_stream(
    addr: SocketAddr,
    config: &Arc<rustls::ClientConfig>,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, String> {
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    tcp.set_nodelay(true).map_err(|e| e.to_string())?;
    let connector = tokio_rustls::TlsConnector::from(config.clone());
    let name = ServerName::IpAddress(addr.ip().into());
    connector
        .connect(name, tcp)
        .await
        .map_err(|e| format!("TLS handshake: {e}"))
}

pub async fn connect(
    addr: SocketAddr,
    tls: Option<&Arc<rustls::ClientConfig>>,
) -> Result<(SendRequest<Full<Bytes>>, Option<Vec<u8>>), String> {
    match tls {
        Some(config) => {
            let stream = tls_stream(addr, config).await?;
            let peer = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .map(|c| c.as_ref().to_vec());
            let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .map_err(|e| format!("HTTP handshake: {e}"))?;
            tokio::spawn(conn);
            Ok((sender, peer))
        }
        None => {
            let tcp = TcpStream::connect(addr)
                .await
                .map_err(|e| format!("connect: {e}"))?;
            tcp.set_nodelay(true).map_err(|e| e.to_string())?;
            let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
                .await
                .map_err(|e| format!("HTTP handshake: {e}"))?;
            tokio::spawn(conn);
            Ok((sender, None))
        }
    }
}

/// Sends one request on `sender` and reads the whole answer.
pub async fn send(
    sender: &mut SendRequest<Full<Bytes>>,
    method: &str,
    path: &str,
    body: Bytes,
) -> Result<(u16, Bytes), String> {
    sender
        .ready()
        .await
        .map_err(|e| format!("connection not ready: {e}"))?;
    let req = http::Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, "127.0.0.1")
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(body))
        .map_err(|e| e.to_string())?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| format!("request: {e}"))?;
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("body: {e}"))?
        .to_bytes();
    Ok((status, body))
}

/// A running webhook on loopback port 0.
pub struct Running {
    pub admission: SocketAddr,
    pub ops: SocketAddr,
    pub ca: CertificateAuthority,
    pub dir: tempfile::TempDir,
    pub handler: Arc<Handler>,
    pub stop: Option<tokio::sync::oneshot::Sender<()>>,
    pub task: tokio::task::JoinHandle<Result<(), counterweight_webhook::Error>>,
}

impl Running {
    pub fn ca_pem(&self) -> String {
        self.ca.pem().cert_pem.clone()
    }

    /// Writes a new serving pair the way kubelet updates a Secret volume:
    /// into a fresh directory, then an atomic rename of the `..data` symlink.
    pub fn rotate(&self, version: u32) -> PemPair {
        let pair = serving_pair(&self.ca);
        write_kubelet_style(self.dir.path(), &pair, version);
        pair
    }

    /// Triggers shutdown and waits for `serve` to return.
    pub async fn shutdown(mut self) -> Result<(), counterweight_webhook::Error> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.await.unwrap()
    }
}

pub fn serving_pair(ca: &CertificateAuthority) -> PemPair {
    ca.issue(&LeafSpec::new("webhook", Usage::Server).sans(["127.0.0.1", "localhost"]))
        .unwrap()
}

/// The kubelet's atomic-writer layout: `tls.crt -> ..data/tls.crt`,
/// `..data -> ..<version>`.
pub fn write_kubelet_style(root: &Path, pair: &PemPair, version: u32) {
    let versioned = root.join(format!("..v{version}"));
    std::fs::create_dir(&versioned).unwrap();
    pair.write(&versioned, "tls").unwrap();
    let tmp = root.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(format!("..v{version}"), &tmp).unwrap();
    std::fs::rename(&tmp, root.join("..data")).unwrap();
    for f in ["tls.crt", "tls.key"] {
        let link = root.join(f);
        if std::fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink(format!("..data/{f}"), &link).unwrap();
        }
    }
}

pub fn handler() -> Handler {
    Handler::new(
        InjectorConfig {
            cluster_name: "east".into(),
            ..Default::default()
        },
        NamespaceLabels::TrustSelector,
    )
}

/// Starts the webhook with a fresh CA and a kubelet-style cert directory.
pub async fn start(options: ServeOptions) -> Running {
    let ca = CertificateAuthority::new("webhook-test-ca").unwrap();
    let dir = tempfile::tempdir().unwrap();
    write_kubelet_style(dir.path(), &serving_pair(&ca), 0);
    let handler = Arc::new(handler());
    let certs = Arc::new(
        CertStore::load(
            &dir.path().join("tls.crt"),
            &dir.path().join("tls.key"),
            handler.metrics.clone(),
        )
        .unwrap(),
    );
    let admission = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let ops = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (admission_addr, ops_addr) = (admission.local_addr().unwrap(), ops.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(counterweight_webhook::serve(
        Listeners { admission, ops },
        certs,
        handler.clone(),
        options,
        async move {
            let _ = stopped.await;
        },
    ));
    Running {
        admission: admission_addr,
        ops: ops_addr,
        ca,
        dir,
        handler,
        stop: Some(stop),
        task,
    }
}

/// An AdmissionReview for a pod CREATE in `namespace`, with request `uid`.
pub fn pod_review(uid: &str, namespace: &str) -> Bytes {
    Bytes::from(
        serde_json::to_vec(&serde_json::json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": uid,
                "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "name": "",
                "namespace": namespace,
                "operation": "CREATE",
                "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
                "object": {
                    "apiVersion": "v1", "kind": "Pod",
                    "metadata": {"generateName": "web-7d9c-", "namespace": namespace,
                                 "labels": {"app": "web", "pod-template-hash": "7d9c"}},
                    "spec": {"containers": [{"name": "app", "image": "registry.invalid/web:1",
                                             "ports": [{"containerPort": 8080}]}]}
                },
                "oldObject": null,
                "dryRun": false
            }
        }))
        .unwrap(),
    )
}

/// The response part of an AdmissionReview body.
pub fn response_of(body: &[u8]) -> serde_json::Value {
    let v: serde_json::Value = serde_json::from_slice(body).unwrap();
    v["response"].clone()
}

/// The work of the benchmark's baseline endpoint for one request: what any
/// correct AdmissionReview endpoint must do at the least. It parses the whole
/// body (serde_json scans and validates every byte, building only the uid)
/// and answers an allowed AdmissionReview echoing the uid, without injecting.
/// `None` for a body without a `request.uid`.
pub fn bare_echo(body: &[u8]) -> Option<Vec<u8>> {
    use std::borrow::Cow;
    #[derive(serde::Deserialize)]
    struct ReviewIn<'a> {
        #[serde(borrow)]
        request: RequestIn<'a>,
    }
    #[derive(serde::Deserialize)]
    struct RequestIn<'a> {
        #[serde(borrow)]
        uid: Cow<'a, str>,
    }
    #[derive(serde::Serialize)]
    #[serde(rename_all = "camelCase")]
    struct ReviewOut<'a> {
        api_version: &'static str,
        kind: &'static str,
        response: ResponseOut<'a>,
    }
    #[derive(serde::Serialize)]
    struct ResponseOut<'a> {
        uid: &'a str,
        allowed: bool,
    }
    let review: ReviewIn<'_> = serde_json::from_slice(body).ok()?;
    serde_json::to_vec(&ReviewOut {
        api_version: "admission.k8s.io/v1",
        kind: "AdmissionReview",
        response: ResponseOut {
            uid: &review.request.uid,
            allowed: true,
        },
    })
    .ok()
}
