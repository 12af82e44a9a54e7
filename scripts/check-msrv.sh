#!/usr/bin/env bash
# Checks that the workspace's rust-version (the MSRV it states) is at least every
# dependency's own rust-version in the lock file, so the stated MSRV is true.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo metadata --format-version 1 --locked | python3 scripts/check_msrv.py
