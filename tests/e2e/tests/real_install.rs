//! Install from the manifests onto two real-node clusters and a witness,
//! with README.md's "Install on two clusters" commands (issue 15).
//!
//! Everything of Counterweight's that runs in a cluster runs in pods from
//! the project's images (`tools/images.sh`): both controllers (two replicas
//! each, leader election), both webhooks, the gates the webhooks inject, and
//! the sample EMS's synchronization pods (`ems-db` with PostgreSQL,
//! `ems-files` with rsync). The install is not this file's: each step is a
//! shell block of README.md, found by its `<!-- install-step: NAME -->`
//! marker and run as written, with the variables the guide asks a user to
//! set (the nodes' LAN addresses, the witness's address, the image names).
//! So the guide cannot rot without this test failing.
//!
//! What the test does itself (through `counterweight_harness::install`,
//! which `counterweight-demo --real-nodes` shares) is what the guide
//! leaves to the person and their infrastructure: start the clusters (two real nodes on one LAN that
//! route like cluster nodes: pods reach the other cluster's NodePorts),
//! import the images into each node's containerd (no registry is
//! reachable), make the local volumes' directories on the nodes, and give
//! the witness a cluster for its record (a KWOK one: the witness holds no
//! workload, and a third real node would add start-up time and load on two
//! cores for nothing the test looks at).
//!
//! Then it checks the first election (east active, west standby, with the
//! witness), that `cwctl status` and `cwctl check` pass from the host with
//! the kubeconfig contexts, that west's `web` pods wait at their gates (app
//! containers never started, pods not Ready), and that the sample EMS
//! answers through east's `web` Service and not through west's. A failover
//! by health follows (east's `web` stops answering its check: the FIG. 9
//! Events, west's gates release, east's pods come back held), then a
//! partition of the new active (west's LAN link cut: east promotes with
//! the witness only after west fenced; after the heal west is standby with
//! its pods held), with the two-actives monitor sampling both records.
//!
//! The data goes with the failover: 1,000 rows written through east's
//! `ems-db` Service under synchronous commit (west streaming as east's
//! synchronous standby, checked first) are all on west once it is active;
//! west's PostgreSQL is promoted in its pod (a new timeline), east's former
//! primary is rewound (`pg_rewind`, in its pod's log) and streams from
//! west as its synchronous standby, and rows written on west are then on
//! east. A file written in east's replicated volume is in west's before the
//! failover, and one written on west after it is in east's. Then east's
//! leading controller pod is force-deleted, then the new leader's container
//! is SIGKILLed on the node: each time a live replica must hold the Lease
//! again with exactly one cluster active. That is east, or west when the
//! replacements came too late for east's lease (a loaded machine): east
//! then fences and west takes over, as it should, and the phases after
//! start from whichever cluster is active. Its leader is frozen (SIGSTOP):
//! its web pods must leave their Service before any of the other's turns
//! Ready, and the other takes over.
//!
//! Last, the liveness case a stressed run found: the active is cut off
//! while the standby's database is down, so that nobody may take over.
//! The active fences; its database, a fenced former primary with no peer
//! primary, must run read-only rather than stay stopped, so that it is
//! elected again after the heal with every row, and the standby's
//! database follows it when it is back.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use counterweight_e2e::realgroup::{PodLog, PodSeen, images_dir, ready_addresses};
use counterweight_e2e::{eventually_explained, init_tracing};
use counterweight_harness::Cluster;
use counterweight_harness::install::{self, CHECK_STEP, IMAGES, Infra as Install, script};
use counterweight_harness::sample_data::Kubectl;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service};
use kube::api::{Api, ListParams};
use nix::sys::signal::Signal;

/// The sample's service Deployment.
const WEB: &str = "app.kubernetes.io/name=web";
/// Rows the test writes through east's database Service before the failover.
const ROWS_BEFORE: u64 = 1000;
/// Rows in all once west has written its own after the failover.
const ROWS_TOTAL: u64 = 1100;
/// The rows' count and the sum of their ids: equal on both sides only if
/// every row is there.
const ALARMS_DIGEST: &str = "SELECT count(*), sum(id) FROM alarms";
/// A file written on east (active) before the failover.
const FILE_BEFORE: &str = "east-before-failover.txt";
/// A file written on west (active) after it.
const FILE_AFTER: &str = "west-after-failover.txt";

/// The shell block of README.md's step `name`; panics if README.md has no
/// such step (the guide runner is `counterweight_harness::install`).
fn guide_step(readme: &str, name: &str) -> String {
    install::guide_step(readme, name).unwrap_or_else(|e| panic!("{e}"))
}

/// A state record's role and epoch, if readable.
async fn role(cms: &Api<ConfigMap>) -> Option<(String, u64)> {
    let d = cms
        .get_opt(counterweight_core::names::STATE_CONFIGMAP)
        .await
        .ok()??
        .data?;
    Some((d.get("state")?.clone(), d.get("epoch")?.parse().ok()?))
}

/// One of the two clusters in the role a phase gives it: its name (the
/// kubectl context), its cluster and its state record.
struct Site<'a> {
    name: &'static str,
    cluster: &'a Cluster,
    cms: Api<ConfigMap>,
}

/// East's and west's sites.
fn sites(g: &Install) -> (Site<'_>, Site<'_>) {
    let site = |name, cluster| Site {
        name,
        cluster,
        cms: g.cms(cluster),
    };
    (site("east", &g.east), site("west", &g.west))
}

/// Waits until `active` is active in an epoch above `after` and `standby`
/// is standby, as `what` says; returns the active's epoch.
async fn active_after(
    g: &Install,
    (active, standby): (&Site<'_>, &Site<'_>),
    after: u64,
    what: &str,
) -> u64 {
    eventually_explained(
        what,
        Duration::from_secs(120),
        Duration::from_millis(100),
        || async {
            let (a, s) = (role(&active.cms).await, role(&standby.cms).await);
            match (&a, &s) {
                (Some((ar, ae)), Some((sr, _)))
                    if ar == "active" && sr == "standby" && *ae > after =>
                {
                    Ok(Some(*ae))
                }
                _ => Err(format!("{} {a:?}, {} {s:?}", active.name, standby.name)),
            }
        },
        || async { g.explain() },
    )
    .await
}

/// Waits until `cluster`'s `web` Service has its two pods as ready
/// endpoints; `what` names the wait.
async fn two_ready_web(g: &Install, cluster: &Cluster, what: &str) {
    eventually_explained(
        what,
        Duration::from_secs(120),
        Duration::from_millis(200),
        || async {
            let ready = web_ready_endpoints(cluster).await?;
            if ready.len() == 2 {
                Ok(Some(()))
            } else {
                Err(format!("ready endpoints {ready:?}"))
            }
        },
        || async { g.explain() },
    )
    .await;
}

