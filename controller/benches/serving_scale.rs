//! The workload effects at scale: how long the fence and "every service pod
//! serving" take at 100, 1,000 and 10,000 KWOK service pods, beside what
//! the API server allows (issue 16, item 2).
//!
//! One real control plane (etcd, kube-apiserver, KWOK). For each size the
//! namespace is filled up to N service pods (opted in, role `service`, the
//! `counterweight.dev/serving` readiness gate), then:
//!
//! - **API floor**: the bench itself sends one status PATCH per pod (a
//!   condition of another type, the same strategic-merge shape as the
//!   controller's), at 8, 32 and 128 at a time. N / that time is the most
//!   the API server can take here: no controller can make N pods serve
//!   faster, since each needs one write.
//! - **activate**: the controller's `PodServing` (the real code, in this
//!   process, its pod watch running) at a patch concurrency of 32 (the
//!   default) and 128: `activate()` returns once every pod's serving
//!   condition is True (checked by a LIST after it).
//! - **fence**: `demote()` until no service pod serves (`fence_took`), and
//!   how long its quorum LIST took (`read_took`; it runs beside the stops
//!   of the pods the controller's pod cache shows serving, `from_cache`), with
//!   how many pod LISTs the API server answered from its watch cache
//!   (`apiserver_watch_cache_consistent_read_total`, without a fallback to
//!   etcd). Restarts are held back (`restart_delay` of an hour), so the
//!   pods stay for the next round.
//!
//! Each phase also reports the API server's status PATCHes and pod LISTs
//! (its `apiserver_request_total`), and the bench process's peak RSS.
//!
//! Run: `cargo bench -p counterweight-controller --bench serving_scale`
//! (`SIZES=100,1000` to choose; the default is 100,1000,10000; about 10
//! minutes on 2 cores). `NAMESPACES=100` spreads the pods over that many
//! opted-in namespaces (`bulk-0` .. `bulk-99`, pod `i` in `bulk-{i % 100}`)
//! instead of one: the controller's pod watch and its patches span them,
//! and so do the floor's.

use std::time::{Duration, Instant};

use counterweight_controller::serving::{PodServing, PodServingConfig};
use counterweight_controller::state_store::StateStore;
use counterweight_core::{names, workload};
use counterweight_harness::bulk::{
    apiserver_metric, create_namespace, create_pods, kwok_pod, peak_rss_mib, status_write_floor,
    wait_running,
};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};

const APP: &str = "bulk";
const SYSTEM: &str = "counterweight-system";
const LABELS: &str = "app=bulk";

/// The API server's request counts of interest: status PATCHes and pod
/// LISTs.
async fn api_counts(client: &kube::Client) -> (u64, u64) {
    let metric = "apiserver_request_total";
    let patches = [
        ("verb", "PATCH"),
        ("resource", "pods"),
        ("subresource", "status"),
    ];
    let lists = [("verb", "LIST"), ("resource", "pods"), ("subresource", "")];
    (
        apiserver_metric(client, metric, &patches).await,
        apiserver_metric(client, metric, &lists).await,
    )
}

/// Pod LISTs the API server answered from its watch cache as consistent
/// reads (`ConsistentListFromCache`), without falling back to etcd.
async fn pod_lists_from_cache(client: &kube::Client) -> u64 {
    let labels = [
        ("resource", "pods"),
        ("success", "true"),
        ("fallback", "false"),
    ];
    apiserver_metric(
        client,
        "apiserver_watch_cache_consistent_read_total",
        &labels,
    )
    .await
}

