//! `mandate-bench`: the measurements behind the README's performance figures.
//! `hack/bench.sh` runs them all, beside OPA and Envoy, and prints a table.
//!
//!   mandate-bench engine POLICY.yaml --input IN.json    per-decision evaluation time
//!   mandate-bench handler POLICY.yaml --log FILE          the whole Check handler, in process
//!   mandate-bench grpc 127.0.0.1:9191 --rate 1000        Check latency at a fixed rate
//!   mandate-bench grpc 127.0.0.1:9191 --max              Check throughput, closed loop
//!   mandate-bench http http://127.0.0.1:15001/ --rate 1000   HTTP latency at a fixed rate
//!   mandate-bench http http://198.51.100.2:8080/ --proxy 127.0.0.1:15001   the same through an HTTP proxy
//!   mandate-bench bootstrap --authz-socket S --admin-socket A [--no-authz]   the injected Envoy bootstrap
//!   mandate-bench export POLICY.yaml DIR                 the policy as files for `opa bench`
//!   mandate-bench grpc-body FILE                         the Check request, gRPC-framed, for h2load
//!   mandate-bench tls --connect IP:443 --name 'h{n}.bench.test' --ca CA --mode first   HTTPS latency
//!   mandate-bench serve-tls --listen IP:443 --cert C --key K   an HTTPS upstream

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Request};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest};
use mandate_api::crd::PolicyDocument as AgentPolicy;
use mandate_policy::engine::{EngineKind, LoadedPolicy, PolicySet};

mod tls;

#[derive(Debug, Parser)]
#[command(name = "mandate-bench", about = "Benchmarks of Mandate's decision path")]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Time one decision (input conversion + evaluation + interpretation) of a policy.
    Engine {
        policy: PathBuf,
        #[arg(long)]
        input: PathBuf,
        /// Seconds to run.
        #[arg(long, default_value_t = 3)]
        seconds: u64,
    },
    /// Time the whole Check handler in process, without gRPC: the input
    /// document, evaluation, the decision log record (chained, written to
    /// --log) and the response.
    Handler {
        policy: PathBuf,
        /// Where the decision log goes (a file, a pipe, /dev/null).
        #[arg(long)]
        log: PathBuf,
        #[arg(long, default_value_t = 3)]
        seconds: u64,
    },
    /// Send Check requests over gRPC: at a fixed rate (latency), or as fast as possible (--max).
    Grpc {
        target: String,
        #[arg(long, default_value_t = 1000)]
        rate: u64,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Closed loop with this many requests in flight, for throughput.
        #[arg(long)]
        max: bool,
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
    },
    /// Serve a Check that allows everything at once: the transport's floor, to
    /// compare the sidecar with.
    ServeNoop {
        listen: std::net::SocketAddr,
        /// Also serve on this unix socket (as the sidecar does for Envoy).
        #[arg(long)]
        unix: Option<PathBuf>,
    },
    /// Write a policy's modules and data as files OPA loads; print its entrypoint.
    Export { policy: PathBuf, dir: PathBuf },
    /// Write the benchmark's CheckRequest as a gRPC message (5-byte frame
    /// header + protobuf), the request body `h2load -d FILE` sends.
    GrpcBody { out: PathBuf },
    /// Send HTTP GETs at a fixed rate and report latency.
    Http {
        url: String,
        /// Host header to send (the policy decides on it).
        #[arg(long)]
        host: Option<String>,
        #[arg(long, default_value_t = 1000)]
        rate: u64,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Send every request to this HTTP proxy (ip:port), in absolute form,
        /// as a client honouring `HTTP_PROXY` does.
        #[arg(long)]
        proxy: Option<std::net::SocketAddr>,
        /// A new TCP connection for every request (no keep-alive pool).
        #[arg(long)]
        new_connection: bool,
    },
    /// Print the Envoy bootstrap the injector writes (transparent egress on),
    /// with the ext_authz socket, admin socket and readiness address given.
    Bootstrap {
        #[arg(long)]
        authz_socket: String,
        #[arg(long)]
        admin_socket: String,
        #[arg(long, default_value = "127.0.0.1")]
        health_address: String,
        /// Remove every ext_authz filter (HTTP and network): Envoy alone,
        /// with the same listeners, routes and clusters.
        #[arg(long)]
        no_authz: bool,
        /// The CAs Envoy verifies upstreams against (default: the injector's).
        #[arg(long)]
        upstream_ca: Option<String>,
    },
    /// HTTPS requests to a name, one at a time, trusting a CA bundle: one
    /// JSON line of latencies (the interception benchmark's client).
    Tls {
        /// Where to connect (in a pod, the egress rules send it to Envoy).
        #[arg(long)]
        connect: std::net::SocketAddr,
        /// The server name (SNI and Host); `{n}` is the request's number.
        #[arg(long)]
        name: String,
        /// The CA bundle (PEM) to trust; without it, plain HTTP.
        #[arg(long)]
        ca: Option<PathBuf>,
        #[arg(long, default_value = "/v1/models")]
        path: String,
        #[arg(long, default_value_t = 200)]
        requests: u64,
        /// The first request's number (for `{n}`).
        #[arg(long, default_value_t = 0)]
        start: u64,
        #[arg(long, value_enum)]
        mode: tls::Mode,
    },
    /// Serve HTTPS (200 "ok" to everything): the interception benchmark's upstream.
    ServeTls {
        #[arg(long)]
        listen: std::net::SocketAddr,
        #[arg(long)]
        cert: PathBuf,
        #[arg(long)]
        key: PathBuf,
        /// Serve plain HTTP here too.
        #[arg(long)]
        plain: Option<std::net::SocketAddr>,
    },
}

