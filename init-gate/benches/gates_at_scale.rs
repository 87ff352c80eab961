//! Gates at scale: flip → every gate released, for 200, 500 and 1,000
//! gates waiting on one API server (issue 16, item 3).
//!
//! Each gate is the real wait code (`counterweight_gate::wait::wait_active`:
//! the watch of the one state ConfigMap, with its polling fallback) run as
//! a task in this process, each with **its own client** (its own TLS
//! connection, as a gate process has), so that the machine measures the
//! API server's watch fan-out and the watch path, not a thousand process
//! exits. Per size:
//!
//! 1. the state record says `standby`; N gates start and open their watches
//!    (the API server's `apiserver_longrunning_requests` gauge of
//!    ConfigMap WATCHes reaches N);
//! 2. the record flips to `active`; each gate's release is timed from the
//!    flip's write returning;
//! 3. reported: p50, p99 and max release latency; how many released within
//!    200 ms; the CPU the API server and this process (the gates) spent
//!    from the flip until the last release.
//!
//! Beside them, on the same API server, the figures for real **gate
//! processes** (the `counterweight-gate` binary of this build, as a pod's
//! init container runs it) at 200 and 500: N processes wait on the record,
//! the flip is written, and each release is timed to its process's exit.
//! Their CPU from the flip on is what the reaped children spent in total
//! (`getrusage`, in microseconds), less what each had run by the flip
//! (`/proc/<pid>/schedstat`, in nanoseconds, read just before it).
//!
//! Run: `COUNTERWEIGHT_CONTROLPLANE_BIN=$(tools/controlplane/build.sh)
//! cargo bench -p counterweight-gate --bench gates_at_scale`
//! (`GATES=200,500,1000` in-process and `PROCS=200,500` processes by
//! default; `PROCS=` skips the processes).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use counterweight_gate::wait::{Target, wait_active};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};

const NS: &str = "counterweight-system";
const NAME: &str = counterweight_core::names::STATE_CONFIGMAP;

async fn set(cms: &Api<ConfigMap>, role: &str, epoch: u64) {
    let cm = ConfigMap {
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
    };
    cms.patch(
        NAME,
        &PatchParams::apply("bench").force(),
        &Patch::Apply(cm),
    )
    .await
    .expect("apply the state ConfigMap");
}

/// ConfigMap WATCHes the API server holds open now.
async fn configmap_watches(client: &kube::Client) -> u64 {
    counterweight_harness::bulk::apiserver_metric(
        client,
        "apiserver_longrunning_requests",
        &[("resource", "configmaps"), ("verb", "WATCH")],
    )
    .await
}

/// CPU seconds (user + system) of process `pid` so far, in 10 ms ticks
/// (fine for one process over a phase; not for summing hundreds).
fn cpu_seconds(pid: &str) -> f64 {
    let f = stat_fields(pid);
    f.0 + f.1
}

/// CPU seconds (user + system) of the children this process has reaped so
/// far, to the microsecond.
fn reaped_children_cpu() -> f64 {
    match nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_CHILDREN) {
        Ok(u) => {
            let secs = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
            secs(u.user_time()) + secs(u.system_time())
        }
        Err(_) => f64::NAN,
    }
}

/// CPU seconds process `pid` has run so far, to the nanosecond (the first
/// field of `/proc/<pid>/schedstat`).
fn run_seconds(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/schedstat"))
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(f64::NAN, |ns| ns / 1e9)
}

/// utime and stime of process `pid`, in seconds (NaN when it cannot be
/// read).
fn stat_fields(pid: &str) -> (f64, f64) {
    let nan = (f64::NAN, f64::NAN);
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return nan;
    };
    // Fields after the command name (which may hold spaces) in parentheses.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return nan;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        f.get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(f64::NAN)
            / 100.0
    };
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13
    // here (counted from 1), so indices 11 and 12.
    (ticks(11), ticks(12))
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Comma-separated sizes from environment variable `name`, or `default`.
fn sizes(name: &str, default: &str) -> Vec<usize> {
    std::env::var(name)
        .unwrap_or_else(|_| default.into())
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| {
            s.trim()
                .parse()
                .unwrap_or_else(|_| panic!("{name}: comma-separated numbers, not {s:?}"))
        })
        .collect()
}

