//! A real Kubernetes node for a test cluster: containerd, kubelet and kube-proxy in the
//! cluster's own namespaces.
//!
//! [`RealNode`] owns everything a real node needs outside the cluster's processes: its
//! [`Namespaces`] (where the whole cluster runs, control plane included), its [`Link`] to the
//! [`Lan`], the CNI bridge `cni0` inside, a cgroup root of its own in every cgroup hierarchy
//! (the kubelet's `cgroupRoot`, under which it makes `kubepods`), and the configuration files:
//! containerd's (`restrict_oom_score_adj`: this machine withholds CAP_SYS_RESOURCE), the
//! kubelet's (`failCgroupV1: false`, `cgroupDriver: cgroupfs`, a `resolvConf` with no
//! nameserver), kube-proxy's (iptables mode, no conntrack sysctls), the CNI bridge config, the
//! node's client certificate (`O=system:nodes`, `CN=system:node:<name>`), and the only image
//! the node has: a busybox image written here by hand as a docker-archive tarball and imported
//! with `ctr -n k8s.io images import` (no registry is reachable; it is also the sandbox image).
//!
//! The API server binds the node's LAN address inside the namespace, and the test process
//! reaches it through the host's bridge address. That keeps one address for everyone (the
//! test, the kubelet, pods through the `kubernetes` Service) with no forwarder to keep alive,
//! and a [`Link::cut`] cuts the test off exactly as it cuts the peers off.
//!
//! No packet leaves the machine: the namespace routes only the LAN /24 and the pod /24, IPv4
//! forwarding is off in it (the CNI bridge is made here, `isGateway: false`, so the plugin
//! never turns it on), pods route only to the Service range and the LAN, and their resolv.conf
//! names no nameserver. The API server prefers `InternalIP` for kubelets, so it never resolves
//! a node name.
//!
//! Teardown is the [`Undo`] script: kill what runs in the kubelet's cgroups and in the network
//! namespace, remove the cgroups, delete the veth, unmount the mount namespace (its mounts go
//! with it), delete the network namespace (its iptables rules go with it), and restore the
//! global sysctls the kubelet sets (`vm.overcommit_memory`, `kernel.panic`,
//! `kernel.panic_on_oops`) to their values before the first real node of this process.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use counterweight_certs::{LeafSpec, Usage};

use crate::binaries::NodeBinaries;
use crate::lan::{Lan, Link};
use crate::netns::{Bind, Namespaces, run_sh};
use crate::undo::{Undo, sh_quote};
use crate::{HarnessError, kubeconfig_json, write};

/// Whether real nodes can run here (they need root for namespaces,
/// cgroups and containerd); says on stderr that the test skips if not.
pub fn can_run_or_say_skipped() -> bool {
    if nix::unistd::Uid::effective().is_root() {
        return true;
    }
    eprintln!("skipped: real nodes need root (namespaces, cgroups, containerd)");
    false
}

/// Name of the real node every real-node cluster gets.
pub const REAL_NODE_NAME: &str = "node-0";

/// The one image a real node has (sandbox and test containers): static busybox.
pub const BUSYBOX_IMAGE: &str = "counterweight.test/busybox:1";

/// Pod addresses on a real node (inside its namespace only).
pub const POD_CIDR: &str = "10.244.0.0/24";

/// Service addresses (the API server's `--service-cluster-ip-range`).
pub const SERVICE_CIDR: &str = "10.96.0.0/24";

/// The global sysctls the kubelet sets, restored on teardown.
pub const KUBELET_SYSCTLS: [&str; 3] = [
    "vm.overcommit_memory",
    "kernel.panic",
    "kernel.panic_on_oops",
];

/// How long containerd may take to answer.
const CONTAINERD_TIMEOUT: Duration = Duration::from_secs(30);

/// The node side of a real-node cluster.
#[derive(Debug)]
pub struct RealNode {
    // Dropped first: runs every teardown step.
    undo: Undo,
    ns: Namespaces,
    link: Link,
    dir: PathBuf,
    cgroup_root: String,
    bins: NodeBinaries,
    _lan: Arc<Lan>,
}

