//! containerd benchmark over the shaped link: time from pull start to a container's
//! first output line and to "ready" (its startup reads done), for the original image
//! through overlayfs (full pull) and the converted image through petrel's snapshotter
//! (CRI pull, lazy), with and without a prefetch profile; bytes over the link.

use crate::registry::{app_image, Registry};
use crate::relay;
use anyhow::{bail, Context};
use std::io::BufRead;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

fn bin(name: &str) -> PathBuf {
    std::env::current_exe().expect("own path").with_file_name(name)
}

struct Daemons {
    children: Vec<Child>,
}

impl Drop for Daemons {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ =
                rustix::process::kill_process(rustix::process::Pid::from_child(child), rustix::process::Signal::TERM);
            let _ = child.wait();
        }
    }
}

fn busybox_layer() -> anyhow::Result<Vec<u8>> {
    let mut w = petrel_fixtures::layer_writer::LayerWriter::new();
    w.file(
        "bin/busybox",
        &petrel_fixtures::layer_writer::EntryMeta::mode(0o755),
        &std::fs::read("/bin/busybox").context("/bin/busybox (busybox-static)")?,
    );
    w.symlink("bin/sh", "busybox");
    Ok(w.finish())
}

/// Runs the workload and returns (seconds to "started", seconds to "ready") from `t0`.
fn run_workload(ctr: &dyn Fn() -> Command, args: &[&str], t0: Instant) -> anyhow::Result<(f64, f64)> {
    let mut child = ctr().args(args).stdout(Stdio::piped()).stderr(Stdio::null()).spawn()?;
    let stdout = child.stdout.take().expect("piped");
    let (mut started, mut ready) = (None, None);
    for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
        if line.contains("started") && started.is_none() {
            started = Some(t0.elapsed().as_secs_f64());
        }
        if line.contains("ready") {
            ready = Some(t0.elapsed().as_secs_f64());
        }
    }
    let status = child.wait()?;
    match (started, ready) {
        (Some(s), Some(r)) if status.success() => Ok((s, r)),
        _ => bail!("workload failed: {status}"),
    }
}

/// A table of runs, each against the first (overlayfs).
fn print_runs(title: &str, runs: &[(&str, f64, f64)]) {
    println!("{title}");
    println!("| mode | first output s | ready s | ready vs overlayfs |");
    println!("|---|---:|---:|---:|");
    for (label, first, ready) in runs {
        println!("| {label} | {first:.2} | {ready:.2} | {:.2} |", ready / runs[0].2);
    }
}

