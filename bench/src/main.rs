//! `petrel-bench`: benchmarks that print tables. Every figure is stated beside a
//! baseline measured in the same run on the same input, since these machines are
//! shared and noisy. Run through `scripts/bench.sh` (release build).

mod apps;
mod bigfile;
mod build;
mod containerd;
mod dedup;
mod edge;
mod lazy_mount;
mod measure;
mod mount;
mod node;
mod registry;
mod relay;
mod scrape;
mod store;
mod trees;

/// What each benchmark takes (every flag but the `--no-*`/`--*-only` switches takes
/// a value).
const USAGE: &str = "usage: petrel-bench <benchmark> [flags]
  build       [--scale F] [--layer-gib N]            petrel build against tar | zstd of the same input
  mount       [--scale F] [--skip-1m]                mount and read against plain disk
  registry    [--scale F] [--rtt-ms N] [--mbit N] [--rounds N] [--convert-only | --next-release-only | --startup-only | --amplify-only]
                                                     convert against skopeo copy (a synthetic and the real Python image),
                                                     lazy startup against a full pull, the amplification sweep
  dedup                                              release N+1 against release N: bytes each way adds
  containerd                                         containerd 1.6: petrel's snapshotter against a full pull with overlayfs
  scrape                                             the snapshotter's metrics with 1 and 20 lazy images
  apps        [--app python|node|java|tsc] [--rounds N] [--rtt-ms N] [--mbit N] [--no-containerd] [--read-all]
              [--readahead-sweep B,B]                real images from Debian packages: cold start over a shaped link
  coldstart   [--app A] [--rounds N]                 apps on 100 Mbit/s + 20 ms, then 20 Mbit/s + 50 ms
  bigfile     [--gib F] [--rounds N] [--shaped-mib N] [--rtt-ms N] [--mbit N] [--lazy-only]
                                                     one model file: lazy read against curl, cached read against disk
  store       [--chunks N] [--chunk-bytes B]         the chunk store at scale: put, open with a bound, GC, compaction
  edge        [--scale F] [--rtt-ms N] [--mbit N] [--before PETREL] [--no-containerd]
                                                     mirror fan-out, dead mirror, offline restart
  relay       UPSTREAM [--rtt-ms N] [--mbit N]       the benchmarks' shaped link in front of UPSTREAM (host:port),
                                                     its address printed, until killed: to look at one run closely";

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("{USAGE}");
        return Ok(());
    }
    match args.first().map(String::as_str) {
        Some("build") => build::run(&args[1..]),
        Some("mount") => mount::run(&args[1..]),
        Some("dedup") => dedup::run(&args[1..]),
        Some("containerd") => containerd::run(&args[1..]),
        Some("registry") => registry::run(&args[1..]),
        Some("scrape") => scrape::run(&args[1..]),
        Some("edge") => edge::run(&args[1..]),
        Some("apps") => apps::run(&args[1..]),
        Some("coldstart") => apps::run_coldstart(&args[1..]),
        Some("bigfile") => bigfile::run(&args[1..]),
        Some("store") => store::run(&args[1..]),
        Some("relay") => relay::run(&args[1..]),
        _ => {
            eprintln!("{USAGE}");
            std::process::exit(2)
        }
    }
}
