//! Waiting on a condition with a deadline, driven by a watch (no fixed sleeps).

use std::fmt::Debug;
use std::time::Duration;

use anyhow::{Result, bail};
use futures::{StreamExt, pin_mut};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Resource};
use serde::de::DeserializeOwned;

/// What a check says about the object's current state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    /// The condition holds: stop waiting.
    Done,
    /// Not yet; the text says what the object looks like now (reported on timeout).
    Pending(String),
    /// It will never hold (a pod that failed, an image that cannot be found):
    /// stop waiting and fail with this reason.
    Failed(String),
}

/// Watch the object `name` through `api` until `check` says [`Check::Done`],
/// [`Check::Failed`], or `timeout` passes. `check` sees `None` while the object
/// does not exist. Returns the object that satisfied the check (or `None`
/// when absence was the condition).
pub async fn wait_until<K, F>(api: Api<K>, name: &str, what: &str, timeout: Duration, check: F) -> Result<Option<K>>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
    F: Fn(Option<&K>) -> Check,
{
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let stream = watcher(api, config).default_backoff();
    pin_mut!(stream);
    let mut current: Option<K> = None;
    let mut last = String::from("no answer from the apiserver yet");
    let mut initializing = false;
    let mut last_error: Option<String> = None;

    let outcome = tokio::time::timeout(timeout, async {
        while let Some(event) = stream.next().await {
            match event {
                Ok(watcher::Event::Init) => {
                    initializing = true;
                    current = None;
                    continue;
                }
                Ok(watcher::Event::InitApply(obj)) => {
                    current = Some(obj);
                    continue;
                }
                Ok(watcher::Event::InitDone) => initializing = false,
                Ok(watcher::Event::Apply(obj)) => current = Some(obj),
                Ok(watcher::Event::Delete(_)) => current = None,
                Err(e) => {
                    last_error = Some(e.to_string());
                    continue;
                }
            }
            if initializing {
                continue;
            }
            match check(current.as_ref()) {
                Check::Done => return Ok(current.clone()),
                Check::Pending(state) => last = state,
                Check::Failed(reason) => return Err(reason),
            }
        }
        Err("the watch ended".to_string())
    })
    .await;

    match outcome {
        Ok(Ok(obj)) => Ok(obj),
        Ok(Err(reason)) => bail!("{what}: {reason}"),
        Err(_) => {
            let err = last_error
                .map(|e| format!("; last watch error: {e}"))
                .unwrap_or_default();
            bail!("timed out after {timeout:?} waiting for {what}; last seen: {last}{err}")
        }
    }
}
