//! Entry point of `counterweight-controller`: the flags (clap) become a
//! [`Config`], and the library runs it until SIGTERM or Ctrl-C.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use counterweight_controller::leader::{self, LeaderConfig};
use counterweight_controller::serving::{self, PodServingConfig};
use counterweight_controller::{Config, Controller, HaSettings};
use counterweight_core::names;

/// Command-line and environment configuration of the controller.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "counterweight-controller", version, about, long_about = None)]
struct Args {
    /// Name of the cluster this controller runs in; peers know it by this name.
    #[arg(long, env = "COUNTERWEIGHT_CLUSTER")]
    cluster: String,

    /// Namespace that holds the state and policy ConfigMaps.
    #[arg(long, env = "COUNTERWEIGHT_NAMESPACE", default_value = names::SYSTEM_NAMESPACE)]
    namespace: String,

    /// Kubeconfig to use instead of the in-cluster service account.
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: Option<PathBuf>,

    /// Address the peer protocol (HTTPS, mutual TLS) listens on.
    #[arg(
        long,
        env = "COUNTERWEIGHT_PEER_LISTEN",
        default_value = "0.0.0.0:9443"
    )]
    peer_listen: SocketAddr,

    /// Address of the plain-HTTP /healthz, /readyz and /metrics endpoints.
    #[arg(
        long,
        env = "COUNTERWEIGHT_METRICS_LISTEN",
        default_value = "0.0.0.0:9090"
    )]
    metrics_listen: SocketAddr,

    /// A peer controller as `name=https://host:port`; repeat for each peer.
    #[arg(long = "peer", env = "COUNTERWEIGHT_PEERS", value_delimiter = ',')]
    peers: Vec<String>,

    /// PEM certificate chain this controller presents to its peers.
    #[arg(long, env = "COUNTERWEIGHT_TLS_CERT")]
    tls_cert: Option<PathBuf>,

    /// PEM private key for `--tls-cert`.
    #[arg(long, env = "COUNTERWEIGHT_TLS_KEY")]
    tls_key: Option<PathBuf>,

    /// PEM CA bundle that peer certificates must chain to.
    #[arg(long, env = "COUNTERWEIGHT_TLS_CA")]
    tls_ca: Option<PathBuf>,

    /// Run as the HA config's witness: no pod watch, health or workload
    /// effects, only votes for the peers. Must agree with the config's
    /// `witness`, so a typo cannot turn a workload cluster into a voter.
    #[arg(long, env = "COUNTERWEIGHT_WITNESS")]
    witness: bool,

    /// HA group configuration (YAML or JSON): clusters with priorities, the
    /// witness, and lease timings. Without it the controller only evaluates
    /// health.
    #[arg(long, env = "COUNTERWEIGHT_HA_CONFIG")]
    ha_config: Option<PathBuf>,

    /// Run several replicas safely: only the holder of the Lease
    /// `--leader-election-lease` acts; the others wait, NotReady.
    #[arg(long, env = "COUNTERWEIGHT_LEADER_ELECT")]
    leader_elect: bool,

    /// Name of the leader Lease in `--namespace`.
    #[arg(
        long,
        env = "COUNTERWEIGHT_LEADER_ELECTION_LEASE",
        default_value = leader::DEFAULT_LEASE
    )]
    leader_election_lease: String,

    /// This replica's identity in the Lease; the pod name in a Deployment.
    #[arg(long, env = "POD_NAME")]
    leader_election_identity: Option<String>,

    /// How long a silent leader's Lease must sit unchanged before another
    /// replica takes over.
    #[arg(long, env = "COUNTERWEIGHT_LEADER_LEASE_DURATION", default_value = "15s", value_parser = duration_arg)]
    leader_lease_duration: Duration,

    /// How long the leader keeps acting without renewing; shorter than the
    /// lease duration.
    #[arg(long, env = "COUNTERWEIGHT_LEADER_RENEW_DEADLINE", default_value = "10s", value_parser = duration_arg)]
    leader_renew_deadline: Duration,

    /// How often the leader renews and followers look again.
    #[arg(long, env = "COUNTERWEIGHT_LEADER_RETRY_PERIOD", default_value = "2s", value_parser = duration_arg)]
    leader_retry_period: Duration,

    /// Service pods patched (serving condition) or evicted at the same
    /// time. Past 32 the API server's write rate, not this, bounds the
    /// fence, the promotion and the restarts.
    #[arg(
        long,
        env = "COUNTERWEIGHT_POD_CONCURRENCY",
        default_value_t = serving::DEFAULT_CONCURRENCY,
        value_parser = clap::value_parser!(u16).range(1..)
    )]
    pod_concurrency: u16,

    /// How long the eviction of a service pod of a demoted cluster is
    /// retried while it is refused (a PodDisruptionBudget allowing no
    /// disruption) before the pod is deleted outright.
    #[arg(
        long,
        env = "COUNTERWEIGHT_FORCE_DELETE_AFTER",
        default_value_t = FlagDuration(serving::DEFAULT_DELETE_AFTER),
        value_parser = flag_duration
    )]
    force_delete_after: FlagDuration,
}

