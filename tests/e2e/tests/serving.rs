//! Workload effects (issue 7, part 1) on a real control plane: the
//! controller's `PodServing` driven directly (no HA loop), with Deployments
//! whose pods look injected (readiness gate and status annotation), run by
//! kube-controller-manager, kube-scheduler and KWOK, whose stages make a
//! gated pod Ready exactly when its gate conditions are True.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use counterweight_controller::events::EventSink;
use counterweight_controller::serving::{PodServing, PodServingConfig};
use counterweight_controller::state_store::StateStore;
use counterweight_core::names;
use counterweight_core::workload::{STANDBY_REASON, STOPPED_REASON};
use counterweight_e2e::{eventually, init_tracing};
use counterweight_harness::Cluster;
use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, Namespace, Pod, PodReadinessGate, PodSpec, PodTemplateSpec,
};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use serde_json::json;

const SYSTEM: &str = names::SYSTEM_NAMESPACE;
const APP: &str = "ems";
const PLAIN: &str = "plain";

fn meta(name: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.into()),
        ..Default::default()
    }
}

/// A Deployment whose pods look as the webhook leaves them: the readiness
/// gate and the status annotation (the init-gate itself is left out: KWOK
/// "runs" init containers at once anyway).
fn deployment(name: &str, replicas: i32, role: Option<&str>, gated: bool) -> Deployment {
    let mut labels = BTreeMap::from([("app".to_owned(), name.to_owned())]);
    if let Some(role) = role {
        labels.insert(names::ROLE_LABEL.to_owned(), role.to_owned());
    }
    Deployment {
        metadata: meta(name),
        spec: Some(DeploymentSpec {
            replicas: Some(replicas),
            selector: LabelSelector {
                match_labels: Some(BTreeMap::from([("app".to_owned(), name.to_owned())])),
                ..Default::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels),
                    annotations: gated.then(|| {
                        BTreeMap::from([(
                            names::STATUS_ANNOTATION.to_owned(),
                            "injected-v1".to_owned(),
                        )])
                    }),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    containers: vec![Container {
                        name: "main".into(),
                        image: Some(format!("registry.invalid/{name}:1")),
                        ..Default::default()
                    }],
                    readiness_gates: gated.then(|| {
                        vec![PodReadinessGate {
                            condition_type: names::SERVING_CONDITION.into(),
                        }]
                    }),
                    // Evicted or deleted pods go at once; nothing to drain.
                    termination_grace_period_seconds: Some(0),
                    ..Default::default()
                }),
            },
            ..Default::default()
        }),
        ..Default::default()
    }
}

async fn namespace(client: &kube::Client, name: &str, opted_in: bool) {
    let nss: Api<Namespace> = Api::all(client.clone());
    let mut m = meta(name);
    if opted_in {
        m.labels = Some(BTreeMap::from([(
            names::INJECT_LABEL.to_owned(),
            names::INJECT_ENABLED.to_owned(),
        )]));
    }
    nss.create(
        &PostParams::default(),
        &Namespace {
            metadata: m,
            ..Default::default()
        },
    )
    .await
    .expect("create namespace");
    let sas: Api<k8s_openapi::api::core::v1::ServiceAccount> =
        Api::namespaced(client.clone(), name);
    eventually(
        "default ServiceAccount",
        Duration::from_secs(60),
        Duration::from_millis(100),
        || async { sas.get_opt("default").await.map_err(|e| e.to_string()) },
    )
    .await;
}

/// (status, reason) of the serving condition, if any.
fn serving(p: &Pod) -> Option<(String, String)> {
    p.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == names::SERVING_CONDITION)
        .map(|c| (c.status.clone(), c.reason.clone().unwrap_or_default()))
}

fn is_true(p: &Pod, ty: &str) -> bool {
    counterweight_e2e::fixtures::condition_true(p, ty)
}

fn running(p: &Pod) -> bool {
    p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
        && p.metadata.deletion_timestamp.is_none()
}

fn uid(p: &Pod) -> String {
    p.metadata.uid.clone().unwrap_or_default()
}

async fn pods(client: &kube::Client, ns: &str, app: &str) -> Result<Vec<Pod>, String> {
    Api::<Pod>::namespaced(client.clone(), ns)
        .list(&ListParams::default().labels(&format!("app={app}")))
        .await
        .map(|l| l.items)
        .map_err(|e| e.to_string())
}

