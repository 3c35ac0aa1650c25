//! The Secret Discovery Service Envoy's `on_demand_secret` certificate
//! selector asks for interception leaves (incremental xDS, `DELTA_GRPC`).
//!
//! Envoy subscribes to one resource per SNI it sees (and to
//! [`crate::intercept::NO_SNI_NAME`] for a ClientHello without one). A name the policies in
//! force intercept is answered with a `Secret` holding its leaf and the pod
//! CA; anything else (undeclared, Passthrough, no SNI, malformed, an error)
//! is sent back in `removed_resources`, which fails that handshake: fail
//! closed. Each refusal is logged with the name and counted.
//!
//! While a stream lives, every subscribed name is checked again when the
//! policies change (a name no longer intercepted is removed, one that now
//! is gets its leaf), when its leaf is renewed (the new one is pushed) and
//! when its leaf is evicted from the bounded cache (removed: Envoy drops
//! the name and asks again at its next handshake).

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::{DataSource, data_source};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{Secret, TlsCertificate, secret};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse, Resource,
};
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_server::{
    SecretDiscoveryService, SecretDiscoveryServiceServer,
};
use envoy_types::pb::google::protobuf::Any;
use prost::Message as _;
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

use crate::intercept::{Interceptor, Leaf, LeafSubject, Refusal};

/// The type of every resource this service serves.
pub const SECRET_TYPE_URL: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

/// What a stream last told Envoy about one name.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Sent {
    /// A leaf, from this cache slot, with this serial.
    Leaf { key: String, slot: u64, serial: String },
    /// Refused (removed) for this reason.
    Refused(Refusal),
}

/// One SDS stream's view: the names Envoy subscribed to on it and what
/// each was last sent. Pure state (no I/O): [`SdsStream::on_request`] and
/// [`SdsStream::reconcile`] return the response to send, if any. Dropping
/// it releases its leaves.
#[derive(Debug)]
pub struct SdsStream {
    id: u64,
    interceptor: Arc<Interceptor>,
    names: HashMap<String, Sent>,
    responses: u64,
}

/// What to send for one name.
enum Change {
    Put(Box<Resource>),
    Remove,
}

impl SdsStream {
    pub fn new(id: u64, interceptor: Arc<Interceptor>) -> Self {
        Self {
            id,
            interceptor,
            names: HashMap::new(),
            responses: 0,
        }
    }

    /// The names subscribed on this stream.
    pub fn subscribed(&self) -> impl Iterator<Item = &str> {
        self.names.keys().map(String::as_str)
    }

    /// Handle one request from Envoy: an ACK or NACK of a response, and
    /// names subscribed or unsubscribed. A wrong resource type ends the
    /// stream.
    pub fn on_request(&mut self, req: DeltaDiscoveryRequest) -> Result<Option<DeltaDiscoveryResponse>, Status> {
        if !req.type_url.is_empty() && req.type_url != SECRET_TYPE_URL {
            tracing::warn!(type_url = %req.type_url, "SDS: a request for another resource type; the stream is closed");
            return Err(Status::invalid_argument(format!(
                "this server serves only {SECRET_TYPE_URL}, not {}",
                req.type_url
            )));
        }
        if let Some(err) = &req.error_detail {
            tracing::warn!(stream = self.id, nonce = %req.response_nonce, code = err.code, error = %err.message, "SDS: Envoy rejected a response (NACK)");
        }
        for name in &req.resource_names_unsubscribe {
            if let Some(sent) = self.names.remove(name) {
                self.release(&sent);
                tracing::debug!(stream = self.id, name = %name.escape_debug(), "SDS: unsubscribed");
            }
        }
        let mut changes = Vec::new();
        for name in &req.resource_names_subscribe {
            if name == "*" {
                // A wildcard would be every name there is: none is served.
                tracing::warn!(
                    stream = self.id,
                    "SDS: a wildcard subscription is not served; ask for names"
                );
                continue;
            }
            // Asked (again): answer afresh.
            let change = match self.names.get(name) {
                Some(Sent::Leaf { key, slot, .. }) => self
                    .interceptor
                    .current(key, *slot)
                    .map(|leaf| Change::Put(Box::new(resource(name, &leaf)))),
                _ => None,
            };
            let change = match change {
                Some(c) => c,
                None => {
                    if let Some(old) = self.names.remove(name) {
                        self.release(&old);
                    }
                    if self.names.len() >= self.interceptor.config().max_names.max(1) {
                        self.refuse(name, Refusal::Capacity);
                        changes.push((name.clone(), Change::Remove));
                        continue;
                    }
                    self.evaluate(name)
                }
            };
            changes.push((name.clone(), change));
        }
        Ok(self.response(changes))
    }

