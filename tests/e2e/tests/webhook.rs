//! End-to-end test of the admission webhook against a real local control
//! plane: the `counterweight-webhook` binary runs as a process on loopback,
//! is registered with `url:` and a caBundle in a Mutating- and a
//! ValidatingWebhookConfiguration shaped like `manifests/base/webhook/`, and
//! the API server calls it for real pods and ConfigMaps.
//!
//! The binaries are taken from `COUNTERWEIGHT_WEBHOOK_BIN` and `CW_CERTS_BIN`
//! if set, else from this test's own target directory; build them first:
//! `cargo build -p counterweight-webhook -p counterweight-certs`.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use counterweight_e2e::ha::workspace_bin;
use counterweight_e2e::{eventually, init_tracing};
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Pod, ServiceAccount};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const GATE: &str = "counterweight-gate";
const STATUS: &str = "counterweight.dev/status";
const SERVING: &str = "counterweight.dev/serving";
const ON: &str = "cw-on";
const OFF: &str = "cw-off";
const SYSTEM: &str = "counterweight-system";

/// Runs `cw-certs dev` into `dir`: a CA and a serving cert with SAN 127.0.0.1.
fn make_certs(dir: &Path) {
    let out = std::process::Command::new(workspace_bin("cw-certs", "CW_CERTS_BIN"))
        .arg("--out")
        .arg(dir)
        .args(["dev", "--clusters", "c0"])
        .output()
        .expect("run cw-certs");
    assert!(
        out.status.success(),
        "cw-certs failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Replaces a file by rename, as cert-manager and kubelet do, so the
/// webhook never reads a half-written file (it may see a new cert with the
/// old key for a moment, which it must reject and retry).
fn replace(src: &Path, dst: &Path) {
    let tmp = dst.with_extension("tmp");
    std::fs::copy(src, &tmp).expect("copy cert");
    std::fs::rename(&tmp, dst).expect("rename cert");
}

/// A plain HTTP/1.0 GET on loopback; returns status and body.
async fn http_get(port: u16, path: &str) -> Result<(u16, String), String> {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| e.to_string())?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
        .await
        .map_err(|_| "timeout".to_string())?
        .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("no status line in {text:?}"))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

fn metric(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

fn labels(pairs: &[(&str, &str)]) -> Option<BTreeMap<String, String>> {
    Some(
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
    )
}

fn pod(name: &str, pod_labels: &[(&str, &str)], annotations: &[(&str, &str)]) -> Pod {
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "labels": labels(pod_labels), "annotations": labels(annotations)},
        "spec": {"containers": [{"name": "app", "image": "registry.invalid/app:1"}]}
    }))
    .expect("pod")
}

fn is_injected(p: &Pod) -> bool {
    let spec = p.spec.as_ref();
    let first_is_gate = spec
        .and_then(|s| s.init_containers.as_ref())
        .and_then(|ics| ics.first())
        .is_some_and(|c| c.name == GATE);
    let gate_count = spec
        .and_then(|s| s.init_containers.as_ref())
        .map(|ics| ics.iter().filter(|c| c.name == GATE).count())
        .unwrap_or(0);
    let serving = spec
        .and_then(|s| s.readiness_gates.as_ref())
        .is_some_and(|g| g.iter().filter(|g| g.condition_type == SERVING).count() == 1);
    let marked = p
        .metadata
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(STATUS));
    // The lease sidecar right after the gate, as a native sidecar the API
    // server accepted.
    let sidecar = spec
        .and_then(|s| s.init_containers.as_ref())
        .and_then(|ics| ics.get(1))
        .is_some_and(|c| {
            c.name == counterweight_core::inject::LEASE_CONTAINER
                && c.restart_policy.as_deref() == Some("Always")
                && c.readiness_probe.is_some()
        });
    first_is_gate && gate_count == 1 && serving && marked && sidecar
}

fn is_untouched(p: &Pod) -> bool {
    let spec = p.spec.as_ref();
    spec.and_then(|s| s.init_containers.as_ref()).is_none()
        && spec.and_then(|s| s.readiness_gates.as_ref()).is_none()
        && !p
            .metadata
            .annotations
            .as_ref()
            .is_some_and(|a| a.contains_key(STATUS))
}

