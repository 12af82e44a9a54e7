//! containerd's CRI image service, driven as the kubelet drives it.

type CriImages = k8s_cri::v1::image_service_client::ImageServiceClient<tonic::transport::Channel>;

/// Connects to containerd's CRI image service (what the kubelet talks to).
pub fn cri_images(socket: &std::path::Path) -> Result<(tokio::runtime::Runtime, CriImages), String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let path = socket.to_path_buf();
    let channel = runtime
        .block_on(
            tonic::transport::Endpoint::try_from("http://[::]:50051")
                .unwrap()
                .connect_with_connector(tower::service_fn(move |_| {
                    let path = path.clone();
                    async move {
                        Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                            tokio::net::UnixStream::connect(path).await?,
                        ))
                    }
                })),
        )
        .map_err(|e| e.to_string())?;
    Ok((runtime, CriImages::new(channel)))
}

pub fn image_spec(image: &str) -> Option<k8s_cri::v1::ImageSpec> {
    Some(k8s_cri::v1::ImageSpec {
        image: image.to_string(),
        ..Default::default()
    })
}

/// Pulls `image` through CRI, as the kubelet does.
pub fn cri_pull(socket: &std::path::Path, image: &str) -> Result<String, String> {
    cri_pull_as(socket, image, None)
}

/// Pulls `image` through CRI with the kubelet's pull secret `(user, password)`.
///
/// After a failed pull, containerd's GC removes the layers that pull committed. A
/// pull racing it can see a parent in the middle of removal ("parent snapshot ... does
/// not exist"), a containerd 1.6 race that is independent of the snapshotter. The
/// kubelet retries such a pull, and so does this helper (only for that error).
pub fn cri_pull_as(socket: &std::path::Path, image: &str, login: Option<(&str, &str)>) -> Result<String, String> {
    let mut attempts = 0;
    loop {
        attempts += 1;
        match cri_pull_once(socket, image, login) {
            Err(e) if attempts < 10 && e.contains("parent snapshot") && e.contains("does not exist") => {
                std::thread::sleep(std::time::Duration::from_millis(300));
            }
            other => return other,
        }
    }
}

pub fn cri_pull_once(socket: &std::path::Path, image: &str, login: Option<(&str, &str)>) -> Result<String, String> {
    let (runtime, mut client) = cri_images(socket)?;
    let request = k8s_cri::v1::PullImageRequest {
        image: image_spec(image),
        auth: login.map(|(username, password)| k8s_cri::v1::AuthConfig {
            username: username.to_string(),
            password: password.to_string(),
            ..Default::default()
        }),
        ..Default::default()
    };
    runtime
        .block_on(client.pull_image(request))
        .map(|r| r.into_inner().image_ref)
        .map_err(|e| e.to_string())
}

/// Removes `image` through CRI, as the kubelet's image GC does (all its names at once).
pub fn cri_remove(socket: &std::path::Path, image: &str) -> Result<(), String> {
    let (runtime, mut client) = cri_images(socket)?;
    let request = k8s_cri::v1::RemoveImageRequest {
        image: image_spec(image),
    };
    runtime
        .block_on(client.remove_image(request))
        .map(|_| ())
        .map_err(|e| e.to_string())
}
