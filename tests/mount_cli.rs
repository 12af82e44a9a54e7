//! `petrel mount` as users run it: a foreground daemon killed with -9 in the middle
//! of heavy fetching leaves a stale mount that the next mount cleans, and every byte
//! read afterwards is right; SIGTERM unmounts cleanly; `--daemon`, `stats` and
//! `umount` work together.

use petrel_fixtures::layer_writer::LayerWriter;
use petrel_fixtures::rng::Rng;
use petrel_fuse_daemon::mount::is_mounted as is_petrel_mount;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn fuse_available() -> bool {
    let ok = Path::new("/dev/fuse").exists() && rustix::process::geteuid().is_root();
    if !ok {
        petrel_fixtures::report_skip("needs /dev/fuse and root");
    }
    ok
}

fn petrel() -> Command {
    Command::new(env!("CARGO_BIN_EXE_petrel"))
}

fn files() -> Vec<(String, Vec<u8>)> {
    (0..8)
        .map(|i| {
            (
                format!("f{i}.bin"),
                Rng::new(900 + i).mixed(4_000_000 + i as usize * 77_777),
            )
        })
        .collect()
}

struct Setup {
    dir: tempfile::TempDir,
    image: PathBuf,
    mountpoint: PathBuf,
}

impl Setup {
    fn new() -> Self {
        Self::with_files(&files(), &["--chunker", "fixed:64K"])
    }

    /// An image of `files`, built with `build_args`.
    fn with_files(files: &[(String, Vec<u8>)], build_args: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut w = LayerWriter::new();
        for (path, data) in files {
            w.file(path, &Default::default(), data);
        }
        let layer = dir.path().join("layer.tar");
        std::fs::write(&layer, w.finish()).unwrap();
        let image = dir.path().join("image");
        let out = petrel()
            .arg("build")
            .args(build_args)
            .arg("-o")
            .arg(&image)
            .arg(&layer)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let mountpoint = dir.path().join("mnt");
        std::fs::create_dir(&mountpoint).unwrap();
        Setup { dir, image, mountpoint }
    }

    fn mount_args(&self, command: &mut Command) {
        command
            .arg("mount")
            .arg(&self.image)
            .arg(&self.mountpoint)
            .arg("--cache-dir")
            .arg(self.dir.path().join("cache"))
            .arg("--runtime-dir")
            .arg(self.dir.path().join("run"));
    }

    fn spawn_foreground(&self) -> Child {
        let mut command = petrel();
        self.mount_args(&mut command);
        let child = command.stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
        wait_until(|| is_petrel_mount(&self.mountpoint));
        child
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        // Only our own mountpoint under our own temp dir.
        let _ = rustix::mount::unmount(&self.mountpoint, rustix::mount::UnmountFlags::DETACH);
    }
}

