//! Two replicas of one cluster's controller with `--leader-elect` (issue 7):
//! only the holder of the `counterweight-controller` Lease acts. A monitor
//! reads both replicas' `counterweight_leader` gauge every 10 ms and fails on
//! any moment where both act; the follower's health evaluations stay at zero
//! and its `/readyz` says it follows. Killing the leader hands over only
//! after the lease; a SIGTERMed leader hands its Lease back at once.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use counterweight_e2e::fixtures::{create_namespaces, install_policy};
use counterweight_e2e::ha::{SYSTEM, controller_bin, http_get, leader_lease_holder};
use counterweight_e2e::{eventually, init_tracing};
use counterweight_harness::{Cluster, Process, free_port};
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::Api;

const POLICY: &str = "interval: 300ms\nthreshold: 0.5\nretries: 1\ncomponents:\n  - {name: web, namespaces: [counterweight-system], selector: {matchLabels: {app: web}}, weight: 1}\n";

// Test timings: the lease is long next to the retry period so that the
// bounds below hold on a loaded machine.
const LEASE: Duration = Duration::from_secs(4);
const RENEW_DEADLINE: Duration = Duration::from_secs(3);
const RETRY: Duration = Duration::from_millis(300);

struct Replica {
    name: &'static str,
    process: Process,
    metrics_port: u16,
}

impl Replica {
    fn start(cluster: &Cluster, name: &'static str) -> Self {
        let metrics_port = free_port().expect("port");
        let args = vec![
            "--cluster=east".to_owned(),
            format!("--kubeconfig={}", cluster.kubeconfig().display()),
            format!("--metrics-listen=127.0.0.1:{metrics_port}"),
            "--leader-elect".to_owned(),
            format!("--leader-election-identity={name}"),
            format!("--leader-lease-duration={}ms", LEASE.as_millis()),
            format!("--leader-renew-deadline={}ms", RENEW_DEADLINE.as_millis()),
            format!("--leader-retry-period={}ms", RETRY.as_millis()),
        ];
        let mut process = Process::spawn(
            name,
            &controller_bin(),
            &args,
            &cluster.dir().join(format!("logs/controller-{name}.log")),
        )
        .expect("replica starts");
        process.tail_on_panic();
        Self {
            name,
            process,
            metrics_port,
        }
    }

    /// `counterweight_<metric>` from `/metrics`; `None` while unreachable.
    async fn metric(&self, metric: &str) -> Option<f64> {
        let text = http_get(self.metrics_port, "/metrics").await.ok()?;
        let name = format!("counterweight_{metric}");
        text.lines()
            .filter_map(|l| l.split_once(' '))
            .find(|(k, _)| *k == name)
            .and_then(|(_, v)| v.parse().ok())
    }

    async fn leads(&self) -> Option<bool> {
        self.metric("leader").await.map(|v| v == 1.0)
    }

    async fn evaluations(&self) -> f64 {
        self.metric("health_evaluations_total").await.unwrap_or(0.0)
    }
}

/// Samples A, B, A (then B, A, B) every 10 ms: A leading at both ends with
/// B leading in between means both acted at once.
fn monitor(
    ports: [u16; 2],
) -> (
    tokio::task::JoinHandle<()>,
    Arc<Mutex<Vec<String>>>,
    Arc<AtomicU64>,
) {
    let found = Arc::new(Mutex::new(Vec::new()));
    let samples = Arc::new(AtomicU64::new(0));
    let (f, n) = (found.clone(), samples.clone());
    let task = tokio::spawn(async move {
        let leads = |port: u16| async move {
            let text = http_get(port, "/metrics").await.ok()?;
            text.lines()
                .find(|l| l.starts_with("counterweight_leader "))
                .map(|l| l.ends_with(" 1"))
        };
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        let mut flip = false;
        loop {
            tick.tick().await;
            flip = !flip;
            let (a, b) = if flip {
                (ports[0], ports[1])
            } else {
                (ports[1], ports[0])
            };
            let first = leads(a).await;
            let mid = leads(b).await;
            let last = leads(a).await;
            n.fetch_add(1, Ordering::Relaxed);
            if first == Some(true) && mid == Some(true) && last == Some(true) {
                f.lock()
                    .expect("lock")
                    .push(format!("replicas on {a} and {b} both lead"));
            }
        }
    });
    (task, found, samples)
}