/// The values of [`KUBELET_SYSCTLS`] before this process started its first kubelet.
fn original_sysctls() -> Result<&'static [(String, String)], HarnessError> {
    static ORIGINAL: OnceLock<Result<Vec<(String, String)>, String>> = OnceLock::new();
    let got = ORIGINAL.get_or_init(|| {
        KUBELET_SYSCTLS
            .iter()
            .map(|k| {
                let path = format!("/proc/sys/{}", k.replace('.', "/"));
                std::fs::read_to_string(&path)
                    .map(|v| ((*k).to_owned(), v.trim().to_owned()))
                    .map_err(|e| format!("reading {path}: {e}"))
            })
            .collect()
    });
    match got {
        Ok(v) => Ok(v),
        Err(e) => Err(HarnessError::io(e.clone(), std::io::Error::other("sysctl"))),
    }
}

impl RealNode {
    /// Creates the namespaces, the link to `lan`, cgroups and config of a real node for
    /// cluster `cluster`, whose files live in `dir`. Once the node's address is known,
    /// `write_pki` must write the cluster CA to `dir/pki` and `dir/admin.kubeconfig`: the
    /// node's certificates and kube-proxy's config build on them. Nothing runs yet; the API
    /// server must bind [`RealNode::addr`] inside [`RealNode::namespaces`].
    pub fn create(
        cluster: &str,
        dir: &Path,
        lan: Arc<Lan>,
        bins: NodeBinaries,
        write_pki: impl FnOnce(Ipv4Addr) -> Result<(), HarnessError>,
    ) -> Result<Self, HarnessError> {
        let name = format!("cw{}-{cluster}", std::process::id());
        let mut undo = Undo::new(&name)?;
        // Runs very last. Drop removes the directory anyway; this is for a killed test process
        // (containerd's snapshots are not small). Kept when asked to keep cluster dirs.
        if std::env::var_os("COUNTERWEIGHT_KEEP_CLUSTER_DIRS").is_none() {
            undo.push(format!("rm -rf {}", sh_quote(&dir.display().to_string())))?;
        }
        // After the kubelet is gone.
        let originals = original_sysctls()?;
        let restore: Vec<String> = originals.iter().map(|(k, v)| format!("{k}={v}")).collect();
        undo.push(format!("sysctl -qw {} || true", restore.join(" ")))?;
        for sub in [
            "kubelet",
            "run-containerd",
            "netns",
            "log-pods",
            "log-containers",
            "cni/net.d",
            "cni/ipam",
            "var-lib-cni",
            "containerd",
            "image",
        ] {
            std::fs::create_dir_all(dir.join(sub))
                .map_err(|e| HarnessError::io(format!("creating {sub}"), e))?;
        }
        let resolv = dir.join("resolv.conf");
        write(
            &resolv,
            "# counterweight test node: no nameserver, no packet leaves the machine\n",
        )?;
        let bind = |source: &str, target: &str| Bind {
            source: dir.join(source),
            target: PathBuf::from(target),
        };
        let binds = [
            bind("kubelet", "/var/lib/kubelet"),
            bind("run-containerd", "/run/containerd"),
            bind("netns", "/run/netns"),
            bind("log-pods", "/var/log/pods"),
            bind("log-containers", "/var/log/containers"),
            bind("var-lib-cni", "/var/lib/cni"),
            bind("resolv.conf", "/etc/resolv.conf"),
        ];
        let ns = Namespaces::create(&name, &binds, &mut undo)?;
        let link = lan.attach(&ns, &mut undo)?;
        write_pki(link.addr())?;
        ns.run(&format!(
            "ip link add cni0 type bridge stp_state 0 forward_delay 0\n\
             ip addr add {} dev cni0\nip link set cni0 up",
            pod_gateway_cidr()
        ))?;
        let cgroup_root = format!("counterweight-{name}");
        make_cgroups(&cgroup_root, &name, &mut undo)?;
        let node = Self {
            undo,
            ns,
            link,
            dir: dir.to_owned(),
            cgroup_root,
            bins,
            _lan: lan,
        };
        node.write_configs()?;
        write_busybox_archive(&node.dir.join("image"))?;
        Ok(node)
    }

