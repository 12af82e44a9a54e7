//! `petrel warm` and `petrel cache`: the node cache, filled and kept.

use crate::cli::mount::{resolve_image, DEFAULT_CACHE_DIR};
use petrel_fuse_daemon::prefetch::{PrefetchConfig, PrefetchMode};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Debug, clap::Args)]
pub struct WarmArgs {
    /// Image: a local image directory or `docker://HOST/REPO:TAG`.
    image: String,
    /// Node cache root.
    #[arg(long, default_value = DEFAULT_CACHE_DIR)]
    cache_dir: PathBuf,
    /// Warm the whole image, not only its prefetch region.
    #[arg(long)]
    all: bool,
    /// Stored bytes per range request.
    #[arg(long, default_value_t = 8 << 20, value_parser = petrel_fuse_daemon::byte_size::parse)]
    request_bytes: u64,
    /// Range requests in flight at once.
    #[arg(long, default_value_t = 4)]
    parallel: usize,
    /// Keep what was warmed against eviction, whatever the cache bound, until
    /// `petrel cache rm` (an edge node's images that must survive the uplink going).
    #[arg(long)]
    pin: bool,
    #[command(flatten)]
    registry: crate::cli::registry_args::RegistryArgs,
}

/// The backend, bootstrap file and display name of a local or registry image.
pub fn run_warm(args: WarmArgs) -> anyhow::Result<ExitCode> {
    petrel_fuse_daemon::store::create_cache_dir(&args.cache_dir)?;
    let (backend, bootstrap, name) = resolve_image(
        &args.image,
        &args.cache_dir,
        &crate::cli::mount::ImageSource::registry(&args.registry)?,
    )?;
    let storage = petrel_fuse_daemon::mount::open_storage(&args.cache_dir, backend, &bootstrap, &name, 0, None)?;
    let mode = if args.all {
        PrefetchMode::All
    } else {
        PrefetchMode::Table
    };
    let ranges = petrel_fuse_daemon::prefetch::prefetch_ranges(&storage.image, mode);
    let total = petrel_fuse_daemon::prefetch::ranges_bytes(&storage.image, &ranges);
    let cached_before = storage.fetcher.cache().ready_count();
    let config = PrefetchConfig {
        mode,
        request_bytes: args.request_bytes,
        parallel: args.parallel,
        bandwidth: None,
    };
    let prefetcher = petrel_fuse_daemon::prefetch::Prefetcher::start(
        &storage.image,
        std::sync::Arc::clone(&storage.fetcher),
        config,
    );
    let bar = indicatif::ProgressBar::new(total);
    if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "warming [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .expect("template")
            .progress_chars("=> "),
        );
    } else {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    while !prefetcher.is_finished() {
        bar.set_position(prefetcher.fetched.load(std::sync::atomic::Ordering::Relaxed));
        std::thread::sleep(Duration::from_millis(100));
    }
    let fetched = prefetcher.fetched.load(std::sync::atomic::Ordering::Relaxed);
    prefetcher.wait();
    // What was stored is durable (known to mounts, kept over a crash) before this ends.
    if !storage.fetcher.cache().store().flush(Duration::from_secs(600)) {
        anyhow::bail!("the warmed chunks were not written to the cache in 10 minutes");
    }
    bar.finish_and_clear();
    let stats = storage.stats.snapshot();
    let chunks = storage.image.bootstrap().chunk_count();
    let ready = storage.fetcher.cache().ready_count();
    outln!(
        "warmed {name}: fetched {fetched} bytes in {} requests; {ready} of {chunks} chunks cached ({cached_before} were already); {} failed",
        stats.prefetch_requests, stats.backend_errors + stats.chunks_failed_verification
    );
    if stats.backend_errors + stats.chunks_failed_verification > 0 {
        anyhow::bail!("some chunks could not be fetched; run petrel warm again to resume");
    }
    if args.pin {
        let bootstrap = storage.image.bootstrap();
        let digests: Vec<[u8; 32]> = ranges
            .iter()
            .flat_map(|&(start, end)| start..end)
            .filter_map(|i| bootstrap.chunk(i).ok().map(|c| c.digest))
            .collect();
        let hex = hex::encode(storage.image.digest());
        petrel_fuse_daemon::store::pin_image(&args.cache_dir, &hex, &digests)?;
        outln!(
            "pinned {} chunks of {name} (petrel cache rm {} to release them)",
            digests.len(),
            &hex[..16]
        );
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, clap::Args)]
pub struct CacheArgs {
    #[command(subcommand)]
    command: CacheCommand,
    /// Node cache root.
    #[arg(long, default_value = DEFAULT_CACHE_DIR, global = true)]
    cache_dir: PathBuf,
}

