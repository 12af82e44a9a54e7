#!/usr/bin/env bash
# Runs a benchmark in release mode and prints its table.
#   scripts/bench.sh build [--scale 0.25] [--layer-gib 4]
#   scripts/bench.sh apps [--app python|node|java|tsc] [--rounds 3] [--no-containerd]   (images built from Debian and npm packages: cold start on one shaped link, standalone and under containerd)
#   scripts/bench.sh coldstart [--app A] [--rounds 3]   (the same on 100 Mbit/s + 20 ms, then 20 Mbit/s + 50 ms)
#   scripts/bench.sh registry [--convert-only] [--rounds 3]   (petrel convert against skopeo copy of a synthetic image, the real Python image and a three-layer Python service with PyPI wheels, loopback and shaped; lazy startup; amplification)
#   scripts/bench.sh --help   (every benchmark and its flags)
#   scripts/bench.sh bigfile [--gib 3] [--rounds 3]   (one model file: lazy sequential read vs curl, cached read vs disk, scattered reads)
#   scripts/bench.sh store [--chunks 1000000] [--chunk-bytes 4096]   (the chunk store at scale: put, open with a bound, GC with a reader running, compaction)
#   scripts/bench.sh scrape   (the snapshotter's metrics endpoint with 1 and 20 lazy images mounted)
#   scripts/bench.sh edge [--scale 0.25] [--no-containerd]   (mirror fan-out, dead mirror, offline restart)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cargo build --release --quiet --bin petrel && cargo build --release --quiet -p petrel-bench
exec target/release/petrel-bench "$@"
