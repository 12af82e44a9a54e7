//! The control socket of a mount: one request line in, one answer out.
//! `stats` answers JSON, `metrics` answers Prometheus text, `spec` answers the
//! daemon spec the mount runs from (TOML).

use crate::stats::Stats;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Where the control socket of a mountpoint lives: `<runtime_dir>/<hash>.sock`.
pub fn socket_path(runtime_dir: &Path, mountpoint: &Path) -> PathBuf {
    let canonical = std::fs::canonicalize(mountpoint).unwrap_or_else(|_| mountpoint.to_path_buf());
    let digest = petrel_format::codec::chunk_digest(canonical.as_os_str().as_encoded_bytes());
    runtime_dir.join(format!("{}.sock", &hex::encode(digest)[..16]))
}

/// Serves requests until the process ends; removes the socket file when dropped.
#[derive(Debug)]
pub struct ControlServer {
    path: PathBuf,
}

/// How long a new daemon waits for the previous one at its mountpoint to exit.
const RELEASE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

impl ControlServer {
    /// Binds `path` (replacing a stale socket) with mode 0660.
    pub fn start(
        path: &Path,
        stats: Arc<Stats>,
        image: String,
        spec: Option<crate::spec::DaemonSpec>,
    ) -> std::io::Result<Self> {
        let spec = spec.map(|s| s.to_toml());
        if let Some(dir) = path.parent() {
            // Private, like the cache: the sockets answer with image names and counters.
            std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o700).create(dir)?;
        }
        // A daemon whose mount was just unmounted answers until it has exited (a
        // moment later); only one that keeps answering is in the way.
        let deadline = std::time::Instant::now() + RELEASE_WAIT;
        while UnixStream::connect(path).is_ok() {
            if std::time::Instant::now() > deadline {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::AddrInUse,
                    format!("{} is served by a running daemon", path.display()),
                ));
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
        std::thread::Builder::new()
            .name("petrel-control".into())
            .spawn(move || {
                crate::endpoint::serve(
                    listener.incoming(),
                    |request| request.contains(&b'\n'),
                    Arc::new(move |request: &[u8]| answer(request, &stats, &image, spec.as_deref()).into_bytes()),
                )
            })?;
        Ok(ControlServer {
            path: path.to_path_buf(),
        })
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn answer(request: &[u8], stats: &Stats, image: &str, spec: Option<&str>) -> String {
    let line = String::from_utf8_lossy(request);
    let snapshot = stats.snapshot();
    match line.trim() {
        "stats" => serde_json::json!({ "image": image, "stats": snapshot }).to_string() + "\n",
        "metrics" => snapshot.prometheus(image),
        "spec" => spec.map_or_else(
            || "error: this mount was not started from a spec\n".into(),
            str::to_string,
        ),
        other => format!("error: unknown request {other:?}; use stats, metrics or spec\n"),
    }
}

/// Asks the daemon behind `path` for `request` (`stats`, `metrics` or `spec`).
pub fn request(path: &Path, request: &str) -> std::io::Result<String> {
    let mut stream = UnixStream::connect(path)?;
    crate::endpoint::Connection::set_timeouts(&stream, crate::endpoint::CLIENT_TIMEOUT)?;
    stream.write_all(format!("{request}\n").as_bytes())?;
    stream.shutdown(std::net::Shutdown::Write)?;
    let mut out = String::new();
    std::io::Read::read_to_string(&mut stream, &mut out)?;
    Ok(out)
}