    /// The namespaces the whole cluster runs in.
    pub fn namespaces(&self) -> &Namespaces {
        &self.ns
    }

    /// The node's (and API server's) address on the LAN.
    pub fn addr(&self) -> Ipv4Addr {
        self.link.addr()
    }

    /// The link to the LAN, to cut and heal.
    pub fn link(&self) -> &Link {
        &self.link
    }

    /// The kubelet's cgroup root (under every cgroup hierarchy).
    pub fn cgroup_root(&self) -> &str {
        &self.cgroup_root
    }

    /// Routes as a cluster node does, for workloads installed from the manifests: the
    /// node's pods reach the rest of the LAN (IPv4 forwarding on in the node's namespace, pod
    /// traffic that leaves through the LAN link masqueraded to the node's address: both
    /// clusters use the same pod range, so an unmasqueraded reply would stay home), traffic
    /// from the LAN to a NodePort is forwarded to its pod, and the node's own processes reach
    /// Service addresses (a route for the Service range onto the CNI bridge: kube-proxy's
    /// DNAT runs after the route lookup, which failed without one, so the API server could
    /// not call a webhook through its Service).
    ///
    /// Still nothing leaves the machine: the namespace routes only the LAN, pod and Service
    /// /24s (no default route), and the host bridge forwards nothing (`forwarding=0` on it).
    /// Off by default: tests that need no traffic between clusters' pods keep forwarding off.
    pub fn route_like_a_node(&self) -> Result<(), HarnessError> {
        self.ns
            .run(&format!(
                "sysctl -qw net.ipv4.ip_forward=1\n\
                 iptables -t nat -A POSTROUTING -s {POD_CIDR} -o eth0 -j MASQUERADE\n\
                 ip route add {SERVICE_CIDR} dev cni0"
            ))
            .map(drop)
    }

    /// Runs the teardown now (normally on drop).
    pub fn teardown(&mut self) {
        self.undo.run();
    }

    fn sock(&self) -> PathBuf {
        self.dir.join("containerd/containerd.sock")
    }

    /// Extra kube-apiserver flags for a real node.
    pub fn apiserver_args(&self) -> Vec<String> {
        vec![
            "--kubelet-preferred-address-types=InternalIP".into(),
            format!(
                "--kubelet-client-certificate={}",
                self.dir.join("pki/apiserver-kubelet-client.crt").display()
            ),
            format!(
                "--kubelet-client-key={}",
                self.dir.join("pki/apiserver-kubelet-client.key").display()
            ),
            "--enable-admission-plugins=NodeRestriction".into(),
        ]
    }

    /// containerd's program and flags.
    pub fn containerd(&self) -> (PathBuf, Vec<String>) {
        (
            PathBuf::from("/usr/bin/containerd"),
            vec![format!(
                "--config={}",
                self.dir.join("containerd.toml").display()
            )],
        )
    }

    /// kubelet's program and flags.
    pub fn kubelet(&self) -> (PathBuf, Vec<String>) {
        (
            self.bins.kubelet(),
            vec![
                format!("--config={}", self.dir.join("kubelet.json").display()),
                format!(
                    "--kubeconfig={}",
                    self.dir.join("kubelet.kubeconfig").display()
                ),
                format!("--hostname-override={REAL_NODE_NAME}"),
                format!("--node-ip={}", self.addr()),
                "--v=1".into(),
            ],
        )
    }

    /// kube-proxy's program and flags.
    pub fn kube_proxy(&self) -> (PathBuf, Vec<String>) {
        (
            self.bins.kube_proxy(),
            vec![
                format!("--config={}", self.dir.join("kube-proxy.json").display()),
                "--v=1".into(),
            ],
        )
    }