fn main() -> Result<()> {
    let args = Args::parse();
    match args.command {
        Command::Engine { policy, input, seconds } => engine(&policy, &input, seconds),
        Command::Handler { policy, log, seconds } => handler(&policy, &log, seconds),
        Command::Grpc {
            target,
            rate,
            seconds,
            max,
            concurrency,
        } => {
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            rt.block_on(grpc(target, rate, seconds, max, concurrency))
        }
        Command::ServeNoop { listen, unix } => {
            use envoy_types::pb::envoy::service::auth::v3::authorization_server::AuthorizationServer;
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            rt.block_on(async move {
                if let Some(path) = unix {
                    let _ = std::fs::remove_file(&path);
                    let uds =
                        tokio::net::UnixListener::bind(&path).with_context(|| format!("binding {}", path.display()))?;
                    tokio::spawn(
                        tonic::transport::Server::builder()
                            .add_service(AuthorizationServer::new(Noop))
                            .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(uds)),
                    );
                }
                tonic::transport::Server::builder()
                    .add_service(AuthorizationServer::new(Noop))
                    .serve(listen)
                    .await
                    .context("serving the no-op Check")
            })?;
            Ok(())
        }
        Command::Export { policy, dir } => {
            let p: AgentPolicy = serde_yaml::from_str(&std::fs::read_to_string(&policy)?)?;
            std::fs::create_dir_all(&dir)?;
            for m in &p.spec.modules {
                std::fs::write(dir.join(&m.name), &m.rego)?;
            }
            if let Some(data) = &p.spec.data {
                std::fs::write(dir.join("data.json"), data.to_string())?;
            }
            println!("{}", p.spec.entrypoint);
            Ok(())
        }
        Command::GrpcBody { out } => {
            let msg = prost::Message::encode_to_vec(&check_request());
            let len = u32::try_from(msg.len())?;
            let mut framed = vec![0u8];
            framed.extend_from_slice(&len.to_be_bytes());
            framed.extend_from_slice(&msg);
            std::fs::write(&out, framed).with_context(|| format!("writing {}", out.display()))?;
            Ok(())
        }
        Command::Http {
            url,
            host,
            rate,
            seconds,
            proxy,
            new_connection,
        } => {
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            rt.block_on(http(url, host, rate, seconds, proxy, new_connection))
        }
        Command::Tls {
            connect,
            name,
            ca,
            path,
            requests,
            start,
            mode,
        } => {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(tls::client(connect, &name, ca.as_deref(), &path, requests, start, mode))
        }
        Command::ServeTls {
            listen,
            cert,
            key,
            plain,
        } => {
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            rt.block_on(tls::serve(listen, &cert, &key, plain))
        }
        Command::Bootstrap {
            authz_socket,
            admin_socket,
            health_address,
            no_authz,
            upstream_ca,
        } => {
            use mandate_operator::webhook::inject::{InjectConfig, Sockets, envoy_bootstrap_at};
            let mut cfg = InjectConfig::default();
            if let Some(ca) = upstream_ca {
                cfg.upstream_ca_file = ca;
            }
            // The SDS socket beside the ext_authz one.
            let sds = std::path::Path::new(&authz_socket).with_file_name("sds.sock");
            let sockets = Sockets {
                authz: &authz_socket,
                admin: &admin_socket,
                sds: &sds.to_string_lossy(),
            };
            let text = envoy_bootstrap_at(&cfg, &sockets, &health_address);
            if !no_authz {
                println!("{text}");
                return Ok(());
            }
            let mut b: serde_json::Value = serde_json::from_str(&text).context("the bootstrap is not JSON")?;
            let removed = strip_ext_authz(&mut b);
            if removed == 0 {
                bail!("the injected bootstrap has no ext_authz filter to remove: has its layout changed?");
            }
            println!("{b}");
            Ok(())
        }
    }
}

