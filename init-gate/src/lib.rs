//! The Counterweight init-gate: the FIG. 6 wait loop as an init container.
//!
//! It watches its cluster's `counterweight-state` ConfigMap and exits 0 only
//! once the cluster is active, so that service pods in a standby cluster stay
//! "running but not providing service". Every failure (missing ConfigMap,
//! garbage content, RBAC, API server down) means: keep waiting. Before it
//! exits 0 it writes the epoch it was released under to a file in a shared
//! `emptyDir`, so the application (and the controller) can tell which
//! activation a pod started under.
//!
//! # Exit codes
//!
//! | code | meaning |
//! |---|---|
//! | 0 | the cluster is active; the epoch file was written |
//! | 2 | bad command line (from clap) |
//! | 73 | `EX_CANTCREAT`: the epoch file could not be written (the pod must not start) |
//! | 70 | `EX_SOFTWARE`: `--hold` mode could not run (no release epoch, port taken) |
//! | 75 | `EX_TEMPFAIL`: `--timeout` elapsed while the cluster was not active |
//! | 78 | `EX_CONFIG`: no usable Kubernetes client configuration |
//! | 143 | stopped by SIGTERM or SIGINT (128 + 15, as a shell reports it) |
//!
//! The decision itself ([`decision::decide`]) is a pure function; the loop
//! around it ([`wait`]) only gathers observations.

pub mod backoff;
pub mod decision;
pub mod hold;
pub mod ratelimit;
pub mod wait;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use counterweight_core::inject::env as inject_env;
use counterweight_core::names;

/// Default epoch file, in the scratch volume the webhook mounts at
/// [`counterweight_core::inject::RUN_MOUNT_PATH`]. Spelled out because joining constants at compile time
/// needs a macro crate; a test checks the two agree.
pub const DEFAULT_EPOCH_FILE: &str = "/var/run/counterweight/epoch";
/// Where the kubelet collects a container's termination message.
pub const DEFAULT_TERMINATION_LOG: &str = "/dev/termination-log";
/// Default lease file of `hold` mode, in the same scratch volume.
pub const DEFAULT_LEASE_FILE: &str = counterweight_core::inject::LEASE_FILE_PATH;
/// Default readiness address of `hold` mode.
pub const DEFAULT_READY_LISTEN: &str = "0.0.0.0:9877";

/// Exit code after release.
pub const EXIT_RELEASED: u8 = 0;
/// Exit code when the epoch file cannot be written (sysexits `EX_CANTCREAT`).
pub const EXIT_CANTCREAT: u8 = 73;
/// Exit code when `--timeout` elapses (sysexits `EX_TEMPFAIL`).
pub const EXIT_TIMEOUT: u8 = 75;
/// Exit code when no Kubernetes client can be configured (sysexits `EX_CONFIG`).
pub const EXIT_CONFIG: u8 = 78;
/// Exit code when `hold` mode cannot run (sysexits `EX_SOFTWARE`): the
/// kubelet restarts the sidecar, and the pod stays unready meanwhile.
pub const EXIT_HOLD: u8 = 70;
/// Exit code after SIGTERM or SIGINT (128 + SIGTERM).
pub const EXIT_TERMINATED: u8 = 143;

/// Command-line and environment configuration of the gate.
///
/// The admission webhook sets these through the environment of the
/// injected init container; the flags are for tests and debugging.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "counterweight-gate", version, about, long_about = None)]
pub struct Args {
    /// Name of the cluster this pod expects to run in; used in log lines.
    #[arg(long, env = inject_env::EXPECTED_CLUSTER, default_value = "local")]
    pub cluster: String,

    /// This pod's name (downward API); used in log lines.
    #[arg(long, env = inject_env::POD_NAME)]
    pub pod_name: Option<String>,

    /// This pod's namespace (downward API); used in log lines.
    #[arg(long, env = inject_env::POD_NAMESPACE)]
    pub pod_namespace: Option<String>,

    /// Namespace of the state ConfigMap.
    #[arg(long, env = inject_env::STATE_NAMESPACE, default_value = names::SYSTEM_NAMESPACE)]
    pub state_namespace: String,

    /// Name of the state ConfigMap.
    #[arg(long, env = inject_env::STATE_NAME, default_value = names::STATE_CONFIGMAP)]
    pub state_name: String,

    /// Kubeconfig to use instead of the pod's service account.
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,

