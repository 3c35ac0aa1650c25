//! Brokered credentials against a real kube-apiserver:
//! - admission: a user who may not `get` the Secret (or `create` the
//!   account's `serviceaccounts/token`) a policy names is refused, by name,
//!   with how to fix it; with a Role granting exactly that, the same policy
//!   is admitted; an update by someone without it is refused again; with
//!   brokering off, any policy naming a credential is refused;
//! - distribution: a sidecar-like client with its pod's SVID receives the
//!   labelled Secret's value for its destination, "unavailable" with the
//!   reason for an unlabelled Secret (whose value never appears), a missing
//!   key and a missing Secret, and a TokenRequest token bound to its pod
//!   that a TokenReview accepts; a change of the Secret re-sends the set
//!   (the time is printed); labelling the Secret brokers it; a pod of
//!   another identity never receives any of it; no value reaches the
//!   operator's log; with brokering off, each credential is unavailable
//!   and says so;
//! - posture: the identity reports its pods' mounted Secret, its account's
//!   cluster-admin binding, and its destinations (brokered or not), also as
//!   the agent_posture gauge.
//!
//! With MANDATE_TEST_TOKEN_RENEWAL=1 the distribution test also waits for
//! the token's renewal at half-life (about five minutes).

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::indexing_slicing)] // test fixtures

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use k8s_openapi::api::rbac::v1::{ClusterRoleBinding, Role, RoleBinding};
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use mandate_api::crd::{AgentIdentity, AgentPolicy};
use mandate_e2e::{Cluster, TestNamespace, http_get, secs};
use mandate_proto::policy::v1::policies_client::PoliciesClient;
use mandate_proto::policy::v1::{Credential, PolicySet, SubscribeRequest};
use mandate_testsupport::manifests::ALLOW_GET;
use mandate_testsupport::{
    AgentPolicyBuilder, agent_identity, agent_policy, free_port, try_eventually, workspace_binary,
};
use prost::Message as _;
use serde_json::{Value, json};

mod support;
use support::{Operator, Shape, Webhooks, agent_pod, operator_command, set_enforced};

const TD: &str = "example.org";
const OFF: &str = "credential brokering is off in this installation (helm value credentialBrokering.enabled)";

// ------------------------------------------------------------------ admission

/// A client of the test cluster acting as `user` (impersonated; the
/// apiserver adds system:authenticated).
async fn client_as(cluster: &Cluster, user: &str) -> Result<Client> {
    let kc = kube::config::Kubeconfig::read_from(&cluster.info().kubeconfig)?;
    let mut config = kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default()).await?;
    config.auth_info.impersonate = Some(user.into());
    Ok(Client::try_from(config)?)
}

/// A Role in `ns` with `rules`, bound to the user `user`.
async fn grant(ns: &TestNamespace, name: &str, user: &str, rules: Value) -> Result<()> {
    ns.create::<Role>(&serde_json::from_value(
        json!({"metadata": {"name": name}, "rules": rules}),
    )?)
    .await?;
    ns.create::<RoleBinding>(&serde_json::from_value(json!({
        "metadata": {"name": name},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}],
    }))?)
    .await?;
    Ok(())
}

fn brokering_policy(name: &str, egress: Value) -> AgentPolicyBuilder {
    agent_policy(name)
        .identity("researcher")
        .module("p.rego", ALLOW_GET)
        .set("egress", egress)
}

fn secret_dest(secret: &str) -> Value {
    json!({"host": "api.openai.com", "port": 443, "tls": true,
           "credential": {"secretKeyRef": {"name": secret, "key": "key"}}})
}

fn token_dest(account: &str) -> Value {
    json!({"host": "kubernetes.example", "port": 443, "tls": true,
           "credential": {"serviceAccountToken": {"serviceAccountName": account}}})
}

