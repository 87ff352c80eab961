//! Smoke test of the test ground: two real control planes come up, store and
//! return objects, run Deployments to Ready pods through
//! kube-controller-manager, kube-scheduler and KWOK, and replace a deleted pod.

use std::collections::BTreeMap;
use std::time::Duration;

use counterweight_e2e::{eventually, init_tracing};
use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::core::v1::{ConfigMap, Container, Namespace, Pod, PodSpec, PodTemplateSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::api::{Api, DeleteParams, ListParams, ObjectMeta, PostParams};

const NS: &str = "smoke";

fn labels() -> BTreeMap<String, String> {
    BTreeMap::from([("app".to_owned(), "smoke".to_owned())])
}

fn deployment() -> Deployment {
    Deployment {
        metadata: ObjectMeta {
            name: Some("smoke".into()),
            ..Default::default()
        },
        spec: Some(DeploymentSpec {
            replicas: Some(2),
            selector: LabelSelector {
                match_labels: Some(labels()),
                ..Default::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels()),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    containers: vec![Container {
                        name: "app".into(),
                        image: Some("registry.invalid/smoke:1".into()),
                        ..Default::default()
                    }],
                    ..Default::default()
                }),
            },
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn is_running_ready(p: &Pod) -> bool {
    let status = p.status.as_ref();
    status.and_then(|s| s.phase.as_deref()) == Some("Running")
        && status
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        && p.metadata.deletion_timestamp.is_none()
}

async fn ready_pods(pods: &Api<Pod>) -> Result<Vec<Pod>, String> {
    let list = pods
        .list(&ListParams::default().labels("app=smoke"))
        .await
        .map_err(|e| e.to_string())?;
    Ok(list.items.into_iter().filter(is_running_ready).collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clusters_store_objects_and_run_deployments() {
    init_tracing();
    let clusters = counterweight_harness::start_clusters(2)
        .await
        .expect("two local clusters start");
    assert_ne!(
        clusters[0].ports().apiserver,
        clusters[1].ports().apiserver,
        "clusters must be independent"
    );

    for cluster in &clusters {
        let client = cluster.client();
        let name = cluster.name();

        // A namespace and a ConfigMap, written and read back.
        let nss: Api<Namespace> = Api::all(client.clone());
        let ns = Namespace {
            metadata: ObjectMeta {
                name: Some(NS.into()),
                ..Default::default()
            },
            ..Default::default()
        };
        nss.create(&PostParams::default(), &ns)
            .await
            .expect("create namespace");
        let cms: Api<ConfigMap> = Api::namespaced(client.clone(), NS);
        let cm = ConfigMap {
            metadata: ObjectMeta {
                name: Some("hello".into()),
                ..Default::default()
            },
            data: Some(BTreeMap::from([("cluster".to_owned(), name.to_owned())])),
            ..Default::default()
        };
        cms.create(&PostParams::default(), &cm)
            .await
            .expect("create configmap");
        let back = cms.get("hello").await.expect("read configmap back");
        assert_eq!(
            back.data.and_then(|d| d.get("cluster").cloned()).as_deref(),
            Some(name),
            "each cluster keeps its own data"
        );

        // The ServiceAccount controller must populate the new namespace
        // before pods can be admitted there.
        let sas: Api<k8s_openapi::api::core::v1::ServiceAccount> =
            Api::namespaced(client.clone(), NS);
        eventually(
            "default ServiceAccount in the test namespace",
            Duration::from_secs(60),
            Duration::from_millis(100),
            || async { sas.get_opt("default").await.map_err(|e| e.to_string()) },
        )
        .await;

        // A Deployment whose pods become Running and Ready.
        let deploys: Api<Deployment> = Api::namespaced(client.clone(), NS);
        deploys
            .create(&PostParams::default(), &deployment())
            .await
            .expect("create deployment");
        let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
        let ready = eventually(
            "two Running and Ready pods",
            Duration::from_secs(90),
            Duration::from_millis(200),
            || async {
                let ready = ready_pods(&pods).await?;
                Ok((ready.len() == 2).then_some(ready))
            },
        )
        .await;
        eventually(
            "the Deployment to report 2 available replicas",
            Duration::from_secs(60),
            Duration::from_millis(200),
            || async {
                let d = deploys.get("smoke").await.map_err(|e| e.to_string())?;
                let available = d.status.and_then(|s| s.available_replicas).unwrap_or(0);
                Ok((available == 2).then_some(()))
            },
        )
        .await;

        // A deleted pod is replaced by its ReplicaSet.
        let victim = ready[0].metadata.name.clone().expect("pod name");
        let victim_uid = ready[0].metadata.uid.clone().expect("pod uid");
        pods.delete(&victim, &DeleteParams::default())
            .await
            .expect("delete pod");
        eventually(
            "a replacement pod, Running and Ready",
            Duration::from_secs(90),
            Duration::from_millis(200),
            || async {
                let ready = ready_pods(&pods).await?;
                let replaced = ready.len() == 2
                    && ready
                        .iter()
                        .all(|p| p.metadata.uid.as_deref() != Some(victim_uid.as_str()));
                Ok(replaced.then_some(()))
            },
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_restarts_with_its_data() {
    init_tracing();
    let mut clusters = counterweight_harness::start_clusters(1)
        .await
        .expect("a local cluster starts");
    let cluster = &mut clusters[0];
    let cms: Api<ConfigMap> = Api::namespaced(cluster.client(), "default");
    let cm = ConfigMap {
        metadata: ObjectMeta {
            name: Some("survivor".into()),
            ..Default::default()
        },
        data: Some(BTreeMap::from([("k".to_owned(), "v".to_owned())])),
        ..Default::default()
    };
    cms.create(&PostParams::default(), &cm)
        .await
        .expect("create configmap");

    cluster.stop_apiserver();
    assert!(
        cms.get("survivor").await.is_err(),
        "with the API server stopped, requests must fail"
    );
    cluster.start_apiserver().await.expect("apiserver restarts");
    let back = cms
        .get("survivor")
        .await
        .expect("read after apiserver restart");
    assert_eq!(
        back.data.and_then(|d| d.get("k").cloned()).as_deref(),
        Some("v")
    );

    cluster.restart().await.expect("whole cluster restarts");
    let back = cms.get("survivor").await.expect("read after full restart");
    assert_eq!(
        back.data.and_then(|d| d.get("k").cloned()).as_deref(),
        Some("v")
    );
}
