#!/usr/bin/env bash
# The whole test suite: formatting, lints, docs, and every test (unit, property,
# end-to-end). Installs what it needs first. Run as root on Debian.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh

echo "== the stated MSRV covers every dependency"
scripts/check-msrv.sh
echo "== cargo deny: licenses, duplicate versions, sources (deny.toml)"
cargo deny --offline check licenses bans sources
echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --quiet -- -D warnings
echo "== cargo doc"
RUSTDOCFLAGS=-Dwarnings cargo doc --workspace --no-deps --quiet
echo "== fuzz targets build and replay their corpus"
scripts/fuzz-replay.sh
echo "== the patched tar crate's own tests (vendor/tar/PETREL-PATCHES.md)"
cargo test --quiet --manifest-path vendor/tar/Cargo.toml --lib
echo "== tests"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast
else
  cargo test --workspace --no-fail-fast
fi
