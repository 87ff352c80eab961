//! Real nodes: a kubelet with containerd and runc runs real containers, in network and mount
//! namespaces the harness owns, and no packet leaves the machine.
//!
//! These tests need root (namespaces, cgroups, containerd) and the node binaries of
//! `tools/controlplane/node.sh` (found through `COUNTERWEIGHT_NODE_BIN`, which `tools/test.sh`
//! exports, or built on first use). Without root they say so and pass: they run wherever
//! `tools/test.sh` runs (CI runs it as root).

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use counterweight_e2e::fixtures::{app_waiting_reason, init_running};
use counterweight_e2e::{eventually, init_tracing};
use counterweight_harness::netns::Namespaces;
use counterweight_harness::realnode::{BUSYBOX_IMAGE, KUBELET_SYSCTLS};
use counterweight_harness::undo::Undo;
use counterweight_harness::{Cluster, Lan, NodeKind};
use k8s_openapi::api::core::v1::{
    Container, ExecAction, HostPathVolumeSource, Pod, PodSpec, Probe, ResourceRequirements, Volume,
    VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::api::{Api, ObjectMeta, PostParams};

/// Real-node clusters of this file run one test at a time: each test checks that the global
/// sysctls the kubelet sets are back after its teardown, which another test's kubelet starting
/// meanwhile would spoil (and two cores are enough for one real-node run at a time).
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A pod whose init container waits for `/gate/open` (a host directory), then an app
/// container that turns Ready through an exec probe, with memory and CPU limits. Once
/// released, the init container also sends a plain HTTP request to the `kubernetes` Service
/// address (kube-proxy's iptables rules take it to the API server, which answers 400 to HTTP
/// on its TLS port) and leaves the answer in `/gate/service.out`.
fn gated_pod(gate_dir: &Path) -> Pod {
    let limits = BTreeMap::from([
        ("memory".to_owned(), Quantity("32Mi".into())),
        ("cpu".to_owned(), Quantity("100m".into())),
    ]);
    let container = |name: &str, script: &str| Container {
        name: name.into(),
        image: Some(BUSYBOX_IMAGE.into()),
        image_pull_policy: Some("Never".into()),
        command: Some(vec!["/bin/sh".into(), "-c".into(), script.into()]),
        volume_mounts: Some(vec![VolumeMount {
            name: "gate".into(),
            mount_path: "/gate".into(),
            ..Default::default()
        }]),
        resources: Some(ResourceRequirements {
            limits: Some(limits.clone()),
            ..Default::default()
        }),
        ..Default::default()
    };
    let mut app = container("app", "touch /tmp/serving; exec sleep 2147483647");
    app.readiness_probe = Some(Probe {
        exec: Some(ExecAction {
            command: Some(vec!["cat".into(), "/tmp/serving".into()]),
        }),
        period_seconds: Some(1),
        ..Default::default()
    });
    Pod {
        metadata: ObjectMeta {
            name: Some("gated".into()),
            ..Default::default()
        },
        spec: Some(PodSpec {
            init_containers: Some(vec![container(
                "wait",
                "until [ -e /gate/open ]; do sleep 0.2; done; \
                 printf 'GET / HTTP/1.0\\r\\n\\r\\n' | timeout 5 nc 10.96.0.1 443 \
                 > /gate/service.out 2>&1 || true",
            )]),
            containers: vec![app],
            volumes: Some(vec![Volume {
                name: "gate".into(),
                host_path: Some(HostPathVolumeSource {
                    path: gate_dir.display().to_string(),
                    type_: Some("Directory".into()),
                }),
                ..Default::default()
            }]),
            termination_grace_period_seconds: Some(1),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn ready(p: &Pod) -> bool {
    counterweight_e2e::fixtures::condition_true(p, "Ready")
}

/// The interface of the host's default route (the way out of the machine).
fn outward_interface() -> Option<String> {
    let routes = std::fs::read_to_string("/proc/net/route").ok()?;
    routes.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.get(1) == Some(&"00000000")).then(|| f[0].to_owned())
    })
}

/// The host's default gateway, for a route lookup that must fail inside a namespace.
fn default_gateway() -> Option<Ipv4Addr> {
    let routes = std::fs::read_to_string("/proc/net/route").ok()?;
    routes.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.get(1) != Some(&"00000000") {
            return None;
        }
        let raw = u32::from_str_radix(f.get(2)?, 16).ok()?;
        Some(Ipv4Addr::from(raw.to_le_bytes()))
    })
}

