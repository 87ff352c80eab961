//! The webhook over real TLS on loopback: admission answers, the operations
//! port, body limits, certificate rotation under load, graceful shutdown.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use counterweight_webhook::{MUTATE_PATH, ServeOptions, VALIDATE_POLICY_PATH};

fn fast_poll() -> ServeOptions {
    ServeOptions {
        cert_poll: Duration::from_millis(50),
        max_body_bytes: 64 * 1024,
        ..ServeOptions::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_reviews_over_tls_and_serves_ops_over_plain_http() {
    let w = start(fast_poll()).await;
    let tls = client_config(&w.ca_pem());
    let (mut c, _) = connect(w.admission, Some(&tls)).await.unwrap();

    let (status, body) = send(&mut c, "POST", MUTATE_PATH, pod_review("u-1", "shop"))
        .await
        .unwrap();
    assert_eq!(status, 200);
    let r = response_of(&body);
    assert_eq!(r["uid"], "u-1");
    assert_eq!(r["allowed"], true);
    assert_eq!(r["patchType"], "JSONPatch");

    // Same keep-alive connection: garbage is a 400 with a message.
    let (status, body) = send(&mut c, "POST", MUTATE_PATH, Bytes::from_static(b"{nope"))
        .await
        .unwrap();
    assert_eq!(status, 400);
    assert!(String::from_utf8_lossy(&body).contains("not an AdmissionReview"));

    // Over the size limit: 413, and the server stays up.
    let (status, _) = send(
        &mut c,
        "POST",
        VALIDATE_POLICY_PATH,
        Bytes::from(vec![b' '; 65 * 1024]),
    )
    .await
    .unwrap_or((0, Bytes::new()));
    assert!(status == 413 || status == 0, "got {status}");
    let (mut c, _) = connect(w.admission, Some(&tls)).await.unwrap();
    let (status, _) = send(&mut c, "POST", MUTATE_PATH, pod_review("u-2", "shop"))
        .await
        .unwrap();
    assert_eq!(status, 200);

    // A client that does not trust our CA cannot talk to us.
    let other = counterweight_certs::CertificateAuthority::new("other").unwrap();
    assert!(
        connect(w.admission, Some(&client_config(&other.pem().cert_pem)))
            .await
            .is_err()
    );

    let (mut ops, _) = connect(w.ops, None).await.unwrap();
    for path in ["/healthz", "/readyz"] {
        let (status, body) = send(&mut ops, "GET", path, Bytes::new()).await.unwrap();
        assert_eq!((status, &body[..]), (200, &b"ok"[..]), "{path}");
    }
    let (status, body) = send(&mut ops, "GET", "/metrics", Bytes::new())
        .await
        .unwrap();
    assert_eq!(status, 200);
    let text = String::from_utf8(body.to_vec()).unwrap();
    for needle in [
        r#"counterweight_webhook_requests_total{endpoint="mutate",outcome="answered"} 2"#,
        r#"counterweight_webhook_requests_total{endpoint="mutate",outcome="bad-request"} 1"#,
        "counterweight_webhook_injections_total 2",
        r#"counterweight_webhook_skips_total{reason="opted-out"} 0"#,
        "counterweight_webhook_request_duration_seconds_bucket",
    ] {
        assert!(text.contains(needle), "missing {needle} in\n{text}");
    }
    w.shutdown().await.unwrap();
}

/// Large bodies held at once are bounded by the in-flight budget (issue
/// 17: 30 concurrent 10 MiB bodies held 227 MB before). While one large
/// request holds the budget, its body still arriving, another large one
/// waits and is refused 503 with a reason; ordinary reviews are answered
/// meanwhile, and once the first is gone a large request gets in again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_bodies_wait_for_room_and_small_reviews_do_not() {
    use tokio::io::AsyncWriteExt;
    const MIB: usize = 1024 * 1024;
    let w = start(ServeOptions {
        max_body_bytes: MIB,
        inflight_bytes: MIB,
        queue_wait: Duration::from_millis(300),
        ..fast_poll()
    })
    .await;
    let tls = client_config(&w.ca_pem());
    let mut held = tls_stream(w.admission, &tls).await.unwrap();
    let head = format!(
        "POST {VALIDATE_POLICY_PATH} HTTP/1.1\r\nhost: 127.0.0.1\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n",
        900 * 1024
    );
    held.write_all(head.as_bytes()).await.unwrap();
    held.write_all(&[b' '; 1024]).await.unwrap();
    held.flush().await.unwrap();

    // Until the held request has reached the server, a second large one
    // gets in and is answered; then it must wait and be refused.
    let large = || Bytes::from(vec![b' '; 600 * 1024]);
    let deadline = Instant::now() + Duration::from_secs(10);
    let refusal = loop {
        assert!(
            Instant::now() < deadline,
            "a second large body was never refused"
        );
        let (mut c, _) = connect(w.admission, Some(&tls)).await.unwrap();
        let (status, body) = send(&mut c, "POST", VALIDATE_POLICY_PATH, large())
            .await
            .unwrap();
        if status == 503 {
            break String::from_utf8_lossy(&body).into_owned();
        }
    };
    assert!(refusal.contains("waited"), "{refusal}");

    // Small reviews have their own room.
    let (mut c, _) = connect(w.admission, Some(&tls)).await.unwrap();
    let (status, _) = send(&mut c, "POST", MUTATE_PATH, pod_review("u-small", "shop"))
        .await
        .unwrap();
    assert_eq!(status, 200);

    // The held request goes away: its room is free again.
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        assert!(Instant::now() < deadline, "the room was never freed");
        let (mut c, _) = connect(w.admission, Some(&tls)).await.unwrap();
        let (status, _) = send(&mut c, "POST", VALIDATE_POLICY_PATH, large())
            .await
            .unwrap();
        if status != 503 {
            break;
        }
    }
    w.shutdown().await.unwrap();
}