/// Waits for `n` Running pods of `app` and returns them.
async fn running_pods(client: &kube::Client, ns: &str, app: &str, n: usize) -> Vec<Pod> {
    eventually(
        &format!("{n} Running pods of {ns}/{app}"),
        Duration::from_secs(90),
        Duration::from_millis(200),
        || async {
            let ps: Vec<Pod> = pods(client, ns, app)
                .await?
                .into_iter()
                .filter(running)
                .collect();
            Ok((ps.len() == n).then_some(ps))
        },
    )
    .await
}

fn serving_for(cluster: &Cluster, config: PodServingConfig) -> PodServing {
    let client = cluster.client();
    let store = StateStore::new(client.clone(), SYSTEM, names::STATE_CONFIGMAP);
    let events = EventSink::new(
        client.clone(),
        cluster.name(),
        SYSTEM,
        names::STATE_CONFIGMAP,
    );
    PodServing::start(client, store, Some(events), config)
}

async fn state_flag(client: &kube::Client) -> Option<String> {
    Api::<ConfigMap>::namespaced(client.clone(), SYSTEM)
        .get_opt(names::STATE_CONFIGMAP)
        .await
        .ok()
        .flatten()
        .and_then(|cm| cm.data)
        .and_then(|d| d.get(counterweight_core::state::SERVING_KEY).cloned())
}

/// Waits until the state record's `serving` flag reads `value`: it is
/// written beside the effects, after them.
async fn flag_reads(client: &kube::Client, value: &str) {
    eventually(
        &format!("the serving flag to read {value}"),
        Duration::from_secs(10),
        Duration::from_millis(50),
        || async {
            let flag = state_flag(client).await;
            Ok((flag.as_deref() == Some(value)).then_some(()))
        },
    )
    .await;
}