fn counter(dev: &str, which: &str) -> u64 {
    std::fs::read_to_string(format!("/sys/class/net/{dev}/statistics/{which}"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

fn sysctl(key: &str) -> String {
    std::fs::read_to_string(format!("/proc/sys/{}", key.replace('.', "/")))
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// Files named `name` under `dir`, at most `depth` levels down.
fn find_files(dir: &Path, name: &str, depth: usize) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return found;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.file_name().is_some_and(|n| n == name) {
            found.push(p.clone());
        }
        if depth > 0 && e.file_type().is_ok_and(|t| t.is_dir()) {
            found.extend(find_files(&p, name, depth - 1));
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_node_holds_a_pod_at_its_init_container_and_no_packet_leaves() {
    init_tracing();
    if !counterweight_harness::realnode::can_run_or_say_skipped() {
        return;
    }
    let _serial = ONE_AT_A_TIME.lock().await;
    let out_if = outward_interface().expect("the host has a default route");
    let sysctls_before: Vec<String> = KUBELET_SYSCTLS.iter().map(|k| sysctl(k)).collect();
    let tx_before = counter(&out_if, "tx_packets");

    let started = Instant::now();
    let (lan, mut clusters) = counterweight_harness::start_real_named(&["r0"])
        .await
        .expect("a real-node cluster starts");
    let node_ready = started.elapsed();
    let mut cluster: Cluster = clusters.remove(0);
    assert_eq!(cluster.node_kind(), NodeKind::Real);
    let node = cluster.real_node().expect("a real node");
    let ns_name = node.namespaces().name().to_owned();
    let host_if = node.link().host_if().to_owned();
    let cgroup_root = node.cgroup_root().to_owned();
    let bridge = lan.bridge().to_owned();
    let dir = cluster.dir().to_owned();
    let veth_rx_before = counter(&host_if, "rx_packets");
    eprintln!(
        "real node {} Ready {node_ready:?} after start",
        cluster.node_name()
    );

    // The pod blocks in its init container: a real container, running, not exiting.
    let gate = dir.join("gate");
    std::fs::create_dir_all(&gate).unwrap();
    let pods: Api<Pod> = Api::namespaced(cluster.client(), "default");
    let created = Instant::now();
    pods.create(&PostParams::default(), &gated_pod(&gate))
        .await
        .expect("pod created");
    let blocked = eventually(
        "the init container Running, the app container PodInitializing",
        Duration::from_secs(120),
        Duration::from_millis(200),
        || async {
            let p = pods.get("gated").await.map_err(|e| e.to_string())?;
            let reason = app_waiting_reason(&p);
            Ok((init_running(&p) && reason.as_deref() == Some("PodInitializing")).then_some(p))
        },
    )
    .await;
    let blocked_after = created.elapsed();
    assert!(
        !ready(&blocked),
        "a pod held at its init container is not Ready"
    );
    // Still held a little later (polled, bounded): the init container really waits.
    for _ in 0..10 {
        let p = pods.get("gated").await.unwrap();
        assert!(init_running(&p) && !ready(&p), "the gate let go on its own");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Release: the init container exits 0, the app starts and turns Ready.
    let released = Instant::now();
    std::fs::write(gate.join("open"), "").unwrap();
    eventually(
        "the app container Ready",
        Duration::from_secs(60),
        Duration::from_millis(100),
        || async {
            let p = pods.get("gated").await.map_err(|e| e.to_string())?;
            Ok(ready(&p).then_some(()))
        },
    )
    .await;
    let ready_after_release = released.elapsed();
    let via_service = std::fs::read_to_string(gate.join("service.out")).unwrap_or_default();
    assert!(
        via_service.contains("400"),
        "the pod did not reach the API server through the kubernetes Service: {via_service:?}"
    );
    eprintln!(
        "pod: init container running {blocked_after:?} after creation, Ready {ready_after_release:?} after release; cluster to Ready pod {:?}",
        started.elapsed()
    );

    // Nothing can leave. The namespace routes only the LAN and the pods' subnet...
    let ns = node.namespaces();
    let routes = ns.run("ip -4 route show").unwrap();
    assert!(!routes.contains("default"), "a default route: {routes}");
    for r in routes.lines() {
        assert!(
            r.starts_with(&format!("{}.0/24", lan_prefix(node.addr())))
                || r.starts_with("10.244.0.0/24"),
            "a route beyond the LAN and the pods: {r}"
        );
    }
    assert_eq!(
        ns.run("cat /proc/sys/net/ipv4/ip_forward").unwrap().trim(),
        "0"
    );
    assert_eq!(sysctl(&format!("net.ipv4.conf.{bridge}.forwarding")), "0");
    // ...so a route lookup for the way out fails before any packet is made (UDP connect
    // sends nothing).
    if let Some(gw) = default_gateway() {
        let lookup = ns
            .in_net(|| {
                let s = UdpSocket::bind("0.0.0.0:0")?;
                s.connect(SocketAddr::from((gw, 53)))
            })
            .unwrap();
        let err = lookup.expect_err("the namespace has a route to the host's gateway");
        assert_eq!(err.kind(), std::io::ErrorKind::NetworkUnreachable, "{err}");
    }
    // Pods name no nameserver.
    let resolv = find_files(&dir.join("containerd/root"), "resolv.conf", 5);
    assert!(!resolv.is_empty(), "no pod resolv.conf found");
    for f in &resolv {
        let text = std::fs::read_to_string(f).unwrap();
        assert!(
            !text
                .lines()
                .any(|l| l.trim_start().starts_with("nameserver")),
            "{}: {text}",
            f.display()
        );
    }

    let veth_rx = counter(&host_if, "rx_packets") - veth_rx_before;

    // A restart of every process (control plane, containerd, kubelet, kube-proxy) keeps the
    // node and the pod: containerd finds its shims again, the kubelet its containers.
    let restarted = Instant::now();
    cluster
        .restart()
        .await
        .expect("the real-node cluster restarts");
    let pods: Api<Pod> = Api::namespaced(cluster.client(), "default");
    let p = eventually(
        "the pod Ready again after a restart",
        Duration::from_secs(60),
        Duration::from_millis(200),
        || async {
            let p = pods.get("gated").await.map_err(|e| e.to_string())?;
            Ok(ready(&p).then_some(p))
        },
    )
    .await;
    let restarts: i32 = p
        .status
        .and_then(|s| s.container_statuses)
        .map(|c| c.iter().map(|c| c.restart_count).sum())
        .unwrap_or_default();
    eprintln!(
        "restart: node and pod Ready again {:?} after the restart began; container restarts {restarts}",
        restarted.elapsed()
    );
    drop(cluster);
    drop(lan);
    let tx = counter(&out_if, "tx_packets") - tx_before;
    eprintln!(
        "packets: the namespace sent {veth_rx} to the LAN; {out_if} sent {tx} during the run \
         (the host's own traffic: nothing from the LAN is ever forwarded)"
    );
    // The checks above make leaving impossible; the count on the way out is the witness. It
    // is asserted where the host is known quiet (other processes' traffic counts there too).
    if std::env::var_os("COUNTERWEIGHT_QUIET_HOST").is_some() {
        assert_eq!(
            tx, 0,
            "{out_if} sent packets during a real-node run on a quiet host"
        );
    }

    // Teardown left nothing behind.
    assert!(
        !Path::new("/run/netns").join(&ns_name).exists(),
        "netns left"
    );
    assert!(
        !Path::new(counterweight_harness::netns::MNT_DIR)
            .join(&ns_name)
            .exists(),
        "mount namespace left"
    );
    assert!(
        !Path::new("/sys/class/net").join(&host_if).exists(),
        "veth left"
    );
    assert!(
        !Path::new("/sys/class/net").join(&bridge).exists(),
        "bridge left"
    );
    for h in std::fs::read_dir("/sys/fs/cgroup").unwrap().flatten() {
        assert!(
            !h.path().join(&cgroup_root).exists(),
            "cgroup left in {}",
            h.path().display()
        );
    }
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(&ns_name), "a mount left: {mounts}");
    let dir_text = dir.display().to_string();
    for p in std::fs::read_dir("/proc").unwrap().flatten() {
        let cmdline = std::fs::read(p.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        assert!(!cmdline.contains(&dir_text), "a process left: {cmdline}");
    }
    let sysctls_after: Vec<String> = KUBELET_SYSCTLS.iter().map(|k| sysctl(k)).collect();
    assert_eq!(
        sysctls_after, sysctls_before,
        "{KUBELET_SYSCTLS:?} restored"
    );
}

fn lan_prefix(addr: Ipv4Addr) -> String {
    let [a, b, c, _] = addr.octets();
    format!("{a}.{b}.{c}")
}

/// Connects from inside `ns` to `to`, bounded by 1 s.
fn connect_from(ns: &Namespaces, to: SocketAddr) -> std::io::Result<TcpStream> {
    ns.in_net(|| TcpStream::connect_timeout(&to, Duration::from_secs(1)))
        .map_err(std::io::Error::other)?
}

#[test]
fn a_cut_link_is_a_real_partition_and_heal_ends_it() {
    if !counterweight_harness::realnode::can_run_or_say_skipped() {
        return;
    }
    let lan = Lan::new().unwrap();
    let pid = std::process::id();
    let mut undo_a = Undo::new(&format!("cw{pid}-cut-a")).unwrap();
    let mut undo_b = Undo::new(&format!("cw{pid}-cut-b")).unwrap();
    let a = Namespaces::create(&format!("cw{pid}-cut-a"), &[], &mut undo_a).unwrap();
    let b = Namespaces::create(&format!("cw{pid}-cut-b"), &[], &mut undo_b).unwrap();
    let link_a = lan.attach(&a, &mut undo_a).unwrap();
    let link_b = lan.attach(&b, &mut undo_b).unwrap();
    let listen = |ns: &Namespaces, addr: Ipv4Addr| {
        ns.in_net(|| TcpListener::bind(SocketAddr::from((addr, 0))))
            .unwrap()
            .unwrap()
    };
    let in_b = listen(&b, link_b.addr());
    let in_a = listen(&a, link_a.addr());
    let to_b = in_b.local_addr().unwrap();
    let to_a = in_a.local_addr().unwrap();

    // Linked: both ways, and from the host.
    connect_from(&a, to_b).expect("a reaches b");
    connect_from(&b, to_a).expect("b reaches a");
    TcpStream::connect_timeout(&to_b, Duration::from_secs(1)).expect("the host reaches b");

    // Cut b: nobody reaches b, b reaches nobody; a and the host still talk.
    link_b.cut().unwrap();
    assert!(connect_from(&a, to_b).is_err(), "a reached b across a cut");
    assert!(connect_from(&b, to_a).is_err(), "b reached a across a cut");
    assert!(
        TcpStream::connect_timeout(&to_b, Duration::from_secs(1)).is_err(),
        "the host reached b across a cut"
    );
    TcpStream::connect_timeout(&to_a, Duration::from_secs(1)).expect("the host still reaches a");

    // Heal: connections work again, polled with a bound.
    link_b.heal().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut healed = false;
    for _ in 0..40 {
        if connect_from(&a, to_b).is_ok() && connect_from(&b, to_a).is_ok() {
            healed = true;
            break;
        }
        if Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    assert!(healed, "the healed link carried nothing within 10 s");

    let names = [a.name().to_owned(), b.name().to_owned()];
    let host_ifs = [link_a.host_if().to_owned(), link_b.host_if().to_owned()];
    drop((in_a, in_b, a, b));
    drop((undo_a, undo_b));
    let bridge = lan.bridge().to_owned();
    drop(lan);
    for n in &names {
        assert!(!Path::new("/run/netns").join(n).exists(), "{n} left");
    }
    for i in host_ifs.iter().chain([&bridge]) {
        assert!(!Path::new("/sys/class/net").join(i).exists(), "{i} left");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_real_node_clusters_are_partitioned_by_a_cut_and_joined_by_a_heal() {
    init_tracing();
    if !counterweight_harness::realnode::can_run_or_say_skipped() {
        return;
    }
    let _serial = ONE_AT_A_TIME.lock().await;
    let sysctls_before: Vec<String> = KUBELET_SYSCTLS.iter().map(|k| sysctl(k)).collect();
    let started = Instant::now();
    let (lan, clusters) = counterweight_harness::start_real_named(&["ra", "rb"])
        .await
        .expect("two real-node clusters start");
    eprintln!("two real-node clusters Ready in {:?}", started.elapsed());
    let (ra, rb) = (&clusters[0], &clusters[1]);
    let ns_a = ra.real_node().expect("real").namespaces();
    let ns_b = rb.real_node().expect("real").namespaces();
    let api_b = SocketAddr::from((rb.host(), rb.ports().apiserver));
    let api_a = SocketAddr::from((ra.host(), ra.ports().apiserver));

    connect_from(ns_a, api_b).expect("ra's namespace reaches rb's API server");
    connect_from(ns_b, api_a).expect("rb's namespace reaches ra's API server");

    let link_b = rb.real_node().expect("real").link();
    link_b.cut().unwrap();
    assert!(
        connect_from(ns_a, api_b).is_err(),
        "ra reached rb across a cut"
    );
    assert!(
        connect_from(ns_b, api_a).is_err(),
        "rb reached ra across a cut"
    );
    assert!(
        TcpStream::connect_timeout(&api_b, Duration::from_secs(1)).is_err(),
        "the test process reached rb across a cut"
    );
    // rb is partitioned, not dead: its own API server answers inside its namespace.
    connect_from(ns_b, api_b).expect("rb still reaches itself");
    connect_from(ns_a, api_a).expect("ra still reaches itself");

    link_b.heal().unwrap();
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(rb.client());
    eventually(
        "rb reachable again from ra's namespace and from the test process",
        Duration::from_secs(30),
        Duration::from_millis(250),
        || async {
            connect_from(ns_a, api_b).map_err(|e| e.to_string())?;
            nodes
                .list(&Default::default())
                .await
                .map_err(|e| e.to_string())?;
            Ok(Some(()))
        },
    )
    .await;

    drop(clusters);
    drop(lan);
    let sysctls_after: Vec<String> = KUBELET_SYSCTLS.iter().map(|k| sysctl(k)).collect();
    assert_eq!(
        sysctls_after, sysctls_before,
        "{KUBELET_SYSCTLS:?} restored"
    );
}
