//! A child process for the length of a test: killed when dropped, its
//! output in a file that failure messages can quote.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use anyhow::{Context, Result};
use tokio::process::{Child, Command};

/// A running child process, killed (SIGKILL) when dropped.
#[derive(Debug)]
pub struct Process {
    child: Child,
    log: PathBuf,
}

fn append(path: &Path) -> Result<File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))
}

impl Process {
    /// Start `cmd` with its stdout and stderr appended to `log`.
    pub fn spawn(what: &str, cmd: &mut Command, log: &Path) -> Result<Self> {
        let out = append(log)?;
        let err = out.try_clone()?;
        Self::start(what, cmd.stdout(Stdio::from(out)).stderr(Stdio::from(err)), log)
    }

    /// Start `cmd` with its stdout to the file `stdout` (created afresh), or
    /// nowhere when `None`, and its stderr appended to `log`.
    pub fn spawn_split(what: &str, cmd: &mut Command, stdout: Option<&Path>, log: &Path) -> Result<Self> {
        let out = match stdout {
            Some(path) => Stdio::from(File::create(path).with_context(|| format!("creating {}", path.display()))?),
            None => Stdio::null(),
        };
        Self::start(what, cmd.stdout(out).stderr(Stdio::from(append(log)?)), log)
    }

    fn start(what: &str, cmd: &mut Command, log: &Path) -> Result<Self> {
        let child = cmd
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {what}"))?;
        Ok(Self {
            child,
            log: log.to_path_buf(),
        })
    }

    /// What it wrote to its log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The log file.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Its pid, while it runs.
    pub fn id(&self) -> Option<u32> {
        self.child.id()
    }

    /// The child itself (to wait for it, or check whether it exited).
    pub fn child(&mut self) -> &mut Child {
        &mut self.child
    }

    /// Kill it (SIGKILL) and reap it.
    pub async fn kill(&mut self) -> Result<()> {
        self.child.kill().await.context("killing a child process")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{eventually, secs};

    #[tokio::test]
    async fn output_goes_to_the_log_and_drop_kills() {
        let dir = std::env::temp_dir().join(format!("mandate-testsupport-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("p.log");
        let mut p = Process::spawn(
            "a shell",
            Command::new("sh").args(["-c", "echo out; echo err >&2; exec sleep 600"]),
            &log,
        )
        .unwrap();
        eventually("both lines in the log", secs(10), async || {
            let l = p.log();
            l.contains("out") && l.contains("err")
        })
        .await
        .unwrap();
        assert!(p.child().try_wait().unwrap().is_none(), "it should still run");
        p.kill().await.unwrap();
        assert!(p.child().try_wait().unwrap().is_some());

        let out = dir.join("stdout");
        let q = Process::spawn_split(
            "a shell",
            Command::new("sh").args(["-c", "echo a; echo b >&2"]),
            Some(&out),
            &log,
        )
        .unwrap();
        eventually("stdout apart from the log", secs(10), async || {
            std::fs::read_to_string(&out).unwrap_or_default() == "a\n" && q.log().ends_with("b\n")
        })
        .await
        .unwrap();
        let err = Process::spawn("nothing", &mut Command::new("/nonexistent/binary"), &log).unwrap_err();
        assert!(err.to_string().contains("starting nothing"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