/// Rotates the serving certificate five times, kubelet-style, while four
/// clients send reviews nonstop (two on fresh connections, so every request
/// does a handshake, two on kept-alive connections). No request may fail,
/// and every rotation must become visible to new handshakes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_rotation_under_load_loses_no_request() {
    let w = start(fast_poll()).await;
    let tls = client_config(&w.ca_pem());
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::new();
    for i in 0..4u32 {
        let (tls, stop, ok, addr) = (tls.clone(), stop.clone(), ok.clone(), w.admission);
        clients.push(tokio::spawn(async move {
            let fresh = i % 2 == 0;
            let mut conn = None;
            let mut failures = Vec::new();
            let mut n = 0u64;
            // Bounded: the test stops the clients, and the cap guards a hang.
            while !stop.load(Ordering::SeqCst) && n < 1_000_000 {
                n += 1;
                if fresh || conn.is_none() {
                    conn = match connect(addr, Some(&tls)).await {
                        Ok((c, _)) => Some(c),
                        Err(e) => {
                            failures.push(e);
                            continue;
                        }
                    };
                }
                let Some(c) = conn.as_mut() else { continue };
                let uid = format!("c{i}-{n}");
                match send(c, "POST", MUTATE_PATH, pod_review(&uid, "shop")).await {
                    Ok((200, body)) if response_of(&body)["uid"] == uid.as_str() => {
                        ok.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok((status, body)) => {
                        failures.push(format!("{status}: {}", String::from_utf8_lossy(&body)))
                    }
                    Err(e) => failures.push(e),
                }
            }
            failures
        }));
    }

    let probe = client_config_no_resume(&w.ca_pem());
    for version in 1..=5 {
        let pair = w.rotate(version);
        let want = pem_der(&pair.cert_pem);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (_, served) = connect(w.admission, Some(&probe)).await.unwrap();
            if served.as_deref() == Some(&want[..]) {
                break;
            }
            assert!(Instant::now() < deadline, "rotation {version} never served");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // A broken "rotation" is ignored: the last good certificate keeps serving.
    std::fs::write(w.dir.path().join("..v5/tls.crt"), "garbage").unwrap();
    // Wait until the poller has actually tried the broken file; only then
    // does traffic afterwards show that the last good certificate stayed.
    let reload_errors = |metrics: &str| -> u64 {
        metrics
            .lines()
            .find_map(|l| {
                l.strip_prefix(r#"counterweight_webhook_cert_reloads_total{result="error"} "#)
            })
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0)
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while reload_errors(&w.handler.metrics.encode().unwrap()) == 0 {
        assert!(
            Instant::now() < deadline,
            "the broken certificate was never tried"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let before = ok.load(Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(10);
    while ok.load(Ordering::SeqCst) < before + 50 {
        assert!(
            Instant::now() < deadline,
            "traffic stalled after a broken cert"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.store(true, Ordering::SeqCst);
    let mut failures = Vec::new();
    for c in clients {
        failures.extend(c.await.unwrap());
    }
    let total = ok.load(Ordering::SeqCst);
    eprintln!("rotation test: {total} successful requests during 5 rotations");
    assert!(
        failures.is_empty(),
        "{} failed requests: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(total > 100, "too little traffic to mean anything: {total}");
    let metrics = w.handler.metrics.encode().unwrap();
    assert!(
        metrics.contains(r#"cert_reloads_total{result="ok"} 5"#),
        "{metrics}"
    );
    // At least one: the poller may also catch the garbage file half written.
    assert!(reload_errors(&metrics) >= 1, "{metrics}");
    w.shutdown().await.unwrap();
}

fn pem_der(pem: &str) -> Vec<u8> {
    use rustls_pki_types::pem::PemObject;
    rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .as_ref()
        .to_vec()
}

/// After shutdown is requested, readiness is gone, new connections are
/// refused, and `serve` returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shuts_down_gracefully() {
    let w = start(fast_poll()).await;
    let tls = client_config(&w.ca_pem());
    let (mut c, _) = connect(w.admission, Some(&tls)).await.unwrap();
    let (status, _) = send(&mut c, "POST", MUTATE_PATH, pod_review("u", "shop"))
        .await
        .unwrap();
    assert_eq!(status, 200);
    let addr = w.admission;
    tokio::time::timeout(Duration::from_secs(15), w.shutdown())
        .await
        .expect("serve returns after shutdown")
        .unwrap();
    assert!(connect(addr, Some(&tls)).await.is_err(), "listener closed");
}

/// Issue 17, finding 2: a large policy's parse must not hold up pod
/// reviews. On a runtime with one thread (the worst case of a busy
/// webhook), a pod review sent while a policy of about 190,000 values (just
/// under the reader's limit) is being validated is answered first: the
/// policy parses on the blocking pool. Parsed on the async worker, the pod
/// review waited for it.
#[tokio::test(flavor = "current_thread")]
async fn a_large_policy_does_not_hold_up_pod_reviews() {
    let w = start(ServeOptions {
        max_body_bytes: 1024 * 1024,
        ..fast_poll()
    })
    .await;
    let tls = client_config(&w.ca_pem());
    // 190 components naming the same 1,000 namespaces through an alias.
    let namespaces = (0..1000)
        .map(|i| format!("n{i}"))
        .collect::<Vec<_>>()
        .join(",");
    let mut policy = format!(
        "interval: 1s\nthreshold: 0.5\nretries: 1\ncomponents:\n  - {{name: c0, weight: 1, \
         selector: {{matchLabels: {{app: x}}}}, namespaces: &ns [{namespaces}]}}\n"
    );
    for i in 1..190 {
        policy.push_str(&format!(
            "  - {{name: c{i}, weight: 0, selector: {{matchLabels: {{app: x}}}}, namespaces: *ns}}\n"
        ));
    }
    let review = Bytes::from(
        serde_json::to_vec(&serde_json::json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": "policy-1",
                "kind": {"group": "", "version": "v1", "kind": "ConfigMap"},
                "resource": {"group": "", "version": "v1", "resource": "configmaps"},
                "name": counterweight_core::names::POLICY_CONFIGMAP,
                "namespace": "counterweight-system",
                "operation": "UPDATE",
                "userInfo": {"username": "test"},
                "object": {"apiVersion": "v1", "kind": "ConfigMap",
                    "metadata": {"name": counterweight_core::names::POLICY_CONFIGMAP,
                                 "namespace": "counterweight-system"},
                    "data": {counterweight_core::names::POLICY_KEY: policy}},
                "oldObject": null,
            }
        }))
        .unwrap(),
    );
    // Three at once: parsed on the blocking pool they share the two cores
    // and take longer than one alone, which widens the window in which the
    // pod review must get through; parsed on the one async worker, they
    // run one after another and the pod review waits for at least one.
    let (mut b1, _) = connect(w.admission, Some(&tls)).await.unwrap();
    let (mut b2, _) = connect(w.admission, Some(&tls)).await.unwrap();
    let (mut b3, _) = connect(w.admission, Some(&tls)).await.unwrap();
    let (mut small, _) = connect(w.admission, Some(&tls)).await.unwrap();
    let validate = |c| {
        let review = review.clone();
        async move {
            let r = send(c, "POST", VALIDATE_POLICY_PATH, review).await;
            (Instant::now(), r)
        }
    };
    let pod_done = async {
        // A head start for the policies: their 30 KB bodies are on their
        // way before the pod review is.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let r = send(&mut small, "POST", MUTATE_PATH, pod_review("u-1", "shop")).await;
        (Instant::now(), r)
    };
    let (p1, p2, p3, (pod_at, pod)) = tokio::join!(
        validate(&mut b1),
        validate(&mut b2),
        validate(&mut b3),
        pod_done
    );
    assert_eq!(pod.unwrap().0, 200);
    for (policy_at, policy) in [p1, p2, p3] {
        let (status, body) = policy.unwrap();
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        assert!(
            pod_at < policy_at,
            "the pod review waited for a policy's parse ({:?} after it)",
            pod_at - policy_at
        );
    }
}
