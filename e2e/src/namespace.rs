//! A fresh namespace per test, deleted afterwards, dumped on failure.

use std::fmt::Debug;
use std::fmt::Write as _;
use std::time::Duration;

use anyhow::{Context, Result};
use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Event, Namespace, Pod, ServiceAccount};
use kube::api::{DeleteParams, ListParams, LogParams, PostParams};
use kube::{Api, Client, Resource, ResourceExt};
use rand::Rng;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::{Check, Cluster, Mode, pods, wait_until};

/// Label on every namespace a test makes, so leftovers can be found.
pub const E2E_LABEL: &str = "mandate.dev/e2e";

/// Set to keep test namespaces after the test, for looking around.
const KEEP_ENV: &str = "MANDATE_E2E_KEEP";

/// A namespace made for one test. Delete it with [`TestNamespace::delete`]
/// when the test passed. Dropped without that (a panic, or an error returned
/// with `?`), it prints its pods, events and logs, then deletes itself.
pub struct TestNamespace {
    name: String,
    cluster: Cluster,
    done: bool,
}

impl Debug for TestNamespace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestNamespace").field("name", &self.name).finish()
    }
}

impl TestNamespace {
    pub(crate) async fn new(cluster: Cluster, prefix: &str) -> Result<Self> {
        let suffix: String = rand::rng()
            .sample_iter(rand::distr::Alphanumeric)
            .take(6)
            .map(|b| char::from(b).to_ascii_lowercase())
            .collect();
        let name = format!("{prefix}-{suffix}");
        let ns: Namespace = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "labels": {E2E_LABEL: "true"}}
        }))?;
        Api::<Namespace>::all(cluster.client())
            .create(&PostParams::default(), &ns)
            .await
            .with_context(|| format!("creating test namespace {name}"))?;
        let ns = Self {
            name,
            cluster,
            done: false,
        };
        if ns.cluster.info().mode == Mode::Node {
            // Pods are rejected until the controller-manager has made the
            // namespace's default ServiceAccount (its tokens are projected by
            // kubelet from the TokenRequest API; no Secret since 1.24).
            ns.wait(
                "default",
                "the namespace's default ServiceAccount",
                Duration::from_secs(30),
                |sa: Option<&ServiceAccount>| match sa {
                    Some(_) => Check::Done,
                    None => Check::Pending("no ServiceAccount default yet".into()),
                },
            )
            .await?;
        }
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn client(&self) -> Client {
        self.cluster.client()
    }

    pub fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    /// An `Api` for namespaced resources of kind `K` in this namespace.
    pub fn api<K>(&self) -> Api<K>
    where
        K: Resource<Scope = NamespaceResourceScope>,
        <K as Resource>::DynamicType: Default,
    {
        Api::namespaced(self.client(), &self.name)
    }

    /// Create `obj` in this namespace.
    pub async fn create<K>(&self, obj: &K) -> Result<K>
    where
        K: Resource<Scope = NamespaceResourceScope> + Clone + Serialize + DeserializeOwned + Debug,
        <K as Resource>::DynamicType: Default,
    {
        self.api::<K>()
            .create(&PostParams::default(), obj)
            .await
            .with_context(|| {
                format!(
                    "creating {} {} in {}",
                    K::kind(&Default::default()),
                    obj.name_any(),
                    self.name
                )
            })
    }

    /// `kubectl apply -n <this namespace> -f -` of `manifest` (YAML or
    /// JSON, e.g. a `mandate_testsupport::agent_policy(..).manifest()`); its stdout.
    pub async fn apply(&self, manifest: &str) -> Result<String> {
        self.cluster
            .kubectl_with_input(&["apply", "-n", &self.name, "-f", "-"], manifest)
            .await
    }

    /// Create the ServiceAccount `name`.
    pub async fn create_service_account(&self, name: &str) -> Result<ServiceAccount> {
        self.create(&serde_json::from_value(
            serde_json::json!({"metadata": {"name": name}}),
        )?)
        .await
    }

    /// A token of ServiceAccount `sa` for `audience`, bound to `pod` (what
    /// kubelet projects into the pod), valid for `expiration_seconds`.
    pub async fn pod_token(&self, sa: &str, pod: &Pod, audience: &str, expiration_seconds: i64) -> Result<String> {
        let tr = TokenRequest {
            spec: TokenRequestSpec {
                audiences: vec![audience.into()],
                expiration_seconds: Some(expiration_seconds),
                bound_object_ref: Some(BoundObjectReference {
                    kind: Some("Pod".into()),
                    api_version: Some("v1".into()),
                    name: Some(pod.name_any()),
                    uid: pod.metadata.uid.clone(),
                }),
            },
            ..TokenRequest::default()
        };
        let got = self
            .api::<ServiceAccount>()
            .create_token_request(sa, &PostParams::default(), &tr)
            .await
            .with_context(|| format!("TokenRequest for {sa} bound to pod {}", pod.name_any()))?;
        got.status
            .map(|s| s.token)
            .context("no token in the TokenRequest's status")
    }

    /// Wait until `check` holds for the object `name` of kind `K`, or fail on
    /// timeout or a hopeless state. (The namespace's state is printed when the
    /// failure ends the test: by [`Cluster::with_namespace`] or by `Drop`.)
    pub async fn wait<K, F>(&self, name: &str, what: &str, timeout: Duration, check: F) -> Result<Option<K>>
    where
        K: Resource<Scope = NamespaceResourceScope> + Clone + DeserializeOwned + Debug + Send + 'static,
        <K as Resource>::DynamicType: Default,
        F: Fn(Option<&K>) -> Check,
    {
        wait_until(self.api::<K>(), name, what, timeout, check).await
    }

    /// Wait until pod `name` runs with every container ready.
    pub async fn wait_pod_ready(&self, name: &str, timeout: Duration) -> Result<Pod> {
        self.wait(name, &format!("pod {name} to be ready"), timeout, pods::ready)
            .await?
            .with_context(|| format!("pod {name} vanished"))
    }

    /// Wait until pod `name` has ended (Succeeded or Failed).
    pub async fn wait_pod_finished(&self, name: &str, timeout: Duration) -> Result<Pod> {
        self.wait(name, &format!("pod {name} to finish"), timeout, pods::finished)
            .await?
            .with_context(|| format!("pod {name} vanished"))
    }

    /// A container's logs, read through the apiserver from the kubelet.
    pub async fn logs(&self, pod: &str, container: &str) -> Result<String> {
        let lp = LogParams {
            container: Some(container.to_string()),
            ..LogParams::default()
        };
        self.api::<Pod>()
            .logs(pod, &lp)
            .await
            .with_context(|| format!("reading logs of {}/{pod} container {container}", self.name))
    }

    /// The namespace's pods (with container states and logs) and events, as text.
    pub async fn dump(&self) -> String {
        dump(&self.client(), &self.name).await
    }

    /// Delete the namespace (without waiting for it to be gone), unless
    /// `MANDATE_E2E_KEEP` is set.
    pub async fn delete(mut self) -> Result<()> {
        self.done = true;
        delete_namespace(&self.client(), &self.name).await
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        // Dropped without delete(): the test panicked or returned an error.
        // The test's runtime is blocked in this drop, so work on a thread with
        // its own runtime and client.
        let how = if std::thread::panicking() {
            "panicked"
        } else {
            "ended early (an error?)"
        };
        let name = self.name.clone();
        let kubeconfig = self.cluster.info().kubeconfig.clone();
        let worker = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
                eprintln!("cannot clean up namespace {name}: no runtime");
                return;
            };
            rt.block_on(async {
                let client = match crate::cluster::client_for(&kubeconfig).await {
                    Ok(c) => c,
                    Err(e) => return eprintln!("cannot clean up namespace {name}: {e:#}"),
                };
                eprintln!("test in namespace {name} {how}");
                eprintln!("{}", dump(&client, &name).await);
                if let Err(e) = delete_namespace(&client, &name).await {
                    eprintln!("{e:#}");
                }
            });
        });
        let _ = worker.join();
    }
}