    /// Waits for containerd to answer, then imports the busybox image into its `k8s.io`
    /// namespace (idempotent).
    pub async fn load_images(&self) -> Result<(), HarnessError> {
        let deadline = Instant::now() + CONTAINERD_TIMEOUT;
        let sock = sh_quote(&self.sock().display().to_string());
        loop {
            if self
                .ns
                .run(&format!("ctr --address {sock} version"))
                .is_ok()
            {
                break;
            }
            if Instant::now() > deadline {
                return Err(HarnessError::Timeout {
                    cluster: self.ns.name().to_owned(),
                    what: "containerd to answer".into(),
                    after: CONTAINERD_TIMEOUT,
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.import_image(&self.dir.join("image/busybox.tar"))
    }

    /// Imports an image archive (docker-archive, or an OCI archive such as
    /// `tools/images.sh` writes) into containerd's `k8s.io` namespace, where the
    /// kubelet finds it: no registry is reachable, so pods use `imagePullPolicy:
    /// Never` or `IfNotPresent`. Idempotent. Containerd must be running (after
    /// [`RealNode::load_images`]).
    pub fn import_image(&self, archive: &Path) -> Result<(), HarnessError> {
        let sock = sh_quote(&self.sock().display().to_string());
        let tar = sh_quote(&archive.display().to_string());
        self.ns.run(&format!(
            "ctr --address {sock} -n k8s.io images import {tar} >/dev/null"
        ))?;
        Ok(())
    }

    fn write_configs(&self) -> Result<(), HarnessError> {
        let d = self.dir.display().to_string();
        let addr = self.addr();
        let pki = self.dir.join("pki");
        let ca = crate::load_ca(&pki)?;
        // The API server's identity towards kubelets.
        ca.issue(
            &LeafSpec::new("kube-apiserver-kubelet-client", Usage::Client)
                .organization("system:masters"),
        )?
        .write(&pki, "apiserver-kubelet-client")?;
        // The node's identity: the Node authorizer and NodeRestriction key on it.
        let node = ca.issue(
            &LeafSpec::new(format!("system:node:{REAL_NODE_NAME}"), Usage::Client)
                .organization("system:nodes"),
        )?;
        let server = format!("https://{addr}:{}", self.api_port()?);
        write(
            &self.dir.join("kubelet.kubeconfig"),
            &kubeconfig_json(
                REAL_NODE_NAME,
                &server,
                &ca.pem().cert_pem,
                &node.cert_pem,
                &node.key_pem,
            ),
        )?;
        write(
            &self.dir.join("containerd.toml"),
            &format!(
                r#"version = 2
root = "{d}/containerd/root"
state = "{d}/containerd/state"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.devmapper"]
[grpc]
  address = "{d}/containerd/containerd.sock"
[ttrpc]
  address = "{d}/containerd/containerd.sock.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/containerd/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{BUSYBOX_IMAGE}"
  restrict_oom_score_adj = true
  disable_apparmor = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{d}/cni/net.d"
"#
            ),
        )?;
        let cni = serde_json::json!({
            "cniVersion": "0.4.0",
            "name": "counterweight",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": "cni0",
                    // The bridge and its address are made by the harness: with isGateway
                    // false the plugin never enables ip_forward.
                    "isGateway": false,
                    "ipMasq": false,
                    "hairpinMode": true,
                    "ipam": {
                        "type": "host-local",
                        "dataDir": format!("{d}/cni/ipam"),
                        "ranges": [[{"subnet": POD_CIDR, "gateway": pod_gateway()}]],
                        // No default route: Services and the LAN only.
                        "routes": [
                            {"dst": SERVICE_CIDR, "gw": pod_gateway()},
                            {"dst": lan_cidr(self.link.addr()), "gw": pod_gateway()},
                        ],
                    },
                },
                {"type": "portmap", "capabilities": {"portMappings": true}},
            ],
        });
        write(
            &self.dir.join("cni/net.d/10-counterweight.conflist"),
            &cni.to_string(),
        )?;
        let kubelet = serde_json::json!({
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "address": addr.to_string(),
            "port": 10250,
            "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1",
            "healthzPort": 10248,
            "authentication": {
                "anonymous": {"enabled": false},
                "webhook": {"enabled": false},
                "x509": {"clientCAFile": pki.join("ca.crt").display().to_string()},
            },
            "authorization": {"mode": "AlwaysAllow"},
            "cgroupDriver": "cgroupfs",
            "cgroupRoot": format!("/{}", self.cgroup_root),
            "failCgroupV1": false,
            "failSwapOn": false,
            "containerRuntimeEndpoint": format!("unix://{}", self.sock().display()),
            "resolvConf": self.dir.join("resolv.conf").display().to_string(),
            "evictionHard": {
                "memory.available": "1Mi",
                "nodefs.available": "1%",
                "nodefs.inodesFree": "1%",
                "imagefs.available": "1%",
            },
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "serializeImagePulls": false,
            "rotateCertificates": false,
            "nodeStatusReportFrequency": "10s",
        });
        write(&self.dir.join("kubelet.json"), &kubelet.to_string())?;
        let proxy = serde_json::json!({
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
            "kind": "KubeProxyConfiguration",
            "clientConnection": {"kubeconfig": self.dir.join("admin.kubeconfig").display().to_string()},
            "hostnameOverride": REAL_NODE_NAME,
            "mode": "iptables",
            "clusterCIDR": POD_CIDR,
            "bindAddress": addr.to_string(),
            "healthzBindAddress": "127.0.0.1:10256",
            "metricsBindAddress": "127.0.0.1:10249",
            // Zero: kube-proxy leaves the (partly global) conntrack sysctls alone.
            "conntrack": {
                "maxPerCore": 0,
                "min": 0,
                "tcpEstablishedTimeout": "0s",
                "tcpCloseWaitTimeout": "0s",
            },
        });
        write(&self.dir.join("kube-proxy.json"), &proxy.to_string())?;
        Ok(())
    }

    fn api_port(&self) -> Result<u16, HarnessError> {
        // The admin kubeconfig, written before the node, names the API server's port.
        let text = std::fs::read_to_string(self.dir.join("admin.kubeconfig"))
            .map_err(|e| HarnessError::io("reading admin.kubeconfig", e))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| HarnessError::io("parsing admin.kubeconfig", std::io::Error::other(e)))?;
        v["clusters"][0]["cluster"]["server"]
            .as_str()
            .and_then(|s| s.rsplit(':').next())
            .and_then(|p| p.parse().ok())
            .ok_or_else(|| {
                HarnessError::io("admin.kubeconfig", std::io::Error::other("no server port"))
            })
    }
}

impl Drop for RealNode {
    fn drop(&mut self) {
        self.undo.run();
    }
}

/// The LAN /24 that `addr` is on.
fn lan_cidr(addr: Ipv4Addr) -> String {
    let [a, b, c, _] = addr.octets();
    format!("{a}.{b}.{c}.0/24")
}

fn pod_gateway() -> &'static str {
    "10.244.0.1"
}

