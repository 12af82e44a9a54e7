//! A containerd 1.6 of our own (root, state, socket under a temp dir) with petrel's
//! snapshotter as a proxy plugin; both stopped (only our PIDs) when dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub fn containerd_available() -> bool {
    let ok = ["containerd", "ctr", "runc"].iter().all(|t| {
        Command::new("sh")
            .arg("-c")
            .arg(format!("command -v {t}"))
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    });
    if !ok {
        petrel_fixtures::report_skip("needs containerd, ctr and runc (scripts/install-deps.sh)");
    }
    ok
}

pub struct Containerd {
    pub dir: tempfile::TempDir,
    containerd: Option<Child>,
    snapshotter: Option<Child>,
}

impl Containerd {
    pub fn start() -> Self {
        Self::start_with(None)
    }

    /// With `cri_registry` (host:port), the CRI plugin is on, pulls through petrel with
    /// image annotations passed to the snapshotter, and that registry is plain HTTP.
    pub fn start_with(cri_registry: Option<&str>) -> Self {
        Self::start_configured(cri_registry, "")
    }

    /// Like `start_with`, with `snapshotter_config` appended to the snapshotter's TOML.
    pub fn start_configured(cri_registry: Option<&str>, snapshotter_config: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut config = format!(
            "version = 2\nroot = \"{root}/root\"\nstate = \"{root}/state\"\n[grpc]\n  address = \"{root}/containerd.sock\"\n[proxy_plugins.petrel]\n  type = \"snapshot\"\n  address = \"{root}/snapshotter.sock\"\n",
            root = dir.path().display()
        );
        match cri_registry {
            None => config = format!("disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n{config}"),
            Some(registry) => config.push_str(&format!(
                "[plugins.\"io.containerd.grpc.v1.cri\"]\n  restrict_oom_score_adj = true\n  [plugins.\"io.containerd.grpc.v1.cri\".containerd]\n    snapshotter = \"petrel\"\n    disable_snapshot_annotations = false\n  [plugins.\"io.containerd.grpc.v1.cri\".registry.mirrors.\"{registry}\"]\n    endpoint = [\"http://{registry}\"]\n"
            )),
        }
        std::fs::write(dir.path().join("containerd.toml"), config).unwrap();
        let metrics = format!("127.0.0.1:{}", super::free_port());
        std::fs::write(dir.path().join("metrics.addr"), &metrics).unwrap();
        // A bound of 1 GiB unless the test sets its own.
        let bound = if snapshotter_config.contains("cache_max_bytes") {
            ""
        } else {
            "cache_max_bytes = 1073741824\n"
        };
        std::fs::write(
            dir.path().join("snapshotter.toml"),
            format!("metrics_address = \"{metrics}\"\n{bound}{snapshotter_config}"),
        )
        .unwrap();
        let mut harness = Containerd {
            dir,
            containerd: None,
            snapshotter: None,
        };
        harness.start_snapshotter();
        harness.start_containerd();
        harness.wait_ready();
        harness
    }

