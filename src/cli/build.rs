//! `petrel build`.

use anyhow::Context;
use petrel_builder::{build_paths, BuildOptions};
use petrel_format::profile::{Profile, ProfileEntry};
use petrel_format::ChunkerParams;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, clap::Args)]
pub struct BuildArgs {
    /// Output image directory (bootstrap + blobs/sha256/...).
    #[arg(short, long)]
    output: PathBuf,
    /// Inputs, lowest layer first: directories, tars, tar.gz or tar.zst files.
    #[arg(required = true)]
    inputs: Vec<PathBuf>,
    /// Chunker: fixed, fixed:SIZE, cdc or cdc:MIN:AVG:MAX (sizes accept K and M).
    #[arg(long, default_value = "cdc:16K:64K:256K")]
    chunker: ChunkerParams,
    /// Files smaller than this many bytes are packed into shared chunks.
    #[arg(long, default_value_t = petrel_builder::sink::DEFAULT_SMALL_FILE_LIMIT)]
    small_file_limit: u32,
    /// Hashing and compression threads (0: one per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// A path (file or directory) to put first in the blob; repeat in order.
    /// (`--prefetch` is the old spelling, kept for one release.)
    #[arg(long = "prefetch-path", alias = "prefetch")]
    prefetch: Vec<PathBuf>,
    /// A prefetch profile (petrel record) or a file listing paths/globs, one per line.
    /// (`--prefetch-list` is the old spelling, kept for one release.)
    #[arg(long = "prefetch-profile", alias = "prefetch-list")]
    prefetch_list: Option<PathBuf>,
    /// Petrel image directories whose chunks are referenced instead of stored again.
    #[arg(long = "chunk-dict")]
    chunk_dict: Vec<PathBuf>,
    /// zstd level of the chunks, 1 to 19: higher stores less for more CPU (on a
    /// Debian Python layer against 3: 5 stores 3 % less for 2.6 times the CPU, 9
    /// 6 % less for 5.8 times). The same level gives the same blobs.
    #[arg(long, value_name = "LEVEL", default_value_t = petrel_format::codec::ZSTD_LEVEL,
          value_parser = clap::value_parser!(i32).range(1..=i64::from(petrel_format::codec::MAX_ZSTD_LEVEL)))]
    compression_level: i32,
    /// Print the build report as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(args: BuildArgs) -> anyhow::Result<ExitCode> {
    let mut prefetch: Vec<ProfileEntry> = args
        .prefetch
        .iter()
        .map(|p| ProfileEntry::new(p.as_os_str().as_bytes(), None))
        .collect();
    if let Some(list) = &args.prefetch_list {
        prefetch.extend(read_profile(list)?.entries);
    }
    let mut dict = petrel_builder::dict::ChunkDict::default();
    for image in &args.chunk_dict {
        let path = petrel_format::image_dir::ImageDir::new(image).bootstrap_path();
        let bytes = std::fs::read(&path).with_context(|| format!("reading chunk dictionary {}", path.display()))?;
        dict.add_bootstrap(&bytes)
            .with_context(|| format!("chunk dictionary {}", image.display()))?;
    }
    let options = BuildOptions {
        chunk_dict: std::sync::Arc::new(dict),
        chunker: args.chunker,
        small_file_limit: args.small_file_limit,
        threads: args.threads,
        prefetch,
        compression_level: args.compression_level,
        record_layers: false,
    };
    let report = build_paths(&args.inputs, &args.output, options)?;
    // The image reads dictionary chunks from their blobs: link them in beside the new one.
    for blob in &report.output.dict_blobs {
        let name = blob.digest.trim_start_matches("sha256:");
        let target = petrel_format::image_dir::ImageDir::new(&args.output)
            .blobs_dir()
            .join(name);
        let source = args
            .chunk_dict
            .iter()
            .map(|d| petrel_format::image_dir::ImageDir::new(d).blobs_dir().join(name))
            .find(|p| p.exists());
        match source {
            Some(source) if !target.exists() => {
                if std::fs::hard_link(&source, &target).is_err() {
                    std::fs::copy(&source, &target).with_context(|| format!("copying {}", source.display()))?;
                }
            }
            Some(_) => {}
            None => anyhow::bail!("dictionary blob {} is in none of the --chunk-dict images", blob.digest),
        }
    }
    if args.json {
        outln!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(ExitCode::SUCCESS);
    }
    for warning in &report.warnings {
        eprintln!("petrel: warning: {warning}");
    }
    let out = &report.output;
    outln!("built {} in {:.2}s", args.output.display(), report.seconds);
    outln!("  layers         {}", report.layers);
    outln!("  inodes         {}", out.inodes);
    outln!(
        "  file data      {} bytes in {} files ({} packed small files)",
        report.data.bytes,
        report.data.files,
        report.data.packed_files
    );
    outln!(
        "  chunks         {} unique of {} submitted",
        out.chunks,
        report.unique_chunks
    );
    match &out.blob {
        Some(blob) => outln!(
            "  blob           {} ({} bytes, {} uncompressed)",
            blob.digest,
            blob.size,
            blob.uncompressed_size
        ),
        None => outln!("  blob           none (no file data)"),
    }
    outln!(
        "  bootstrap      {} ({} bytes)",
        out.bootstrap_sha256,
        out.bootstrap_size
    );
    if out.prefetch_files > 0 {
        outln!(
            "  prefetch       {} files, {} bytes at the front of the blob",
            out.prefetch_files,
            out.prefetch_bytes
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Reads a prefetch profile or path list.
pub fn read_profile(path: &std::path::Path) -> anyhow::Result<Profile> {
    let bytes = std::fs::read(path).with_context(|| format!("reading prefetch profile {}", path.display()))?;
    Profile::parse(&bytes).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

#[derive(Debug, clap::Args)]
pub struct DictArgs {
    #[command(subcommand)]
    command: DictCommand,
}

#[derive(Debug, clap::Subcommand)]
enum DictCommand {
    /// Build a standalone chunk dictionary from local images (most-shared chunks first).
    Build {
        /// Petrel image directories.
        #[arg(required = true)]
        images: Vec<PathBuf>,
        /// Output directory (a bootstrap with only chunks, plus links to their blobs).
        #[arg(short, long)]
        output: PathBuf,
        /// Plain bytes of chunks at most.
        #[arg(long, default_value_t = 1 << 30, value_parser = petrel_fuse_daemon::byte_size::parse)]
        max_bytes: u64,
    },
}

pub fn run_dict(args: DictArgs) -> anyhow::Result<ExitCode> {
    let DictCommand::Build {
        images,
        output,
        max_bytes,
    } = args.command;
    let bootstraps = images
        .iter()
        .map(|i| {
            std::fs::read(petrel_format::image_dir::ImageDir::new(i).bootstrap_path())
                .with_context(|| format!("reading {}", i.display()))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let (bytes, report) = petrel_builder::dict::build_dictionary(&bootstraps, max_bytes)?;
    let out = petrel_format::image_dir::ImageDir::new(&output);
    std::fs::create_dir_all(out.blobs_dir()).with_context(|| format!("creating {}", output.display()))?;
    std::fs::write(out.bootstrap_path(), &bytes)?;
    let bootstrap = petrel_format::Bootstrap::open(&bytes)?;
    for blob in bootstrap.blobs() {
        let blob = blob?;
        let target = out.blob_path(&blob.digest);
        if let Some(source) = images
            .iter()
            .map(|i| petrel_format::image_dir::ImageDir::new(i).blob_path(&blob.digest))
            .find(|p| p.exists())
        {
            if !target.exists() && std::fs::hard_link(&source, &target).is_err() {
                std::fs::copy(&source, &target)?;
            }
        }
    }
    outln!("{}", serde_json::to_string(&report)?);
    Ok(ExitCode::SUCCESS)
}
