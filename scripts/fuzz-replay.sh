#!/usr/bin/env bash
# Builds the fuzz targets on stable and replays their corpus (no fuzzing). Where a
# nightly toolchain and cargo-fuzz exist, `cargo fuzz run bootstrap_reader` fuzzes.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
cargo build --quiet --bins
target_dir="${CARGO_TARGET_DIR:-target}"
for corpus in corpus/*/; do
  name=$(basename "$corpus")
  "$target_dir/debug/$name" -runs=0 "$corpus" 2>&1 | tail -n 2
done
