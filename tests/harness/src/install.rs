//! README.md's "Install on two clusters" guide, run as written, and the
//! infrastructure it assumes.
//!
//! This module owns two things. The guide runner: each step is the shell
//! block of README.md right after its `<!-- install-step: NAME -->` marker
//! ([`guide_step`], [`guide_steps`]), run with bash after a `cd` to the
//! install directory and the variables the guide asks a person to set
//! ([`script`], [`run_step`]). And what the guide leaves to the person's
//! infrastructure ([`Infra::start`]): two real-node clusters, `east` and
//! `west`, on one LAN whose nodes route like cluster nodes, the project's
//! images imported into each node's containerd (no registry is reachable),
//! the local volumes' directories, a kubeconfig with one context per
//! cluster, and a KWOK cluster for the witness's record. The e2e test
//! `real_install.rs` and `counterweight-demo --real-nodes` both install
//! through it, so the demo shows the same install the test keeps working.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::Api;

use crate::sample_data::Kubectl;
use crate::undo::sh_quote;
use crate::{Binaries, Cluster, HarnessError, Lan, Process, free_port};

/// The guide's steps before its check, in the order the guide gives them.
pub const STEPS: [&str; 7] = [
    "certs", "ha", "overlays", "secrets", "volumes", "apply", "witness",
];
/// The step that starts the witness: a long-running process, not a command.
pub const WITNESS_STEP: &str = "witness";
/// The guide's last step, run after the election: `cwctl status` and
/// `cwctl check`.
pub const CHECK_STEP: &str = "check";
/// The images the overlays name, imported into every node (no registry).
pub const IMAGES: [&str; 5] = [
    "controller",
    "webhook",
    "gate",
    "sync-postgres",
    "sync-rsync",
];
/// The tools the guide runs from `PATH` (built by cargo, one directory).
pub const TOOLS: [&str; 3] = ["cw-certs", "cwctl", "counterweight-controller"];
/// How long a guide step may take (kubectl waits for rollouts in `apply`).
pub const STEP_TIMEOUT: Duration = Duration::from_secs(300);

/// What can go wrong reading or running the guide.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    /// README.md lacks a step marker.
    #[error("README.md has no step {0:?} (<!-- install-step: {0} -->)")]
    NoStep(String),
    /// A step marker is not followed by a shell block.
    #[error("README.md's step {0:?} must be a ```sh block right after its marker")]
    NotShell(String),
    /// A step's block is empty.
    #[error("README.md's step {0:?} is empty")]
    EmptyStep(String),
    /// README.md's steps are not the ones this module runs.
    #[error("README.md's install steps {found:?} differ from the ones run here {expected:?}")]
    Steps {
        /// The markers in README.md, in order.
        found: Vec<String>,
        /// [`STEPS`] then [`CHECK_STEP`].
        expected: Vec<String>,
    },
    /// A step (or kubectl command) did not finish in time.
    #[error("{what} did not finish within {after:?}")]
    Timeout {
        /// The step or command.
        what: String,
        /// How long it was given.
        after: Duration,
    },
    /// A step (or kubectl command) exited non-zero.
    #[error("{what} failed ({status}):\n--- stdout\n{stdout}\n--- stderr\n{stderr}")]
    Failed {
        /// The step or command.
        what: String,
        /// Its exit status.
        status: String,
        /// Its standard output.
        stdout: String,
        /// Its standard error.
        stderr: String,
    },
    /// An image archive or a tool is not where it should be.
    #[error("{what} missing: {path} ({hint})")]
    Missing {
        /// What is missing.
        what: String,
        /// Where it was looked for.
        path: PathBuf,
        /// How to make it.
        hint: String,
    },
    /// A file or process operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Starting or using the clusters failed.
    #[error(transparent)]
    Harness(#[from] HarnessError),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> InstallError {
    let what = what.into();
    move |source| InstallError::Io { what, source }
}

/// README.md of this repository (the guide's source).
pub fn readme_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../README.md")
}