/// Waits until the API server holds `n` more ConfigMap watches than `base`.
async fn watches_open(admin: &kube::Client, base: u64, n: usize, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let open = configmap_watches(admin).await.saturating_sub(base);
        if open >= n as u64 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{open} of {n} {what} watches open after 120 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Prints one size's line: release latencies (sorted here) and the CPU
/// spent from the flip to the last release.
fn report(what: &str, n: usize, latencies: &mut [Duration], api_cpu: f64, gates_cpu: f64) {
    latencies.sort();
    let within = latencies
        .iter()
        .filter(|l| **l <= Duration::from_millis(200))
        .count();
    println!(
        "{n:>5} {what}: release p50 {:>7.1} ms, p99 {:>7.1} ms, max {:>7.1} ms; {within} of {n} within 200 ms; CPU from the flip to the last release: API server {api_cpu:.2} s, gates {gates_cpu:.2} s ({:.2} ms a gate)",
        pct(latencies, 0.5).as_secs_f64() * 1e3,
        pct(latencies, 0.99).as_secs_f64() * 1e3,
        latencies.last().map_or(0.0, |l| l.as_secs_f64() * 1e3),
        gates_cpu * 1e3 / n as f64,
    );
}

/// The shared setup of every size: the API server, the record and its
/// admin client.
struct Bench {
    cluster: counterweight_harness::Cluster,
    admin: kube::Client,
    cms: Api<ConfigMap>,
    apiserver: String,
    epoch: u64,
}

impl Bench {
    /// Writes a fresh `standby` record (a new epoch) and returns the
    /// ConfigMap watch count before any gate of this size opens one.
    async fn standby(&mut self) -> u64 {
        self.epoch += 1;
        set(&self.cms, "standby", self.epoch).await;
        configmap_watches(&self.admin).await
    }

    /// `n` gates as tasks in this process, the real wait code, one client
    /// (connection) each.
    async fn in_process(&mut self, n: usize) {
        let base = self.standby().await;
        let kubeconfig =
            kube::config::Kubeconfig::read_from(self.cluster.kubeconfig()).expect("kubeconfig");
        let target = Target {
            cluster: "bench".into(),
            namespace: NS.into(),
            name: NAME.into(),
            poll_interval: Duration::from_secs(1),
        };
        let mut gates = Vec::with_capacity(n);
        for _ in 0..n {
            let config =
                kube::Config::from_custom_kubeconfig(kubeconfig.clone(), &Default::default())
                    .await
                    .expect("client config");
            let client = kube::Client::try_from(config).expect("client");
            let target = target.clone();
            gates.push(tokio::spawn(async move {
                wait_active(client, &target).await;
                Instant::now()
            }));
        }
        watches_open(&self.admin, base, n, "gate").await;
        let (api_cpu, own_cpu) = (cpu_seconds(&self.apiserver), cpu_seconds("self"));
        set(&self.cms, "active", self.epoch).await;
        let flipped = Instant::now();
        let mut latencies = Vec::with_capacity(n);
        for g in gates {
            let released = tokio::time::timeout(Duration::from_secs(60), g)
                .await
                .expect("every gate released within 60 s")
                .expect("gate task");
            latencies.push(released.saturating_duration_since(flipped));
        }
        report(
            "gates (in-process watches, one connection each)",
            n,
            &mut latencies,
            cpu_seconds(&self.apiserver) - api_cpu,
            cpu_seconds("self") - own_cpu,
        );
    }

    /// `n` gate processes of this build, each released to its exit.
    async fn processes(&mut self, n: usize) {
        let base = self.standby().await;
        let gate = env!("CARGO_BIN_EXE_counterweight-gate");
        let dir = self.cluster.dir().join("gates");
        std::fs::create_dir_all(&dir).expect("a directory for the epoch files");
        let mut children = Vec::with_capacity(n);
        for i in 0..n {
            let child = tokio::process::Command::new(gate)
                .arg(format!(
                    "--kubeconfig={}",
                    self.cluster.kubeconfig().display()
                ))
                .arg(format!(
                    "--epoch-file={}",
                    dir.join(format!("epoch-{i}")).display()
                ))
                .arg("--cluster=bench")
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .expect("spawn a gate process");
            children.push(child);
        }
        // A gate says it waits once it has read the standby record (by its
        // watch, or by polling if its watch could not be opened): count
        // those, and keep reading so that no gate blocks on a full pipe.
        let waiting = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        for c in &mut children {
            let Some(out) = c.stdout.take() else { continue };
            let waiting = waiting.clone();
            tokio::spawn(async move {
                use tokio::io::AsyncBufReadExt;
                let mut lines = tokio::io::BufReader::new(out).lines();
                let mut seen = false;
                while let Ok(Some(line)) = lines.next_line().await {
                    if !seen && line.contains("is standby") {
                        seen = true;
                        waiting.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    }
                }
            });
        }
        let deadline = Instant::now() + Duration::from_secs(120);
        while waiting.load(std::sync::atomic::Ordering::SeqCst) < n {
            assert!(
                Instant::now() < deadline,
                "{} of {n} gate processes waiting after 120 s",
                waiting.load(std::sync::atomic::Ordering::SeqCst)
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let watching = configmap_watches(&self.admin).await.saturating_sub(base);
        println!("  ({n} gate processes waiting, {watching} of them by a watch)");
        // What the gates spent before the flip (starting, connecting,
        // watching): taken off their reaped total below.
        let before: f64 = children
            .iter()
            .filter_map(|c| c.id())
            .map(run_seconds)
            .sum();
        let (api_cpu, reaped) = (cpu_seconds(&self.apiserver), reaped_children_cpu());
        set(&self.cms, "active", self.epoch).await;
        let flipped = Instant::now();
        let exits: Vec<_> = children
            .into_iter()
            .map(|mut c| {
                tokio::spawn(async move {
                    let status = c.wait().await.expect("wait for a gate");
                    (Instant::now(), status)
                })
            })
            .collect();
        let mut latencies = Vec::with_capacity(n);
        for e in exits {
            let (done, status) = tokio::time::timeout(Duration::from_secs(60), e)
                .await
                .expect("every gate process exits within 60 s")
                .expect("waiting task");
            assert!(status.success(), "a gate exited with {status}");
            latencies.push(done.saturating_duration_since(flipped));
        }
        report(
            "gate processes",
            n,
            &mut latencies,
            cpu_seconds(&self.apiserver) - api_cpu,
            reaped_children_cpu() - reaped - before,
        );
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    counterweight_harness::install_crypto_provider();
    let gates = sizes("GATES", "200,500,1000");
    let procs = sizes("PROCS", "200,500");
    let mut clusters = counterweight_harness::start_clusters(1)
        .await
        .expect("a local cluster starts");
    let cluster = clusters.remove(0);
    let admin = cluster.client();
    Api::<Namespace>::all(admin.clone())
        .create(
            &PostParams::default(),
            &Namespace {
                metadata: ObjectMeta {
                    name: Some(NS.into()),
                    ..Default::default()
                },
                ..Default::default()
            },
        )
        .await
        .expect("namespace");
    let apiserver = cluster
        .pid("kube-apiserver")
        .expect("the API server runs")
        .to_string();
    let mut bench = Bench {
        cms: Api::namespaced(admin.clone(), NS),
        admin,
        cluster,
        apiserver,
        epoch: 0,
    };
    for n in gates {
        bench.in_process(n).await;
    }
    for n in procs {
        bench.processes(n).await;
    }
}
