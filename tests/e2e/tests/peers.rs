//! The HA protocol between real controller processes over loopback mTLS
//! (issue 4): each controller is the `counterweight-controller` binary,
//! talking to its peer through a TCP proxy that can cut the link. A monitor
//! samples both state ConfigMaps every 10 ms and fails on two actives.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use counterweight_certs::{CertificateAuthority, LeafSpec, Usage};
use counterweight_e2e::{eventually, init_tracing};
use counterweight_harness::{Cluster, Mode, Process, TcpProxy, free_port};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::api::{Api, ObjectMeta, PostParams};

const SYSTEM: &str = "counterweight-system";

fn controller_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("COUNTERWEIGHT_CONTROLLER_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current exe");
    let path = exe
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join("counterweight-controller"))
        .expect("target dir");
    assert!(
        path.exists(),
        "{} not found; run `cargo build -p counterweight-controller` first",
        path.display()
    );
    path
}

fn write_certs(dir: &Path, names: &[&str]) {
    let ca = CertificateAuthority::new("counterweight-test-peers").expect("CA");
    ca.pem().write(dir, "ca").expect("write CA");
    for n in names {
        ca.issue(&LeafSpec::new(*n, Usage::Peer).sans([format!("{n}.peers.counterweight.dev")]))
            .expect("peer cert")
            .write(dir, &format!("peer-{n}"))
            .expect("write peer cert");
    }
}

fn ha_config(dir: &Path) -> PathBuf {
    let path = dir.join("ha.yaml");
    std::fs::write(
        &path,
        "clusters:\n  - {name: east, priority: 2}\n  - {name: west, priority: 1}\nprobeIntervalMs: 200\nleaseMs: 1500\nmarginMs: 300\ncandidateFreshMs: 1000\n",
    )
    .expect("write ha config");
    path
}

