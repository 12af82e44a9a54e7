//! A throwaway containerd node for benchmarks: containerd 1.6 and petrel's
//! snapshotter with their own state under one directory, CRI pulls through petrel,
//! `ctr run` of a command; everything stopped and unmounted when dropped.

use anyhow::{bail, Context};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Whether containerd, ctr and runc are installed.
pub fn available() -> bool {
    ["containerd", "ctr", "runc"].iter().all(|tool| {
        Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

/// containerd and the snapshotter, pulling `link`'s images over plain HTTP.
pub struct Node {
    dir: PathBuf,
    children: Vec<Child>,
}

impl Node {
    /// Starts both under `dir` (fresh); `daemon` is TOML for the snapshotter's
    /// `[daemon]` table (mount daemon settings).
    pub fn start(petrel: &Path, dir: &Path, link: &str, daemon: &str) -> anyhow::Result<Node> {
        Self::start_with(petrel, dir, link, "", daemon)
    }

    /// [`Node::start`] with `top` (TOML keys) added to the snapshotter's config.
    pub fn start_with(petrel: &Path, dir: &Path, link: &str, top: &str, daemon: &str) -> anyhow::Result<Node> {
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir)?;
        let r = dir.display();
        std::fs::write(
            dir.join("containerd.toml"),
            format!(
                "version = 2\nroot = \"{r}/root\"\nstate = \"{r}/state\"\n[grpc]\n  address = \"{r}/containerd.sock\"\n[proxy_plugins.petrel]\n  type = \"snapshot\"\n  address = \"{r}/snapshotter.sock\"\n[plugins.\"io.containerd.grpc.v1.cri\"]\n  restrict_oom_score_adj = true\n  [plugins.\"io.containerd.grpc.v1.cri\".containerd]\n    snapshotter = \"petrel\"\n    disable_snapshot_annotations = false\n  [plugins.\"io.containerd.grpc.v1.cri\".registry.mirrors.\"{link}\"]\n    endpoint = [\"http://{link}\"]\n"
            ),
        )?;
        std::fs::write(
            dir.join("snapshotter.toml"),
            format!("root = \"{r}/snapshotter\"\naddress = \"{r}/snapshotter.sock\"\n{top}\n\n[daemon]\n{daemon}\n"),
        )?;
        let log = |name: &str| std::fs::File::create(dir.join(name));
        let snapshotter = Command::new(petrel)
            .arg("snapshotter")
            .arg("--config")
            .arg(dir.join("snapshotter.toml"))
            .stdout(Stdio::null())
            .stderr(log("snapshotter.log")?)
            .spawn()?;
        let containerd = Command::new("containerd")
            .arg("--config")
            .arg(dir.join("containerd.toml"))
            .stdout(Stdio::null())
            .stderr(log("containerd.log")?)
            .spawn()?;
        let node = Node {
            dir: dir.to_path_buf(),
            children: vec![containerd, snapshotter],
        };
        let started = Instant::now();
        while !node
            .ctr("default")
            .args(["snapshots", "--snapshotter", "petrel", "ls"])
            .output()
            .is_ok_and(|o| o.status.success())
        {
            if started.elapsed() > Duration::from_secs(30) {
                bail!("containerd did not come up (logs in {})", dir.display());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(node)
    }

    /// `ctr` for this node's containerd in `namespace`.
    pub fn ctr(&self, namespace: &str) -> Command {
        let mut command = Command::new("ctr");
        command
            .arg("--address")
            .arg(self.dir.join("containerd.sock"))
            .args(["-n", namespace]);
        command
    }

    /// Pulls `image` through CRI (as the kubelet does): into `k8s.io`, with petrel.
    pub fn cri_pull(&self, image: &str) -> anyhow::Result<()> {
        cri_pull(&self.dir.join("containerd.sock"), image)
    }

    /// Runs `command` in a new container of `image` (pulled) with `snapshotter`; its
    /// output must say `ready`.
    pub fn run(&self, namespace: &str, snapshotter: &str, image: &str, command: &[&str]) -> anyhow::Result<()> {
        let out = self
            .ctr(namespace)
            .args(["run", "--rm", "--snapshotter", snapshotter, image, "bench"])
            .args(command)
            .output()?;
        if !out.status.success() || !String::from_utf8_lossy(&out.stdout).contains("ready") {
            bail!(
                "container of {image} failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ =
                rustix::process::kill_process(rustix::process::Pid::from_child(child), rustix::process::Signal::TERM);
            let _ = child.wait();
        }
        // Their mount daemons exit with the mounts.
        petrel_fixtures::unmount_below(&self.dir);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Pulls `image` through the CRI image service at `socket`.
pub fn cri_pull(socket: &Path, image: &str) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime
        .block_on(async {
            let path = socket.to_path_buf();
            let channel = tonic::transport::Endpoint::try_from("http://[::]:50051")?
                .connect_with_connector(tower::service_fn(move |_| {
                    let path = path.clone();
                    async move {
                        Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                            tokio::net::UnixStream::connect(path).await?,
                        ))
                    }
                }))
                .await?;
            let mut client = k8s_cri::v1::image_service_client::ImageServiceClient::new(channel);
            let request = k8s_cri::v1::PullImageRequest {
                image: Some(k8s_cri::v1::ImageSpec {
                    image: image.to_string(),
                    ..Default::default()
                }),
                ..Default::default()
            };
            client.pull_image(request).await?;
            anyhow::Ok(())
        })
        .with_context(|| format!("CRI pull of {image}"))
}
