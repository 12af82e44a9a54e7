//! Edge benchmark: what an edge site's uplink carries when several nodes read the
//! same image through one pull-through mirror (docker-registry in proxy mode), vs
//! each node reading from the origin; what a dead mirror (a dfdaemon that died)
//! costs a node's reads, vs no mirror; and (the containerd bench's last table)
//! a warmed node restarting its container with the registry gone.

use crate::measure::median;
use crate::registry::{app_image, Registry};
use crate::relay;
use anyhow::{bail, Context};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

fn bin(name: &str) -> PathBuf {
    std::env::current_exe().expect("own path").with_file_name(name)
}

/// A docker-registry pull-through cache of `upstream` (the edge site's mirror).
fn start_mirror(dir: &Path, upstream: &str) -> anyhow::Result<Registry> {
    Registry::start_with(dir, &format!("proxy:\n  remoteurl: http://{upstream}\n"))
}

/// `nodes` nodes warm the whole image at once, each with its own cache; returns
/// (seconds until all are done, bytes the origin's link carried).
fn fan_out(petrel: &Path, image: &str, dir: &Path, nodes: usize, mirror: Option<&str>) -> anyhow::Result<(f64, u64)> {
    let before = relay::BYTES_DOWN.load(Ordering::Relaxed);
    let started = Instant::now();
    let children: Vec<_> = (0..nodes)
        .map(|node| {
            let mut command = Command::new(petrel);
            command
                .args(["warm", image, "--all", "--cache-dir"])
                .arg(dir.join(format!("node{node}")))
                .stdout(Stdio::null())
                .stderr(Stdio::piped());
            if let Some(mirror) = mirror {
                command.args(["--mirror", &format!("http://{mirror}")]);
            }
            command.spawn()
        })
        .collect::<Result<_, _>>()?;
    for child in children {
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!("warm: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
    Ok((
        started.elapsed().as_secs_f64(),
        relay::BYTES_DOWN.load(Ordering::Relaxed) - before,
    ))
}

/// Mounts `image` (extra mount options `extra`), reads each startup file once and
/// returns each read's seconds.
fn timed_reads(
    petrel: &Path,
    image: &str,
    dir: &Path,
    startup: &[(String, u64)],
    extra: &[&str],
) -> anyhow::Result<Vec<f64>> {
    let mut options = vec!["--prefetch-mode", "off"];
    options.extend_from_slice(extra);
    let mount = crate::lazy_mount::LazyMount::start(petrel, image, dir, &options)?;
    let mut seconds = Vec::new();
    for (path, len) in startup {
        let started = Instant::now();
        let mut file = std::fs::File::open(mount.mountpoint.join(path)).with_context(|| path.clone())?;
        std::io::copy(&mut std::io::Read::take(&mut file, *len), &mut std::io::sink())?;
        seconds.push(started.elapsed().as_secs_f64());
    }
    Ok(seconds)
}

pub fn run(args: &[String]) -> anyhow::Result<()> {
    let mut scale = 0.25f64;
    let mut rtt_ms = 20.0f64;
    let mut mbit = 100.0f64;
    let mut with_containerd = true;
    let mut before_binary: Option<PathBuf> = None;
    let mut i = 0;
    while i < args.len() {
        let value = || args.get(i + 1).context("missing value");
        match args[i].as_str() {
            "--scale" => scale = value()?.parse()?,
            "--rtt-ms" => rtt_ms = value()?.parse()?,
            "--mbit" => mbit = value()?.parse()?,
            "--before" => before_binary = Some(value()?.into()),
            "--no-containerd" => {
                with_containerd = false;
                i += 1;
                continue;
            }
            other => bail!("unknown argument {other}"),
        }
        i += 2;
    }
    let work = tempfile::tempdir_in("/var/tmp")?;
    let w = work.path();
    let (layers, startup) = app_image(scale);
    let layout = w.join("layout");
    petrel_fixtures::oci_layout::write_oci_layout(&layout, "v1", &layers)?;
    drop(layers);
    let origin = Registry::start(&w.join("origin"))?;
    let petrel = bin("petrel");
    crate::measure::run_shell(&format!(
        "skopeo copy --quiet --dest-tls-verify=false oci:{}:v1 docker://{}/app:v1 && {} convert docker://{1}/app:v1 docker://{1}/app:petrel > /dev/null",
        layout.display(),
        origin.addr,
        petrel.display()
    ))?;
    // The site's uplink: every byte from the origin crosses this relay.
    let uplink = relay::start(&origin.addr, Duration::from_secs_f64(rtt_ms / 2000.0), mbit * 1e6);
    let image = format!("docker://{uplink}/app:petrel");

    // `--before PATH`: another petrel build (e.g. the previous release) measured
    // behind the mirror in the same run, for a before/after column.
    let before = before_binary.as_deref();
    let mut fan = Vec::new();
    for nodes in [1usize, 2, 4] {
        let old = match before {
            Some(old) => {
                let mirror = start_mirror(&w.join(format!("mirror-before{nodes}")), &uplink)?;
                Some(fan_out(
                    old,
                    &image,
                    &w.join(format!("mirrored-before{nodes}")),
                    nodes,
                    Some(&mirror.addr),
                )?)
            }
            None => None,
        };
        let direct = fan_out(&petrel, &image, &w.join(format!("direct{nodes}")), nodes, None)?;
        let mirror = start_mirror(&w.join(format!("mirror{nodes}")), &uplink)?;
        let through = fan_out(
            &petrel,
            &image,
            &w.join(format!("mirrored{nodes}")),
            nodes,
            Some(&mirror.addr),
        )?;
        fan.push((nodes, direct, through, old));
    }
    let one_node = fan[0].1 .1.max(1) as f64;

    // A dead mirror: a port nothing listens on (the node's dfdaemon died).
    let dead = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.to_string();
    let dead_mirror = format!("http://{dead}");
    let mut no_mirror_runs = Vec::new();
    let mut dead_runs = Vec::new();
    let mut dead_before_runs = Vec::new();
    for round in 0..3 {
        if let Some(old) = before {
            dead_before_runs.push(timed_reads(
                old,
                &image,
                &w.join(format!("dead-before{round}")),
                &startup,
                &["--mirror", &dead_mirror],
            )?);
        }
        no_mirror_runs.push(timed_reads(
            &petrel,
            &image,
            &w.join(format!("plain{round}")),
            &startup,
            &[],
        )?);
        dead_runs.push(timed_reads(
            &petrel,
            &image,
            &w.join(format!("dead{round}")),
            &startup,
            &["--mirror", &dead_mirror],
        )?);
    }
    let summary = |runs: &[Vec<f64>]| {
        let first = median(&runs.iter().map(|r| r[0]).collect::<Vec<_>>());
        let rest = median(&runs.iter().map(|r| median(&r[1..])).collect::<Vec<_>>());
        let total = median(&runs.iter().map(|r| r.iter().sum()).collect::<Vec<_>>());
        (first, rest, total)
    };
    let plain = summary(&no_mirror_runs);
    let with_dead = summary(&dead_runs);
    let mut rows = vec![("none", plain), ("dead", with_dead)];
    if !dead_before_runs.is_empty() {
        rows.push(("dead, --before build", summary(&dead_before_runs)));
    }

    println!();
    println!("edge site uplink: {mbit} Mbit/s, {rtt_ms} ms RTT (userspace relay); N nodes warm the whole image at once, each with its own cache");
    println!("| nodes | origin bytes, each node direct | origin bytes, behind one pull-through mirror | mirror vs direct | vs one node's bytes | seconds direct | seconds via mirror | --before: origin bytes via mirror (vs one node's) |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (nodes, (direct_s, direct_b), (mirror_s, mirror_b), old) in &fan {
        let old = old.map_or("-".to_string(), |(_, bytes)| {
            format!("{bytes} ({:.2})", bytes as f64 / one_node)
        });
        println!(
            "| {nodes} | {direct_b} | {mirror_b} | {:.2} | {:.2} | {direct_s:.1} | {mirror_s:.1} | {old} |",
            *mirror_b as f64 / (*direct_b).max(1) as f64,
            *mirror_b as f64 / one_node,
        );
    }
    println!();
    println!(
        "a dead mirror (nothing listening: the node's dfdaemon died) vs no mirror; {} startup reads, on demand, medians of 3 rounds",
        startup.len()
    );
    println!("| mirror | first read s | later reads, median ms | all reads s | all vs no mirror |");
    println!("|---|---:|---:|---:|---:|");
    for (label, (first, rest, total)) in rows {
        println!(
            "| {label} | {first:.3} | {:.1} | {total:.2} | {:.2} |",
            rest * 1000.0,
            total / plain.2
        );
    }
    drop(origin);
    if with_containerd {
        println!();
        println!("containerd: the last table is the edge restart (registry gone, node rebooted)");
        crate::containerd::run(&[])?;
    }
    Ok(())
}