async fn prepare(cluster: &Cluster, state: Option<(&str, u64)>) {
    let nss: Api<Namespace> = Api::all(cluster.client());
    nss.create(
        &PostParams::default(),
        &Namespace {
            metadata: ObjectMeta {
                name: Some(SYSTEM.into()),
                ..Default::default()
            },
            ..Default::default()
        },
    )
    .await
    .expect("namespace");
    // A policy every cluster meets (a component with no pods would not),
    // so both are eligible: health is not what this test is about.
    let sas: Api<k8s_openapi::api::core::v1::ServiceAccount> =
        Api::namespaced(cluster.client(), SYSTEM);
    eventually(
        "default ServiceAccount",
        Duration::from_secs(60),
        Duration::from_millis(100),
        || async { sas.get_opt("default").await.map_err(|e| e.to_string()) },
    )
    .await;
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(cluster.client(), SYSTEM);
    pods.create(
        &PostParams::default(),
        &k8s_openapi::api::core::v1::Pod {
            metadata: ObjectMeta {
                name: Some("probe".into()),
                labels: Some(BTreeMap::from([("app".to_owned(), "probe".to_owned())])),
                ..Default::default()
            },
            spec: Some(k8s_openapi::api::core::v1::PodSpec {
                node_name: Some(counterweight_harness::NODE_NAME.into()),
                containers: vec![k8s_openapi::api::core::v1::Container {
                    name: "main".into(),
                    image: Some("registry.invalid/probe:1".into()),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        },
    )
    .await
    .expect("probe pod");
    let cms: Api<ConfigMap> = Api::namespaced(cluster.client(), SYSTEM);
    cms.create(
        &PostParams::default(),
        &ConfigMap {
            metadata: ObjectMeta { name: Some("counterweight-policy".into()), ..Default::default() },
            data: Some(BTreeMap::from([(
                "policy.yaml".to_owned(),
                "interval: 300ms\nthreshold: 0.5\nretries: 1\ncomponents:\n  - {name: probe, namespaces: [counterweight-system], selector: {matchLabels: {app: probe}}, weight: 1}\n".to_owned(),
            )])),
            ..Default::default()
        },
    )
    .await
    .expect("policy");
    if let Some((role, epoch)) = state {
        cms.create(
            &PostParams::default(),
            &ConfigMap {
                metadata: ObjectMeta {
                    name: Some("counterweight-state".into()),
                    ..Default::default()
                },
                data: Some(BTreeMap::from([
                    ("state".to_owned(), role.to_owned()),
                    ("epoch".to_owned(), epoch.to_string()),
                ])),
                ..Default::default()
            },
        )
        .await
        .expect("state");
    }
}

struct Node {
    process: Process,
    peer_port: u16,
}

#[derive(Debug, Clone, Copy)]
struct Sample {
    active: bool,
    epoch: u64,
}

async fn sample(cms: &Api<ConfigMap>) -> Option<Sample> {
    let d = cms.get_opt("counterweight-state").await.ok()??.data?;
    Some(Sample {
        active: d.get("state").map(String::as_str) == Some("active"),
        epoch: d.get("epoch")?.parse().ok()?,
    })
}

/// Samples taken, and the violations seen.
type Findings = Arc<Mutex<(u64, Vec<String>)>>;

/// Samples A, B, A every 10 ms (and B, A, B): A active at both ends in one
/// epoch with B active in between means both were active at once.
fn monitor(a: Api<ConfigMap>, b: Api<ConfigMap>) -> (tokio::task::JoinHandle<()>, Findings) {
    let found = Arc::new(Mutex::new((0u64, Vec::new())));
    let f = found.clone();
    let task = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        let mut flip = false;
        loop {
            tick.tick().await;
            flip = !flip;
            let (x, y) = if flip { (&a, &b) } else { (&b, &a) };
            let first = sample(x).await;
            let mid = sample(y).await;
            let last = sample(x).await;
            let mut g = f.lock().expect("lock");
            g.0 += 1;
            if let (Some(p), Some(m), Some(q)) = (first, mid, last)
                && p.active
                && q.active
                && p.epoch == q.epoch
                && m.active
            {
                g.1.push(format!("{p:?} and {m:?}"));
            }
        }
    });
    (task, found)
}

fn check_monitor(task: tokio::task::JoinHandle<()>, found: &Findings) {
    task.abort();
    let g = found.lock().expect("lock");
    assert!(g.0 > 10, "the monitor sampled only {} times", g.0);
    assert!(g.1.is_empty(), "two actives observed: {:?}", g.1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn controllers_elect_over_mtls_and_a_cut_link_never_makes_two_actives() {
    init_tracing();
    let dir = tempfile::tempdir().expect("dir");
    write_certs(dir.path(), &["east", "west"]);
    let clusters = counterweight_harness::start_named(&["east", "west"])
        .await
        .expect("clusters");
    for c in &clusters {
        prepare(c, None).await;
    }
    let cms: Vec<Api<ConfigMap>> = clusters
        .iter()
        .map(|c| Api::namespaced(c.client(), SYSTEM))
        .collect();
    // Each controller reaches its peer through a proxy; start the proxies
    // towards ports chosen now, then the controllers on those ports.
    let east_port = free_port().expect("port");
    let west_port = free_port().expect("port");
    let to_west = TcpProxy::start(([127, 0, 0, 1], west_port).into())
        .await
        .expect("proxy");
    let to_east = TcpProxy::start(([127, 0, 0, 1], east_port).into())
        .await
        .expect("proxy");
    let mut east = start_on(
        &clusters[0],
        "east",
        "west",
        &to_west.addr().to_string(),
        dir.path(),
        east_port,
    );
    let mut west = start_on(
        &clusters[1],
        "west",
        "east",
        &to_east.addr().to_string(),
        dir.path(),
        west_port,
    );
    let (mon, found) = monitor(cms[0].clone(), cms[1].clone());

    let elected = eventually(
        "an active elected over mTLS",
        Duration::from_secs(30),
        Duration::from_millis(20),
        || async {
            for (i, api) in cms.iter().enumerate() {
                if let Some(s) = sample(api).await.filter(|s| s.active) {
                    return Ok(Some((i, s)));
                }
            }
            Ok(None)
        },
    )
    .await;
    println!("elected {:?}", elected);

    // Cut the link both ways. Without a witness the active fences when its
    // lease runs out and nobody promotes: safe, not available.
    to_west.set_mode_and_kill(Mode::Drop);
    to_east.set_mode_and_kill(Mode::Drop);
    let cut = Instant::now();
    let active = &cms[elected.0];
    eventually(
        "the isolated active to fence",
        Duration::from_secs(15),
        Duration::from_millis(20),
        || async { Ok(sample(active).await.filter(|s| !s.active)) },
    )
    .await;
    println!("isolated active fenced after {:?}", cut.elapsed());
    let hold = Instant::now() + Duration::from_secs(3);
    while Instant::now() < hold {
        for api in &cms {
            let s = sample(api).await;
            assert!(
                !s.is_some_and(|s| s.active),
                "nobody may be active while the link is cut: {s:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Heal: one of them becomes active again, in a higher epoch.
    to_west.set_mode(Mode::Pass);
    to_east.set_mode(Mode::Pass);
    eventually(
        "an active after the link heals",
        Duration::from_secs(30),
        Duration::from_millis(20),
        || async {
            for api in &cms {
                if let Some(s) = sample(api)
                    .await
                    .filter(|s| s.active && s.epoch > elected.1.epoch)
                {
                    return Ok(Some(s));
                }
            }
            Ok(None)
        },
    )
    .await;
    check_monitor(mon, &found);
    east.process.check_alive().expect("east still running");
    west.process.check_alive().expect("west still running");
    let _ = (east.peer_port, west.peer_port);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn both_starting_active_is_resolved_para_0088() {
    init_tracing();
    let dir = tempfile::tempdir().expect("dir");
    write_certs(dir.path(), &["east", "west"]);
    let clusters = counterweight_harness::start_named(&["east", "west"])
        .await
        .expect("clusters");
    // Both records say active, in the same epoch.
    prepare(&clusters[0], Some(("active", 3))).await;
    prepare(&clusters[1], Some(("active", 3))).await;
    let cms: Vec<Api<ConfigMap>> = clusters
        .iter()
        .map(|c| Api::namespaced(c.client(), SYSTEM))
        .collect();
    let east_port = free_port().expect("port");
    let west_port = free_port().expect("port");
    let mut east = start_on(
        &clusters[0],
        "east",
        "west",
        &format!("127.0.0.1:{west_port}"),
        dir.path(),
        east_port,
    );
    let mut west = start_on(
        &clusters[1],
        "west",
        "east",
        &format!("127.0.0.1:{east_port}"),
        dir.path(),
        west_port,
    );
    let resolved = eventually(
        "exactly one active, in a higher epoch",
        Duration::from_secs(30),
        Duration::from_millis(20),
        || async {
            let (Some(e), Some(w)) = (sample(&cms[0]).await, sample(&cms[1]).await) else {
                return Ok(None);
            };
            Ok(((e.active != w.active) && e.epoch.max(w.epoch) > 3).then_some((e, w)))
        },
    )
    .await;
    println!("resolved: east {:?}, west {:?}", resolved.0, resolved.1);
    east.process.check_alive().expect("east keeps running");
    west.process.check_alive().expect("west keeps running");
    // And it stays resolved.
    let hold = Instant::now() + Duration::from_secs(2);
    while Instant::now() < hold {
        let (e, w) = (sample(&cms[0]).await, sample(&cms[1]).await);
        assert!(
            !(e.is_some_and(|s| s.active)
                && w.is_some_and(|s| s.active)
                && e.map(|s| s.epoch) == w.map(|s| s.epoch)),
            "{e:?} {w:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn start_on(
    cluster: &Cluster,
    name: &str,
    peer: &str,
    peer_addr: &str,
    dir: &Path,
    peer_port: u16,
) -> Node {
    start_with(
        cluster,
        name,
        &[(peer, peer_addr.to_owned())],
        dir,
        peer_port,
        &ha_config(dir),
    )
}

fn start_with(
    cluster: &Cluster,
    name: &str,
    peers: &[(&str, String)],
    dir: &Path,
    peer_port: u16,
    ha_file: &Path,
) -> Node {
    let metrics_port = free_port().expect("port");
    let mut args = vec![
        format!("--cluster={name}"),
        format!("--kubeconfig={}", cluster.kubeconfig().display()),
        format!("--ha-config={}", ha_file.display()),
    ];
    args.extend(
        peers
            .iter()
            .map(|(peer, addr)| format!("--peer={peer}=https://{addr}")),
    );
    let process = Process::spawn(
        name,
        &controller_bin(),
        &[
            args,
            vec![
                format!("--peer-listen=127.0.0.1:{peer_port}"),
                format!("--metrics-listen=127.0.0.1:{metrics_port}"),
                format!(
                    "--tls-cert={}",
                    dir.join(format!("peer-{name}.crt")).display()
                ),
                format!(
                    "--tls-key={}",
                    dir.join(format!("peer-{name}.key")).display()
                ),
                format!("--tls-ca={}", dir.join("ca.crt").display()),
            ],
        ]
        .concat(),
        &cluster.dir().join("logs/controller.log"),
    )
    .expect("controller starts");
    Node { process, peer_port }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_clusters_replace_a_killed_active_only_after_its_lease() {
    init_tracing();
    let names = ["east", "west", "north"];
    let dir = tempfile::tempdir().expect("dir");
    write_certs(dir.path(), &names);
    let ha_file = dir.path().join("ha3.yaml");
    std::fs::write(
        &ha_file,
        "clusters:\n  - {name: east, priority: 3}\n  - {name: west, priority: 2}\n  - {name: north, priority: 1}\nprobeIntervalMs: 200\nleaseMs: 1500\nmarginMs: 300\ncandidateFreshMs: 1000\n",
    )
    .expect("ha config");
    let clusters = counterweight_harness::start_named(&names)
        .await
        .expect("clusters");
    for c in &clusters {
        prepare(c, None).await;
    }
    let cms: Vec<Api<ConfigMap>> = clusters
        .iter()
        .map(|c| Api::namespaced(c.client(), SYSTEM))
        .collect();
    let ports: Vec<u16> = names.iter().map(|_| free_port().expect("port")).collect();
    let mut nodes: Vec<Option<Node>> = (0..names.len())
        .map(|i| {
            let peers: Vec<(&str, String)> = (0..names.len())
                .filter(|j| *j != i)
                .map(|j| (names[j], format!("127.0.0.1:{}", ports[j])))
                .collect();
            Some(start_with(
                &clusters[i],
                names[i],
                &peers,
                dir.path(),
                ports[i],
                &ha_file,
            ))
        })
        .collect();
    // One monitor per pair of clusters.
    let mut monitors = Vec::new();
    for a in 0..names.len() {
        for b in a + 1..names.len() {
            monitors.push(((a, b), monitor(cms[a].clone(), cms[b].clone())));
        }
    }
    let (first, first_state) = eventually(
        "an active among three clusters",
        Duration::from_secs(60),
        Duration::from_millis(20),
        || async {
            for (i, api) in cms.iter().enumerate() {
                if let Some(s) = sample(api).await.filter(|s| s.active) {
                    return Ok(Some((i, s)));
                }
            }
            Ok(None)
        },
    )
    .await;

    // SIGKILL the active controller. Its ConfigMap keeps saying "active" in
    // the old epoch; it no longer serves once its lease runs out, which is
    // what the survivors wait for. Monitors that involve it stop here.
    let mut victim = nodes[first].take().expect("the active runs");
    victim.process.kill();
    let killed = Instant::now();
    let mut survivors_monitors = Vec::new();
    for ((a, b), (task, found)) in monitors {
        if a == first || b == first {
            check_monitor(task, &found);
        } else {
            survivors_monitors.push((task, found));
        }
    }
    let (next, promoted) = eventually(
        "a surviving cluster to take over",
        Duration::from_secs(60),
        Duration::from_millis(20),
        || async {
            for (i, api) in cms.iter().enumerate().filter(|(i, _)| *i != first) {
                if let Some(s) = sample(api)
                    .await
                    .filter(|s| s.active && s.epoch > first_state.epoch)
                {
                    return Ok(Some((i, s)));
                }
            }
            Ok(None)
        },
    )
    .await;
    let took = killed.elapsed();
    println!(
        "{} took over from {} after {took:?} (epoch {} -> {})",
        names[next], names[first], first_state.epoch, promoted.epoch
    );
    // The voters' promises to the killed active run `leaseMs` (1500) from
    // its last renewal, sent at most about two probe intervals (2 x 200 ms,
    // allowing one late tick) before the kill: nobody may promote earlier.
    // Promote-on-silence would take over within a few probe intervals.
    assert!(
        took >= Duration::from_millis(1500 - 2 * 200),
        "{} promoted after {took:?}, before the killed active's lease could have expired",
        names[next]
    );
    // Stays a single active among the survivors for a while.
    let hold = Instant::now() + Duration::from_secs(2);
    while Instant::now() < hold {
        let mut active = 0;
        for (i, api) in cms.iter().enumerate().filter(|(i, _)| *i != first) {
            if sample(api).await.is_some_and(|s| s.active) {
                active += 1;
                assert_eq!(i, next, "the active changed without reason");
            }
        }
        assert_eq!(active, 1, "exactly one surviving active");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for (task, found) in survivors_monitors {
        check_monitor(task, &found);
    }
    for node in nodes.iter_mut().flatten() {
        node.process.check_alive().expect("survivors keep running");
    }
}
