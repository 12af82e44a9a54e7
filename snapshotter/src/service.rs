//! The containerd snapshots gRPC service: a thin adapter from
//! `containerd_snapshots::Snapshotter` to `SnapshotStore`, with the one mapping
//! from `SnapshotError` to `tonic::Status`.

use crate::error::SnapshotError;
use crate::remote::{self, RemoteConfig, RemoteLayer};
use crate::store::{Info, Kind, SnapshotStore, Unpacked, UnpackedImage};
use crate::unpacked::{self, UnpackedKind};
use containerd_snapshots::api::types::Mount as GrpcMount;
use containerd_snapshots::tonic::Status;
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A `SnapshotError` on its way to becoming a gRPC status.
#[derive(Debug)]
pub struct GrpcError(pub SnapshotError);

impl From<SnapshotError> for GrpcError {
    fn from(e: SnapshotError) -> Self {
        GrpcError(e)
    }
}

impl From<GrpcError> for Status {
    fn from(GrpcError(e): GrpcError) -> Self {
        // containerd shows only this message: it carries the causes too
        // ("chmod /…/snapshots/6: No such file or directory").
        let mut message = e.to_string();
        let mut cause = std::error::Error::source(&e);
        while let Some(c) = cause {
            message.push_str(&format!(": {c}"));
            cause = c.source();
        }
        match e {
            SnapshotError::NotFound(_) => Status::not_found(message),
            SnapshotError::AlreadyExists(_) => Status::already_exists(message),
            SnapshotError::HasChildren { .. } | SnapshotError::FailedPrecondition(_) => {
                Status::failed_precondition(message)
            }
            SnapshotError::InvalidArgument(_) => Status::invalid_argument(message),
            SnapshotError::Unavailable(_) => Status::unavailable(message),
            SnapshotError::Database(_) | SnapshotError::Io { .. } => Status::internal(message),
        }
    }
}

/// The service over a store.
#[derive(Debug)]
pub struct Service {
    store: Arc<SnapshotStore>,
    remote: RemoteConfig,
    /// Lazy mounts a Prepare is setting up and has not committed yet (Cleanup spares them).
    mounting: Arc<std::sync::Mutex<std::collections::HashSet<PathBuf>>>,
    /// Manifests of images being pulled, by digest.
    manifests: Arc<crate::labels::ManifestCache>,
}

/// Takes a mountpoint out of `Service::mounting` when its Prepare ends, however it ends.
struct MountingGuard {
    set: Arc<std::sync::Mutex<std::collections::HashSet<PathBuf>>>,
    mountpoint: PathBuf,
}

impl MountingGuard {
    fn new(set: &Arc<std::sync::Mutex<std::collections::HashSet<PathBuf>>>, mountpoint: &std::path::Path) -> Self {
        if let Ok(mut in_flight) = set.lock() {
            in_flight.insert(mountpoint.to_path_buf());
        }
        MountingGuard {
            set: set.clone(),
            mountpoint: mountpoint.to_path_buf(),
        }
    }
}

impl Drop for MountingGuard {
    fn drop(&mut self) {
        if let Ok(mut set) = self.set.lock() {
            set.remove(&self.mountpoint);
        }
    }
}

impl Service {
    pub fn open(settings: &crate::config::Config) -> Result<Self, SnapshotError> {
        let petrel = std::env::current_exe().map_err(SnapshotError::io("find", "the petrel binary"))?;
        let root = settings.root.clone();
        Ok(Service {
            store: Arc::new(SnapshotStore::open(&root)?),
            remote: RemoteConfig {
                petrel,
                root,
                settings: settings.clone(),
            },
            mounting: Default::default(),
            manifests: Default::default(),
        })
    }

    /// Remounts lazy layers whose daemons are gone (after a reboot or a crash).
    pub fn reconcile(&self) -> Result<usize, SnapshotError> {
        let mut remounted = 0;
        for layer in self.store.lazy_mounts()? {
            if !remote::is_live(&layer.mountpoint) {
                remote::ensure_mounted(&self.remote, &layer)?;
                remounted += 1;
            }
        }
        Ok(remounted)
    }

    /// Checks the lazy layers under `key` before containerd mounts them.
    async fn ensure_lazy_layers(&self, key: Option<&str>) -> Result<(), GrpcError> {
        let Some(key) = key else { return Ok(()) };
        for layer in self.store.lazy_mounts_below(key)? {
            if !remote::is_live(&layer.mountpoint) {
                let config = self.remote.clone();
                tokio::task::spawn_blocking(move || remote::ensure_mounted(&config, &layer))
                    .await
                    .map_err(|e| SnapshotError::FailedPrecondition(e.to_string()))??;
            }
        }
        Ok(())
    }

