//! Development certificate authority for Counterweight.
//!
//! This crate owns every certificate the project makes for itself: the CA and
//! leaf certificates of the local test clusters (apiserver serving, admin
//! client), the webhook's serving certificate, and the peer mTLS identities of
//! the controllers. Production clusters use cert-manager instead; this is for
//! tests, the demo and first steps. Keys are ECDSA P-256, certificates carry
//! the SANs their verifiers check, and everything is written as PEM.

use std::net::IpAddr;
use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use time::{Duration, OffsetDateTime};

/// Everything that can go wrong while making or writing certificates.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// rcgen refused the parameters or could not sign.
    #[error("could not generate {what}: {source}")]
    Generate {
        /// Which certificate or key was being made.
        what: String,
        /// The underlying rcgen error.
        #[source]
        source: rcgen::Error,
    },
    /// A SAN could not be turned into a DNS name.
    #[error("invalid subject alternative name {name:?}: {source}; use a DNS name or an IP address")]
    San {
        /// The offending name.
        name: String,
        /// The underlying rcgen error.
        #[source]
        source: rcgen::Error,
    },
    /// The leaf's description cannot be made into a certificate.
    #[error("cannot issue {common_name:?}: {message}")]
    Spec {
        /// The leaf's common name.
        common_name: String,
        /// What is wrong, and what to do instead.
        message: String,
    },
    /// Writing a PEM file failed.
    #[error("could not write {path}: {source}; check that the directory exists and is writable")]
    Write {
        /// The file that could not be written.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

/// A certificate and its private key, both PEM encoded.
#[derive(Clone)]
pub struct PemPair {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// The PKCS#8 private key, PEM.
    pub key_pem: String,
}

impl std::fmt::Debug for PemPair {
    // Never print private keys, even in test failure output.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PemPair")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

impl PemPair {
    /// Writes `<stem>.crt` and `<stem>.key` into `dir`.
    pub fn write(&self, dir: &Path, stem: &str) -> Result<(), CertError> {
        write_file(&dir.join(format!("{stem}.crt")), &self.cert_pem)?;
        write_file(&dir.join(format!("{stem}.key")), &self.key_pem)
    }
}

/// What a leaf certificate is for; decides its extended key usages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usage {
    /// TLS server only (webhook, apiserver).
    Server,
    /// TLS client only (kubeconfig users).
    Client,
    /// Both: controller peers serve and call each other with one identity.
    Peer,
}

/// How a leaf certificate should look.
#[derive(Debug, Clone)]
pub struct LeafSpec {
    /// Subject common name.
    pub common_name: String,
    /// Subject organizations; Kubernetes maps these to groups.
    pub organizations: Vec<String>,
    /// DNS names and IP addresses, as strings; IPs are detected.
    pub sans: Vec<String>,
    /// Server, client, or both.
    pub usage: Usage,
    /// Validity from now.
    pub valid_for: Duration,
}

impl LeafSpec {
    /// A leaf with the given common name and usage, valid for a year, no SANs.
    pub fn new(common_name: impl Into<String>, usage: Usage) -> Self {
        Self {
            common_name: common_name.into(),
            organizations: Vec::new(),
            sans: Vec::new(),
            usage,
            valid_for: Duration::days(365),
        }
    }

    /// Adds subject alternative names.
    pub fn sans<I, S>(mut self, sans: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.sans.extend(sans.into_iter().map(Into::into));
        self
    }

    /// Sets the subject organization (a Kubernetes group for client certs).
    /// At most one: [`CertificateAuthority::issue`] refuses a second.
    pub fn organization(mut self, org: impl Into<String>) -> Self {
        self.organizations.push(org.into());
        self
    }

    /// Sets the validity period, counted from now.
    pub fn valid_for(mut self, valid_for: Duration) -> Self {
        self.valid_for = valid_for;
        self
    }
}

/// A certificate authority that can sign leaves. Keeps its key in memory.
pub struct CertificateAuthority {
    issuer: Issuer<'static, KeyPair>,
    pem: PemPair,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("pem", &self.pem)
            .finish_non_exhaustive()
    }
}

impl CertificateAuthority {
    /// Makes a new self-signed CA named `common_name`, valid for ten years.
    pub fn new(common_name: &str) -> Result<Self, CertError> {
        let key = generate_key(common_name)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = name(common_name, &[]);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::hours(1);
        params.not_after = now + Duration::days(3650);
        let cert = params
            .self_signed(&key)
            .map_err(|source| CertError::Generate {
                what: format!("CA {common_name}"),
                source,
            })?;
        let pem = PemPair {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        };
        Ok(Self {
            issuer: Issuer::new(params, key),
            pem,
        })
    }

