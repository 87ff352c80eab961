//! Promotion → app container started, through a real kubelet (issue 14,
//! item 5): the figure next to the gate's release latency on a KWOK
//! cluster's API server (`init-gate/benches/release_latency.rs`), with
//! everything between them real: the controller's promotion, the gate in
//! containerd noticing it, exiting, the kubelet starting the lease sidecar
//! and then the app container, and reporting it.
//!
//! Run (needs root, the node binaries and the gate image; skips with a
//! message otherwise):
//!
//! ```sh
//! cargo build -p counterweight-controller -p counterweight-webhook --bins
//! COUNTERWEIGHT_CONTROLPLANE_BIN=$(tools/controlplane/build.sh) \
//!   COUNTERWEIGHT_NODE_BIN=$(tools/controlplane/node.sh) \
//!   COUNTERWEIGHT_IMAGES=$(tools/images.sh gate) \
//!   cargo bench -p counterweight-e2e --bench real_promotion --profile dev
//! ```
//!
//! `FLIPS=<n>` changes the number of promotions (default 20). `--profile
//! dev`: the bench runs the controller and webhook binaries of its own
//! profile's directory, as the e2e tests do, and the release profile would
//! build the whole e2e tree with LTO for a measurement made of seconds of
//! kubelet work. What is timed after the promotion is the gate from its
//! image (the musl `gate` profile, as shipped) and the kubelet; the
//! controller only decides the promotion's instant, which is measured where
//! it lands (its state record).
//!
//! The group is `realgroup::RealGroup`: the real controller on a real-node
//! cluster (`west`) beside a KWOK peer (`east`). Each flip: `west`'s web
//! pod is held at the gate and `west` healthy; `cwctl switchover --to
//! west`. The promotion's instant is when a watch in this process sees
//! `west`'s state record `active` in the new epoch (late by one watch
//! delivery, a few ms). The gate's release and the app's start are the
//! container runtime's timestamps of their own log lines (the gate's
//! `released: ...`, the app's first line, which prints the epoch file): the
//! moment it happened, on this machine's clock; the kubelet reports them a
//! status sync later. Running and Ready are when a pod watch in this
//! process saw them. Then `cwctl switchover --to east` fences and evicts
//! the pod, and its replacement is held at the gate for the next flip.
//!
//! It also times a real-node cluster from nothing to node Ready, started
//! alone (before the KWOK peer), and the gate image's import.

use std::time::{Duration, Instant};

use counterweight_core::inject::GATE_CONTAINER;
use counterweight_e2e::ems::healthy;
use counterweight_e2e::ha::sample;
use counterweight_e2e::realgroup::{KWOK, PodLog, PodSeen, REAL, RealGroup, StateLog, logged_at};

/// Percentile `p` (0-100) of sorted `v`, nearest rank.
fn pct(v: &[f64], p: f64) -> f64 {
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

fn summary(name: &str, mut v: Vec<f64>) {
    v.sort_by(f64::total_cmp);
    println!(
        "{name:<48} n={:<3} min {:>7.0} ms  p50 {:>7.0} ms  p90 {:>7.0} ms  p99 {:>7.0} ms  max {:>7.0} ms",
        v.len(),
        v[0],
        pct(&v, 50.0),
        pct(&v, 90.0),
        pct(&v, 99.0),
        v[v.len() - 1]
    );
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Waits, bounded, for `f` to return `Some`.
async fn until<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 4)]
async fn main() {
    // `cargo bench` passes `--bench`; nothing else to parse.
    if !counterweight_harness::realnode::can_run_or_say_skipped() {
        return;
    }
    let flips: usize = std::env::var("FLIPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let mut g = RealGroup::start(true).await;
    println!(
        "real-node cluster from nothing to node Ready (alone): {:.2} s; gate image imported in {:.2} s; \
         both clusters, webhook and controllers up and elected {:.2} s after the start",
        g.times.real_cluster.as_secs_f64(),
        g.times.import.as_secs_f64(),
        g.times.elected.as_secs_f64()
    );
    let pods = PodLog::start(g.pods(), "app=web");
    let states = StateLog::start(g.cms[1].clone());
    g.deploy().await;
    let mut served: Vec<String> = Vec::new();
    let mut epoch = g.first_epoch;
    // One series per measure, in the order printed.
    let mut series: [Vec<f64>; 4] = Default::default();
    for flip in 0..flips {
        g.check_alive();
        let held = g
            .gated_web(&served, "west's web pod held at the gate")
            .await;
        let uid = held.metadata.uid.clone().expect("uid");
        let name = held.metadata.name.clone().expect("name");
        healthy(&g.real, &g.cms[1], "west healthy before the switchover").await;
        healthy(&g.kwok, &g.cms[0], "east healthy before the switchover").await;
        epoch = g.switchover(REAL, epoch).await;
        let (promoted, promoted_wall, e) = until(
            "the promotion in the state log",
            Duration::from_secs(10),
            || async { states.active_above(epoch - 1) },
        )
        .await;
        assert_eq!(e, epoch);
        let seen = |pred: fn(&PodSeen) -> bool| pods.of(&uid).into_iter().find(pred).map(|s| s.at);
        let ready = until("the pod Ready", Duration::from_secs(60), || async {
            seen(|s| s.ready)
        })
        .await;
        let app_api = seen(|s| s.app_running).expect("the app ran before Ready");
        let logged = |container: &'static str, needle: String| {
            let pods = g.pods();
            let name = name.clone();
            async move {
                let t = logged_at(&pods, &name, container, &needle)
                    .await
                    .expect("container log")
                    .expect("the line is logged");
                // Signed: the gate's own watch may see the record a
                // moment before this process's watch does.
                match t.duration_since(promoted_wall) {
                    Ok(d) => ms(d),
                    Err(e) => -ms(e.duration()),
                }
            }
        };
        let gate_log = logged(GATE_CONTAINER, "released".into()).await;
        let app_log = logged("app", epoch.to_string()).await;
        let d = |t: Instant| ms(t.saturating_duration_since(promoted));
        let row = [gate_log, app_log, d(app_api), d(ready)];
        println!(
            "flip {flip:>2} (epoch {epoch}): gate released {:>6.0} ms, app started {:>6.0} ms \
             (Running in the API {:>6.0} ms), Ready {:>6.0} ms after the promotion",
            row[0], row[1], row[2], row[3]
        );
        for (s, v) in series.iter_mut().zip(row) {
            s.push(v);
        }
        served.push(uid);
        epoch = g.switchover(KWOK, epoch).await;
        assert!(!sample(&g.cms[1]).await.is_some_and(|s| s.active));
    }
    g.gated_web(&served, "the last replacement held at the gate")
        .await;
    let [gate, app, api, ready] = series;
    println!();
    summary("promotion -> gate released (its log)", gate);
    summary("promotion -> app started (its first log line)", app);
    summary("promotion -> app Running in the API", api);
    summary("promotion -> pod Ready", ready);
}