/// The repository's root (the guide runs against its `manifests/`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// README.md's text, read now (not at build time: the guide under test is
/// the one in the checkout).
pub fn read_readme() -> Result<String, InstallError> {
    let p = readme_path();
    std::fs::read_to_string(&p).map_err(io(format!("reading {}", p.display())))
}

/// The shell block of README.md marked `<!-- install-step: <name> -->`.
pub fn guide_step(readme: &str, name: &str) -> Result<String, InstallError> {
    let marker = format!("<!-- install-step: {name} -->");
    let mut lines = readme.lines().skip_while(|l| l.trim() != marker);
    if lines.next().is_none() {
        return Err(InstallError::NoStep(name.to_owned()));
    }
    if lines.next().map(str::trim) != Some("```sh") {
        return Err(InstallError::NotShell(name.to_owned()));
    }
    let block: Vec<&str> = lines.take_while(|l| l.trim() != "```").collect();
    if block.is_empty() {
        return Err(InstallError::EmptyStep(name.to_owned()));
    }
    Ok(block.join("\n") + "\n")
}

/// Every step marker in README.md, in order.
pub fn guide_steps(readme: &str) -> Vec<String> {
    readme
        .lines()
        .filter_map(|l| {
            l.trim()
                .strip_prefix("<!-- install-step: ")?
                .strip_suffix(" -->")
                .map(str::to_owned)
        })
        .collect()
}

/// Fails unless README.md's steps are exactly [`STEPS`] then
/// [`CHECK_STEP`]: a step gained or lost must be run here too.
pub fn check_steps(readme: &str) -> Result<(), InstallError> {
    let expected: Vec<String> = STEPS
        .iter()
        .chain([&CHECK_STEP])
        .map(|s| (*s).to_owned())
        .collect();
    let found = guide_steps(readme);
    if found == expected {
        Ok(())
    } else {
        Err(InstallError::Steps { found, expected })
    }
}

/// What a person types before the guide's commands: `cd` to the checkout
/// (here a directory with `manifests` linked in, so that nothing is written
/// into the source tree) and the variables, then the block itself.
pub fn script(work: &Path, vars: &[(String, String)], block: &str) -> String {
    let mut s = format!("cd {}\n", sh_quote(&work.display().to_string()));
    for (k, v) in vars {
        s.push_str(&format!("export {k}={}\n", sh_quote(v)));
    }
    s.push_str(block);
    s
}

/// Runs one guide step with bash (`-euo pipefail`), bounded by
/// [`STEP_TIMEOUT`]; how long it took, or its output when it failed.
pub async fn run_step(name: &str, script: &str) -> Result<Duration, InstallError> {
    let started = Instant::now();
    let mut bash = tokio::process::Command::new("bash");
    bash.args(["-euo", "pipefail", "-c", script]);
    run_bounded(bash, format!("guide step {name:?}"), STEP_TIMEOUT).await?;
    Ok(started.elapsed())
}

