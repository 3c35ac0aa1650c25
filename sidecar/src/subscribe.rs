//! Policies pushed by the operator: subscribe over mutual TLS with the
//! sidecar's SVID, compile each set as it arrives and swap it in whole (a
//! set with anything that does not compile here is refused, and the
//! previous one stays), report what is in force, and on a lost stream keep
//! enforcing the last set while reconnecting with backoff and jitter.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use mandate_api::crd::{AgentPolicySpec, RegoModule};
use mandate_proto::policy::v1::policies_client::PoliciesClient;
use mandate_proto::policy::v1::{AckRequest, PolicySet as WireSet, SubscribeRequest};
use rand::Rng;

use crate::metrics::Metrics;
use crate::svid::{OperatorTrust, SharedSvid};
use mandate_policy::engine::{EngineKind, LoadedPolicy, PolicySet, SharedPolicies};

/// Where policies come from.
#[derive(Debug, Clone)]
pub struct PolicySource {
    /// `https://host:port` of the operator's policy service.
    pub server: String,
    /// This sidecar's pod name (its labels decide selector-bound policies).
    pub pod: String,
    pub engine: EngineKind,
}

/// Compile a pushed set. Withheld policies become deny-all policies, so a
/// policy that never had a good version denies rather than vanishes.
pub fn build(set: &WireSet, engine: EngineKind) -> Result<PolicySet> {
    let mut out = PolicySet::default();
    for p in &set.policies {
        let spec: AgentPolicySpec = serde_json::from_str(&p.spec_json)
            .with_context(|| format!("{}/{}: not an AgentPolicy spec", p.namespace, p.name))?;
        let name = format!("{}/{}", p.namespace, p.name);
        let loaded =
            LoadedPolicy::compile_for(name.clone(), &spec, engine).map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
        if loaded.version != p.version {
            bail!(
                "{name}: compiles to {} here, the operator says {}",
                loaded.version,
                p.version
            );
        }
        out.policies.push(loaded);
    }
    for w in &set.withheld {
        let reason = serde_json::to_string(&format!("withheld by the operator: {w}")).unwrap_or_default();
        let spec = AgentPolicySpec {
            agent_selector: None,
            identities: vec![],
            mode: Default::default(),
            modules: vec![RegoModule {
                name: "withheld.rego".into(),
                rego: format!(
                    "package mandate.authz\nimport rego.v1\ndecision := {{\"allow\": false, \"reason\": {reason}}}\n"
                ),
            }],
            data: None,
            entrypoint: mandate_api::crd::DEFAULT_ENTRYPOINT.into(),
            tests: vec![],
            egress: vec![],
        };
        let name = format!("withheld:{}", w.split(':').next().unwrap_or("policy"));
        out.policies.push(LoadedPolicy::compile_for(name, &spec, engine)?);
    }
    Ok(out)
}

/// One subscription, until the stream ends or fails.
async fn stream_once(
    src: &PolicySource,
    trust: &OperatorTrust,
    svid: &SharedSvid,
    policies: &SharedPolicies,
    metrics: &Metrics,
) -> Result<()> {
    let Some(current) = svid.load_full().filter(|s| s.valid_now()) else {
        bail!("no valid SVID yet");
    };
    let roots = trust.bundle.load()?;
    let channel = crate::svid::channel(
        &src.server,
        roots,
        &trust.trust_domain,
        &trust.server_id,
        Some(&current),
    )
    .await?;
    let mut client = PoliciesClient::new(channel);
    let mut stream = client
        .subscribe(SubscribeRequest { pod: src.pod.clone() })
        .await
        .map_err(|s| anyhow::anyhow!("subscribing: {}", s.message()))?
        .into_inner();
    tracing::info!(server = %src.server, "subscribed to the operator's policy stream");
    while let Some(set) = stream.message().await.context("the policy stream")? {
        match build(&set, src.engine) {
            Ok(new) => {
                let in_force: Vec<String> = new
                    .policies
                    .iter()
                    .map(|p| format!("{}={}", p.name, p.version))
                    .collect();
                for p in &new.policies {
                    tracing::info!(policy = %p.name, version = %p.version, "policy in force (pushed)");
                }
                metrics.policies_loaded(&new);
                policies.store(Arc::new(new));
                let ack = client
                    .ack(AckRequest {
                        pod: src.pod.clone(),
                        set_version: set.set_version.clone(),
                        in_force,
                    })
                    .await;
                if let Err(s) = ack {
                    tracing::warn!(error = %s.message(), "could not report the set in force");
                }
            }
            Err(e) => {
                metrics.load_errors.inc();
                tracing::error!(error = %format!("{e:#}"), set = %set.set_version, "a pushed policy set does not compile here; the previous set stays in force");
            }
        }
    }
    Ok(())
}

/// Stay subscribed: reconnect after any loss, with backoff and jitter.
pub async fn run(
    src: PolicySource,
    trust: OperatorTrust,
    svid: SharedSvid,
    policies: SharedPolicies,
    metrics: Arc<Metrics>,
) {
    let mut backoff = Duration::from_millis(200);
    loop {
        let started = tokio::time::Instant::now();
        match stream_once(&src, &trust, &svid, &policies, &metrics).await {
            Ok(()) => tracing::warn!("the policy stream ended; the current set stays in force; reconnecting"),
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "no policy stream; the current set stays in force; retrying")
            }
        }
        if started.elapsed() > Duration::from_secs(30) {
            backoff = Duration::from_millis(200);
        }
        let jitter = rand::rng().random_range(0..=backoff.as_millis() as u64 / 2);
        tokio::time::sleep(backoff + Duration::from_millis(jitter)).await;
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}
