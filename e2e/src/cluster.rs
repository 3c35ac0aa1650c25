//! The local test cluster, as `hack/cluster.sh` describes it in `cluster.env`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use kube::Client;
use kube::config::{KubeConfigOptions, Kubeconfig};

use crate::TestNamespace;

/// Where `hack/cluster.sh` keeps a cluster's state unless `MANDATE_CLUSTER_DIR` says otherwise.
pub const DEFAULT_CLUSTER_DIR: &str = "/var/tmp/mandate-cluster";

/// Which shape of cluster is running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// etcd + kube-apiserver only: objects are stored and admitted, pods never run.
    ControlPlane,
    /// The control plane plus a kubelet node: pods really run.
    Node,
}

/// What `hack/cluster.sh up` wrote to `<cluster dir>/cluster.env`.
#[derive(Debug, Clone)]
pub struct ClusterInfo {
    pub mode: Mode,
    pub dir: PathBuf,
    pub kubeconfig: PathBuf,
    pub kubectl: PathBuf,
    pub apiserver: String,
    pub containerd_socket: Option<PathBuf>,
    /// containerd's `ctr`, as the node runs it (built with it).
    pub ctr: Option<PathBuf>,
    pub node_name: Option<String>,
}

impl ClusterInfo {
    /// The cluster dir: `MANDATE_CLUSTER_DIR`, or [`DEFAULT_CLUSTER_DIR`].
    pub fn dir() -> PathBuf {
        std::env::var_os("MANDATE_CLUSTER_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_CLUSTER_DIR))
    }

    /// Read the running cluster's description.
    pub fn load() -> Result<Self> {
        let dir = Self::dir();
        let env = dir.join("cluster.env");
        let text = std::fs::read_to_string(&env).map_err(|e| {
            anyhow::anyhow!(
                "no test cluster is running ({}: {e}). Start one with `hack/cluster.sh up` \
                 (control plane) or `hack/cluster.sh up --node` (pods run), or run `make test`",
                env.display()
            )
        })?;
        Self::parse(&text, &dir)
    }

    /// Parse `KEY=VALUE` lines as `hack/cluster.sh` writes them.
    pub fn parse(text: &str, dir: &Path) -> Result<Self> {
        let vars: BTreeMap<&str, &str> = text
            .lines()
            .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
            .filter_map(|l| l.split_once('='))
            .collect();
        let get = |k: &str| -> Result<&str> {
            match vars.get(k) {
                Some(v) if !v.is_empty() => Ok(v),
                _ => bail!(
                    "{k} missing from {}/cluster.env: the cluster is still starting or a start \
                     failed; see `hack/cluster.sh status`",
                    dir.display()
                ),
            }
        };
        let opt = |k: &str| vars.get(k).filter(|v| !v.is_empty()).map(|v| v.to_string());
        let mode = match get("MANDATE_CLUSTER_MODE")? {
            "node" => Mode::Node,
            "control-plane" => Mode::ControlPlane,
            other => bail!("unknown MANDATE_CLUSTER_MODE '{other}' in cluster.env"),
        };
        Ok(Self {
            mode,
            dir: dir.to_path_buf(),
            kubeconfig: get("MANDATE_KUBECONFIG")?.into(),
            kubectl: get("MANDATE_KUBECTL")?.into(),
            apiserver: get("MANDATE_APISERVER")?.to_string(),
            containerd_socket: opt("MANDATE_CONTAINERD_SOCK").map(PathBuf::from),
            ctr: opt("MANDATE_CTR").map(PathBuf::from),
            node_name: opt("MANDATE_NODE_NAME"),
        })
    }
}

/// What one kubectl run printed.
#[derive(Debug, Clone)]
pub struct KubectlOutput {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
}

/// A connection to the running test cluster.
#[derive(Clone)]
pub struct Cluster {
    info: ClusterInfo,
    client: Client,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster").field("info", &self.info).finish()
    }
}

impl Cluster {
    /// Connect to the cluster `hack/cluster.sh up` started, and check that it answers.
    pub async fn connect() -> Result<Self> {
        let info = ClusterInfo::load()?;
        let client = client_for(&info.kubeconfig).await?;
        let version = client.apiserver_version().await.with_context(|| {
            format!(
                "the test cluster's apiserver at {} does not answer; see `hack/cluster.sh status`",
                info.apiserver
            )
        })?;
        if version.git_version.is_empty() {
            bail!("the apiserver at {} reported no version", info.apiserver);
        }
        Ok(Self { info, client })
    }

