//! One supervisor for a binary's long-running tasks.
//!
//! Every task has a name and a [`Kind`]. A [`Kind::Fatal`] (or
//! [`Kind::Graceful`]) task that ends before the process is stopping, with
//! an error or by returning at all, stops the process the way SIGTERM does:
//! the stop hooks run (readiness goes false), [`Stop`] fires, the tasks go
//! on serving for the drain, then the rest are aborted and
//! [`Supervisor::run`] returns an error naming the task. Tasks never exit
//! the process themselves, so the drain always runs.
//!
//! ```no_run
//! # async fn demo() -> Result<(), mandate_runtime::supervisor::SupervisorError> {
//! use std::time::Duration;
//! use mandate_runtime::supervisor::Supervisor;
//! let supervisor = Supervisor::new(Duration::from_secs(5));
//! let tasks = supervisor.tasks();
//! tasks.spawn_fatal("admin server", async { Ok(()) });
//! supervisor.run(mandate_runtime::shutdown_signal()).await
//! # }
//! ```

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use futures::StreamExt as _;
use futures::stream::FuturesUnordered;
use tokio::sync::{mpsc, watch};
use tokio::task::{AbortHandle, JoinError, JoinHandle};

/// What a task's end means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Serves until the process stops; ending earlier (an error or a return)
    /// stops the process with an error. Aborted once the drain is over.
    Fatal,
    /// Fatal, and it watches [`Stop`] and ends by itself once stopped (it
    /// finishes in-flight work, hands a lease over): after the drain the
    /// supervisor waits for it instead of aborting it.
    Graceful,
    /// Best effort: its end is logged, nothing more. Aborted once the drain
    /// is over.
    Background,
}

/// Why [`Supervisor::run`] stopped other than cleanly.
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    /// A fatal task returned an error.
    #[error("the task '{task}' failed: {error:#}")]
    Failed { task: String, error: anyhow::Error },
    /// A fatal task returned before the process was stopping.
    #[error("the task '{task}' ended unexpectedly (it should run until the process stops)")]
    Ended { task: String },
    /// A task panicked.
    #[error("the task '{task}' panicked: {why}")]
    Panicked { task: String, why: String },
    /// A graceful task did not finish within the limit after the drain.
    #[error("the task '{task}' did not stop within {seconds}s of the drain's end; aborted")]
    Stuck { task: String, seconds: u64 },
}

impl SupervisorError {
    /// The name of the task that failed.
    pub fn task(&self) -> &str {
        match self {
            Self::Failed { task, .. }
            | Self::Ended { task }
            | Self::Panicked { task, .. }
            | Self::Stuck { task, .. } => task,
        }
    }
}

/// Fires once the process is stopping (a signal, or a fatal task's end).
#[derive(Debug, Clone)]
pub struct Stop(watch::Receiver<bool>);

impl Stop {
    /// Whether the process is stopping.
    pub fn is_stopped(&self) -> bool {
        *self.0.borrow()
    }

    /// Resolves once the process is stopping (at once if it is already).
    pub async fn stopped(mut self) {
        // An error means the supervisor is gone: stopping, too.
        let _ = self.0.wait_for(|s| *s).await;
    }
}

type BoxFuture = Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send + 'static>>;

struct Registered {
    name: String,
    kind: Kind,
    handle: JoinHandle<anyhow::Result<()>>,
}

/// Spawns tasks under a [`Supervisor`]; cheap to clone, usable from within
/// tasks.
#[derive(Debug, Clone)]
pub struct Tasks {
    register: mpsc::UnboundedSender<Registered>,
    stop: Stop,
}

impl std::fmt::Debug for Registered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registered")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .finish()
    }
}