async fn wait_leader<'a>(replicas: &'a [&'a Replica], what: &str) -> &'a Replica {
    eventually(
        what,
        Duration::from_secs(60),
        Duration::from_millis(20),
        || async {
            for r in replicas {
                if r.leads().await == Some(true) {
                    return Ok(Some(*r));
                }
            }
            Ok(None)
        },
    )
    .await
}

/// Asserts for `d` that `follower` does not act and says why it is not
/// ready.
async fn follows(follower: &Replica, d: Duration) {
    let until = Instant::now() + d;
    while Instant::now() < until {
        assert!(
            !follower.leads().await.unwrap_or(false),
            "{} must follow",
            follower.name
        );
        assert_eq!(
            follower.evaluations().await,
            0.0,
            "a follower must not evaluate health"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ready = http_get(follower.metrics_port, "/readyz").await;
    assert!(
        ready.as_ref().is_err_and(|e| e.contains("503")),
        "a follower is not ready: {ready:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_never_both_act() {
    init_tracing();
    let mut clusters = counterweight_harness::start_named(&["east"])
        .await
        .expect("cluster");
    let cluster = clusters.remove(0);
    create_namespaces(&cluster.client(), &[SYSTEM]).await;
    install_policy(&cluster.client(), SYSTEM, POLICY).await;
    let leases: Api<Lease> = Api::namespaced(cluster.client(), SYSTEM);

    let mut r1 = Replica::start(&cluster, "r1");
    let r2 = Replica::start(&cluster, "r2");
    let (mon, found, samples) = monitor([r1.metrics_port, r2.metrics_port]);

    let first = wait_leader(&[&r1, &r2], "a leader").await.name;
    let (leader, follower) = if first == "r1" {
        (&r1, &r2)
    } else {
        (&r2, &r1)
    };
    assert_eq!(
        leader_lease_holder(&leases).await.as_deref(),
        Some(leader.name)
    );
    eventually(
        "the leader to evaluate health",
        Duration::from_secs(30),
        Duration::from_millis(100),
        || async { Ok((leader.evaluations().await > 0.0).then_some(())) },
    )
    .await;
    follows(follower, Duration::from_secs(2)).await;

    // Crash the leader: the follower takes over only once the Lease sat
    // unchanged for a whole lease on its own clock. The last renewal was at
    // most one retry period before the kill, and the follower looks once
    // per retry period, so nothing may happen before lease - 2 * retry.
    let (mut crashed, survivor) = if first == "r1" { (r1, r2) } else { (r2, r1) };
    crashed.process.kill();
    let killed = Instant::now();
    wait_leader(&[&survivor], "the survivor to lead").await;
    let took = killed.elapsed();
    println!("takeover after a crash: {took:?} (lease {LEASE:?})");
    assert!(
        took >= LEASE - 2 * RETRY,
        "took over after {took:?}, before the crashed leader's lease could have run out"
    );
    assert_eq!(
        leader_lease_holder(&leases).await.as_deref(),
        Some(survivor.name)
    );

    // The crashed replica comes back and follows.
    r1 = Replica::start(&cluster, crashed.name);
    drop(crashed);
    follows(&r1, Duration::from_secs(2)).await;

    // A SIGTERMed leader releases the Lease on its way out, so the other
    // replica need not wait out a lease.
    survivor.process.terminate();
    let stopped = Instant::now();
    wait_leader(&[&r1], "the restarted replica to lead").await;
    let took = stopped.elapsed();
    println!("takeover after a graceful stop: {took:?}");
    assert!(
        took < LEASE,
        "a released Lease is taken at the next look, not after a lease ({took:?})"
    );

    mon.abort();
    let n = samples.load(Ordering::Relaxed);
    assert!(n > 100, "the monitor sampled only {n} times");
    let v = found.lock().expect("lock");
    assert!(v.is_empty(), "two replicas acted at once: {v:?}");
}
