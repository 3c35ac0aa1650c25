//! A small HTTP/1.1 client over plain TCP: admin ports (`/readyz`,
//! `/metrics`) of processes a test started, and proxies in front of them.

use std::time::Duration;

use anyhow::{Context, Result};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;

/// What a server answered.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Reply {
    /// The first value of header `name` (lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

/// Send one request; fail if no answer comes within `timeout`.
pub async fn request(
    method: &str,
    url: &str,
    content_type: Option<&str>,
    body: Vec<u8>,
    timeout: Duration,
) -> Result<Reply> {
    let client: hyper_util::client::legacy::Client<_, Full<Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http();
    let mut req = hyper::Request::builder().method(method).uri(url);
    if let Some(ct) = content_type {
        req = req.header("content-type", ct);
    }
    let req = req
        .body(Full::new(Bytes::from(body)))
        .with_context(|| format!("bad request {method} {url}"))?;
    let resp = tokio::time::timeout(timeout, client.request(req))
        .await
        .with_context(|| format!("{method} {url}: no answer within {timeout:?}"))?
        .with_context(|| format!("{method} {url}"))?;
    let status = resp.status().as_u16();
    let headers = resp
        .headers()
        .iter()
        .map(|(k, v)| (k.to_string(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
        .collect();
    let body = resp
        .into_body()
        .collect()
        .await
        .with_context(|| format!("reading {url}"))?
        .to_bytes();
    Ok(Reply {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

/// GET `url`; the status and the body (no answer within 5 s is an error).
pub async fn http_get(url: &str) -> Result<(u16, String)> {
    let r = request("GET", url, None, vec![], Duration::from_secs(5)).await?;
    Ok((r.status, r.body))
}

/// Whether GET `url` answers 200 (`/readyz` of a ready process).
pub async fn http_ok(url: &str) -> bool {
    matches!(http_get(url).await, Ok((200, _)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn gets_status_and_body_and_fails_on_a_closed_port() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            while let Ok((mut s, _)) = listener.accept().await {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\nx-test: yes\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok")
                    .await;
            }
        });
        let url = format!("http://127.0.0.1:{port}/readyz");
        assert_eq!(http_get(&url).await.unwrap(), (200, "ok".to_string()));
        assert!(http_ok(&url).await);
        let r = request("POST", &url, Some("text/plain"), b"x".to_vec(), Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(r.header("x-test"), Some("yes"));
        let closed = format!("http://127.0.0.1:{}/", crate::free_port());
        assert!(!http_ok(&closed).await);
    }
}