    /// Check every subscribed name again (the policies changed, or a leaf
    /// was renewed or evicted); what changed for Envoy.
    pub fn reconcile(&mut self) -> Option<DeltaDiscoveryResponse> {
        let names: Vec<String> = self.names.keys().cloned().collect();
        let mut changes = Vec::new();
        for name in names {
            let Some(sent) = self.names.get(&name).cloned() else {
                continue;
            };
            let decision = self.interceptor.decide(&name);
            match (sent, decision) {
                (Sent::Leaf { key, slot, serial }, Ok(_)) => match self.interceptor.current(&key, slot) {
                    // Renewed: push the new leaf.
                    Some(leaf) if leaf.serial != serial => {
                        self.names.insert(
                            name.clone(),
                            Sent::Leaf {
                                key,
                                slot,
                                serial: leaf.serial.clone(),
                            },
                        );
                        changes.push((name.clone(), Change::Put(Box::new(resource(&name, &leaf)))));
                    }
                    Some(_) => {}
                    // Evicted (or expired unrenewed): removed; Envoy asks
                    // again at its next handshake for the name.
                    None => {
                        self.refuse(&name, Refusal::Evicted);
                        changes.push((name, Change::Remove));
                    }
                },
                (Sent::Leaf { key, slot, .. }, Err(why)) => {
                    self.interceptor.release(&key, slot);
                    self.refuse(&name, why);
                    changes.push((name, Change::Remove));
                }
                // Refused then, intercepted now: its leaf. An evicted name
                // waits for Envoy to ask again (so that a full cache does
                // not churn).
                (Sent::Refused(old), Ok(_)) if old != Refusal::Evicted => {
                    let change = self.evaluate(&name);
                    changes.push((name, change));
                }
                (Sent::Refused(_), _) => {}
            }
        }
        self.response(changes)
    }

    /// Decide `name` afresh and record what it is sent.
    fn evaluate(&mut self, name: &str) -> Change {
        match self.interceptor.decide(name) {
            Ok(subject) => self.issue(name, &subject),
            Err(why) => {
                self.refuse(name, why);
                Change::Remove
            }
        }
    }

    fn issue(&mut self, name: &str, subject: &LeafSubject) -> Change {
        match self.interceptor.acquire(subject) {
            Ok((slot, leaf)) => {
                self.names.insert(
                    name.to_string(),
                    Sent::Leaf {
                        key: subject.key(),
                        slot,
                        serial: leaf.serial.clone(),
                    },
                );
                Change::Put(Box::new(resource(name, &leaf)))
            }
            Err(e) => {
                // Errors are always logged: they are the sidecar's, not the agent's.
                tracing::error!(stream = self.id, name = %name.escape_debug(), error = %e, "TLS interception refused: no leaf could be issued; the handshake fails");
                self.interceptor.metrics().intercept_refused(Refusal::Error.label());
                self.names.insert(name.to_string(), Sent::Refused(Refusal::Error));
                Change::Remove
            }
        }
    }

    fn refuse(&mut self, name: &str, why: Refusal) {
        if why == Refusal::Evicted {
            // Counted (and logged) as an eviction where it happened.
            tracing::debug!(stream = self.id, name = %name.escape_debug(), "SDS: an evicted leaf is removed");
            self.names.insert(name.to_string(), Sent::Refused(why));
            return;
        }
        if self.interceptor.may_log_refusal() {
            tracing::info!(
                stream = self.id,
                name = %name.escape_debug(),
                reason = why.label(),
                detail = why.reason(),
                "TLS interception refused: the name is removed over SDS and the handshake fails"
            );
        }
        self.interceptor.metrics().intercept_refused(why.label());
        // A name over the stream's bound is not kept.
        if why != Refusal::Capacity {
            self.names.insert(name.to_string(), Sent::Refused(why));
        }
    }

    fn release(&self, sent: &Sent) {
        if let Sent::Leaf { key, slot, .. } = sent {
            self.interceptor.release(key, *slot);
        }
    }

