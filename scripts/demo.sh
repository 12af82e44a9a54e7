#!/usr/bin/env bash
# The main job on the bundled sample image: generate its layers, build a petrel
# image with a prefetch list, inspect it, verify it, unpack it and compare.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cargo build --release --quiet --bin petrel && cargo build --release --quiet -p petrel-fixtures
bin=target/release
work=$(mktemp -d /tmp/petrel-demo.XXXXXX)
trap 'rm -rf -- "$work"' EXIT

echo "== generating the sample image's OCI layers (fixtures/)"
$bin/petrel-fixtures sample "$work/layers"
echo
echo "== petrel build"
$bin/petrel build -o "$work/image" --prefetch-list "$work/layers/prefetch.list" "$work"/layers/layer-*.tar
echo
echo "== petrel inspect"
$bin/petrel inspect "$work/image"
echo
echo "== petrel check"
$bin/petrel check "$work/image"
echo
echo "== petrel unpack"
$bin/petrel unpack "$work/image" "$work/rootfs"
cat "$work/rootfs/app/app.py" >/dev/null
echo "app/app.py after three layers: $(cat "$work/rootfs/app/app.py" | tail -1)"
echo "layer sizes (uncompressed tar): $(du -cb "$work"/layers/layer-*.tar | tail -1 | cut -f1) bytes"
echo "petrel blob + bootstrap:        $(du -cb "$work"/image/bootstrap "$work"/image/blobs/sha256/* | tail -1 | cut -f1) bytes"
