//! `petrel inspect`, `petrel check` and `petrel unpack` on a local image directory.

use anyhow::Context;
use petrel_builder::check::check as check_image;
use petrel_builder::inspect::{listing, summarize};
use petrel_builder::unpack::{unpack_to_dir, unpack_to_tar};
use petrel_builder::LocalImage;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, clap::Args)]
pub struct InspectArgs {
    /// Image directory.
    image: PathBuf,
    /// Also list every entry.
    #[arg(long)]
    tree: bool,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    /// Image directory.
    image: PathBuf,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
pub struct UnpackArgs {
    /// Image directory.
    image: PathBuf,
    /// Target: a missing or empty directory, a file ending in .tar, or - for a tar on stdout.
    target: PathBuf,
}

fn open(path: &std::path::Path) -> anyhow::Result<LocalImage> {
    LocalImage::open(path).with_context(|| format!("opening image {}", path.display()))
}

pub fn inspect(args: InspectArgs) -> anyhow::Result<ExitCode> {
    let image = open(&args.image)?;
    let bootstrap = image.bootstrap();
    let summary = summarize(&bootstrap, image.bootstrap_bytes().len() as u64)?;
    if args.json {
        let mut value = serde_json::to_value(&summary)?;
        if args.tree {
            value["tree"] = serde_json::Value::String(listing(&bootstrap)?);
        }
        outln!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(ExitCode::SUCCESS);
    }
    outln!("image        {}", args.image.display());
    outln!(
        "format       {} (chunker {}, zstd level {})",
        summary.version,
        summary.chunker,
        summary.zstd_level
    );
    outln!(
        "inodes       {} ({} files, {} dirs, {} symlinks, {} other, {} hardlinked)",
        summary.inodes,
        summary.files,
        summary.directories,
        summary.symlinks,
        summary.other,
        summary.hardlinked_inodes
    );
    outln!("file bytes   {} ({} in holes)", summary.file_bytes, summary.hole_bytes);
    outln!(
        "chunks       {} unique, {} refs, dedup ratio {:.2}",
        summary.unique_chunks,
        summary.chunk_refs,
        summary.dedup_ratio
    );
    outln!(
        "bootstrap    {} bytes ({:.1} per inode)",
        summary.bootstrap_bytes,
        summary.bootstrap_bytes_per_inode
    );
    for blob in &summary.blobs {
        outln!(
            "blob         {} {} bytes ({} uncompressed, {} chunks, prefetch {} bytes)",
            blob.digest,
            blob.compressed_size,
            blob.uncompressed_size,
            blob.chunks,
            blob.prefetch_bytes
        );
    }
    outln!(
        "prefetch     {} files, {} bytes",
        summary.prefetch_files,
        summary.prefetch_bytes
    );
    if args.tree {
        out!("{}", listing(&bootstrap)?);
    }
    Ok(ExitCode::SUCCESS)
}

pub fn check(args: CheckArgs) -> anyhow::Result<ExitCode> {
    let image = open(&args.image)?;
    match check_image(&image) {
        Ok(report) => {
            if args.json {
                outln!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                outln!(
                    "ok: {} entries, {} chunks, {} blobs ({} bytes) verified",
                    report.entries,
                    report.chunks,
                    report.blobs,
                    report.blob_bytes
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(failure) => {
            if args.json {
                outln!(
                    "{}",
                    serde_json::json!({"ok": false, "object": failure.object, "error": format!("{:#}", anyhow::Error::from(failure.source))})
                );
            } else {
                eprintln!(
                    "petrel: check failed: {}: {:#}",
                    failure.object,
                    anyhow::Error::from(failure.source)
                );
            }
            Ok(ExitCode::FAILURE)
        }
    }
}

pub fn unpack(args: UnpackArgs) -> anyhow::Result<ExitCode> {
    let image = open(&args.image)?;
    let target = &args.target;
    let report = if target.as_os_str() == "-" {
        unpack_to_tar(&image, std::io::stdout().lock())?
    } else if target.extension().is_some_and(|e| e == "tar") {
        let file = std::fs::File::create_new(target).with_context(|| format!("creating {}", target.display()))?;
        unpack_to_tar(&image, std::io::BufWriter::new(file))?
    } else {
        unpack_to_dir(&image, target)?
    };
    for warning in &report.warnings {
        eprintln!("petrel: warning: {warning}");
    }
    if target.as_os_str() != "-" {
        outln!(
            "unpacked {} entries ({} bytes) to {}",
            report.entries,
            report.bytes,
            target.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}
