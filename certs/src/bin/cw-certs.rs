//! `cw-certs`: makes the development certificates Counterweight needs.
//!
//! Production clusters should use cert-manager (see `manifests/`); this tool is
//! for the demo, the tests and a first try on a laptop.

use std::path::PathBuf;

use anyhow::Context;
use base64::Engine;
use clap::{Parser, Subcommand};
use counterweight_certs::{CertificateAuthority, LeafSpec, Usage};

/// Make development certificates for Counterweight: one CA, the webhook's
/// serving certificate (with the caBundle to paste into the webhook
/// configurations) and one mTLS identity per cluster controller.
#[derive(Parser, Debug)]
#[command(name = "cw-certs", version)]
struct Args {
    /// Directory the PEM files are written to; created if missing.
    #[arg(long, env = "CW_CERTS_OUT", default_value = "certs/dev")]
    out: PathBuf,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create ca.crt/ca.key, a webhook serving cert, and one peer cert per
    /// cluster, then print the webhook caBundle (base64 of ca.crt).
    Dev {
        /// Namespace of the webhook Service (for the serving cert's DNS SANs).
        #[arg(
            long,
            env = "CW_CERTS_NAMESPACE",
            default_value = "counterweight-system"
        )]
        namespace: String,
        /// Name of the webhook Service.
        #[arg(
            long,
            env = "CW_CERTS_SERVICE",
            default_value = "counterweight-webhook"
        )]
        service: String,
        /// Cluster names; each gets `peer-<name>.crt` with SAN `<name>.peers.counterweight.dev`.
        #[arg(
            long,
            env = "CW_CERTS_CLUSTERS",
            value_delimiter = ',',
            default_value = "east,west"
        )]
        clusters: Vec<String>,
        /// Days the leaf certificates stay valid.
        #[arg(long, env = "CW_CERTS_DAYS", default_value_t = 365)]
        days: i64,
        /// PostgreSQL server certificates for the sample's `ems-db`, as
        /// `name=host[;host...]`, comma-separated: each gets `db-<name>.crt`
        /// and `db-<name>.key` valid for every host given (addresses or DNS
        /// names: what the other cluster dials, since replication verifies
        /// the name with `sslmode=verify-full`).
        #[arg(long, env = "CW_CERTS_DB", value_delimiter = ',')]
        db: Vec<String>,
    },
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    match args.command {
        Command::Dev {
            namespace,
            service,
            clusters,
            days,
            db,
        } => {
            std::fs::create_dir_all(&args.out)
                .with_context(|| format!("creating {}", args.out.display()))?;
            let ca = CertificateAuthority::new("counterweight-dev-ca")?;
            ca.pem().write(&args.out, "ca")?;
            let valid = time::Duration::days(days);
            let webhook = ca.issue(
                &LeafSpec::new(format!("{service}.{namespace}.svc"), Usage::Server)
                    .sans([
                        service.clone(),
                        format!("{service}.{namespace}"),
                        format!("{service}.{namespace}.svc"),
                        format!("{service}.{namespace}.svc.cluster.local"),
                        "localhost".into(),
                        "127.0.0.1".into(),
                    ])
                    .valid_for(valid),
            )?;
            webhook.write(&args.out, "webhook")?;
            for cluster in &clusters {
                let peer = ca.issue(
                    &LeafSpec::new(cluster.clone(), Usage::Peer)
                        .sans([
                            format!("{cluster}.peers.counterweight.dev"),
                            "localhost".into(),
                            "127.0.0.1".into(),
                        ])
                        .valid_for(valid),
                )?;
                peer.write(&args.out, &format!("peer-{cluster}"))?;
            }
            for spec in &db {
                let (name, hosts) = spec.split_once('=').with_context(|| {
                    format!("--db {spec:?}: expected name=host[;host...], e.g. east=10.0.1.10")
                })?;
                let hosts: Vec<String> = hosts
                    .split(';')
                    .map(str::trim)
                    .filter(|h| !h.is_empty())
                    .map(str::to_owned)
                    .collect();
                anyhow::ensure!(!hosts.is_empty(), "--db {spec:?}: no host for {name}");
                ca.issue(
                    &LeafSpec::new(format!("ems-db-{name}"), Usage::Server)
                        .sans(hosts)
                        .valid_for(valid),
                )?
                .write(&args.out, &format!("db-{name}"))?;
            }
            eprintln!("wrote certificates to {}", args.out.display());
            println!(
                "{}",
                base64::engine::general_purpose::STANDARD.encode(ca.pem().cert_pem.as_bytes())
            );
        }
    }
    Ok(())
}