    fn response(&mut self, changes: Vec<(String, Change)>) -> Option<DeltaDiscoveryResponse> {
        if changes.is_empty() {
            return None;
        }
        self.responses += 1;
        let mut out = DeltaDiscoveryResponse {
            system_version_info: format!("{}-{}", self.id, self.responses),
            type_url: SECRET_TYPE_URL.to_string(),
            nonce: format!("{}-{}", self.id, self.responses),
            ..DeltaDiscoveryResponse::default()
        };
        for (name, change) in changes {
            match change {
                Change::Put(r) => out.resources.push(*r),
                Change::Remove => out.removed_resources.push(name),
            }
        }
        Some(out)
    }
}

impl Drop for SdsStream {
    fn drop(&mut self) {
        for sent in self.names.values() {
            self.release(sent);
        }
    }
}

/// The SDS resource for `name` (the name as Envoy asked for it) holding `leaf`.
fn resource(name: &str, leaf: &Leaf) -> Resource {
    let inline = |s: &str| DataSource {
        specifier: Some(data_source::Specifier::InlineString(s.to_string())),
        ..DataSource::default()
    };
    let secret = Secret {
        name: name.to_string(),
        r#type: Some(secret::Type::TlsCertificate(TlsCertificate {
            certificate_chain: Some(inline(&leaf.chain_pem)),
            private_key: Some(inline(leaf.key_pem())),
            ..TlsCertificate::default()
        })),
    };
    Resource {
        name: name.to_string(),
        version: leaf.serial.clone(),
        resource: Some(Any {
            type_url: SECRET_TYPE_URL.to_string(),
            value: secret.encode_to_vec(),
        }),
        ..Resource::default()
    }
}

/// The gRPC service.
#[derive(Debug, Clone)]
pub struct Sds {
    interceptor: Arc<Interceptor>,
    streams: Arc<std::sync::atomic::AtomicU64>,
}

impl Sds {
    pub fn new(interceptor: Arc<Interceptor>) -> Self {
        Self {
            interceptor,
            streams: Arc::default(),
        }
    }