fn pod_gateway_cidr() -> &'static str {
    "10.244.0.1/24"
}

/// The cgroup hierarchies mounted under /sys/fs/cgroup: the v1 ones, and the v2 one that
/// runc also writes to on a hybrid host.
fn hierarchies() -> Vec<PathBuf> {
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") else {
        return Vec::new();
    };
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_, path, kind) = (f.next()?, f.next()?, f.next()?);
            ((kind == "cgroup" || kind == "cgroup2") && path.starts_with("/sys/fs/cgroup/"))
                .then(|| PathBuf::from(path))
        })
        .collect()
}

/// Moves this process, and with it everything it starts from then on (the control planes,
/// the kubelets, containerd, `kubectl`), into one cpu cgroup of its own,
/// `counterweight-harness-<pid>`, once per process; removed after the process exits (by the
/// undo watchdog, which moves anything left back to the root first).
///
/// Why: the nodes' pods run under the kubelets' cgroup roots, each one group of the default
/// weight, while the harness's processes sit in the root cgroup, where under cgroup v1 every
/// runnable thread weighs as much as a whole node. Measured with `CW_STRESS=2` during the
/// install test: 20 to 60 runnable threads in the root (API servers, etcd, kubelets,
/// containerd, `kubectl` and the test itself besides the two burners), and both nodes' pods
/// together got 0 to 5 ms of CPU per half second for 6 s on end, so no controller could
/// answer a peer and every lease ran out. On a real node the pods share the node with its
/// system daemons as groups (kubepods beside system.slice), and the API servers run
/// elsewhere. With the harness grouped, each node weighs as much as the whole harness, and a
/// burner still as much as a node: the load `CW_STRESS` adds is unchanged.
///
/// Only the cgroup v1 `cpu` hierarchy is touched; elsewhere this does nothing.
pub fn group_the_harness_cpu() -> Result<(), HarnessError> {
    static GROUP: OnceLock<Result<Option<Undo>, String>> = OnceLock::new();
    GROUP
        .get_or_init(|| harness_cpu_group().map_err(|e| e.to_string()))
        .as_ref()
        .map(drop)
        .map_err(|e| {
            HarnessError::io(
                "grouping the harness's CPU",
                std::io::Error::other(e.clone()),
            )
        })
}

