//! `petrel convert`.

use crate::cli::registry_args::RegistryArgs;
use petrel_builder::BuildOptions;
use petrel_convert::{convert, ChunkDictChoice, ConvertOptions};
use petrel_format::ChunkerParams;
use petrel_registry::Location;
use std::io::IsTerminal;
use std::process::ExitCode;

#[derive(Debug, clap::Args)]
pub struct ConvertArgs {
    /// Source: `docker://HOST/REPO:TAG`, `oci:DIR[:TAG]`, `docker-archive:FILE`, `oci-archive:FILE`.
    source: String,
    /// Target: `docker://HOST/REPO:TAG` or `oci:DIR[:TAG]`.
    target: String,
    #[command(flatten)]
    registry: RegistryArgs,
    /// A file holding USER:PASSWORD for the source registry only (overrides --creds there).
    #[arg(long, value_name = "FILE")]
    src_creds: Option<std::path::PathBuf>,
    /// A file holding USER:PASSWORD for the target registry, and for --chunk-dict and
    /// --prefetch-from images (overrides --creds there).
    #[arg(long, value_name = "FILE")]
    dest_creds: Option<std::path::PathBuf>,
    /// `false`: speak plain HTTP to the source registry (skopeo's spelling). petrel
    /// never turns certificate checks off; a private CA is given with --ca-file.
    #[arg(long, value_name = "BOOL", default_value_t = true, action = clap::ArgAction::Set)]
    src_tls_verify: bool,
    /// `false`: speak plain HTTP to the target registry (and --chunk-dict,
    /// --prefetch-from images).
    #[arg(long, value_name = "BOOL", default_value_t = true, action = clap::ArgAction::Set)]
    dest_tls_verify: bool,
    /// Convert every platform of an index and push an index.
    #[arg(long)]
    all_platforms: bool,
    /// Platform to pick from an index (OS/ARCH), default this machine's.
    #[arg(long)]
    platform: Option<String>,
    /// Chunker: fixed, fixed:SIZE, cdc or cdc:MIN:AVG:MAX.
    #[arg(long, default_value = "cdc:16K:64K:256K")]
    chunker: ChunkerParams,
    /// A prefetch profile (petrel record) or a list of paths/globs to put first in the blob.
    /// (`--prefetch` is the old spelling, kept for one release.)
    #[arg(long = "prefetch-profile", aliases = ["prefetch", "prefetch-list"])]
    prefetch_list: Option<std::path::PathBuf>,
    /// Reuse the prefetch profile kept in an earlier converted image (e.g. the previous release).
    #[arg(long, conflicts_with = "prefetch_list")]
    prefetch_from: Option<String>,
    /// A petrel image (docker://… or oci:…) whose chunks are referenced instead of
    /// uploaded again, e.g. the previous release; repeat for several.
    ///
    /// Without it, the conversion deduplicates against the --prefetch-from image, else
    /// the petrel image under the target tag, else the newest petrel image among the
    /// target repository's last tags (the output names the one used).
    #[arg(long = "chunk-dict", conflicts_with = "no_chunk_dict")]
    chunk_dict: Vec<String>,
    /// Use no chunk dictionary: the new image's blob stores every chunk.
    #[arg(long)]
    no_chunk_dict: bool,
    /// Read every source layer, even one whose record a chunk dictionary of the
    /// target repository carries (by default such a layer, an unchanged base of a
    /// new release, is applied from its record and never fetched), and push no
    /// records with the new image.
    #[arg(long)]
    no_layer_records: bool,
    /// zstd level of the new chunks, 1 to 19: higher stores less for more CPU (on a
    /// Debian Python layer against 3: 5 stores 3 % less for 2.6 times the CPU, 9
    /// 6 % less for 5.8 times). The same level gives the same blobs.
    #[arg(long, value_name = "LEVEL", default_value_t = petrel_format::codec::ZSTD_LEVEL,
          value_parser = clap::value_parser!(i32).range(1..=i64::from(petrel_format::codec::MAX_ZSTD_LEVEL)))]
    compression_level: i32,
    /// Directory for the temporary build (default: the system temp dir).
    #[arg(long)]
    work_dir: Option<std::path::PathBuf>,
    /// Print a JSON summary at the end.
    #[arg(long)]
    json: bool,
}

