//! Active/standby handover (issue 4) end to end on real control planes.
//!
//! Each cluster runs the controller's health and HA loops against its own
//! kube-apiserver. Peers talk through an in-process router that can cut
//! links (the mTLS transport has its own tests). A monitor samples every
//! state ConfigMap every 10 ms and fails the test on any sample that shows
//! two actives.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use counterweight_controller::HaWiring;
use counterweight_core::ha::{Command, HaConfig};
use counterweight_e2e::fixtures::{
    Router, create_namespaces, deployment, fast_ha_config, install_policy,
};
use counterweight_e2e::{eventually, init_tracing};
use counterweight_harness::Cluster;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;
use tokio::sync::mpsc;

const SYSTEM: &str = "counterweight-system";
const APP: &str = "ems";

const POLICY: &str = r#"
interval: 300ms
threshold: 0.6
retries: 1
components:
  - name: web
    namespaces: [ems]
    selector: {matchLabels: {app: web}}
    weight: 0.6
  - name: api
    namespaces: [ems]
    selector: {matchLabels: {app: api}}
    weight: 0.4
"#;

async fn prepare(cluster: &Cluster, with_workload: bool) {
    let client = cluster.client();
    create_namespaces(&client, &[SYSTEM, APP]).await;
    if !with_workload {
        return;
    }
    let deploys: Api<Deployment> = Api::namespaced(client.clone(), APP);
    for name in ["web", "api"] {
        deploys
            .create(&PostParams::default(), &deployment(name, 1, &[]))
            .await
            .expect("deployment");
    }
    install_policy(&client, SYSTEM, POLICY).await;
}

fn ha_config(names: &[&str], witness: Option<&str>) -> HaConfig {
    fast_ha_config(names, witness)
}

/// A controller running in-process; dropping the stop sender stops it.
struct Running {
    // Dropping it stops the controller gracefully.
    _stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), counterweight_controller::Error>>,
    _commands: mpsc::Sender<Command>,
}

impl Running {
    /// Stops the controller abruptly, like a crash: its tasks are aborted.
    fn kill(self) {
        self.task.abort();
    }
}

