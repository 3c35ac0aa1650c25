//! `mandate-testbin`: what test pods run. One small binary, packed into an
//! image by `hack/image.sh`, with three jobs:
//!
//! - `serve`: an HTTP server answering every request with JSON naming itself
//!   and echoing the request (method, path, headers), and logging each one;
//! - `get`: an HTTP/1.1 client that prints the status, response headers and
//!   body, and exits non-zero unless the status is 2xx;
//! - `connect`: a TCP connect check that exits non-zero when it fails;
//! - `agent`: a stand-in for an AI agent: an HTTP server whose
//!   `/do?method=M&url=U` makes that request the way agent tools do, through
//!   the proxy in `HTTP_PROXY` when it is set, and answers with the outcome;
//! - `probe`: one bypass attempt of a hostile agent (TCP, UDP, DNS or HTTP,
//!   always direct: no proxy variable is read), printing one JSON line
//!   `{"probe", "target", "outcome", ...}` and exiting with a code per
//!   outcome ([`Outcome::code`]): 0 when the other end answered, 10 when
//!   the attempt was refused or denied, 11 on a timeout, 12 for other DNS
//!   answers (SERVFAIL).
//!
//! `serve` can also echo TCP (`--tcp-echo`), receive UDP (`--udp`) and
//! answer DNS (`--dns`, every A query with `--dns-answer`), logging every
//! arrival, so a test can tell that nothing it expected refused arrived.
//!
//! (The busybox image's `wget` cannot be used: a static glibc busybox crashes
//! resolving even numeric addresses without NSS libraries.)

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use axum::extract::{ConnectInfo, Request};
use axum::response::Json;
use clap::{Parser, Subcommand};
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

#[derive(Debug, Parser)]
#[command(
    name = "mandate-testbin",
    version,
    about = "HTTP echo server and client for Mandate's cluster tests"
)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Answer every request with JSON describing it.
    Serve {
        /// Address to listen on.
        #[arg(long, env = "LISTEN", default_value = "0.0.0.0:8080")]
        listen: SocketAddr,
        /// Name to report as `server` in answers (e.g. the pod name).
        #[arg(long, env = "POD_NAME", default_value = "testbin")]
        name: String,
        /// Also echo TCP on this port (the first line read), logging each
        /// connection; repeatable.
        #[arg(long = "tcp-echo")]
        tcp_echo: Vec<u16>,
        /// Also receive UDP on this port, logging and echoing each datagram;
        /// repeatable.
        #[arg(long)]
        udp: Vec<u16>,
        /// Also answer DNS over UDP on this port, logging each query.
        #[arg(long)]
        dns: Option<u16>,
        /// The address every A query is answered with (`--dns`).
        #[arg(long, env = "DNS_ANSWER", default_value = "192.0.2.1")]
        dns_answer: std::net::Ipv4Addr,
    },
    /// GET a URL; print status, headers and body; fail unless 2xx.
    Get {
        url: String,
        /// Extra request header, `name: value`; repeatable.
        #[arg(long = "header", short = 'H')]
        headers: Vec<String>,
        /// Give up on one attempt after this many seconds.
        #[arg(long, default_value_t = 10)]
        timeout: u64,
        /// Retry failed connections (not HTTP errors) for up to this many
        /// seconds, e.g. while kube-proxy programs a new Service.
        #[arg(long, default_value_t = 0)]
        retry_for: u64,
    },
    /// Serve `/do?method=M&url=U[&direct=1]`: make that request (through
    /// `HTTP_PROXY` when set, unless direct) and answer JSON `{status,
    /// headers, body}`, or `{error}`.
    Agent {
        #[arg(long, env = "LISTEN", default_value = "0.0.0.0:8080")]
        listen: SocketAddr,
    },
    /// Open a TCP connection to ADDR (ip:port); fail if that is not possible.
    Connect {
        addr: SocketAddr,
        #[arg(long, default_value_t = 5)]
        timeout: u64,
    },
    /// One direct attempt (no proxy), its outcome as a JSON line and the exit code.
    Probe {
        #[command(subcommand)]
        probe: Probe,
        /// Give up after this many seconds (each step: connect, answer).
        #[arg(long, global = true, default_value_t = 5)]
        timeout: u64,
    },
}