pub fn run(args: ConvertArgs) -> anyhow::Result<ExitCode> {
    let source = Location::parse(&args.source)?;
    let target = Location::parse(&args.target)?;
    let platform = match &args.platform {
        Some(text) => {
            let mut parts = text.split('/');
            match (parts.next(), parts.next(), parts.next(), parts.next()) {
                (Some(os), Some(architecture), variant, None) if !os.is_empty() && !architecture.is_empty() => {
                    petrel_registry::oci::platform(os, architecture, variant)
                }
                _ => anyhow::bail!("--platform takes OS/ARCH[/VARIANT], e.g. linux/amd64 or linux/arm64/v8"),
            }
        }
        None => petrel_registry::oci::host_platform(),
    };
    let mut source_options = args.registry.client_options_with(args.src_creds.as_deref())?;
    source_options.plain_http |= !args.src_tls_verify;
    let mut target_options = args.registry.client_options_with(args.dest_creds.as_deref())?;
    target_options.plain_http |= !args.dest_tls_verify;
    let profile = match (&args.prefetch_list, &args.prefetch_from) {
        (Some(list), _) => Some(crate::cli::build::read_profile(list)?),
        (None, Some(image)) => Some(petrel_convert::profile_of(&Location::parse(image)?, &target_options)?),
        (None, None) => None,
    };
    let prefetch = profile.as_ref().map(|p| p.entries.clone()).unwrap_or_default();
    let options = ConvertOptions {
        build: BuildOptions {
            chunker: args.chunker,
            prefetch,
            compression_level: args.compression_level,
            ..BuildOptions::default()
        },
        all_platforms: args.all_platforms,
        platform,
        progress: std::io::stderr().is_terminal() && !args.json,
        work_dir: args.work_dir.clone(),
        profile,
        chunk_dict: if args.no_chunk_dict {
            ChunkDictChoice::Disabled
        } else if !args.chunk_dict.is_empty() {
            ChunkDictChoice::Named(
                args.chunk_dict
                    .iter()
                    .map(|r| Location::parse(r))
                    .collect::<Result<_, _>>()?,
            )
        } else {
            ChunkDictChoice::Default {
                prefetch_from: args.prefetch_from.as_deref().map(Location::parse).transpose()?,
            }
        },
        layer_records: !args.no_layer_records,
    };
    let summary = convert(&source, &target, &source_options, &target_options, &options)?;
    if args.json {
        outln!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        for dict in &summary.chunk_dicts {
            outln!(
                "chunk dictionary: {} ({}; {} chunks; --no-chunk-dict to convert without)",
                dict.image,
                dict.why,
                dict.chunks
            );
        }
        for m in &summary.manifests {
            let platform = m.platform.clone().map(|p| format!(" [{p}]")).unwrap_or_default();
            if m.reused {
                outln!(
                    "{}{platform}: already converted at {}",
                    m.source_digest,
                    m.manifest_digest
                );
                continue;
            }
            outln!(
                "{}{platform} -> {}: {} layers, {} bytes in; {} files, {} chunks; uploaded {} bytes ({} blobs already there)",
                m.source_digest, m.manifest_digest, m.source_layers, m.source_bytes, m.files, m.unique_chunks, m.uploaded_bytes, m.skipped_blobs
            );
            if m.replayed_layers > 0 {
                outln!(
                    "{} of {} layers applied from their records in the target repository, not fetched (--no-layer-records to read them)",
                    m.replayed_layers,
                    m.source_layers
                );
            }
        }
        outln!(
            "{} -> {} ({}) in {:.1}s",
            summary.source,
            summary.target,
            summary.digest,
            summary.seconds
        );
    }
    Ok(ExitCode::SUCCESS)
}