    pub fn server(self) -> SecretDiscoveryServiceServer<Self> {
        SecretDiscoveryServiceServer::new(self)
    }
}

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl SecretDiscoveryService for Sds {
    type DeltaSecretsStream = ResponseStream<DeltaDiscoveryResponse>;
    type StreamSecretsStream = ResponseStream<DiscoveryResponse>;

    async fn delta_secrets(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaSecretsStream>, Status> {
        let mut inbound = request.into_inner();
        let id = self.streams.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        let mut changes = self.interceptor.subscribe_changes();
        let mut stream = SdsStream::new(id, self.interceptor.clone());
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tracing::debug!(stream = id, "SDS: stream opened");
        tokio::spawn(async move {
            loop {
                let out = tokio::select! {
                    msg = inbound.message() => match msg {
                        Ok(Some(req)) => match stream.on_request(req) {
                            Ok(out) => out.map(Ok),
                            Err(status) => Some(Err(status)),
                        },
                        Ok(None) => break,
                        Err(e) => {
                            tracing::debug!(stream = id, error = %e, "SDS: stream ended");
                            break;
                        }
                    },
                    changed = changes.changed() => match changed {
                        Ok(()) => stream.reconcile().map(Ok),
                        Err(_) => break,
                    },
                    () = tx.closed() => break,
                };
                if let Some(out) = out {
                    let end = out.is_err();
                    if tx.send(out).await.is_err() || end {
                        break;
                    }
                }
            }
            tracing::debug!(
                stream = id,
                names = stream.names.len(),
                "SDS: stream closed; its leaves are released"
            );
            drop(stream);
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }

    async fn stream_secrets(
        &self,
        _request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamSecretsStream>, Status> {
        Err(Status::unimplemented(
            "state-of-the-world SDS is not served: configure api_type DELTA_GRPC",
        ))
    }

    async fn fetch_secrets(&self, _request: Request<DiscoveryRequest>) -> Result<Response<DiscoveryResponse>, Status> {
        Err(Status::unimplemented(
            "fetching secrets is not served: configure api_type DELTA_GRPC",
        ))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]
    use super::*;
    use crate::intercept::{DEFAULT_CA_LIFETIME, InterceptConfig, NO_SNI_NAME, PodCa};
    use mandate_api::crd::AgentPolicySpec;
    use mandate_policy::engine::{LoadedPolicy, PolicySet, SharedPolicies};
    use std::time::Duration;

    fn set(egress: serde_json::Value) -> PolicySet {
        let spec: AgentPolicySpec = serde_json::from_value(serde_json::json!({
            "modules": [{"name": "authz.rego", "rego": "package mandate.authz\nimport rego.v1\ndefault decision := false\n"}],
            "egress": egress,
        }))
        .unwrap();
        PolicySet {
            policies: vec![LoadedPolicy::compile("p".into(), &spec).unwrap()],
            ..PolicySet::default()
        }
    }

    fn setup(egress: serde_json::Value, max_names: usize, lifetime: Duration) -> (SharedPolicies, Arc<Interceptor>) {
        let policies: SharedPolicies = Arc::new(arc_swap::ArcSwap::from_pointee(set(egress)));
        let i = Arc::new(Interceptor::new(
            PodCa::generate(Some("t"), DEFAULT_CA_LIFETIME).unwrap(),
            InterceptConfig {
                leaf_lifetime: lifetime,
                max_names,
            },
            policies.clone(),
            Arc::default(),
        ));
        (policies, i)
    }

    fn subscribe(names: &[&str]) -> DeltaDiscoveryRequest {
        DeltaDiscoveryRequest {
            type_url: SECRET_TYPE_URL.into(),
            resource_names_subscribe: names.iter().map(|n| n.to_string()).collect(),
            ..DeltaDiscoveryRequest::default()
        }
    }

    fn unsubscribe(names: &[&str]) -> DeltaDiscoveryRequest {
        DeltaDiscoveryRequest {
            type_url: SECRET_TYPE_URL.into(),
            resource_names_unsubscribe: names.iter().map(|n| n.to_string()).collect(),
            ..DeltaDiscoveryRequest::default()
        }
    }

    fn put(r: &DeltaDiscoveryResponse) -> Vec<(String, Secret)> {
        r.resources
            .iter()
            .map(|res| {
                let any = res.resource.as_ref().unwrap();
                assert_eq!(any.type_url, SECRET_TYPE_URL);
                assert!(!res.version.is_empty());
                (res.name.clone(), Secret::decode(any.value.as_slice()).unwrap())
            })
            .collect()
    }

    fn chain(s: &Secret) -> String {
        match &s.r#type {
            Some(secret::Type::TlsCertificate(t)) => {
                let key = t.private_key.as_ref().unwrap();
                assert!(
                    matches!(&key.specifier, Some(data_source::Specifier::InlineString(k)) if k.contains("PRIVATE KEY"))
                );
                match &t.certificate_chain.as_ref().unwrap().specifier {
                    Some(data_source::Specifier::InlineString(c)) => c.clone(),
                    other => panic!("{other:?}"),
                }
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn intercepted_names_get_a_secret_everything_else_is_removed() {
        let (_, i) = setup(
            serde_json::json!([
                {"host": "api.example.com", "port": 443},
                {"host": "pinned.example", "port": 443, "tlsMode": "Passthrough"},
            ]),
            16,
            Duration::from_secs(3600),
        );
        let mut s = SdsStream::new(1, i.clone());
        let r = s
            .on_request(subscribe(&[
                "api.example.com",
                "pinned.example",
                "undeclared.example",
                NO_SNI_NAME,
                "*.example.com",
                "*",
            ]))
            .unwrap()
            .unwrap();
        let secrets = put(&r);
        assert_eq!(secrets.len(), 1);
        assert_eq!(secrets[0].0, "api.example.com");
        assert_eq!(secrets[0].1.name, "api.example.com");
        assert_eq!(chain(&secrets[0].1).matches("BEGIN CERTIFICATE").count(), 2);
        assert!(chain(&secrets[0].1).ends_with(i.ca().pem()));
        let mut removed = r.removed_resources.clone();
        removed.sort();
        assert_eq!(
            removed,
            [
                "*.example.com",
                "mandate-no-sni",
                "pinned.example",
                "undeclared.example"
            ]
        );
        assert_eq!(r.type_url, SECRET_TYPE_URL);
        assert!(!r.nonce.is_empty());
        // An ACK changes nothing.
        let ack = DeltaDiscoveryRequest {
            type_url: SECRET_TYPE_URL.into(),
            response_nonce: r.nonce.clone(),
            ..DeltaDiscoveryRequest::default()
        };
        assert!(s.on_request(ack).unwrap().is_none());
        assert_eq!(i.live(), 1);
        // Another resource type ends the stream.
        let mut wrong = subscribe(&["x"]);
        wrong.type_url = "type.googleapis.com/envoy.config.cluster.v3.Cluster".into();
        assert_eq!(s.on_request(wrong).unwrap_err().code(), tonic::Code::InvalidArgument);
        // Closing the stream releases its leaf.
        drop(s);
        assert_eq!(i.live(), 0);
    }

    #[test]
    fn policy_changes_remove_and_add_subscribed_names() {
        let (policies, i) = setup(
            serde_json::json!([{"host": "a.example", "port": 443}]),
            16,
            Duration::from_secs(3600),
        );
        let mut s = SdsStream::new(1, i.clone());
        let r = s.on_request(subscribe(&["a.example", "b.example"])).unwrap().unwrap();
        assert_eq!(put(&r).len(), 1);
        assert_eq!(r.removed_resources, ["b.example"]);
        assert!(s.reconcile().is_none(), "nothing changed");
        // Now b is intercepted and a is not.
        policies.store(Arc::new(set(serde_json::json!([{"host": "b.example", "port": 443}]))));
        let r = s.reconcile().unwrap();
        assert_eq!(
            put(&r).iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
            ["b.example"]
        );
        assert_eq!(r.removed_resources, ["a.example"]);
        assert_eq!(i.live(), 1, "a's leaf was released");
        // Passthrough wins over an intercept declared by another policy.
        let mut both = set(serde_json::json!([{"host": "b.example", "port": 443}]));
        both.policies
            .extend(set(serde_json::json!([{"host": "*.example", "port": 443, "tlsMode": "Passthrough"}])).policies);
        policies.store(Arc::new(both));
        let r = s.reconcile().unwrap();
        assert_eq!(r.removed_resources, ["b.example"]);
        assert!(r.resources.is_empty());
        // Unsubscribing forgets names: nothing to push later.
        s.on_request(unsubscribe(&["a.example", "b.example"])).unwrap();
        policies.store(Arc::new(set(serde_json::json!([{"host": "*.example", "port": 443}]))));
        assert!(s.reconcile().is_none());
        assert_eq!(s.subscribed().count(), 0);
    }

    #[test]
    fn evicted_leaves_are_removed_and_renewed_ones_pushed() {
        let (_, i) = setup(
            serde_json::json!([{"host": "*.example", "port": 443}]),
            1,
            Duration::from_millis(300),
        );
        let mut s1 = SdsStream::new(1, i.clone());
        let mut s2 = SdsStream::new(2, i.clone());
        let first = put(&s1.on_request(subscribe(&["a.example"])).unwrap().unwrap());
        // Another stream's name evicts a (the bound is 1).
        assert_eq!(
            put(&s2.on_request(subscribe(&["b.example"])).unwrap().unwrap()).len(),
            1
        );
        let r = s1.reconcile().unwrap();
        assert_eq!(r.removed_resources, ["a.example"]);
        assert!(
            s1.reconcile().is_none(),
            "an evicted name is not re-issued until asked again"
        );
        // Asked again: a new leaf (evicting b, which s2 then removes).
        let again = put(&s1.on_request(subscribe(&["a.example"])).unwrap().unwrap());
        assert_ne!(chain(&first[0].1), chain(&again[0].1));
        assert_eq!(s2.reconcile().unwrap().removed_resources, ["b.example"]);
        // Renewal at half-life pushes the new leaf.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !i.renew_due() {
            assert!(std::time::Instant::now() < deadline, "never renewed");
            std::thread::sleep(Duration::from_millis(20));
        }
        let renewed = put(&s1.reconcile().unwrap());
        assert_eq!(renewed[0].0, "a.example");
        assert_ne!(chain(&renewed[0].1), chain(&again[0].1));
    }

    #[test]
    fn a_stream_keeps_no_more_names_than_the_bound() {
        let (_, i) = setup(
            serde_json::json!([{"host": "*.example", "port": 443}]),
            2,
            Duration::from_secs(3600),
        );
        let mut s = SdsStream::new(1, i);
        let r = s
            .on_request(subscribe(&["a.example", "b.example", "c.example"]))
            .unwrap()
            .unwrap();
        assert_eq!(r.resources.len(), 2);
        assert_eq!(r.removed_resources, ["c.example"]);
        assert_eq!(s.subscribed().count(), 2);
    }
}
