//! Dedup across releases: for release pairs, what a registry stores and a node
//! fetches for release N+1 given release N, as plain OCI layers and as petrel
//! images (no dictionary; dictionary with fixed chunks; dictionary with FastCDC at
//! several sizes), plus chunk counts, bootstrap sizes and build throughput; and
//! `petrel convert` of both releases into one repository, with no flag (the default
//! dictionary) and with `--no-chunk-dict`.
//!
//! Pair "pip": a Python app whose site-packages move 6 packages to newer minor
//! versions (real wheels from PyPI, cached under /var/tmp). Pair "point release":
//! a base tree of host files, and a copy where 5% of files have a small edit or an
//! insertion and a few files are new (synthetic, deterministic).

use crate::measure::run_shell;
use crate::trees::mixed_tree;
use anyhow::{bail, Context};
use petrel_fixtures::rng::Rng;
use std::path::{Path, PathBuf};
use std::process::Command;

const WHEELS_N: &[&str] = &[
    "numpy==1.26.3",
    "pandas==2.1.4",
    "flask==3.0.0",
    "werkzeug==3.0.1",
    "jinja2==3.1.2",
    "requests==2.31.0",
    "urllib3==2.1.0",
    "certifi==2023.11.17",
    "markupsafe==2.1.3",
    "python-dateutil==2.8.2",
    "pytz==2023.3.post1",
    "six==1.16.0",
    "idna==3.6",
    "itsdangerous==2.1.2",
    "click==8.1.7",
    "blinker==1.7.0",
];
/// Six packages at newer minor versions.
const WHEELS_N1: &[&str] = &[
    "numpy==1.26.4",
    "pandas==2.2.0",
    "flask==3.0.2",
    "werkzeug==3.0.3",
    "jinja2==3.1.4",
    "requests==2.32.3",
    "urllib3==2.1.0",
    "certifi==2023.11.17",
    "markupsafe==2.1.3",
    "python-dateutil==2.8.2",
    "pytz==2023.3.post1",
    "six==1.16.0",
    "idna==3.6",
    "itsdangerous==2.1.2",
    "click==8.1.7",
    "blinker==1.7.0",
];

/// Where downloaded wheels are kept between runs.
pub(crate) const WHEEL_CACHE: &str = "/var/tmp/petrel-bench-wheels";

fn bin(name: &str) -> PathBuf {
    std::env::current_exe().expect("own path").with_file_name(name)
}

pub(crate) fn site_packages(wheels: &[&str], cache: &Path, into: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(cache)?;
    let status = Command::new("pip")
        .args([
            "download",
            "--quiet",
            "--no-deps",
            "--only-binary",
            ":all:",
            "--platform",
            "manylinux2014_x86_64",
            "--python-version",
            "3.11",
            "-d",
        ])
        .arg(cache)
        .args(wheels)
        .status()
        .context("running pip download")?;
    if !status.success() {
        bail!("pip download failed");
    }
    std::fs::create_dir_all(into)?;
    for spec in wheels {
        let (name, version) = spec.split_once("==").expect("pinned");
        let prefix = format!("{}-{version}-", name.replace('-', "_"));
        let wheel = std::fs::read_dir(cache)?
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.to_ascii_lowercase().starts_with(&prefix.to_ascii_lowercase()))
            })
            .with_context(|| format!("wheel for {spec} not downloaded"))?;
        let status = Command::new("unzip")
            .arg("-q")
            .arg("-o")
            .arg(&wheel)
            .arg("-d")
            .arg(into)
            .status()?;
        if !status.success() {
            bail!("unzip {} failed", wheel.display());
        }
    }
    Ok(())
}

/// A copy of `from` with 5% of files edited (half in place, half by an insertion)
/// and a few new files.
fn point_release(from: &Path, to: &Path) -> anyhow::Result<()> {
    run_shell(&format!("cp -a {} {}", from.display(), to.display()))?;
    let mut rng = Rng::new(31);
    let mut files = Vec::new();
    let mut stack = vec![to.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let mut entries: Vec<_> = std::fs::read_dir(&dir)?.flatten().map(|e| e.path()).collect();
        entries.sort();
        for path in entries {
            let meta = std::fs::symlink_metadata(&path)?;
            if meta.is_dir() {
                stack.push(path);
            } else if meta.is_file() && meta.len() > 0 {
                files.push(path);
            }
        }
    }
    for (i, path) in files.iter().enumerate() {
        if rng.below(20) != 0 {
            continue;
        }
        let mut data = std::fs::read(path)?;
        let at = rng.below(data.len() as u64) as usize;
        if i % 2 == 0 {
            for b in data.iter_mut().skip(at).take(64) {
                *b ^= 0x33;
            }
        } else {
            let len = 100 + rng.below(400) as usize;
            let insert = rng.text(len);
            data.splice(at..at, insert);
        }
        std::fs::write(path, data)?;
    }
    for i in 0..20 {
        std::fs::write(to.join(format!("new-in-point-release-{i}.txt")), rng.text(5000))?;
    }
    Ok(())
}