/// Checks for `window` that no pod of `app` ever has the condition True.
async fn never_serves(client: &kube::Client, app: &str, window: Duration) {
    let end = Instant::now() + window;
    while Instant::now() < end {
        for p in pods(client, APP, app).await.expect("list pods") {
            assert_ne!(
                serving(&p).map(|s| s.0).as_deref(),
                Some("True"),
                "a pod of {app} serves on a standby cluster: {:?}",
                p.metadata.name
            );
            assert!(
                !is_true(&p, "Ready"),
                "a gated pod of {app} is Ready on standby"
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn promotion_serves_and_demotion_restarts_only_serving_pods() {
    init_tracing();
    let clusters = counterweight_harness::start_clusters(1)
        .await
        .expect("a local cluster starts");
    let cluster = &clusters[0];
    let client = cluster.client();
    namespace(&client, SYSTEM, false).await;
    namespace(&client, APP, true).await;
    namespace(&client, PLAIN, false).await;

    let deploys: Api<Deployment> = Api::namespaced(client.clone(), APP);
    let (web, api) = (20, 5);
    for d in [
        deployment("web", web, Some("service"), true),
        deployment("api", api, None, true),
        // Synchronization pods, even if they carried the gate, are never touched.
        deployment("db", 1, Some("database"), true),
        deployment("ha", 1, Some("ha"), false),
        deployment("files", 1, Some("file-replication"), false),
    ] {
        deploys
            .create(&PostParams::default(), &d)
            .await
            .expect("create deployment");
    }
    Api::<Deployment>::namespaced(client.clone(), PLAIN)
        .create(&PostParams::default(), &deployment("other", 2, None, true))
        .await
        .expect("create deployment in a namespace that did not opt in");

    let web_before = running_pods(&client, APP, "web", web as usize).await;
    running_pods(&client, APP, "api", api as usize).await;
    let sync_before: BTreeMap<String, String> = {
        let mut m = BTreeMap::new();
        for app in ["db", "ha", "files"] {
            for p in running_pods(&client, APP, app, 1).await {
                m.insert(app.to_owned(), uid(&p));
            }
        }
        m
    };
    let other_before: BTreeSet<String> = running_pods(&client, PLAIN, "other", 2)
        .await
        .iter()
        .map(uid)
        .collect();
    assert!(
        web_before.iter().all(|p| !is_true(p, "Ready")),
        "gated pods must wait for their condition before Ready"
    );

    let config = PodServingConfig {
        delete_after: Duration::from_secs(20),
        resync: Duration::from_secs(2),
        ..Default::default()
    };
    let ps = serving_for(cluster, config);

    // Promotion: every Running service pod serves and turns Ready.
    let t = Instant::now();
    let served = ps.activate().await.expect("activate");
    eprintln!("activate: {served} pods set serving in {:?}", t.elapsed());
    for (app, n) in [("web", web as usize), ("api", api as usize)] {
        eventually(
            &format!("all {app} pods serving and Ready"),
            Duration::from_secs(60),
            Duration::from_millis(200),
            || async {
                let ps = pods(&client, APP, app).await?;
                let ok = ps.len() == n
                    && ps.iter().all(|p| {
                        serving(p).map(|s| s.0).as_deref() == Some("True") && is_true(p, "Ready")
                    });
                Ok(ok.then_some(()))
            },
        )
        .await;
    }
    eprintln!("promotion: pods Ready {:?} after activate", t.elapsed());
    flag_reads(&client, "true").await;

    // While active, new service pods are made to serve by the watch loop.
    deploys
        .patch(
            "api",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": api + 1}})),
        )
        .await
        .expect("scale api");
    eventually(
        "the new api pod serving and Ready",
        Duration::from_secs(60),
        Duration::from_millis(200),
        || async {
            let ps = pods(&client, APP, "api").await?;
            let ok = ps.len() == (api + 1) as usize
                && ps.iter().all(|p| {
                    serving(p).map(|s| s.0).as_deref() == Some("True") && is_true(p, "Ready")
                });
            Ok(ok.then_some(()))
        },
    )
    .await;

    // Pods that are not service pods carry no serving condition.
    for (ns, app) in [(APP, "db"), (APP, "ha"), (APP, "files"), (PLAIN, "other")] {
        for p in pods(&client, ns, app).await.expect("list pods") {
            assert_eq!(serving(&p), None, "{ns}/{app} must not be touched");
        }
    }

    let mut serving_uids = BTreeSet::new();
    for app in ["web", "api"] {
        serving_uids.extend(
            pods(&client, APP, app)
                .await
                .expect("list pods")
                .iter()
                .map(uid),
        );
    }
    let total = web as usize + api as usize + 1;
    assert_eq!(serving_uids.len(), total);

    // Demotion: when demote returns, nothing serves (the fence).
    let t = Instant::now();
    let demotion = ps.demote().await.expect("demote");
    let fence = t.elapsed();
    for app in ["web", "api"] {
        for p in pods(&client, APP, app).await.expect("list pods") {
            if serving_uids.contains(&uid(&p)) {
                assert_eq!(
                    serving(&p),
                    Some(("False".to_owned(), STOPPED_REASON.to_owned())),
                    "fence: {:?}",
                    p.metadata.name
                );
            }
        }
    }
    // The watch loop may stop a few pods itself, just before the fence runs;
    // either way every serving pod is handed to this demotion's restarts.
    assert!(demotion.stopped <= total);
    assert_eq!(demotion.restarting, total);
    let report = tokio::time::timeout(
        Duration::from_secs(120),
        demotion.restarts.expect("restarts started"),
    )
    .await
    .expect("restarts finish in time")
    .expect("restart report");
    eprintln!(
        "demotion: fence over {total} pods in {fence:?}; restarted {} ({} evicted, {} deleted, {} gone) in {:?}",
        report.restarted(),
        report.evicted,
        report.deleted,
        report.gone,
        report.took
    );
    assert_eq!(report.restarted() + report.gone, total);
    assert_eq!(report.deleted, 0, "no PDB: eviction must succeed");

    // Every serving pod was replaced; the new ones do not serve.
    for (app, n) in [("web", web as usize), ("api", (api + 1) as usize)] {
        eventually(
            &format!("{app} replaced by pods that do not serve"),
            Duration::from_secs(90),
            Duration::from_millis(200),
            || async {
                let ps: Vec<Pod> = pods(&client, APP, app).await?;
                let ok = ps.len() == n
                    && ps.iter().all(|p| {
                        running(p)
                            && !serving_uids.contains(&uid(p))
                            && serving(p) == Some(("False".to_owned(), STANDBY_REASON.to_owned()))
                            && !is_true(p, "Ready")
                    });
                Ok(ok.then_some(()))
            },
        )
        .await;
    }
    // A new service pod on standby stays blocked.
    deploys
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": web + 2}})),
        )
        .await
        .expect("scale web");
    running_pods(&client, APP, "web", (web + 2) as usize).await;
    never_serves(&client, "web", Duration::from_secs(3)).await;
    never_serves(&client, "api", Duration::from_secs(1)).await;

    // Synchronization pods and pods of other namespaces were never restarted.
    for (app, before) in &sync_before {
        let now: Vec<String> = pods(&client, APP, app)
            .await
            .expect("list pods")
            .iter()
            .map(uid)
            .collect();
        assert_eq!(now, vec![before.clone()], "{app} must never be restarted");
    }
    let other_now: BTreeSet<String> = pods(&client, PLAIN, "other")
        .await
        .expect("list pods")
        .iter()
        .map(uid)
        .collect();
    assert_eq!(other_now, other_before);
    flag_reads(&client, "false").await;

    // The demotion is on record as Events on the state ConfigMap.
    let events: Api<Event> = Api::namespaced(client.clone(), SYSTEM);
    eventually(
        "ServingStopped and ServicePodsRestarted Events",
        Duration::from_secs(30),
        Duration::from_millis(200),
        || async {
            let list = events
                .list(&ListParams::default())
                .await
                .map_err(|e| e.to_string())?;
            let reasons: BTreeSet<String> =
                list.items.iter().filter_map(|e| e.reason.clone()).collect();
            Ok(
                (reasons.contains("ServingStopped") && reasons.contains("ServicePodsRestarted"))
                    .then_some(()),
            )
        },
    )
    .await;
}

/// One cluster with the system namespace and an opted-in app namespace
/// holding Deployment `web` of `n` gated service pods.
async fn cluster_with_web(n: i32) -> Vec<Cluster> {
    init_tracing();
    let clusters = counterweight_harness::start_clusters(1)
        .await
        .expect("a local cluster starts");
    let client = clusters[0].client();
    namespace(&client, SYSTEM, false).await;
    namespace(&client, APP, true).await;
    Api::<Deployment>::namespaced(client, APP)
        .create(&PostParams::default(), &deployment("web", n, None, true))
        .await
        .expect("create deployment");
    clusters
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn restarted_controller_finishes_an_interrupted_demotion() {
    let n = 4;
    let clusters = cluster_with_web(n).await;
    let cluster = &clusters[0];
    let client = cluster.client();
    // A budget that refuses every eviction once pods are not Ready: the
    // first controller's restarts cannot finish.
    Api::<PodDisruptionBudget>::namespaced(client.clone(), APP)
        .create(
            &PostParams::default(),
            &PodDisruptionBudget {
                metadata: meta("web"),
                spec: Some(PodDisruptionBudgetSpec {
                    min_available: Some(IntOrString::Int(n)),
                    selector: Some(LabelSelector {
                        match_labels: Some(BTreeMap::from([("app".to_owned(), "web".to_owned())])),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            },
        )
        .await
        .expect("create PDB");
    running_pods(&client, APP, "web", n as usize).await;

    let first = serving_for(
        cluster,
        PodServingConfig {
            delete_after: Duration::from_secs(600),
            ..Default::default()
        },
    );
    first.activate().await.expect("activate");
    let before: BTreeSet<String> = eventually(
        "web pods serving",
        Duration::from_secs(60),
        Duration::from_millis(200),
        || async {
            let ps = pods(&client, APP, "web").await?;
            let ok = ps.len() == n as usize
                && ps.iter().all(|p| {
                    serving(p).map(|s| s.0).as_deref() == Some("True") && is_true(p, "Ready")
                });
            Ok(ok.then(|| ps.iter().map(uid).collect()))
        },
    )
    .await;

    let demotion = first.demote().await.expect("demote");
    assert_eq!(demotion.restarting, n as usize);
    // The pods stop being Ready (KWOK evaluates the readiness gate as a
    // kubelet would) and the budget refuses the evictions: they stay, stopped.
    eventually(
        "stopped pods NotReady",
        Duration::from_secs(30),
        Duration::from_millis(100),
        || async {
            let ps = pods(&client, APP, "web").await?;
            Ok(ps.iter().all(|p| !is_true(p, "Ready")).then_some(()))
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let ps = pods(&client, APP, "web").await.expect("list pods");
    assert_eq!(
        ps.iter().map(uid).collect::<BTreeSet<_>>(),
        before,
        "PDB must hold the evictions"
    );
    assert!(
        ps.iter()
            .all(|p| serving(p) == Some(("False".to_owned(), STOPPED_REASON.to_owned())))
    );
    // "Crash" mid-demotion.
    drop(demotion);
    drop(first);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let ps = pods(&client, APP, "web").await.expect("list pods");
    assert_eq!(ps.iter().map(uid).collect::<BTreeSet<_>>(), before);

    // A new controller, told standby as at every boot, finds the unfinished
    // restarts on the pods and finishes them (here by the delete fallback,
    // since the budget still refuses).
    let second = serving_for(
        cluster,
        PodServingConfig {
            delete_after: Duration::from_secs(3),
            ..Default::default()
        },
    );
    let t = Instant::now();
    let demotion = second.demote().await.expect("demote after restart");
    assert_eq!(demotion.stopped, 0, "nothing served any more");
    assert_eq!(
        demotion.restarting, n as usize,
        "the unfinished restarts are found"
    );
    let report = tokio::time::timeout(
        Duration::from_secs(60),
        demotion.restarts.expect("restarts started"),
    )
    .await
    .expect("restarts finish in time")
    .expect("restart report");
    eprintln!(
        "resumed demotion: restarted {} ({} evicted, {} deleted after refusal) in {:?} (call to report {:?})",
        report.restarted(),
        report.evicted,
        report.deleted,
        report.took,
        t.elapsed()
    );
    assert_eq!(report.restarted() + report.gone, n as usize);
    assert_eq!(report.evicted, 0, "the budget refuses every eviction");
    eventually(
        "web replaced by pods that do not serve",
        Duration::from_secs(90),
        Duration::from_millis(200),
        || async {
            let ps = pods(&client, APP, "web").await?;
            let ok = ps.len() == n as usize
                && ps.iter().all(|p| {
                    running(p)
                        && !before.contains(&uid(p))
                        && serving(p) == Some(("False".to_owned(), STANDBY_REASON.to_owned()))
                });
            Ok(ok.then_some(()))
        },
    )
    .await;
    never_serves(&client, "web", Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn quick_repromotion_within_the_restart_delay_restarts_nothing() {
    let n = 3;
    let clusters = cluster_with_web(n).await;
    let cluster = &clusters[0];
    let client = cluster.client();
    running_pods(&client, APP, "web", n as usize).await;
    let ps = serving_for(
        cluster,
        PodServingConfig {
            restart_delay: Duration::from_secs(5),
            ..Default::default()
        },
    );
    ps.activate().await.expect("activate");
    let serving_pods = |want: &'static str| {
        let client = client.clone();
        async move {
            let ps = pods(&client, APP, "web").await?;
            let ok = ps.len() == n as usize
                && ps
                    .iter()
                    .all(|p| serving(p).map(|s| s.0).as_deref() == Some(want));
            Ok(ok.then(|| ps.iter().map(uid).collect::<BTreeSet<_>>()))
        }
    };
    let before = eventually(
        "web pods serving",
        Duration::from_secs(60),
        Duration::from_millis(200),
        || serving_pods("True"),
    )
    .await;
    // As at a controller restart on the active side: fenced, then active again.
    let demotion = ps.demote().await.expect("demote");
    assert_eq!(demotion.restarting, n as usize);
    ps.activate().await.expect("activate again");
    let report = tokio::time::timeout(
        Duration::from_secs(30),
        demotion.restarts.expect("restarts started"),
    )
    .await
    .expect("restarts finish in time")
    .expect("restart report");
    assert_eq!(report.cancelled, n as usize, "{report:?}");
    assert_eq!(report.restarted(), 0);
    let after = eventually(
        "the same pods serving again",
        Duration::from_secs(30),
        Duration::from_millis(200),
        || serving_pods("True"),
    )
    .await;
    assert_eq!(after, before, "no pod was restarted");
}

/// Service pods that escaped their gate (made before the webhook, as a
/// one-pass install does: found by the real-node walk) serve whatever the
/// cluster's state. On a standby each is restarted once through its
/// controller; a replacement that comes back ungated too (here: there is
/// no webhook at all) is left alone with a Warning, not restarted in a
/// loop. A pod without a controller is never restarted (an eviction would
/// delete it for good). On an active, nothing is restarted.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pods_that_escaped_their_gate_are_restarted_once_on_a_standby() {
    init_tracing();
    let clusters = counterweight_harness::start_clusters(1)
        .await
        .expect("a local cluster starts");
    let cluster = &clusters[0];
    let client = cluster.client();
    namespace(&client, SYSTEM, false).await;
    namespace(&client, APP, true).await;
    let n = 2;
    Api::<Deployment>::namespaced(client.clone(), APP)
        .create(
            &PostParams::default(),
            &deployment("escapee", n, None, false),
        )
        .await
        .expect("create deployment");
    let loner = Pod {
        metadata: ObjectMeta {
            labels: Some(BTreeMap::from([("app".to_owned(), "loner".to_owned())])),
            ..meta("loner")
        },
        spec: deployment("loner", 1, None, false)
            .spec
            .and_then(|s| s.template.spec),
        ..Default::default()
    };
    Api::<Pod>::namespaced(client.clone(), APP)
        .create(&PostParams::default(), &loner)
        .await
        .expect("create a pod without a controller");
    let uids = |ps: Vec<Pod>| ps.iter().map(uid).collect::<BTreeSet<_>>();
    let escaped = uids(running_pods(&client, APP, "escapee", n as usize).await);
    let loner = uids(running_pods(&client, APP, "loner", 1).await);
    let ps = serving_for(
        cluster,
        PodServingConfig {
            resync: Duration::from_millis(500),
            delete_after: Duration::from_secs(10),
            ..Default::default()
        },
    );
    // Active: the escapees serve, as any pod without a gate does; nothing
    // is restarted.
    ps.activate().await.expect("activate");
    let same_pods_for = |app: &'static str, want: BTreeSet<String>, window: Duration| {
        let client = client.clone();
        async move {
            let end = Instant::now() + window;
            while Instant::now() < end {
                let now = uids(pods(&client, APP, app).await.expect("list pods"));
                assert_eq!(now, want, "pods of {app} were restarted");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    same_pods_for("escapee", escaped.clone(), Duration::from_secs(3)).await;

    // Standby: each escapee is restarted; their replacements run.
    ps.demote().await.expect("demote");
    let replaced = eventually(
        "the escaped pods replaced by new ones",
        Duration::from_secs(60),
        Duration::from_millis(200),
        || async {
            let now: Vec<Pod> = pods(&client, APP, "escapee")
                .await?
                .into_iter()
                .filter(running)
                .collect();
            let now = uids(now);
            Ok((now.len() == n as usize && now.is_disjoint(&escaped)).then_some(now))
        },
    )
    .await;
    // The replacements came back without a gate (no webhook here), so a
    // restart does not help: they are left alone, with a Warning, and so
    // is the pod without a controller.
    let events: Api<Event> = Api::namespaced(client.clone(), SYSTEM);
    eventually(
        "Warning Events for the restarted escapees and for those left serving",
        Duration::from_secs(30),
        Duration::from_millis(200),
        || async {
            let list = events
                .list(&ListParams::default())
                .await
                .map_err(|e| e.to_string())?;
            let notes: Vec<String> = list
                .items
                .iter()
                .filter(|e| e.type_.as_deref() == Some("Warning"))
                .map(|e| {
                    format!(
                        "{} {}",
                        e.reason.clone().unwrap_or_default(),
                        e.note.clone().unwrap_or_default()
                    )
                })
                .collect();
            let has = |reason: &str, pod: &str| {
                notes
                    .iter()
                    .any(|n| n.starts_with(reason) && n.contains(&format!("{APP}/{pod}")))
            };
            let restarted = has("UngatedPodRestarted", "escapee");
            let left = has("UngatedPodServes", "escapee") && has("UngatedPodServes", "loner");
            if restarted && left {
                Ok(Some(()))
            } else {
                Err(format!("{notes:?}"))
            }
        },
    )
    .await;
    same_pods_for("escapee", replaced, Duration::from_secs(4)).await;
    same_pods_for("loner", loner, Duration::from_secs(1)).await;
}