    /// FIG. 6 polling interval, used only while a watch cannot be established.
    #[arg(long, env = "COUNTERWEIGHT_POLL_INTERVAL", default_value = "1s", value_parser = counterweight_core::policy::parse_duration)]
    pub poll_interval: Duration,

    /// Give up after this long and exit 75 (EX_TEMPFAIL); waits forever if unset.
    #[arg(long, env = "COUNTERWEIGHT_GATE_TIMEOUT", value_parser = counterweight_core::policy::parse_duration)]
    pub timeout: Option<Duration>,

    /// File the release epoch is written to before exiting 0.
    #[arg(long, env = inject_env::EPOCH_FILE, default_value = DEFAULT_EPOCH_FILE)]
    pub epoch_file: PathBuf,

    /// The kubelet's termination message file. On release the gate writes
    /// the release epoch there, so the controller can restart a pod
    /// released in an epoch its cluster no longer serves. Written only if
    /// it exists (the kubelet creates it), never created.
    #[arg(long, env = "COUNTERWEIGHT_TERMINATION_LOG", default_value = DEFAULT_TERMINATION_LOG)]
    pub termination_log: PathBuf,

    /// Run as the lease sidecar (`hold` mode, a native sidecar after the
    /// gate): follow the serving lease into the lease file and the
    /// readiness endpoint instead of waiting for release.
    #[arg(long, env = inject_env::HOLD)]
    pub hold: bool,

    /// `hold` mode: the file the application reads its serving lease from.
    #[arg(long, env = inject_env::LEASE_FILE, default_value = DEFAULT_LEASE_FILE)]
    pub lease_file: PathBuf,

    /// `hold` mode: where readiness probes are answered.
    #[arg(long, env = inject_env::READY_LISTEN, default_value = DEFAULT_READY_LISTEN)]
    pub ready_listen: std::net::SocketAddr,

    /// `hold` mode: name of the serving lease ConfigMap, in the state's namespace.
    #[arg(long, env = inject_env::SERVING_NAME, default_value = counterweight_core::serving::SERVING_CONFIGMAP)]
    pub serving_name: String,

    /// Log level: error, warn, info, debug or trace.
    #[arg(long, env = "COUNTERWEIGHT_LOG_LEVEL", default_value = "info")]
    pub log_level: tracing::Level,
}

/// Why the gate did not release the pod.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No Kubernetes client could be configured.
    #[error("cannot configure a Kubernetes client ({what}): {source}")]
    Config {
        /// Which configuration source failed.
        what: String,
        /// The underlying error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// `--timeout` elapsed before the cluster became active.
    #[error("gave up after {0:?}: the cluster did not become active")]
    TimedOut(Duration),
    /// A termination signal arrived before release.
    #[error("terminated before the cluster became active")]
    Terminated,
    /// `hold` mode could not run.
    #[error(transparent)]
    Hold(#[from] hold::HoldError),
    /// The cluster is active but the epoch file could not be written, so
    /// the pod must not start (the controller could not tell its epoch).
    #[error("cannot write the epoch file {path}: {source}")]
    EpochFile {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    /// The process exit code for this outcome (see the crate docs).
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Hold(_) => EXIT_HOLD,
            Error::Config { .. } => EXIT_CONFIG,
            Error::TimedOut(_) => EXIT_TIMEOUT,
            Error::Terminated => EXIT_TERMINATED,
            Error::EpochFile { .. } => EXIT_CANTCREAT,
        }
    }
}

/// How the gate released the pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Released {
    /// The epoch the cluster was active in.
    pub epoch: u64,
    /// How long the gate waited.
    pub after: Duration,
}

/// Builds the client: the kubeconfig if one is given, else the pod's
/// service account (in-cluster configuration).
pub async fn client(args: &Args) -> Result<kube::Client, Error> {
    let config = match &args.kubeconfig {
        Some(path) => {
            let kubeconfig =
                kube::config::Kubeconfig::read_from(path).map_err(|e| Error::Config {
                    what: format!("reading {}", path.display()),
                    source: Box::new(e),
                })?;
            kube::Config::from_custom_kubeconfig(
                kubeconfig,
                &kube::config::KubeConfigOptions::default(),
            )
            .await
            .map_err(|e| Error::Config {
                what: format!("loading {}", path.display()),
                source: Box::new(e),
            })?
        }
        None => kube::Config::incluster().map_err(|e| Error::Config {
            what: "in-cluster service account".to_owned(),
            source: Box::new(e),
        })?,
    };
    kube::Client::try_from(config).map_err(|e| Error::Config {
        what: "building the client".to_owned(),
        source: Box::new(e),
    })
}

