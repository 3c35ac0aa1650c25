//! Policies pushed by the operator: subscribe over mutual TLS with the
//! sidecar's SVID, compile each set as it arrives and swap it in whole (a
//! set with anything that does not compile here is refused, and the
//! previous one stays), report what is in force, and on a lost stream keep
//! enforcing the last set while reconnecting with backoff and jitter.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use mandate_api::crd::{AgentPolicySpec, RegoModule};
use mandate_policy::credential::{Credential, Placement, SecretValue};
use mandate_proto::policy::v1::policies_client::PoliciesClient;
use mandate_proto::policy::v1::{AckRequest, Credential as WireCredential, PolicySet as WireSet, SubscribeRequest};
use rand::Rng;

use crate::metrics::Metrics;
use crate::svid::{OperatorTrust, SharedSvid};
use mandate_policy::engine::{EngineKind, LoadedPolicy, PolicySet, SetOrigin, SharedPolicies, normalize_host};

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
/// policy that never had a good version denies rather than vanishes. Each
/// brokered credential is checked on its own: one that cannot be used is
/// kept as unavailable, with the reason (requests to its destination are
/// denied with it), and never refuses the whole set.
pub fn build(set: &WireSet, engine: EngineKind) -> Result<PolicySet> {
    let mut out = PolicySet {
        origin: SetOrigin::Operator,
        credentials: set.credentials.iter().map(credential).collect(),
        ..PolicySet::default()
    };
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

/// The engine's credential for one the operator sent: the value, or why
/// there is none (the operator's reason, or what is wrong with the value).
fn credential(c: &WireCredential) -> Credential {
    let placement = match (c.header.as_str(), c.query_parameter.as_str()) {
        (h, "") => Ok(Placement::Header(h.to_string())),
        ("", q) => Ok(Placement::QueryParameter(q.to_string())),
        _ => Err("the operator named both a header and a query parameter for it"),
    };
    let port = u16::try_from(c.port).ok().filter(|p| *p != 0);
    let value = if !c.unavailable.is_empty() {
        Err(c.unavailable.clone())
    } else if let Err(why) = placement {
        Err(why.to_string())
    } else if port.is_none() {
        Err(format!(
            "the operator sent the port {}, which is not a TCP port",
            c.port
        ))
    } else if c.value.is_empty() {
        Err("the operator sent no value for it, and no reason".to_string())
    } else {
        Ok(SecretValue::new(c.value.clone()))
    };
    Credential {
        policy: c.policy.clone(),
        host: normalize_host(&c.host),
        port: port.unwrap_or(0),
        placement: placement.unwrap_or_else(|_| Placement::Header(c.header.clone())),
        prefix: c.prefix.clone(),
        deny_agent_supplied: c.deny_agent_supplied,
        value,
        source: c.source.clone(),
        version: c.version.clone(),
        expires_unix: c.expires_unix,
    }
    .checked()
}

/// Say which brokered credentials the set brings (never their values).
fn log_credentials(set: &PolicySet) {
    for c in &set.credentials {
        match &c.value {
            Ok(_) => {
                tracing::info!(policy = %c.policy, host = %c.host, port = c.port, source = %c.source, version = %c.version, "brokered credential in force")
            }
            Err(why) => {
                tracing::warn!(policy = %c.policy, host = %c.host, port = c.port, source = %c.source, reason = %why, "brokered credential unavailable: requests to its destination are denied")
            }
        }
    }
    for c in set.undeclared_credentials() {
        tracing::warn!(policy = %c.policy, host = %c.host, port = c.port, source = %c.source, "the operator sent a credential for a destination no Enforce policy in force declares; it is not used");
    }
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
                log_credentials(&new);
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
    use super::*;

    fn wire(value: &str) -> WireCredential {
        WireCredential {
            policy: "agents/p".into(),
            host: "API.example.com.".into(),
            port: 443,
            header: "authorization".into(),
            prefix: "Bearer ".into(),
            value: value.as_bytes().to_vec(),
            source: "secret agents/s key token".into(),
            version: "3".into(),
            ..WireCredential::default()
        }
    }

    #[test]
    fn pushed_credentials_are_converted_and_checked_one_by_one() {
        let ok = credential(&wire("t0ken"));
        assert_eq!(ok.host, "api.example.com");
        assert_eq!(ok.placement, Placement::Header("authorization".into()));
        assert_eq!(ok.value.as_ref().unwrap().expose(), b"t0ken");
        let query = credential(&WireCredential {
            header: String::new(),
            query_parameter: "key".into(),
            ..wire("a b")
        });
        assert_eq!(query.placement, Placement::QueryParameter("key".into()));
        assert!(query.value.is_ok());
        for (bad, why) in [
            (
                WireCredential {
                    value: vec![],
                    unavailable: "Secret agents/s not found".into(),
                    ..wire("")
                },
                "Secret agents/s not found",
            ),
            (wire(""), "no value"),
            (
                WireCredential {
                    query_parameter: "key".into(),
                    ..wire("t")
                },
                "both",
            ),
            (
                WireCredential {
                    port: 70_000,
                    ..wire("t")
                },
                "not a TCP port",
            ),
            (wire("t0ken\n"), "control character"),
            (
                WireCredential {
                    header: "x-mandate-tls".into(),
                    ..wire("t")
                },
                "cannot carry",
            ),
        ] {
            let c = credential(&bad);
            let err = c.value.unwrap_err();
            assert!(err.contains(why), "{bad:?}: {err}");
            assert!(!err.contains("t0ken"), "{err}");
        }
    }

    #[test]
    fn a_bad_credential_does_not_refuse_the_set() {
        let set = WireSet {
            set_version: "v".into(),
            credentials: vec![wire("bad\r\nvalue"), wire("good")],
            ..WireSet::default()
        };
        let built = build(&set, EngineKind::Auto).unwrap();
        assert_eq!(built.origin, SetOrigin::Operator);
        assert_eq!(built.credentials.len(), 2);
        assert!(built.credentials[0].value.is_err() && built.credentials[1].value.is_ok());
        assert!(!format!("{built:?}").contains("good"), "{built:?}");
    }
}
