#!/usr/bin/env bash
# Installs what petrel's demo, tests and benchmarks need on Debian (as root).
# Idempotent: packages already present are not fetched again.
set -euo pipefail

packages=(binutils fuse3 zstd time curl unzip busybox-static docker-registry skopeo apache2-utils protobuf-compiler containerd runc stargz-snapshotter libarchive-tools python3 util-linux iproute2 golang-go tinyproxy openssl)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${missing[@]}" >/dev/null
  # The tests run tinyproxy with their own config; a system service that the
  # package may have started is not wanted (only when we just installed it).
  if [[ " ${missing[*]} " == *" tinyproxy "* ]] && command -v systemctl >/dev/null 2>&1; then
    systemctl disable --now tinyproxy >/dev/null 2>&1 || true
  fi
fi
if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo is required (Rust 1.90 or newer)" >&2
  exit 1
fi
# scripts/test.sh checks licenses, duplicate versions and sources with cargo-deny
# (deny.toml); built once from crates.io (about 2 minutes).
if ! command -v cargo-deny >/dev/null 2>&1; then
  echo "installing cargo-deny"
  cargo install --locked --quiet cargo-deny@0.20.2
fi
# A registry with the referrers API of OCI distribution 1.1, which Debian's
# docker-registry 2.8 lacks: the tests publish and find profiles through both.
if ! command -v ferro-oci-server >/dev/null 2>&1 && [ ! -x "${CARGO_HOME:-$HOME/.cargo}/bin/ferro-oci-server" ]; then
  echo "installing ferro-oci-server"
  cargo install --locked --quiet ferro-oci-server@1.0.0
fi