    /// A pull's Prepare of a layer of a petrel image: commit it without a download.
    async fn prepare_remote(&self, parent: Option<&str>, labels: &BTreeMap<String, String>) -> Result<bool, GrpcError> {
        let Some(target) = labels.get(remote::TARGET_REF).cloned() else {
            return Ok(false);
        };
        let to_classify = labels.clone();
        let settings = self.remote.settings.clone();
        let (name, below, manifests) = (target.clone(), parent.map(str::to_string), Arc::clone(&self.manifests));
        let classified = tokio::task::spawn_blocking(move || {
            remote::classify(&to_classify, &name, below.as_deref(), &settings, &manifests)
        })
        .await
        .map_err(|e| SnapshotError::FailedPrecondition(e.to_string()))?;
        let layer = match classified {
            // The snapshotter cannot reach the registry (containerd could: it is
            // pulling): the layer is pulled the ordinary way, verified by containerd,
            // and a petrel image then runs from its unpacked layers.
            Err(SnapshotError::Unavailable(reason)) => {
                tracing::warn!(snapshot = %target, "{reason}; pulling the layer the ordinary way");
                return Ok(false);
            }
            other => other?,
        };
        let mut _in_flight = None;
        let mut labels = labels.clone();
        let mount = match layer {
            None => return Ok(false),
            Some(RemoteLayer::Blob) => None,
            Some(RemoteLayer::Bootstrap { image }) => {
                labels.insert(remote::PETREL_IMAGE.to_string(), image.clone());
                let mountpoint = self.remote.mountpoint(&target);
                _in_flight = Some(MountingGuard::new(&self.mounting, &mountpoint));
                if !remote::is_live(&mountpoint) {
                    let config = self.remote.clone();
                    let at = mountpoint.clone();
                    tokio::task::spawn_blocking(move || remote::mount(&config, &image, &at))
                        .await
                        .map_err(|e| SnapshotError::FailedPrecondition(e.to_string()))??;
                }
                Some(mountpoint)
            }
        };
        self.store.commit_remote(&target, parent, labels, mount)?;
        Ok(true)
    }

    /// Commits `key` as `name`; a petrel layer containerd unpacked itself (a pull
    /// without labels) is recognised, and its bootstrap mounted before the commit.
    async fn commit_layer(&self, name: &str, key: &str, labels: BTreeMap<String, String>) -> Result<(), GrpcError> {
        if self.store.stat(name).is_ok() {
            return Err(SnapshotError::AlreadyExists(name.into()).into());
        }
        let fs = self.store.fs_dir(key)?;
        let parent = self.store.parent_of(key)?;
        // A petrel layer is committed only under the chain ID of the layer digest
        // hashed here (its diff_id).
        let verified = match unpacked::detect(&fs) {
            None => None,
            Some(kind) => {
                let (name, parent, fs) = (name.to_string(), parent.clone(), fs.clone());
                let digest = tokio::task::spawn_blocking(move || {
                    unpacked::verified_layer_digest(&fs, kind, &name, parent.as_deref())
                })
                .await
                .map_err(|e| SnapshotError::FailedPrecondition(e.to_string()))??;
                Some((kind, digest))
            }
        };
        let (unpacked, mountpoint, _in_flight) = match verified {
            None => (None, None, None),
            Some((UnpackedKind::Blob, digest)) => (Some(Unpacked::Blob { digest }), None, None),
            Some((UnpackedKind::Bootstrap, _)) => {
                let image = UnpackedImage {
                    image_dir: fs.join("petrel"),
                    blobs: self.store.unpacked_blobs(parent.as_deref())?,
                };
                let mountpoint = self.remote.mountpoint(name);
                let guard = MountingGuard::new(&self.mounting, &mountpoint);
                let config = self.remote.clone();
                let at = mountpoint.clone();
                tokio::task::spawn_blocking(move || unpacked::mount(&config, &image, &at))
                    .await
                    .map_err(|e| SnapshotError::FailedPrecondition(e.to_string()))??;
                (Some(Unpacked::Bootstrap), Some(mountpoint), Some(guard))
            }
        };
        let committed = self
            .store
            .commit_unpacked(name, key, labels, unpacked, mountpoint.clone());
        if let (Err(_), Some(mountpoint)) = (&committed, &mountpoint) {
            remote::unmount(&self.remote, mountpoint);
        }
        Ok(committed?)
    }
}