#[derive(Debug, Subcommand)]
enum Probe {
    /// Connect, send a line, and wait for bytes back.
    Tcp { addr: SocketAddr },
    /// Send one datagram and wait for one back.
    Udp { addr: SocketAddr },
    /// Ask SERVER (ip, port 53 unless given) for NAME.
    Dns {
        name: String,
        server: String,
        /// The query type: A, AAAA, TXT...
        #[arg(long = "type", default_value = "A")]
        qtype: String,
        /// Over TCP rather than UDP.
        #[arg(long)]
        tcp: bool,
    },
    /// An HTTP/1.1 request, connected to the URL's host and port.
    Http {
        url: String,
        /// The Host header to send instead of the URL's.
        #[arg(long)]
        host: Option<String>,
        #[arg(long, default_value = "GET")]
        method: String,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let result = match args.command {
        Command::Serve {
            listen,
            name,
            tcp_echo,
            udp,
            dns,
            dns_answer,
        } => {
            for port in tcp_echo {
                tokio::spawn(log_error(tcp_echo_server(port)));
            }
            for port in udp {
                tokio::spawn(log_error(udp_server(port)));
            }
            if let Some(port) = dns {
                tokio::spawn(log_error(dns_server(port, dns_answer)));
            }
            serve(listen, name).await
        }
        Command::Probe { probe, timeout } => {
            let (report, outcome) = run_probe(probe, Duration::from_secs(timeout)).await;
            println!("{report}");
            return ExitCode::from(outcome.code());
        }
        Command::Get {
            url,
            headers,
            timeout,
            retry_for,
        } => {
            get(
                &url,
                &headers,
                Duration::from_secs(timeout),
                Duration::from_secs(retry_for),
            )
            .await
        }
        Command::Connect { addr, timeout } => connect(addr, Duration::from_secs(timeout)).await,
        Command::Agent { listen } => agent(listen).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            println!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(listen: SocketAddr, name: String) -> Result<()> {
    let app = axum::Router::new().fallback(move |ConnectInfo(peer): ConnectInfo<SocketAddr>, req: Request| {
        let name = name.clone();
        async move {
            let headers: BTreeMap<String, String> = req
                .headers()
                .iter()
                .map(|(k, v)| (k.to_string(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
                .collect();
            println!("request {} {} from {peer}", req.method(), req.uri());
            Json(serde_json::json!({
                "server": name,
                "method": req.method().as_str(),
                "path": req.uri().path(),
                "headers": headers,
            }))
        }
    });
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    println!("listening on {}", listener.local_addr()?);
    axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>())
        .with_graceful_shutdown(shutdown())
        .await?;
    Ok(())
}

/// SIGTERM (how kubelet stops a pod; PID 1 ignores it without a handler) or SIGINT.
async fn shutdown() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

async fn get(url: &str, headers: &[String], timeout: Duration, retry_for: Duration) -> Result<()> {
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let deadline = tokio::time::Instant::now() + retry_for;
    let resp = loop {
        let mut req = hyper::Request::get(url);
        for h in headers {
            let (k, v) = h
                .split_once(':')
                .with_context(|| format!("header '{h}' is not 'name: value'"))?;
            req = req.header(k.trim(), v.trim());
        }
        let req = req
            .body(Empty::new())
            .with_context(|| format!("bad request for '{url}'"))?;
        let attempt = tokio::time::timeout(timeout, client.request(req))
            .await
            .with_context(|| format!("no answer from {url} within {timeout:?}"))
            .and_then(|r| r.with_context(|| format!("GET {url}")));
        match attempt {
            Ok(resp) => break resp,
            Err(e) if tokio::time::Instant::now() < deadline => {
                println!("retrying: {e:#}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => return Err(e),
        }
    };
    let status = resp.status();
    println!("HTTP {}", status.as_u16());
    for (k, v) in resp.headers() {
        println!("{k}: {}", String::from_utf8_lossy(v.as_bytes()));
    }
    println!();
    let body = tokio::time::timeout(timeout, resp.into_body().collect())
        .await
        .context("timed out reading the body")??
        .to_bytes();
    println!("{}", String::from_utf8_lossy(&body));
    if !status.is_success() {
        bail!("status {status}");
    }
    Ok(())
}

async fn connect(addr: SocketAddr, timeout: Duration) -> Result<()> {
    tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr))
        .await
        .with_context(|| format!("connecting to {addr}: no answer within {timeout:?}"))?
        .with_context(|| format!("connecting to {addr}"))?;
    println!("connected to {addr}");
    Ok(())
}

async fn agent(listen: SocketAddr) -> Result<()> {
    let app = axum::Router::new().route(
        "/do",
        axum::routing::get(
            |axum::extract::Query(q): axum::extract::Query<BTreeMap<String, String>>| async move {
                let method = q.get("method").cloned().unwrap_or_else(|| "GET".into());
                let url = q.get("url").cloned().unwrap_or_default();
                // direct=1: as a process that ignores HTTP_PROXY would.
                let direct = q.get("direct").is_some_and(|d| d == "1");
                let out = match through_proxy(&method, &url, direct).await {
                    Ok((status, headers, body)) => {
                        serde_json::json!({"status": status, "headers": headers, "body": body})
                    }
                    Err(e) => serde_json::json!({"error": format!("{e:#}")}),
                };
                println!("{method} {url} -> {out}");
                Json(out)
            },
        ),
    );
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    println!("agent listening on {}", listener.local_addr()?);
    axum::serve(listener, app).with_graceful_shutdown(shutdown()).await?;
    Ok(())
}

/// One HTTP/1.1 request to an `http://` URL: to the proxy in `HTTP_PROXY`
/// (absolute-form, as curl and agent SDKs send it) when set, else directly.
async fn through_proxy(method: &str, url: &str, direct: bool) -> Result<(u16, BTreeMap<String, String>, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let uri: hyper::Uri = url.parse().with_context(|| format!("bad URL {url}"))?;
    let authority = uri.authority().context("the URL has no host")?.to_string();
    let proxy = std::env::var("HTTP_PROXY")
        .or_else(|_| std::env::var("http_proxy"))
        .ok()
        .filter(|_| !direct);
    let (connect_to, target) = match &proxy {
        Some(p) => {
            let p: hyper::Uri = p.parse().with_context(|| format!("bad HTTP_PROXY {p}"))?;
            (
                p.authority().context("HTTP_PROXY has no host")?.to_string(),
                url.to_string(),
            )
        }
        None => (
            authority.clone(),
            uri.path_and_query()
                .map(|p| p.to_string())
                .unwrap_or_else(|| "/".into()),
        ),
    };
    let io = async {
        let mut s = tokio::net::TcpStream::connect(&connect_to)
            .await
            .with_context(|| format!("connecting to {connect_to}"))?;
        s.write_all(format!("{method} {target} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n").as_bytes())
            .await?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).await?;
        anyhow::Ok(raw)
    };
    let raw = tokio::time::timeout(Duration::from_secs(10), io)
        .await
        .context("no answer within 10s")??;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .context("no status line")?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Ok((status, headers, body.to_string()))
}

/// Run a listener of `serve`; if it cannot start, say so (the test sees
/// the line in the pod's log) and exit: a half-started upstream would make
/// "nothing arrived" meaningless.
async fn log_error(server: impl std::future::Future<Output = Result<()>>) {
    if let Err(e) = server.await {
        println!("error: {e:#}");
        std::process::exit(1);
    }
}

/// Echo the first bytes of each connection back; log every arrival.
async fn tcp_echo_server(port: u16) -> Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind(("0.0.0.0", port))
        .await
        .with_context(|| format!("binding TCP port {port}"))?;
    println!("echoing TCP on {}", listener.local_addr()?);
    loop {
        let (mut s, peer) = listener.accept().await?;
        println!("tcp {port} from {peer}");
        tokio::spawn(async move {
            let mut buf = [0u8; 256];
            if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await {
                let data = buf.get(..n).unwrap_or_default();
                println!("tcp {port} from {peer}: {:?}", String::from_utf8_lossy(data));
                let _ = s.write_all(data).await;
            }
        });
    }
}

/// Log and echo every datagram.
async fn udp_server(port: u16) -> Result<()> {
    let socket = tokio::net::UdpSocket::bind(("0.0.0.0", port))
        .await
        .with_context(|| format!("binding UDP port {port}"))?;
    println!("receiving UDP on {}", socket.local_addr()?);
    let mut buf = [0u8; 1500];
    loop {
        let (n, peer) = socket.recv_from(&mut buf).await?;
        let data = buf.get(..n).unwrap_or_default();
        println!("udp {port} from {peer}: {:?}", String::from_utf8_lossy(data));
        let _ = socket.send_to(data, peer).await;
    }
}

/// A DNS server that answers every A query with `answer` (and every other
/// type with no records), logging each query's name and type.
async fn dns_server(port: u16, answer: std::net::Ipv4Addr) -> Result<()> {
    use hickory_proto::op::{Message, MessageType};
    use hickory_proto::rr::{RData, Record, RecordType, rdata::A};
    let socket = tokio::net::UdpSocket::bind(("0.0.0.0", port))
        .await
        .with_context(|| format!("binding DNS port {port}"))?;
    println!("answering DNS on {} with {answer}", socket.local_addr()?);
    let mut buf = [0u8; 4096];
    loop {
        let (n, peer) = socket.recv_from(&mut buf).await?;
        let Ok(query) = Message::from_vec(buf.get(..n).unwrap_or_default()) else {
            println!("dns: an unparsable packet from {peer}");
            continue;
        };
        let mut reply = query.clone();
        reply
            .set_message_type(MessageType::Response)
            .set_recursion_available(true);
        for q in query.queries() {
            println!("dns {} {} from {peer}", q.name(), q.query_type());
            if q.query_type() == RecordType::A {
                reply.add_answer(Record::from_rdata(q.name().clone(), 5, RData::A(A(answer))));
            }
        }
        if let Ok(bytes) = reply.to_vec() {
            let _ = socket.send_to(&bytes, peer).await;
        }
    }
}

/// What one probe found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// The other end answered: bytes back, a datagram back, an HTTP
    /// response that is not Mandate's denial, a DNS answer with NOERROR.
    Connected,
    /// Refused by the kernel (connection refused, a send not permitted).
    Refused,
    /// Connected, then closed or reset before a byte came back (how a proxy
    /// ends a connection it denies).
    Closed,
    /// Mandate's denial: HTTP 403 with a decision id.
    Denied,
    /// DNS NXDOMAIN.
    NxDomain,
    /// DNS REFUSED.
    DnsRefused,
    /// No answer in time.
    Timeout,
    /// Another DNS answer (SERVFAIL, FORMERR...).
    DnsOther,
    /// The probe itself could not run (a bad argument).
    Error,
}

impl Outcome {
    fn name(self) -> &'static str {
        match self {
            Self::Connected => "connected",
            Self::Refused => "refused",
            Self::Closed => "closed",
            Self::Denied => "denied",
            Self::NxDomain => "nxdomain",
            Self::DnsRefused => "dns-refused",
            Self::Timeout => "timeout",
            Self::DnsOther => "dns-other",
            Self::Error => "error",
        }
    }

    /// The exit code: 0 connected, 10 refused or denied (any way), 11 no
    /// answer in time, 12 another DNS answer, 1 the probe could not run.
    fn code(self) -> u8 {
        match self {
            Self::Connected => 0,
            Self::Refused | Self::Closed | Self::Denied | Self::NxDomain | Self::DnsRefused => 10,
            Self::Timeout => 11,
            Self::DnsOther => 12,
            Self::Error => 1,
        }
    }
}

/// Run one probe: its JSON report and its outcome.
async fn run_probe(probe: Probe, timeout: Duration) -> (serde_json::Value, Outcome) {
    let (kind, target) = match &probe {
        Probe::Tcp { addr } => ("tcp", addr.to_string()),
        Probe::Udp { addr } => ("udp", addr.to_string()),
        Probe::Dns { name, server, .. } => ("dns", format!("{name} @{server}")),
        Probe::Http { url, .. } => ("http", url.clone()),
    };
    let (outcome, mut extra) = match probe {
        Probe::Tcp { addr } => probe_tcp(addr, timeout).await,
        Probe::Udp { addr } => probe_udp(addr, timeout).await,
        Probe::Dns {
            name,
            server,
            qtype,
            tcp,
        } => probe_dns(&name, &server, &qtype, tcp, timeout).await,
        Probe::Http { url, host, method } => probe_http(&url, host.as_deref(), &method, timeout).await,
    };
    if let Some(fields) = extra.as_object_mut() {
        fields.insert("probe".into(), kind.into());
        fields.insert("target".into(), target.into());
        fields.insert("outcome".into(), outcome.name().into());
    }
    (extra, outcome)
}

/// The outcome of a failed socket call.
fn io_outcome(e: &std::io::Error) -> Outcome {
    use std::io::ErrorKind::*;
    match e.kind() {
        ConnectionRefused | PermissionDenied | ConnectionReset | ConnectionAborted | BrokenPipe | UnexpectedEof => {
            Outcome::Refused
        }
        TimedOut => Outcome::Timeout,
        _ => Outcome::Error,
    }
}

fn detail(outcome: Outcome, text: impl std::fmt::Display) -> (Outcome, serde_json::Value) {
    (outcome, serde_json::json!({"detail": text.to_string()}))
}

async fn probe_tcp(addr: SocketAddr, timeout: Duration) -> (Outcome, serde_json::Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr)).await {
        Err(_) => return detail(Outcome::Timeout, "no connection in time"),
        Ok(Err(e)) => return detail(io_outcome(&e), format!("connect: {e}")),
        Ok(Ok(s)) => s,
    };
    if let Err(e) = s.write_all(b"mandate-probe\n").await {
        return detail(Outcome::Closed, format!("connected; write: {e}"));
    }
    let mut buf = [0u8; 256];
    match tokio::time::timeout(timeout, s.read(&mut buf)).await {
        Err(_) => detail(Outcome::Timeout, "connected; nothing back in time"),
        Ok(Ok(0)) => detail(Outcome::Closed, "connected; closed with nothing back"),
        Ok(Err(e)) => detail(Outcome::Closed, format!("connected; read: {e}")),
        Ok(Ok(n)) => detail(
            Outcome::Connected,
            format!("got {:?}", String::from_utf8_lossy(buf.get(..n).unwrap_or_default())),
        ),
    }
}

