//! Release latency: time from the ConfigMap update that makes the cluster
//! active to the moment the waiter is done, over many flips, for the
//! `counterweight-gate` process (watch) and, side by side on the *same*
//! flips, a FIG. 6 polling loop at a 1 s interval (read, if not active wait
//! the interval, repeat).
//!
//! Run: `COUNTERWEIGHT_CONTROLPLANE_BIN=$(tools/controlplane/build.sh)
//! cargo bench -p counterweight-gate --bench release_latency`
//! (`FLIPS=<n>` to change the number of flips; default 100).
//!
//! Each flip: set `standby`, start the gate process and a polling task, wait
//! until both have observed standby, wait a pseudo-random 0-1000 ms so the
//! flip falls at a random phase of the polling interval (that pause is part
//! of the experiment, not synchronisation), write `active`, then time each
//! waiter until it finishes (the gate until its process has exited).

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use tokio::io::{AsyncBufReadExt, BufReader};

const NS: &str = "counterweight-system";
const NAME: &str = counterweight_core::names::STATE_CONFIGMAP;
const POLL_INTERVAL: Duration = Duration::from_secs(1);
const STEP_TIMEOUT: Duration = Duration::from_secs(30);

fn state(role: &str, epoch: u64) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(NAME.to_owned()),
            namespace: Some(NS.to_owned()),
            ..Default::default()
        },
        data: Some(BTreeMap::from([
            ("state".to_owned(), role.to_owned()),
            ("epoch".to_owned(), epoch.to_string()),
        ])),
        ..Default::default()
    }
}

async fn set(cms: &Api<ConfigMap>, role: &str, epoch: u64) {
    cms.patch(
        NAME,
        &PatchParams::apply("bench").force(),
        &Patch::Apply(state(role, epoch)),
    )
    .await
    .expect("apply the state ConfigMap");
}

/// The FIG. 6 loop: read; if active, done; else wait the interval. Reports
/// through `seen_standby` once it has read a standby record.
async fn fig6_poll(cms: Api<ConfigMap>, seen_standby: tokio::sync::oneshot::Sender<()>) -> Instant {
    let mut seen = Some(seen_standby);
    loop {
        if let Ok(cm) = cms.get(NAME).await {
            let role = cm.data.as_ref().and_then(|d| d.get("state").cloned());
            if role.as_deref() == Some("active") {
                return Instant::now();
            }
            if let Some(tx) = seen.take() {
                let _ = tx.send(());
            }
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    // Nearest-rank percentile.
    let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1]
}

fn summary(name: &str, samples: &mut [Duration]) {
    samples.sort();
    let mean = samples.iter().sum::<Duration>() / u32::try_from(samples.len()).unwrap_or(1);
    println!(
        "{name:<28} n={:<4} p50={:>8.1?} p90={:>8.1?} p99={:>8.1?} max={:>8.1?} mean={:>8.1?}",
        samples.len(),
        percentile(samples, 50.0),
        percentile(samples, 90.0),
        percentile(samples, 99.0),
        samples[samples.len() - 1],
        mean,
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    // `cargo bench` passes `--bench`; any other argument is ignored.
    let flips: u64 = std::env::var("FLIPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100);
    let gate_bin = env!("CARGO_BIN_EXE_counterweight-gate");
    let mut clusters = counterweight_harness::start_clusters(1)
        .await
        .expect("a local cluster starts (set COUNTERWEIGHT_CONTROLPLANE_BIN)");
    let cluster = clusters.remove(0);
    let client = cluster.client();
    Api::<Namespace>::all(client.clone())
        .create(
            &PostParams::default(),
            &Namespace {
                metadata: ObjectMeta {
                    name: Some(NS.to_owned()),
                    ..Default::default()
                },
                ..Default::default()
            },
        )
        .await
        .expect("create namespace");
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), NS);
    let epoch_file = cluster.dir().join("epoch");

    let mut watch = Vec::new();
    let mut poll = Vec::new();
    let mut rng: u64 = 0x9e37_79b9_7f4a_7c15;
    for i in 0..flips {
        set(&cms, "standby", 2 * i + 1).await;
        let mut child = tokio::process::Command::new(gate_bin)
            .arg(format!("--kubeconfig={}", cluster.kubeconfig().display()))
            .arg(format!("--epoch-file={}", epoch_file.display()))
            .arg("--cluster=bench")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn the gate");
        let stdout = child.stdout.take().expect("gate stdout");
        let mut lines = BufReader::new(stdout).lines();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let poller = tokio::spawn(fig6_poll(cms.clone(), tx));

        tokio::time::timeout(STEP_TIMEOUT, async {
            while let Ok(Some(line)) = lines.next_line().await {
                if line.contains("is standby") {
                    return;
                }
            }
            panic!("the gate ended before reporting standby");
        })
        .await
        .expect("the gate reports standby");
        tokio::time::timeout(STEP_TIMEOUT, rx)
            .await
            .expect("the poller reads standby")
            .expect("poller alive");
        // Drain the gate's output so it never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });

        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        tokio::time::sleep(Duration::from_millis(rng % 1000)).await;

        let flipped = Instant::now();
        set(&cms, "active", 2 * i + 2).await;
        let status = tokio::time::timeout(STEP_TIMEOUT, child.wait())
            .await
            .expect("the gate exits after the flip")
            .expect("wait for the gate");
        let gate_done = Instant::now();
        assert!(status.success(), "gate exit status {status}");
        let poll_done = tokio::time::timeout(STEP_TIMEOUT, poller)
            .await
            .expect("the poller finishes after the flip")
            .expect("poller task");
        watch.push(gate_done - flipped);
        poll.push(poll_done.saturating_duration_since(flipped));
    }
    println!("release latency over {flips} flips (ConfigMap update -> waiter done)");
    summary("gate process (watch)", &mut watch);
    summary("FIG. 6 polling, 1 s", &mut poll);
}
