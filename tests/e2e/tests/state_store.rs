//! The controller's `StateStore` against a real API server: it writes
//! without reading first (it remembers what its last write returned), and
//! that memory never costs a write: a foreign write in between, a change
//! that the memory says is already made, and a deleted ConfigMap all end
//! with the change applied on top of what is really stored.

use std::collections::BTreeMap;

use counterweight_controller::state_store::{StateStore, Written};
use counterweight_e2e::fixtures::{configmap_gets, create_namespaces};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, DeleteParams, Patch, PatchParams};

const NS: &str = "store";
const NAME: &str = counterweight_core::names::STATE_CONFIGMAP;

/// Writes `key: value` as another writer would (a hand edit).
async fn foreign_write(cms: &Api<ConfigMap>, key: &str, value: &str) {
    cms.patch(
        NAME,
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"data": {key: value}})),
    )
    .await
    .expect("a foreign write");
}

async fn stored(cms: &Api<ConfigMap>) -> BTreeMap<String, String> {
    cms.get(NAME)
        .await
        .expect("read the record")
        .data
        .unwrap_or_default()
}

#[tokio::test]
async fn writes_without_reading_first_and_never_over_a_foreign_write() {
    counterweight_e2e::init_tracing();
    let clusters = counterweight_harness::start_clusters(1)
        .await
        .expect("a local cluster starts");
    let client = clusters[0].client();
    create_namespaces(&client, &[NS]).await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), NS);
    let store = StateStore::new(client.clone(), NS, NAME);

    // Created as standby, epoch 0, with the change on top.
    let (_, w) = store
        .update(|d| {
            d.insert("n".into(), "0".into());
        })
        .await
        .expect("create");
    assert_eq!(w, Written::Created);

    // Sequential writes by one writer: no read before each write.
    let gets = configmap_gets(&client).await;
    const WRITES: u64 = 50;
    for i in 1..=WRITES {
        let (_, w) = store
            .update(|d| {
                d.insert("n".into(), i.to_string());
            })
            .await
            .expect("update");
        assert_eq!(w, Written::Updated);
    }
    let read = configmap_gets(&client).await - gets;
    assert!(
        read <= 5,
        "{WRITES} writes by one writer read the ConfigMap {read} times (once a write before)"
    );
    assert_eq!(stored(&cms).await.get("n").map(String::as_str), Some("50"));

    // A foreign write in between: the remembered version is stale, the
    // API server refuses it, and the change lands on top of the foreign one.
    foreign_write(&cms, "someone", "else").await;
    store
        .update(|d| {
            d.insert("mine".into(), "1".into());
        })
        .await
        .expect("update over a foreign write");
    let now = stored(&cms).await;
    assert_eq!(now.get("someone").map(String::as_str), Some("else"));
    assert_eq!(now.get("mine").map(String::as_str), Some("1"));

    // The memory says the change is made; what is stored says otherwise.
    foreign_write(&cms, "mine", "changed by hand").await;
    let (_, w) = store
        .update(|d| {
            d.insert("mine".into(), "1".into());
        })
        .await
        .expect("update");
    assert_eq!(
        w,
        Written::Updated,
        "a change the stale memory calls a no-op must still be written"
    );
    assert_eq!(
        stored(&cms).await.get("mine").map(String::as_str),
        Some("1")
    );

    // Deleted behind the store's back: recreated as standby, epoch 0, with
    // the change, never from the remembered record.
    cms.delete(NAME, &DeleteParams::default())
        .await
        .expect("delete");
    let (_, w) = store
        .update(|d| {
            d.insert("after".into(), "delete".into());
        })
        .await
        .expect("update after a delete");
    assert_eq!(w, Written::Created);
    let now = stored(&cms).await;
    assert_eq!(now.get("state").map(String::as_str), Some("standby"));
    assert_eq!(now.get("epoch").map(String::as_str), Some("0"));
    assert_eq!(now.get("after").map(String::as_str), Some("delete"));
    assert_eq!(
        now.get("n"),
        None,
        "nothing of the deleted record comes back"
    );
}