/// Apply the policy as `client` (server-side apply, as kubectl and GitOps
/// controllers do): `Ok(())`, or the apiserver's message.
async fn apply_as(client: &Client, ns: &str, p: &AgentPolicyBuilder) -> Result<std::result::Result<(), String>> {
    let api: Api<AgentPolicy> = Api::namespaced(client.clone(), ns);
    let obj = p.json();
    let name = obj["metadata"]["name"].as_str().context("no name")?.to_string();
    match api
        .patch(&name, &PatchParams::apply("mandate-test").force(), &Patch::Apply(&obj))
        .await
    {
        Ok(_) => Ok(Ok(())),
        Err(kube::Error::Api(e)) => Ok(Err(e.message)),
        Err(e) => Err(e.into()),
    }
}

#[tokio::test]
#[cfg_attr(
    not(feature = "cluster-tests"),
    ignore = "needs the test cluster: hack/cluster.sh up --node, or make test"
)]
async fn a_policy_brokers_only_what_its_author_may_read() -> Result<()> {
    let cluster = Cluster::connect().await?;
    cluster.install_crds().await?;
    let op = cluster.namespace("brk-op").await?;
    let agents = cluster.namespace("brk-adm").await?;
    let hooks = Webhooks::start_with(&cluster, &op, &agents, vec!["--credential-brokering".into()]).await?;
    let result = admission(&cluster, &agents).await;
    if result.is_err() {
        eprintln!("operator log:\n{}", hooks.logs());
    }
    result?;
    drop(hooks);
    op.delete().await?;
    agents.delete().await
}