/// Waits until the cluster is active, then writes the epoch file.
///
/// Returns early with [`Error::Terminated`] when `shutdown` resolves and with
/// [`Error::TimedOut`] when `--timeout` elapses; it never returns `Ok`
/// unless the state ConfigMap said `active`.
pub async fn run(
    args: Args,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<Released, Error> {
    let started = Instant::now();
    let target = wait::Target {
        cluster: args.cluster.clone(),
        namespace: args.state_namespace.clone(),
        name: args.state_name.clone(),
        poll_interval: args.poll_interval,
    };
    tracing::info!(
        cluster = %target.cluster,
        pod = %format!(
            "{}/{}",
            args.pod_namespace.as_deref().unwrap_or("-"),
            args.pod_name.as_deref().unwrap_or("-")
        ),
        configmap = %format!("{}/{}", target.namespace, target.name),
        "gate starting"
    );
    let waiting = async {
        let client = client(&args).await?;
        Ok::<u64, Error>(wait::wait_active(client, &target).await)
    };
    let timeout = async {
        match args.timeout {
            Some(t) => tokio::time::sleep(t).await,
            None => std::future::pending().await,
        }
    };
    // Shutdown first: a pod being deleted must not start its application.
    let epoch = tokio::select! {
        biased;
        () = shutdown => return Err(Error::Terminated),
        () = timeout => return Err(Error::TimedOut(args.timeout.unwrap_or_default())),
        epoch = waiting => epoch?,
    };
    write_epoch_file(&args.epoch_file, epoch)?;
    write_termination_message(&args.termination_log, epoch);
    let after = started.elapsed();
    tracing::info!(
        cluster = %args.cluster,
        epoch,
        "released: cluster {} is active (epoch {epoch}) after {:.3}s",
        args.cluster,
        after.as_secs_f64()
    );
    Ok(Released { epoch, after })
}

/// Runs `hold` mode (see [`hold`]) until `shutdown`.
pub async fn run_hold(
    args: Args,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), Error> {
    let client = client(&args).await?;
    let cfg = hold::HoldConfig {
        cluster: args.cluster.clone(),
        namespace: args.state_namespace.clone(),
        name: args.serving_name.clone(),
        epoch_file: args.epoch_file.clone(),
        lease_file: args.lease_file.clone(),
        ready_listen: args.ready_listen,
    };
    hold::run(client, cfg, shutdown).await?;
    Ok(())
}

/// Writes the release message for `epoch` into the kubelet's termination
/// message file, if there is one. Best effort: a pod without it only loses
/// the controller's check of its release epoch, and the lease sidecar
/// still holds it out of service.
pub fn write_termination_message(path: &Path, epoch: u64) {
    let file = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path);
    let written = file.and_then(|mut f| {
        std::io::Write::write_all(
            &mut f,
            counterweight_core::serving::release_message(epoch).as_bytes(),
        )
    });
    if let Err(e) = written {
        tracing::debug!(path = %path.display(), error = %e, "no termination message written");
    }
}

