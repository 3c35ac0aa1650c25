//! A SPIFFE Workload API server for tests, standing in for a SPIRE agent
//! (SPIRE cannot be had on these machines): tonic on a unix socket,
//! refusing every call without the `workload.spiffe.io: true` metadata (as
//! SPIRE does), serving X.509-SVIDs minted with rcgen by a CA of its own,
//! and pushing each new SVID (a rotation) to every open stream.
//!
//! This is the one fake in Mandate's tests; what it stands in for is named
//! in the README.

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use mandate_proto::spiffe_workload::spiffe_workload_api_server::{SpiffeWorkloadApi, SpiffeWorkloadApiServer};
use mandate_proto::spiffe_workload::{
    X509BundlesRequest, X509BundlesResponse, X509svid, X509svidRequest, X509svidResponse,
};
use rcgen::{
    BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
    SerialNumber,
};
use tokio::sync::watch;
use tonic::{Request, Response, Status};

/// The trust domain's CA (what a SPIRE server holds).
#[derive(Debug)]
pub struct TestCa {
    pub trust_domain: String,
    key: KeyPair,
    params: CertificateParams,
    der: Vec<u8>,
}

/// One minted X.509-SVID.
#[derive(Debug, Clone)]
pub struct Minted {
    pub spiffe_id: String,
    /// Leaf DER.
    pub cert_der: Vec<u8>,
    /// PKCS#8 DER.
    pub key_der: Vec<u8>,
    /// Hex, lower case, no separators.
    pub serial: String,
    pub not_after: SystemTime,
}

fn offset(d: Duration) -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc() + d
}

impl TestCa {
    pub fn new(trust_domain: &str) -> Result<Self> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params
            .subject_alt_names
            .push(SanType::URI(format!("spiffe://{trust_domain}").try_into()?));
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("test SPIRE CA {trust_domain}"));
        params.not_before = time::OffsetDateTime::now_utc() - time::Duration::minutes(5);
        params.not_after = offset(Duration::from_secs(86_400));
        let der = params.self_signed(&key)?.der().to_vec();
        Ok(Self {
            trust_domain: trust_domain.into(),
            key,
            params,
            der,
        })
    }

    /// The bundle: the CA certificate, DER.
    pub fn bundle_der(&self) -> Vec<u8> {
        self.der.clone()
    }

    /// An X.509-SVID for `spiffe_id`, valid from a little before now for `ttl`.
    pub fn mint(&self, spiffe_id: &str, ttl: Duration) -> Result<Minted> {
        let key = KeyPair::generate()?;
        let mut p = CertificateParams::default();
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        p.subject_alt_names.push(SanType::URI(spiffe_id.try_into()?));
        let serial: [u8; 16] = rand::random();
        // Positive, no leading zero byte (DER integer as x509-parser prints it).
        let mut serial = serial.to_vec();
        if let Some(first) = serial.first_mut() {
            *first = (*first & 0x7f) | 0x10;
        }
        p.serial_number = Some(SerialNumber::from_slice(&serial));
        p.not_before = time::OffsetDateTime::now_utc() - time::Duration::seconds(30);
        let not_after = offset(ttl);
        p.not_after = not_after;
        let issuer = Issuer::new(self.params.clone(), &self.key);
        let cert = p.signed_by(&key, &issuer)?;
        Ok(Minted {
            spiffe_id: spiffe_id.into(),
            cert_der: cert.der().to_vec(),
            key_der: key.serialize_der(),
            serial: serial.iter().map(|b| format!("{b:02x}")).collect(),
            not_after: SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(not_after.unix_timestamp())?),
        })
    }

    /// The Workload API's answer carrying `svids` (the first is the default).
    pub fn response(&self, svids: &[&Minted]) -> X509svidResponse {
        X509svidResponse {
            svids: svids
                .iter()
                .map(|m| X509svid {
                    spiffe_id: m.spiffe_id.clone(),
                    x509_svid: m.cert_der.clone(),
                    x509_svid_key: m.key_der.clone(),
                    bundle: self.bundle_der(),
                    hint: String::new(),
                })
                .collect(),
            ..X509svidResponse::default()
        }
    }
}

#[derive(Clone)]
struct Service {
    current: watch::Receiver<Option<X509svidResponse>>,
    stopped: watch::Receiver<bool>,
    refused: Arc<AtomicUsize>,
    streams: Arc<AtomicUsize>,
}

type Stream<T> = Pin<Box<dyn futures::Stream<Item = Result<T, Status>> + Send>>;

impl Service {
    fn check(&self, metadata: &tonic::metadata::MetadataMap) -> Result<(), Status> {
        if metadata.get("workload.spiffe.io").and_then(|v| v.to_str().ok()) == Some("true") {
            Ok(())
        } else {
            self.refused.fetch_add(1, Ordering::SeqCst);
            Err(Status::invalid_argument("security header missing from request"))
        }
    }

