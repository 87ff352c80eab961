//! The real controller on a real kubelet (issue 14, item 4): no hand plays
//! the controller's part. The `counterweight-controller` binary, as a host
//! process, drives a real-node cluster (`west`) in an HA group with a KWOK
//! peer (`east`, preferred, so `west` starts as the standby); the webhook
//! injects the gate from the project's gate image; `cwctl switchover`
//! moves the active side, as an operator would.
//!
//! - Standby: `west`'s service pod is held at the gate (gate Running, app
//!   Waiting in `PodInitializing`, not Ready, no endpoint), while its
//!   synchronization pod (role `file-replication`, never gated, from the
//!   project's `sync-rsync` image) is Ready at once and reports standby.
//! - Promotion: the gate exits 0 with the epoch as termination message and
//!   writes its epoch file (the app prints it), the app starts, the
//!   controller's serving condition turns the pod Ready through the
//!   readiness gate, and its address becomes the Service's one ready
//!   endpoint.
//! - Demotion: the controller fences the pod (serving condition False,
//!   reason `ServingStopped`) and evicts it; its replacement is held at the
//!   gate again and stays out of the EndpointSlice.
//! - The synchronization pod follows every transition without a restart:
//!   its `/watermark` says active in the new epoch (and its pushes succeed)
//!   after the promotion, standby after the demotion, and it keeps its uid
//!   and restart count 0 throughout.
//!
//! Two monitors run the whole time: the state records (never two actives)
//! and the workloads (never both clusters' service pods serving).
//!
//! Needs root and the node binaries (see `real_node.rs`) and the gate and
//! sync-rsync images (`tools/images.sh gate sync-rsync`).

use std::time::{Duration, Instant};

use counterweight_core::inject::{GATE_CONTAINER, LEASE_CONTAINER, RUN_VOLUME};
use counterweight_core::names;
use counterweight_core::state::Role;
use counterweight_core::workload::{ACTIVE_REASON, STOPPED_REASON, released_epoch};
use counterweight_e2e::ems::APP;
use counterweight_e2e::fixtures::init_container_names;
use counterweight_e2e::ha::{Monitor, event_reasons, sample};
use counterweight_e2e::realgroup::{
    GATE_IMAGE, KWOK, PodLog, PodSeen, REAL, RealGroup, StateLog, gate_of, logged_at,
    ready_addresses,
};
use counterweight_e2e::workload::{Watched, WorkloadMonitor};
use counterweight_e2e::{eventually, init_tracing};
use counterweight_sync::files::Watermark;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{ListParams, LogParams};

/// uid, Ready, restarts and whether the gate was injected, of the sync pod.
async fn sync_pod(g: &RealGroup) -> (String, bool, i32, bool) {
    let p = g
        .one_pod("files")
        .await
        .expect("list pods")
        .expect("one files pod");
    let seen = PodSeen::of(&p, Instant::now(), false);
    let injected = gate_of(&p).is_some()
        || p.metadata
            .annotations
            .as_ref()
            .is_some_and(|a| a.contains_key(names::STATUS_ANNOTATION));
    (seen.uid, seen.ready, seen.restarts, injected)
}

/// Waits until the sync pod's `/watermark` says `role` (in `epoch`, if
/// given) and, for an active, that a push reached its destination since
/// the role began, with no error; the watermark.
async fn sync_follows(g: &RealGroup, role: Role, epoch: Option<u64>, what: &str) -> Watermark {
    eventually(
        what,
        Duration::from_secs(30),
        Duration::from_millis(100),
        || async {
            let p = g.one_pod("files").await?.ok_or("no single files pod")?;
            let name = p.metadata.name.unwrap_or_default();
            let w = g.sync_watermark(&name).await?;
            let pushed =
                role == Role::Standby || (w.synced_at_unix_ms.is_some() && w.last_error.is_none());
            let ok = w.role == Some(role) && epoch.is_none_or(|e| w.epoch == e) && pushed;
            if ok {
                Ok(Some(w))
            } else {
                Err(format!("{w:?}"))
            }
        },
    )
    .await
}

