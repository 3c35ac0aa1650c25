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
//!   the proxy in `HTTP_PROXY` when it is set, and answers with the outcome.
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
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let result = match args.command {
        Command::Serve { listen, name } => serve(listen, name).await,
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