impl Tasks {
    /// Start `task` at once, supervised as `kind`.
    pub fn spawn<F>(&self, name: impl Into<String>, kind: Kind, task: F)
    where
        F: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let name = name.into();
        let handle = tokio::spawn(Box::pin(task) as BoxFuture);
        if let Err(mpsc::error::SendError(r)) = self.register.send(Registered { name, kind, handle }) {
            // The supervisor has finished: nothing may outlive it.
            tracing::debug!(task = %r.name, "the supervisor has stopped; not starting the task");
            r.handle.abort();
        }
    }

    /// [`Kind::Fatal`].
    pub fn spawn_fatal<F>(&self, name: impl Into<String>, task: F)
    where
        F: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        self.spawn(name, Kind::Fatal, task);
    }

    /// [`Kind::Graceful`]: `task` gets the [`Stop`] to watch.
    pub fn spawn_graceful<F, Fut>(&self, name: impl Into<String>, task: F)
    where
        F: FnOnce(Stop) -> Fut,
        Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let fut = task(self.stop.clone());
        self.spawn(name, Kind::Graceful, fut);
    }

    /// [`Kind::Background`], for a task that returns nothing.
    pub fn spawn_background<F>(&self, name: impl Into<String>, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.spawn(name, Kind::Background, async move {
            task.await;
            Ok(())
        });
    }

    /// The stop every task may watch.
    pub fn stop(&self) -> Stop {
        self.stop.clone()
    }
}

type StopHook = Box<dyn FnOnce() + Send>;

/// See [`Supervisor::graceful_limit`].
pub const DEFAULT_GRACEFUL_LIMIT: Duration = Duration::from_secs(30);

/// Runs until a shutdown signal or a fatal task's end, then drains.
pub struct Supervisor {
    drain: Duration,
    graceful_limit: Duration,
    tasks: Tasks,
    registered: mpsc::UnboundedReceiver<Registered>,
    stop_tx: watch::Sender<bool>,
    on_stop: Vec<StopHook>,
}

impl std::fmt::Debug for Supervisor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Supervisor")
            .field("drain", &self.drain)
            .field("graceful_limit", &self.graceful_limit)
            .field("on_stop", &self.on_stop.len())
            .finish()
    }
}

/// Why the process is stopping.
enum Why {
    Signal,
    Failed(SupervisorError),
}

/// What the supervisor knows of a running task.
struct Running {
    name: String,
    kind: Kind,
    abort: AbortHandle,
}

type Ending = Pin<Box<dyn Future<Output = (tokio::task::Id, Result<anyhow::Result<()>, JoinError>)> + Send>>;

impl Supervisor {
    /// A supervisor that, once stopping, goes on serving for `drain` before
    /// it aborts what is left.
    pub fn new(drain: Duration) -> Self {
        let (register, registered) = mpsc::unbounded_channel();
        let (stop_tx, stop_rx) = watch::channel(false);
        Self {
            drain,
            graceful_limit: DEFAULT_GRACEFUL_LIMIT,
            tasks: Tasks {
                register,
                stop: Stop(stop_rx),
            },
            registered,
            stop_tx,
            on_stop: Vec::new(),
        }
    }

    /// How long the graceful tasks may take after the drain before they are
    /// aborted too (a task stuck on an unreachable server must not keep a
    /// process alive that serves nothing). Default 30 s.
    pub fn graceful_limit(mut self, limit: Duration) -> Self {
        self.graceful_limit = limit;
        self
    }

    /// Run `hook` first thing when stopping (e.g. report not ready, so the
    /// Service stops routing here).
    pub fn on_stop(mut self, hook: impl FnOnce() + Send + 'static) -> Self {
        self.on_stop.push(Box::new(hook));
        self
    }

    /// The handle to spawn tasks with.
    pub fn tasks(&self) -> Tasks {
        self.tasks.clone()
    }