async fn namespace(client: &kube::Client, name: &str, enabled: bool) {
    let nss: Api<Namespace> = Api::all(client.clone());
    let mut l = BTreeMap::new();
    if enabled {
        l.insert("counterweight.dev/inject".to_owned(), "enabled".to_owned());
    }
    let ns = Namespace {
        metadata: kube::api::ObjectMeta {
            name: Some(name.into()),
            labels: Some(l),
            ..Default::default()
        },
        ..Default::default()
    };
    nss.create(&PostParams::default(), &ns)
        .await
        .expect("create namespace");
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), name);
    eventually(
        "default ServiceAccount",
        Duration::from_secs(60),
        Duration::from_millis(100),
        || async { sas.get_opt("default").await.map_err(|e| e.to_string()) },
    )
    .await;
}

fn kubectl_apply(kubeconfig: &Path, manifest: &Path) -> std::process::Output {
    std::process::Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(["apply", "-f"])
        .arg(manifest)
        .output()
        .expect("kubectl runs")
}

fn policy_configmap(policy: &str) -> String {
    serde_json::json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "counterweight-policy", "namespace": SYSTEM},
        "data": {"policy.yaml": policy},
    })
    .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_injects_skips_validates_and_survives_rotation() {
    init_tracing();
    let clusters = counterweight_harness::start_clusters(1)
        .await
        .expect("a local cluster starts");
    let cluster = &clusters[0];
    let client = cluster.client();

    // Certificates: two CAs, both in the caBundle, so the serving cert can be
    // rotated to one from the second CA (a CA rotation) while traffic flows.
    let work = cluster.dir().join("webhook");
    let (first, second, serving) = (work.join("a"), work.join("b"), work.join("serving"));
    for d in [&first, &second, &serving] {
        std::fs::create_dir_all(d).expect("mkdir");
    }
    make_certs(&first);
    make_certs(&second);
    let mut bundle = std::fs::read(first.join("ca.crt")).expect("ca a");
    bundle.extend(std::fs::read(second.join("ca.crt")).expect("ca b"));
    replace(&first.join("webhook.crt"), &serving.join("tls.crt"));
    replace(&first.join("webhook.key"), &serving.join("tls.key"));

    let port = counterweight_harness::free_port().expect("port");
    let ops_port = counterweight_harness::free_port().expect("port");
    let log = std::fs::File::create(work.join("webhook.log")).expect("log file");
    let mut child = tokio::process::Command::new(workspace_bin(
        "counterweight-webhook",
        "COUNTERWEIGHT_WEBHOOK_BIN",
    ))
    .args([
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--metrics-listen",
        &format!("127.0.0.1:{ops_port}"),
        "--cluster-name",
        "c0",
        "--tls-poll-ms",
        "100",
    ])
    .arg("--tls-cert")
    .arg(serving.join("tls.crt"))
    .arg("--tls-key")
    .arg(serving.join("tls.key"))
    .stdout(Stdio::from(log.try_clone().expect("log")))
    .stderr(Stdio::from(log))
    .kill_on_drop(true)
    .spawn()
    .expect("start the webhook");
    eventually(
        "webhook /readyz",
        Duration::from_secs(30),
        Duration::from_millis(100),
        || async {
            match http_get(ops_port, "/readyz").await {
                Ok((200, _)) => Ok(Some(())),
                Ok((s, b)) => Err(format!("{s} {b}")),
                Err(e) => Err(e),
            }
        },
    )
    .await;

    for (name, enabled) in [(ON, true), (OFF, false), (SYSTEM, false)] {
        namespace(&client, name, enabled).await;
    }
    let (m, v) = counterweight_harness::loopback_webhook_configs(port, &bundle)
        .expect("webhook configurations");
    let mwc: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    mwc.create(&PostParams::default(), &m)
        .await
        .expect("register the mutating webhook");
    let vwc: Api<ValidatingWebhookConfiguration> = Api::all(client.clone());
    vwc.create(&PostParams::default(), &v)
        .await
        .expect("register the validating webhook");

    // Registration takes effect asynchronously in the API server: poll with
    // a probe pod until it comes back injected.
    let on_pods: Api<Pod> = Api::namespaced(client.clone(), ON);
    let probe_n = AtomicUsize::new(0);
    eventually(
        "the API server to call the webhook",
        Duration::from_secs(30),
        Duration::from_millis(200),
        || async {
            let name = format!("probe-{}", probe_n.fetch_add(1, Ordering::SeqCst));
            let p = on_pods
                .create(&PostParams::default(), &pod(&name, &[], &[]))
                .await
                .map_err(|e| e.to_string())?;
            Ok(is_injected(&p).then_some(()))
        },
    )
    .await;

    // 1. A Deployment in the labelled namespace: pods stored with the gate
    //    first, the readiness gate and the marker.
    let deploys: Api<Deployment> = Api::namespaced(client.clone(), ON);
    let d: Deployment = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "web"},
        "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "web"}},
                 "template": {"metadata": {"labels": {"app": "web"}},
                              "spec": {"initContainers": [{"name": "migrate", "image": "registry.invalid/m:1"}],
                                       "containers": [{"name": "app", "image": "registry.invalid/web:1"}]}}}
    }))
    .expect("deployment");
    deploys
        .create(&PostParams::default(), &d)
        .await
        .expect("create deployment");
    let web_pods = || async {
        let list = on_pods
            .list(&ListParams::default().labels("app=web"))
            .await
            .map_err(|e| e.to_string())?;
        Ok::<_, String>(list.items)
    };
    let pods = eventually(
        "two Deployment pods",
        Duration::from_secs(60),
        Duration::from_millis(200),
        || async {
            let pods = web_pods().await?;
            Ok((pods.len() >= 2).then_some(pods))
        },
    )
    .await;
    for p in &pods {
        assert!(is_injected(p), "not injected: {:?}", p.spec);
        let names: Vec<_> = p
            .spec
            .as_ref()
            .expect("spec")
            .init_containers
            .as_ref()
            .expect("init")
            .iter()
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(
            names,
            [GATE, counterweight_core::inject::LEASE_CONTAINER, "migrate"]
        );
    }

    // 2. Untouched: unlabelled namespace, opted-out pod, database-role pod,
    //    kube-system pod (even with kube-system labelled for injection).
    let off: Api<Pod> = Api::namespaced(client.clone(), OFF);
    let p = off
        .create(&PostParams::default(), &pod("plain", &[], &[]))
        .await
        .expect("pod in unlabelled namespace");
    assert!(is_untouched(&p), "{p:?}");
    let p = on_pods
        .create(
            &PostParams::default(),
            &pod(
                "opted-out",
                &[],
                &[("counterweight.dev/inject", "disabled")],
            ),
        )
        .await
        .expect("opted-out pod");
    assert!(is_untouched(&p), "{p:?}");
    let p = on_pods
        .create(
            &PostParams::default(),
            &pod("db", &[("counterweight.dev/role", "database")], &[]),
        )
        .await
        .expect("database pod");
    assert!(is_untouched(&p), "{p:?}");
    // An app container named like the gate: injecting would give the pod
    // two containers of one name, which the API server refuses, so a pod
    // that is valid elsewhere could not be created here. It is left alone.
    let mut clash = pod("clash", &[], &[]);
    if let Some(spec) = clash.spec.as_mut() {
        spec.containers[0].name = GATE.into();
    }
    let p = on_pods
        .create(&PostParams::default(), &clash)
        .await
        .expect("a pod whose app container is named like the gate is created");
    assert!(is_untouched(&p), "{p:?}");
    let nss: Api<Namespace> = Api::all(client.clone());
    nss.patch(
        "kube-system",
        &PatchParams::default(),
        &Patch::Merge(
            serde_json::json!({"metadata": {"labels": {"counterweight.dev/inject": "enabled"}}}),
        ),
    )
    .await
    .expect("label kube-system");
    let ks: Api<Pod> = Api::namespaced(client.clone(), "kube-system");
    let p = ks
        .create(&PostParams::default(), &pod("sys", &[], &[]))
        .await
        .expect("kube-system pod");
    assert!(is_untouched(&p), "{p:?}");

    // 3. A Deployment update rolls new pods; none is injected twice.
    deploys
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"template": {"metadata": {"annotations": {"rev": "2"}}}}})),
        )
        .await
        .expect("update deployment");
    eventually(
        "pods of the updated template, each injected once",
        Duration::from_secs(90),
        Duration::from_millis(200),
        || async {
            let pods = web_pods().await?;
            let new: Vec<_> = pods
                .iter()
                .filter(|p| {
                    p.metadata
                        .annotations
                        .as_ref()
                        .is_some_and(|a| a.get("rev").map(String::as_str) == Some("2"))
                })
                .collect();
            if let Some(bad) = pods.iter().find(|p| !is_injected(p)) {
                return Err(format!("pod not injected exactly once: {:?}", bad.spec));
            }
            Ok((!new.is_empty()).then_some(()))
        },
    )
    .await;

    // 4. An invalid policy is refused by kubectl apply with the problems;
    //    a valid one is accepted.
    let bad = work.join("bad-policy.json");
    std::fs::write(
        &bad,
        policy_configmap("interval: 5x\nthreshold: 1.5\nretries: 1\ncomponents: []\n"),
    )
    .expect("write manifest");
    let out = kubectl_apply(cluster.kubeconfig(), &bad);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "bad policy was accepted");
    assert!(
        stderr.contains("denied") && stderr.contains("threshold") && stderr.contains("interval"),
        "unreadable refusal: {stderr}"
    );
    let good = work.join("good-policy.json");
    std::fs::write(
        &good,
        policy_configmap(
            "interval: 2s\nthreshold: 0.5\nretries: 2\ncomponents:\n  - name: web\n    namespaces: [cw-on]\n    selector: {matchLabels: {app: web}}\n    weight: 1\n",
        ),
    )
    .expect("write manifest");
    let out = kubectl_apply(cluster.kubeconfig(), &good);
    assert!(
        out.status.success(),
        "good policy refused: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // 5. Rotate the serving certificate (to one from the second CA) while
    //    pods are being created; every creation must succeed, injected.
    let created = Arc::new(AtomicUsize::new(0));
    let creator = {
        let (pods, created) = (on_pods.clone(), created.clone());
        tokio::spawn(async move {
            let mut failures = Vec::new();
            for i in 0..40 {
                match pods
                    .create(&PostParams::default(), &pod(&format!("rot-{i}"), &[], &[]))
                    .await
                {
                    Ok(p) if is_injected(&p) => {}
                    Ok(p) => failures.push(format!("rot-{i} not injected: {:?}", p.spec)),
                    Err(e) => failures.push(format!("rot-{i}: {e}")),
                }
                created.fetch_add(1, Ordering::SeqCst);
            }
            failures
        })
    };
    eventually(
        "some pods created before the rotation",
        Duration::from_secs(60),
        Duration::from_millis(20),
        || async { Ok((created.load(Ordering::SeqCst) >= 10).then_some(())) },
    )
    .await;
    replace(&second.join("webhook.crt"), &serving.join("tls.crt"));
    replace(&second.join("webhook.key"), &serving.join("tls.key"));
    eventually(
        "the webhook to reload the rotated certificate",
        Duration::from_secs(30),
        Duration::from_millis(50),
        || async {
            let (_, text) = http_get(ops_port, "/metrics").await?;
            let ok = metric(
                &text,
                r#"counterweight_webhook_cert_reloads_total{result="ok"} "#,
            );
            Ok((ok >= 1).then_some(()))
        },
    )
    .await;
    let failures = creator.await.expect("creator task");
    assert!(
        failures.is_empty(),
        "requests failed during rotation: {failures:?}"
    );

    let (_, text) = http_get(ops_port, "/metrics").await.expect("metrics");
    assert!(
        metric(&text, "counterweight_webhook_injections_total ") >= 44,
        "{text}"
    );
    assert!(
        child.try_wait().expect("child status").is_none(),
        "webhook died"
    );
    let _ = child.start_kill();
}