async fn serving_count(pods: &Api<Pod>) -> usize {
    let list = pods
        .list(&ListParams::default().labels(LABELS))
        .await
        .expect("list pods");
    list.items
        .iter()
        .filter(|p| workload::serving_state(p) == workload::ServingState::True)
        .count()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    counterweight_harness::install_crypto_provider();
    let sizes: Vec<usize> = std::env::var("SIZES")
        .unwrap_or_else(|_| "100,1000,10000".into())
        .split(',')
        .map(|s| s.trim().parse().expect("SIZES: comma-separated numbers"))
        .collect();
    let spread: usize = std::env::var("NAMESPACES")
        .map(|s| s.trim().parse().expect("NAMESPACES: a number"))
        .unwrap_or(1)
        .max(1);
    let namespaces: Vec<String> = if spread == 1 {
        vec![APP.to_owned()]
    } else {
        (0..spread).map(|k| format!("{APP}-{k}")).collect()
    };
    let clusters = counterweight_harness::start_clusters(1)
        .await
        .expect("a local cluster starts");
    let client = clusters[0].client();
    create_namespace(&client, SYSTEM, false)
        .await
        .expect("namespace");
    for ns in &namespaces {
        create_namespace(&client, ns, true)
            .await
            .expect("namespace");
    }
    let pods: Api<Pod> = Api::all(client.clone());
    let mut so_far: Vec<(String, String)> = Vec::new();
    let mut rows = Vec::new();
    for (round, &n) in sizes.iter().enumerate() {
        let round = u32::try_from(round).unwrap_or(u32::MAX);
        let t = Instant::now();
        let added = n.saturating_sub(so_far.len());
        for (k, ns) in namespaces.iter().enumerate() {
            let new: Vec<Pod> = (so_far.len()..n)
                .filter(|i| i % spread == k)
                .map(|i| {
                    kwok_pod(
                        &format!("bulk-{i}"),
                        &[("app", APP), (names::ROLE_LABEL, "service")],
                        &[names::SERVING_CONDITION],
                    )
                })
                .collect();
            let in_ns: Api<Pod> = Api::namespaced(client.clone(), ns);
            create_pods(&in_ns, new, 32).await.expect("create pods");
        }
        so_far = (0..n)
            .map(|i| (namespaces[i % spread].clone(), format!("bulk-{i}")))
            .collect();
        wait_running(&pods, LABELS, n, Duration::from_secs(600))
            .await
            .expect("pods Running");
        println!(
            "\n{n} service pods in {spread} namespace(s) ({added} created and Running in {:.1}s)",
            t.elapsed().as_secs_f64()
        );

        for c in [8, 32, 128] {
            let before = api_counts(&client).await;
            let took = status_write_floor(&client, &so_far, c, &format!("Round{round}c{c}"))
                .await
                .expect("every probe PATCH must succeed");
            let after = api_counts(&client).await;
            println!(
                "  API floor, {c:>3} at a time: {n} status PATCHes in {:>7.3}s = {:>6.0}/s ({} PATCHes counted by the API server)",
                took.as_secs_f64(),
                n as f64 / took.as_secs_f64(),
                after.0 - before.0
            );
            rows.push((n, format!("floor c={c}"), took));
        }

        for c in [32, 128] {
            let store = StateStore::new(client.clone(), SYSTEM, names::STATE_CONFIGMAP);
            let config = PodServingConfig {
                concurrency: c,
                restart_delay: Duration::from_secs(3600),
                ..Default::default()
            };
            let serving = PodServing::start(client.clone(), store, None, config);
            serving.set_epoch(u64::from(round) + 1);
            let before = api_counts(&client).await;
            let t = Instant::now();
            let served = serving.activate().await.expect("activate");
            let activate = t.elapsed();
            let mid = api_counts(&client).await;
            assert_eq!(
                serving_count(&pods).await,
                n,
                "every pod serves after activate"
            );
            let cached = pod_lists_from_cache(&client).await;
            let demotion = serving.demote().await.expect("demote");
            let after = api_counts(&client).await;
            let cached = pod_lists_from_cache(&client).await - cached;
            assert_eq!(
                serving_count(&pods).await,
                0,
                "no pod serves after the fence"
            );
            drop(serving);
            println!(
                "  controller, {c:>3} at a time: all serving {:>7.3}s ({served} by activate; {} PATCHes, {} LISTs) | fence {:>7.3}s ({} stopped; {} PATCHes, {} LISTs, {cached} from the watch cache, read {:.0} ms beside {} stops from the pod cache) | bench RSS peak {:.0} MiB",
                activate.as_secs_f64(),
                mid.0 - before.0,
                mid.1 - before.1,
                demotion.fence_took.as_secs_f64(),
                demotion.stopped,
                after.0 - mid.0,
                after.1 - mid.1,
                demotion.read_took.as_secs_f64() * 1000.0,
                demotion.from_cache,
                peak_rss_mib("self").unwrap_or(f64::NAN),
            );
            rows.push((n, format!("activate c={c}"), activate));
            rows.push((n, format!("fence c={c}"), demotion.fence_took));
        }
    }
    println!("\nsummary (pods, what, seconds):");
    for (n, what, took) in rows {
        println!("  {n:>6}  {what:<14} {:>8.3}", took.as_secs_f64());
    }
}