    /// Supervise until `shutdown` resolves or a fatal task ends; then stop
    /// (hooks, [`Stop`]), serve on for the drain, wait for the graceful
    /// tasks and abort the others. `Ok` when stopped by `shutdown` and no
    /// fatal task failed; otherwise the first failure.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), SupervisorError> {
        let Supervisor {
            drain,
            graceful_limit,
            tasks,
            mut registered,
            stop_tx,
            on_stop,
        } = self;
        // The supervisor's own handle must not keep the channel open.
        drop(tasks);
        let mut running: HashMap<tokio::task::Id, Running> = HashMap::new();
        let mut endings: FuturesUnordered<Ending> = FuturesUnordered::new();
        tokio::pin!(shutdown);
        let mut open = true;
        let why = loop {
            tokio::select! {
                () = &mut shutdown => break Why::Signal,
                r = registered.recv(), if open => match r {
                    Some(r) => track(r, &mut running, &mut endings),
                    None => open = false,
                },
                Some((id, result)) = endings.next(), if !endings.is_empty() => {
                    if let Some(failure) = ended(running.remove(&id), result, false) {
                        break Why::Failed(failure);
                    }
                }
            }
        };

        // Stop first, then the hooks: a task that becomes ready after the
        // hooks ran sees the stop when it checks (see `Stop::is_stopped`).
        let _ = stop_tx.send(true);
        for hook in on_stop {
            hook();
        }
        match &why {
            Why::Signal => tracing::info!(
                seconds = drain.as_secs(),
                "stopping: not ready; still serving while the Service drains"
            ),
            Why::Failed(e) => tracing::error!(
                task = %e.task(),
                error = %e,
                seconds = drain.as_secs(),
                "stopping: a task the process needs ended; not ready; still serving while the Service drains"
            ),
        }
        let mut failure = match why {
            Why::Signal => None,
            Why::Failed(e) => Some(e),
        };

        // The drain: everything goes on serving; ends are noted.
        let until = tokio::time::sleep(drain);
        tokio::pin!(until);
        loop {
            tokio::select! {
                () = &mut until => break,
                r = registered.recv(), if open => match r {
                    Some(r) => track(r, &mut running, &mut endings),
                    None => open = false,
                },
                Some((id, result)) = endings.next(), if !endings.is_empty() => {
                    let f = ended(running.remove(&id), result, true);
                    failure = failure.or(f);
                }
            }
        }

        // Then the graceful tasks finish; the others are aborted.
        registered.close();
        while let Some(r) = registered.recv().await {
            track(r, &mut running, &mut endings);
        }
        for task in running.values() {
            if task.kind != Kind::Graceful {
                task.abort.abort();
            }
        }
        let limit = tokio::time::sleep(graceful_limit);
        tokio::pin!(limit);
        loop {
            tokio::select! {
                ending = endings.next() => match ending {
                    Some((id, result)) => {
                        let f = ended(running.remove(&id), result, true);
                        failure = failure.or(f);
                    }
                    None => break,
                },
                () = &mut limit => {
                    for task in running.values() {
                        tracing::error!(task = %task.name, seconds = graceful_limit.as_secs(), "did not stop in time; aborting it");
                        task.abort.abort();
                        failure = failure.or(Some(SupervisorError::Stuck {
                            task: task.name.clone(),
                            seconds: graceful_limit.as_secs(),
                        }));
                    }
                    running.clear();
                    break;
                }
            }
        }
        match failure {
            None => {
                tracing::info!("drained; exiting");
                Ok(())
            }
            Some(e) => Err(e),
        }
    }
}

/// Watch a newly spawned task.
fn track(r: Registered, running: &mut HashMap<tokio::task::Id, Running>, endings: &mut FuturesUnordered<Ending>) {
    let abort = r.handle.abort_handle();
    let id = abort.id();
    running.insert(
        id,
        Running {
            name: r.name,
            kind: r.kind,
            abort,
        },
    );
    let handle = r.handle;
    endings.push(Box::pin(async move { (id, handle.await) }));
}

