//! The petrel builder: OCI layers, tars or directories in; a merged, chunked,
//! deduplicated image out (`<out>/bootstrap` + `<out>/blobs/sha256/<digest>`).
//! Also the local image tools: inspect, check, unpack.

pub mod check;
pub mod dict;
pub mod dir_source;
pub mod emit;
pub mod error;
pub mod growing_blob;
pub mod image;
pub mod inspect;
pub mod layer;
pub mod pax_sparse;
pub mod pipeline;
pub mod prefetch_set;
mod read_ahead;
pub mod record;
pub mod sink;
pub mod tree;
pub mod unpack;

pub use error::{BuildError, EntryProblem, Result};
pub use image::LocalImage;

use petrel_format::image_dir::ImageDir;
use petrel_format::{ChunkerParams, SuperblockParams};
use sink::{ChunkSink, SinkStats};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tree::Tree;

/// How to build.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    pub chunker: ChunkerParams,
    /// Files smaller than this are packed into shared chunks.
    pub small_file_limit: u32,
    /// Hashing and compression threads (0: one per core).
    pub threads: usize,
    /// What goes first in the blob, in order: files (or only the given byte
    /// ranges of them), directories, or glob patterns.
    pub prefetch: Vec<petrel_format::profile::ProfileEntry>,
    /// Chunks that already exist in other images' blobs: referenced, not stored again.
    pub chunk_dict: std::sync::Arc<dict::ChunkDict>,
    /// The zstd level of new chunks (1 to `MAX_ZSTD_LEVEL`; the same level gives
    /// the same blobs).
    pub compression_level: i32,
    /// Keep a record of each layer applied from a tar or a record
    /// ([`BuildReport::layer_records`]), for later builds to apply instead of
    /// reading the layer again.
    pub record_layers: bool,
}

impl BuildOptions {
    /// What a layer record must match to be applied by a build with these
    /// options (see [`record::replayable`]).
    pub fn record_encoding(&self) -> petrel_format::layer_record::RecordEncoding {
        petrel_format::layer_record::RecordEncoding {
            chunker: self.chunker,
            small_file_limit: sink::effective_small_file_limit(self.chunker, self.small_file_limit),
            compression_level: self.compression_level.clamp(1, petrel_format::codec::MAX_ZSTD_LEVEL) as u32,
        }
    }
}

impl Default for BuildOptions {
    fn default() -> Self {
        BuildOptions {
            chunker: ChunkerParams::default(),
            small_file_limit: sink::DEFAULT_SMALL_FILE_LIMIT,
            threads: 0,
            prefetch: Vec::new(),
            chunk_dict: Default::default(),
            compression_level: petrel_format::codec::ZSTD_LEVEL,
            record_layers: false,
        }
    }
}

/// What a build produced.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BuildReport {
    pub layers: usize,
    pub entries: u64,
    pub data: SinkStats,
    pub unique_chunks: u32,
    pub output: emit::EmitSummary,
    pub seconds: f64,
    pub warnings: Vec<String>,
    /// With [`BuildOptions::record_layers`], each layer's record (`format-spec.md`
    /// §16), or None for a layer read from a directory or one naming chunks the
    /// image does not hold (a later layer replaced or deleted some of its files).
    #[serde(skip)]
    pub layer_records: Vec<Option<petrel_format::layer_record::LayerRecord>>,
}

/// Builds one image from layers applied in order.
#[derive(Debug)]
pub struct ImageBuilder {
    options: BuildOptions,
    out: ImageDir,
    tree: Tree,
    sink: ChunkSink,
    layers: usize,
    entries: u64,
    warnings: Vec<String>,
    started: Instant,
    progress: std::sync::Arc<pipeline::BuildProgress>,
    /// Per layer, what it applied (with `record_layers`; None: not recordable).
    recorded: Vec<Option<Vec<record::Recorded>>>,
}

