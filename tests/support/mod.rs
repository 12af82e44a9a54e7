//! Test harness: a real registry (Debian's docker-registry) on 127.0.0.1 with its
//! own storage, and a fault-injecting HTTP proxy in front of it.
#![allow(dead_code)]

pub mod busybox_image;
pub mod containerd;
pub mod cri;
pub mod fault_proxy;
pub mod uplink;

pub use petrel_fuse_daemon::mount::is_mounted as is_petrel_mount;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const USER: &str = "petrel";
pub const PASSWORD: &str = "s3cret-pw";

/// Whether `tool` is a command on the `PATH`.
pub fn on_path(tool: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Whether the tools these tests drive are installed (scripts/install-deps.sh).
pub fn registry_tools_available() -> bool {
    let ok = ["docker-registry", "skopeo", "htpasswd"].into_iter().all(on_path);
    if !ok {
        petrel_fixtures::report_skip("needs docker-registry, skopeo and htpasswd (scripts/install-deps.sh)");
    }
    ok
}

pub fn fuse_available() -> bool {
    let ok = Path::new("/dev/fuse").exists() && rustix::process::geteuid().is_root();
    if !ok {
        petrel_fixtures::report_skip("needs /dev/fuse and root");
    }
    ok
}

/// An IPv4 address of this machine outside 127.0.0.0/8 (a registry there is "not on
/// localhost" to petrel, containerd and skopeo alike), if it has one.
pub fn non_loopback_ipv4() -> Option<String> {
    let out = Command::new("ip")
        .args(["-4", "-o", "addr", "show", "scope", "global"])
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .skip_while(|word| *word != "inet")
        .nth(1)
        .and_then(|cidr| cidr.split('/').next())
        .map(str::to_string)
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A registry process of ours, killed when dropped.
pub struct TestRegistry {
    child: Child,
    pub addr: String,
    pub dir: tempfile::TempDir,
    pub auth: bool,
}

/// The registry with the referrers API of OCI distribution 1.1 the tests use:
/// `ferro-oci-server` from crates.io (scripts/install-deps.sh); Debian's
/// docker-registry 2.8 has no such API.
pub const REFERRERS_REGISTRY: &str = "ferro-oci-server";

/// Where `REFERRERS_REGISTRY` is: on the `PATH`, or where `cargo install` put it.
fn referrers_registry_program() -> Option<PathBuf> {
    let cargo_bin = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cargo")))
        .map(|home| home.join("bin"));
    std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain(cargo_bin)
        .map(|dir| dir.join(REFERRERS_REGISTRY))
        .find(|program| program.is_file())
}

/// Whether a registry with the referrers API can be started; reports a skip if not.
pub fn referrers_registry_available() -> bool {
    let found = referrers_registry_program().is_some();
    if !found {
        petrel_fixtures::report_skip(
            "needs ferro-oci-server, a registry with the referrers API (scripts/install-deps.sh)",
        );
    }
    found
}

impl TestRegistry {
    pub fn start(auth: bool) -> Self {
        Self::start_with(auth, "")
    }

    /// A pull-through mirror of the registry at `upstream` (docker-registry's proxy mode).
    pub fn start_mirror_of(upstream: &str) -> Self {
        Self::start_with(false, &format!("proxy:\n  remoteurl: http://{upstream}\n"))
    }

    /// A registry on loopback that speaks only TLS, with the certificate `cert` and
    /// its key `key` (PEM files, see [`TestCa`]).
    pub fn start_tls(cert: &Path, key: &Path) -> Self {
        Self::start_with(
            false,
            &format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                cert.display(),
                key.display()
            ),
        )
    }

    /// A registry listening on `host` (an address of this machine) instead of loopback.
    pub fn start_on(host: &str) -> Self {
        Self::start_on_with(host, false, "")
    }

    fn start_with(auth: bool, extra_config: &str) -> Self {
        Self::start_on_with("127.0.0.1", auth, extra_config)
    }

    fn start_on_with(host: &str, auth: bool, extra_config: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let mut config = format!(
            "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {host}:{port}\n{extra_config}",
            dir.path().join("storage").display()
        );
        if auth {
            let htpasswd = dir.path().join("htpasswd");
            let out = Command::new("htpasswd")
                .args(["-Bbn", USER, PASSWORD])
                .output()
                .unwrap();
            assert!(out.status.success());
            std::fs::write(&htpasswd, out.stdout).unwrap();
            config.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: petrel-test\n    path: {}\n",
                htpasswd.display()
            ));
        }
        let config_path = dir.path().join("config.yml");
        std::fs::write(&config_path, config).unwrap();
        let log = std::fs::File::create(dir.path().join("registry.log")).unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config_path)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let addr = format!("{host}:{port}");
        let registry = TestRegistry { child, addr, dir, auth };
        registry.wait_ready();
        registry
    }

    /// A registry with the referrers API (`REFERRERS_REGISTRY`) on loopback, its
    /// blobs under a directory of its own, no authentication.
    pub fn start_with_referrers_api() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let addr = format!("127.0.0.1:{}", free_port());
        let log = std::fs::File::create(dir.path().join("registry.log")).unwrap();
        let program = referrers_registry_program().expect("ferro-oci-server (scripts/install-deps.sh)");
        let child = Command::new(program)
            .env("FERRO_OCI_LISTEN", &addr)
            .env("FERRO_OCI_STORAGE_DIR", dir.path().join("storage"))
            .env("RUST_LOG", "warn")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let registry = TestRegistry {
            child,
            addr,
            dir,
            auth: false,
        };
        registry.wait_ready();
        registry
    }

    fn wait_ready(&self) {
        let started = Instant::now();
        loop {
            if let Ok(mut stream) = TcpStream::connect(&self.addr) {
                let _ = stream.write_all(b"GET /v2/ HTTP/1.0\r\n\r\n");
                let mut answer = String::new();
                let _ = stream.read_to_string(&mut answer);
                if answer.starts_with("HTTP/1.") {
                    return;
                }
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "registry did not start; log:\n{}",
                std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the registry process (its storage and port stay ours).
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts it again on the same address and storage.
    pub fn restart(&mut self) {
        self.stop();
        let log = std::fs::OpenOptions::new()
            .append(true)
            .open(self.dir.path().join("registry.log"))
            .unwrap();
        self.child = Command::new("docker-registry")
            .arg("serve")
            .arg(self.dir.path().join("config.yml"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.wait_ready();
    }

    pub fn creds(&self) -> Option<String> {
        self.auth.then(|| format!("{USER}:{PASSWORD}"))
    }

    /// A file (0600) holding the credentials, for `--creds FILE`.
    pub fn creds_file(&self) -> Option<String> {
        let creds = self.creds()?;
        let path = self.dir.path().join("creds");
        std::fs::write(&path, creds).unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        Some(path.display().to_string())
    }

    /// Where the registry's storage keeps blob `digest` (`sha256:<hex>`): a test
    /// tampers with it there, behind the registry's back.
    pub fn blob_data_path(&self, digest: &str) -> PathBuf {
        let hex = digest.trim_start_matches("sha256:");
        self.dir
            .path()
            .join("storage/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }

    /// Pushes an OCI layout's tag `v1` to `repo:tag` with skopeo.
    pub fn push_layout(&self, layout: &Path, repo: &str, tag: &str) {
        let mut command = Command::new("skopeo");
        command.args(["copy", "--quiet", "--dest-tls-verify=false"]);
        if let Some(creds) = self.creds() {
            command.arg("--dest-creds").arg(creds);
        }
        let out = command
            .arg(format!("oci:{}:v1", layout.display()))
            .arg(format!("docker://{}/{repo}:{tag}", self.addr))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "skopeo copy: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for TestRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn petrel() -> Command {
    Command::new(env!("CARGO_BIN_EXE_petrel"))
}

pub fn output_text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A foreground `petrel mount` of ours; unmounted (and waited for) when dropped.
pub struct MountProcess {
    child: Child,
    pub mountpoint: PathBuf,
}

impl MountProcess {
    pub fn start(image: &str, mountpoint: &Path, cache: &Path, extra: &[&str]) -> Self {
        std::fs::create_dir_all(mountpoint).unwrap();
        let log = std::fs::File::create(cache.with_extension("log")).unwrap();
        let child = petrel()
            .arg("mount")
            .arg(image)
            .arg(mountpoint)
            .arg("--cache-dir")
            .arg(cache)
            .arg("--runtime-dir")
            .arg(cache.with_extension("run"))
            .args(extra)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut process = MountProcess {
            child,
            mountpoint: mountpoint.to_path_buf(),
        };
        let started = Instant::now();
        while !is_petrel_mount(mountpoint) {
            if let Ok(Some(status)) = process.child.try_wait() {
                panic!(
                    "petrel mount exited with {status}: {}",
                    std::fs::read_to_string(cache.with_extension("log")).unwrap_or_default()
                );
            }
            assert!(started.elapsed() < Duration::from_secs(30), "mount did not appear");
            std::thread::sleep(Duration::from_millis(20));
        }
        process
    }
}

impl MountProcess {
    /// Waits up to `limit` for the daemon to exit on its own.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let started = Instant::now();
        while started.elapsed() < limit {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// Kills the daemon with SIGKILL and detaches its now-stale mount (ours only).
    pub fn kill_9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = rustix::mount::unmount(&self.mountpoint, rustix::mount::UnmountFlags::DETACH);
    }
}

impl Drop for MountProcess {
    fn drop(&mut self) {
        let _ = petrel().arg("umount").arg(&self.mountpoint).status();
        let _ = self.child.wait();
    }
}

/// A mount's counters, from `petrel stats`.
pub fn stats(mountpoint: &Path, runtime: &Path) -> serde_json::Value {
    let out = petrel()
        .arg("stats")
        .arg(mountpoint)
        .arg("--runtime-dir")
        .arg(runtime)
        .output()
        .unwrap();
    serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()["stats"].clone()
}

/// Publishes `manifest` (JSON) as `repo:tag` with its config edited by `edit_config`
/// (the new config pushed, the manifest pointed at it): how the tests forge images.
pub fn publish_with_config(
    client: &petrel_registry::RegistryClient,
    repo: &str,
    tag: &str,
    mut manifest: serde_json::Value,
    edit_config: impl FnOnce(&mut serde_json::Value),
) {
    let config_digest = manifest["config"]["digest"].as_str().unwrap().to_string();
    let mut config: serde_json::Value =
        serde_json::from_slice(&client.get_blob_verified(repo, &config_digest, 1 << 20).unwrap()).unwrap();
    edit_config(&mut config);
    let config_bytes = serde_json::to_vec(&config).unwrap();
    manifest["config"]["digest"] = client.push_blob_bytes(repo, &config_bytes).unwrap().into();
    manifest["config"]["size"] = config_bytes.len().into();
    client
        .put_manifest(
            repo,
            tag,
            petrel_registry::oci::OCI_MANIFEST,
            &serde_json::to_vec(&manifest).unwrap(),
        )
        .unwrap();
}

/// A private certificate authority made with `openssl` in a directory of its own:
/// its certificate (`ca.pem`) and, signed by it, a server certificate for
/// 127.0.0.1 (`server.pem`, key `server.key`).
pub struct TestCa {
    pub dir: tempfile::TempDir,
}

impl TestCa {
    /// None (a skip reported) when `openssl` is missing.
    pub fn new() -> Option<Self> {
        let found = on_path("openssl");
        if !found {
            petrel_fixtures::report_skip("needs openssl (scripts/install-deps.sh)");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let run = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(dir.path())
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"];
        run(&[
            &["req", "-x509"][..],
            &ec,
            &[
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-days",
                "2",
                "-subj",
                "/CN=petrel test CA",
            ],
        ]
        .concat());
        run(&[
            &["req"][..],
            &ec,
            &["-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1"],
        ]
        .concat());
        std::fs::write(
            dir.path().join("server.ext"),
            "subjectAltName = IP:127.0.0.1\nbasicConstraints = CA:FALSE\nkeyUsage = digitalSignature\nextendedKeyUsage = serverAuth\n",
        )
        .unwrap();
        run(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "server.ext",
            "-out",
            "server.pem",
        ]);
        Some(TestCa { dir })
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}