async fn delete_namespace(client: &Client, name: &str) -> Result<()> {
    if std::env::var_os(KEEP_ENV).is_some() {
        eprintln!("{KEEP_ENV} is set: keeping namespace {name}");
        return Ok(());
    }
    match Api::<Namespace>::all(client.clone())
        .delete(name, &DeleteParams::background())
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e).with_context(|| format!("deleting test namespace {name}")),
    }
}

/// Everything a person needs to see why a test in `ns` failed.
pub async fn dump(client: &Client, ns: &str) -> String {
    let mut out = format!("===== state of namespace {ns} =====\n");
    let pods_api: Api<Pod> = Api::namespaced(client.clone(), ns);
    match pods_api.list(&ListParams::default()).await {
        Ok(list) if list.items.is_empty() => out.push_str("no pods\n"),
        Ok(list) => {
            for pod in &list.items {
                let name = pod.name_any();
                let ip = pod.status.as_ref().and_then(|s| s.pod_ip.clone()).unwrap_or_default();
                let _ = writeln!(out, "--- pod {name} (ip {ip}): {}", pods::describe(pod));
                for c in pod
                    .status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .into_iter()
                    .flatten()
                {
                    if c.status != "True" {
                        let _ = writeln!(
                            out,
                            "    condition {}={} {}: {}",
                            c.type_,
                            c.status,
                            c.reason.clone().unwrap_or_default(),
                            c.message.clone().unwrap_or_default()
                        );
                    }
                }
                let containers = pod.spec.iter().flat_map(|s| {
                    s.init_containers
                        .iter()
                        .flatten()
                        .chain(s.containers.iter())
                        .map(|c| c.name.clone())
                });
                for c in containers {
                    let lp = LogParams {
                        container: Some(c.clone()),
                        tail_lines: Some(40),
                        ..LogParams::default()
                    };
                    match pods_api.logs(&name, &lp).await {
                        Ok(logs) => {
                            let _ = writeln!(out, "    logs of {c} (last 40 lines):");
                            for line in logs.lines() {
                                let _ = writeln!(out, "      {line}");
                            }
                        }
                        Err(e) => {
                            let _ = writeln!(out, "    logs of {c}: unavailable ({e})");
                        }
                    }
                }
            }
        }
        Err(e) => {
            let _ = writeln!(out, "listing pods failed: {e}");
        }
    }
    let events: Api<Event> = Api::namespaced(client.clone(), ns);
    match events.list(&ListParams::default()).await {
        Ok(mut list) => {
            list.items.sort_by_key(|e| e.last_timestamp.clone().map(|t| t.0));
            out.push_str("--- events:\n");
            for e in &list.items {
                let _ = writeln!(
                    out,
                    "    {} {} {}/{}: {}",
                    e.type_.clone().unwrap_or_default(),
                    e.reason.clone().unwrap_or_default(),
                    e.involved_object.kind.clone().unwrap_or_default(),
                    e.involved_object.name.clone().unwrap_or_default(),
                    e.message.clone().unwrap_or_default().trim()
                );
            }
        }
        Err(e) => {
            let _ = writeln!(out, "listing events failed: {e}");
        }
    }
    out.push_str("===== end of state =====");
    out
}
