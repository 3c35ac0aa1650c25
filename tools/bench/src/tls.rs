//! The interception benchmark's two ends (`hack/bench-intercept.sh`): an
//! HTTPS upstream, and a client that measures HTTPS requests made the way
//! an agent makes them, to a name (SNI and Host), trusting a CA bundle.
//!
//! Requests are sequential (closed loop): what is measured is the latency
//! of one request at a time, from the TCP connect (for a new connection)
//! or from the write (on a warm one) to the last byte of the response.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Bytes;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

/// How the client's requests use connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// A new connection per request, each to a name never used before
    /// (`{n}` in the name is the request's number): the first request to a
    /// new host, leaf minting included when intercepted.
    First,
    /// A new connection per request, always to the same name.
    NewConnection,
    /// One connection, every request on it (after one untimed request).
    Keepalive,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn client_config(ca: &Path) -> Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).with_context(|| format!("reading {}", ca.display()))? {
        roots.add(cert?)?;
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    // No resumption: every new connection pays a full handshake, as a new
    // process of an agent does.
    cfg.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(cfg))
}

type Sender = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

/// A connection to `connect` for `name`, ready for requests: TLS, or plain
/// HTTP when `cfg` is `None`.
async fn open(connect: SocketAddr, name: &str, cfg: Option<&Arc<rustls::ClientConfig>>) -> Result<Sender> {
    let tcp = tokio::net::TcpStream::connect(connect).await?;
    tcp.set_nodelay(true)?;
    let Some(cfg) = cfg else {
        let (sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp)).await?;
        tokio::spawn(conn);
        return Ok(sender);
    };
    let server = ServerName::try_from(name.to_string())?;
    let tls = tokio_rustls::TlsConnector::from(cfg.clone())
        .connect(server, tcp)
        .await
        .with_context(|| format!("TLS handshake for {name}"))?;
    let (sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await?;
    tokio::spawn(conn);
    Ok(sender)
}

async fn get(sender: &mut Sender, name: &str, path: &str) -> Result<()> {
    let req = hyper::Request::get(path).header("host", name).body(Empty::new())?;
    let resp = sender.send_request(req).await?;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    if !status.is_success() {
        bail!(
            "GET https://{name}{path}: HTTP {status}: {}",
            String::from_utf8_lossy(&body).trim()
        );
    }
    Ok(())
}

/// `requests` requests in `mode`; one JSON line of latencies on stdout.
/// Without `ca`, plain HTTP.
pub async fn client(
    connect: SocketAddr,
    name: &str,
    ca: Option<&Path>,
    path: &str,
    requests: u64,
    start: u64,
    mode: Mode,
) -> Result<()> {
    let cfg = ca.map(client_config).transpose()?;
    let cfg = cfg.as_ref();
    let mut lat = Vec::with_capacity(usize::try_from(requests).unwrap_or(0));
    match mode {
        Mode::First | Mode::NewConnection => {
            for i in 0..requests {
                let name = name.replace("{n}", &(start + i).to_string());
                let t = Instant::now();
                let mut s = open(connect, &name, cfg).await?;
                get(&mut s, &name, path).await?;
                lat.push(t.elapsed().as_nanos() as u64);
            }
        }
        Mode::Keepalive => {
            let name = name.replace("{n}", &start.to_string());
            let mut s = open(connect, &name, cfg).await?;
            get(&mut s, &name, path).await?;
            for _ in 0..requests {
                let t = Instant::now();
                get(&mut s, &name, path).await?;
                lat.push(t.elapsed().as_nanos() as u64);
            }
        }
    }
    println!("{{\"mode\":\"tls\",\"errors\":0,{}}}", crate::percentiles(lat));
    Ok(())
}

fn ok_service() -> impl hyper::service::Service<
    hyper::Request<hyper::body::Incoming>,
    Response = hyper::Response<Full<Bytes>>,
    Error = std::convert::Infallible,
    Future = impl Future<Output = Result<hyper::Response<Full<Bytes>>, std::convert::Infallible>> + Send,
> + Clone {
    hyper::service::service_fn(|_req: hyper::Request<hyper::body::Incoming>| async {
        Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(Bytes::from_static(b"ok"))))
    })
}

/// Serve plain HTTP on `listen`: 200 "ok" to everything.
async fn serve_plain(listen: SocketAddr) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    loop {
        let (tcp, _) = listener.accept().await?;
        let _ = tcp.set_nodelay(true);
        tokio::spawn(async move {
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(tcp), ok_service())
                .await;
        });
    }
}

/// Serve HTTPS on `listen` with `cert`/`key` (PEM), and plain HTTP on
/// `plain` if given: 200 "ok" to everything.
pub async fn serve(listen: SocketAddr, cert: &Path, key: &Path, plain: Option<SocketAddr>) -> Result<()> {
    if let Some(plain) = plain {
        tokio::spawn(async move {
            if let Err(e) = serve_plain(plain).await {
                eprintln!("plain HTTP on {plain}: {e:#}");
            }
        });
    }
    let certs = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("reading {}", cert.display()))?
        .collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_file(key).with_context(|| format!("reading {}", key.display()))?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    loop {
        let (tcp, _) = listener.accept().await?;
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let Ok(tls) = acceptor.accept(tcp).await else { return };
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(tls), ok_service())
                .await;
        });
    }
}
