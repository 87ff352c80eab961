//! The HA protocol between real controller processes over loopback mTLS
//! (issue 4): each controller is the `counterweight-controller` binary,
//! talking to its peers through TCP proxies that can cut any link. A
//! monitor samples the state ConfigMaps every 10 ms and fails on two
//! actives; the workload monitor samples every cluster's service pods,
//! EndpointSlices and serving lease, and fails on two clusters serving.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use counterweight_core::ha::HaConfig;
use counterweight_e2e::fixtures::{create_namespaces, fast_ha_config, install_policy, meta};
use counterweight_e2e::ha::{
    Controller, Monitor, SYSTEM, event_reasons, nobody_active_for, record, sample, start_group,
    write_ha_config, write_peer_certs_from,
};
use counterweight_e2e::{eventually, eventually_explained, init_tracing};
use counterweight_harness::Cluster;
use k8s_openapi::api::core::v1::{ConfigMap, Container, Pod, PodSpec};
use kube::api::{Api, ObjectMeta, PostParams};

/// A policy every cluster meets (a component with no pods would not), so
/// all are eligible: health is not what these tests are about.
const POLICY: &str = "interval: 300ms\nthreshold: 0.5\nretries: 1\ncomponents:\n  - {name: probe, namespaces: [counterweight-system], selector: {matchLabels: {app: probe}}, weight: 1}\n";

