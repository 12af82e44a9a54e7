//! `scrape`: how long a Prometheus scrape of the snapshotter's metrics endpoint
//! takes with 1 and with 20 lazy images mounted on a containerd node (each mount
//! daemon is asked for its counters over its control socket, then encoded once).
//! Ratios against the scrape with one image, measured in the same run.

use crate::measure::run_shell;
use crate::registry::Registry;
use anyhow::bail;
use std::path::PathBuf;

const IMAGES: usize = 20;
const SCRAPES: usize = 25;

fn bin(name: &str) -> PathBuf {
    std::env::current_exe().expect("own path").with_file_name(name)
}

/// Median seconds of `SCRAPES` GETs of `url`, and the size of the last answer.
fn scrape(url: &str) -> anyhow::Result<(f64, u64)> {
    let mut seconds = Vec::new();
    let mut bytes = 0;
    for _ in 0..SCRAPES {
        let out = std::process::Command::new("curl")
            .args([
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{time_total} %{size_download} %{http_code}",
                url,
            ])
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let fields: Vec<&str> = text.split_whitespace().collect();
        if fields.get(2) != Some(&"200") {
            bail!("scrape of {url} answered {text}");
        }
        seconds.push(fields[0].parse::<f64>()?);
        bytes = fields[1].parse()?;
    }
    seconds.sort_by(f64::total_cmp);
    Ok((seconds[seconds.len() / 2], bytes))
}

pub fn run(_args: &[String]) -> anyhow::Result<()> {
    if !crate::node::available() {
        bail!("scrape needs containerd, ctr and runc (scripts/install-deps.sh)");
    }
    let work = tempfile::tempdir_in("/var/tmp")?;
    let w = work.path();
    let registry = Registry::start(&w.join("registry"))?;
    let petrel = bin("petrel");
    for i in 0..IMAGES {
        let mut layer = petrel_fixtures::layer_writer::LayerWriter::new();
        layer.file(
            &format!("app/image-{i}.txt"),
            &Default::default(),
            format!("image {i}\n").as_bytes(),
        );
        let layout = w.join(format!("layout-{i}"));
        petrel_fixtures::oci_layout::write_oci_layout(&layout, "v1", &[layer.finish()])?;
        run_shell(&format!(
            "skopeo copy --quiet --dest-tls-verify=false oci:{}:v1 docker://{}/app{i}:v1 && {} convert --no-chunk-dict docker://{r}/app{i}:v1 docker://{r}/app{i}:petrel > /dev/null",
            layout.display(),
            registry.addr,
            petrel.display(),
            r = registry.addr
        ))?;
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let node = crate::node::Node::start_with(
        &petrel,
        &w.join("node"),
        &registry.addr,
        &format!("metrics_address = \"127.0.0.1:{port}\""),
        "",
    )?;
    let url = format!("http://127.0.0.1:{port}/metrics");
    node.cri_pull(&format!("{}/app0:petrel", registry.addr))?;
    let (one, one_bytes) = scrape(&url)?;
    for i in 1..IMAGES {
        node.cri_pull(&format!("{}/app{i}:petrel", registry.addr))?;
    }
    let (many, many_bytes) = scrape(&url)?;
    println!();
    println!("snapshotter metrics endpoint, median of {SCRAPES} scrapes (curl, loopback)");
    println!("| lazy images mounted | scrape ms | vs 1 image | answer bytes |");
    println!("|---:|---:|---:|---:|");
    println!("| 1 | {:.1} | 1.00 | {one_bytes} |", one * 1e3);
    println!("| {IMAGES} | {:.1} | {:.2} | {many_bytes} |", many * 1e3, many / one);
    drop(node);
    Ok(())
}