/// One side of a serving blip (`context`: "east" or "west"): its
/// controllers' and web pods' lease sidecars' recent logs, its serving
/// lease and Events, and the witness's log.
async fn serving_diagnostics(g: &Install, context: &str) -> String {
    let mut s = String::new();
    for args in [
        "-n counterweight-system logs -l app.kubernetes.io/name=counterweight-controller --since=90s --prefix --tail=400",
        "-n ems logs -l app.kubernetes.io/name=web -c counterweight-lease --since=90s --prefix --tail=100",
        "-n counterweight-system get configmap counterweight-serving -o yaml",
        "get events -A --sort-by=.lastTimestamp",
    ] {
        s.push_str(&format!("\n===== {context}: kubectl {args}\n"));
        s.push_str(&g.kubectl_text(context, args));
    }
    s.push_str(&format!(
        "\n===== witness log\n{}",
        counterweight_harness::tail(&g.witness_log)
    ));
    s
}

/// The holder of a controller Lease, if any.
async fn leader_of(leases: &Api<Lease>) -> Option<String> {
    leases
        .get_opt("counterweight-controller")
        .await
        .ok()??
        .spec?
        .holder_identity
        .filter(|h| !h.is_empty())
}

/// The one active cluster's name and epoch, when exactly one is active and
/// the other is standby in that epoch or an older one.
async fn one_active(east: &Site<'_>, west: &Site<'_>) -> Result<(&'static str, u64), String> {
    let (e, w) = (role(&east.cms).await, role(&west.cms).await);
    match (&e, &w) {
        (Some((es, ee)), Some((ws, we))) if es == "active" && ws == "standby" && we <= ee => {
            Ok((east.name, *ee))
        }
        (Some((es, ee)), Some((ws, we))) if ws == "active" && es == "standby" && ee <= we => {
            Ok((west.name, *we))
        }
        _ => Err(format!("east {e:?}, west {w:?}")),
    }
}

/// Waits until a controller pod other than `gone` holds east's Lease and
/// exactly one cluster is active: the new leader, and the active's name
/// and epoch.
async fn one_active_under_a_new_leader(
    g: &Install,
    k: &Kubectl,
    leases: &Api<Lease>,
    gone: &str,
    when: &str,
) -> (String, (&'static str, u64)) {
    let (east, west) = sites(g);
    eventually_explained(
        &format!("another replica leading east's controller {when}, and one active"),
        Duration::from_secs(120),
        Duration::from_millis(200),
        || async {
            let holder = leader_of(leases).await.ok_or("no Lease holder")?;
            if holder == gone {
                return Err(format!("{gone} still holds the Lease"));
            }
            let pods = k
                .run(
                    "east",
                    &[
                        "-n",
                        "counterweight-system",
                        "get",
                        "pods",
                        "-l",
                        "app.kubernetes.io/name=counterweight-controller",
                        "-o",
                        "jsonpath={.items[*].metadata.name}",
                    ],
                )
                .await?;
            if !pods.split_whitespace().any(|p| p == holder) {
                return Err(format!(
                    "the holder {holder} is not among the pods {pods:?}"
                ));
            }
            let active = one_active(&east, &west).await?;
            Ok(Some((holder, active)))
        },
        || async { g.explain() },
    )
    .await
}

/// The `controller` container's restart count in `pod`.
async fn controller_restarts(cluster: &Cluster, pod: &str) -> i32 {
    controller_status(cluster, pod)
        .await
        .map_or(0, |s| s.restart_count)
}

/// The `controller` container's runtime id in `pod` (without the
/// `containerd://` scheme).
async fn controller_container_id(cluster: &Cluster, pod: &str) -> String {
    controller_status(cluster, pod)
        .await
        .and_then(|s| s.container_id)
        .and_then(|id| id.rsplit("://").next().map(str::to_owned))
        .unwrap_or_else(|| panic!("{pod}'s controller container has no id"))
}

async fn controller_status(
    cluster: &Cluster,
    pod: &str,
) -> Option<k8s_openapi::api::core::v1::ContainerStatus> {
    Api::<Pod>::namespaced(cluster.client(), "counterweight-system")
        .get_opt(pod)
        .await
        .ok()??
        .status?
        .container_statuses?
        .into_iter()
        .find(|c| c.name == "controller")
}

/// SIGKILLs every process of the container `id` on this machine: what the
/// OOM killer or a crash does. The pids killed.
fn sigkill_container(id: &str) -> Vec<i32> {
    signal_container(id, Signal::SIGKILL)
}

/// Sends `signal` to every process of the container `id` on this machine (a
/// real node's containers are this machine's processes, in the container's
/// cgroup). The pids signalled.
fn signal_container(id: &str, signal: Signal) -> Vec<i32> {
    let mut killed = Vec::new();
    for p in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let cgroup = std::fs::read_to_string(p.path().join("cgroup")).unwrap_or_default();
        if cgroup.contains(id)
            && nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal).is_ok()
        {
            killed.push(pid);
        }
    }
    killed
}

/// When a cluster's `web` pods served, from a watch of them: spans from
/// the first moment any pod was Ready to the moment none was (`None`: still
/// serving at the end).
fn serving_spans(seen: &[PodSeen]) -> Vec<(Instant, Option<Instant>)> {
    let mut ready: std::collections::BTreeMap<&str, bool> = Default::default();
    let mut spans: Vec<(Instant, Option<Instant>)> = Vec::new();
    for s in seen {
        ready.insert(&s.uid, s.ready && !s.deleting);
        let any = ready.values().any(|r| *r);
        match spans.last_mut() {
            Some((_, end @ None)) if !any => *end = Some(s.at),
            Some((_, None)) => {}
            _ if any => spans.push((s.at, None)),
            _ => {}
        }
    }
    spans
}

/// GET `path` through the `web` Service's cluster IP from inside the node
/// namespace of `cluster`, as a client in that cluster would: the body, or
/// why not (no endpoint: kube-proxy refuses the connection).
fn get_via_service(cluster: &Cluster, cluster_ip: Ipv4Addr, path: &str) -> Result<String, String> {
    let node = cluster.real_node().ok_or("not a real node")?;
    node.namespaces()
        .in_net(|| -> Result<String, String> {
            let to = SocketAddr::from((cluster_ip, 80));
            let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(2))
                .map_err(|e| format!("connect {to}: {e}"))?;
            s.set_read_timeout(Some(Duration::from_secs(3)))
                .map_err(|e| e.to_string())?;
            write!(s, "GET {path} HTTP/1.0\r\nHost: web\r\n\r\n").map_err(|e| e.to_string())?;
            let mut text = String::new();
            s.read_to_string(&mut text).map_err(|e| e.to_string())?;
            let (head, body) = text.split_once("\r\n\r\n").ok_or("no header end")?;
            if !head.starts_with("HTTP/1.0 200") && !head.starts_with("HTTP/1.1 200") {
                return Err(format!("answered {head:?}"));
            }
            Ok(body.trim().to_owned())
        })
        .map_err(|e| e.to_string())?
}

