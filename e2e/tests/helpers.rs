//! The test helpers themselves, against the real node: a hopeless pod fails a
//! wait at once with the reason; the failure dump shows pods, container
//! states, logs and events; namespaces go away after delete() and after a drop.

use anyhow::{Result, ensure};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::Api;
use mandate_e2e::{Check, Cluster, pods, secs, wait_until};
use serde_json::json;

fn busybox(name: &str, image: &str, script: &str) -> Result<Pod> {
    Ok(serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {
            "restartPolicy": "Never",
            "containers": [{
                "name": "main", "image": image, "imagePullPolicy": "Never",
                "command": ["/bin/sh", "-c", script],
            }],
        },
    }))?)
}

/// Wait until the namespace is gone or going (deletionTimestamp set).
async fn wait_namespace_going(cluster: &Cluster, name: &str) -> Result<()> {
    let api: Api<Namespace> = Api::all(cluster.client());
    wait_until(
        api,
        name,
        &format!("namespace {name} to be deleted"),
        secs(30),
        |ns| match ns {
            None => Check::Done,
            Some(ns) if ns.metadata.deletion_timestamp.is_some() => Check::Done,
            Some(_) => Check::Pending("namespace still active".into()),
        },
    )
    .await?;
    Ok(())
}

#[tokio::test]
#[cfg_attr(
    not(feature = "cluster-tests"),
    ignore = "needs the test cluster: hack/cluster.sh up --node, or make test"
)]
async fn failures_are_reported_with_the_namespaces_state() -> Result<()> {
    let cluster = Cluster::connect().await?;
    cluster.require_node()?;
    let ns = cluster.namespace("helpers").await?;

    // An image that is not there: the wait fails on the reason, not on the deadline.
    ns.create(&busybox("ghost", "mandate.local/does-not-exist:1", "true")?)
        .await?;
    let err = ns
        .wait_pod_ready("ghost", secs(120))
        .await
        .expect_err("a pod without its image became ready");
    let msg = format!("{err:#}");
    ensure!(
        msg.contains("ErrImageNeverPull"),
        "wait error does not name the reason: {msg}"
    );
    ensure!(
        !msg.contains("timed out"),
        "the wait ran to its deadline instead of failing fast: {msg}"
    );

    // A container that logs and fails: the dump has its state, its logs and the events.
    ns.create(&busybox(
        "talker",
        "mandate.local/busybox:1",
        "echo marker-7f3a; exit 3",
    )?)
    .await?;
    let pod = ns.wait_pod_finished("talker", secs(60)).await?;
    ensure!(!pods::succeeded(&pod), "talker should have failed");
    let dump = ns.dump().await;
    for needle in [
        "pod ghost",
        "ErrImageNeverPull",
        "pod talker",
        "terminated (exit 3",
        "marker-7f3a",
        "Scheduled",
    ] {
        ensure!(dump.contains(needle), "dump lacks '{needle}':\n{dump}");
    }

    let name = ns.name().to_string();
    ns.delete().await?;
    wait_namespace_going(&cluster, &name).await
}

#[tokio::test]
#[cfg_attr(
    not(feature = "cluster-tests"),
    ignore = "needs the test cluster: hack/cluster.sh up --node, or make test"
)]
async fn a_dropped_namespace_is_deleted() -> Result<()> {
    let cluster = Cluster::connect().await?;
    let ns = cluster.namespace("helpers-drop").await?;
    let name = ns.name().to_string();
    // What a test that returns early with `?` does.
    drop(ns);
    wait_namespace_going(&cluster, &name).await
}