fn harness_cpu_group() -> Result<Option<Undo>, HarnessError> {
    let Some(cpu) = hierarchies().into_iter().find(|h| {
        h.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.split(',').any(|c| c == "cpu"))
    }) else {
        return Ok(None);
    };
    let pid = std::process::id();
    let name = format!("counterweight-harness-{pid}");
    let dir = cpu.join(&name);
    let mut undo = Undo::new(&name)?;
    let (qd, qroot) = (
        sh_quote(&dir.display().to_string()),
        sh_quote(&cpu.join("cgroup.procs").display().to_string()),
    );
    undo.push(format!(
        "for i in $(seq 50); do \
           for p in $(cat {qd}/cgroup.procs 2>/dev/null); do echo $p > {qroot} 2>/dev/null; done; \
           rmdir {qd} 2>/dev/null; [ -d {qd} ] || break; sleep 0.1; done"
    ))?;
    std::fs::create_dir_all(&dir)
        .map_err(|e| HarnessError::io(format!("creating cgroup {}", dir.display()), e))?;
    std::fs::write(dir.join("cgroup.procs"), pid.to_string())
        .map_err(|e| HarnessError::io(format!("moving the harness into {}", dir.display()), e))?;
    Ok(Some(undo))
}

/// Makes `root` in every cgroup hierarchy (the kubelet requires its cgroup root to exist)
/// and registers its removal: kill what runs in network namespace `netns` (kubelet, containerd
/// and its shims: else the kubelet restarts the containers being killed) and under the cgroups
/// (the containers, in network namespaces of their own), then remove the trees bottom-up.
fn make_cgroups(root: &str, netns: &str, undo: &mut Undo) -> Result<(), HarnessError> {
    let dirs: Vec<PathBuf> = hierarchies().iter().map(|h| h.join(root)).collect();
    let quoted: Vec<String> = dirs
        .iter()
        .map(|d| sh_quote(&d.display().to_string()))
        .collect();
    let all = quoted.join(" ");
    let n = sh_quote(netns);
    undo.push(format!(
        "for i in $(seq 100); do \
           p=\"$(ip netns pids {n} 2>/dev/null) $(find {all} -name cgroup.procs -exec cat {{}} + 2>/dev/null)\"; \
           [ -z \"$(echo $p)\" ] && break; kill -9 $p 2>/dev/null; sleep 0.1; done; \
         for i in $(seq 100); do \
           find {all} -depth -type d -exec rmdir {{}} \\; 2>/dev/null; \
           ok=1; for d in {all}; do [ -d \"$d\" ] && ok=0; done; [ $ok = 1 ] && break; sleep 0.1; done"
    ))?;
    for d in &dirs {
        std::fs::create_dir_all(d)
            .map_err(|e| HarnessError::io(format!("creating cgroup {}", d.display()), e))?;
        // A new cpuset cgroup has no CPUs and no memory nodes: copy the parent's.
        for file in ["cpuset.cpus", "cpuset.mems"] {
            let parent = d.parent().map(|p| p.join(file));
            if let Some(parent) = parent.filter(|p| p.is_file()) {
                let v = std::fs::read_to_string(&parent)
                    .map_err(|e| HarnessError::io(format!("reading {}", parent.display()), e))?;
                std::fs::write(d.join(file), v.trim())
                    .map_err(|e| HarnessError::io(format!("writing {file}"), e))?;
            }
        }
    }
    Ok(())
}