/// Allows everything, doing nothing: the gRPC floor.
#[derive(Debug)]
struct Noop;

#[tonic::async_trait]
impl envoy_types::pb::envoy::service::auth::v3::authorization_server::Authorization for Noop {
    async fn check(
        &self,
        _: tonic::Request<CheckRequest>,
    ) -> Result<tonic::Response<envoy_types::pb::envoy::service::auth::v3::CheckResponse>, tonic::Status> {
        Ok(tonic::Response::new(mandate_sidecar::server::respond(
            "noop",
            &mandate_policy::engine::Decision {
                allow: true,
                ..Default::default()
            },
        )))
    }
}

/// One AgentPolicy file, compiled as the sidecar compiles it: its name, the
/// policy, and a set holding only it.
fn load_one(policy: &PathBuf) -> Result<(String, AgentPolicy, PolicySet)> {
    let p: AgentPolicy = serde_yaml::from_str(&std::fs::read_to_string(policy)?)?;
    let name = p.metadata.name.clone().unwrap_or_default();
    let set = PolicySet {
        policies: vec![LoadedPolicy::compile(name.clone(), &p.spec)?],
        ..PolicySet::default()
    };
    Ok((name, p, set))
}

fn engine(policy: &PathBuf, input: &PathBuf, seconds: u64) -> Result<()> {
    let (name, p, set) = load_one(policy)?;
    let doc: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(input)?)?;
    let allow = set.decide(&doc).allow;
    for _ in 0..2000 {
        std::hint::black_box(set.decide(std::hint::black_box(&doc)));
    }
    // Batches of 1000; the median batch is the figure (robust to noise).
    let mut per_op = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(seconds);
    while Instant::now() < deadline || per_op.len() < 5 {
        let t = Instant::now();
        for _ in 0..1000 {
            std::hint::black_box(set.decide(std::hint::black_box(&doc)));
        }
        per_op.push(t.elapsed().as_nanos() as f64 / 1000.0);
    }
    per_op.sort_by(f64::total_cmp);
    let median = per_op.get(per_op.len() / 2).copied().unwrap_or_default();
    // The same with the input already a regorus value (as `opa bench` has it parsed).
    let prepared = regorus::Value::from(doc.clone());
    let mut eval_only = Vec::new();
    for _ in 0..per_op.len() {
        let t = Instant::now();
        for _ in 0..1000 {
            std::hint::black_box(set.decide_prepared(std::hint::black_box(prepared.clone())));
        }
        eval_only.push(t.elapsed().as_nanos() as f64 / 1000.0);
    }
    eval_only.sort_by(f64::total_cmp);
    let eval_median = eval_only.get(eval_only.len() / 2).copied().unwrap_or_default();
    // The same, on regorus' tree-walking interpreter (what `--engine interpreter` runs).
    let interp = PolicySet {
        policies: vec![LoadedPolicy::compile_for(
            name.clone(),
            &p.spec,
            EngineKind::Interpreter,
        )?],
        ..PolicySet::default()
    };
    let mut interp_only = Vec::new();
    for _ in 0..per_op.len() {
        let t = Instant::now();
        for _ in 0..1000 {
            std::hint::black_box(interp.decide_prepared(std::hint::black_box(prepared.clone())));
        }
        interp_only.push(t.elapsed().as_nanos() as f64 / 1000.0);
    }
    interp_only.sort_by(f64::total_cmp);
    let interp_median = interp_only.get(interp_only.len() / 2).copied().unwrap_or_default();
    let evaluator = set.policies.first().map(LoadedPolicy::evaluator).unwrap_or_default();
    println!(
        "{{\"policy\":\"{name}\",\"evaluator\":\"{evaluator}\",\"allow\":{allow},\"ns_per_op\":{median:.0},\"eval_ns_per_op\":{eval_median:.0},\"interpreter_ns_per_op\":{interp_median:.0},\"batches\":{}}}",
        per_op.len()
    );
    Ok(())
}

