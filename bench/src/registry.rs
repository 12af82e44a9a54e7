//! Registry benchmark over a shaped link (100 Mbit/s, 20 ms RTT by default):
//! conversion registry → registry vs `skopeo copy` of the same image (a synthetic
//! app and the real Python app image of `apps`), and a
//! startup-like read set through a lazy mount vs pulling the whole image with
//! `skopeo copy` and unpacking it.

use crate::measure::{median, run_shell};
use crate::relay;
use anyhow::{bail, Context};
use petrel_fixtures::rng::Rng;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn bin(name: &str) -> PathBuf {
    std::env::current_exe().expect("own path").with_file_name(name)
}

pub(crate) struct Registry {
    child: Child,
    pub(crate) addr: String,
}

impl Registry {
    /// CPU seconds the registry process has used so far (user and system), from
    /// `/proc/PID/stat`: what serving a read cost it, measured around the read.
    pub(crate) fn cpu_seconds(&self) -> f64 {
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())) else {
            return 0.0;
        };
        // Fields after the command name (which is in parentheses): utime is the 14th
        // field of the line, stime the 15th, in clock ticks (100 a second on Linux).
        let after_name = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
        let fields: Vec<&str> = after_name.split_whitespace().collect();
        let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
        (ticks(11) + ticks(12)) / 100.0
    }

    pub(crate) fn start(dir: &Path) -> anyhow::Result<Self> {
        Self::start_with(dir, "")
    }

    /// With `extra` YAML appended to its config (e.g. a `proxy:` section).
    pub(crate) fn start_with(dir: &Path, extra: &str) -> anyhow::Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let addr = format!("127.0.0.1:{port}");
        std::fs::create_dir_all(dir)?;
        let config = dir.join("config.yml");
        std::fs::write(&config, format!("version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {addr}\n{extra}", dir.join("storage").display()))?;
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let started = Instant::now();
        while std::net::TcpStream::connect(&addr).is_err() {
            if started.elapsed() > Duration::from_secs(20) {
                bail!("registry did not start");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(Registry { child, addr })
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A python-app-like image: a base layer of libraries, a layer of many small
/// modules, an app layer, a config layer. Returns the layers and the startup set
/// (path, bytes read from its start).
/// Wheels of the service image's pip layer.
const SERVICE_WHEELS: &[&str] = &[
    "numpy==1.26.4",
    "flask==3.0.2",
    "werkzeug==3.0.3",
    "jinja2==3.1.4",
    "markupsafe==2.1.3",
    "itsdangerous==2.1.2",
    "click==8.1.7",
    "blinker==1.7.0",
    "requests==2.32.3",
    "urllib3==2.1.0",
    "certifi==2023.11.17",
    "idna==3.6",
];

/// The service image's pip layer: `SERVICE_WHEELS` unpacked where Debian's
/// python3 finds them.
fn pip_layer_tar(w: &Path) -> anyhow::Result<Vec<u8>> {
    let root = w.join("pip-root");
    let site = root.join("usr/local/lib/python3.11/dist-packages");
    crate::dedup::site_packages(SERVICE_WHEELS, Path::new(crate::dedup::WHEEL_CACHE), &site)?;
    let tar = crate::apps::dir_tar(&root)?;
    std::fs::remove_dir_all(&root)?;
    Ok(tar)
}

/// The service image's own code, of release `release`.
fn service_app_layer_tar(release: u32) -> Vec<u8> {
    let mut app = petrel_fixtures::layer_writer::LayerWriter::new();
    app.file(
        "app/service.py",
        &Default::default(),
        format!("import flask, numpy\napp = flask.Flask(__name__)\n\n@app.get('/')\ndef index():\n    return {{'sum': int(numpy.arange(10).sum()), 'release': {release}}}\n").as_bytes(),
    );
    app.finish()
}

pub(crate) fn app_image(scale: f64) -> (Vec<Vec<u8>>, Vec<(String, u64)>) {
    let mut rng = Rng::new(77);
    let mut startup = Vec::new();
    let mut base = petrel_fixtures::layer_writer::LayerWriter::new();
    let libs = (40.0 * scale) as usize;
    for i in 0..libs {
        let size = (1 << 20) + rng.below(4 << 20) as usize;
        base.file(&format!("usr/lib/lib{i:03}.so"), &Default::default(), &rng.mixed(size));
        if i % 8 == 0 {
            // Startup touches a sliver of some libraries.
            startup.push((format!("usr/lib/lib{i:03}.so"), 256 << 10));
        }
    }
    base.file("usr/bin/python3", &Default::default(), &rng.mixed(6 << 20));
    startup.insert(0, ("usr/bin/python3".into(), 2 << 20));
    let mut modules = petrel_fixtures::layer_writer::LayerWriter::new();
    let count = (4000.0 * scale) as usize;
    for i in 0..count {
        let len = 500 + rng.below(20_000) as usize;
        modules.file(
            &format!("usr/lib/python3/site-packages/pkg{:02}/mod{i:05}.py", i % 60),
            &Default::default(),
            &rng.text(len),
        );
        if i % 40 == 0 {
            startup.push((
                format!("usr/lib/python3/site-packages/pkg{:02}/mod{i:05}.py", i % 60),
                u64::MAX,
            ));
        }
    }
    let mut app = petrel_fixtures::layer_writer::LayerWriter::new();
    app.file("app/app.py", &Default::default(), b"import json\nprint('hello')\n");
    app.file(
        "app/model.bin",
        &Default::default(),
        &rng.mixed(((30.0 * scale) as usize) << 20),
    );
    startup.push(("app/app.py".into(), u64::MAX));
    let mut config = petrel_fixtures::layer_writer::LayerWriter::new();
    config.file("etc/app.toml", &Default::default(), b"[app]\nworkers = 4\n");
    startup.push(("etc/app.toml".into(), u64::MAX));
    (
        vec![base.finish(), modules.finish(), app.finish(), config.finish()],
        startup,
    )
}

struct StartupRun {
    mounted: Duration,
    ready: Duration,
    fetched: u64,
    requests: u64,
    read_bytes: u64,
}

/// Mounts `image`, reads the startup set, and reports time and traffic.
fn startup_run(
    petrel: &Path,
    image: &str,
    dir: &Path,
    startup: &[(String, u64)],
    prefetch: &str,
    extra: &[String],
) -> anyhow::Result<StartupRun> {
    let started = Instant::now();
    let mut options = vec!["--prefetch-mode", prefetch];
    options.extend(extra.iter().map(String::as_str));
    let mount = crate::lazy_mount::LazyMount::start(petrel, image, dir, &options)?;
    let mounted = started.elapsed();
    let mut read_bytes = 0;
    for (path, len) in startup {
        let mut file = std::fs::File::open(mount.mountpoint.join(path))?;
        read_bytes += std::io::copy(&mut std::io::Read::take(&mut file, *len), &mut std::io::sink())?;
    }
    let ready = started.elapsed();
    let stats = mount.stats()?;
    Ok(StartupRun {
        mounted,
        ready,
        fetched: stats["backend_bytes"].as_u64().unwrap_or(0),
        requests: stats["backend_requests"].as_u64().unwrap_or(0),
        read_bytes,
    })
}

pub fn run(args: &[String]) -> anyhow::Result<()> {
    let mut scale = 1.0f64;
    let mut rtt_ms = 20.0f64;
    let mut mbit = 100.0f64;
    let mut amplify_only = false;
    let mut convert_only = false;
    // `--next-release-only`: the next-release table alone.
    let mut next_release_only = false;
    // `--startup-only`: the synthetic startup's rows alone (`coldstart` shows them
    // among the realistic ones).
    let mut startup_only = false;
    let mut rounds = 1usize;
    let mut i = 0;
    while i < args.len() {
        let value = || args.get(i + 1).context("missing value");
        match args[i].as_str() {
            "--scale" => scale = value()?.parse()?,
            "--rtt-ms" => rtt_ms = value()?.parse()?,
            "--mbit" => mbit = value()?.parse()?,
            "--rounds" => rounds = value()?.parse::<usize>()?.max(1),
            "--amplify-only" => {
                amplify_only = true;
                i += 1;
                continue;
            }
            "--convert-only" => {
                convert_only = true;
                i += 1;
                continue;
            }
            "--next-release-only" => {
                (convert_only, next_release_only) = (true, true);
                i += 1;
                continue;
            }
            "--startup-only" => {
                startup_only = true;
                i += 1;
                continue;
            }
            other => bail!("unknown argument {other}"),
        }
        i += 2;
    }
    let work = tempfile::tempdir_in("/var/tmp")?;
    // PETREL_BENCH_KEEP=1 keeps the registries' storage and layouts for a look afterwards.
    let (_work, kept) = if std::env::var_os("PETREL_BENCH_KEEP").is_some() {
        eprintln!("keeping {}", work.path().display());
        (None, work.keep())
    } else {
        let path = work.path().to_path_buf();
        (Some(work), path)
    };
    let w = kept.as_path();
    let (layers, startup) = app_image(scale);
    let layout = w.join("layout");
    petrel_fixtures::oci_layout::write_oci_layout(&layout, "v1", &layers)?;
    let image_bytes = layout_bytes(&layout)?;
    drop(layers);
    let source = Registry::start(&w.join("source"))?;
    let dest = Registry::start(&w.join("dest"))?;
    run_shell(&format!(
        "skopeo copy --quiet --dest-tls-verify=false oci:{}:v1 docker://{}/app:v1",
        layout.display(),
        source.addr
    ))?;
    let one_way = Duration::from_secs_f64(rtt_ms / 2000.0);
    let bits = mbit * 1e6;
    let source_link = relay::start(&source.addr, one_way, bits);
    let dest_link = relay::start(&dest.addr, one_way, bits);
    let petrel = bin("petrel");
    // One conversion into `dest` for the startup rows and the amplification sweep.
    let convert_once = || {
        run_shell(&format!(
            "{} convert docker://{}/app:v1 docker://{}/app:petrel > /dev/null",
            petrel.display(),
            source.addr,
            dest.addr
        ))
    };

    if amplify_only {
        convert_once()?;
        return amplify_sweep(&petrel, &dest_link, w, &startup, mbit, rtt_ms);
    }
    if startup_only {
        convert_once()?;
    }

    // Conversion vs skopeo copy of the synthetic image and of a real one (the Python
    // app of `apps`, Debian packages in one layer gzipped at docker's level 6).
    if !startup_only {
        let python = w.join("python-layout");
        let tar = crate::apps::app_layer_tar("python")?;
        petrel_fixtures::oci_layout::write_oci_layout_gzipped(&python, "v1", std::slice::from_ref(&tar), 6)?;
        run_shell(&format!(
            "skopeo copy --quiet --dest-tls-verify=false oci:{}:v1 docker://{}/python:v1",
            python.display(),
            source.addr
        ))?;
        // A Python web service as such images usually come: the Debian layer,
        // then its pip packages (real wheels: numpy and a Flask stack, 19 MB
        // gzip), then the app's code; the packages are the conversion's tail.
        let service = w.join("service-layout");
        let mut service_layers = vec![tar, pip_layer_tar(w)?, service_app_layer_tar(1)];
        petrel_fixtures::oci_layout::write_oci_layout_gzipped(&service, "v1", &service_layers, 6)?;
        // Its next release: only the app's code changed.
        service_layers[2] = service_app_layer_tar(2);
        let next_release = w.join("service-layout-v2");
        petrel_fixtures::oci_layout::write_oci_layout_gzipped(&next_release, "v2", &service_layers, 6)?;
        drop(service_layers);
        for (layout, tag) in [(&service, "v1"), (&next_release, "v2")] {
            run_shell(&format!(
                "skopeo copy --quiet --dest-tls-verify=false oci:{}:{tag} docker://{}/service:{tag}",
                layout.display(),
                source.addr
            ))?;
        }
        let images = [
            (
                "app",
                format!(
                    "synthetic app, 4 layers, {:.0} MiB gzip",
                    image_bytes as f64 / (1 << 20) as f64
                ),
            ),
            (
                "python",
                format!(
                    "python app (Debian packages), 1 layer, {:.0} MiB gzip",
                    layout_bytes(&python)? as f64 / (1 << 20) as f64
                ),
            ),
            (
                "service",
                format!(
                    "python service (Debian packages, numpy and Flask wheels, app), 3 layers, {:.0} MiB gzip",
                    layout_bytes(&service)? as f64 / (1 << 20) as f64
                ),
            ),
        ];
        if next_release_only {
            let next = next_release_rounds(&petrel, &source, &source_link, w, rounds, one_way, bits)?;
            print_next_release(&next, mbit, rtt_ms, rounds);
            return Ok(());
        }
        // Each image's startup as a prefetch profile, for the release workflow's
        // conversion (`--prefetch-profile`, or `--prefetch-from` the release before):
        // the synthetic startup set, and the Python app's startup as `petrel record`
        // records it.
        let app_profile = w.join("app-profile.json");
        write_startup_profile(&startup, &app_profile)?;
        let python_profile = w.join("python-profile.json");
        run_shell(&format!(
            "{} convert docker://{a}/python:v1 docker://{a}/python:petrel > /dev/null",
            petrel.display(),
            a = source.addr
        ))?;
        crate::apps::record_profile(
            "python",
            &petrel,
            &format!("docker://{}/python:petrel", source.addr),
            &w.join("record-cache"),
            &python_profile,
        )?;
        // The service starts the same interpreter from the same Debian files.
        let profiles = [app_profile, python_profile.clone(), python_profile];
        let layouts = [layout.clone(), python, service];
        let mut tables = Vec::new();
        for (((repo, label), profile), layout) in images.into_iter().zip(&profiles).zip(&layouts) {
            let rounds = convert_rounds(
                &petrel,
                &source,
                &source_link,
                repo,
                layout,
                profile,
                w,
                rounds,
                one_way,
                bits,
            )?;
            tables.push((label, rounds));
        }
        print_conversions(&tables, mbit, rtt_ms, rounds);
        let next = next_release_rounds(&petrel, &source, &source_link, w, rounds, one_way, bits)?;
        print_next_release(&next, mbit, rtt_ms, rounds);
    }
    if convert_only {
        return Ok(());
    }
    if !startup_only {
        convert_once()?;
    }
    startup_rows(&petrel, &source_link, &dest_link, w, &startup, image_bytes)?;
    if startup_only {
        return Ok(());
    }
    amplify_sweep(&petrel, &dest_link, w, &startup, mbit, rtt_ms)
}

/// Writes the synthetic startup set as a prefetch profile at `profile`.
pub(crate) fn write_startup_profile(startup: &[(String, u64)], profile: &Path) -> anyhow::Result<()> {
    let entries: Vec<serde_json::Value> = startup
        .iter()
        .map(|(path, len)| {
            if *len == u64::MAX {
                serde_json::json!({"path": path})
            } else {
                serde_json::json!({"path": path, "ranges": [[0, len]]})
            }
        })
        .collect();
    std::fs::write(
        profile,
        serde_json::to_vec(&serde_json::json!({"petrel_profile": 1, "entries": entries}))?,
    )?;
    Ok(())
}

/// Bytes of every blob of the OCI layout at `layout`.
fn layout_bytes(layout: &Path) -> anyhow::Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(layout.join("blobs/sha256"))? {
        total += entry?.metadata()?.len();
    }
    Ok(total)
}

/// One image's conversions, one figure per round: skopeo copy and petrel convert
/// over loopback, then over the shaped link, then petrel convert with a prefetch
/// profile over the shaped link, then at `--compression-level 9` over it; and the
/// bytes the last petrel converts pushed (plain, with the profile, at level 9).
struct Conversions {
    seconds: [Vec<f64>; 6],
    uploaded: [u64; 3],
    /// Over loopback, per round: CPU seconds of skopeo copy and of petrel convert,
    /// each with the two registries' CPU while it ran.
    loopback_cpu: [Vec<Cpu>; 2],
    /// What inflating the source layers alone takes on this machine, per round.
    inflating: Vec<Inflating>,
}

/// Seconds to inflate an image's gzip layers once, in this process, with the
/// inflater petrel uses: every converter that builds a tree from a gzip layer
/// (petrel, Nydus, SOCI's zran index, eStargz) reads the whole stream, and one
/// gzip stream inflates on one core (each block needs the 32 KiB before it).
#[derive(Clone, Copy, Default)]
struct Inflating {
    /// The longest layer's.
    longest: f64,
    /// All layers', one after another.
    total: f64,
}

impl Inflating {
    /// The least time inflating takes here: layers side by side on `cores`, each
    /// on one.
    fn floor(&self, cores: f64) -> f64 {
        self.longest.max(self.total / cores)
    }
}

/// Inflates every gzip blob of the OCI layout at `layout` once, timing each.
fn inflate_layers(layout: &Path) -> anyhow::Result<Inflating> {
    let mut inflating = Inflating::default();
    let mut buffer = vec![0u8; 1 << 20];
    for entry in std::fs::read_dir(layout.join("blobs/sha256"))? {
        let bytes = std::fs::read(entry?.path())?;
        if !bytes.starts_with(&[0x1f, 0x8b]) {
            continue;
        }
        let started = std::time::Instant::now();
        let mut gzip = flate2::read::GzDecoder::new(&bytes[..]);
        while std::io::Read::read(&mut gzip, &mut buffer)? > 0 {}
        let seconds = started.elapsed().as_secs_f64();
        inflating.longest = inflating.longest.max(seconds);
        inflating.total += seconds;
    }
    Ok(inflating)
}

/// CPU seconds one conversion (or copy) cost: the client, and the registries it
/// pulled from and pushed to.
#[derive(Clone, Copy, Default)]
struct Cpu {
    client: f64,
    registries: f64,
}

impl Cpu {
    fn total(&self) -> f64 {
        self.client + self.registries
    }
}

/// Converts `repo:v1` of `source` vs `skopeo copy` of it, registry to registry over
/// loopback (CPU and the registries' own speed decide), then over shaped links,
/// then over them with `profile` (into a repository of its own: in `repo`, the
/// plain conversion would be its default chunk dictionary); `rounds` times,
/// interleaved, each round into a registry of its own (skopeo would mount the
/// blobs an earlier round pushed, and petrel reuse its conversion).
#[allow(clippy::too_many_arguments)]
fn convert_rounds(
    petrel: &Path,
    source: &Registry,
    source_link: &str,
    repo: &str,
    layout: &Path,
    profile: &Path,
    w: &Path,
    rounds: usize,
    one_way: Duration,
    bits: f64,
) -> anyhow::Result<Conversions> {
    let mut seconds: [Vec<f64>; 6] = Default::default();
    let mut loopback_cpu: [Vec<Cpu>; 2] = Default::default();
    let mut inflating = Vec::new();
    let summary = w.join(format!("convert-{repo}.json"));
    let profiled_summary = w.join(format!("convert-{repo}-profiled.json"));
    let level9_summary = w.join(format!("convert-{repo}-level9.json"));
    for round in 0..rounds {
        let dest = Registry::start(&w.join(format!("dest-{repo}-{round}")))?;
        let dest_link = relay::start(&dest.addr, one_way, bits);
        let runs = [
            format!(
                "skopeo copy --quiet --src-tls-verify=false --dest-tls-verify=false docker://{}/{repo}:v1 docker://{}/loopcopy:v1",
                source.addr, dest.addr
            ),
            format!(
                "{} convert docker://{}/{repo}:v1 docker://{}/loop:petrel > /dev/null",
                petrel.display(),
                source.addr,
                dest.addr
            ),
            format!("skopeo copy --quiet --src-tls-verify=false --dest-tls-verify=false docker://{source_link}/{repo}:v1 docker://{dest_link}/copy:v1"),
            format!(
                "{} convert docker://{source_link}/{repo}:v1 docker://{dest_link}/{repo}:petrel --json > {}",
                petrel.display(),
                summary.display()
            ),
            format!(
                "{} convert docker://{source_link}/{repo}:v1 docker://{dest_link}/{repo}-profiled:petrel --prefetch-profile {} --json > {}",
                petrel.display(),
                profile.display(),
                profiled_summary.display()
            ),
            // A repository of its own: the plain conversion would be its default
            // chunk dictionary.
            format!(
                "{} convert docker://{source_link}/{repo}:v1 docker://{dest_link}/{repo}-level9:petrel --compression-level 9 --json > {}",
                petrel.display(),
                level9_summary.display()
            ),
        ];
        for (i, (series, script)) in seconds.iter_mut().zip(runs).enumerate() {
            let registries_before = source.cpu_seconds() + dest.cpu_seconds();
            let run = run_shell(&script)?;
            series.push(run.seconds);
            if let Some(cpu) = loopback_cpu.get_mut(i) {
                cpu.push(Cpu {
                    client: run.cpu_seconds,
                    registries: source.cpu_seconds() + dest.cpu_seconds() - registries_before,
                });
            }
        }
        inflating.push(inflate_layers(layout)?);
        eprintln!(
            "{repo} round {}: skopeo {:.2} s, convert {:.2} s on loopback; skopeo {:.2} s, convert {:.2} s, with the profile {:.2} s, at level 9 {:.2} s shaped",
            round + 1,
            seconds[0][round],
            seconds[1][round],
            seconds[2][round],
            seconds[3][round],
            seconds[4][round],
            seconds[5][round]
        );
    }
    let uploaded = [&summary, &profiled_summary, &level9_summary].map(|path| uploaded_bytes(path));
    Ok(Conversions {
        seconds,
        uploaded,
        loopback_cpu,
        inflating,
    })
}

/// Seconds to bring the service's next release (only its app layer changed) into
/// a repository that holds the release before, per round: skopeo copy (which
/// sends only the changed layer) and petrel convert (which reads every layer to
/// build the tree, and pushes only new chunks), over loopback and over the shaped
/// link; and the bytes the last petrel convert pushed.
struct NextRelease {
    seconds: [Vec<f64>; 4],
    uploaded: u64,
}

fn next_release_rounds(
    petrel: &Path,
    source: &Registry,
    source_link: &str,
    w: &Path,
    rounds: usize,
    one_way: Duration,
    bits: f64,
) -> anyhow::Result<NextRelease> {
    let mut seconds: [Vec<f64>; 4] = Default::default();
    let summary = w.join("convert-next-release.json");
    for round in 0..rounds {
        let dest = Registry::start(&w.join(format!("dest-next-{round}")))?;
        let dest_link = relay::start(&dest.addr, one_way, bits);
        let (a, d) = (&source.addr, &dest.addr);
        let copy = "skopeo copy --quiet --src-tls-verify=false --dest-tls-verify=false";
        let convert = petrel.display();
        // Release 1 in each repository first, untimed, over loopback.
        for repo in ["loopcopy", "copy"] {
            run_shell(&format!("{copy} docker://{a}/service:v1 docker://{d}/{repo}:v1"))?;
        }
        for repo in ["loop", "svc"] {
            run_shell(&format!(
                "{convert} convert docker://{a}/service:v1 docker://{d}/{repo}:v1-petrel > /dev/null"
            ))?;
        }
        let runs = [
            format!("{copy} docker://{a}/service:v2 docker://{d}/loopcopy:v2"),
            format!("{convert} convert docker://{a}/service:v2 docker://{d}/loop:v2-petrel > /dev/null"),
            format!("{copy} docker://{source_link}/service:v2 docker://{dest_link}/copy:v2"),
            format!(
                "{convert} convert docker://{source_link}/service:v2 docker://{dest_link}/svc:v2-petrel --json > {}",
                summary.display()
            ),
        ];
        for (series, script) in seconds.iter_mut().zip(runs) {
            series.push(run_shell(&script)?.seconds);
        }
        eprintln!(
            "next release round {}: skopeo {:.2} s, convert {:.2} s on loopback; skopeo {:.2} s, convert {:.2} s shaped",
            round + 1,
            seconds[0][round],
            seconds[1][round],
            seconds[2][round],
            seconds[3][round]
        );
    }
    Ok(NextRelease {
        seconds,
        uploaded: uploaded_bytes(&summary),
    })
}

/// The bytes a `petrel convert --json` run pushed, from its summary at `path` (0
/// when it cannot be read).
fn uploaded_bytes(path: &Path) -> u64 {
    std::fs::read(path)
        .ok()
        .and_then(|bytes| serde_json::from_slice::<serde_json::Value>(&bytes).ok())
        .and_then(|summary| summary["manifests"][0]["uploaded_bytes"].as_u64())
        .unwrap_or(0)
}

fn print_next_release(next: &NextRelease, mbit: f64, rtt_ms: f64, rounds: usize) {
    let [loop_copy, loop_convert, copy, convert] = next.seconds.clone().map(|series| median(&series));
    println!();
    println!("the service's next release (only its app layer changed) into a repository holding the release before ({mbit} Mbit/s, {rtt_ms} ms RTT); medians of {rounds}");
    println!("| link | skopeo copy (sends the changed layer) | petrel convert (reads the changed layer; pushes {} KiB) | vs skopeo copy |", next.uploaded >> 10);
    println!("|---|---:|---:|---:|");
    println!(
        "| loopback | {loop_copy:.2} s | {loop_convert:.2} s | {:.2} |",
        loop_convert / loop_copy
    );
    println!("| shaped | {copy:.2} s | {convert:.2} s | {:.2} |", convert / copy);
}

/// The conversion table: each image's medians, petrel against skopeo copy.
fn print_conversions(tables: &[(String, Conversions)], mbit: f64, rtt_ms: f64, rounds: usize) {
    println!();
    println!("registry -> registry over loopback and over a shaped link ({mbit} Mbit/s per direction, {rtt_ms} ms RTT, userspace relay); medians of {rounds}");
    println!("| image | link | skopeo copy | petrel convert | vs skopeo copy |");
    println!("|---|---|---:|---:|---:|");
    for (label, conversions) in tables {
        let [loopback_skopeo, loopback_convert, skopeo, convert, profiled, level9] =
            conversions.seconds.clone().map(|series| median(&series));
        println!(
            "| {label} | loopback | {loopback_skopeo:.2} s | {loopback_convert:.2} s | {:.2} |",
            loopback_convert / loopback_skopeo
        );
        println!(
            "| {label} | shaped (petrel pushes {} MiB) | {skopeo:.2} s | {convert:.2} s | {:.2} |",
            conversions.uploaded[0] >> 20,
            convert / skopeo
        );
        println!(
            "| {label} | shaped, `--prefetch-profile` (petrel pushes {} MiB) | {skopeo:.2} s | {profiled:.2} s | {:.2} |",
            conversions.uploaded[1] >> 20,
            profiled / skopeo
        );
        println!(
            "| {label} | shaped, `--compression-level 9` (petrel pushes {} MiB) | {skopeo:.2} s | {level9:.2} s | {:.2} |",
            conversions.uploaded[2] >> 20,
            level9 / skopeo
        );
    }
    print_loopback_cpu(tables);
}

/// Where the CPU of a loopback conversion goes, against skopeo copy's: on loopback
/// the cores, not the link, set the pace, and the least time a run can take here
/// is its CPU seconds over this machine's cores.
fn print_loopback_cpu(tables: &[(String, Conversions)]) {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    println!();
    println!("loopback CPU, core-seconds (medians): the client, and both registries while it ran; the floor is their sum over this machine's {cores} cores");
    println!("| image | skopeo copy | its registries | petrel convert | its registries | convert's floor | vs skopeo copy's wall |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for (label, conversions) in tables {
        let [copy, convert] = conversions.loopback_cpu.clone().map(|runs| {
            let client = median(&runs.iter().map(|c| c.client).collect::<Vec<_>>());
            let registries = median(&runs.iter().map(|c| c.registries).collect::<Vec<_>>());
            Cpu { client, registries }
        });
        let floor = convert.total() / cores;
        let copy_wall = median(&conversions.seconds[0]);
        println!(
            "| {label} | {:.2} | {:.2} | {:.2} | {:.2} | {floor:.2} s | {:.2} |",
            copy.client,
            copy.registries,
            convert.client,
            convert.registries,
            floor / copy_wall
        );
    }
    print_inflating(tables, cores);
}

/// What no conversion of a gzip image can beat over loopback: inflating its layers,
/// each stream on one core, against skopeo copy's wall (which inflates nothing).
fn print_inflating(tables: &[(String, Conversions)], cores: f64) {
    println!();
    println!("inflating the source layers alone, in this process (medians): any converter that reads the layers' files (petrel, Nydus, a SOCI zran index) inflates every byte, one core per gzip stream");
    println!("| image | longest layer | all layers | least on {cores} cores | vs skopeo copy's wall |");
    println!("|---|---:|---:|---:|---:|");
    for (label, conversions) in tables {
        let runs = &conversions.inflating;
        let longest = median(&runs.iter().map(|r| r.longest).collect::<Vec<_>>());
        let total = median(&runs.iter().map(|r| r.total).collect::<Vec<_>>());
        let floor = median(&runs.iter().map(|r| r.floor(cores)).collect::<Vec<_>>());
        println!(
            "| {label} | {longest:.2} s | {total:.2} s | {floor:.2} s | {:.2} |",
            floor / median(&conversions.seconds[0])
        );
    }
}

/// Startup of the synthetic app (`app_image`, `image_bytes` of layers): a full
/// pull and unpack vs a lazy mount reading the startup set, on demand and with a
/// prefetch region.
fn startup_rows(
    petrel: &Path,
    source_link: &str,
    dest_link: &str,
    w: &Path,
    startup: &[(String, u64)],
    image_bytes: u64,
) -> anyhow::Result<()> {
    // Startup: full pull + unpack vs lazy mount + reading the startup set.
    let pull_dir = w.join("pulled");
    let pull = run_shell(&format!(
        "skopeo copy --quiet --src-tls-verify=false docker://{source_link}/app:v1 oci:{dir}:v1 && mkdir -p {dir}/rootfs && for l in $(python3 -c 'import json,sys; m=json.load(open(sys.argv[1]+\"/blobs/sha256/\"+json.load(open(sys.argv[1]+\"/index.json\"))[\"manifests\"][0][\"digest\"][7:])); print(\" \".join(x[\"digest\"][7:] for x in m[\"layers\"]))' {dir}); do tar -xzf {dir}/blobs/sha256/$l -C {dir}/rootfs; done",
        dir = pull_dir.display()
    ))?;
    // The same startup set as a profile, for a conversion with a prefetch region.
    let profile = w.join("profile.json");
    write_startup_profile(startup, &profile)?;
    run_shell(&format!(
        "{} convert docker://{source_link}/app:v1 docker://{dest_link}/app:petrel-pf --prefetch-profile {} > /dev/null",
        petrel.display(),
        profile.display()
    ))?;
    let lazy = startup_run(
        petrel,
        &format!("docker://{dest_link}/app:petrel"),
        &w.join("lazy"),
        startup,
        "off",
        &[],
    )?;
    let prefetched = startup_run(
        petrel,
        &format!("docker://{dest_link}/app:petrel-pf"),
        &w.join("pf"),
        startup,
        "table",
        &[],
    )?;

    println!();
    println!(
        "startup read set: {} files, {} MiB read",
        startup.len(),
        lazy.read_bytes >> 20
    );
    println!("| startup | bytes fetched | requests | seconds to ready | vs full pull |");
    println!("|---|---:|---:|---:|---:|");
    println!(
        "| skopeo copy + unpack (whole image) | {image_bytes} | 4 layers | {:.1} | 1.00 |",
        pull.seconds
    );
    for (name, run) in [
        ("petrel, on demand only", &lazy),
        ("petrel, recorded prefetch region streamed", &prefetched),
    ] {
        println!(
            "| {name} (mounted after {:.2} s) | {} | {} (+manifest, bootstrap) | {:.1} | {:.3} (bytes {:.3}) |",
            run.mounted.as_secs_f64(),
            run.fetched,
            run.requests,
            run.ready.as_secs_f64(),
            run.ready.as_secs_f64() / pull.seconds,
            run.fetched as f64 / image_bytes as f64
        );
    }
    Ok(())
}

/// On-demand startup with each amplification window (how far a fetch extends over
/// following missing chunks), as ratios to the default window.
fn amplify_sweep(
    petrel: &Path,
    dest_link: &str,
    w: &Path,
    startup: &[(String, u64)],
    mbit: f64,
    rtt_ms: f64,
) -> anyhow::Result<()> {
    let windows: [u64; 7] = [0, 64 << 10, 128 << 10, 256 << 10, 512 << 10, 1 << 20, 4 << 20];
    let mut sweep = Vec::new();
    for window in windows {
        let dir = w.join(format!("amplify-{window}"));
        let run = startup_run(
            petrel,
            &format!("docker://{dest_link}/app:petrel"),
            &dir,
            startup,
            "off",
            &["--amplify-bytes".to_string(), window.to_string()],
        )?;
        sweep.push((window, run));
    }
    let baseline = sweep
        .iter()
        .find(|(w, _)| *w == petrel_fuse_daemon::fetch::DEFAULT_AMPLIFY_BYTES)
        .map(|(_, r)| (r.ready.as_secs_f64(), r.fetched as f64))
        .unwrap_or((1.0, 1.0));
    println!();
    println!(
        "on-demand startup by amplification window over {mbit} Mbit/s, {rtt_ms} ms RTT (default {} KiB = 1.00)",
        petrel_fuse_daemon::fetch::DEFAULT_AMPLIFY_BYTES >> 10
    );
    println!("| --amplify-bytes | requests | bytes fetched | bytes / read | seconds to ready | ready vs default | bytes vs default |");
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    for (window, run) in &sweep {
        println!(
            "| {} KiB | {} | {} | {:.2} | {:.2} | {:.2} | {:.2} |",
            window >> 10,
            run.requests,
            run.fetched,
            run.fetched as f64 / run.read_bytes.max(1) as f64,
            run.ready.as_secs_f64(),
            run.ready.as_secs_f64() / baseline.0,
            run.fetched as f64 / baseline.1
        );
    }
    Ok(())
}