/// The app container's log: what it printed of the gate's epoch file.
async fn app_log(g: &RealGroup, pod: &str) -> Result<String, String> {
    g.pods()
        .logs(
            pod,
            &LogParams {
                container: Some("app".into()),
                ..Default::default()
            },
        )
        .await
        .map_err(|e| e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_real_controller_gates_promotes_and_demotes_pods_on_a_real_kubelet() {
    init_tracing();
    if !counterweight_harness::realnode::can_run_or_say_skipped() {
        return;
    }
    let started = Instant::now();
    let mut g = RealGroup::start(false).await;
    let log = PodLog::start(g.pods(), "app in (web,files)");
    let states = StateLog::start(g.cms[1].clone());
    let records = Monitor::on(&[KWOK, REAL], &g.cms);
    let workload = WorkloadMonitor::start(vec![
        Watched::new(KWOK, g.kwok.client(), APP),
        Watched::new(REAL, g.real.client(), APP),
    ]);

    // ── standby ─────────────────────────────────────────────────────────
    let deployed = Instant::now();
    g.deploy().await;
    let held = g
        .gated_web(&[], "west's web pod held at the gate on the standby")
        .await;
    let gated_after = deployed.elapsed();
    let held_uid = held.metadata.uid.clone().expect("uid");
    let held_name = held.metadata.name.clone().expect("name");
    let gate = gate_of(&held).expect("the webhook injected the gate");
    assert_eq!(gate.image.as_deref(), Some(GATE_IMAGE));
    let gate_image = held
        .status
        .as_ref()
        .and_then(|s| s.init_container_statuses.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.name == GATE_CONTAINER))
        .map(|c| c.image.clone())
        .expect("gate status");
    assert!(
        gate_image.contains(GATE_IMAGE),
        "the gate runs from the project's image, not {gate_image}"
    );
    // The sync pod does not wait for a promotion: Ready on the standby,
    // not injected.
    let sync = eventually(
        "west's sync pod Ready on the standby",
        Duration::from_secs(60),
        Duration::from_millis(50),
        || async {
            let s = sync_pod(&g).await;
            Ok(s.1.then_some(s))
        },
    )
    .await;
    assert!(!sync.3, "the webhook must not gate a synchronization pod");
    assert_eq!(sync.2, 0, "the sync pod has not restarted");
    sync_follows(&g, Role::Standby, None, "the sync pod to report standby").await;
    // A standby keeps holding: for 2 s the record stays standby and the pod
    // gated, while the sync pod stays Ready.
    let hold_until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < hold_until {
        let p = g.one_pod("web").await.expect("list").expect("web pod");
        let seen = PodSeen::of(&p, Instant::now(), false);
        assert!(
            seen.gated() && seen.uid == held_uid,
            "the gate let go on a standby: {seen:?}"
        );
        assert!(!sample(&g.cms[1]).await.is_some_and(|s| s.active));
        assert!(sync_pod(&g).await.1, "the sync pod stays Ready");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // ── promotion ───────────────────────────────────────────────────────
    let promoting = Instant::now();
    let epoch = g.switchover(REAL, g.first_epoch).await;
    let (promoted, promoted_wall, _) = eventually(
        "the promotion in west's state watch",
        Duration::from_secs(10),
        Duration::from_millis(20),
        || async { Ok(states.active_above(g.first_epoch)) },
    )
    .await;
    let promoted_after = promoted - promoting;
    let running = eventually(
        "the gate to exit 0 and the app container to start",
        Duration::from_secs(60),
        Duration::from_millis(50),
        || async {
            let p = g.pods().get(&held_name).await.map_err(|e| e.to_string())?;
            let seen = PodSeen::of(&p, Instant::now(), false);
            Ok((seen.gate_exit.is_some() && seen.app_running).then_some((p, seen)))
        },
    )
    .await;
    let app_after = log
        .first_after(promoted, |s| s.uid == held_uid && s.app_running)
        .map(|s| s.at - promoted);
    let gate_after = log
        .first_after(promoted, |s| s.uid == held_uid && s.gate_exit.is_some())
        .map(|s| s.at - promoted);
    assert_eq!(running.1.gate_exit, Some(0), "the gate exits 0");
    assert_eq!(
        released_epoch(&running.0),
        Some(epoch),
        "released in {epoch}"
    );
    assert_eq!(
        init_container_names(&running.0),
        [GATE_CONTAINER, LEASE_CONTAINER]
    );
    // The epoch file, as the app reads it from the gate's volume.
    let printed = eventually(
        "the app to print the gate's epoch file",
        Duration::from_secs(30),
        Duration::from_millis(100),
        || async {
            let l = app_log(&g, &held_name).await?;
            Ok((!l.is_empty()).then_some(l))
        },
    )
    .await;
    assert_eq!(
        printed.trim(),
        epoch.to_string(),
        "the gate's epoch file ({RUN_VOLUME}) holds the release epoch"
    );
    // When the gate let go and the app started, by their own log lines.
    let since =
        |t: Option<std::time::SystemTime>| t.and_then(|t| t.duration_since(promoted_wall).ok());
    let gate_logged = since(
        logged_at(&g.pods(), &held_name, GATE_CONTAINER, "released")
            .await
            .expect("gate log"),
    );
    let app_logged = since(
        logged_at(&g.pods(), &held_name, "app", &epoch.to_string())
            .await
            .expect("app log"),
    );
    // Ready through the readiness gate, and the Service's one endpoint.
    let slices = g.slices();
    let ip = eventually(
        "the pod Ready and its address the Service's ready endpoint",
        Duration::from_secs(60),
        Duration::from_millis(50),
        || async {
            let p = g.pods().get(&held_name).await.map_err(|e| e.to_string())?;
            let seen = PodSeen::of(&p, Instant::now(), false);
            let ip = p.status.as_ref().and_then(|s| s.pod_ip.clone());
            let ready = ready_addresses(&slices, &ListParams::default()).await?;
            Ok(ip.filter(|ip| seen.ready && ready == [ip.clone()]))
        },
    )
    .await;
    let ready_after = log
        .first_after(promoted, |s| s.uid == held_uid && s.ready)
        .map(|s| s.at - promoted);
    let p = g.pods().get(&held_name).await.expect("pod");
    assert_eq!(
        PodSeen::of(&p, Instant::now(), false).serving,
        Some(("True".to_owned(), Some(ACTIVE_REASON.to_owned()))),
        "Ready by the controller's serving condition"
    );
    // The readiness gate held it: before the condition it was never Ready.
    let before_serving = log.of(&held_uid);
    let first_ready = before_serving.iter().position(|s| s.ready);
    let first_serving = before_serving
        .iter()
        .position(|s| s.serving.as_ref().is_some_and(|c| c.0 == "True"));
    assert!(
        first_serving.is_some() && first_ready >= first_serving,
        "Ready only once serving: {before_serving:#?}"
    );
    // The sync pod follows the promotion in place: active in the new
    // epoch, pushing, same pod, no restart.
    sync_follows(
        &g,
        Role::Active,
        Some(epoch),
        "the sync pod to report active in the new epoch and push",
    )
    .await;
    let s = sync_pod(&g).await;
    assert_eq!(
        (s.0.as_str(), s.1, s.2),
        (sync.0.as_str(), true, 0),
        "the promotion leaves the sync pod alone"
    );

    // ── demotion ────────────────────────────────────────────────────────
    let demoting = Instant::now();
    let back = g.switchover(KWOK, epoch).await;
    let replacement = g
        .gated_web(
            std::slice::from_ref(&held_uid),
            "west's served pod replaced by one held at the gate",
        )
        .await;
    let replaced_after = demoting.elapsed();
    // Fenced, then evicted: the served pod's condition turned False with
    // the fence's reason before it was deleted.
    eventually(
        "the served pod to be gone",
        Duration::from_secs(30),
        Duration::from_millis(50),
        || async {
            let gone = g
                .pods()
                .get_opt(&held_name)
                .await
                .map_err(|e| e.to_string())?
                .is_none();
            Ok(gone.then_some(()))
        },
    )
    .await;
    let history = log.of(&held_uid);
    let fenced = history.iter().position(|s| {
        s.serving.as_ref().map(|c| (c.0.as_str(), c.1.as_deref()))
            == Some(("False", Some(STOPPED_REASON)))
    });
    let deleting = history.iter().position(|s| s.deleting);
    assert!(
        fenced.is_some() && deleting.is_some() && fenced <= deleting,
        "fenced (serving False, {STOPPED_REASON}) before it went: {history:#?}"
    );
    let reasons = event_reasons(&g.real).await;
    assert!(
        reasons.iter().any(|r| r == "ServingStopped"),
        "west records ServingStopped: {reasons:?}"
    );
    // The replacement stays held on the standby (2 s), out of the Service.
    let replacement_uid = replacement.metadata.uid.clone().expect("uid");
    let hold_until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < hold_until {
        let p: Pod = g.one_pod("web").await.expect("list").expect("web pod");
        let seen = PodSeen::of(&p, Instant::now(), false);
        assert!(
            seen.gated() && seen.uid == replacement_uid,
            "the replacement left the gate on a standby: {seen:?}"
        );
        assert_eq!(
            ready_addresses(&slices, &ListParams::default()).await,
            Ok(vec![])
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    sync_follows(
        &g,
        Role::Standby,
        None,
        "the sync pod to report standby again",
    )
    .await;
    let s = sync_pod(&g).await;
    assert_eq!(
        (s.0.as_str(), s.1, s.2),
        (sync.0.as_str(), true, 0),
        "the demotion leaves the sync pod alone"
    );
    // Over the whole run the sync pod was one pod that never restarted.
    let sync_history: Vec<PodSeen> = log
        .all()
        .into_iter()
        .filter(|p| p.name.starts_with("files-"))
        .collect();
    assert!(
        sync_history
            .iter()
            .all(|p| p.uid == sync.0 && p.restarts == 0 && !p.deleting),
        "{sync_history:#?}"
    );

    let ms =
        |d: Option<Duration>| d.map_or("-".to_owned(), |d| format!("{:.2} s", d.as_secs_f64()));
    records.finish();
    workload.finish().await;
    g.check_alive();
    println!(
        "real controller on a real kubelet: real-node cluster Ready {:?} after start, gate image \
         imported in {:?}, group elected {:?} after start; web pod gated {gated_after:?} after its \
         Deployment; switchover to west promoted it {promoted_after:?} after the request (epoch \
         {epoch}); west active -> gate released {} (its log; exit seen through the API {}), -> \
         app started {} (its first log line; Running through the API {}), -> Ready {} (endpoint \
         {ip}); switchover back \
         (epoch {back}) -> replacement held at the gate {replaced_after:?}; test {:?}",
        g.times.real_cluster,
        g.times.import,
        g.times.elected,
        ms(gate_logged),
        ms(gate_after),
        ms(app_logged),
        ms(app_after),
        ms(ready_after),
        started.elapsed(),
    );
}