async fn admission(cluster: &Cluster, agents: &TestNamespace) -> Result<()> {
    let ns = agents.name();
    let author = format!("mandate-test-author-{ns}");
    let editor = format!("mandate-test-editor-{ns}");
    let policies = json!([{"apiGroups": ["mandate.dev"], "resources": ["agentpolicies"],
                           "verbs": ["get", "list", "create", "update", "patch"]}]);
    grant(agents, "author", &author, policies.clone()).await?;
    grant(agents, "editor", &editor, policies).await?;
    let as_author = client_as(cluster, &author).await?;
    let as_editor = client_as(cluster, &editor).await?;
    // RBAC reaches the authorizer's cache quickly, not at once.
    try_eventually("the author's role to apply", secs(30), async || {
        Ok(apply_as(&as_author, ns, &brokering_policy("plain", json!([])))
            .await?
            .is_ok())
    })
    .await?;

    // A Secret the author may not read: refused, naming user, verb, resource, fix.
    let openai = brokering_policy("openai", json!([secret_dest("openai")]));
    let refused = apply_as(&as_author, ns, &openai)
        .await?
        .err()
        .context("admitted without get on the Secret")?;
    for needle in [
        format!("{author} may not get secrets \"openai\" in namespace {ns}"),
        "spec.egress[0].credential.secretKeyRef".to_string(),
        "resources [secrets], resourceNames [openai], verbs [get]".to_string(),
        "a policy brokers only credentials its author could read".to_string(),
    ] {
        ensure!(
            refused.contains(&needle),
            "the refusal {refused:?} does not say {needle:?}"
        );
    }
    eprintln!("refused: {refused}");
    // With get on exactly that Secret (it need not exist yet): admitted.
    grant(
        agents,
        "read-openai",
        &author,
        json!([{"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["openai"], "verbs": ["get"]}]),
    )
    .await?;
    try_eventually(
        "the policy to be admitted once the author may get the Secret",
        secs(30),
        async || Ok(apply_as(&as_author, ns, &openai).await?.is_ok()),
    )
    .await?;
    // Only that Secret: another one is still refused.
    let other = brokering_policy("other", json!([secret_dest("github")]));
    let refused = apply_as(&as_author, ns, &other)
        .await?
        .err()
        .context("admitted another Secret")?;
    ensure!(refused.contains("may not get secrets \"github\""), "{refused}");

    // Every update is checked again, whoever sends it: the editor (who may
    // edit policies, not read the Secret) cannot change the admitted one.
    let changed = brokering_policy("openai", json!([secret_dest("openai")])).module(
        "p.rego",
        "package mandate.authz\nimport rego.v1\ndefault decision := true\n",
    );
    let refused = apply_as(&as_editor, ns, &changed)
        .await?
        .err()
        .context("an update by the editor was admitted")?;
    ensure!(
        refused.contains(&format!("{editor} may not get secrets \"openai\"")),
        "{refused}"
    );

    // Service-account tokens: create serviceaccounts/token for that account.
    let token = brokering_policy("token", json!([token_dest("reader")]));
    let refused = apply_as(&as_author, ns, &token)
        .await?
        .err()
        .context("admitted without token create")?;
    for needle in [
        format!("{author} may not create serviceaccounts/token \"reader\" in namespace {ns}"),
        "spec.egress[0].credential.serviceAccountToken".to_string(),
        "resources [serviceaccounts/token], resourceNames [reader], verbs [create]".to_string(),
    ] {
        ensure!(
            refused.contains(&needle),
            "the refusal {refused:?} does not say {needle:?}"
        );
    }
    grant(
        agents,
        "mint-reader",
        &author,
        json!([{"apiGroups": [""], "resources": ["serviceaccounts/token"], "resourceNames": ["reader"], "verbs": ["create"]}]),
    )
    .await?;
    try_eventually(
        "the token policy to be admitted once the author may mint",
        secs(30),
        async || Ok(apply_as(&as_author, ns, &token).await?.is_ok()),
    )
    .await?;
    // Both kinds in one policy, one of them not allowed: refused for that one.
    let both = brokering_policy("both", json!([token_dest("reader"), secret_dest("github")]));
    let refused = apply_as(&as_author, ns, &both)
        .await?
        .err()
        .context("admitted with one credential not allowed")?;
    ensure!(refused.contains("spec.egress[1].credential.secretKeyRef"), "{refused}");
    Ok(())
}

#[tokio::test]
#[cfg_attr(
    not(feature = "cluster-tests"),
    ignore = "needs the test cluster: hack/cluster.sh up --node, or make test"
)]
async fn with_brokering_off_a_policy_naming_a_credential_is_refused() -> Result<()> {
    let cluster = Cluster::connect().await?;
    cluster.install_crds().await?;
    let op = cluster.namespace("brk-op").await?;
    let agents = cluster.namespace("brk-off").await?;
    let hooks = Webhooks::start(&cluster, &op, &agents).await?;
    let ns = agents.name();
    let admin = cluster.client();
    let result = async {
        let refused = apply_as(&admin, ns, &brokering_policy("openai", json!([secret_dest("openai")])))
            .await?
            .err()
            .context("admitted with brokering off")?;
        ensure!(
            refused.contains(OFF) && refused.contains("spec.egress[0] (api.openai.com:443)"),
            "{refused}"
        );
        let plain = json!([{"host": "api.openai.com", "port": 443}]);
        ensure!(
            apply_as(&admin, ns, &brokering_policy("plain", plain)).await?.is_ok(),
            "a policy without credentials was refused"
        );
        Ok(())
    }
    .await;
    if result.is_err() {
        eprintln!("operator log:\n{}", hooks.logs());
    }
    result?;
    drop(hooks);
    op.delete().await?;
    agents.delete().await
}

// --------------------------------------------------------------- distribution

struct Ports {
    identity: u16,
    policy: u16,
}

async fn start_operator(
    op: &TestNamespace,
    agents: &TestNamespace,
    ports: &Ports,
    log: &Path,
    brokering: bool,
) -> Result<Operator> {
    let admin = free_port();
    let mut cmd = operator_command(op.cluster(), admin);
    cmd.arg("--no-webhooks")
        .args(["--watch-namespace", agents.name(), "--lease-namespace", op.name()])
        .args(["--operator-namespace", op.name(), "--trust-domain", TD])
        .args(["--lease-duration-seconds", "3"])
        .args(["--identity-addr", &format!("127.0.0.1:{}", ports.identity)])
        .args(["--identity-san", "127.0.0.1"])
        .args(["--policy-addr", &format!("127.0.0.1:{}", ports.policy)])
        .env("MANDATE_LOG", "info,mandate_operator=debug");
    if brokering {
        cmd.arg("--credential-brokering");
    }
    Operator::start(cmd, admin, log, secs(60)).await
}

/// Removes the test's ClusterRoleBinding whatever happens.
struct ClusterBinding(Cluster, String);

impl Drop for ClusterBinding {
    fn drop(&mut self) {
        let _ = std::process::Command::new(&self.0.info().kubectl)
            .arg("--kubeconfig")
            .arg(&self.0.info().kubeconfig)
            .args([
                "delete",
                "clusterrolebinding",
                &self.1,
                "--ignore-not-found",
                "--wait=false",
            ])
            .output();
    }
}

#[tokio::test]
#[cfg_attr(
    not(feature = "cluster-tests"),
    ignore = "needs the test cluster: hack/cluster.sh up --node, or make test"
)]
async fn credentials_reach_their_pods_only_and_follow_their_source() -> Result<()> {
    let cluster = Cluster::connect().await?;
    cluster.install_crds().await?;
    let op = cluster.namespace("brk-op").await?;
    let agents = cluster.namespace("brk-dist").await?;
    let log = std::env::temp_dir().join(format!("mandate-brokered-{}.log", agents.name()));
    let ports = Ports {
        identity: free_port(),
        policy: free_port(),
    };
    let operator = start_operator(&op, &agents, &ports, &log, true).await?;
    let binding = ClusterBinding(cluster.clone(), format!("mandate-test-{}", agents.name()));
    let result = distribution(&op, &agents, &ports, &log, operator, &binding.1).await;
    if result.is_err() {
        eprintln!("operator log:\n{}", std::fs::read_to_string(&log).unwrap_or_default());
    }
    result?;
    drop(binding);
    op.delete().await?;
    agents.delete().await
}