/// Writes `dir/busybox.tar`: a docker-archive image (manifest.json, config, one layer) of the
/// host's static busybox with a link per applet, tagged [`BUSYBOX_IMAGE`]. Its default
/// command sleeps, so it is also the sandbox ("pause") image.
pub fn write_busybox_archive(dir: &Path) -> Result<PathBuf, HarnessError> {
    let out = dir.join("busybox.tar");
    if out.is_file() {
        return Ok(out);
    }
    let rootfs = dir.join("rootfs");
    let bin = rootfs.join("bin");
    for sub in ["bin", "tmp", "proc", "sys", "dev", "etc", "var/run"] {
        std::fs::create_dir_all(rootfs.join(sub))
            .map_err(|e| HarnessError::io(format!("creating rootfs/{sub}"), e))?;
    }
    std::fs::copy("/bin/busybox", bin.join("busybox"))
        .map_err(|e| HarnessError::io("copying /bin/busybox", e))?;
    let list = run_sh("/bin/busybox --list", "listing busybox applets")?;
    for applet in list
        .lines()
        .map(str::trim)
        .filter(|a| !a.is_empty() && *a != "busybox")
    {
        let link = bin.join(applet);
        if !link.exists() {
            std::os::unix::fs::symlink("busybox", &link)
                .map_err(|e| HarnessError::io(format!("linking {applet}"), e))?;
        }
    }
    write(
        &rootfs.join("etc/passwd"),
        "root:x:0:0:root:/:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
    )?;
    write(&rootfs.join("etc/group"), "root:x:0:\nnobody:x:65534:\n")?;
    let q = |p: &Path| sh_quote(&p.display().to_string());
    run_sh(
        &format!(
            "tar --numeric-owner --owner=0 --group=0 --sort=name --mtime=@0 -C {} -cf {} .",
            q(&rootfs),
            q(&dir.join("layer.tar"))
        ),
        "writing the image layer",
    )?;
    let digest = run_sh(
        &format!("sha256sum {}", q(&dir.join("layer.tar"))),
        "hashing the image layer",
    )?;
    let digest = digest
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned();
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    let config = serde_json::json!({
        "architecture": arch,
        "os": "linux",
        "config": {
            "Env": ["PATH=/bin"],
            "Entrypoint": ["/bin/sleep", "2147483647"],
            "WorkingDir": "/",
        },
        "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{digest}")]},
    })
    .to_string();
    write(&dir.join("config.json"), &config)?;
    let manifest = serde_json::json!([{
        "Config": "config.json",
        "RepoTags": [BUSYBOX_IMAGE],
        "Layers": ["layer.tar"],
    }])
    .to_string();
    write(&dir.join("manifest.json"), &manifest)?;
    run_sh(
        &format!(
            "tar -C {} -cf {}.tmp manifest.json config.json layer.tar && mv {}.tmp {}",
            q(dir),
            q(&out),
            q(&out),
            q(&out)
        ),
        "writing the image archive",
    )?;
    let _ = std::fs::remove_dir_all(&rootfs);
    Ok(out)
}
