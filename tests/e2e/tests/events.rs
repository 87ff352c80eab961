//! The controller's `EventSink` against a real API server. A condition
//! recorded faster than the API server takes Events (the health verdict,
//! every interval, while the cluster is abnormal and its API server slow)
//! holds one place in the queue, so every transition recorded among the
//! repeats is published; and the state ConfigMap's uid, which every Event
//! names, is read once for many Events rather than once for each.

use std::time::Duration;

use counterweight_controller::events::EventSink;
use counterweight_controller::state_store::StateStore;
use counterweight_core::names;
use counterweight_e2e::fixtures::{configmap_gets, create_namespaces};
use counterweight_e2e::{eventually, init_tracing};
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ListParams};
use kube::runtime::events::EventType;

const SYSTEM: &str = names::SYSTEM_NAMESPACE;
const STATE: &str = names::STATE_CONFIGMAP;

/// The Events the controller's sink made, with reason `reason`.
async fn events_of(events: &Api<Event>, reason: &str) -> Result<Vec<Event>, String> {
    let list = events
        .list(&ListParams::default())
        .await
        .map_err(|e| e.to_string())?;
    Ok(list
        .items
        .into_iter()
        .filter(|e| {
            e.reporting_controller.as_deref() == Some("counterweight-controller")
                && e.reason.as_deref() == Some(reason)
        })
        .collect())
}

#[tokio::test]
async fn a_repeated_condition_never_crowds_out_a_transition() {
    init_tracing();
    let clusters = counterweight_harness::start_clusters(1)
        .await
        .expect("a local cluster starts");
    let client = clusters[0].client();
    create_namespaces(&client, &[SYSTEM]).await;
    StateStore::new(client.clone(), SYSTEM, STATE)
        .update(|d| {
            d.insert("k".into(), "v".into());
        })
        .await
        .expect("the state ConfigMap is made");
    let uid = Api::<ConfigMap>::namespaced(client.clone(), SYSTEM)
        .get(STATE)
        .await
        .expect("the state ConfigMap reads")
        .metadata
        .uid;
    let gets = configmap_gets(&client).await;

    // Everything is recorded before the first await: on this test's
    // single-threaded runtime the publisher runs only after all of it is
    // queued, as an API server too slow to keep up would leave it. 1,000
    // repeats would fill the queue (256) four times over.
    let sink = EventSink::new(client.clone(), clusters[0].name(), SYSTEM, STATE);
    const TRANSITIONS: usize = 20;
    const REPEATS_EACH: usize = 50;
    for t in 0..TRANSITIONS {
        for i in 0..REPEATS_EACH {
            sink.record(
                EventType::Warning,
                "ClusterAbnormal",
                "EvaluateHealth",
                &format!("tick {t}.{i}"),
            );
        }
        sink.record_transition(
            EventType::Normal,
            "Promoted",
            "HandOver",
            &format!("transition {t}"),
        );
    }

    let events: Api<Event> = Api::namespaced(client.clone(), SYSTEM);
    let promoted = eventually(
        "every transition published",
        Duration::from_secs(30),
        Duration::from_millis(100),
        || async {
            let found = events_of(&events, "Promoted").await?;
            if found.len() < TRANSITIONS {
                return Err(format!("{} of {TRANSITIONS} published", found.len()));
            }
            Ok(Some(found))
        },
    )
    .await;
    let mut notes: Vec<String> = promoted.iter().filter_map(|e| e.note.clone()).collect();
    notes.sort_by_key(|n| {
        n.trim_start_matches("transition ")
            .parse::<usize>()
            .unwrap_or(usize::MAX)
    });
    let expected: Vec<String> = (0..TRANSITIONS)
        .map(|t| format!("transition {t}"))
        .collect();
    assert_eq!(notes, expected, "each transition is its own Event");

    // The condition was published once, with the note of its first repeat:
    // the others were already queued as that one.
    let abnormal = events_of(&events, "ClusterAbnormal")
        .await
        .expect("list Events");
    assert_eq!(abnormal.len(), 1, "{abnormal:?}");
    assert_eq!(abnormal[0].note.as_deref(), Some("tick 0.0"));
    assert_eq!(abnormal[0].series, None, "published once, not as a series");

    // Every Event names the state ConfigMap by its uid, read once for the
    // 21 Events (it was read for each before).
    for e in promoted.iter().chain(&abnormal) {
        assert_eq!(
            e.regarding.as_ref().and_then(|r| r.uid.clone()),
            uid,
            "{e:?}"
        );
    }
    let read = configmap_gets(&client).await - gets;
    assert!(
        read <= 5,
        "21 Events read the state ConfigMap {read} times (once for all of them)"
    );

    // Out of the queue, a repeat of the condition counts up its series.
    sink.record(
        EventType::Warning,
        "ClusterAbnormal",
        "EvaluateHealth",
        "tick again",
    );
    eventually(
        "the repeat counted into the condition's series",
        Duration::from_secs(30),
        Duration::from_millis(100),
        || async {
            let found = events_of(&events, "ClusterAbnormal").await?;
            Ok(match found.as_slice() {
                [one] => one
                    .series
                    .as_ref()
                    .is_some_and(|s| s.count == 2)
                    .then_some(()),
                _ => return Err(format!("{} ClusterAbnormal Events", found.len())),
            })
        },
    )
    .await;
}