fn wait_until(mut condition: impl FnMut() -> bool) {
    let started = Instant::now();
    while !condition() {
        assert!(started.elapsed() < Duration::from_secs(30), "timed out");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn check_all(mountpoint: &Path) {
    for (path, data) in files() {
        assert_eq!(std::fs::read(mountpoint.join(&path)).unwrap(), data, "{path}");
    }
}

#[test]
fn kill_9_during_fetching_then_remount_serves_correct_bytes() {
    if !fuse_available() {
        return;
    }
    let setup = Setup::new();
    for round in 0..3 {
        let mut child = setup.spawn_foreground();
        // Readers pull data while the daemon dies under them.
        let readers: Vec<_> = files()
            .into_iter()
            .map(|(path, _)| {
                let p = setup.mountpoint.join(path);
                std::thread::spawn(move || {
                    let _ = std::fs::read(p);
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(30 + 40 * round));
        child.kill().unwrap();
        child.wait().unwrap();
        for reader in readers {
            reader.join().unwrap();
        }
        let stale = rustix::fs::statfs(&setup.mountpoint).unwrap_err();
        assert_eq!(stale, rustix::io::Errno::NOTCONN, "round {round}");
    }
    // The next mount cleans the stale one; everything cached or fetched is right.
    let mut child = setup.spawn_foreground();
    check_all(&setup.mountpoint);
    let out = petrel().arg("umount").arg(&setup.mountpoint).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let status = child.wait().unwrap();
    assert!(status.success(), "daemon exits cleanly after umount: {status}");
}

#[test]
fn sigterm_unmounts_cleanly() {
    if !fuse_available() {
        return;
    }
    let setup = Setup::new();
    let mut child = setup.spawn_foreground();
    check_all(&setup.mountpoint);
    rustix::process::kill_process(rustix::process::Pid::from_child(&child), rustix::process::Signal::TERM).unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
    assert!(!is_petrel_mount(&setup.mountpoint));
}

#[test]
fn daemon_mode_stats_and_umount() {
    if !fuse_available() {
        return;
    }
    let setup = Setup::new();
    let pid_file = setup.dir.path().join("petrel.pid");
    let mut command = petrel();
    setup.mount_args(&mut command);
    let out = command
        .arg("--daemon")
        .arg("--pid-file")
        .arg(&pid_file)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(is_petrel_mount(&setup.mountpoint));
    let pid: i32 = std::fs::read_to_string(&pid_file).unwrap().trim().parse().unwrap();

    let data = std::fs::read(setup.mountpoint.join("f3.bin")).unwrap();
    assert_eq!(data, files()[3].1);
    let runtime = setup.dir.path().join("run");
    let out = petrel()
        .arg("stats")
        .arg(&setup.mountpoint)
        .arg("--runtime-dir")
        .arg(&runtime)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let stats: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        stats["stats"]["bytes_served"].as_u64().unwrap() >= data.len() as u64,
        "{stats}"
    );
    assert!(stats["stats"]["backend_requests"].as_u64().unwrap() >= 1);
    let out = petrel()
        .arg("stats")
        .arg(&setup.mountpoint)
        .arg("--runtime-dir")
        .arg(&runtime)
        .arg("--prometheus")
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("petrel_backend_bytes_total{image=") && text.contains("petrel_read_latency_seconds_bucket"),
        "{text}"
    );

    // umount, then mount the same mountpoint at once: the new daemon waits for the
    // old one to let go of the mountpoint's control socket instead of failing.
    let out = petrel().arg("umount").arg(&setup.mountpoint).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let mut command = petrel();
    setup.mount_args(&mut command);
    let out = command.arg("--daemon").output().unwrap();
    assert!(
        out.status.success(),
        "remount right after umount: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read(setup.mountpoint.join("f3.bin")).unwrap(), files()[3].1);
    wait_until(|| !Path::new(&format!("/proc/{pid}")).exists());

    let out = petrel().arg("umount").arg(&setup.mountpoint).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    wait_until(|| !is_petrel_mount(&setup.mountpoint));
}

fn stats_of(setup: &Setup) -> serde_json::Value {
    let out = petrel()
        .arg("stats")
        .arg(&setup.mountpoint)
        .arg("--runtime-dir")
        .arg(setup.dir.path().join("run"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()["stats"].clone()
}

/// Waits until `count` files are materialized in the setup's cache: true, or false
/// when the daemon said the kernel has no FUSE passthrough.
fn wait_materialized(setup: &Setup, count: usize) -> bool {
    let cache = setup.dir.path().join("cache");
    let started = Instant::now();
    loop {
        let made = std::fs::read_dir(cache.join("files"))
            .map(|d| d.flatten().filter(|e| e.path().is_file()).count())
            .unwrap_or(0);
        if made >= count {
            return true;
        }
        let log = std::fs::read_to_string(cache.join("daemon.log")).unwrap_or_default();
        if log.contains("FUSE passthrough off") {
            return false;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{made} of {count} files materialized: {log}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn fully_cached_files_are_opened_with_a_backing_file() {
    if !fuse_available() {
        return;
    }
    let setup = Setup::new();
    let mut command = petrel();
    setup.mount_args(&mut command);
    // An image of small files: the daemon opens them only when told to.
    let out = command.args(["--daemon", "--file-opens", "daemon"]).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let (name, data) = &files()[2];
    let path = setup.mountpoint.join(name);

    // First open: chunks are fetched, the reads go through FUSE.
    assert_eq!(&std::fs::read(&path).unwrap(), data);
    let first = stats_of(&setup);
    assert_eq!(first["passthrough_opens"], 0, "{first}");

    // Second open: every chunk is cached and the file is used again, so it is
    // materialized in the background while this open is served as before (by FUSE,
    // or from the page cache the first one filled).
    assert_eq!(&std::fs::read(&path).unwrap(), data);
    let second = stats_of(&setup);
    assert_eq!(second["passthrough_opens"], 0, "{second}");
    if !wait_materialized(&setup, 1) {
        return; // a kernel without FUSE passthrough (before 6.9), as the daemon said
    }
    // Third open: the backing file: the kernel reads it, FUSE sees no read.
    let reads = second["reads"].as_u64().unwrap();
    assert_eq!(&std::fs::read(&path).unwrap(), data);
    let third = stats_of(&setup);
    assert_eq!(third["passthrough_opens"], 1, "{third}");
    assert_eq!(third["reads"].as_u64().unwrap(), reads, "no FUSE read: {third}");
    let materialized: Vec<_> = std::fs::read_dir(setup.dir.path().join("cache/files"))
        .unwrap()
        .flatten()
        .filter(|e| e.path().is_file())
        .collect();
    assert_eq!(materialized.len(), 1);
    assert_eq!(&std::fs::read(materialized[0].path()).unwrap(), data);
    // Image content stays private to the daemon's user.
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&materialized[0].path()), 0o400);
    assert_eq!(mode(&setup.dir.path().join("cache/files")), 0o700);

    // A file held open through FUSE keeps its later opens on FUSE too (the kernel
    // refuses mixing the two on one inode), and they still read the right bytes.
    let (other_name, other_data) = &files()[3];
    let other = setup.mountpoint.join(other_name);
    let held = std::fs::File::open(&other).unwrap();
    let mut head = vec![0u8; 4096];
    std::os::unix::fs::FileExt::read_exact_at(&held, &mut head, 0).unwrap();
    assert_eq!(&std::fs::read(&other).unwrap(), other_data);
    assert_eq!(stats_of(&setup)["passthrough_opens"], 1);
    drop(held);

    // GC removes the file pack (the materialized file, the only copy of its
    // chunks); an open file keeps reading, new opens fetch again.
    let open = std::fs::File::open(&path).unwrap();
    let out = petrel()
        .args(["cache", "gc", "--max-bytes", "0", "--cache-dir"])
        .arg(setup.dir.path().join("cache"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(report.contains("\"files_removed\":1"), "{report}");
    let mut all = Vec::new();
    std::io::Read::read_to_end(&mut &open, &mut all).unwrap();
    assert_eq!(&all, data);
    drop(open);
    assert_eq!(&std::fs::read(&path).unwrap(), data);

    let out = petrel().arg("umount").arg(&setup.mountpoint).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    wait_until(|| !is_petrel_mount(&setup.mountpoint));
}

/// An image of small files (a source tree, a Python install) is opened by the kernel
/// alone: after the first open (answered ENOSYS) the daemon is asked about no open
/// nor close, the page cache is kept across opens, every byte reads right, and
/// writes are still refused.
#[test]
fn an_image_of_small_files_is_opened_by_the_kernel_alone() {
    if !fuse_available() {
        return;
    }
    let small: Vec<(String, Vec<u8>)> = (0..40)
        .map(|i| (format!("m{i}.py"), Rng::new(300 + i).mixed(1_000 + i as usize * 3_001)))
        .collect();
    let setup = Setup::with_files(&small, &[]);
    let mut command = petrel();
    setup.mount_args(&mut command);
    let out = command.arg("--daemon").output().unwrap();
    assert!(out.status.success(), "{out:?}");
    for _ in 0..3 {
        for (name, data) in &small {
            assert_eq!(&std::fs::read(setup.mountpoint.join(name)).unwrap(), data, "{name}");
        }
    }
    let stats = stats_of(&setup);
    assert_eq!(
        stats["daemon_opens"], 1,
        "only the first open reached the daemon: {stats}"
    );
    assert_eq!(stats["passthrough_opens"], 0, "{stats}");
    // The second and third passes came from the page cache: no read was asked twice.
    let reads = stats["reads"].as_u64().unwrap();
    assert!(reads <= small.len() as u64, "{reads} reads of {} files", small.len());
    let refused = std::fs::OpenOptions::new()
        .write(true)
        .open(setup.mountpoint.join(&small[0].0))
        .unwrap_err();
    assert_eq!(
        refused.raw_os_error(),
        Some(rustix::io::Errno::ROFS.raw_os_error()),
        "{refused}"
    );

    // Told so, the daemon opens them (for passthrough): every open is a request.
    let out = petrel().arg("umount").arg(&setup.mountpoint).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    wait_until(|| !is_petrel_mount(&setup.mountpoint));
    let mut command = petrel();
    setup.mount_args(&mut command);
    let out = command.args(["--daemon", "--file-opens", "daemon"]).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    for (name, data) in &small {
        assert_eq!(&std::fs::read(setup.mountpoint.join(name)).unwrap(), data, "{name}");
    }
    assert_eq!(stats_of(&setup)["daemon_opens"], small.len() as u64);
    let out = petrel().arg("umount").arg(&setup.mountpoint).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    wait_until(|| !is_petrel_mount(&setup.mountpoint));
}

#[test]
fn a_large_cached_file_is_materialized_in_the_background() {
    if !fuse_available() {
        return;
    }
    let data = Rng::new(77).mixed(40 << 20);
    let setup = Setup::with_files(&[("large.bin".to_string(), data.clone())], &[]);
    let mut command = petrel();
    setup.mount_args(&mut command);
    let out = command.arg("--daemon").output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let path = setup.mountpoint.join("large.bin");
    assert_eq!(std::fs::read(&path).unwrap(), data);
    // The open that finds it cached (and used again) goes through FUSE and starts the
    // copy in the background; a later open gets the backing file.
    let started = Instant::now();
    while stats_of(&setup)["passthrough_opens"] == 0 {
        let log = std::fs::read_to_string(setup.dir.path().join("cache/daemon.log")).unwrap_or_default();
        if log.contains("FUSE passthrough off") {
            break; // a kernel without passthrough
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "never got a backing file: {log}"
        );
        drop(std::fs::File::open(&path).unwrap());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(std::fs::read(&path).unwrap(), data);
    let out = petrel().arg("umount").arg(&setup.mountpoint).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    wait_until(|| !is_petrel_mount(&setup.mountpoint));
}

/// `--daemon` hands its child the whole daemon spec: every option reaches the daemon
/// (the cache bound and the global `-v` used to be dropped), and the daemon answers
/// the spec it runs from.
#[test]
fn a_daemon_keeps_every_option_it_was_given() {
    if !fuse_available() {
        return;
    }
    let setup = Setup::new();
    let log = setup.dir.path().join("daemon.log");
    let mut command = petrel();
    command.arg("-v");
    setup.mount_args(&mut command);
    let out = command
        .args(["--daemon", "--cache-max-bytes", "3000000", "--log-file"])
        .arg(&log)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let pid: u32 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    assert!(
        !cmdline.windows(8).any(|w| w == b"--daemon"),
        "the daemon runs in the foreground"
    );
    let mut read = 0;
    for (name, data) in files() {
        assert_eq!(std::fs::read(setup.mountpoint.join(&name)).unwrap(), data);
        read += data.len();
    }
    // Eviction runs on a background thread (no reader waits for it): the bound holds
    // once the pass that the last stored chunks started is done.
    let packs = setup.dir.path().join("cache/packs");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut cached = walk_sizes(&packs);
    while cached > 3_000_000 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        cached = walk_sizes(&packs);
    }
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        cached <= 3_000_000,
        "the 3 MB cache bound holds: {cached} bytes cached after reading {read}\n{text}"
    );
    assert!(text.contains("INFO"), "-v reached the daemon:\n{text}");
    let out = petrel()
        .arg("stats")
        .arg("--runtime-dir")
        .arg(setup.dir.path().join("run"))
        .arg(&setup.mountpoint)
        .arg("--spec")
        .output()
        .unwrap();
    let spec = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    for expected in ["cache_max_bytes = 3000000", "log_level = \"info\"", "fetch_threads = 8"] {
        assert!(spec.contains(expected), "{expected} missing:\n{spec}");
    }
    let out = petrel().arg("umount").arg(&setup.mountpoint).output().unwrap();
    assert!(out.status.success(), "{out:?}");
}

/// A systemd unit's way: `petrel mount --spec FILE` in the foreground, every
/// setting from the file; a bad spec is refused naming the file and the key.
#[test]
fn a_mount_runs_from_a_spec_file() {
    if !fuse_available() {
        return;
    }
    let setup = Setup::new();
    let spec_path = setup.dir.path().join("app.toml");
    std::fs::write(
        &spec_path,
        format!(
            "image = {:?}\nmountpoint = {:?}\ncache_dir = {:?}\nruntime_dir = {:?}\nlog_level = \"info\"\n\n[tuning]\nfetch_threads = 2\npassthrough = false\n\n[tuning.prefetch]\nmode = \"off\"\n",
            setup.image,
            setup.mountpoint,
            setup.dir.path().join("cache"),
            setup.dir.path().join("run"),
        ),
    )
    .unwrap();
    let log = setup.dir.path().join("unit.log");
    let mut child = petrel()
        .arg("mount")
        .arg("--spec")
        .arg(&spec_path)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    wait_until(|| is_petrel_mount(&setup.mountpoint));
    for (name, data) in files().into_iter().take(2) {
        assert_eq!(std::fs::read(setup.mountpoint.join(&name)).unwrap(), data);
    }
    let out = petrel()
        .arg("stats")
        .arg("--runtime-dir")
        .arg(setup.dir.path().join("run"))
        .arg(&setup.mountpoint)
        .arg("--spec")
        .output()
        .unwrap();
    let spec = String::from_utf8_lossy(&out.stdout);
    for expected in ["fetch_threads = 2", "passthrough = false", "mode = \"off\""] {
        assert!(spec.contains(expected), "{expected} missing:\n{spec}");
    }
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(child.id() as i32).unwrap(),
        rustix::process::Signal::TERM,
    )
    .unwrap();
    assert!(child.wait().unwrap().success(), "SIGTERM unmounts and exits cleanly");
    assert!(!is_petrel_mount(&setup.mountpoint));
    assert!(std::fs::read_to_string(&log).unwrap().contains("INFO"));

    std::fs::write(&spec_path, "image = \"x\"\nmountpoint = \"/m\"\nfetch_thread = 2\n").unwrap();
    let out = petrel().arg("mount").arg("--spec").arg(&spec_path).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr.contains(&spec_path.display().to_string()) && stderr.contains("unknown field `fetch_thread`"),
        "{stderr}"
    );
    let out = petrel()
        .args(["mount", "--spec"])
        .arg(&spec_path)
        .arg("--fetch-threads")
        .arg("3")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "options beside --spec are refused");
}

/// Bytes under `dir`; a file that eviction removes while the walk runs counts as gone.
fn walk_sizes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| Some((e.metadata().ok()?, e.path())))
        .map(|(meta, path)| if meta.is_dir() { walk_sizes(&path) } else { meta.len() })
        .sum()
}

/// Bytes that rot in the node cache are never served: `petrel cache verify` finds a
/// flipped byte in a chunk and in a materialized file (exit status 1); a new daemon
/// checks both before it first trusts them, drops them, reads the right bytes, and
/// leaves a cache that verifies clean.
#[test]
fn rotten_cache_bytes_are_found_and_never_served() {
    if !fuse_available() {
        return;
    }
    let setup = Setup::new();
    let (name, data) = &files()[2];
    let path = setup.mountpoint.join(name);
    let mount = || {
        let mut command = petrel();
        setup.mount_args(&mut command);
        let out = command.arg("--daemon").output().unwrap();
        assert!(out.status.success(), "{out:?}");
    };
    let umount = || {
        // (Waits for the daemon: it stores what it fetched before it exits.)
        let out = petrel()
            .arg("umount")
            .arg(&setup.mountpoint)
            .arg("--runtime-dir")
            .arg(setup.dir.path().join("run"))
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        wait_until(|| !is_petrel_mount(&setup.mountpoint));
    };
    let cache = setup.dir.path().join("cache");
    let verify = |repair: bool| {
        let mut command = petrel();
        command.args(["cache", "verify", "--cache-dir"]).arg(&cache);
        if repair {
            command.arg("--repair");
        }
        let out = command.output().unwrap();
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        (out.status.code(), report)
    };
    mount();
    assert_eq!(&std::fs::read(&path).unwrap(), data);
    assert_eq!(&std::fs::read(&path).unwrap(), data, "the second open materializes it");
    wait_materialized(&setup, 1);
    // Read once only: its chunks stay in a pack of chunks.
    let (other_name, other_data) = &files()[0];
    assert_eq!(&std::fs::read(setup.mountpoint.join(other_name)).unwrap(), other_data);
    umount();
    let (code, report) = verify(false);
    assert_eq!(code, Some(0), "{report}");
    assert!(report["chunks_checked"].as_u64().unwrap() > 10, "{report}");

    let flip = |file: &Path, at: u64| {
        use std::os::unix::fs::{FileExt, PermissionsExt};
        std::fs::set_permissions(file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let handle = std::fs::OpenOptions::new().read(true).write(true).open(file).unwrap();
        let mut byte = [0u8];
        handle.read_exact_at(&mut byte, at).unwrap();
        handle.write_all_at(&[byte[0] ^ 0x10], at).unwrap();
    };
    let materialized: Vec<_> = std::fs::read_dir(cache.join("files"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .collect();
    let has_passthrough = !materialized.is_empty();
    for file in &materialized {
        flip(file, data.len() as u64 / 2);
    }
    // And one chunk still stored in a pack of chunks (the materialized file holds its
    // own chunks: the byte flipped there is a bad chunk too).
    let (pack, offset) = live_chunk_in_a_chunk_pack(&cache.join("packs"));
    flip(&pack, offset);
    let (code, report) = verify(false);
    assert_eq!(code, Some(1), "{report}");
    assert_eq!(report["chunks_bad"], 1 + u64::from(has_passthrough), "{report}");
    assert_eq!(report["files_bad"], u64::from(has_passthrough), "{report}");

    mount();
    for _ in 0..2 {
        assert_eq!(
            &std::fs::read(&path).unwrap(),
            data,
            "the right bytes, never the rotten ones"
        );
    }
    let stats = stats_of(&setup);
    assert!(
        stats["cache_corrupt_dropped"].as_u64().unwrap() >= u64::from(has_passthrough),
        "{stats}"
    );
    umount();
    // The chunk flipped may belong to another file, which nobody read: --repair
    // removes what the daemon did not meet.
    let (code, report) = verify(true);
    assert_eq!(code, Some(0), "{report}");
    let (code, report) = verify(false);
    assert_eq!(code, Some(0), "clean after the daemon and --repair: {report}");
}

/// A chunk that the pack indexes name in a pack of chunks (not a file pack) and no
/// tombstone removed: its pack file and offset (`fuse-daemon/src/pack.rs` has the
/// 64-byte record layout).
fn live_chunk_in_a_chunk_pack(packs: &Path) -> (std::path::PathBuf, u64) {
    let mut chunks = Vec::new();
    let mut gone = std::collections::HashSet::new();
    for entry in std::fs::read_dir(packs).unwrap().flatten() {
        if entry.path().extension().is_none_or(|x| x != "idx") {
            continue;
        }
        for record in std::fs::read(entry.path()).unwrap().chunks_exact(64) {
            let field = |at: usize| u64::from_le_bytes(record[at..at + 8].try_into().unwrap());
            let (kind, pack, offset) = (field(0) >> 32, field(8), field(16));
            match kind {
                1 if pack >> 63 == 0 => chunks.push((pack, offset)),
                2 => {
                    gone.insert((pack, offset));
                }
                _ => {}
            }
        }
    }
    chunks.sort();
    let (pack, offset) = *chunks
        .iter()
        .find(|c| !gone.contains(c) && packs.join(format!("{:016x}.pack", c.0)).exists())
        .expect("a chunk in a pack of chunks");
    (packs.join(format!("{pack:016x}.pack")), offset)
}
