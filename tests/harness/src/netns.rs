//! Network and mount namespaces that the harness creates, enters and removes.
//!
//! A real-node cluster runs every one of its processes (etcd, the API server, containerd,
//! kubelet, kube-proxy and, through containerd, its pods) inside one [`Namespaces`]: a named
//! network namespace (`ip netns add`, so `ip -n` and `ip netns pids` see it) and a persistent
//! mount namespace (`unshare --mount=<file>`, kept alive by a bind mount of its nsfs file under
//! [`MNT_DIR`], which must itself be a private mount). Processes enter both with `nsenter`, which
//! `exec`s the program: the pid the harness holds is the program's own.
//!
//! The mount namespace is private: bind mounts made in it (the kubelet's fixed
//! `/var/lib/kubelet`, `/run/containerd`, `/run/netns`, `/var/log/pods`, `/etc/resolv.conf`) and
//! every mount the kubelet and containerd make (volumes, overlay rootfs, pod netns files) stay in
//! it and vanish with it. The network namespace starts with only `lo`; IPv6 and forwarding are
//! off in it, so nothing in it can route anywhere the harness did not link it to ([`crate::lan`]).
//!
//! Removal (kill every process left in the network namespace, unmount the mount namespace,
//! delete the network namespace) is an [`Undo`] step, so it also happens when the test process
//! is SIGKILLed.

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::HarnessError;
use crate::undo::{Undo, sh_quote};

/// The private mount under which the persistent mount namespaces are pinned.
pub const MNT_DIR: &str = "/run/counterweight/mnt";

/// A named network namespace and a mount namespace owned by the harness.
#[derive(Debug)]
pub struct Namespaces {
    name: String,
    mnt: PathBuf,
}

/// A bind mount made inside the mount namespace: `source` (a host path) shows at `target`.
#[derive(Debug, Clone)]
pub struct Bind {
    /// What to show.
    pub source: PathBuf,
    /// Where, inside the mount namespace.
    pub target: PathBuf,
}

impl Namespaces {
    /// Creates network namespace `name` and a mount namespace with `binds`, registering their
    /// removal with `undo`. `name` must be unique among live namespaces (the harness puts its
    /// pid in it).
    pub fn create(name: &str, binds: &[Bind], undo: &mut Undo) -> Result<Self, HarnessError> {
        let mnt = PathBuf::from(MNT_DIR).join(name);
        let q = sh_quote(name);
        let qm = sh_quote(&mnt.display().to_string());
        // Registered before anything exists: every step tolerates what is missing.
        undo.push(format!("ip netns del {q} 2>/dev/null || true"))?;
        undo.push(format!("umount {qm} 2>/dev/null; rm -f {qm}"))?;
        // Kill whatever still runs in the namespace (bounded: 50 rounds of 0.1 s).
        undo.push(format!(
            "for i in $(seq 50); do p=$(ip netns pids {q} 2>/dev/null); [ -z \"$p\" ] && break; \
             kill -9 $p 2>/dev/null; sleep 0.1; done"
        ))?;
        run_sh(
            &format!("ip netns add {q}"),
            &format!("creating network namespace {name}"),
        )?;
        let mut setup = String::from("set -e\n");
        for b in binds {
            let s = sh_quote(&b.source.display().to_string());
            let t = sh_quote(&b.target.display().to_string());
            if b.source.is_file() {
                setup.push_str(&format!("mount --bind {s} {t}\n"));
            } else {
                setup.push_str(&format!("mkdir -p {s} {t}\nmount --bind {s} {t}\n"));
            }
        }
        let m = sh_quote(MNT_DIR);
        run_sh(
            &format!(
                "set -e\nmkdir -p {m}\n\
                 mountpoint -q {m} || mount --bind {m} {m}\n\
                 mount --make-private {m}\n\
                 touch {qm}\n\
                 unshare --mount={qm} --propagation private sh -c {}",
                sh_quote(&setup)
            ),
            &format!("creating mount namespace {name}"),
        )?;
        let ns = Self {
            name: name.to_owned(),
            mnt,
        };
        // lo up; no IPv6 (no router solicitations, no link-local chatter); no forwarding.
        ns.run(
            "ip link set lo up\n\
             sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1\n\
             sysctl -qw net.ipv4.ip_forward=0",
        )?;
        Ok(ns)
    }