    pub fn client(&self) -> Client {
        self.client.clone()
    }

    pub fn info(&self) -> &ClusterInfo {
        &self.info
    }

    /// Fail unless pods can run here (a node, not only a control plane).
    pub fn require_node(&self) -> Result<()> {
        if self.info.mode != Mode::Node {
            bail!(
                "this test runs pods, but the test cluster is only a control plane; \
                 restart it with `hack/cluster.sh down && hack/cluster.sh up --node`"
            );
        }
        Ok(())
    }

    /// A fresh namespace named `<prefix>-<random>`; see [`TestNamespace`].
    pub async fn namespace(&self, prefix: &str) -> Result<TestNamespace> {
        TestNamespace::new(self.clone(), prefix).await
    }

    /// Run `test` in a fresh namespace; on error print the namespace's state;
    /// delete the namespace either way. A panic inside `test` is reported and
    /// cleaned up by [`TestNamespace`]'s `Drop`.
    pub async fn with_namespace<F>(&self, prefix: &str, test: F) -> Result<()>
    where
        F: AsyncFnOnce(&TestNamespace) -> Result<()>,
    {
        let ns = self.namespace(prefix).await?;
        let result = test(&ns).await;
        if let Err(e) = &result {
            eprintln!("test in namespace {} failed: {e:#}", ns.name());
            eprintln!("{}", ns.dump().await);
        }
        let deleted = ns.delete().await;
        result.and(deleted)
    }

    /// Run the cluster's own kubectl (its version) with the admin kubeconfig; its stdout.
    pub async fn kubectl(&self, args: &[&str]) -> Result<String> {
        self.kubectl_with_input(args, "").await
    }

    /// Run kubectl with `input` on its standard input (`apply -f -`); its stdout.
    pub async fn kubectl_with_input(&self, args: &[&str], input: &str) -> Result<String> {
        let out = self.kubectl_output(args, input).await?;
        if !out.success {
            bail!("kubectl {} failed: {}", args.join(" "), out.stderr.trim());
        }
        Ok(out.stdout)
    }

