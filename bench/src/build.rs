//! Build throughput: `petrel build` beside `tar -c | zstd -T0 -3` on the same input.

use crate::measure::{drop_caches, run_shell, tree_bytes, Run};
use crate::trees::{mixed_tree, small_files_tree};
use anyhow::Context;
use std::path::{Path, PathBuf};

struct Case {
    name: String,
    input_bytes: u64,
    files: u64,
    petrel: Run,
    baseline: Run,
    blob_bytes: u64,
    baseline_bytes: u64,
    bootstrap_bytes: u64,
}

fn petrel_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("own path");
    exe.with_file_name("petrel")
}

fn measure(name: &str, input: &Path, input_bytes: u64, work: &Path, chunker: &str) -> anyhow::Result<Case> {
    let out = work.join(format!(
        "out-{}",
        name.replace(|c: char| !c.is_ascii_alphanumeric(), "-")
    ));
    let baseline_out = work.join("baseline.tar.zst");
    let is_dir = input.is_dir();
    drop_caches();
    let baseline = if is_dir {
        run_shell(&format!(
            "tar -C {} -cf - . | zstd -T0 -3 -q -o {} -f",
            input.display(),
            baseline_out.display()
        ))?
    } else {
        run_shell(&format!(
            "zstd -T0 -3 -q -o {} -f {}",
            baseline_out.display(),
            input.display()
        ))?
    };
    drop_caches();
    let petrel = run_shell(&format!(
        "{} build --json --chunker {chunker} -o {} {} > {}/report.json",
        petrel_bin().display(),
        out.display(),
        input.display(),
        work.display()
    ))?;
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(work.join("report.json"))?)?;
    let output = &report["output"];
    let case = Case {
        name: name.to_string(),
        input_bytes,
        files: report["data"]["files"].as_u64().unwrap_or(0),
        petrel,
        baseline,
        blob_bytes: output["blob"]["size"].as_u64().unwrap_or(0),
        baseline_bytes: std::fs::metadata(&baseline_out)?.len(),
        bootstrap_bytes: output["bootstrap_size"].as_u64().unwrap_or(0),
    };
    std::fs::remove_dir_all(&out)?;
    std::fs::remove_file(&baseline_out)?;
    Ok(case)
}

pub fn run(args: &[String]) -> anyhow::Result<()> {
    let mut scale = 1.0f64;
    let mut layer_gib = 0u64;
    let mut i = 0;
    while i < args.len() {
        match args[i].as_str() {
            "--scale" => scale = args.get(i + 1).context("--scale F")?.parse()?,
            "--layer-gib" => layer_gib = args.get(i + 1).context("--layer-gib N")?.parse()?,
            other => anyhow::bail!("unknown argument {other}"),
        }
        i += 2;
    }
    let work = tempfile::tempdir_in("/var/tmp")?;
    let mut cases = Vec::new();

    let mixed = work.path().join("mixed");
    let mixed_bytes = mixed_tree(&mixed, (scale * (1u64 << 30) as f64) as u64)?;
    eprintln!("generated {} MiB of mixed files", mixed_bytes >> 20);
    cases.push(measure(
        "mixed 1 GiB, fixed 1M",
        &mixed,
        mixed_bytes,
        work.path(),
        "fixed:1M",
    )?);
    cases.push(measure(
        "mixed 1 GiB, default cdc 16K/64K/256K",
        &mixed,
        mixed_bytes,
        work.path(),
        "cdc",
    )?);

    let small = work.path().join("small");
    let small_bytes = small_files_tree(&small, (scale * 50_000.0) as usize)?;
    eprintln!("generated {} small files", (scale * 50_000.0) as usize);
    cases.push(measure(
        "50k small files, fixed 1M",
        &small,
        small_bytes,
        work.path(),
        "fixed:1M",
    )?);
    cases.push(measure(
        "50k small files, default cdc",
        &small,
        small_bytes,
        work.path(),
        "cdc",
    )?);
    std::fs::remove_dir_all(&small)?;

    if layer_gib > 0 {
        let layer = work.path().join("layer.tar");
        let extra = work.path().join("big");
        mixed_tree(&extra, layer_gib << 30)?;
        run_shell(&format!("tar -C {} -cf {} .", extra.display(), layer.display()))?;
        std::fs::remove_dir_all(&extra)?;
        let bytes = std::fs::metadata(&layer)?.len();
        cases.push(measure(
            &format!("one {layer_gib} GiB layer tar"),
            &layer,
            bytes,
            work.path(),
            "fixed:1M",
        )?);
    }
    let _ = tree_bytes(&mixed);
    print_table(&cases);
    Ok(())
}

fn print_table(cases: &[Case]) {
    println!();
    println!("build throughput (input = uncompressed bytes; baseline = tar -c | zstd -T0 -3, same input, same run)");
    println!(
        "| case | input MiB | petrel MiB/s | baseline MiB/s | petrel / baseline | petrel peak RSS MiB | blob / input | blob / baseline size | bootstrap B/file |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for c in cases {
        let mib = c.input_bytes as f64 / (1 << 20) as f64;
        let petrel_rate = mib / c.petrel.seconds;
        let baseline_rate = mib / c.baseline.seconds;
        println!(
            "| {} | {:.0} | {:.0} | {:.0} | {:.2} | {:.0} | {:.3} | {:.3} | {:.1} |",
            c.name,
            mib,
            petrel_rate,
            baseline_rate,
            petrel_rate / baseline_rate,
            c.petrel.peak_rss_mib,
            c.blob_bytes as f64 / c.input_bytes as f64,
            c.blob_bytes as f64 / c.baseline_bytes as f64,
            c.bootstrap_bytes as f64 / c.files.max(1) as f64,
        );
    }
}