/// The `web` Service's cluster IP.
async fn web_cluster_ip(cluster: &Cluster) -> Ipv4Addr {
    let svc = Api::<Service>::namespaced(cluster.client(), "ems")
        .get("web")
        .await
        .expect("the sample's web Service");
    svc.spec
        .and_then(|s| s.cluster_ip)
        .and_then(|ip| ip.parse().ok())
        .expect("a cluster IP")
}

/// Waits until the EMS answers through the `web` Service of `serving`
/// (name, cluster, the Service's address) with the name of one of that
/// cluster's web pods, then checks that `other`'s refuses the connection
/// (no endpoint); `when` says when that is, for the message.
async fn served_only_through(
    g: &Install,
    (name, serving, ip): (&str, &Cluster, Ipv4Addr),
    (other_name, other, other_ip): (&str, &Cluster, Ipv4Addr),
    when: &str,
) {
    let pods: Vec<String> = web_pods(serving)
        .await
        .unwrap_or_else(|e| panic!("{name}'s web pods: {e}"))
        .iter()
        .filter_map(|(p, _)| p.metadata.name.clone())
        .collect();
    let answer = eventually_explained(
        &format!("the EMS to answer through {name}'s web Service"),
        Duration::from_secs(30),
        Duration::from_millis(200),
        || async { get_via_service(serving, ip, "/hostname").map(Some) },
        || async { g.explain() },
    )
    .await;
    assert!(
        pods.contains(&answer),
        "{name}'s Service answered {answer:?}, not one of {name}'s web pods {pods:?}"
    );
    let from_other = get_via_service(other, other_ip, "/hostname");
    assert!(
        from_other.is_err(),
        "{other_name}'s web Service served {from_other:?} {when}"
    );
}

/// Waits until `context`'s `ems-db` Service takes a connection and
/// answers `SELECT 1`: its pod Ready, its endpoint published and kube-proxy's
/// rules for it in place, each of which lags behind the database itself on
/// a busy node. The write or read that follows is made once.
async fn db_service_answers(g: &Install, k: &Kubectl, context: &str) {
    eventually_explained(
        &format!("{context}'s ems-db Service to answer"),
        Duration::from_secs(90),
        Duration::from_millis(500),
        || async { k.sql_via_service(context, "SELECT 1").await.map(Some) },
        || async { g.explain() },
    )
    .await;
}

/// Ready endpoint addresses behind the `web` Service.
async fn web_ready_endpoints(cluster: &Cluster) -> Result<Vec<String>, String> {
    ready_addresses(
        &Api::namespaced(cluster.client(), "ems"),
        &ListParams::default().labels("kubernetes.io/service-name=web"),
    )
    .await
}

/// The `web` pods of `cluster` as the watch helper reads them.
async fn web_pods(cluster: &Cluster) -> Result<Vec<(Pod, PodSeen)>, String> {
    let pods = Api::<Pod>::namespaced(cluster.client(), "ems")
        .list(&ListParams::default().labels(WEB))
        .await
        .map_err(|e| e.to_string())?;
    Ok(pods
        .items
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .map(|p| {
            let seen = PodSeen::of(&p, Instant::now(), false);
            (p, seen)
        })
        .collect())
}

/// `want` occurs in `events` in this order (others may come between).
fn in_order(events: &[String], want: &[&str]) -> bool {
    let mut it = events.iter();
    want.iter().all(|w| it.any(|e| e == w))
}

/// The reasons of `cluster`'s Events in `counterweight-system`, oldest first.
async fn event_reasons(cluster: &Cluster) -> Result<Vec<String>, String> {
    let mut events: Vec<k8s_openapi::api::events::v1::Event> =
        Api::namespaced(cluster.client(), "counterweight-system")
            .list(&ListParams::default())
            .await
            .map_err(|e| e.to_string())?
            .items;
    events.sort_by(|a, b| a.event_time.cmp(&b.event_time));
    Ok(events.into_iter().filter_map(|e| e.reason).collect())
}

