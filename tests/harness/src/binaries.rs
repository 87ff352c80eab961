//! Where the control-plane and node binaries come from.
//!
//! They are built from the Go module proxy by `tools/controlplane/build.sh`
//! (control planes) and `tools/controlplane/node.sh` (kubelet, kube-proxy;
//! it also installs Debian's container runtime) into a cache outside the
//! checkout. Tests find them through `COUNTERWEIGHT_CONTROLPLANE_BIN` and
//! `COUNTERWEIGHT_NODE_BIN`, or run the scripts themselves (a no-op when the
//! cache is warm).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use crate::HarnessError;

/// Environment variable naming the directory that holds the binaries.
pub const BIN_DIR_ENV: &str = "COUNTERWEIGHT_CONTROLPLANE_BIN";

/// The directory holding etcd, kube-apiserver, kube-controller-manager,
/// kube-scheduler, kwok and kubectl.
#[derive(Debug, Clone)]
pub struct Binaries {
    dir: PathBuf,
}

const NAMES: [&str; 6] = [
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kwok",
    // Not a control-plane process: the manifests test renders the Kustomize
    // tree and applies it with the kubectl of the apiserver's exact version.
    "kubectl",
];

impl Binaries {
    /// Finds the binaries, building them once per process if needed.
    pub fn locate() -> Result<Self, HarnessError> {
        static FOUND: OnceLock<Result<PathBuf, String>> = OnceLock::new();
        let found = FOUND.get_or_init(|| find().map_err(|e| e.to_string()));
        match found {
            Ok(dir) => Ok(Self { dir: dir.clone() }),
            Err(e) => Err(HarnessError::Binaries(e.clone())),
        }
    }

    /// Uses the binaries in `dir` as they are.
    pub fn in_dir(dir: impl Into<PathBuf>) -> Result<Self, HarnessError> {
        let dir = dir.into();
        check(&dir)?;
        Ok(Self { dir })
    }

    /// Path of one binary.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Path of kubectl, built at the same version as kube-apiserver.
    pub fn kubectl(&self) -> PathBuf {
        self.path("kubectl")
    }
}

/// Runs `tools/controlplane/<script>` and returns the directory it prints
/// last: where the binaries it built or found are.
fn run_build_script(script: &str) -> Result<PathBuf, HarnessError> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tools/controlplane")
        .join(script);
    let out = Command::new("bash")
        .arg(&script)
        .output()
        .map_err(|e| HarnessError::io(format!("running {}", script.display()), e))?;
    if !out.status.success() {
        return Err(HarnessError::Binaries(format!(
            "{} failed ({}):\n{}",
            script.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    Ok(PathBuf::from(
        stdout.lines().last().unwrap_or_default().trim(),
    ))
}

fn find() -> Result<PathBuf, HarnessError> {
    if let Some(dir) = std::env::var_os(BIN_DIR_ENV) {
        let dir = PathBuf::from(dir);
        check(&dir)?;
        return Ok(dir);
    }
    let dir = run_build_script("build.sh")?;
    check(&dir)?;
    Ok(dir)
}

fn check(dir: &Path) -> Result<(), HarnessError> {
    let missing: Vec<&str> = NAMES
        .iter()
        .copied()
        .filter(|n| !dir.join(n).is_file())
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(HarnessError::Binaries(format!(
            "{} lacks {}; run tools/controlplane/build.sh",
            dir.display(),
            missing.join(", ")
        )))
    }
}

/// Environment variable naming the directory that holds kubelet and kube-proxy.
pub const NODE_BIN_DIR_ENV: &str = "COUNTERWEIGHT_NODE_BIN";

/// kubelet and kube-proxy at the control planes' version, built by
/// `tools/controlplane/node.sh`, which also installs the container runtime (Debian's
/// containerd, runc, CNI plugins). Found through `COUNTERWEIGHT_NODE_BIN`, or by running the
/// script (a no-op when the cache is warm).
#[derive(Debug, Clone)]
pub struct NodeBinaries {
    dir: PathBuf,
}

impl NodeBinaries {
    /// Finds the node binaries, building them once per process if needed.
    pub fn locate() -> Result<Self, HarnessError> {
        static FOUND: OnceLock<Result<PathBuf, String>> = OnceLock::new();
        let found = FOUND.get_or_init(|| find_node().map_err(|e| e.to_string()));
        match found {
            Ok(dir) => Ok(Self { dir: dir.clone() }),
            Err(e) => Err(HarnessError::Binaries(e.clone())),
        }
    }

    /// Path of kubelet.
    pub fn kubelet(&self) -> PathBuf {
        self.dir.join("kubelet")
    }

    /// Path of kube-proxy.
    pub fn kube_proxy(&self) -> PathBuf {
        self.dir.join("kube-proxy")
    }
}

fn find_node() -> Result<PathBuf, HarnessError> {
    let dir = match std::env::var_os(NODE_BIN_DIR_ENV) {
        Some(dir) => PathBuf::from(dir),
        None => run_build_script("node.sh")?,
    };
    let mut missing: Vec<String> = ["kubelet", "kube-proxy"]
        .iter()
        .filter(|n| !dir.join(n).is_file())
        .map(|n| dir.join(n).display().to_string())
        .collect();
    for tool in [
        "/usr/bin/containerd",
        "/usr/bin/ctr",
        "/usr/sbin/runc",
        "/usr/lib/cni/bridge",
        "/usr/lib/cni/host-local",
        "/usr/lib/cni/loopback",
        "/usr/lib/cni/portmap",
        "/bin/busybox",
    ] {
        if !Path::new(tool).exists() {
            missing.push(tool.to_owned());
        }
    }
    if missing.is_empty() {
        Ok(dir)
    } else {
        Err(HarnessError::Binaries(format!(
            "missing {}; run tools/controlplane/node.sh as root",
            missing.join(", ")
        )))
    }
}