/// A policy stream as pod `pod`'s sidecar: the SVID from its token.
struct Stream {
    inner: tonic::Streaming<PolicySet>,
}

impl Stream {
    async fn open(dir: &Path, ports: &Ports, pod: &str) -> Result<Self> {
        use mandate_sidecar::svid;
        let operator_id = format!("spiffe://{TD}/mandate/operator");
        let cfg = svid::SvidConfig {
            server: format!("https://127.0.0.1:{}", ports.identity),
            token_file: dir.join(format!("{pod}.token")),
            bundle_file: dir.join("bundle.pem"),
            trust_domain: TD.into(),
            server_id: operator_id.clone(),
        };
        let svid = svid::fetch(&cfg).await?;
        let roots = svid::Bundle::File(dir.join("bundle.pem")).load()?;
        let channel = svid::channel(
            &format!("https://127.0.0.1:{}", ports.policy),
            roots,
            TD,
            &operator_id,
            Some(&svid),
        )
        .await?;
        let inner = PoliciesClient::new(channel)
            .subscribe(SubscribeRequest { pod: pod.into() })
            .await?
            .into_inner();
        Ok(Self { inner })
    }

    async fn next(&mut self, within: Duration) -> Result<PolicySet> {
        tokio::time::timeout(within, self.inner.message())
            .await
            .context("no set in time")??
            .context("the stream ended")
    }

    /// The next sets until `want` holds of one (within `within`).
    async fn until(&mut self, within: Duration, want: impl Fn(&PolicySet) -> bool) -> Result<PolicySet> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let set = self.next(left).await?;
            if want(&set) {
                return Ok(set);
            }
        }
    }
}

fn cred<'a>(set: &'a PolicySet, host: &str) -> Result<&'a Credential> {
    set.credentials
        .iter()
        .find(|c| c.host == host)
        .with_context(|| format!("no credential for {host} in {:?}", hosts(set)))
}

fn hosts(set: &PolicySet) -> Vec<(String, String)> {
    set.credentials
        .iter()
        .map(|c| (c.host.clone(), c.unavailable.clone()))
        .collect()
}