impl ImageBuilder {
    /// Starts a build writing into directory `out` (created if missing).
    pub fn new(mut options: BuildOptions, out: &Path) -> Result<Self> {
        options.chunker.validate()?;
        options.compression_level = options.compression_level.clamp(1, petrel_format::codec::MAX_ZSTD_LEVEL);
        std::fs::create_dir_all(out).map_err(BuildError::io("create", out))?;
        let spool = tempfile::tempfile_in(out).map_err(BuildError::io("create chunk spool in", out))?;
        let threads = match options.threads {
            0 => std::thread::available_parallelism().map_or(2, |n| n.get()),
            n => n,
        };
        let progress = std::sync::Arc::new(pipeline::BuildProgress::default());
        let pipeline = pipeline::Pipeline::start(
            threads,
            spool,
            std::sync::Arc::clone(&options.chunk_dict),
            options.compression_level,
            // A prefetch region is laid out in the new blob even where a dictionary
            // or a blob sealed mid-build holds its chunks, so the spool keeps a
            // copy of every chunk.
            !options.prefetch.is_empty(),
            std::sync::Arc::clone(&progress),
            ImageDir::new(out).blobs_dir(),
        );
        let prefetch = prefetch_set::PrefetchSet::new(&options.prefetch);
        let sink = ChunkSink::new(options.chunker, options.small_file_limit, pipeline, prefetch);
        Ok(ImageBuilder {
            options,
            out: ImageDir::new(out),
            tree: Tree::default(),
            sink,
            layers: 0,
            entries: 0,
            warnings: Vec::new(),
            started: Instant::now(),
            progress,
            recorded: Vec::new(),
        })
    }

    /// Counters of this build that another thread may read while it runs.
    pub fn progress(&self) -> std::sync::Arc<pipeline::BuildProgress> {
        std::sync::Arc::clone(&self.progress)
    }

    /// Applies one layer: a tar stream, plain or gzip/zstd-compressed (decompressed on
    /// a thread of its own). The reader may be left before its end (after the tar's end
    /// marker); callers that verify a digest drain it afterwards.
    pub fn add_layer(&mut self, reader: impl Read + Send) -> Result<()> {
        let layer = self.layers;
        let mut buffered = std::io::BufReader::with_capacity(1 << 20, reader);
        let head = std::io::BufRead::fill_buf(&mut buffered).map_err(|source| BuildError::Archive { layer, source })?;
        let (tree, sink, warnings) = (&mut self.tree, &mut self.sink, &mut self.warnings);
        let mut recorded = self.options.record_layers.then(Vec::new);
        let record = recorded.as_mut();
        self.entries += if layer::is_compressed(head) {
            read_ahead::with_decoded(buffered, |stream| {
                layer::apply_tar_layer(tree, sink, stream, layer, warnings, record)
            })?
        } else {
            layer::apply_tar_layer(tree, sink, &mut buffered, layer, warnings, record)?
        };
        self.recorded.push(recorded);
        self.layers += 1;
        Ok(())
    }

    /// What a layer record must match to be applied by this build (see
    /// [`record::replayable`]).
    pub fn record_encoding(&self) -> petrel_format::layer_record::RecordEncoding {
        self.options.record_encoding()
    }

    /// Applies a layer from its record (`format-spec.md` §16) instead of its tar:
    /// the same entries, in the same order, each file's data as the chunks the
    /// record names, which the build's chunk dictionary must hold
    /// ([`record::replayable`]). Nothing is read, compressed or stored.
    pub fn add_recorded_layer(&mut self, layer_record: &petrel_format::layer_record::LayerRecord) -> Result<()> {
        let layer = self.layers;
        let prefetch = prefetch_set::PrefetchSet::new(&self.options.prefetch);
        record::replayable(
            layer_record,
            &self.record_encoding(),
            &self.options.chunk_dict,
            &prefetch,
        )
        .map_err(|why| BuildError::Invalid(format!("layer {}: its record cannot be applied: {why}", layer + 1)))?;
        let mut recorded = self.options.record_layers.then(Vec::new);
        self.entries += record::apply_record(
            &mut self.tree,
            &mut self.sink,
            layer_record,
            layer,
            &mut self.warnings,
            recorded.as_mut(),
        )?;
        self.recorded.push(recorded);
        self.layers += 1;
        Ok(())
    }

