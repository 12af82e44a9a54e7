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

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
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
        _ => {
            eprintln!("usage: petrel-bench build [--scale F] [--layer-gib N] | mount [--scale F] [--skip-1m] | registry [--scale F] [--rtt-ms N] [--mbit N] | dedup | containerd | scrape | apps [--app python|node] [--rounds N] [--rtt-ms N] [--mbit N] [--readahead-sweep B,B] | coldstart [--app A] [--rounds N] | bigfile [--gib F] [--rounds N] [--shaped-mib N] | store [--chunks N] [--chunk-bytes B] | edge [--scale F] [--rtt-ms N] [--mbit N] [--before PETREL] [--no-containerd]");
            std::process::exit(2)
        }
    }
}