fn time(nanos: u128) -> SystemTime {
    UNIX_EPOCH + Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
}

fn to_grpc(info: Info) -> containerd_snapshots::Info {
    containerd_snapshots::Info {
        kind: match info.kind {
            Kind::View => containerd_snapshots::Kind::View,
            Kind::Active => containerd_snapshots::Kind::Active,
            Kind::Committed => containerd_snapshots::Kind::Committed,
        },
        name: info.name,
        parent: info.parent.unwrap_or_default(),
        labels: info.labels.into_iter().collect(),
        created_at: time(info.created),
        updated_at: time(info.updated),
    }
}

fn from_grpc(info: containerd_snapshots::Info) -> Info {
    let nanos = |t: SystemTime| t.duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos();
    Info {
        kind: match info.kind {
            containerd_snapshots::Kind::View => Kind::View,
            containerd_snapshots::Kind::Active => Kind::Active,
            _ => Kind::Committed,
        },
        name: info.name,
        parent: (!info.parent.is_empty()).then_some(info.parent),
        labels: info.labels.into_iter().collect(),
        created: nanos(info.created_at),
        updated: nanos(info.updated_at),
    }
}

fn mounts(mounts: Vec<crate::store::Mount>) -> Vec<GrpcMount> {
    mounts
        .into_iter()
        .map(|m| GrpcMount {
            r#type: m.kind,
            source: m.source,
            options: m.options,
            ..Default::default()
        })
        .collect()
}

fn labels(map: HashMap<String, String>) -> BTreeMap<String, String> {
    map.into_iter().collect()
}

fn parent(parent: &str) -> Option<&str> {
    (!parent.is_empty()).then_some(parent)
}

type InfoStream = futures::stream::Iter<std::vec::IntoIter<Result<containerd_snapshots::Info, GrpcError>>>;

#[containerd_snapshots::tonic::async_trait]
impl containerd_snapshots::Snapshotter for Service {
    type Error = GrpcError;

    async fn stat(&self, key: String) -> Result<containerd_snapshots::Info, GrpcError> {
        Ok(to_grpc(self.store.stat(&key)?))
    }

    async fn update(
        &self,
        info: containerd_snapshots::Info,
        fieldpaths: Option<Vec<String>>,
    ) -> Result<containerd_snapshots::Info, GrpcError> {
        Ok(to_grpc(
            self.store.update(from_grpc(info), &fieldpaths.unwrap_or_default())?,
        ))
    }

    async fn usage(&self, key: String) -> Result<containerd_snapshots::Usage, GrpcError> {
        let usage = self.store.usage(&key)?;
        Ok(containerd_snapshots::Usage {
            inodes: usage.inodes as i64,
            size: usage.size as i64,
        })
    }

    async fn mounts(&self, key: String) -> Result<Vec<GrpcMount>, GrpcError> {
        self.ensure_lazy_layers(Some(&key)).await?;
        Ok(mounts(self.store.mounts(&key)?))
    }

    async fn prepare(
        &self,
        key: String,
        parent_key: String,
        labels_in: HashMap<String, String>,
    ) -> Result<Vec<GrpcMount>, GrpcError> {
        let labels = labels(labels_in);
        // Diagnostics for remote-layer pulls: which labels containerd passed.
        tracing::debug!(key = %key, parent = %parent_key, labels = ?labels.keys().collect::<Vec<_>>(), "Prepare");
        if self.prepare_remote(parent(&parent_key), &labels).await? {
            let target = labels.get(remote::TARGET_REF).cloned().unwrap_or(key);
            return Err(SnapshotError::AlreadyExists(target).into());
        }
        self.ensure_lazy_layers(parent(&parent_key)).await?;
        Ok(mounts(self.store.prepare(&key, parent(&parent_key), labels)?))
    }

    async fn view(
        &self,
        key: String,
        parent_key: String,
        labels_in: HashMap<String, String>,
    ) -> Result<Vec<GrpcMount>, GrpcError> {
        self.ensure_lazy_layers(parent(&parent_key)).await?;
        Ok(mounts(self.store.view(&key, parent(&parent_key), labels(labels_in))?))
    }

    async fn commit(&self, name: String, key: String, labels_in: HashMap<String, String>) -> Result<(), GrpcError> {
        self.commit_layer(&name, &key, labels(labels_in)).await
    }

    async fn remove(&self, key: String) -> Result<(), GrpcError> {
        if let Some(mountpoint) = self.store.remove_returning_mount(&key)? {
            remote::unmount(&self.remote, &mountpoint);
            let config = self.remote.clone();
            tokio::task::spawn_blocking(move || remote::collect_garbage(&config));
        }
        Ok(())
    }