/// When `cluster`'s latest Event with `reason` happened, by its eventTime.
async fn event_time(cluster: &Cluster, reason: &str) -> Option<k8s_openapi::jiff::Timestamp> {
    Api::<k8s_openapi::api::events::v1::Event>::namespaced(cluster.client(), "counterweight-system")
        .list(&ListParams::default())
        .await
        .ok()?
        .items
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some(reason))
        .filter_map(|e| e.event_time.map(|t| t.0))
        .max()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_install_guide_installs_two_real_clusters_and_a_witness_and_east_is_elected() {
    init_tracing();
    if !counterweight_harness::realnode::can_run_or_say_skipped() {
        return;
    }
    counterweight_harness::install_crypto_provider();
    let readme = install::read_readme().expect("README.md");
    install::check_steps(&readme).expect("README.md's install steps are the ones this test runs");
    let images = images_dir();
    let tools = counterweight_e2e::ha::workspace_bin("cw-certs", "COUNTERWEIGHT_CW_CERTS_BIN");
    let tools_dir = tools.parent().expect("target dir").to_owned();

    // ---- what the person's infrastructure provides (counterweight_harness::install) ----
    let (g, infra_took) = Install::start(&images, &tools_dir, &mut |_| {})
        .await
        .unwrap_or_else(|e| panic!("the clusters, images, volumes and variables: {e}"));
    let (clusters_up, imported) = (infra_took.clusters_up, infra_took.imported);

    // ---- the guide ----
    let install_began = Instant::now();
    let (took, witness) = g
        .run_guide(&readme, &mut |_, _| {})
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let witness = std::sync::Mutex::new(witness);

    // ---- first election: east (priority 2) active, west standby ----
    let (east, west) = sites(&g);
    let first = eventually_explained(
        "east active and west standby in the same epoch",
        Duration::from_secs(240),
        Duration::from_millis(200),
        || async {
            witness
                .lock()
                .expect("witness")
                .check_alive()
                .map_err(|e| format!("the witness exited: {e}"))?;
            let (e, w) = (role(&east.cms).await, role(&west.cms).await);
            match (&e, &w) {
                (Some((es, ee)), Some((ws, we)))
                    if es == "active" && ws == "standby" && ee == we =>
                {
                    Ok(Some(*ee))
                }
                _ => Err(format!("east {e:?}, west {w:?}")),
            }
        },
        || async { g.explain() },
    )
    .await;
    let elected = install_began.elapsed();
    // The witness takes part: its record reaches the epoch. Not at once:
    // east is elected by any majority (itself and west may be enough), and
    // the witness records the epoch when it next hears east, which on a
    // loaded machine comes after west's record (seen at 0 under CW_STRESS=2).
    let witness_cms = g.cms(&g.witness_cluster);
    eventually_explained(
        &format!("the witness to record epoch {first}"),
        Duration::from_secs(30),
        Duration::from_millis(200),
        || async {
            match role(&witness_cms).await {
                Some((_, epoch)) if epoch >= first => Ok(Some(())),
                other => Err(format!("its record {other:?}")),
            }
        },
        || async { g.explain() },
    )
    .await;

    // ---- west's web pods wait at their gates; east's serve ----
    let gated = eventually_explained(
        "every web pod of west held at its gate (app not started, not Ready), two of them",
        Duration::from_secs(120),
        Duration::from_millis(200),
        || async {
            let pods = web_pods(&g.west).await?;
            let seen: Vec<&PodSeen> = pods.iter().map(|(_, s)| s).collect();
            let held = pods.len() == 2
                && seen
                    .iter()
                    .all(|s| s.gated() && !s.app_running && s.gate_exit.is_none());
            if held {
                Ok(Some(pods))
            } else {
                Err(format!("{seen:?}"))
            }
        },
        || async { g.explain() },
    )
    .await;
    for (p, _) in &gated {
        let inits: Vec<String> = p
            .spec
            .as_ref()
            .and_then(|s| s.init_containers.as_ref())
            .map(|c| c.iter().map(|c| c.name.clone()).collect())
            .unwrap_or_default();
        assert!(
            inits.contains(&counterweight_core::inject::GATE_CONTAINER.to_owned()),
            "west's web pod {:?} was injected with the gate: {inits:?}",
            p.metadata.name
        );
    }
    let west_gated = install_began.elapsed();
    two_ready_web(&g, &g.east, "east's two web pods Ready behind its Service").await;
    let east_served = install_began.elapsed();

    // The EMS answers through east's Service, with an east pod's name, and
    // not through west's (no endpoint: the connection is refused).
    let (east_ip, west_ip) = (web_cluster_ip(&g.east).await, web_cluster_ip(&g.west).await);
    served_only_through(
        &g,
        ("east", &g.east, east_ip),
        ("west", &g.west, west_ip),
        "while west is standby",
    )
    .await;
    assert_eq!(
        web_ready_endpoints(&g.west)
            .await
            .expect("west's endpoints"),
        Vec::<String>::new(),
        "west's web Service has ready endpoints"
    );

    // ---- cwctl, from the host, with the kubeconfig contexts ----
    let check = script(g.work.path(), &g.vars, &guide_step(&readme, CHECK_STEP));
    let out = eventually_explained(
        "cwctl status and cwctl check to pass",
        Duration::from_secs(60),
        Duration::from_secs(1),
        || async {
            let out = tokio::process::Command::new("bash")
                .args(["-euo", "pipefail", "-c", &check])
                .stdin(std::process::Stdio::null())
                .kill_on_drop(true)
                .output()
                .await
                .map_err(|e| e.to_string())?;
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            if out.status.success() {
                Ok(Some(text))
            } else {
                Err(format!("{}: {text}", out.status))
            }
        },
        || async { g.explain() },
    )
    .await;
    assert!(
        !out.contains('✗'),
        "cwctl check reported a failing check:\n{out}"
    );
    println!("{out}");

    // Still: west's pods never started their app in the meantime.
    for (p, _) in web_pods(&g.west).await.expect("west's web pods") {
        let s = PodSeen::of(&p, Instant::now(), false);
        assert!(
            s.gated() && s.restarts == 0,
            "west's web pod {} left its gate: {s:?}",
            s.name
        );
    }

    // ---- failover by health (FIG. 9) ----
    // west must be a fit target first: its database streams from east's
    // (pg_basebackup over the NodePort, TLS verify-full), its file copy is
    // current by east's markers, its web pods wait at their gates.
    let monitor = counterweight_e2e::ha::Monitor::on(
        &["east", "west"],
        &[east.cms.clone(), west.cms.clone()],
    );
    eventually_explained(
        "east to hear west as an eligible standby (west's database and files current)",
        Duration::from_secs(240),
        Duration::from_millis(500),
        || async {
            install::hears_eligible(&east.cms, "west", 3000)
                .await
                .map(Some)
        },
        || async { g.explain() },
    )
    .await;
    let west_eligible = install_began.elapsed();

    // ---- data before the failover: rows under synchronous commit, a file ----
    // The guide sets `synchronous_standby_names = FIRST 1 (west)` on east:
    // once west streams as the synchronous standby, a commit returns only
    // when west has the row, so every acknowledged row must be on west
    // after the failover.
    let k = g.tool();
    let east_db = eventually_explained(
        "east's database a primary with west as its synchronous standby",
        Duration::from_secs(120),
        Duration::from_millis(500),
        || async {
            let r = k.db_role("east").await?;
            if !r.in_recovery
                && r.synchronous_standby_names == "FIRST 1 (west)"
                && r.standbys == ["west=sync"]
            {
                Ok(Some(r))
            } else {
                Err(format!("{r:?}"))
            }
        },
        || async { g.explain() },
    )
    .await;
    db_service_answers(&g, &k, "east").await;
    let t = Instant::now();
    k.sql_via_service(
        "east",
        &format!(
            "CREATE TABLE alarms (id int PRIMARY KEY, site text NOT NULL); \
             INSERT INTO alarms SELECT i, 'east' FROM generate_series(1, {ROWS_BEFORE}) i"
        ),
    )
    .await
    .unwrap_or_else(|e| {
        panic!(
            "rows written through east's ems-db Service: {e}\n{}",
            g.explain()
        )
    });
    let rows_written = t.elapsed();
    let rows_before = k
        .sql_via_service("east", ALARMS_DIGEST)
        .await
        .expect("east's rows");
    assert_eq!(
        rows_before,
        format!("{ROWS_BEFORE}|{}", ROWS_BEFORE * (ROWS_BEFORE + 1) / 2),
        "east's rows as written"
    );
    k.write_file("east", FILE_BEFORE, "written on east before the failover")
        .await
        .expect("a file written in east's replicated volume");
    eventually_explained(
        "east's file copied into west's volume",
        Duration::from_secs(60),
        Duration::from_millis(500),
        || async {
            match k.read_file("west", FILE_BEFORE).await? {
                Some(c) if c == "written on east before the failover" => Ok(Some(())),
                other => Err(format!("west has {other:?}")),
            }
        },
        || async { g.explain() },
    )
    .await;
    // east's web falls: its pods stop answering /hostname (the policy's
    // check, and the readiness probe after it). The handover follows after
    // K+1 = 3 degraded intervals of 5 s.
    let east_web: Vec<String> = web_pods(&g.east)
        .await
        .expect("east's web pods")
        .iter()
        .filter_map(|(p, _)| p.metadata.name.clone())
        .collect();
    let broken = Instant::now();
    for pod in &east_web {
        let out = g.kubectl_text(
            "east",
            &format!("-n ems exec {pod} -c web -- rm /www/hostname"),
        );
        assert!(
            out.trim().is_empty(),
            "breaking east's web pod {pod}: {out}"
        );
    }
    let second = active_after(
        &g,
        (&west, &east),
        first,
        "west active in a new epoch and east standby after east's web fell",
    )
    .await;
    let handed_over = broken.elapsed();
    eventually_explained(
        "the FIG. 9 Events: east HandoverStarted then HandedOver, west HandoverReady then Promoted",
        Duration::from_secs(30),
        Duration::from_millis(200),
        || async {
            let (e, w) = (event_reasons(&g.east).await?, event_reasons(&g.west).await?);
            if in_order(&e, &["HandoverStarted", "HandedOver"])
                && in_order(&w, &["HandoverReady", "Promoted"])
            {
                Ok(Some(()))
            } else {
                Err(format!("east {e:?}; west {w:?}"))
            }
        },
        || async { g.explain() },
    )
    .await;
    // west's gates release: the same pods start their app and serve.
    let west_uids: Vec<String> = gated
        .iter()
        .filter_map(|(p, _)| p.metadata.uid.clone())
        .collect();
    eventually_explained(
        "west's web pods released by their gates, app running, Ready behind west's Service",
        Duration::from_secs(120),
        Duration::from_millis(200),
        || async {
            let pods = web_pods(&g.west).await?;
            let ready = web_ready_endpoints(&g.west).await?;
            let released = pods.len() == 2
                && pods.iter().all(|(p, s)| {
                    s.gate_exit == Some(0)
                        && s.app_running
                        && s.ready
                        && p.metadata
                            .uid
                            .as_ref()
                            .is_some_and(|u| west_uids.contains(u))
                });
            if released && ready.len() == 2 {
                Ok(Some(()))
            } else {
                let seen: Vec<&PodSeen> = pods.iter().map(|(_, s)| s).collect();
                Err(format!("ready endpoints {ready:?}; {seen:?}"))
            }
        },
        || async { g.explain() },
    )
    .await;
    let west_served = broken.elapsed();
    // east's pods that served are replaced by pods held at their gates.
    eventually_explained(
        "east's web pods replaced by new ones held at their gates, no ready endpoint",
        Duration::from_secs(120),
        Duration::from_millis(200),
        || async {
            let pods = web_pods(&g.east).await?;
            let ready = web_ready_endpoints(&g.east).await?;
            let held = pods.len() == 2
                && pods.iter().all(|(p, s)| {
                    s.gated()
                        && !p
                            .metadata
                            .name
                            .as_ref()
                            .is_some_and(|n| east_web.contains(n))
                });
            if held && ready.is_empty() {
                Ok(Some(()))
            } else {
                let seen: Vec<&PodSeen> = pods.iter().map(|(_, s)| s).collect();
                Err(format!("ready endpoints {ready:?}; {seen:?}"))
            }
        },
        || async { g.explain() },
    )
    .await;
    let east_held = broken.elapsed();
    served_only_through(
        &g,
        ("west", &g.west, west_ip),
        ("east", &g.east, east_ip),
        "after the handover",
    )
    .await;
    // ---- data after the failover ----
    // west's database was promoted in its pod (a new timeline), with every
    // row east acknowledged; east's former primary was rewound (pg_rewind)
    // and streams from west as its synchronous standby.
    let west_db = eventually_explained(
        "west's database promoted, with east streaming from it as its synchronous standby",
        Duration::from_secs(180),
        Duration::from_millis(500),
        || async {
            let (w, e) = (k.db_role("west").await?, k.db_role("east").await?);
            if !w.in_recovery
                && w.timeline > east_db.timeline
                && w.synchronous_standby_names == "FIRST 1 (east)"
                && w.standbys == ["east=sync"]
                && e.in_recovery
                && e.receiver == "streaming"
                && e.timeline == w.timeline
            {
                Ok(Some(w))
            } else {
                Err(format!("west {w:?}; east {e:?}"))
            }
        },
        || async { g.explain() },
    )
    .await;
    let db_rejoined = broken.elapsed();
    db_service_answers(&g, &k, "west").await;
    assert_eq!(
        k.sql_via_service("west", ALARMS_DIGEST)
            .await
            .expect("west's rows"),
        rows_before,
        "every row east acknowledged is on west after the failover"
    );
    let rewinds = k
        .db_log_lines("east", "Rewind")
        .await
        .expect("east's database log");
    assert!(
        !rewinds.is_empty(),
        "east's former primary rejoined through pg_rewind: no Rewind step in its log"
    );
    // Rows written on the new primary reach east: the commit waits for east,
    // its synchronous standby, so they are there when it returns.
    k.sql_via_service(
        "west",
        &format!(
            "INSERT INTO alarms SELECT i, 'west' FROM generate_series({}, {ROWS_TOTAL}) i",
            ROWS_BEFORE + 1
        ),
    )
    .await
    .expect("rows written through west's ems-db Service");
    let rows_after = format!("{ROWS_TOTAL}|{}", ROWS_TOTAL * (ROWS_TOTAL + 1) / 2);
    assert_eq!(
        k.sql_local("east", ALARMS_DIGEST)
            .await
            .expect("east's rows"),
        rows_after,
        "west's acknowledged rows on east, its synchronous standby"
    );
    // Files flip with the state: west's copy is the truth now.
    k.write_file("west", FILE_AFTER, "written on west after the failover")
        .await
        .expect("a file written in west's replicated volume");
    eventually_explained(
        "west's file copied into east's volume, east's older file kept",
        Duration::from_secs(60),
        Duration::from_millis(500),
        || async {
            let after = k.read_file("east", FILE_AFTER).await?;
            let before = k.read_file("east", FILE_BEFORE).await?;
            match (after.as_deref(), before.as_deref()) {
                (
                    Some("written on west after the failover"),
                    Some("written on east before the failover"),
                ) => Ok(Some(())),
                other => Err(format!("east has {other:?}")),
            }
        },
        || async { g.explain() },
    )
    .await;
    println!(
        "databases: east timeline {} → west promoted on timeline {}; east rewound ({} Rewind step(s)) and streams from west",
        east_db.timeline,
        west_db.timeline,
        rewinds.len()
    );

    // ---- partition: the active (west) cut off the LAN ----
    // west keeps its API server (it lives in west's namespace), so its
    // controller fences and records it; the test cannot read west until
    // the heal. east, with the witness's vote, promotes only after west's
    // lease: the Events' times (one clock: this machine's) show the order.
    eventually_explained(
        "west to hear east as an eligible standby before the cut",
        Duration::from_secs(240),
        Duration::from_millis(500),
        || async {
            install::hears_eligible(&west.cms, "east", 3000)
                .await
                .map(Some)
        },
        || async { g.explain() },
    )
    .await;
    let west_link = g.west.real_node().expect("a real node").link().clone();
    west_link.cut().expect("cut west's link");
    let cut = Instant::now();
    let third = eventually_explained(
        "east active in a new epoch while west is cut off",
        Duration::from_secs(120),
        Duration::from_millis(100),
        || async {
            match role(&east.cms).await {
                Some((s, e)) if s == "active" && e > second => Ok(Some(e)),
                other => Err(format!("east {other:?}")),
            }
        },
        || async { g.explain() },
    )
    .await;
    let east_promoted_after_cut = cut.elapsed();
    west_link.heal().expect("heal west's link");
    let healed = Instant::now();
    eventually_explained(
        "west to rejoin as standby in east's epoch, its web pods held at their gates",
        Duration::from_secs(180),
        Duration::from_millis(200),
        || async {
            let w = role(&west.cms).await;
            if !matches!(&w, Some((s, e)) if s == "standby" && *e >= third) {
                return Err(format!("west {w:?}"));
            }
            let pods = web_pods(&g.west).await?;
            let ready = web_ready_endpoints(&g.west).await?;
            if pods.len() == 2 && pods.iter().all(|(_, s)| s.gated()) && ready.is_empty() {
                Ok(Some(()))
            } else {
                let seen: Vec<&PodSeen> = pods.iter().map(|(_, s)| s).collect();
                Err(format!("ready endpoints {ready:?}; {seen:?}"))
            }
        },
        || async { g.explain() },
    )
    .await;
    let rejoined = healed.elapsed();
    let fenced_at = event_time(&g.west, "Fenced").await;
    let promoted_at = event_time(&g.east, "Promoted").await;
    assert!(
        matches!((fenced_at, promoted_at), (Some(f), Some(p)) if f < p),
        "west fenced before east promoted: Fenced {fenced_at:?}, Promoted {promoted_at:?}"
    );

    // ---- the active cluster's leading controller pod killed ----
    // First deleted at once (`--grace-period=0 --force`: no SIGTERM
    // hand-back), then the new leader's container SIGKILLed on the node.
    // Each time a live replica must hold the Lease again and the group keep
    // exactly one active; the monitor samples the records throughout.
    let leases = Api::<Lease>::namespaced(g.east.client(), "counterweight-system");
    let first_leader = leader_of(&leases)
        .await
        .expect("east's controller Lease holder");
    let killed = Instant::now();
    k.run(
        "east",
        &[
            "-n",
            "counterweight-system",
            "delete",
            "pod",
            &first_leader,
            "--grace-period=0",
            "--force",
        ],
    )
    .await
    .expect("force-delete east's leading controller pod");
    let (second_leader, after_delete) =
        one_active_under_a_new_leader(&g, &k, &leases, &first_leader, "after the force delete")
            .await;
    let took_over = killed.elapsed();
    let restarts_before = controller_restarts(&g.east, &second_leader).await;
    let container = controller_container_id(&g.east, &second_leader).await;
    let killed = Instant::now();
    let pids = sigkill_container(&container);
    assert!(
        !pids.is_empty(),
        "no process of container {container} (pod {second_leader}) found on the node"
    );
    let (third_leader, after_sigkill) = eventually_explained(
        "a live replica leading east's controller again after the SIGKILL, and one active",
        Duration::from_secs(120),
        Duration::from_millis(200),
        || async {
            let restarts = controller_restarts(&g.east, &second_leader).await;
            if restarts <= restarts_before {
                return Err(format!("{second_leader} restarted {restarts} times"));
            }
            let holder = leader_of(&leases).await.ok_or("no Lease holder")?;
            let active = one_active(&east, &west).await?;
            Ok(Some((holder, active)))
        },
        || async { g.explain() },
    )
    .await;
    let recovered = killed.elapsed();
    // Either cluster may be active now. East keeps the role when a replica
    // renews its lease in time after each kill; on a loaded machine the
    // replacement may come too late, and then east fences and west takes
    // over, as it should. The phases below start from whichever is active.
    let (active, standby) = if after_sigkill.0 == east.name {
        (&east, &west)
    } else {
        (&west, &east)
    };

    // ---- the active's leader frozen: it can neither renew nor fence ----
    // SIGSTOP, as a hung process or a node that stops scheduling it: no
    // hand-back, no fence from the controller. The active's web pods must
    // leave their Service by themselves (the serving lease runs out, their
    // lease sidecars fail readiness) before any of the standby's pods turns
    // Ready, and the other replica must take the Lease once the frozen
    // one's lapsed. Woken up, the frozen leader must not act again.
    let (a, b) = (active.name, standby.name);
    let active_leases = Api::<Lease>::namespaced(active.cluster.client(), "counterweight-system");
    let active_pods = PodLog::start(Api::namespaced(active.cluster.client(), "ems"), WEB);
    let standby_pods = PodLog::start(Api::namespaced(standby.cluster.client(), "ems"), WEB);
    let frozen_leader = leader_of(&active_leases)
        .await
        .unwrap_or_else(|| panic!("{a}'s controller Lease holder"));
    two_ready_web(
        &g,
        active.cluster,
        &format!("{a}'s two web pods Ready behind its Service before the freeze"),
    )
    .await;
    let epoch_before_freeze = role(&active.cms).await.map_or(0, |(_, e)| e);
    let container = controller_container_id(active.cluster, &frozen_leader).await;
    // The active's record stays "active in epoch N" while its writer is
    // frozen, and while the replica that takes over tries to renew that
    // lease (it restarts as "active, not serving until a majority renews",
    // for a lease and a margin) before it steps down: a record in an older
    // epoch than the new active's, not a second serving active. Whether
    // its pods served is judged from the pods themselves, below.
    monitor.mark_dead(a);
    let frozen_at = Instant::now();
    let frozen = signal_container(&container, Signal::SIGSTOP);
    assert!(
        !frozen.is_empty(),
        "no process of container {container} found to freeze"
    );
    let (new_leader, new_epoch) = eventually_explained(
        &format!(
            "{b} active in a new epoch, {a} standby under another replica's lead, while {a}'s leader is frozen"
        ),
        Duration::from_secs(120),
        Duration::from_millis(200),
        || async {
            let holder = leader_of(&active_leases).await.ok_or("no Lease holder")?;
            let (was, now) = (role(&active.cms).await, role(&standby.cms).await);
            match (&was, &now) {
                (Some((wr, _)), Some((nr, ne)))
                    if holder != frozen_leader
                        && nr == "active"
                        && wr == "standby"
                        && *ne > epoch_before_freeze =>
                {
                    Ok(Some((holder, *ne)))
                }
                _ => Err(format!("Lease holder {holder}; {a} {was:?}, {b} {now:?}")),
            }
        },
        || async { g.explain() },
    )
    .await;
    let frozen_to_standby = frozen_at.elapsed();
    two_ready_web(
        &g,
        standby.cluster,
        &format!("{b}'s web pods Ready behind its Service after the freeze"),
    )
    .await;
    let standby_serving_after_freeze = frozen_at.elapsed();
    // Woken up: its Lease and its HA lease are long gone.
    signal_container(&container, Signal::SIGCONT);
    let woke = Instant::now();
    while woke.elapsed() < Duration::from_secs(10) {
        assert_eq!(
            leader_of(&active_leases).await.as_deref(),
            Some(new_leader.as_str()),
            "the woken leader took {a}'s Lease back"
        );
        one_active(&east, &west)
            .await
            .expect("one active after the frozen leader woke");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (was_seen, now_seen) = (active_pods.all(), standby_pods.all());
    drop((active_pods, standby_pods));
    let (was_serving, now_serving) = (serving_spans(&was_seen), serving_spans(&now_seen));
    // Never both: no moment at which a pod of each cluster was Ready. A
    // blip of either side's own pods (a readiness probe that timed out on
    // a starved machine) is an availability matter and is only counted.
    let at = |t: Instant| t.duration_since(frozen_at).as_secs_f64();
    let span = |(s, e): &(Instant, Option<Instant>)| {
        format!(
            "{:.2}..{}",
            at(*s),
            e.map_or("end".into(), |e| format!("{:.2}", at(e)))
        )
    };
    for w in &was_serving {
        for n in &now_serving {
            let (w_end, n_end) = (
                w.1.unwrap_or_else(Instant::now),
                n.1.unwrap_or_else(Instant::now),
            );
            if w.0 < n_end && n.0 < w_end {
                panic!(
                    "both sites served: {a}'s web pods {} and {b}'s {} (s after the freeze)\n{}",
                    span(w),
                    span(n),
                    serving_diagnostics(&g, b).await
                );
            }
        }
    }
    // The frozen side served when frozen, and stopped; the other started
    // after.
    let was_stopped = was_serving
        .first()
        .filter(|(s, _)| *s <= frozen_at)
        .and_then(|(_, e)| *e);
    let now_started = now_serving.first().map(|(start, _)| *start);
    if was_stopped.is_none() || now_started.is_none() {
        panic!(
            "{a}'s web pods did not serve at the freeze and stop, or {b}'s never started: {a} {:?}, {b} {:?}",
            was_serving.iter().map(span).collect::<Vec<_>>(),
            now_serving.iter().map(span).collect::<Vec<_>>()
        );
    }
    if now_serving.len() > 1 {
        println!(
            "{b}'s web pods left their Service {} time(s) after they started: {:?}",
            now_serving.len() - 1,
            now_serving.iter().map(span).collect::<Vec<_>>()
        );
    }
    let gap = now_started
        .zip(was_stopped)
        .map(|(n, w)| n.duration_since(w));
    println!(
        "frozen leader {frozen_leader} of {a}: {a}'s web out of service {:.1} s after the freeze, {b}'s in {:.1} s (gap {gap:?}); \
         {new_leader} leads {a} as standby, {b} active in epoch {new_epoch} after {:.1} s, \
         {b}'s two pods behind its Service after {:.1} s",
        was_stopped.map_or(f64::NAN, |t| t.duration_since(frozen_at).as_secs_f64()),
        now_started.map_or(f64::NAN, |t| t.duration_since(frozen_at).as_secs_f64()),
        frozen_to_standby.as_secs_f64(),
        standby_serving_after_freeze.as_secs_f64(),
    );
    println!(
        "controller kills: {first_leader} force-deleted → {second_leader} leads after {:.1} s, {} active in epoch {}; \
         {second_leader}'s container SIGKILLed (pids {pids:?}) → {third_leader} leads after {:.1} s, {} active in epoch {}",
        took_over.as_secs_f64(),
        after_delete.0,
        after_delete.1,
        recovered.as_secs_f64(),
        after_sigkill.0,
        after_sigkill.1,
    );

    // ---- the active cut off while its standby's database is down ----
    // The roles swapped at the freeze: the active is now `standby` of the
    // phase above. The standby's database is taken down (its StatefulSet
    // scaled to 0, as for maintenance) while the active hears it: its data
    // is then behind, confirmed by a live active, so it may not take over.
    // The active's link is cut: it fences when its lease runs out, and
    // nobody may promote, for the newest data is the cut one's. Its
    // database, a fenced former primary with no peer primary, runs
    // read-only rather than stopped, so its `db` check passes: after the
    // heal it is elected again, in a new epoch, with every row. (A stopped
    // one kept it below D with nobody else eligible: no active, for good.)
    let (active, standby) = (standby, active);
    let (a, b) = (active.name, standby.name);
    db_service_answers(&g, &k, a).await;
    let rows_at_cut = k
        .sql_via_service(a, ALARMS_DIGEST)
        .await
        .unwrap_or_else(|e| panic!("{a}'s rows before the cut: {e}"));
    let scaled = g.kubectl_text(b, "-n ems scale statefulset ems-db --replicas=0");
    assert!(
        scaled.contains("scaled"),
        "scaling {b}'s ems-db to 0: {scaled}"
    );
    eventually_explained(
        &format!(
            "{a}, active, to hear {b} as a standby that may not take over (its database down)"
        ),
        Duration::from_secs(120),
        Duration::from_millis(500),
        || async {
            install::hears_ineligible(&active.cms, b, 3000)
                .await
                .map(Some)
        },
        || async { g.explain() },
    )
    .await;
    let epoch_at_cut = role(&active.cms).await.map_or(0, |(_, e)| e);
    let active_link = active
        .cluster
        .real_node()
        .expect("a real node")
        .link()
        .clone();
    active_link
        .cut()
        .unwrap_or_else(|e| panic!("cut {a}'s link: {e}"));
    let cut_again = Instant::now();
    // Long past the active's lease (the guide's 6 s, margin 2 s) and an
    // election timeout: the standby, behind, stays standby.
    let hold = Duration::from_secs(20);
    while cut_again.elapsed() < hold {
        let s = role(&standby.cms).await;
        assert!(
            !matches!(&s, Some((r, _)) if r == "active"),
            "{b}, whose data is behind, must not take over: {b} {s:?}\n{}",
            g.explain()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    active_link
        .heal()
        .unwrap_or_else(|e| panic!("heal {a}'s link: {e}"));
    let healed_again = Instant::now();
    let fourth = active_after(
        &g,
        (active, standby),
        epoch_at_cut,
        &format!("{a}, the fenced former active with the newest data, active again in a new epoch"),
    )
    .await;
    let reelected = healed_again.elapsed();
    let read_only = k
        .db_log_lines(a, "StartReadOnly")
        .await
        .unwrap_or_else(|e| panic!("{a}'s database log: {e}"));
    assert!(
        !read_only.is_empty(),
        "{a}'s fenced database ran read-only: no StartReadOnly step in its log"
    );
    // The standby's database back: it follows the active's, promoted
    // again, and a row committed on the active (synchronous commit waits
    // for the standby) is on both, after every row the active had at the
    // cut.
    let scaled = g.kubectl_text(b, "-n ems scale statefulset ems-db --replicas=1");
    assert!(
        scaled.contains("scaled"),
        "scaling {b}'s ems-db to 1: {scaled}"
    );
    eventually_explained(
        &format!("{a}'s database a primary again, {b}'s streaming from it"),
        Duration::from_secs(180),
        Duration::from_millis(500),
        || async {
            let (p, s) = (k.db_role(a).await?, k.db_role(b).await?);
            if !p.in_recovery && s.in_recovery && s.receiver == "streaming" {
                Ok(Some(()))
            } else {
                Err(format!("{a} {p:?}; {b} {s:?}"))
            }
        },
        || async { g.explain() },
    )
    .await;
    db_service_answers(&g, &k, a).await;
    assert_eq!(
        k.sql_via_service(a, ALARMS_DIGEST)
            .await
            .unwrap_or_else(|e| panic!("{a}'s rows after the heal: {e}")),
        rows_at_cut,
        "{a} kept every row through its fence and re-election"
    );
    let last = ROWS_TOTAL + 1;
    k.sql_via_service(a, &format!("INSERT INTO alarms VALUES ({last}, '{a}')"))
        .await
        .unwrap_or_else(|e| {
            panic!("a row written through {a}'s ems-db Service after its re-election: {e}")
        });
    let copied = k
        .sql_local(b, &format!("SELECT site FROM alarms WHERE id = {last}"))
        .await
        .unwrap_or_else(|e| panic!("{b}'s copy: {e}"));
    assert_eq!(copied, a, "{a}'s new row on {b}, its synchronous standby");
    println!(
        "{a} cut off with {b}'s database down: nobody active for {:.0} s; healed → {a} active again (epoch {fourth}) after {:.1} s",
        hold.as_secs_f64(),
        reelected.as_secs_f64()
    );
    monitor.finish();

    println!("| step | seconds |\n|---|---|");
    println!(
        "| two real-node clusters and the witness's KWOK cluster up | {:.1} |",
        clusters_up.as_secs_f64()
    );
    println!(
        "| {} images imported into both nodes | {:.1} |",
        IMAGES.len(),
        imported.as_secs_f64()
    );
    for (name, d) in &took {
        println!("| guide step `{name}` | {:.1} |", d.as_secs_f64());
    }
    println!(
        "| install began → east active, west standby (epoch {first}) | {:.1} |",
        elected.as_secs_f64()
    );
    println!(
        "| install began → west's web pods held at their gates | {:.1} |",
        west_gated.as_secs_f64()
    );
    println!(
        "| install began → east's web pods Ready behind its Service | {:.1} |",
        east_served.as_secs_f64()
    );
    println!(
        "| install began → east hears west as an eligible standby (database and files current) | {:.1} |",
        west_eligible.as_secs_f64()
    );
    println!(
        "| east's web broken → west active (epoch {second}), east standby | {:.1} |",
        handed_over.as_secs_f64()
    );
    println!(
        "| east's web broken → west's released pods Ready behind its Service | {:.1} |",
        west_served.as_secs_f64()
    );
    println!(
        "| east's web broken → east's replacement pods held at their gates | {:.1} |",
        east_held.as_secs_f64()
    );
    println!(
        "| {ROWS_BEFORE} rows inserted through east's Service, synchronous commit to west | {:.2} |",
        rows_written.as_secs_f64()
    );
    println!(
        "| east's web broken → west's database promoted, east's rewound and streaming from it | {:.1} |",
        db_rejoined.as_secs_f64()
    );
    println!(
        "| west's link cut → east active (epoch {third}) with the witness | {:.1} |",
        east_promoted_after_cut.as_secs_f64()
    );
    println!(
        "| west's link healed → west standby again, its web pods held at their gates | {:.1} |",
        rejoined.as_secs_f64()
    );
    println!(
        "| {b}'s database down, {a} cut off and healed → {a} active again (epoch {fourth}) | {:.1} |",
        reelected.as_secs_f64()
    );

    // ---- teardown leaves nothing ----
    let names: Vec<String> = [&g.east, &g.west]
        .iter()
        .map(|c| {
            c.real_node()
                .expect("a real node")
                .namespaces()
                .name()
                .to_owned()
        })
        .collect();
    let links: Vec<String> = [&g.east, &g.west]
        .iter()
        .map(|c| {
            c.real_node()
                .expect("a real node")
                .link()
                .host_if()
                .to_owned()
        })
        .collect();
    let bridge = g.lan.bridge().to_owned();
    let dirs: Vec<String> = [&g.east, &g.west, &g.witness_cluster]
        .iter()
        .map(|c| c.dir().display().to_string())
        .chain([g.work.path().display().to_string()])
        .collect();
    drop(witness);
    drop(g);
    for n in &names {
        assert!(!Path::new("/run/netns").join(n).exists(), "netns {n} left");
        assert!(
            !Path::new(counterweight_harness::netns::MNT_DIR)
                .join(n)
                .exists(),
            "mount namespace {n} left"
        );
    }
    for i in links.iter().chain([&bridge]) {
        assert!(
            !Path::new("/sys/class/net").join(i).exists(),
            "link {i} left"
        );
    }
    for p in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let cmdline = std::fs::read(p.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        for d in &dirs {
            assert!(!cmdline.contains(d.as_str()), "a process left: {cmdline}");
        }
    }
}