/// Log a task's end; the failure it is, if it is one. `stopping`: the
/// process is stopping already (then a fatal task may return).
fn ended(
    task: Option<Running>,
    result: Result<anyhow::Result<()>, JoinError>,
    stopping: bool,
) -> Option<SupervisorError> {
    let (name, kind) = match task {
        Some(t) => (t.name, t.kind),
        None => ("(unknown)".to_string(), Kind::Fatal),
    };
    let fatal = kind != Kind::Background;
    match result {
        Ok(Ok(())) if stopping || !fatal => {
            tracing::debug!(task = %name, "task ended");
            None
        }
        Ok(Ok(())) => Some(SupervisorError::Ended { task: name }),
        Ok(Err(error)) if fatal => Some(SupervisorError::Failed { task: name, error }),
        Ok(Err(error)) => {
            tracing::warn!(task = %name, error = format!("{error:#}"), "a background task failed");
            None
        }
        Err(e) if e.is_cancelled() => None,
        Err(e) => {
            let why = e.to_string();
            if fatal {
                Some(SupervisorError::Panicked { task: name, why })
            } else {
                tracing::error!(task = %name, %why, "a background task panicked");
                None
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use tokio::time::Instant;

    const DRAIN: Duration = Duration::from_secs(5);

    /// A supervisor whose stop hook clears `ready`.
    fn supervisor() -> (Supervisor, Arc<AtomicBool>) {
        let ready = Arc::new(AtomicBool::new(true));
        let r = ready.clone();
        let s = Supervisor::new(DRAIN).on_stop(move || r.store(false, Ordering::SeqCst));
        (s, ready)
    }

    /// Serves until aborted; counts whether it was still serving at `at`.
    async fn server(serving_at: Arc<AtomicBool>, at: Duration) -> anyhow::Result<()> {
        tokio::time::sleep(at).await;
        serving_at.store(true, Ordering::SeqCst);
        std::future::pending::<()>().await;
        Ok(())
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_fatal_task_stops_with_its_name_after_the_drain() {
        let (s, ready) = supervisor();
        let tasks = s.tasks();
        let served_during_drain = Arc::new(AtomicBool::new(false));
        tasks.spawn_fatal("server", server(served_during_drain.clone(), Duration::from_secs(4)));
        tasks.spawn_fatal("webhook server", async {
            tokio::time::sleep(Duration::from_secs(1)).await;
            anyhow::bail!("binding 0.0.0.0:9443: address in use")
        });
        let handed_over = Arc::new(AtomicBool::new(false));
        let h = handed_over.clone();
        tasks.spawn_graceful("leader", move |stop| async move {
            stop.stopped().await;
            // Finishing in-flight work takes longer than the drain: waited for.
            tokio::time::sleep(Duration::from_secs(7)).await;
            h.store(true, Ordering::SeqCst);
            Ok(())
        });
        let started = Instant::now();
        let err = s.run(std::future::pending()).await.unwrap_err();
        assert_eq!(err.task(), "webhook server");
        assert!(matches!(err, SupervisorError::Failed { .. }), "{err:?}");
        let message = err.to_string();
        assert!(
            message.contains("webhook server") && message.contains("address in use"),
            "{message}"
        );
        assert!(!ready.load(Ordering::SeqCst), "readiness went false");
        assert!(
            served_during_drain.load(Ordering::SeqCst),
            "the other tasks served on during the drain"
        );
        assert!(handed_over.load(Ordering::SeqCst), "the graceful task finished");
        assert!(
            started.elapsed() >= Duration::from_secs(1) + Duration::from_secs(7),
            "{:?}",
            started.elapsed()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_graceful_task_stuck_after_the_drain_is_aborted_at_the_limit() {
        let (s, ready) = supervisor();
        let s = s.graceful_limit(Duration::from_secs(10));
        let tasks = s.tasks();
        // A lease hand-over against an apiserver that never answers.
        tasks.spawn_graceful("leader", move |stop| async move {
            stop.stopped().await;
            std::future::pending::<()>().await;
            Ok(())
        });
        let started = Instant::now();
        let err = s.run(tokio::time::sleep(Duration::from_secs(1))).await.unwrap_err();
        assert!(
            matches!(&err, SupervisorError::Stuck { task, seconds: 10 } if task == "leader"),
            "{err:?}"
        );
        assert!(!ready.load(Ordering::SeqCst));
        let took = started.elapsed();
        assert!(
            took >= Duration::from_secs(1) + DRAIN + Duration::from_secs(10)
                && took < Duration::from_secs(1) + DRAIN + Duration::from_secs(11),
            "{took:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_stop_is_visible_before_the_hooks_run() {
        let tasks_seen = Arc::new(AtomicBool::new(false));
        let (s, _) = supervisor();
        let stop = s.tasks().stop();
        let seen = tasks_seen.clone();
        let s = s.on_stop(move || seen.store(stop.is_stopped(), Ordering::SeqCst));
        s.run(std::future::ready(())).await.unwrap();
        assert!(
            tasks_seen.load(Ordering::SeqCst),
            "a task that became ready after the hooks would not see the stop"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_fatal_task_that_returns_is_a_failure_too() {
        let (s, ready) = supervisor();
        s.tasks().spawn_fatal("policy service", async { Ok(()) });
        let started = Instant::now();
        let err = s.run(std::future::pending()).await.unwrap_err();
        assert!(
            matches!(&err, SupervisorError::Ended { task } if task == "policy service"),
            "{err:?}"
        );
        assert!(!ready.load(Ordering::SeqCst));
        assert!(started.elapsed() >= DRAIN, "the drain ran");
    }

    #[tokio::test(start_paused = true)]
    async fn a_panicking_fatal_task_is_named() {
        let (s, _) = supervisor();
        s.tasks().spawn_fatal("signer", async { panic!("boom") });
        let err = s.run(std::future::pending()).await.unwrap_err();
        assert!(
            matches!(&err, SupervisorError::Panicked { task, .. } if task == "signer"),
            "{err:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_shutdown_signal_drains_and_ends_cleanly() {
        let (s, ready) = supervisor();
        let tasks = s.tasks();
        let served_during_drain = Arc::new(AtomicBool::new(false));
        // Signal at 1 s; the server is still asked at 5 s (inside the drain).
        tasks.spawn_fatal("server", server(served_during_drain.clone(), Duration::from_secs(5)));
        tasks.spawn_background("reloader", async {
            tokio::time::sleep(Duration::from_secs(2)).await;
        });
        let saw_stop = Arc::new(AtomicBool::new(false));
        let seen = saw_stop.clone();
        tasks.spawn_graceful("leader", move |stop| async move {
            stop.stopped().await;
            seen.store(true, Ordering::SeqCst);
            Ok(())
        });
        let started = Instant::now();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let _ = tx.send(());
        });
        s.run(async {
            let _ = rx.await;
        })
        .await
        .unwrap();
        assert!(!ready.load(Ordering::SeqCst), "readiness went false");
        assert!(saw_stop.load(Ordering::SeqCst), "the graceful task saw the stop");
        assert!(served_during_drain.load(Ordering::SeqCst), "served during the drain");
        assert!(
            started.elapsed() >= Duration::from_secs(1) + DRAIN,
            "{:?}",
            started.elapsed()
        );
        assert!(tasks.stop().is_stopped());
    }

    #[tokio::test(start_paused = true)]
    async fn tasks_spawned_by_tasks_are_supervised() {
        let (s, _) = supervisor();
        let tasks = s.tasks();
        let inner = tasks.clone();
        tasks.spawn_graceful("start-up", move |stop| async move {
            inner.spawn_fatal("late server", async {
                tokio::time::sleep(Duration::from_secs(3)).await;
                anyhow::bail!("the listener closed")
            });
            stop.stopped().await;
            Ok(())
        });
        drop(tasks);
        let err = s.run(std::future::pending()).await.unwrap_err();
        assert_eq!(err.task(), "late server");
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_background_task_does_not_stop_anything() {
        let (s, ready) = supervisor();
        s.tasks()
            .spawn("reload", Kind::Background, async { anyhow::bail!("cannot read") });
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(10)).await;
            let _ = tx.send(());
        });
        let started = Instant::now();
        s.run(async {
            let _ = rx.await;
        })
        .await
        .unwrap();
        assert!(started.elapsed() >= Duration::from_secs(10), "ran until the signal");
        assert!(!ready.load(Ordering::SeqCst));
    }
}