/// A duration flag whose default is a library constant: shown in `--help`
/// as it is written on the command line (`30s`).
#[derive(Debug, Clone, Copy)]
struct FlagDuration(Duration);

impl std::fmt::Display for FlagDuration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&counterweight_core::policy::format_duration(self.0))
    }
}

fn flag_duration(text: &str) -> Result<FlagDuration, String> {
    duration_arg(text).map(FlagDuration)
}

fn duration_arg(text: &str) -> Result<Duration, String> {
    counterweight_core::policy::parse_duration(text)
}

impl From<Args> for Config {
    fn from(a: Args) -> Self {
        let leader = a.leader_elect.then(|| LeaderConfig {
            namespace: a.namespace.clone(),
            name: a.leader_election_lease,
            identity: a.leader_election_identity.unwrap_or_default(),
            lease: a.leader_lease_duration,
            renew_deadline: a.leader_renew_deadline,
            retry: a.leader_retry_period,
        });
        let ha = a.ha_config.map(|config_file| HaSettings {
            config_file,
            witness: a.witness,
            peer_listen: a.peer_listen,
            peers: a.peers,
            tls_cert: a.tls_cert,
            tls_key: a.tls_key,
            tls_ca: a.tls_ca,
            pods: PodServingConfig {
                concurrency: usize::from(a.pod_concurrency),
                delete_after: a.force_delete_after.0,
                ..Default::default()
            },
        });
        Config {
            cluster: a.cluster,
            namespace: a.namespace,
            kubeconfig: a.kubeconfig,
            metrics_listen: a.metrics_listen,
            leader,
            ha,
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    rustls::crypto::ring::default_provider()
        .install_default()
        .map_err(|_| anyhow::anyhow!("a rustls crypto provider was already installed"))?;
    let args = Args::parse();
    if args.witness && args.ha_config.is_none() {
        anyhow::bail!(
            "--witness needs --ha-config: the witness is named in the HA group's configuration"
        );
    }
    counterweight_runtime::logging::init("info", counterweight_runtime::logging::Output::Stdout);
    // Kubernetes stops pods with SIGTERM; Ctrl-C is for humans. Either way
    // the leader hands its Lease back on the way out.
    let shutdown = counterweight_runtime::shutdown::on_signal()?;
    Controller::new(args.into()).run(shutdown).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    const BASE: [&str; 5] = [
        "counterweight-controller",
        "--cluster",
        "east",
        "--ha-config",
        "/etc/counterweight/ha.yaml",
    ];

    fn config(extra: &[&str]) -> Result<Config, clap::Error> {
        Args::try_parse_from(BASE.iter().chain(extra)).map(Config::from)
    }

    fn pods(extra: &[&str]) -> PodServingConfig {
        config(extra)
            .expect("the flags parse")
            .ha
            .expect("--ha-config makes a member")
            .pods
    }

    #[test]
    fn the_pod_flags_default_to_the_librarys_tunables() {
        let default = PodServingConfig::default();
        let got = pods(&[]);
        assert_eq!(got.concurrency, default.concurrency);
        assert_eq!(got.delete_after, default.delete_after);
        let help = Args::command().render_long_help().to_string();
        for shown in [
            format!("[default: {}]", serving::DEFAULT_CONCURRENCY),
            format!(
                "[default: {}]",
                counterweight_core::policy::format_duration(serving::DEFAULT_DELETE_AFTER)
            ),
        ] {
            assert!(help.contains(&shown), "{shown} not in:\n{help}");
        }
    }

    #[test]
    fn the_pod_flags_reach_the_pod_effects() {
        let got = pods(&["--pod-concurrency", "128", "--force-delete-after", "2m"]);
        assert_eq!(got.concurrency, 128);
        assert_eq!(got.delete_after, Duration::from_secs(120));
    }

    #[test]
    fn bad_pod_flags_are_refused_by_name() {
        for (flag, value) in [
            ("--pod-concurrency", "0"),
            ("--pod-concurrency", "70000"),
            ("--force-delete-after", "30x"),
        ] {
            let e = config(&[flag, value]).expect_err(value).to_string();
            assert!(e.contains(flag) && e.contains(value), "{e}");
        }
    }
}