/// The JSON payload of a JWT (base64url, unpadded).
fn jwt_claims(token: &str) -> Result<Value> {
    let payload = token.split('.').nth(1).context("not a JWT")?;
    let mut bits = 0u32;
    let mut n = 0;
    let mut out = Vec::new();
    for c in payload.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'-' => 62,
            b'_' => 63,
            b'=' => break,
            _ => bail!("not base64url: {c}"),
        };
        bits = (bits << 6) | u32::from(v);
        n += 6;
        if n >= 8 {
            n -= 8;
            out.push((bits >> n) as u8);
            bits &= (1 << n) - 1;
        }
    }
    Ok(serde_json::from_slice(&out)?)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

async fn distribution(
    op: &TestNamespace,
    agents: &TestNamespace,
    ports: &Ports,
    log: &Path,
    operator: Operator,
    binding: &str,
) -> Result<()> {
    let ns = agents.name();
    let mut operator = Some(operator);
    agents.create_service_account("agent-sa").await?;
    agents.create_service_account("reader").await?;
    set_enforced(agents.cluster(), ns, true).await?;
    for id in ["alpha", "beta"] {
        agents
            .apply(&agent_identity(id).match_label("agent", id).manifest())
            .await?;
    }
    let secret = |name: &str, value: &str, labelled: bool| -> Result<Secret> {
        let labels = if labelled {
            json!({"mandate.dev/brokered": "true"})
        } else {
            json!({})
        };
        Ok(serde_json::from_value(json!({
            "metadata": {"name": name, "labels": labels},
            "stringData": {"key": value},
        }))?)
    };
    agents.create(&secret("openai", "sk-openai-1", true)?).await?;
    agents
        .create(&secret("unlabelled", "sk-unlabelled-never", false)?)
        .await?;
    // alpha's account is cluster-admin: posture must say so.
    Api::<ClusterRoleBinding>::all(agents.client())
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": binding},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "cluster-admin"},
                "subjects": [{"kind": "ServiceAccount", "name": "agent-sa", "namespace": ns}],
            }))?,
        )
        .await?;

    let alpha_egress = json!([
        {"host": "api.openai.com", "port": 443, "tls": true,
         "credential": {"secretKeyRef": {"name": "openai", "key": "key"}}},
        {"host": "unlabelled.example", "port": 443, "tls": true,
         "credential": {"secretKeyRef": {"name": "unlabelled", "key": "key"}, "header": "X-Api-Key"}},
        {"host": "nokey.example", "port": 443, "tls": true,
         "credential": {"secretKeyRef": {"name": "openai", "key": "nokey"}}},
        {"host": "missing.example", "port": 443, "tls": true,
         "credential": {"secretKeyRef": {"name": "nosuch", "key": "key"}}},
        {"host": "kubernetes.example", "port": 443, "tls": true,
         "credential": {"serviceAccountToken": {"serviceAccountName": "agent-sa", "audiences": ["mandate-test"]},
                        "queryParameter": "access_token", "agentSupplied": "Deny"}},
        {"host": "reader.example", "port": 443, "tls": true,
         "credential": {"serviceAccountToken": {"serviceAccountName": "reader"}}},
        {"host": "plain.example", "port": 80},
    ]);
    agents
        .apply(
            &agent_policy("alpha-policy")
                .identity("alpha")
                .module("p.rego", ALLOW_GET)
                .set("egress", alpha_egress)
                .manifest(),
        )
        .await?;
    agents
        .apply(
            &agent_policy("beta-policy")
                .identity("beta")
                .module("p.rego", ALLOW_GET)
                .set("egress", json!([{"host": "api.openai.com", "port": 443, "tls": true}]))
                .manifest(),
        )
        .await?;
    let policies = agents.api::<AgentPolicy>();
    for p in ["alpha-policy", "beta-policy"] {
        try_eventually("the policy to be Ready", secs(30), async || {
            Ok(policies.get_status(p).await?.status.and_then(|s| s.version).is_some())
        })
        .await?;
    }

    // Pods (marked injected, as the webhook would); alpha-0 also mounts a Secret.
    let bundle = {
        let cm = op.api::<ConfigMap>().get("mandate-trust-bundle").await?;
        cm.data
            .and_then(|d| d.get("bundle.pem").cloned())
            .context("no bundle")?
    };
    let dir = std::env::temp_dir().join(format!("mandate-brokered-{ns}"));
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("bundle.pem"), &bundle)?;
    let mut pods = std::collections::BTreeMap::new();
    for (name, agent) in [("alpha-0", "alpha"), ("beta-0", "beta")] {
        let mut manifest = agent_pod(
            name,
            "agent-sa",
            json!({"agent": agent}),
            "mandate.local/busybox:1",
            None,
            Shape::Injected,
        );
        if agent == "alpha" {
            manifest["spec"]["volumes"]
                .as_array_mut()
                .context("volumes")?
                .push(json!({"name": "creds", "secret": {"secretName": "unlabelled"}}));
        }
        let pod = agents.create::<Pod>(&serde_json::from_value(manifest)?).await?;
        let token = agents.pod_token("agent-sa", &pod, "mandate", 600).await?;
        std::fs::write(dir.join(format!("{name}.token")), token)?;
        pods.insert(name, pod);
    }
    let alpha_uid = pods["alpha-0"].metadata.uid.clone().context("no uid")?;

    // alpha's set: each credential, or why not.
    let mut alpha = Stream::open(&dir, ports, "alpha-0").await?;
    let set = alpha.next(secs(30)).await?;
    ensure!(set.policies.len() == 1, "alpha's policies: {:?}", set.policies);
    ensure!(set.credentials.len() == 6, "alpha's credentials: {:?}", hosts(&set));
    let secrets = agents.api::<Secret>();
    let rv = secrets
        .get("openai")
        .await?
        .metadata
        .resource_version
        .unwrap_or_default();
    let c = cred(&set, "api.openai.com")?;
    ensure!(
        c.unavailable.is_empty() && c.value == b"sk-openai-1",
        "openai: {:?}",
        c.unavailable
    );
    ensure!(
        (c.header.as_str(), c.prefix.as_str(), c.port, c.deny_agent_supplied)
            == ("authorization", "Bearer ", 443, false),
        "openai's shape: {} {} {}",
        c.header,
        c.prefix,
        c.port
    );
    ensure!(c.policy == format!("{ns}/alpha-policy"), "{}", c.policy);
    ensure!(
        c.source == format!("secret {ns}/openai key key") && c.version == rv,
        "{} {}",
        c.source,
        c.version
    );
    let c = cred(&set, "unlabelled.example")?;
    ensure!(c.value.is_empty(), "the unlabelled Secret's value was sent");
    ensure!(
        c.unavailable.contains(&format!(
            "Secret {ns}/unlabelled lacks the label mandate.dev/brokered=true"
        )),
        "unlabelled: {}",
        c.unavailable
    );
    ensure!(c.header == "x-api-key", "{}", c.header);
    let c = cred(&set, "nokey.example")?;
    ensure!(
        c.value.is_empty()
            && c.unavailable
                .contains(&format!("Secret {ns}/openai has no key nokey; fix")),
        "nokey: {}",
        c.unavailable
    );
    let c = cred(&set, "missing.example")?;
    ensure!(
        c.value.is_empty() && c.unavailable == format!("Secret {ns}/nosuch does not exist"),
        "missing: {}",
        c.unavailable
    );
    let encoded = set.encode_to_vec();
    ensure!(
        !contains(&encoded, b"sk-unlabelled-never"),
        "the unlabelled Secret's value is in alpha's set"
    );

    // The token: bound to alpha-0, for the audience asked, accepted by a TokenReview.
    let c = cred(&set, "kubernetes.example")?;
    ensure!(c.unavailable.is_empty(), "token: {}", c.unavailable);
    ensure!(
        (
            c.header.as_str(),
            c.query_parameter.as_str(),
            c.prefix.as_str(),
            c.deny_agent_supplied
        ) == ("", "access_token", "", true),
        "token's shape"
    );
    ensure!(
        c.source == format!("serviceaccount {ns}/agent-sa token"),
        "{}",
        c.source
    );
    let now = jiff::Timestamp::now().as_second();
    ensure!(
        c.expires_unix > now + 500 && c.expires_unix <= now + 700,
        "expires {} (now {now})",
        c.expires_unix
    );
    ensure!(!c.version.is_empty(), "token with no version");
    let token = String::from_utf8(c.value.clone())?;
    let claims = jwt_claims(&token)?;
    let k8s = &claims["kubernetes.io"];
    ensure!(
        k8s["pod"]["name"] == "alpha-0" && k8s["pod"]["uid"] == alpha_uid.as_str(),
        "the token is not bound to alpha-0: {k8s}"
    );
    ensure!(k8s["serviceaccount"]["name"] == "agent-sa", "{k8s}");
    ensure!(claims["aud"] == json!(["mandate-test"]), "aud {}", claims["aud"]);
    let review = Api::<TokenReview>::all(agents.client())
        .create(
            &PostParams::default(),
            &TokenReview {
                spec: TokenReviewSpec {
                    token: Some(token.clone()),
                    audiences: Some(vec!["mandate-test".into()]),
                },
                ..TokenReview::default()
            },
        )
        .await?;
    let status = review.status.unwrap_or_default();
    ensure!(status.authenticated == Some(true), "TokenReview: {:?}", status.error);
    ensure!(
        status.user.and_then(|u| u.username) == Some(format!("system:serviceaccount:{ns}:agent-sa")),
        "TokenReview's user"
    );
    // Another account's token cannot be bound to alpha-0: unavailable, saying why.
    let c = cred(&set, "reader.example")?;
    ensure!(
        c.value.is_empty()
            && c.unavailable.contains(&format!(
                "a token of serviceaccount {ns}/reader cannot be bound to pod {ns}/alpha-0, which runs as agent-sa"
            )),
        "reader: {}",
        c.unavailable
    );
    let first_token = token;
    let first_expiry = c.version.clone();

    // Another identity's pod: none of it.
    let mut beta = Stream::open(&dir, ports, "beta-0").await?;
    let beta_set = beta.next(secs(30)).await?;
    ensure!(
        beta_set.credentials.is_empty(),
        "beta received credentials: {:?}",
        hosts(&beta_set)
    );
    let beta_bytes = beta_set.encode_to_vec();
    ensure!(
        !contains(&beta_bytes, b"sk-openai") && !contains(&beta_bytes, first_token.as_bytes()),
        "a value reached beta"
    );

    // A change of the Secret re-sends the set, with the new value.
    let started = tokio::time::Instant::now();
    secrets
        .patch(
            "openai",
            &PatchParams::default(),
            &Patch::Merge(json!({"stringData": {"key": "sk-openai-2"}})),
        )
        .await?;
    let set = alpha
        .until(secs(30), |s| {
            cred(s, "api.openai.com").is_ok_and(|c| c.value == b"sk-openai-2")
        })
        .await?;
    let propagation = started.elapsed();
    eprintln!("Secret change -> re-sent set with the new value: {propagation:?}");
    ensure!(
        cred(&set, "kubernetes.example")?.value == first_token.as_bytes(),
        "the token was re-minted on a Secret change"
    );
    // Labelling the Secret opts it in.
    secrets
        .patch(
            "unlabelled",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"mandate.dev/brokered": "true"}}})),
        )
        .await?;
    alpha
        .until(secs(30), |s| {
            cred(s, "unlabelled.example").is_ok_and(|c| c.value == b"sk-unlabelled-never")
        })
        .await?;
    // beta's stream was re-sent nothing with a value meanwhile.
    if let Ok(Ok(Some(s))) = tokio::time::timeout(secs(1), beta.inner.message()).await {
        ensure!(s.credentials.is_empty(), "beta received credentials: {:?}", hosts(&s));
    }

    // Posture: alpha's mounted Secret, its account's cluster-admin binding,
    // its destinations; and the gauge.
    let ids = agents.api::<AgentIdentity>();
    try_eventually("alpha's posture", secs(90), async || {
        let p = ids.get_status("alpha").await?.status.and_then(|s| s.posture).unwrap_or_default();
        let held = p.held_credentials.iter().any(|h| h == "Secret unlabelled mounted (volume creds)");
        let admin = p.broad_rbac.iter().any(|r| r.starts_with("agent-sa: every verb on everything"));
        let egress: Vec<(String, bool)> = p.egress.iter().map(|e| (e.host.clone(), e.brokered)).collect();
        Ok(held
            && admin
            && egress.len() == 7
            && egress.contains(&("plain.example".into(), false))
            && egress.contains(&("api.openai.com".into(), true)))
    })
    .await
    .context("AgentIdentity alpha's status.posture never showed the mounted Secret, the cluster-admin binding and seven destinations")?;
    let metrics_url = format!(
        "http://127.0.0.1:{}/metrics",
        operator.as_ref().map(|o| o.admin).context("operator")?
    );
    try_eventually("the agent_posture gauge", secs(30), async || {
        let (_, body) = http_get(&metrics_url).await?;
        let gauge = |kind: &str| {
            body.lines()
                .find(|l| {
                    l.starts_with("mandate_operator_agent_posture{")
                        && l.contains(&format!("namespace=\"{ns}\""))
                        && l.contains("identity=\"alpha\"")
                        && l.contains(&format!("kind=\"{kind}\""))
                })
                .and_then(|l| l.rsplit(' ').next())
                .and_then(|v| v.parse::<i64>().ok())
        };
        Ok(gauge("unbrokered_hosts") == Some(1)
            && gauge("held_credentials").is_some_and(|n| n >= 1)
            && gauge("broad_rbac").is_some_and(|n| n >= 1))
    })
    .await?;

    // `mandate agents` shows the destinations on one line.
    let out = tokio::process::Command::new(workspace_binary("mandate")?)
        .args(["agents", "-n", ns])
        .env("KUBECONFIG", &agents.cluster().info().kubeconfig)
        .output()
        .await?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        text.contains(&format!("{ns}/alpha egress (1 of 7 not brokered): "))
            && text.contains("api.openai.com:443 (brokered)")
            && text.contains(", plain.example:80,")
            && text.contains(&format!("{ns}/alpha holds: Secret unlabelled mounted (volume creds)")),
        "mandate agents:\n{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Renewal at half-life (opt-in: about five minutes).
    if std::env::var("MANDATE_TEST_TOKEN_RENEWAL").is_ok_and(|v| v == "1") {
        let started = tokio::time::Instant::now();
        let set = alpha
            .until(secs(400), |s| {
                cred(s, "kubernetes.example").is_ok_and(|c| !c.value.is_empty() && c.value != first_token.as_bytes())
            })
            .await?;
        let c = cred(&set, "kubernetes.example")?;
        eprintln!(
            "token renewed after {:?} (expiry {first_expiry} -> {})",
            started.elapsed(),
            c.version
        );
        ensure!(
            c.version != first_expiry && c.unavailable.is_empty(),
            "the renewed token: {}",
            c.unavailable
        );
    }

    // No value ever reached the operator's log.
    let text = std::fs::read_to_string(log)?;
    for value in [
        "sk-openai-1",
        "sk-openai-2",
        "sk-unlabelled-never",
        first_token.as_str(),
    ] {
        ensure!(!text.contains(value), "a credential value is in the operator's log");
    }

    // Brokering off: the same pod is told each credential is unavailable, and why.
    drop(alpha);
    drop(beta);
    if let Some(mut o) = operator.take() {
        o.process.kill().await?;
    }
    let _off = start_operator(op, agents, ports, log, false).await?;
    let mut alpha = Stream::open(&dir, ports, "alpha-0").await?;
    let set = alpha.next(secs(30)).await?;
    ensure!(set.credentials.len() == 6, "{:?}", hosts(&set));
    for c in &set.credentials {
        ensure!(
            c.value.is_empty() && c.unavailable == OFF,
            "{}: {}",
            c.host,
            c.unavailable
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