async fn start_controller(
    cluster: &Cluster,
    name: &str,
    config: HaConfig,
    router: &Arc<Router>,
) -> Running {
    let inbox = router.connect(name);
    let (commands_tx, commands) = mpsc::channel(8);
    let wiring = HaWiring {
        config,
        outbox: router.outbox(),
        inbox,
        commands,
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let mut settings = counterweight_controller::health::HealthSettings::new(name, SYSTEM);
    settings.cluster = name.into();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(counterweight_controller::run_with(
        cluster.client(),
        settings,
        listener,
        Some(wiring),
        async {
            let _ = stopped.await;
        },
    ));
    Running {
        _stop: stop,
        task,
        _commands: commands_tx,
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct Sample {
    active: bool,
    epoch: u64,
}

async fn sample(cms: &Api<ConfigMap>) -> Option<Sample> {
    let cm = cms.get_opt("counterweight-state").await.ok()??;
    let d = cm.data?;
    Some(Sample {
        active: d.get("state").map(String::as_str) == Some("active"),
        epoch: d.get("epoch")?.parse().ok()?,
    })
}

/// Samples all state ConfigMaps every 10 ms. A violation is A active at t1
/// and t3 in the same epoch with B active at t2 in between: then both were
/// active at t2, whatever the read order.
struct Monitor {
    violations: Arc<Mutex<Vec<String>>>,
    // Members whose controller was killed: their last record stays
    // "active" in an old epoch, which is no longer a serving active.
    dead: Arc<Mutex<HashSet<String>>>,
    samples: Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Monitor {
    fn start(apis: Vec<(String, Api<ConfigMap>)>) -> Self {
        let violations = Arc::new(Mutex::new(Vec::new()));
        let samples = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let dead = Arc::new(Mutex::new(HashSet::<String>::new()));
        let (v, n, d) = (violations.clone(), samples.clone(), dead.clone());
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            let mut round = 0usize;
            loop {
                tick.tick().await;
                round += 1;
                let k = apis.len();
                for i in 0..k {
                    let a = &apis[(round + i) % k];
                    let first = sample(&a.1).await;
                    let mut others = Vec::new();
                    for b in apis.iter().filter(|b| b.0 != a.0) {
                        others.push((b.0.clone(), sample(&b.1).await));
                    }
                    let last = sample(&a.1).await;
                    n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if let (Some(f), Some(l)) = (first, last)
                        && f.active
                        && l.active
                        && f.epoch == l.epoch
                    {
                        for (name, s) in others {
                            let stale = |who: &str, epoch: u64, other: u64| {
                                d.lock().expect("lock").contains(who) && epoch < other
                            };
                            if let Some(s) = s
                                && s.active
                                && !stale(&a.0, f.epoch, s.epoch)
                                && !stale(&name, s.epoch, f.epoch)
                            {
                                v.lock().expect("lock").push(format!(
                                    "{} (epoch {}) and {name} ({s:?}) both active",
                                    a.0, f.epoch
                                ));
                            }
                        }
                    }
                }
            }
        });
        Self {
            violations,
            dead,
            samples,
            task,
        }
    }

    fn mark_dead(&self, name: &str) {
        self.dead.lock().expect("lock").insert(name.to_owned());
    }

    fn finish(self) {
        self.task.abort();
        let samples = self.samples.load(std::sync::atomic::Ordering::Relaxed);
        assert!(samples > 10, "the monitor must have sampled ({samples})");
        let v = self.violations.lock().expect("lock");
        assert!(v.is_empty(), "two actives observed: {v:?}");
    }
}

async fn events(cluster: &Cluster) -> Vec<String> {
    let api: Api<Event> = Api::namespaced(cluster.client(), SYSTEM);
    api.list(&ListParams::default())
        .await
        .map(|l| l.items.into_iter().filter_map(|e| e.reason).collect())
        .unwrap_or_default()
}

async fn wait_active(cms: &Api<ConfigMap>, what: &str, min_epoch: u64) -> Sample {
    // Generous: on a loaded two-core machine three control planes, their
    // Deployments and the first health intervals take a while.
    eventually(
        what,
        Duration::from_secs(90),
        Duration::from_millis(20),
        || async {
            Ok(sample(cms)
                .await
                .filter(|s| s.active && s.epoch >= min_epoch))
        },
    )
    .await
}

async fn set_web_ready(cluster: &Cluster, ready: bool) {
    let pods: Api<Pod> = Api::namespaced(cluster.client(), APP);
    let status = if ready { "True" } else { "False" };
    for p in pods
        .list(&ListParams::default().labels("app=web"))
        .await
        .expect("pods")
        .items
    {
        pods.patch_status(
            &p.metadata.name.expect("name"),
            &PatchParams::default(),
            &Patch::Strategic(
                json!({"status": {"conditions": [{"type": "Ready", "status": status}]}}),
            ),
        )
        .await
        .expect("patch status");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn health_drop_hands_over_with_the_fig9_sequence() {
    init_tracing();
    let clusters = counterweight_harness::start_named(&["east", "west"])
        .await
        .expect("clusters");
    for c in &clusters {
        prepare(c, true).await;
    }
    let cms: Vec<Api<ConfigMap>> = clusters
        .iter()
        .map(|c| Api::namespaced(c.client(), SYSTEM))
        .collect();
    let router = Arc::new(Router::default());
    let config = ha_config(&["east", "west"], None);
    let east = start_controller(&clusters[0], "east", config.clone(), &router).await;
    let west = start_controller(&clusters[1], "west", config, &router).await;
    let monitor = Monitor::start(vec![
        ("east".into(), cms[0].clone()),
        ("west".into(), cms[1].clone()),
    ]);

    // Both healthy: the preferred cluster (east) is elected.
    let first = wait_active(&cms[0], "east to become active", 1).await;
    assert!(!sample(&cms[1]).await.is_some_and(|s| s.active));

    // east's weighted health falls (web, w = 0.6): after (K+1) intervals it
    // is abnormal and hands over to west.
    let dropped = Instant::now();
    set_web_ready(&clusters[0], false).await;
    let promoted = wait_active(&cms[1], "west to become active", first.epoch + 1).await;
    let took = dropped.elapsed();
    let east_now = sample(&cms[0]).await.expect("east state");
    assert!(!east_now.active, "east must be standby after the handover");
    assert!(
        promoted.epoch > first.epoch,
        "a new active takes a higher epoch"
    );
    println!("handover after health drop took {took:?} (detection (K+1)*interval = 600 ms)");

    let east_events = eventually(
        "east's FIG. 9 events",
        Duration::from_secs(10),
        Duration::from_millis(100),
        || async {
            let ev = events(&clusters[0]).await;
            Ok((ev.iter().any(|r| r == "HandoverStarted")
                && ev.iter().any(|r| r == "HandedOver")
                && ev.iter().any(|r| r == "ClusterAbnormal"))
            .then_some(ev))
        },
    )
    .await;
    let west_events = eventually(
        "west's FIG. 9 events",
        Duration::from_secs(10),
        Duration::from_millis(100),
        || async {
            let ev = events(&clusters[1]).await;
            Ok(
                (ev.iter().any(|r| r == "HandoverReady") && ev.iter().any(|r| r == "Promoted"))
                    .then_some(ev),
            )
        },
    )
    .await;
    println!("east events: {east_events:?}\nwest events: {west_events:?}");
    let transition = cms[1]
        .get("counterweight-state")
        .await
        .expect("state")
        .data
        .and_then(|d| d.get("lastTransition").cloned())
        .unwrap_or_default();
    assert!(transition.contains("Promoted"), "{transition}");

    // No preemption: east recovers and stays standby.
    set_web_ready(&clusters[0], true).await;
    let calm = Instant::now() + Duration::from_secs(3);
    while Instant::now() < calm {
        assert!(
            !sample(&cms[0]).await.is_some_and(|s| s.active),
            "a recovered former active must stay standby"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    monitor.finish();
    drop((east, west));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killed_active_is_replaced_only_after_its_lease_with_a_witness() {
    init_tracing();
    let clusters = counterweight_harness::start_named(&["east", "west", "witness"])
        .await
        .expect("clusters");
    prepare(&clusters[0], true).await;
    prepare(&clusters[1], true).await;
    prepare(&clusters[2], false).await;
    let cms: Vec<Api<ConfigMap>> = clusters
        .iter()
        .map(|c| Api::namespaced(c.client(), SYSTEM))
        .collect();
    let router = Arc::new(Router::default());
    let config = ha_config(&["east", "west"], Some("witness"));
    let east = start_controller(&clusters[0], "east", config.clone(), &router).await;
    let _west = start_controller(&clusters[1], "west", config.clone(), &router).await;
    let _witness = start_controller(&clusters[2], "witness", config.clone(), &router).await;
    let monitor = Monitor::start(vec![
        ("east".into(), cms[0].clone()),
        ("west".into(), cms[1].clone()),
    ]);

    let first = wait_active(&cms[0], "east to become active", 1).await;
    // Crash east's controller: its state stays "active" in its ConfigMap,
    // but nobody renews its lease.
    monitor.mark_dead("east");
    east.kill();
    router.cut("east", "west");
    router.cut("east", "witness");
    let killed = Instant::now();
    let promoted = wait_active(&cms[1], "west to take over", first.epoch + 1).await;
    let took = killed.elapsed();
    // The voters' promises to east run `leaseMs` from its last renewal,
    // sent at most about two probe intervals (allowing one late tick)
    // before the kill: nobody may promote earlier. Promote-on-silence would
    // take over within a few probe intervals.
    let bound = config.lease_ms - 2 * config.probe_interval_ms;
    assert!(
        took >= Duration::from_millis(bound),
        "west promoted after {took:?}, before east's lease could have expired ({bound} ms)"
    );
    assert!(promoted.epoch > first.epoch);
    println!(
        "takeover after crash: {took:?} (lease {} ms)",
        config.lease_ms
    );
    monitor.finish();
}