    /// Loads a CA written earlier by [`PemPair::write`].
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, CertError> {
        let load = |source| CertError::Generate {
            what: "CA from PEM".into(),
            source,
        };
        let key = KeyPair::from_pem(key_pem).map_err(load)?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key).map_err(load)?;
        Ok(Self {
            issuer,
            pem: PemPair {
                cert_pem: cert_pem.to_owned(),
                key_pem: key_pem.to_owned(),
            },
        })
    }

    /// The CA certificate and key as PEM.
    pub fn pem(&self) -> &PemPair {
        &self.pem
    }

    /// Issues a leaf certificate signed by this CA.
    pub fn issue(&self, spec: &LeafSpec) -> Result<PemPair, CertError> {
        if spec.organizations.len() > 1 {
            // rcgen keeps one value per subject attribute: a second
            // organization would silently replace the first.
            return Err(CertError::Spec {
                common_name: spec.common_name.clone(),
                message: format!(
                    "{} organizations given, but a certificate made here carries one \
                     (rcgen keeps one value per subject attribute); pick the group the \
                     RBAC binding names",
                    spec.organizations.len()
                ),
            });
        }
        let key = generate_key(&spec.common_name)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = name(&spec.common_name, &spec.organizations);
        params.subject_alt_names = spec.sans.iter().map(|s| san(s)).collect::<Result<_, _>>()?;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = match spec.usage {
            Usage::Server => vec![ExtendedKeyUsagePurpose::ServerAuth],
            Usage::Client => vec![ExtendedKeyUsagePurpose::ClientAuth],
            Usage::Peer => vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
        };
        let now = OffsetDateTime::now_utc();
        // Backdate a little: clocks of freshly started processes disagree by
        // milliseconds, and a certificate "not yet valid" fails confusingly.
        params.not_before = now - Duration::minutes(5);
        params.not_after = now + spec.valid_for;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|source| CertError::Generate {
                what: format!("certificate {}", spec.common_name),
                source,
            })?;
        Ok(PemPair {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// A bare key pair, PEM encoded, for uses that need no certificate
/// (the Kubernetes service-account token signing key).
#[derive(Clone)]
pub struct PemKey {
    /// PKCS#8 private key, PEM.
    pub private_pem: String,
    /// SubjectPublicKeyInfo, PEM.
    pub public_pem: String,
}

impl std::fmt::Debug for PemKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PemKey")
            .field("public_pem", &self.public_pem)
            .finish_non_exhaustive()
    }
}

/// Generates an ECDSA P-256 key pair.
pub fn key_pair(purpose: &str) -> Result<PemKey, CertError> {
    let key = generate_key(purpose)?;
    Ok(PemKey {
        private_pem: key.serialize_pem(),
        public_pem: key.public_key_pem(),
    })
}

/// Writes `contents` to `path`, creating or truncating it.
pub fn write_file(path: &Path, contents: &str) -> Result<(), CertError> {
    std::fs::write(path, contents).map_err(|source| CertError::Write {
        path: path.display().to_string(),
        source,
    })
}

fn generate_key(what: &str) -> Result<KeyPair, CertError> {
    KeyPair::generate().map_err(|source| CertError::Generate {
        what: format!("key for {what}"),
        source,
    })
}

fn name(common_name: &str, organizations: &[String]) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    for org in organizations {
        dn.push(DnType::OrganizationName, org.as_str());
    }
    dn
}

fn san(name: &str) -> Result<SanType, CertError> {
    if let Ok(ip) = name.parse::<IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    let dns = name.try_into().map_err(|source| CertError::San {
        name: name.to_owned(),
        source,
    })?;
    Ok(SanType::DnsName(dns))
}

#[cfg(test)]
mod tests {
    use super::*;
    use x509_parser::prelude::*;

    fn parse(pem: &str) -> Vec<u8> {
        let (_, p) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
        p.contents
    }

    #[test]
    fn a_second_organization_is_refused_not_dropped() {
        let ca = CertificateAuthority::new("test-ca").unwrap();
        let spec = LeafSpec::new("olga", Usage::Client)
            .organization("a")
            .organization("b");
        let e = ca.issue(&spec).unwrap_err().to_string();
        assert!(e.contains("olga") && e.contains("2 organizations"), "{e}");
    }

    #[test]
    fn leaf_is_signed_by_ca_and_carries_sans_and_groups() {
        let ca = CertificateAuthority::new("test-ca").unwrap();
        let leaf = ca
            .issue(
                &LeafSpec::new("admin", Usage::Client)
                    .organization("system:masters")
                    .sans(["127.0.0.1", "localhost"]),
            )
            .unwrap();
        let ca_der = parse(&ca.pem().cert_pem);
        let leaf_der = parse(&leaf.cert_pem);
        let (_, ca_cert) = X509Certificate::from_der(&ca_der).unwrap();
        let (_, leaf_cert) = X509Certificate::from_der(&leaf_der).unwrap();
        leaf_cert
            .verify_signature(Some(ca_cert.public_key()))
            .expect("leaf must verify against the CA key");
        assert!(ca_cert.is_ca());
        assert!(!leaf_cert.is_ca());
        let org = leaf_cert
            .subject()
            .iter_organization()
            .next()
            .unwrap()
            .as_str()
            .unwrap();
        assert_eq!(org, "system:masters");
        let sans = leaf_cert.subject_alternative_name().unwrap().unwrap();
        let names: Vec<String> = sans
            .value
            .general_names
            .iter()
            .map(|g| format!("{g}"))
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
        let eku = leaf_cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.client_auth && !eku.server_auth);
    }

    #[test]
    fn bad_san_is_named_in_the_error() {
        let ca = CertificateAuthority::new("test-ca").unwrap();
        let err = ca
            .issue(&LeafSpec::new("x", Usage::Server).sans(["bücher.example"]))
            .unwrap_err();
        assert!(err.to_string().contains("bücher.example"), "{err}");
    }

    #[test]
    fn debug_never_prints_private_keys() {
        let ca = CertificateAuthority::new("test-ca").unwrap();
        let dbg = format!("{:?} {:?}", ca, key_pair("sa").unwrap());
        assert!(!dbg.contains("PRIVATE KEY"), "{dbg}");
    }
}