fn tar_layers(dirs: &[PathBuf], out: &Path, tag: &str) -> anyhow::Result<(Vec<PathBuf>, Vec<u64>)> {
    let mut tars = Vec::new();
    let mut gzip_sizes = Vec::new();
    for (i, dir) in dirs.iter().enumerate() {
        let tar = out.join(format!("{tag}-layer{i}.tar"));
        run_shell(&format!(
            "tar --sort=name --mtime=@0 --owner=0 --group=0 -C {} -cf {} .",
            dir.display(),
            tar.display()
        ))?;
        let gz = out.join(format!("{tag}-layer{i}.tar.gz"));
        run_shell(&format!("gzip -6 -n -c {} > {}", tar.display(), gz.display()))?;
        gzip_sizes.push(std::fs::metadata(&gz)?.len());
        tars.push(tar);
    }
    Ok((tars, gzip_sizes))
}

struct Built {
    blob: u64,
    chunks: u64,
    bootstrap: u64,
    seconds: f64,
}

fn build(out: &Path, layers: &[PathBuf], chunker: &str, dict: Option<&Path>) -> anyhow::Result<Built> {
    let mut command = format!(
        "{} build --json --chunker {chunker} -o {}",
        bin("petrel").display(),
        out.display()
    );
    if let Some(dict) = dict {
        command.push_str(&format!(" --chunk-dict {}", dict.display()));
    }
    for layer in layers {
        command.push_str(&format!(" {}", layer.display()));
    }
    let report_path = out.with_extension("json");
    let run = run_shell(&format!("{command} > {}", report_path.display()))?;
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&report_path)?)?;
    Ok(Built {
        blob: report["output"]["blob"]["size"].as_u64().unwrap_or(0),
        chunks: report["output"]["chunks"].as_u64().unwrap_or(0),
        bootstrap: report["output"]["bootstrap_size"].as_u64().unwrap_or(0),
        seconds: run.seconds,
    })
}