fn handler(policy: &PathBuf, log: &PathBuf, seconds: u64) -> Result<()> {
    use mandate_sidecar::decision_log::DecisionLog;
    use mandate_sidecar::server::Authz;
    let (_, _, set) = load_one(policy)?;
    let out = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(log)
        .with_context(|| format!("opening {}", log.display()))?;
    let authz = Authz {
        policies: Arc::new(arc_swap::ArcSwap::from_pointee(set)),
        log: Arc::new(DecisionLog::new(Box::new(out), &[])),
        metrics: Arc::default(),
        agent: mandate_sidecar::input::Agent::default(),
        limits: mandate_sidecar::input::Limits::default(),
        svid: None,
        resolver: Arc::default(),
        intercept: false,
    };
    let req = check_request();
    let allow = authz.decide(&req).1.allow;
    let mut lat = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(seconds);
    while Instant::now() < deadline {
        let t = Instant::now();
        std::hint::black_box(authz.decide(std::hint::black_box(&req)));
        lat.push(t.elapsed().as_nanos() as u64);
    }
    println!("{{\"mode\":\"handler\",\"allow\":{allow},{}}}", percentiles(lat));
    Ok(())
}

fn check_request() -> CheckRequest {
    let headers = [
        (":authority", "api.search.example.com"),
        (":method", "GET"),
        (":path", "/v1/search?q=rust+policy&limit=10"),
        (":scheme", "http"),
        ("accept", "application/json"),
        ("user-agent", "agent-runtime/1.0"),
        ("x-request-id", "9f0b8c1e-6a5d-4c7e-9b1a-2f3e4d5c6b7a"),
        ("x-forwarded-proto", "http"),
        ("authorization", "Bearer eyJhbGciOiJub25lIn0.eyJzdWIiOiJib2IifQ."),
    ];
    CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(Request {
                time: None,
                http: Some(HttpRequest {
                    id: "1".into(),
                    method: "GET".into(),
                    path: "/v1/search?q=rust+policy&limit=10".into(),
                    host: "api.search.example.com".into(),
                    scheme: "http".into(),
                    protocol: "HTTP/1.1".into(),
                    headers: headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
                    ..HttpRequest::default()
                }),
            }),
            ..AttributeContext::default()
        }),
    }
}