    /// Run kubectl with `input` on its standard input, whatever its outcome:
    /// what a user would see (exit status, stdout, stderr with warnings).
    pub async fn kubectl_output(&self, args: &[&str], input: &str) -> Result<KubectlOutput> {
        use tokio::io::AsyncWriteExt;
        let mut child = tokio::process::Command::new(&self.info.kubectl)
            .arg("--kubeconfig")
            .arg(&self.info.kubeconfig)
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .with_context(|| format!("running {}", self.info.kubectl.display()))?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(input.as_bytes())
                .await
                .context("writing kubectl's input")?;
        }
        let out = child.wait_with_output().await.context("waiting for kubectl")?;
        Ok(KubectlOutput {
            success: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }

    /// Install (or update) Mandate's CRDs from `crds/mandate.dev.yaml` and
    /// wait until they are Established. Safe to call from tests running at
    /// the same time: an apply that loses a race with another is retried.
    pub async fn install_crds(&self) -> Result<()> {
        let yaml = std::fs::read_to_string(repo_dir().join("crds/mandate.dev.yaml"))
            .context("reading crds/mandate.dev.yaml")?;
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            match self
                .kubectl_with_input(&["apply", "--server-side", "--force-conflicts", "-f", "-"], &yaml)
                .await
            {
                Ok(_) => break,
                Err(e) if tokio::time::Instant::now() < deadline && is_race(&e) => {
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
                Err(e) => return Err(e.context("installing Mandate's CRDs")),
            }
        }
        self.kubectl(&[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/agentpolicies.mandate.dev",
            "crd/agentidentities.mandate.dev",
            "crd/agentapprovals.mandate.dev",
        ])
        .await?;
        Ok(())
    }

    /// Pack `binary` (with the libraries it links) into an image named
    /// `reference` and import it into the node's containerd, using
    /// `hack/image.sh`. Pods then use it with `imagePullPolicy: Never`.
    pub async fn load_image(&self, reference: &str, binary: &Path) -> Result<()> {
        self.require_node()?;
        let script = hack_dir().join("image.sh");
        let archive = run(&script, &["build", reference, &binary.to_string_lossy()]).await?;
        let archive = archive
            .lines()
            .last()
            .context("hack/image.sh build printed no archive path")?
            .to_string();
        run(&script, &["import", &archive]).await?;
        Ok(())
    }
}

impl Cluster {
    /// Build the sidecar image from the workspace's debug binaries
    /// (mandate-sidecar, mandate-egress-init, and Debian's nft for the
    /// egress rules) and load it into the node.
    pub async fn load_sidecar_image(&self, reference: &str, sidecar: &Path) -> Result<()> {
        self.require_node()?;
        let script = hack_dir().join("image.sh");
        let dir = sidecar.parent().context("the sidecar binary has no directory")?;
        let archive = run(&script, &["sidecar", reference, &dir.to_string_lossy()]).await?;
        let archive = archive
            .lines()
            .last()
            .context("hack/image.sh sidecar printed no archive path")?
            .to_string();
        run(&script, &["import", &archive]).await?;
        Ok(())
    }
}

/// The repository's `hack/` directory.
pub fn hack_dir() -> PathBuf {
    repo_dir().join("hack")
}

/// The repository's root directory.
pub fn repo_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Whether a kubectl failure is another writer winning a race.
fn is_race(e: &anyhow::Error) -> bool {
    let msg = format!("{e:#}");
    msg.contains("AlreadyExists") || msg.contains("Conflict") || msg.contains("the object has been modified")
}

async fn run(program: &Path, args: &[&str]) -> Result<String> {
    let out = tokio::process::Command::new(program)
        .args(args)
        .output()
        .await
        .with_context(|| format!("running {}", program.display()))?;
    if !out.status.success() {
        bail!(
            "{} {} failed ({}): {}",
            program.display(),
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A client for the cluster a kubeconfig file points at.
pub(crate) async fn client_for(kubeconfig: &Path) -> Result<Client> {
    let kc =
        Kubeconfig::read_from(kubeconfig).with_context(|| format!("reading kubeconfig {}", kubeconfig.display()))?;
    let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .with_context(|| format!("loading kubeconfig {}", kubeconfig.display()))?;
    Client::try_from(config).context("building a kube client")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cluster_env() {
        let text = "MANDATE_CLUSTER_MODE=node\nMANDATE_KUBECONFIG=/x/kubeconfig\n\
                    MANDATE_KUBECTL=/bin/kubectl\nMANDATE_APISERVER=https://10.200.0.1:6443\n\
                    MANDATE_CONTAINERD_SOCK=/x/c.sock\nMANDATE_NODE_NAME=localhost\n";
        let info = ClusterInfo::parse(text, Path::new("/x")).unwrap();
        assert_eq!(info.mode, Mode::Node);
        assert_eq!(info.kubeconfig, Path::new("/x/kubeconfig"));
        assert_eq!(info.containerd_socket.as_deref(), Some(Path::new("/x/c.sock")));
        assert_eq!(info.node_name.as_deref(), Some("localhost"));
    }

    #[test]
    fn control_plane_has_no_node() {
        let text = "MANDATE_CLUSTER_MODE=control-plane\nMANDATE_KUBECONFIG=/k\nMANDATE_KUBECTL=/c\n\
                    MANDATE_APISERVER=https://127.0.0.1:1\nMANDATE_CONTAINERD_SOCK=\nMANDATE_NODE_NAME=\n";
        let info = ClusterInfo::parse(text, Path::new("/x")).unwrap();
        assert_eq!(info.mode, Mode::ControlPlane);
        assert!(info.containerd_socket.is_none());
        assert!(info.node_name.is_none());
    }

    #[test]
    fn half_written_env_is_an_error_that_says_what_to_do() {
        // What a start that crashed after marking its mode leaves behind.
        let err = ClusterInfo::parse("MANDATE_CLUSTER_MODE=node\n", Path::new("/x")).unwrap_err();
        assert!(err.to_string().contains("hack/cluster.sh status"), "{err}");
        let err = ClusterInfo::parse("MANDATE_CLUSTER_MODE=k3s\n", Path::new("/x")).unwrap_err();
        assert!(err.to_string().contains("unknown MANDATE_CLUSTER_MODE"), "{err}");
    }
}