    async fn clear(&self) -> Result<(), GrpcError> {
        self.store.cleanup()?;
        let mut keep: std::collections::HashSet<PathBuf> = self
            .store
            .lazy_mounts()?
            .into_iter()
            .map(|layer| layer.mountpoint)
            .collect();
        if let Ok(set) = self.mounting.lock() {
            keep.extend(set.iter().cloned());
        }
        let config = self.remote.clone();
        tokio::task::spawn_blocking(move || remote::unmount_orphans(&config, &keep))
            .await
            .map_err(|e| SnapshotError::FailedPrecondition(e.to_string()))?;
        Ok(())
    }

    type InfoStream = InfoStream;

    async fn list(&self, _snapshotter: String, filters: Vec<String>) -> Result<InfoStream, GrpcError> {
        // Collected first: no lock is held while containerd consumes the stream.
        let infos: Vec<Result<containerd_snapshots::Info, GrpcError>> =
            self.store.walk(&filters)?.into_iter().map(to_grpc).map(Ok).collect();
        Ok(futures::stream::iter(infos))
    }
}

/// Serves the snapshots API on a unix socket until SIGINT or SIGTERM. A stale
/// socket (nobody answering) is replaced; a live one is an error.
pub fn serve(settings: &crate::config::Config) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    use std::os::unix::fs::PermissionsExt;
    let socket = settings.address.as_path();
    let service = Service::open(settings)?;
    let service = Arc::new(service);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        if let Some(address) = &settings.metrics_address {
            let listener = tokio::net::TcpListener::bind(address)
                .await
                .map_err(|e| format!("metrics_address {address}: {e}"))?;
            tokio::spawn(serve_metrics(
                listener,
                Arc::clone(&service.store),
                service.remote.clone(),
            ));
        }
        if let Some(dir) = socket.parent() {
            std::fs::create_dir_all(dir)?;
        }
        if socket.exists() {
            if std::os::unix::net::UnixStream::connect(socket).is_ok() {
                return Err(format!("{} is served by a running snapshotter", socket.display()).into());
            }
            std::fs::remove_file(socket)?;
        }
        let listener = tokio::net::UnixListener::bind(socket)?;
        std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o660))?;
        // Remount lazy layers whose daemons are gone, without holding up containerd.
        let reconciling = Arc::clone(&service);
        tokio::task::spawn_blocking(move || match reconciling.reconcile() {
            Ok(0) => {}
            Ok(n) => tracing::info!(remounted = n, "lazy layers remounted"),
            Err(e) => tracing::warn!("remounting lazy layers: {e}"),
        });
        let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
        let shutdown = async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("signal handler");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {},
                _ = term.recv() => {},
            }
        };
        containerd_snapshots::tonic::transport::Server::builder()
            .add_service(containerd_snapshots::server(service))
            .serve_with_incoming_shutdown(incoming, shutdown)
            .await?;
        let _ = std::fs::remove_file(socket);
        Ok(())
    })
}

/// How long one scrape may take (each daemon is asked with its own timeout too).
const SCRAPE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Serves `GET /metrics` (Prometheus text of the snapshotter and every lazy mount,
/// asked over their control sockets) with axum: HTTP/1.1, concurrent scrapes, a
/// deadline per scrape.
async fn serve_metrics(listener: tokio::net::TcpListener, store: Arc<SnapshotStore>, remote: RemoteConfig) {
    let scrape = move || {
        let (store, remote) = (Arc::clone(&store), remote.clone());
        async move {
            use axum::response::IntoResponse;
            let collect = tokio::task::spawn_blocking(move || {
                let mountpoints: Vec<std::path::PathBuf> = store
                    .lazy_mounts()
                    .unwrap_or_default()
                    .into_iter()
                    .map(|layer| layer.mountpoint)
                    .collect();
                remote::metrics(&remote, &mountpoints)
            });
            match tokio::time::timeout(SCRAPE_TIMEOUT, collect).await {
                Ok(Ok(body)) => (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        petrel_fuse_daemon::exposition::CONTENT_TYPE,
                    )],
                    body,
                )
                    .into_response(),
                _ => (
                    axum::http::StatusCode::SERVICE_UNAVAILABLE,
                    "collecting the metrics timed out\n",
                )
                    .into_response(),
            }
        }
    };
    let app = axum::Router::new().route("/metrics", axum::routing::get(scrape));
    if let Err(e) = axum::serve(listener, app).await {
        tracing::warn!("metrics server stopped: {e}");
    }
}