fn percentiles(mut lat: Vec<u64>) -> String {
    if lat.is_empty() {
        return "no samples".into();
    }
    lat.sort_unstable();
    let at = |q: f64| {
        let i = ((lat.len() as f64 - 1.0) * q).round() as usize;
        lat.get(i).copied().unwrap_or_default()
    };
    format!(
        "\"n\":{},\"p50_us\":{:.1},\"p99_us\":{:.1},\"p999_us\":{:.1},\"max_us\":{:.1}",
        lat.len(),
        at(0.5) as f64 / 1000.0,
        at(0.99) as f64 / 1000.0,
        at(0.999) as f64 / 1000.0,
        at(1.0) as f64 / 1000.0
    )
}

/// Open loop: send at `rate` per second, each request in its own task; the
/// latencies (failures included) and how many failed.
async fn open_loop<F, Fut>(rate: u64, seconds: u64, send: F) -> Result<(Vec<u64>, u64)>
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = bool> + Send + 'static,
{
    let send = Arc::new(send);
    let total = rate * seconds;
    let gap = Duration::from_nanos(1_000_000_000 / rate.max(1));
    let start = tokio::time::Instant::now() + Duration::from_millis(100);
    let mut handles = Vec::with_capacity(total as usize);
    let failures = Arc::new(AtomicU64::new(0));
    for i in 0..total {
        let due = start + gap * u32::try_from(i).unwrap_or(u32::MAX);
        tokio::time::sleep_until(due).await;
        let send = send.clone();
        let failures = failures.clone();
        handles.push(tokio::spawn(async move {
            // Timed from the send itself: each request is its own task, so a
            // slow answer delays no other request (no coordinated omission),
            // and the timer's 1 ms granularity does not count as latency.
            let sent = Instant::now();
            let ok = send().await;
            if !ok {
                failures.fetch_add(1, Ordering::Relaxed);
            }
            sent.elapsed().as_nanos() as u64
        }));
    }
    let mut lat = Vec::with_capacity(handles.len());
    for h in handles {
        lat.push(h.await?);
    }
    Ok((lat, failures.load(Ordering::Relaxed)))
}