fn report_pair(name: &str, work: &Path, n_dirs: &[PathBuf], n1_dirs: &[PathBuf]) -> anyhow::Result<()> {
    let (n_tars, n_gz) = tar_layers(n_dirs, work, &format!("{name}-n"))?;
    let (n1_tars, n1_gz) = tar_layers(n1_dirs, work, &format!("{name}-n1"))?;
    let input: u64 = n1_tars
        .iter()
        .map(|t| std::fs::metadata(t).map(|m| m.len()).unwrap_or(0))
        .sum();
    // Plain OCI: a layer is shared only if it is byte-identical.
    let oci_new: u64 = n1_gz
        .iter()
        .zip(&n_gz)
        .zip(n1_tars.iter().zip(&n_tars))
        .filter(|(_, (a, b))| std::fs::read(a).ok() != std::fs::read(b).ok())
        .map(|((s, _), _)| *s)
        .sum();
    let oci_total: u64 = n1_gz.iter().sum();
    println!();
    println!(
        "pair {name}: release N+1 is {} MiB of layer tars; plain OCI N+1 = {} MiB gzip",
        input >> 20,
        oci_total >> 20
    );
    println!("| mode | new bytes N+1 (registry stores, warm node fetches) | vs plain OCI | chunks | bootstrap KiB | build MiB/s |");
    println!("|---|---:|---:|---:|---:|---:|");
    println!("| plain OCI layers (gzip) | {oci_new} | 1.00 | - | - | - |");
    let modes: [(&str, &str, bool); 5] = [
        ("petrel, no dictionary, fixed 1M", "fixed:1M", false),
        ("petrel + dictionary, fixed 1M", "fixed:1M", true),
        ("petrel + dictionary, cdc 16K/64K/256K", "cdc:16K:64K:256K", true),
        ("petrel + dictionary, cdc 32K/128K/512K", "cdc:32K:128K:512K", true),
        ("petrel + dictionary, cdc 64K/256K/1M", "cdc:64K:256K:1M", true),
    ];
    for (label, chunker, with_dict) in modes {
        let tag = chunker.replace(':', "-");
        let base = work.join(format!("{name}-n-{tag}"));
        if !base.exists() {
            build(&base, &n_tars, chunker, None)?;
        }
        let out = work.join(format!("{name}-n1-{tag}-{with_dict}"));
        let built = build(&out, &n1_tars, chunker, with_dict.then_some(base.as_path()))?;
        println!(
            "| {label} | {} | {:.3} | {} | {:.0} | {:.0} |",
            built.blob,
            built.blob as f64 / oci_new.max(1) as f64,
            built.chunks,
            built.bootstrap as f64 / 1024.0,
            input as f64 / (1 << 20) as f64 / built.seconds
        );
    }
    // `petrel convert` into one repository (an OCI layout): release N, then N+1 with
    // no flag (the default dictionary is release N) and with --no-chunk-dict.
    let repository = work.join(format!("{name}-repository"));
    let sources = [("n", &n_tars), ("n1", &n1_tars)].map(|(tag, tars)| {
        let layout = work.join(format!("{name}-oci-{tag}"));
        let files: Vec<&Path> = tars.iter().map(PathBuf::as_path).collect();
        petrel_fixtures::oci_layout::write_oci_layout_from_files(&layout, "v1", &files).map(|_| layout)
    });
    let [n_layout, n1_layout] = sources;
    let (n_layout, n1_layout) = (n_layout?, n1_layout?);
    convert_into(&n_layout, &repository, "n", &[])?;
    for (label, tag, flags) in [
        ("petrel convert, no flag", "n1", &[][..]),
        ("petrel convert --no-chunk-dict", "n1-full", &["--no-chunk-dict"][..]),
    ] {
        let (summary, seconds) = convert_into(&n1_layout, &repository, tag, flags)?;
        let converted = &summary["manifests"][0];
        let uploaded = converted["uploaded_bytes"].as_u64().unwrap_or(0);
        let dictionary = summary["chunk_dicts"][0]["why"].as_str().unwrap_or("no dictionary");
        println!(
            "| {label} ({dictionary}) | {uploaded} | {:.3} | {} | {:.0} (gzip) | {:.0} |",
            uploaded as f64 / oci_new.max(1) as f64,
            converted["unique_chunks"],
            converted["bootstrap_size"].as_u64().unwrap_or(0) as f64 / 1024.0,
            input as f64 / (1 << 20) as f64 / seconds
        );
    }
    Ok(())
}

/// Converts the image of OCI layout `source` into tag `tag` of the OCI layout
/// `repository`: the JSON summary and the seconds it took.
fn convert_into(
    source: &Path,
    repository: &Path,
    tag: &str,
    flags: &[&str],
) -> anyhow::Result<(serde_json::Value, f64)> {
    let report = repository.with_extension(format!("{tag}.json"));
    let run = run_shell(&format!(
        "{} convert --json {} oci:{}:v1 oci:{}:{tag} > {}",
        bin("petrel").display(),
        flags.join(" "),
        source.display(),
        repository.display(),
        report.display()
    ))?;
    Ok((serde_json::from_slice(&std::fs::read(&report)?)?, run.seconds))
}

pub fn run(_args: &[String]) -> anyhow::Result<()> {
    let work = tempfile::tempdir_in("/var/tmp")?;
    let w = work.path();
    let wheels = PathBuf::from(WHEEL_CACHE);
    // Pair 1: base, site-packages, app.
    let base = w.join("pip-base");
    mixed_tree(&base, 60 << 20)?;
    let app = w.join("pip-app");
    std::fs::create_dir_all(&app)?;
    std::fs::write(app.join("app.py"), b"import numpy, pandas, flask\n")?;
    let (site_n, site_n1) = (w.join("site-n"), w.join("site-n1"));
    site_packages(WHEELS_N, &wheels, &site_n)?;
    site_packages(WHEELS_N1, &wheels, &site_n1)?;
    report_pair("pip", w, &[base.clone(), site_n, app.clone()], &[base, site_n1, app])?;
    // Pair 2: a point release of a base tree of host files.
    let point_n = w.join("point-n");
    std::fs::create_dir_all(&point_n)?;
    run_shell(&format!("cp -a /usr/lib/gcc /usr/share/doc {}", point_n.display()))?;
    let point_n1 = w.join("point-n1");
    point_release(&point_n, &point_n1)?;
    report_pair("point-release", w, &[point_n], &[point_n1])?;
    Ok(())
}