async fn probe_udp(addr: SocketAddr, timeout: Duration) -> (Outcome, serde_json::Value) {
    let bind: SocketAddr = if addr.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = match tokio::net::UdpSocket::bind(bind).await {
        Ok(s) => s,
        Err(e) => return detail(Outcome::Error, format!("bind: {e}")),
    };
    if let Err(e) = socket.connect(addr).await {
        return detail(io_outcome(&e), format!("connect: {e}"));
    }
    if let Err(e) = socket.send(b"mandate-probe").await {
        return detail(io_outcome(&e), format!("send: {e}"));
    }
    let mut buf = [0u8; 1500];
    match tokio::time::timeout(timeout, socket.recv(&mut buf)).await {
        Err(_) => detail(Outcome::Timeout, "sent; nothing back in time"),
        Ok(Err(e)) => detail(io_outcome(&e), format!("sent; receive: {e}")),
        Ok(Ok(n)) => detail(
            Outcome::Connected,
            format!("got {:?}", String::from_utf8_lossy(buf.get(..n).unwrap_or_default())),
        ),
    }
}

async fn probe_dns(
    name: &str,
    server: &str,
    qtype: &str,
    tcp: bool,
    timeout: Duration,
) -> (Outcome, serde_json::Value) {
    use hickory_proto::op::{Message, Query, ResponseCode};
    use hickory_proto::rr::{Name, RecordType};
    use std::str::FromStr;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let server: SocketAddr = match server
        .parse()
        .or_else(|_| server.parse::<std::net::IpAddr>().map(|ip| SocketAddr::new(ip, 53)))
    {
        Ok(s) => s,
        Err(e) => return detail(Outcome::Error, format!("server '{server}': {e}")),
    };
    let (qname, qtype) = match (Name::from_str(name), RecordType::from_str(qtype)) {
        (Ok(n), Ok(t)) => (n, t),
        (n, t) => return detail(Outcome::Error, format!("bad query: {n:?} {t:?}")),
    };
    let id: u16 = rand::random();
    let mut query = Message::new();
    query
        .set_id(id)
        .set_recursion_desired(true)
        .add_query(Query::query(qname, qtype));
    let Ok(bytes) = query.to_vec() else {
        return detail(Outcome::Error, "the query does not serialize");
    };
    let exchange = async {
        let mut buf = vec![0u8; 4096];
        if tcp {
            let mut s = tokio::net::TcpStream::connect(server).await?;
            let len = u16::try_from(bytes.len()).unwrap_or(u16::MAX);
            s.write_all(&len.to_be_bytes()).await?;
            s.write_all(&bytes).await?;
            let mut len = [0u8; 2];
            s.read_exact(&mut len).await?;
            buf.resize(usize::from(u16::from_be_bytes(len)), 0);
            s.read_exact(&mut buf).await?;
            Ok::<_, std::io::Error>(buf)
        } else {
            let bind: SocketAddr = if server.is_ipv4() {
                ([0, 0, 0, 0], 0).into()
            } else {
                (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
            };
            let socket = tokio::net::UdpSocket::bind(bind).await?;
            socket.connect(server).await?;
            socket.send(&bytes).await?;
            loop {
                let n = socket.recv(&mut buf).await?;
                // Only the answer to this query (its id).
                if n >= 2 && buf.get(..2) == Some(&id.to_be_bytes()[..]) {
                    buf.truncate(n);
                    return Ok(buf);
                }
            }
        }
    };
    let raw = match tokio::time::timeout(timeout, exchange).await {
        Err(_) => return detail(Outcome::Timeout, "no answer in time"),
        Ok(Err(e)) => return detail(io_outcome(&e), format!("{e}")),
        Ok(Ok(raw)) => raw,
    };
    let Ok(answer) = Message::from_vec(&raw) else {
        return detail(Outcome::Error, "the answer does not parse");
    };
    let rcode = answer.response_code();
    let outcome = match rcode {
        ResponseCode::NoError => Outcome::Connected,
        ResponseCode::NXDomain => Outcome::NxDomain,
        ResponseCode::Refused => Outcome::DnsRefused,
        _ => Outcome::DnsOther,
    };
    let answers: Vec<String> = answer.answers().iter().map(|r| r.data().to_string()).collect();
    (
        outcome,
        serde_json::json!({"rcode": rcode.to_string(), "answers": answers}),
    )
}

async fn probe_http(url: &str, host: Option<&str>, method: &str, timeout: Duration) -> (Outcome, serde_json::Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let uri: hyper::Uri = match url.parse() {
        Ok(u) => u,
        Err(e) => return detail(Outcome::Error, format!("bad URL {url}: {e}")),
    };
    let Some(authority) = uri.authority().map(|a| a.to_string()) else {
        return detail(Outcome::Error, "the URL has no host");
    };
    let path = uri.path_and_query().map_or("/".to_string(), |p| p.to_string());
    let host = host.unwrap_or(&authority);
    let mut s = match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(&authority)).await {
        Err(_) => return detail(Outcome::Timeout, "no connection in time"),
        Ok(Err(e)) => return detail(io_outcome(&e), format!("connect: {e}")),
        Ok(Ok(s)) => s,
    };
    let request = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    if let Err(e) = s.write_all(request.as_bytes()).await {
        return detail(Outcome::Closed, format!("connected; write: {e}"));
    }
    let mut raw = Vec::new();
    match tokio::time::timeout(timeout, s.read_to_end(&mut raw)).await {
        Err(_) if raw.is_empty() => return detail(Outcome::Timeout, "connected; no answer in time"),
        Ok(Err(e)) if raw.is_empty() => return detail(Outcome::Closed, format!("connected; read: {e}")),
        _ if raw.is_empty() => return detail(Outcome::Closed, "connected; closed with no answer"),
        _ => {}
    }
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let Some(status) = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse::<u16>().ok())
    else {
        return detail(Outcome::Closed, format!("not HTTP: {head:?}"));
    };
    let headers: BTreeMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let decision_id = headers.get("x-mandate-decision-id").cloned().or_else(|| {
        serde_json::from_str::<serde_json::Value>(body)
            .ok()
            .and_then(|b| b.get("decision_id")?.as_str().map(str::to_string))
    });
    let outcome = if status == 403 && decision_id.is_some() {
        Outcome::Denied
    } else {
        Outcome::Connected
    };
    (
        outcome,
        serde_json::json!({"status": status, "decision_id": decision_id, "body": body}),
    )
}
