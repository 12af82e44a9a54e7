//! A `petrel mount` of the benchmarks: started in the foreground with a cache and
//! run directory under `dir`, waited for, asked for its counters, unmounted.

use anyhow::bail;
use petrel_fuse_daemon::mount::is_mounted;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct LazyMount {
    petrel: PathBuf,
    daemon: Child,
    pub mountpoint: PathBuf,
    run: PathBuf,
}

impl LazyMount {
    /// Mounts `image` at `dir/mnt` (cache `dir/cache`) with `extra` options; returns
    /// once the mount answers.
    pub fn start(petrel: &Path, image: &str, dir: &Path, extra: &[&str]) -> anyhow::Result<Self> {
        let mountpoint = dir.join("mnt");
        std::fs::create_dir_all(&mountpoint)?;
        let started = Instant::now();
        let mut daemon = Command::new(petrel)
            .arg("mount")
            .arg(image)
            .arg(&mountpoint)
            .arg("--cache-dir")
            .arg(dir.join("cache"))
            .arg("--runtime-dir")
            .arg(dir.join("run"))
            .args(extra)
            .stdout(Stdio::null())
            .stderr(daemon_log(dir)?)
            .spawn()?;
        while !is_mounted(&mountpoint) {
            if started.elapsed() > Duration::from_secs(120) {
                let _ = daemon.kill();
                bail!("mount did not appear");
            }
            if let Some(status) = daemon.try_wait()? {
                bail!("petrel mount exited: {status}");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(LazyMount {
            petrel: petrel.to_path_buf(),
            daemon,
            mountpoint,
            run: dir.join("run"),
        })
    }

    /// The mount's counters (`petrel stats`).
    pub fn stats(&self) -> anyhow::Result<serde_json::Value> {
        let out = Command::new(&self.petrel)
            .arg("stats")
            .arg(&self.mountpoint)
            .arg("--runtime-dir")
            .arg(&self.run)
            .output()?;
        Ok(serde_json::from_slice::<serde_json::Value>(&out.stdout)?["stats"].clone())
    }
}

/// Where the daemon's log goes: `$PETREL_BENCH_LOGS/<run dir name>.log` when that
/// variable names a directory (with `PETREL_LOG`, e.g. `debug`, to see every fetch),
/// otherwise nowhere.
fn daemon_log(dir: &Path) -> anyhow::Result<Stdio> {
    let Some(logs) = std::env::var_os("PETREL_BENCH_LOGS") else {
        return Ok(Stdio::null());
    };
    let name = dir
        .file_name()
        .map_or_else(|| "mount".into(), |n| n.to_string_lossy().into_owned());
    std::fs::create_dir_all(&logs)?;
    Ok(std::fs::File::create(Path::new(&logs).join(format!("{name}.log")))?.into())
}

impl Drop for LazyMount {
    fn drop(&mut self) {
        let _ = Command::new(&self.petrel).arg("umount").arg(&self.mountpoint).status();
        let _ = self.daemon.wait();
    }
}
