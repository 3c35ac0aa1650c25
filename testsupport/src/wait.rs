//! Waiting on a condition with a deadline.
//!
//! A probe is asked until it holds or the deadline passes; it is always
//! asked at least once, and once more at the deadline. A timeout fails with
//! `timed out after <timeout> waiting for <what>`, so name in `what` the
//! condition awaited ("the sidecar to be ready"). Probes are spaced by
//! [`POLL`] unless [`Wait::every`] says otherwise.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};

/// The pause between two probes, by default.
pub const POLL: Duration = Duration::from_millis(50);

/// A wait: what is awaited, for how long, how often to look.
#[derive(Debug, Clone)]
pub struct Wait {
    what: String,
    timeout: Duration,
    every: Duration,
}

/// Wait for `what`, at most `timeout`.
pub fn wait_for(what: impl Into<String>, timeout: Duration) -> Wait {
    Wait {
        what: what.into(),
        timeout,
        every: POLL,
    }
}

/// Ask `probe` until it is true; fail after `timeout` naming `what`.
pub async fn eventually(what: &str, timeout: Duration, probe: impl AsyncFnMut() -> bool) -> Result<()> {
    wait_for(what, timeout).until(probe).await
}

/// Ask `probe` until it is `Ok(true)`; an error ends the wait at once.
pub async fn try_eventually(what: &str, timeout: Duration, probe: impl AsyncFnMut() -> Result<bool>) -> Result<()> {
    wait_for(what, timeout).until_ok(probe).await
}

/// Ask `probe` until it gives a value; errors are taken as "not yet", and
/// the last one is reported on timeout.
pub async fn eventually_some<T>(
    what: &str,
    timeout: Duration,
    probe: impl AsyncFnMut() -> Result<Option<T>>,
) -> Result<T> {
    wait_for(what, timeout).until_some(probe).await
}

/// [`eventually`] for a synchronous probe (blocks the thread between probes).
pub fn eventually_blocking(what: &str, timeout: Duration, probe: impl FnMut() -> bool) -> Result<()> {
    wait_for(what, timeout).blocking_until(probe)
}

impl Wait {
    /// Probe every `interval` instead of every [`POLL`].
    pub fn every(mut self, interval: Duration) -> Self {
        self.every = interval;
        self
    }

    fn timed_out(&self, last_error: Option<&anyhow::Error>) -> anyhow::Error {
        let last = last_error.map(|e| format!(" (last error: {e:#})")).unwrap_or_default();
        anyhow::anyhow!("timed out after {:?} waiting for {}{last}", self.timeout, self.what)
    }

    /// Until `probe` is true.
    pub async fn until(self, mut probe: impl AsyncFnMut() -> bool) -> Result<()> {
        self.until_ok(async || Ok(probe().await)).await
    }

    /// Until `probe` is `Ok(true)`; an error ends the wait at once, with
    /// what was awaited as its context.
    pub async fn until_ok(self, mut probe: impl AsyncFnMut() -> Result<bool>) -> Result<()> {
        let deadline = tokio::time::Instant::now() + self.timeout;
        loop {
            let done = probe()
                .await
                .with_context(|| format!("while waiting for {}", self.what))?;
            if done {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(self.timed_out(None));
            }
            tokio::time::sleep(self.every).await;
        }
    }

    /// Until `probe` gives a value, which is returned. An error counts as
    /// "not yet"; the last one is in the timeout's message.
    pub async fn until_some<T>(self, mut probe: impl AsyncFnMut() -> Result<Option<T>>) -> Result<T> {
        let deadline = tokio::time::Instant::now() + self.timeout;
        let mut last_error = None;
        loop {
            match probe().await {
                Ok(Some(v)) => return Ok(v),
                Ok(None) => {}
                Err(e) => last_error = Some(e),
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(self.timed_out(last_error.as_ref()));
            }
            tokio::time::sleep(self.every).await;
        }
    }

    /// Until the synchronous `probe` is true, sleeping the thread between probes.
    pub fn blocking_until(self, mut probe: impl FnMut() -> bool) -> Result<()> {
        let deadline = Instant::now() + self.timeout;
        loop {
            if probe() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(self.timed_out(None));
            }
            std::thread::sleep(self.every);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_condition_that_comes_true_ends_the_wait() {
        let mut n = 0;
        eventually("n to reach 3", Duration::from_secs(5), async || {
            n += 1;
            n >= 3
        })
        .await
        .unwrap();
        assert_eq!(n, 3);
    }

    #[tokio::test]
    async fn a_timeout_names_what_was_awaited() {
        let err = eventually("the moon to turn blue", Duration::from_millis(120), async || false)
            .await
            .unwrap_err();
        let msg = format!("{err:#}");
        assert!(
            msg.contains("timed out after 120ms waiting for the moon to turn blue"),
            "{msg}"
        );
    }

    #[tokio::test]
    async fn try_eventually_stops_at_the_first_error() {
        let mut calls = 0;
        let err = try_eventually("a probe that fails", Duration::from_secs(5), async || {
            calls += 1;
            anyhow::bail!("boom")
        })
        .await
        .unwrap_err();
        assert_eq!(calls, 1);
        let msg = format!("{err:#}");
        assert!(
            msg.contains("while waiting for a probe that fails") && msg.contains("boom"),
            "{msg}"
        );
    }

    #[tokio::test]
    async fn eventually_some_retries_errors_and_reports_the_last() {
        let mut n = 0;
        let v = eventually_some("a value", Duration::from_secs(5), async || {
            n += 1;
            if n < 3 {
                anyhow::bail!("not yet {n}")
            } else {
                Ok(Some(n * 10))
            }
        })
        .await
        .unwrap();
        assert_eq!(v, 30);
        let err = wait_for("nothing", Duration::from_millis(100))
            .every(Duration::from_millis(10))
            .until_some(async || -> Result<Option<()>> { anyhow::bail!("still broken") })
            .await
            .unwrap_err();
        let msg = format!("{err:#}");
        assert!(
            msg.contains("waiting for nothing") && msg.contains("last error: still broken"),
            "{msg}"
        );
    }

    #[test]
    fn the_blocking_wait_probes_until_the_deadline() {
        let start = Instant::now();
        let mut n = 0;
        eventually_blocking("n to reach 2", Duration::from_secs(5), || {
            n += 1;
            n == 2
        })
        .unwrap();
        let err = eventually_blocking("never", Duration::from_millis(100), || false).unwrap_err();
        assert!(err.to_string().contains("waiting for never"), "{err}");
        assert!(start.elapsed() >= Duration::from_millis(100));
    }
}