    /// The network namespace's name (`ip -n <name>`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Path of the network namespace file.
    pub fn net_path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// Path of the file pinning the mount namespace.
    pub fn mnt_path(&self) -> &Path {
        &self.mnt
    }

    /// `program args...` wrapped so that it runs in both namespaces: the program and
    /// arguments to give [`std::process::Command`] or [`crate::Process::spawn`].
    pub fn wrap(&self, program: &Path, args: &[String]) -> (PathBuf, Vec<String>) {
        let mut all = vec![
            format!("--net={}", self.net_path().display()),
            format!("--mount={}", self.mnt.display()),
            "--".to_owned(),
            program.display().to_string(),
        ];
        all.extend(args.iter().cloned());
        (PathBuf::from("nsenter"), all)
    }

    /// Runs `script` with `sh -e` inside both namespaces and returns its stdout.
    pub fn run(&self, script: &str) -> Result<String, HarnessError> {
        let (prog, args) = self.wrap(
            Path::new("sh"),
            &["-ec".to_owned(), script.to_owned(), "counterweight".into()],
        );
        let out = Command::new(prog)
            .args(args)
            .output()
            .map_err(|e| HarnessError::io(format!("running in {}", self.name), e))?;
        if !out.status.success() {
            return Err(HarnessError::Command {
                what: format!("in namespace {}: {script}", self.name),
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs `f` on a thread that has entered the network namespace (not the mount namespace):
    /// sockets it opens belong to the namespace and stay there after the thread ends.
    pub fn in_net<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T, HarnessError> {
        let file = std::fs::File::open(self.net_path())
            .map_err(|e| HarnessError::io(format!("opening {}", self.net_path().display()), e))?;
        std::thread::scope(|s| {
            s.spawn(|| {
                nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(|e| HarnessError::io("entering a network namespace", e.into()))?;
                Ok(f())
            })
            .join()
            .map_err(|_| {
                HarnessError::io(
                    "a thread in a network namespace",
                    std::io::Error::other("panicked"),
                )
            })?
        })
    }

    /// The processes that run in the network namespace (`ip netns pids`).
    pub fn pids(&self) -> Vec<u32> {
        Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .split_whitespace()
                    .filter_map(|p| p.parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// Runs `script` with `sh` on the host; an error names `what` and carries stderr.
pub fn run_sh(script: &str, what: &str) -> Result<String, HarnessError> {
    let out = Command::new("sh")
        .args(["-c", script])
        .output()
        .map_err(|e| HarnessError::io(what, e))?;
    if !out.status.success() {
        return Err(HarnessError::Command {
            what: what.to_owned(),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn namespaces_isolate_network_and_mounts_and_vanish_on_drop() {
        if !nix::unistd::Uid::effective().is_root() {
            eprintln!("skipped: needs root");
            return;
        }
        let name = format!("cw-unit-{}", std::process::id());
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        let target = dir.path().join("target");
        std::fs::create_dir_all(&src).unwrap();
        std::fs::write(src.join("marker"), "inside").unwrap();
        let mut undo = Undo::new(&name).unwrap();
        let ns = Namespaces::create(
            &name,
            &[Bind {
                source: src.clone(),
                target: target.clone(),
            }],
            &mut undo,
        )
        .unwrap();
        // The bind mount shows inside only.
        let inside = ns.run(&format!("cat {}/marker", target.display())).unwrap();
        assert_eq!(inside, "inside");
        assert!(
            !target.join("marker").exists(),
            "the bind leaked to the host"
        );
        // Only lo, and no route anywhere.
        let links = ns.run("ip -o link show | wc -l").unwrap();
        assert_eq!(links.trim(), "1");
        assert_eq!(ns.run("ip route show").unwrap().trim(), "");
        // A socket opened on a thread inside stays inside.
        let listener = ns
            .in_net(|| std::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap()
            .unwrap();
        let port = listener.local_addr().unwrap().port();
        let from_host = std::net::TcpStream::connect_timeout(
            &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
            std::time::Duration::from_millis(500),
        );
        assert!(
            from_host.is_err(),
            "the host reached a namespace's loopback"
        );
        drop(listener);
        drop(ns);
        drop(undo);
        assert!(!Path::new("/run/netns").join(&name).exists());
        assert!(!Path::new(MNT_DIR).join(&name).exists());
    }
}