#[derive(Debug, clap::Subcommand)]
enum CacheCommand {
    /// Images with bootstraps in the cache: chunks cached, bytes, last use.
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Evict least recently used chunks (never those a live mount pins) down to a size.
    Gc {
        #[arg(long, default_value_t = 0, value_parser = petrel_fuse_daemon::byte_size::parse)]
        max_bytes: u64,
    },
    /// Remove an image (its bootstrap digest, or a prefix of it) and the chunks only it uses.
    Rm { image: String },
    /// Re-hash every cached chunk, bootstrap and materialized file; report what is
    /// bad (exit status 1), or with --repair remove it (daemons fetch it again).
    Verify {
        #[arg(long)]
        repair: bool,
    },
}

pub fn run_cache(args: CacheArgs) -> anyhow::Result<ExitCode> {
    let store = petrel_fuse_daemon::store::ChunkStore::open(&args.cache_dir, None)?;
    match args.command {
        CacheCommand::Ls { json } => {
            let images = petrel_fuse_daemon::store::cached_images(&args.cache_dir, &store);
            let (chunks, bytes) = store.usage();
            if json {
                outln!(
                    "{}",
                    serde_json::to_string_pretty(
                        &serde_json::json!({"chunks": chunks, "bytes": bytes, "images": images})
                    )?
                );
            } else {
                outln!("{chunks} chunks, {bytes} bytes in {}", store.root().display());
                for image in images {
                    outln!(
                        "{}  {}/{} chunks  {} bytes  last use {}{}",
                        image.bootstrap,
                        image.chunks_cached,
                        image.chunks,
                        image.bytes_cached,
                        image.last_use.map_or("-".into(), |t| t.to_string()),
                        if image.pinned { "  pinned" } else { "" }
                    );
                }
            }
        }
        CacheCommand::Verify { repair } => {
            let report = petrel_fuse_daemon::verify::verify_cache(&args.cache_dir, repair)?;
            outln!("{}", serde_json::to_string_pretty(&report)?);
            if !report.is_clean() && !repair {
                eprintln!("petrel: the cache holds bad data; `petrel cache verify --repair` removes it");
                return Ok(ExitCode::FAILURE);
            }
        }
        CacheCommand::Gc { max_bytes } => {
            let report = store.gc(max_bytes);
            outln!("{}", serde_json::to_string(&report)?);
        }
        CacheCommand::Rm { image } => {
            let dir = args.cache_dir.join("bootstraps");
            let matches: Vec<PathBuf> = std::fs::read_dir(&dir)
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with(&image)))
                .collect();
            let [path] = matches.as_slice() else {
                anyhow::bail!(
                    "{} cached images match {image:?}; give more of the digest",
                    matches.len()
                );
            };
            let digests = |p: &std::path::Path| -> anyhow::Result<Vec<[u8; 32]>> {
                let bytes = std::fs::read(p)?;
                let bootstrap = petrel_format::Bootstrap::open(&bytes)?;
                Ok((0..bootstrap.chunk_count())
                    .filter_map(|i| bootstrap.chunk(i).ok().map(|c| c.digest))
                    .collect())
            };
            let mine = digests(path)?;
            let mut others = std::collections::HashSet::new();
            for other in std::fs::read_dir(&dir)?
                .flatten()
                .map(|e| e.path())
                .filter(|p| p != path)
            {
                others.extend(digests(&other).unwrap_or_default());
            }
            let mut removed = 0;
            for digest in mine.iter().filter(|d| !others.contains(*d)) {
                if store.contains(digest) {
                    store.remove(digest);
                    removed += 1;
                }
            }
            // Its materialized (passthrough) files are derived data: they go too.
            let bytes = std::fs::read(path)?;
            let bootstrap = petrel_format::Bootstrap::open(&bytes)?;
            let mut files = 0;
            for entry in bootstrap.walk() {
                let inode = entry?.inode;
                if inode.kind()? != petrel_format::FileKind::Regular {
                    continue;
                }
                let materialized =
                    petrel_fuse_daemon::passthrough::materialized_path(&args.cache_dir, &bootstrap, &inode)?;
                if store.remove_materialized(&materialized) {
                    files += 1;
                }
            }
            let unpinned = path
                .file_name()
                .is_some_and(|n| petrel_fuse_daemon::store::unpin_image(&args.cache_dir, &n.to_string_lossy()));
            if unpinned {
                outln!("released its pin");
            }
            std::fs::remove_file(path)?;
            let compaction = store.compact();
            outln!(
                "removed {} and {removed} chunks only it used ({files} materialized files); {} bytes freed, {} packs written in the last 30 s compacted later",
                path.display(),
                compaction.bytes_freed,
                compaction.packs_deferred
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