    fn start_containerd(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("containerd.log"))
            .unwrap();
        self.containerd = Some(
            Command::new("containerd")
                .arg("--config")
                .arg(self.dir.path().join("containerd.toml"))
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap(),
        );
    }

    /// A node's power cut, as far as our processes go: containerd, the snapshotter
    /// and every mount daemon killed with SIGKILL (their mounts left stale), then
    /// containerd and the snapshotter started again on the same state.
    pub fn kill_everything_and_restart(&mut self) {
        for pid in self.mount_daemon_pids() {
            self.kill_mount_daemon(pid);
        }
        for child in [self.containerd.take(), self.snapshotter.take()].into_iter().flatten() {
            let mut child = child;
            let _ = child.kill();
            let _ = child.wait();
        }
        self.start_snapshotter();
        self.start_containerd();
        self.wait_ready();
    }

    pub fn snapshotter_root(&self) -> PathBuf {
        self.dir.path().join("snapshotter")
    }

    /// Address of the snapshotter's Prometheus endpoint.
    pub fn metrics_address(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("metrics.addr")).unwrap()
    }

    /// What the snapshotter's Prometheus endpoint answers (headers and body).
    pub fn metrics(&self) -> String {
        let mut stream = std::net::TcpStream::connect(self.metrics_address()).unwrap();
        std::io::Write::write_all(&mut stream, b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
        let mut answer = String::new();
        std::io::Read::read_to_string(&mut stream, &mut answer).unwrap();
        answer
    }

    pub fn start_snapshotter(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("snapshotter.log"))
            .unwrap();
        self.snapshotter = Some(
            super::petrel()
                .env("PETREL_LOG", "info,petrel_snapshotter=debug,fuser=error")
                .arg("snapshotter")
                .arg("--config")
                .arg(self.dir.path().join("snapshotter.toml"))
                .arg("--root")
                .arg(self.snapshotter_root())
                .arg("--address")
                .arg(self.dir.path().join("snapshotter.sock"))
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap(),
        );
    }

    /// Stops the snapshotter (SIGTERM) and starts it again.
    pub fn restart_snapshotter(&mut self) {
        if let Some(mut child) = self.snapshotter.take() {
            let _ =
                rustix::process::kill_process(rustix::process::Pid::from_child(&child), rustix::process::Signal::TERM);
            let _ = child.wait();
        }
        self.start_snapshotter();
        self.wait_ready();
    }

    /// Waits with a real call until containerd answers through the snapshotter.
    pub fn wait_ready(&self) {
        let started = Instant::now();
        loop {
            if self.dir.path().join("containerd.sock").exists() {
                let out = self.ctr(&["snapshots", "--snapshotter", "petrel", "ls"]);
                if out.status.success() {
                    return;
                }
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "containerd did not come up: {}",
                std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn ctr(&self, args: &[&str]) -> Output {
        Command::new("ctr")
            .arg("--address")
            .arg(self.dir.path().join("containerd.sock"))
            .args(args)
            .output()
            .unwrap()
    }

    /// Runs `command` in a new container `name` of `image` (namespace `namespace`) on
    /// petrel's snapshotter, removed when it exits.
    pub fn run_container(&self, namespace: &str, image: &str, name: &str, command: &[&str]) -> Output {
        let mut args = vec!["-n", namespace, "run", "--rm", "--snapshotter", "petrel", image, name];
        args.extend_from_slice(command);
        let out = self.ctr(&args);
        // `ctr run` can lose the output of a process that exits at once (its stdout
        // fifo closes first: containerd/containerd#770). A run that succeeded and
        // printed nothing runs once more; callers still check what it printed.
        if out.status.success() && out.stdout.is_empty() {
            let again = format!("{name}-again");
            args[7] = &again;
            return self.ctr(&args);
        }
        out
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The daemon spec the only lazy mount runs from, as its daemon answers it
    /// (`petrel stats --spec`).
    pub fn daemon_spec(&self) -> String {
        let mounts: Vec<PathBuf> = std::fs::read_dir(self.snapshotter_root().join("mounts"))
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .collect();
        assert_eq!(mounts.len(), 1, "{mounts:?}");
        let out = super::petrel()
            .arg("stats")
            .arg("--runtime-dir")
            .arg(self.snapshotter_root().join("run"))
            .arg(&mounts[0])
            .arg("--spec")
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Waits (up to 20 s) until every lazy mount's daemon has made what it fetched
    /// durable in the node cache (its stats show no uncommitted bytes): a daemon
    /// killed after that loses nothing it cached.
    pub fn wait_caches_durable(&self) {
        let mounts: Vec<PathBuf> = std::fs::read_dir(self.snapshotter_root().join("mounts"))
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .collect();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        for mount in mounts {
            loop {
                let out = super::petrel()
                    .arg("stats")
                    .arg("--runtime-dir")
                    .arg(self.snapshotter_root().join("run"))
                    .arg(&mount)
                    .output()
                    .unwrap();
                let stats: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
                if stats["stats"]["cache_uncommitted_bytes"] == 0 {
                    break;
                }
                assert!(std::time::Instant::now() < deadline, "{mount:?}: {stats}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    /// Live petrel FUSE mounts under the snapshotter's root.
    pub fn lazy_mount_count(&self) -> usize {
        let root = self.snapshotter_root().to_string_lossy().to_string();
        std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .filter(|l| l.contains(&root) && l.contains(" - fuse petrel:"))
            .count()
    }

    /// Pids of the snapshotter's mount daemons, from their pid files.
    pub fn mount_daemon_pids(&self) -> Vec<i32> {
        std::fs::read_dir(self.snapshotter_root().join("run"))
            .map(|entries| {
                entries
                    .flatten()
                    .filter(|e| e.path().extension().is_some_and(|x| x == "pid"))
                    .filter_map(|e| std::fs::read_to_string(e.path()).ok()?.trim().parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Kills mount daemon `pid` (one this harness's snapshotter started) and waits
    /// until it is gone.
    pub fn kill_mount_daemon(&self, pid: i32) {
        assert!(
            self.mount_daemon_pids().contains(&pid),
            "{pid} is not one of our daemons"
        );
        rustix::process::kill_process(
            rustix::process::Pid::from_raw(pid).unwrap(),
            rustix::process::Signal::KILL,
        )
        .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while Path::new(&format!("/proc/{pid}")).exists() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits up to 20 s for the lazy mounts to be gone; returns how many are left.
    pub fn wait_lazy_mounts_gone(&self) -> usize {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while self.lazy_mount_count() > 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        self.lazy_mount_count()
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        for child in [self.containerd.take(), self.snapshotter.take()].into_iter().flatten() {
            let mut child = child;
            let _ =
                rustix::process::kill_process(rustix::process::Pid::from_child(&child), rustix::process::Signal::TERM);
            let _ = child.wait();
        }
        petrel_fixtures::unmount_below(self.dir.path());
    }
}