/// Writes `epoch` and a newline to `path`, atomically: a reader sees either
/// no file or the whole number, never a partial write.
pub fn write_epoch_file(path: &Path, epoch: u64) -> Result<(), Error> {
    let err = |source| Error::EpochFile {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, format!("{epoch}\n")).map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn durations_parse_with_units_and_reject_garbage() {
        // The flags share the policy's duration syntax.
        let parse = counterweight_core::policy::parse_duration;
        assert_eq!(parse("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse("3"), Ok(Duration::from_secs(3)));
        assert_eq!(parse("1m"), Ok(Duration::from_secs(60)));
        assert!(parse("1d").unwrap_err().contains("unknown unit"));
        assert!(parse("x").is_err());
    }

    #[test]
    fn defaults_follow_the_design_names() {
        let a = Args::try_parse_from(["counterweight-gate"]).unwrap();
        assert_eq!(a.state_namespace, "counterweight-system");
        assert_eq!(a.state_name, counterweight_core::names::STATE_CONFIGMAP);
        assert_eq!(a.poll_interval, Duration::from_secs(1));
        assert_eq!(a.timeout, None);
    }

    #[test]
    fn default_epoch_file_is_in_the_injected_scratch_volume() {
        assert_eq!(
            Path::new(DEFAULT_EPOCH_FILE).parent(),
            Some(Path::new(counterweight_core::inject::RUN_MOUNT_PATH))
        );
    }

    #[test]
    fn the_termination_message_is_written_only_into_an_existing_file() {
        let dir = std::env::temp_dir().join(format!("cw-gate-term-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let missing = dir.join("termination-log");
        write_termination_message(&missing, 3);
        assert!(!missing.exists(), "never created");
        std::fs::write(&missing, "old and longer content").expect("file");
        write_termination_message(&missing, 3);
        let text = std::fs::read_to_string(&missing).expect("read");
        assert_eq!(counterweight_core::serving::release_epoch(&text), Some(3));
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn hold_defaults_match_what_the_webhook_injects() {
        let listen: std::net::SocketAddr = DEFAULT_READY_LISTEN.parse().expect("address");
        assert_eq!(
            listen.port(),
            counterweight_core::inject::DEFAULT_READY_PORT
        );
        assert_eq!(
            Path::new(DEFAULT_LEASE_FILE).parent(),
            Some(Path::new(counterweight_core::inject::RUN_MOUNT_PATH))
        );
    }

    #[test]
    fn reads_the_environment_the_webhook_injects() {
        // Setting process environment variables in a test races with other
        // tests, so check the declared names instead of parsing an environment.
        use clap::CommandFactory;
        let cmd = Args::command();
        let env_of = |id: &str| {
            cmd.get_arguments()
                .find(|a| a.get_id() == id)
                .and_then(|a| a.get_env())
                .map(|e| e.to_string_lossy().into_owned())
        };
        assert_eq!(
            env_of("cluster").as_deref(),
            Some("COUNTERWEIGHT_EXPECTED_CLUSTER")
        );
        assert_eq!(
            env_of("state_namespace").as_deref(),
            Some("COUNTERWEIGHT_STATE_NAMESPACE")
        );
        assert_eq!(
            env_of("state_name").as_deref(),
            Some("COUNTERWEIGHT_STATE_NAME")
        );
        assert_eq!(
            env_of("epoch_file").as_deref(),
            Some("COUNTERWEIGHT_EPOCH_FILE")
        );
        assert_eq!(
            env_of("pod_name").as_deref(),
            Some("COUNTERWEIGHT_POD_NAME")
        );
        assert!(
            cmd.get_arguments()
                .filter(|a| a.get_id() != "help" && a.get_id() != "version")
                .all(|a| a.get_env().is_some()),
            "every flag has an env"
        );
    }

    #[test]
    fn exit_codes_are_distinct_and_nonzero() {
        let codes = [
            Error::Config {
                what: String::new(),
                source: "x".into(),
            }
            .exit_code(),
            Error::TimedOut(Duration::ZERO).exit_code(),
            Error::Terminated.exit_code(),
            Error::EpochFile {
                path: PathBuf::new(),
                source: std::io::Error::other("x"),
            }
            .exit_code(),
        ];
        assert_eq!(codes, [78, 75, 143, 73]);
    }

    #[test]
    fn epoch_file_is_written_whole_and_replaced() {
        let dir = std::env::temp_dir().join(format!("cw-gate-test-{}", std::process::id()));
        let path = dir.join("sub/epoch");
        write_epoch_file(&path, 41).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "41\n");
        write_epoch_file(&path, 42).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "42\n");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn shutdown_wins_and_timeout_gives_up() {
        // A kubeconfig pointing at a closed loopback port: the gate can only wait.
        let dir = std::env::temp_dir().join(format!("cw-gate-run-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let kc = dir.join("kubeconfig");
        std::fs::write(
            &kc,
            "apiVersion: v1\nkind: Config\nclusters: [{name: c, cluster: {server: 'http://127.0.0.1:1'}}]\n\
             users: [{name: u, user: {}}]\ncontexts: [{name: c, context: {cluster: c, user: u}}]\ncurrent-context: c\n",
        )
        .unwrap();
        let args = |extra: &[&str]| {
            let mut v = vec![
                "counterweight-gate".to_owned(),
                format!("--kubeconfig={}", kc.display()),
                format!("--epoch-file={}", dir.join("epoch").display()),
            ];
            v.extend(extra.iter().map(|s| (*s).to_owned()));
            Args::try_parse_from(v).unwrap()
        };
        let r = run(args(&[]), async {}).await;
        assert!(matches!(r, Err(Error::Terminated)), "{r:?}");
        let r = run(args(&["--timeout=300ms"]), std::future::pending()).await;
        assert!(matches!(r, Err(Error::TimedOut(_))), "{r:?}");
        assert!(!dir.join("epoch").exists(), "no epoch file without release");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