    /// Applies a directory on local disk as one layer.
    pub fn add_directory(&mut self, path: &Path) -> Result<()> {
        let layer = self.layers;
        self.entries += dir_source::apply_directory(&mut self.tree, &mut self.sink, path, layer, &mut self.warnings)?;
        self.recorded.push(None);
        self.layers += 1;
        Ok(())
    }

    /// Applies a path: a directory, or a file holding a (compressed) tar.
    pub fn add_path(&mut self, path: &Path) -> Result<()> {
        if path.is_dir() {
            self.add_directory(path)
        } else {
            let file = std::fs::File::open(path).map_err(BuildError::io("open", path))?;
            self.add_layer(file)
        }
    }

    /// Writes the chunks of the layers applied since the previous seal into a blob
    /// of their own, now, so that it can be pushed while later layers are read
    /// (`petrel convert`). Its chunks stay there in arrival order, including those
    /// later layers delete; the blob `finish` writes holds the rest. None: nothing
    /// new to seal.
    ///
    /// In a build with a prefetch profile, the chunks of the files it names are
    /// held back: they go into the prefetch region of the blob `finish` writes,
    /// which is laid out once the tree is known. A prefetch chunk a sealed blob
    /// holds all the same (its file was reached by another name, or the chunk
    /// came first in another file) is stored there again, from the build's copy.
    pub fn seal(&mut self) -> Result<Option<pipeline::SealedBlob>> {
        self.sink.seal()
    }

    /// Also seals a blob ([`Self::seal`]) whenever `every` bytes of new chunks
    /// are spooled unsealed, mid-layer, handing each to `to`: a big layer is pushed
    /// while it is still read.
    pub fn auto_seal(&mut self, every: u64, to: std::sync::mpsc::Sender<Result<pipeline::SealedBlob>>) -> Result<()> {
        self.sink.auto_seal(every, to)
    }

    /// Writes the new chunks of the layer added next into blobs while they come,
    /// each handed out when it opens and again once complete ([`pipeline::StreamPlan`]),
    /// so that it can be uploaded while it grows; [`Self::seal`] after the layer
    /// completes the last one and seals the rest. Prefetch chunks are held back
    /// as from [`Self::seal`].
    pub fn stream_blobs(&mut self, plan: pipeline::StreamPlan) -> Result<()> {
        self.sink.stream(plan)
    }

    /// Writes the blob and bootstrap.
    pub fn finish(mut self) -> Result<BuildReport> {
        let small_file_limit = self.sink.small_file_limit();
        let encoding = self.record_encoding();
        let data = self.sink.finish()?;
        let stats = data.stats;
        let layer_records = if self.options.record_layers {
            record::finish_records(&self.recorded, &self.tree, &data, encoding)
        } else {
            Vec::new()
        };
        let unique_chunks = data.collected.chunks.len() as u32;
        let params = SuperblockParams {
            chunker: self.options.chunker,
            small_file_limit,
            compression_level: self.options.compression_level as u32,
        };
        // Blobs sealed mid-build are referenced like dictionary blobs.
        let mut blobs = self.options.chunk_dict.blobs.clone();
        blobs.extend(data.collected.sealed.iter().cloned());
        let output = emit::emit(
            &mut self.tree,
            data,
            &blobs,
            &self.options.prefetch,
            params,
            &self.out,
            &mut self.warnings,
        )?;
        for warning in &self.warnings {
            tracing::warn!("{warning}");
        }
        Ok(BuildReport {
            layers: self.layers,
            entries: self.entries,
            data: stats,
            unique_chunks,
            output,
            seconds: self.started.elapsed().as_secs_f64(),
            warnings: self.warnings,
            layer_records,
        })
    }
}

/// Builds an image at `out` from `inputs` (directories or tar files), lowest layer first.
pub fn build_paths(inputs: &[PathBuf], out: &Path, options: BuildOptions) -> Result<BuildReport> {
    if inputs.is_empty() {
        return Err(BuildError::Invalid("no input layers given".into()));
    }
    let mut builder = ImageBuilder::new(options, out)?;
    for input in inputs {
        builder.add_path(input)?;
    }
    builder.finish()
}