/// Runs `command` (no input; killed if dropped) for at most `timeout`; its
/// standard output, or why not: timed out, could not start (the program
/// is named), or exited
/// non-zero with both its outputs. `what` names it in the error.
pub(crate) async fn run_bounded(
    mut command: tokio::process::Command,
    what: String,
    timeout: Duration,
) -> Result<String, InstallError> {
    let program = command
        .as_std()
        .get_program()
        .to_string_lossy()
        .into_owned();
    let child = command
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(timeout, child)
        .await
        .map_err(|_| InstallError::Timeout {
            what: what.clone(),
            after: timeout,
        })?
        .map_err(io(format!("{what}: {program}")))?;
    if !out.status.success() {
        return Err(InstallError::Failed {
            what,
            status: out.status.to_string(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// How long the infrastructure took to come up.
#[derive(Debug, Clone, Copy)]
pub struct Timings {
    /// Both real-node clusters and the witness's KWOK cluster up.
    pub clusters_up: Duration,
    /// [`IMAGES`] imported into both nodes.
    pub imported: Duration,
}

/// The two real-node clusters, the witness's KWOK cluster, and the
/// directory the guide runs in. Dropping it tears the three clusters down
/// in parallel (every pod killed), then the LAN and the directory go. The
/// witness process ([`Infra::run_guide`]) is the caller's: drop it first.
pub struct Infra {
    /// Where the witness process (the guide's `witness` step) logs.
    pub witness_log: PathBuf,
    /// The real-node cluster that starts active (priority 2).
    pub east: Cluster,
    /// The other real-node cluster.
    pub west: Cluster,
    /// A KWOK cluster where the witness keeps its record.
    pub witness_cluster: Cluster,
    /// The LAN both nodes and this process are on.
    pub lan: Arc<Lan>,
    /// The directory the guide runs in (`manifests` linked in, `install/`
    /// written there, the volumes' directories).
    pub work: tempfile::TempDir,
    /// The variables the guide asks a person to set, `PATH` and
    /// `KUBECONFIG` first.
    pub vars: Vec<(String, String)>,
    /// The kubectl binary of the control planes.
    pub kubectl: PathBuf,
    /// A kubeconfig with contexts `east` and `west`.
    pub kubeconfig: PathBuf,
}

impl Infra {
    /// Starts what the guide assumes: both real-node clusters and the
    /// witness's cluster, routes like cluster nodes, imports [`IMAGES`] from
    /// `images` (tools/images.sh's directory) into both nodes, and makes the
    /// volumes' directories, the kubeconfig and the variables. `tools_dir`
    /// holds [`TOOLS`]. `progress` hears a line before each slow part.
    pub async fn start(
        images: &Path,
        tools_dir: &Path,
        progress: &mut dyn FnMut(&str),
    ) -> Result<(Self, Timings), InstallError> {
        for i in IMAGES {
            let path = images.join(format!("{i}.tar"));
            if !path.is_file() {
                return Err(InstallError::Missing {
                    what: format!("image {i}"),
                    path,
                    hint: "tools/images.sh makes it".into(),
                });
            }
        }
        for b in TOOLS {
            let path = tools_dir.join(b);
            if !path.is_file() {
                return Err(InstallError::Missing {
                    what: b.into(),
                    path,
                    hint: "cargo build -p counterweight-certs -p counterweight-cli -p counterweight-controller".into(),
                });
            }
        }
        let bins = Binaries::locate()?;

        progress(
            "starting real-node clusters east and west (control plane, containerd, kubelet, kube-proxy) and a KWOK cluster for the witness's record",
        );
        let begun = Instant::now();
        let real = crate::start_real_named(&["east", "west"]);
        let (real, witness_cluster) = tokio::join!(real, Cluster::start(bins.clone(), "witness"));
        let (lan, mut clusters) = real?;
        let witness_cluster = witness_cluster?;
        let (Some(west), Some(east)) = (clusters.pop(), clusters.pop()) else {
            return Err(InstallError::Io {
                what: "starting the real-node clusters".into(),
                source: std::io::Error::other("fewer than two clusters started"),
            });
        };
        let clusters_up = begun.elapsed();
        for c in [&east, &west] {
            real_node(c)?.route_like_a_node()?;
        }

        progress(&format!(
            "importing the images ({}) into both nodes' containerd (no registry)",
            IMAGES.join(", ")
        ));
        let t = Instant::now();
        for c in [&east, &west] {
            for i in IMAGES {
                real_node(c)?.import_image(&images.join(format!("{i}.tar")))?;
            }
        }
        let imported = t.elapsed();

        let work = tempfile::Builder::new()
            .prefix("counterweight-install-")
            .tempdir()
            .map_err(io("creating the install directory"))?;
        let manifests = repo_root().join("manifests");
        let manifests = manifests
            .canonicalize()
            .map_err(io(format!("locating {}", manifests.display())))?;
        std::os::unix::fs::symlink(&manifests, work.path().join("manifests"))
            .map_err(io("linking manifests into the install directory"))?;
        let pv_dir = work.path().join("volumes");
        for c in ["east", "west"] {
            for v in ["ems-db", "ems-files"] {
                let d = pv_dir.join(c).join(v);
                std::fs::create_dir_all(&d).map_err(io(format!("creating {}", d.display())))?;
            }
        }
        let kubeconfig = work.path().join("kubeconfig");
        crate::write_kubeconfig_of(&[&east, &west], &kubeconfig)?;
        let kubectl = bins.kubectl();
        let kubectl_dir = kubectl.parent().unwrap_or(Path::new("/"));
        let path = format!(
            "{}:{}:{}",
            tools_dir.display(),
            kubectl_dir.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let vars: Vec<(String, String)> = [
            ("PATH", path),
            ("KUBECONFIG", kubeconfig.display().to_string()),
            ("EAST_ADDR", real_node(&east)?.addr().to_string()),
            ("WEST_ADDR", real_node(&west)?.addr().to_string()),
            ("WITNESS_ADDR", lan.host_addr().to_string()),
            ("WITNESS_PORT", free_port()?.to_string()),
            ("WITNESS_METRICS", format!("127.0.0.1:{}", free_port()?)),
            ("REGISTRY", "counterweight".into()),
            ("TAG", "dev".into()),
            ("BUSYBOX_IMAGE", crate::BUSYBOX_IMAGE.to_owned()),
            ("PV_DIR", pv_dir.display().to_string()),
            (
                "WITNESS_KUBECONFIG",
                witness_cluster.kubeconfig().display().to_string(),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        Ok((
            Self {
                witness_log: work.path().join("witness.log"),
                east,
                west,
                witness_cluster,
                lan,
                work,
                vars,
                kubectl,
                kubeconfig,
            },
            Timings {
                clusters_up,
                imported,
            },
        ))
    }

    /// The script of guide step `name`: `cd`, the variables, the block.
    pub fn step_script(&self, readme: &str, name: &str) -> Result<String, InstallError> {
        Ok(script(
            self.work.path(),
            &self.vars,
            &guide_step(readme, name)?,
        ))
    }

    /// Runs [`STEPS`] in order, each bounded by [`STEP_TIMEOUT`]; the
    /// `witness` step becomes a [`Process`] logging to
    /// [`Infra::witness_log`], returned with each other step's duration.
    /// `done` hears each step as it finishes.
    pub async fn run_guide(
        &self,
        readme: &str,
        done: &mut dyn FnMut(&str, Duration),
    ) -> Result<(Vec<(&'static str, Duration)>, Process), InstallError> {
        let mut took = Vec::new();
        let mut witness = None;
        for name in STEPS {
            let s = self.step_script(readme, name)?;
            if name == WITNESS_STEP {
                let mut p = Process::spawn(
                    "witness",
                    Path::new("bash"),
                    &["-euo".into(), "pipefail".into(), "-c".into(), s],
                    &self.witness_log,
                )?;
                p.tail_on_panic();
                witness = Some(p);
                done(name, Duration::ZERO);
                continue;
            }
            let d = run_step(name, &s).await?;
            done(name, d);
            took.push((name, d));
        }
        let witness = witness.ok_or_else(|| InstallError::NoStep(WITNESS_STEP.into()))?;
        Ok((took, witness))
    }

    /// kubectl with this install's kubeconfig, a context per cluster.
    pub fn tool(&self) -> Kubectl {
        Kubectl {
            bin: self.kubectl.clone(),
            kubeconfig: self.kubeconfig.clone(),
        }
    }

    /// Runs kubectl with `args` against `context` (bounded by 30 s); its
    /// standard output, or why not.
    pub async fn kubectl(&self, context: &str, args: &[&str]) -> Result<String, InstallError> {
        self.tool().run_checked(context, args).await
    }

    /// A kubectl command line for `context` (split at whitespace), its
    /// output and errors as text, for diagnostics.
    pub fn kubectl_text(&self, context: &str, args: &str) -> String {
        let out = std::process::Command::new(&self.kubectl)
            .arg(format!("--kubeconfig={}", self.kubeconfig.display()))
            .arg(format!("--context={context}"))
            .args(args.split_whitespace())
            .output();
        match out {
            Ok(o) => format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(e) => format!("kubectl: {e}"),
        }
    }

    /// What the clusters look like, for a failed wait: the state records,
    /// every pod, recent Events, the controllers' and the witness's logs.
    pub fn explain(&self) -> String {
        let mut s = String::new();
        for c in ["east", "west"] {
            s.push_str(&format!("\n===== {c}\n"));
            s.push_str(&self.kubectl_text(
                c,
                "-n counterweight-system get configmap counterweight-state -o jsonpath={.data}",
            ));
            s.push('\n');
            s.push_str(&self.kubectl_text(c, "get pods -A -o wide"));
            s.push_str(&self.kubectl_text(c, "get events -A --sort-by=.lastTimestamp"));
            s.push_str(&self.kubectl_text(
                c,
                "-n counterweight-system logs -l app.kubernetes.io/name=counterweight-controller --tail=30 --prefix",
            ));
            s.push_str(&self.kubectl_text(
                c,
                "-n ems logs -l app.kubernetes.io/name=ems-db --all-containers --tail=15 --prefix",
            ));
            s.push_str(&self.kubectl_text(
                c,
                "-n ems logs -l app.kubernetes.io/name=ems-files --all-containers --tail=10 --prefix",
            ));
        }
        s.push_str(&format!(
            "\n===== witness log\n{}",
            crate::tail(&self.witness_log)
        ));
        s
    }

    /// The ConfigMaps of `counterweight-system` in `cluster` (the state
    /// record is one).
    pub fn cms(&self, cluster: &Cluster) -> Api<ConfigMap> {
        Api::namespaced(cluster.client(), "counterweight-system")
    }

    /// What teardown must remove, to check it did: the nodes' network
    /// namespaces, the links (nodes' host ends and the bridge), and the
    /// directories (clusters' and the install's).
    pub fn leftovers_to_check(&self) -> Leftovers {
        let nodes = [&self.east, &self.west];
        Leftovers {
            namespaces: nodes
                .iter()
                .filter_map(|c| c.real_node())
                .map(|n| n.namespaces().name().to_owned())
                .collect(),
            links: nodes
                .iter()
                .filter_map(|c| c.real_node())
                .map(|n| n.link().host_if().to_owned())
                .chain([self.lan.bridge().to_owned()])
                .collect(),
            dirs: [&self.east, &self.west, &self.witness_cluster]
                .iter()
                .map(|c| c.dir().to_owned())
                .chain([self.work.path().to_owned()])
                .collect(),
        }
    }
}

impl Drop for Infra {
    fn drop(&mut self) {
        // The clusters' teardowns in parallel (each stops its processes
        // with a grace period, then a real node kills its containers and
        // removes its cgroups, mounts and namespaces); one after the other
        // takes twice as long. The fields' drops then remove the rest.
        let (east, west, witness) = (&mut self.east, &mut self.west, &mut self.witness_cluster);
        let t = Instant::now();
        let timed = |c: &mut Cluster| {
            c.teardown();
            tracing::debug!(cluster = c.name(), took = ?t.elapsed(), "torn down");
        };
        std::thread::scope(|s| {
            s.spawn(|| timed(east));
            s.spawn(|| timed(west));
            timed(witness);
        });
    }
}

/// What an [`Infra`] made on the host, named so that its absence can be
/// checked after teardown.
#[derive(Debug, Clone)]
pub struct Leftovers {
    /// Network (and mount) namespace names of the nodes.
    pub namespaces: Vec<String>,
    /// Host interfaces: the nodes' veth ends and the LAN bridge.
    pub links: Vec<String>,
    /// Directories of the clusters and of the install.
    pub dirs: Vec<PathBuf>,
}

impl Leftovers {
    /// What is still there: namespaces, mount namespaces, links,
    /// directories, and processes whose command line names a directory.
    pub fn remaining(&self) -> Vec<String> {
        let mut left = Vec::new();
        for n in &self.namespaces {
            if Path::new("/run/netns").join(n).exists() {
                left.push(format!("network namespace {n}"));
            }
            if Path::new(crate::netns::MNT_DIR).join(n).exists() {
                left.push(format!("mount namespace {n}"));
            }
        }
        for i in &self.links {
            if Path::new("/sys/class/net").join(i).exists() {
                left.push(format!("link {i}"));
            }
        }
        for d in &self.dirs {
            if d.exists() {
                left.push(format!("directory {}", d.display()));
            }
        }
        let dirs: Vec<String> = self.dirs.iter().map(|d| d.display().to_string()).collect();
        for p in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let cmdline = std::fs::read(p.path().join("cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if dirs.iter().any(|d| cmdline.contains(d.as_str())) {
                left.push(format!(
                    "process {}: {cmdline}",
                    p.file_name().to_string_lossy()
                ));
            }
        }
        left
    }
}

fn real_node(c: &Cluster) -> Result<&crate::RealNode, InstallError> {
    c.real_node().ok_or_else(|| InstallError::Io {
        what: format!("cluster {}", c.name()),
        source: std::io::Error::other("not a real-node cluster"),
    })
}

/// Whether the active's record says it heard `peer` in the last
/// `within_ms` as a standby eligible for a handover (its database and files
/// current: the HA view `cwctl status` shows, read through core's codec);
/// the view otherwise.
pub async fn hears_eligible(
    active: &Api<ConfigMap>,
    peer: &str,
    within_ms: u64,
) -> Result<(), String> {
    hears_standby(active, peer, within_ms, true).await
}

/// Whether the active's record says it heard `peer` in the last
/// `within_ms` as a standby that may **not** take over (its health, or its
/// data as the live active confirmed, says no); the view otherwise.
pub async fn hears_ineligible(
    active: &Api<ConfigMap>,
    peer: &str,
    within_ms: u64,
) -> Result<(), String> {
    hears_standby(active, peer, within_ms, false).await
}

async fn hears_standby(
    active: &Api<ConfigMap>,
    peer: &str,
    within_ms: u64,
    eligible: bool,
) -> Result<(), String> {
    use counterweight_core::state::StateRecord;
    let cm = active
        .get_opt(counterweight_core::names::STATE_CONFIGMAP)
        .await
        .map_err(|e| e.to_string())?
        .ok_or("no state record")?;
    let record = StateRecord::from_data(cm.data.as_ref());
    let view = record
        .ha
        .ok_or_else(|| format!("no readable HA view: {:?}", record.unreadable))?;
    if view.hears_standby(peer, within_ms) == Some(eligible) {
        Ok(())
    } else {
        Err(format!("{view:?}"))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const README: &str = "intro\n<!-- install-step: a -->\n```sh\necho a\n```\n\
        text\n<!-- install-step: b -->\n```sh\n```\n<!-- install-step: c -->\nno block\n";

    #[test]
    fn steps_are_read_in_order_and_malformed_ones_are_errors() {
        assert_eq!(guide_steps(README), ["a", "b", "c"]);
        assert_eq!(guide_step(README, "a").unwrap(), "echo a\n");
        assert!(matches!(
            guide_step(README, "b"),
            Err(InstallError::EmptyStep(_))
        ));
        assert!(matches!(
            guide_step(README, "c"),
            Err(InstallError::NotShell(_))
        ));
        assert!(matches!(
            guide_step(README, "d"),
            Err(InstallError::NoStep(_))
        ));
        assert!(matches!(
            check_steps(README),
            Err(InstallError::Steps { .. })
        ));
    }

    #[test]
    fn the_repository_readme_has_exactly_the_steps_run_here() {
        let readme = read_readme().unwrap();
        check_steps(&readme).unwrap();
        for s in STEPS.iter().chain([&CHECK_STEP]) {
            guide_step(&readme, s).unwrap();
        }
    }

    #[test]
    fn a_script_changes_directory_and_quotes_its_variables() {
        let s = script(
            Path::new("/tmp/x y"),
            &[("A".into(), "it's".into())],
            "echo $A\n",
        );
        assert_eq!(s, "cd '/tmp/x y'\nexport A='it'\\''s'\necho $A\n");
    }
}