async fn prepare(cluster: &Cluster, state: Option<(&str, u64)>) {
    let client = cluster.client();
    create_namespaces(&client, &[SYSTEM]).await;
    // Service pods, so that the workload monitor watches what would serve.
    counterweight_e2e::ems::workload(cluster).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), SYSTEM);
    pods.create(
        &PostParams::default(),
        &Pod {
            metadata: ObjectMeta {
                name: Some("probe".into()),
                labels: Some(BTreeMap::from([("app".to_owned(), "probe".to_owned())])),
                ..Default::default()
            },
            spec: Some(PodSpec {
                node_name: Some(counterweight_harness::NODE_NAME.into()),
                containers: vec![Container {
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
    install_policy(&client, SYSTEM, POLICY).await;
    if let Some((role, epoch)) = state {
        let cms: Api<ConfigMap> = Api::namespaced(client, SYSTEM);
        cms.create(
            &PostParams::default(),
            &ConfigMap {
                metadata: meta(counterweight_core::names::STATE_CONFIGMAP),
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

/// `names` (earlier preferred) with the test timings, written for the
/// controllers to read.
fn group(dir: &std::path::Path, names: &[&str]) -> (HaConfig, std::path::PathBuf) {
    let config = fast_ha_config(names, None);
    let file = write_ha_config(dir, &config);
    (config, file)
}

/// The first active found, in any cluster.
async fn any_active(
    cms: &[Api<ConfigMap>],
    what: &str,
    above_epoch: u64,
) -> (usize, counterweight_e2e::ha::Sample) {
    eventually(
        what,
        Duration::from_secs(60),
        Duration::from_millis(20),
        || async {
            for (i, api) in cms.iter().enumerate() {
                if let Some(s) = sample(api)
                    .await
                    .filter(|s| s.active && s.epoch > above_epoch)
                {
                    return Ok(Some((i, s)));
                }
            }
            Ok(None)
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn controllers_elect_over_mtls_and_a_cut_link_never_makes_two_actives() {
    init_tracing();
    let names = ["east", "west"];
    let (clusters, cms, dir, mesh) = start_group(&names).await;
    let (_, ha_file) = group(dir.path(), &names);
    for c in &clusters {
        prepare(c, None).await;
    }
    let mut east = Controller::start(&clusters[0], "east", &mesh, dir.path(), &ha_file, &[]);
    let mut west = Controller::start(&clusters[1], "west", &mesh, dir.path(), &ha_file, &[]);
    let monitor = Monitor::on(&["east", "west"], &cms);
    let workload = counterweight_e2e::ems::monitor(&names, &clusters);
    let elected = any_active(&cms, "an active elected over mTLS", 0).await;
    println!("elected {elected:?}");

    // Cut the link both ways. Without a witness the active fences when its
    // lease runs out and nobody promotes: safe, not available.
    mesh.cut("east", "west");
    let cut = Instant::now();
    let active = &cms[elected.0];
    eventually(
        "the isolated active to fence",
        Duration::from_secs(30),
        Duration::from_millis(20),
        || async { Ok(sample(active).await.filter(|s| !s.active)) },
    )
    .await;
    println!("isolated active fenced after {:?}", cut.elapsed());
    nobody_active_for(
        &cms,
        Duration::from_secs(3),
        "nobody may be active while the link is cut",
    )
    .await;

    // Heal: one of them becomes active again, in a higher epoch.
    mesh.heal("east", "west");
    any_active(&cms, "an active after the link heals", elected.1.epoch).await;
    monitor.finish();
    workload.finish().await;
    east.process.check_alive().expect("east still running");
    west.process.check_alive().expect("west still running");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn both_starting_active_is_resolved_para_0088_and_the_ha_config_reloads() {
    init_tracing();
    let names = ["east", "west"];
    let (clusters, cms, dir, mesh) = start_group(&names).await;
    let (config, ha_file) = group(dir.path(), &names);
    // Both records say active, in the same epoch.
    prepare(&clusters[0], Some(("active", 3))).await;
    prepare(&clusters[1], Some(("active", 3))).await;
    let mut east = Controller::start(&clusters[0], "east", &mesh, dir.path(), &ha_file, &[]);
    let mut west = Controller::start(&clusters[1], "west", &mesh, dir.path(), &ha_file, &[]);
    // The preferred cluster may keep epoch 3 (same epoch: priority decides)
    // or either may win a new election; what must hold is one active and
    // the other not. A failure shows both controllers' last log lines
    // (their processes print them when a panicking test drops them).
    let resolved = eventually(
        "a single active",
        Duration::from_secs(90),
        Duration::from_millis(20),
        || async {
            let (e, w) = (sample(&cms[0]).await, sample(&cms[1]).await);
            // A record still saying "active" may be the seeded one, not yet
            // backed by a lease: the winner is the one that serves.
            if let (Some(e), Some(w)) = (e, w)
                && e.active != w.active
            {
                let winner = &cms[if e.active { 0 } else { 1 }];
                if record(winner)
                    .await
                    .get(counterweight_core::state::SERVING_KEY)
                    .map(String::as_str)
                    == Some("true")
                {
                    return Ok(Some((e, w)));
                }
            }
            Err(format!("east {e:?}, west {w:?}"))
        },
    )
    .await;
    println!("resolved: east {:?}, west {:?}", resolved.0, resolved.1);
    east.process.check_alive().expect("east keeps running");
    west.process.check_alive().expect("west keeps running");
    // And it stays resolved, watched by the monitor from here on.
    let monitor = Monitor::on(&["east", "west"], &cms);
    let workload = counterweight_e2e::ems::monitor(&names, &clusters);
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

    // The HA config file changes under the running processes: a new probe
    // interval applies, a new lease length is refused with a reason (every
    // member must agree on it), and both keep running.
    let mut faster = config.clone();
    faster.probe_interval_ms = 250;
    replace_ha_config(dir.path(), &faster);
    for c in &clusters {
        wait_reason(c, "ConfigApplied").await;
    }
    let mut longer = faster.clone();
    longer.lease_ms = 3000;
    replace_ha_config(dir.path(), &longer);
    for c in &clusters {
        wait_reason(c, "ConfigRejected").await;
    }
    east.process
        .check_alive()
        .expect("east survives a config change");
    west.process
        .check_alive()
        .expect("west survives a config change");
    monitor.finish();
    workload.finish().await;
}

/// Rewrites the watched HA config file atomically, as a ConfigMap update
/// would.
fn replace_ha_config(dir: &std::path::Path, config: &HaConfig) {
    let tmp = tempfile::tempdir_in(dir).expect("dir");
    let file = write_ha_config(tmp.path(), config);
    std::fs::rename(file, dir.join("ha.json")).expect("replace the HA config");
}

async fn wait_reason(cluster: &Cluster, reason: &str) {
    eventually(
        &format!("a {reason} Event in {}", cluster.name()),
        Duration::from_secs(60),
        Duration::from_millis(200),
        || async {
            let ev = event_reasons(cluster).await;
            if ev.iter().any(|r| r == reason) {
                Ok(Some(()))
            } else {
                Err(format!("{ev:?}"))
            }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_peer_with_a_certificate_from_another_ca_is_refused_until_its_certificate_is_rotated() {
    init_tracing();
    let names = ["east", "west"];
    let (clusters, cms, dir, mesh) = start_group(&names).await;
    let (_, ha_file) = group(dir.path(), &names);
    // Keep west's good pair, and give it one from another CA with the right
    // name: only the CA is wrong. west still trusts the group's CA.
    let good = tempfile::tempdir().expect("dir");
    for ext in ["crt", "key"] {
        std::fs::copy(
            dir.path().join(format!("peer-west.{ext}")),
            good.path().join(format!("peer-west.{ext}")),
        )
        .expect("keep the good pair");
    }
    write_peer_certs_from(dir.path(), "rogue-ca", "counterweight-rogue", &["west"]);
    for c in &clusters {
        prepare(c, None).await;
    }
    let mut east = Controller::start(&clusters[0], "east", &mesh, dir.path(), &ha_file, &[]);
    let mut west = Controller::start(&clusters[1], "west", &mesh, dir.path(), &ha_file, &[]);
    let monitor = Monitor::on(&["east", "west"], &cms);
    let workload = counterweight_e2e::ems::monitor(&names, &clusters);

    // east refuses west's handshakes, so west's votes never count and
    // neither side reaches a majority of two.
    let refused = eventually(
        "east to refuse west's TLS handshakes",
        Duration::from_secs(60),
        Duration::from_millis(100),
        || async {
            let n = east
                .metric(
                    "counterweight_peer_messages_rejected_total",
                    &[r#"reason="tls_handshake""#],
                )
                .await?;
            Ok((n >= 3.0).then_some(n))
        },
    )
    .await;
    nobody_active_for(
        &cms,
        Duration::from_secs(3),
        "no majority may form with a refused peer",
    )
    .await;
    let received_from_west = east
        .metric(
            "counterweight_peer_messages_received_total",
            &[r#"peer="west""#],
        )
        .await
        .expect("east metrics");
    assert_eq!(received_from_west, 0.0, "nothing from west may get in");
    let failures = west
        .metric(
            "counterweight_peer_send_failures_total",
            &[r#"peer="east""#],
        )
        .await
        .expect("west metrics");
    println!("east refused {refused} handshakes; west gave up {failures} sends");

    // Rotate west's files to a certificate of the group's CA: the running
    // controller reloads them and the pair elects an active.
    for ext in ["key", "crt"] {
        let tmp = dir.path().join(format!("peer-west.{ext}.new"));
        std::fs::copy(good.path().join(format!("peer-west.{ext}")), &tmp).expect("copy");
        std::fs::rename(&tmp, dir.path().join(format!("peer-west.{ext}"))).expect("rotate");
    }
    let elected = any_active(&cms, "an active once west's certificate is good", 0).await;
    println!("after rotation: {elected:?}");
    monitor.finish();
    workload.finish().await;
    east.process.check_alive().expect("east keeps running");
    west.process.check_alive().expect("west keeps running");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_clusters_replace_a_killed_active_only_after_its_lease() {
    init_tracing();
    let names = ["east", "west", "north"];
    let (clusters, cms, dir, mesh) = start_group(&names).await;
    let (config, ha_file) = group(dir.path(), &names);
    for c in &clusters {
        prepare(c, None).await;
    }
    let mut nodes: Vec<Controller> = names
        .iter()
        .zip(&clusters)
        .map(|(n, c)| Controller::start(c, n, &mesh, dir.path(), &ha_file, &[]))
        .collect();
    let monitor = Monitor::on(&names, &cms);
    let workload = counterweight_e2e::ems::monitor(&names, &clusters);
    let (first, first_state) = any_active(&cms, "an active among three clusters", 0).await;

    // SIGKILL the active controller. Its ConfigMap keeps saying "active" in
    // the old epoch; it no longer serves once its lease runs out, which is
    // what the survivors wait for.
    monitor.mark_dead(names[first]);
    nodes[first].process.kill();
    let killed = Instant::now();
    // A timeout shows each survivor's record (their processes print their
    // last log lines when the panicking test drops them): this wait once
    // timed out in CI with nothing to go on.
    let (next, promoted) = eventually_explained(
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
        || async {
            let mut why = String::new();
            for (i, api) in cms.iter().enumerate().filter(|(i, _)| *i != first) {
                why.push_str(&format!(
                    "\n--- {} record ---\n{:?}",
                    names[i],
                    record(api).await
                ));
            }
            why
        },
    )
    .await;
    let took = killed.elapsed();
    println!(
        "{} took over from {} after {took:?} (epoch {} -> {})",
        names[next], names[first], first_state.epoch, promoted.epoch
    );
    // The voters' promises to the killed active run `leaseMs` from its last
    // renewal, sent at most about two probe intervals (one interval, plus
    // one late tick) before the kill: nobody may promote earlier.
    // Promote-on-silence would take over within a few probe intervals.
    let bound = config.lease_ms - 2 * config.probe_interval_ms;
    assert!(
        took >= Duration::from_millis(bound),
        "{} promoted after {took:?}, before the killed active's lease could have expired ({bound} ms)",
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
    monitor.finish();
    workload.finish().await;
    for (i, node) in nodes.iter_mut().enumerate().filter(|(i, _)| *i != first) {
        node.process
            .check_alive()
            .unwrap_or_else(|e| panic!("{} keeps running: {e}", names[i]));
    }
}