pub fn run(_args: &[String]) -> anyhow::Result<()> {
    let work = tempfile::tempdir_in("/var/tmp")?;
    let w = work.path();
    let (mut layers, startup) = app_image(1.0);
    layers.insert(0, busybox_layer()?);
    let layout = w.join("layout");
    petrel_fixtures::oci_layout::write_oci_layout(&layout, "v1", &layers)?;
    drop(layers);
    let mut registry = Some(Registry::start(&w.join("registry"))?);
    let registry_addr = registry.as_ref().expect("started").addr.clone();
    let direct = registry_addr.clone();
    crate::measure::run_shell(&format!(
        "skopeo copy --quiet --dest-tls-verify=false oci:{}:v1 docker://{direct}/app:v1",
        layout.display()
    ))?;
    let petrel = bin("petrel");
    crate::measure::run_shell(&format!(
        "{} convert docker://{direct}/app:v1 docker://{direct}/app:petrel > /dev/null",
        petrel.display()
    ))?;
    crate::registry::write_startup_profile(&startup, &w.join("profile.json"))?;
    crate::measure::run_shell(&format!(
        "{} convert docker://{direct}/app:v1 docker://{direct}/app:petrel-pf --prefetch-profile {} > /dev/null",
        petrel.display(),
        w.join("profile.json").display()
    ))?;
    let link = relay::start(&direct, Duration::from_millis(10), 100e6);

    // containerd with CRI pulling through petrel, and the snapshotter.
    let config = format!(
        "version = 2\nroot = \"{r}/root\"\nstate = \"{r}/state\"\n[grpc]\n  address = \"{r}/containerd.sock\"\n[proxy_plugins.petrel]\n  type = \"snapshot\"\n  address = \"{r}/snapshotter.sock\"\n[plugins.\"io.containerd.grpc.v1.cri\"]\n  restrict_oom_score_adj = true\n  [plugins.\"io.containerd.grpc.v1.cri\".containerd]\n    snapshotter = \"petrel\"\n    disable_snapshot_annotations = false\n  [plugins.\"io.containerd.grpc.v1.cri\".registry.mirrors.\"{link}\"]\n    endpoint = [\"http://{link}\"]\n",
        r = w.display()
    );
    std::fs::write(w.join("containerd.toml"), config)?;
    let snapshotter = Command::new(&petrel)
        .arg("snapshotter")
        .arg("--root")
        .arg(w.join("snapshotter"))
        .arg("--address")
        .arg(w.join("snapshotter.sock"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let containerd = Command::new("containerd")
        .arg("--config")
        .arg(w.join("containerd.toml"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let _daemons = Daemons {
        children: vec![containerd, snapshotter],
    };
    let socket = w.join("containerd.sock");
    let ctr = || {
        let mut c = Command::new("ctr");
        c.arg("--address").arg(&socket);
        c
    };
    let started = Instant::now();
    while !ctr()
        .args(["snapshots", "--snapshotter", "petrel", "ls"])
        .output()
        .is_ok_and(|o| o.status.success())
    {
        if started.elapsed() > Duration::from_secs(30) {
            bail!("containerd did not come up");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let reads: Vec<String> = startup
        .iter()
        .map(|(p, len)| {
            if *len == u64::MAX {
                format!("cat /{p} > /dev/null")
            } else {
                format!("head -c {len} /{p} > /dev/null")
            }
        })
        .collect();
    let script = format!("echo started; {}; echo ready", reads.join("; "));
    let workload = |image: &str, name: &str, snapshotter: &str, namespace: &str| -> Vec<String> {
        [
            "-n",
            namespace,
            "run",
            "--rm",
            "--snapshotter",
            snapshotter,
            image,
            name,
            "/bin/busybox",
            "sh",
            "-c",
            &script,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let mut rows = Vec::new();

    let t0 = Instant::now();
    let before = relay::BYTES_DOWN.load(Ordering::Relaxed);
    let image = format!("{link}/app:v1");
    let out = ctr()
        .args(["images", "pull", "--plain-http", "--snapshotter", "overlayfs", &image])
        .output()?;
    if !out.status.success() {
        bail!("overlayfs pull: {}", String::from_utf8_lossy(&out.stderr));
    }
    let args = workload(&image, "overlay", "overlayfs", "default");
    let (first, ready) = run_workload(&ctr, &args.iter().map(String::as_str).collect::<Vec<_>>(), t0)?;
    rows.push((
        "overlayfs: full pull + unpack",
        first,
        ready,
        relay::BYTES_DOWN.load(Ordering::Relaxed) - before,
    ));

    for (label, tag) in [
        ("petrel (CRI, lazy)", "petrel"),
        ("petrel (CRI, lazy) + prefetch profile", "petrel-pf"),
    ] {
        let _ = Command::new(&petrel)
            .args(["cache", "gc", "--max-bytes", "0", "--cache-dir"])
            .arg(w.join("snapshotter/cache"))
            .output();
        let t0 = Instant::now();
        let before = relay::BYTES_DOWN.load(Ordering::Relaxed);
        let image = format!("{link}/app:{tag}");
        crate::node::cri_pull(&socket, &image)?;
        let args = workload(&image, tag, "petrel", "k8s.io");
        let (first, ready) = run_workload(&ctr, &args.iter().map(String::as_str).collect::<Vec<_>>(), t0)?;
        rows.push((label, first, ready, relay::BYTES_DOWN.load(Ordering::Relaxed) - before));
    }
    // A second container of each image on the same node: everything is local (the
    // overlayfs snapshot; petrel's node cache, whose fully cached files now open with
    // passthrough); the page cache is dropped first, so both read from disk.
    // Runs each case once with the page cache dropped first; (label, first, ready).
    let page_cache_dropped_runs = |cases: [(&'static str, String, &str, &str, &str); 2]| {
        let mut runs = Vec::new();
        for (label, image, name, snapshotter, namespace) in cases {
            crate::measure::drop_caches();
            let t0 = Instant::now();
            let args = workload(&image, name, snapshotter, namespace);
            let (first, ready) = run_workload(&ctr, &args.iter().map(String::as_str).collect::<Vec<_>>(), t0)?;
            runs.push((label, first, ready));
        }
        anyhow::Ok(runs)
    };
    let again = page_cache_dropped_runs([
        (
            "overlayfs",
            format!("{link}/app:v1"),
            "overlay-again",
            "overlayfs",
            "default",
        ),
        (
            "petrel (same lazy image, node cache warm)",
            format!("{link}/app:petrel-pf"),
            "petrel-pf-again",
            "petrel",
            "k8s.io",
        ),
    ])?;

    // Edge autonomy: the node warmed the petrel image (`warm --all --pin`), then the
    // registry goes away and the node "reboots": mount daemons killed with SIGKILL,
    // page cache dropped. overlayfs has its unpacked layers; petrel remounts from its
    // node cache.
    let warm = Command::new(&petrel)
        .args([
            "warm",
            &format!("docker://{link}/app:petrel-pf"),
            "--all",
            "--pin",
            "--cache-dir",
        ])
        .arg(w.join("snapshotter/cache"))
        .output()?;
    if !warm.status.success() {
        bail!("warm: {}", String::from_utf8_lossy(&warm.stderr));
    }
    drop(registry.take());
    for entry in std::fs::read_dir(w.join("snapshotter/run"))?.flatten() {
        if entry.path().extension().is_some_and(|x| x == "pid") {
            if let Some(pid) = std::fs::read_to_string(entry.path())
                .ok()
                .and_then(|p| p.trim().parse().ok())
                .and_then(rustix::process::Pid::from_raw)
            {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
            }
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    let offline = page_cache_dropped_runs([
        (
            "overlayfs",
            format!("{link}/app:v1"),
            "overlay-offline",
            "overlayfs",
            "default",
        ),
        (
            "petrel (warmed, pinned; daemon killed, remounted from the node cache)",
            format!("{link}/app:petrel-pf"),
            "petrel-offline",
            "petrel",
            "k8s.io",
        ),
    ])?;

    println!();
    println!(
        "container start over a shaped link (100 Mbit/s, 20 ms RTT, userspace relay); {} startup reads; pull start = 0",
        startup.len()
    );
    println!("| mode | first output s | ready s | ready vs overlayfs | bytes over the link | bytes vs overlayfs |");
    println!("|---|---:|---:|---:|---:|---:|");
    let (base_ready, base_bytes) = (rows[0].2, rows[0].3);
    for (label, first, ready, bytes) in &rows {
        println!(
            "| {label} | {first:.2} | {ready:.2} | {:.3} | {bytes} | {:.3} |",
            ready / base_ready,
            *bytes as f64 / base_bytes as f64
        );
    }
    println!();
    print_runs(
        "a second container of the same image on the node (page cache dropped); run start = 0",
        &again,
    );
    println!();
    print_runs(
        "the registry gone, the node rebooted (daemons killed, page cache dropped); run start = 0",
        &offline,
    );
    // Lazy mounts live under our work dir: detach them (ours only).
    petrel_fixtures::unmount_below(w);
    Ok(())
}