    /// Each value of `current` (from the one held now), mapped by `f`, until stopped.
    fn stream<T: Send + 'static>(&self, f: impl Fn(&X509svidResponse) -> T + Send + 'static) -> Stream<T> {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let (mut current, mut stopped) = (self.current.clone(), self.stopped.clone());
        let streams = self.streams.clone();
        streams.fetch_add(1, Ordering::SeqCst);
        tokio::spawn(async move {
            current.mark_changed();
            loop {
                tokio::select! {
                    changed = current.changed() => {
                        if changed.is_err() { break }
                        let now = current.borrow_and_update().clone();
                        // No SVID for the caller yet: say nothing (as an agent
                        // waiting for its registration would).
                        if let Some(resp) = now
                            && tx.send(Ok(f(&resp))).await.is_err()
                        {
                            break;
                        }
                    }
                    () = async { let _ = stopped.wait_for(|s| *s).await; } => {
                        let _ = tx.send(Err(Status::unavailable("the Workload API is shutting down"))).await;
                        break;
                    }
                    () = tx.closed() => break,
                }
            }
            streams.fetch_sub(1, Ordering::SeqCst);
        });
        Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
    }
}

#[tonic::async_trait]
impl SpiffeWorkloadApi for Service {
    type FetchX509SVIDStream = Stream<X509svidResponse>;
    type FetchX509BundlesStream = Stream<X509BundlesResponse>;

    async fn fetch_x509svid(
        &self,
        request: Request<X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        self.check(request.metadata())?;
        Ok(Response::new(self.stream(Clone::clone)))
    }

    async fn fetch_x509_bundles(
        &self,
        request: Request<X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        self.check(request.metadata())?;
        Ok(Response::new(self.stream(|r| {
            X509BundlesResponse {
                crl: vec![],
                bundles: r
                    .svids
                    .iter()
                    .filter_map(|s| {
                        let td = s.spiffe_id.strip_prefix("spiffe://")?.split('/').next()?;
                        Some((td.to_string(), s.bundle.clone()))
                    })
                    .collect(),
            }
        })))
    }
}

/// A running test Workload API.
#[derive(Debug)]
pub struct WorkloadApi {
    pub socket: PathBuf,
    current: watch::Sender<Option<X509svidResponse>>,
    stop: watch::Sender<bool>,
    refused: Arc<AtomicUsize>,
    streams: Arc<AtomicUsize>,
    server: tokio::task::JoinHandle<()>,
}

impl WorkloadApi {
    /// Serve on a unix socket `name` in `dir`, with no SVID yet.
    pub async fn start(dir: &Path, name: &str) -> Result<Self> {
        let socket = dir.join(name);
        let _ = std::fs::remove_file(&socket);
        let listener =
            tokio::net::UnixListener::bind(&socket).with_context(|| format!("binding {}", socket.display()))?;
        let (current, current_rx) = watch::channel(None);
        let (stop, stopped) = watch::channel(false);
        let refused = Arc::new(AtomicUsize::new(0));
        let streams = Arc::new(AtomicUsize::new(0));
        let service = Service {
            current: current_rx,
            stopped,
            refused: refused.clone(),
            streams: streams.clone(),
        };
        let server = tokio::spawn(async move {
            let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
            let _ = tonic::transport::Server::builder()
                .add_service(SpiffeWorkloadApiServer::new(service))
                .serve_with_incoming(incoming)
                .await;
        });
        Ok(Self {
            socket,
            current,
            stop,
            refused,
            streams,
            server,
        })
    }

    /// `unix:///...`, for `SPIFFE_ENDPOINT_SOCKET`.
    pub fn endpoint(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    /// Serve `resp` from now on, pushing it to every open stream (rotation).
    pub fn set(&self, resp: X509svidResponse) {
        self.current.send_replace(Some(resp));
    }

    /// Calls refused for want of the `workload.spiffe.io` metadata.
    pub fn refused(&self) -> usize {
        self.refused.load(Ordering::SeqCst)
    }

    /// FetchX509SVID/FetchX509Bundles streams open now.
    pub fn open_streams(&self) -> usize {
        self.streams.load(Ordering::SeqCst)
    }

    /// Stop: open streams end with UNAVAILABLE, the socket goes away, and
    /// no new connection is accepted.
    pub fn stop(&self) {
        self.stop.send_replace(true);
        self.server.abort();
        let _ = std::fs::remove_file(&self.socket);
    }
}

impl Drop for WorkloadApi {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Call FetchX509SVID on `socket` directly (not through the `spiffe`
/// crate), with or without the `workload.spiffe.io` metadata: the first
/// response, or the status the server answered with.
pub async fn fetch_raw(socket: &Path, with_metadata: bool) -> Result<Result<X509svidResponse, Status>> {
    let path = socket.to_path_buf();
    let channel = tonic::transport::Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move {
                let s = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
            }
        }))
        .await?;
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await?;
    let mut req = Request::new(X509svidRequest {});
    if with_metadata {
        req.metadata_mut().insert(
            "workload.spiffe.io",
            tonic::metadata::MetadataValue::from_static("true"),
        );
    }
    let path = tonic::codegen::http::uri::PathAndQuery::from_static("/SpiffeWorkloadAPI/FetchX509SVID");
    let codec = tonic_prost::ProstCodec::<X509svidRequest, X509svidResponse>::default();
    let resp = match grpc.server_streaming(req, path, codec).await {
        Ok(r) => r,
        Err(status) => return Ok(Err(status)),
    };
    let first = tokio::time::timeout(Duration::from_secs(10), resp.into_inner().message())
        .await
        .context("no first response within 10s")?;
    Ok(match first {
        Ok(Some(m)) => Ok(m),
        Ok(None) => Err(Status::unknown("the stream ended with no response")),
        Err(status) => Err(status),
    })
}