async fn grpc(target: String, rate: u64, seconds: u64, max: bool, concurrency: usize) -> Result<()> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{target}"))?
        .tcp_nodelay(true)
        .connect()
        .await
        .with_context(|| format!("connecting to {target}"))?;
    let client = AuthorizationClient::new(channel);
    let req = check_request();
    if max {
        let done = Arc::new(AtomicU64::new(0));
        let deadline = Instant::now() + Duration::from_secs(seconds);
        let mut workers = Vec::new();
        for _ in 0..concurrency {
            let mut c = client.clone();
            let req = req.clone();
            let done = done.clone();
            workers.push(tokio::spawn(async move {
                while Instant::now() < deadline {
                    if c.check(req.clone()).await.is_ok() {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }));
        }
        for w in workers {
            w.await?;
        }
        let n = done.load(Ordering::Relaxed);
        println!(
            "{{\"mode\":\"max\",\"concurrency\":{concurrency},\"decisions\":{n},\"per_second\":{:.0}}}",
            n as f64 / seconds as f64
        );
        return Ok(());
    }
    let (lat, failed) = open_loop(rate, seconds, move || {
        let mut c = client.clone();
        let req = req.clone();
        async move { c.check(req).await.is_ok() }
    })
    .await?;
    if failed > 0 {
        bail!("{failed} of {} requests failed", lat.len());
    }
    println!("{{\"mode\":\"rate\",\"rate\":{rate},{}}}", percentiles(lat));
    Ok(())
}

async fn http(
    url: String,
    host: Option<String>,
    rate: u64,
    seconds: u64,
    proxy: Option<std::net::SocketAddr>,
    new_connection: bool,
) -> Result<()> {
    use http_body_util::{BodyExt, Empty};
    let mut builder = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new());
    if new_connection {
        builder.pool_max_idle_per_host(0);
    }
    let client: hyper_util::client::legacy::Client<_, Empty<hyper::body::Bytes>> =
        builder.build(tower::service_fn(move |uri: hyper::Uri| Box::pin(dial(uri, proxy))));
    let uri: hyper::Uri = url.parse()?;
    // One request first: a target that does not answer 2xx is a setup
    // error, said as such, not a run of failures.
    {
        let mut req = hyper::Request::get(uri.clone());
        if let Some(h) = &host {
            req = req.header("host", h.as_str());
        }
        let resp = client.request(req.body(Empty::new())?).await.with_context(|| {
            format!(
                "GET {url}{}",
                proxy.map(|p| format!(" through {p}")).unwrap_or_default()
            )
        })?;
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        if !status.is_success() {
            bail!("GET {url}: HTTP {status}: {}", String::from_utf8_lossy(&body).trim());
        }
    }
    let (lat, failed) = open_loop(rate, seconds, move || {
        let client = client.clone();
        let mut req = hyper::Request::get(uri.clone());
        if let Some(h) = &host {
            req = req.header("host", h.as_str());
        }
        let req = req.body(Empty::new());
        async move {
            let Ok(req) = req else { return false };
            match client.request(req).await {
                Ok(resp) => {
                    let ok = resp.status().is_success();
                    ok && resp.into_body().collect().await.is_ok()
                }
                Err(_) => false,
            }
        }
    })
    .await?;
    if failed == lat.len() as u64 {
        bail!("all {failed} requests failed");
    }
    println!(
        "{{\"mode\":\"http\",\"rate\":{rate},\"errors\":{failed},{}}}",
        percentiles(lat)
    );
    Ok(())
}

/// A TCP connection (no Nagle) to the request's host, or to `proxy` when
/// given, which hyper is then told is a proxy (it sends absolute-form URIs).
async fn dial(uri: hyper::Uri, proxy: Option<std::net::SocketAddr>) -> Result<Dialed, std::io::Error> {
    let stream = match proxy {
        Some(p) => tokio::net::TcpStream::connect(p).await?,
        None => {
            let host = uri
                .host()
                .unwrap_or_default()
                .trim_start_matches('[')
                .trim_end_matches(']');
            let port = uri.port_u16().unwrap_or(80);
            tokio::net::TcpStream::connect((host, port)).await?
        }
    };
    stream.set_nodelay(true)?;
    Ok(Dialed {
        io: hyper_util::rt::TokioIo::new(stream),
        proxy: proxy.is_some(),
    })
}

/// A connection from [`dial`]: hyper's I/O, and whether it goes to a proxy.
struct Dialed {
    io: hyper_util::rt::TokioIo<tokio::net::TcpStream>,
    proxy: bool,
}

impl hyper_util::client::legacy::connect::Connection for Dialed {
    fn connected(&self) -> hyper_util::client::legacy::connect::Connected {
        hyper_util::client::legacy::connect::Connected::new().proxy(self.proxy)
    }
}

impl hyper::rt::Read for Dialed {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for Dialed {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// Remove every ext_authz filter (HTTP or network) anywhere in `v`; how many.
fn strip_ext_authz(v: &mut serde_json::Value) -> usize {
    const NAMES: [&str; 2] = ["envoy.filters.http.ext_authz", "envoy.filters.network.ext_authz"];
    match v {
        serde_json::Value::Array(items) => {
            let before = items.len();
            items.retain(|i| {
                !NAMES
                    .iter()
                    .any(|n| i.get("name").and_then(serde_json::Value::as_str) == Some(*n))
            });
            let removed = before - items.len();
            removed + items.iter_mut().map(strip_ext_authz).sum::<usize>()
        }
        serde_json::Value::Object(m) => m.values_mut().map(strip_ext_authz).sum(),
        _ => 0,
    }
}
