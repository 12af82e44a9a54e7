#!/usr/bin/env bash
# Builds the Debian package: petrel_<version>_<arch>.deb with the binary, the
# snapshotter's configuration (every key, commented, from docs/config.md), the
# systemd units, a man page per subcommand and shell completions.
#   scripts/build-deb.sh [--binary PATH] [--out DIR]
# Without --binary it builds the release binary first. Prints the package's path.
set -euo pipefail
cd "$(dirname "$0")/.."

binary=""
out="target/debian"
while [ $# -gt 0 ]; do
  case "$1" in
    --binary) binary="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    *) echo "usage: scripts/build-deb.sh [--binary PATH] [--out DIR]" >&2; exit 2 ;;
  esac
done
if [ -z "$binary" ]; then
  cargo build --release --quiet --bin petrel
  binary=target/release/petrel
fi

version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1)
arch=$(dpkg --print-architecture)
# The newest glibc symbol version the binary needs is the libc6 it depends on.
glibc=$(objdump -T "$binary" | grep -o 'GLIBC_[0-9][0-9.]*' | sed 's/GLIBC_//' | sort -V | tail -n1)

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
install -D -m 0755 "$binary" "$stage/usr/bin/petrel"
strip --strip-debug "$stage/usr/bin/petrel" 2>/dev/null || true

# The configuration: docs/config.md's reference block (checked against the code by
# snapshotter/tests/config_doc.rs) with every key commented out but the two that say
# where the snapshotter lives, so an installed node runs on the defaults.
install -d -m 0755 "$stage/etc/petrel/mounts"
{
  echo "# petrel snapshotter configuration (man petrel-snapshotter; /usr/share/doc/petrel/config.md)."
  echo "# Every key is optional; a commented key shows an example value, not the default."
  echo
  awk '/^```toml$/ {inside=1; next} /^```$/ {if (inside) exit} inside {print}' docs/config.md |
    sed -E '/^(root|address) = /b; /^[[:space:]]*(#|$)/b; s/^/# /'
} > "$stage/etc/petrel/snapshotter.toml"
chmod 0644 "$stage/etc/petrel/snapshotter.toml"

install -D -m 0644 dist/systemd/petrel-snapshotter.service "$stage/lib/systemd/system/petrel-snapshotter.service"
install -D -m 0644 dist/systemd/petrel-mount@.service "$stage/lib/systemd/system/petrel-mount@.service"

"$binary" manpages "$stage/usr/share/man/man1" > /dev/null
gzip -9n "$stage"/usr/share/man/man1/*.1
install -d "$stage/usr/share/bash-completion/completions" "$stage/usr/share/zsh/vendor-completions" \
  "$stage/usr/share/fish/vendor_completions.d"
"$binary" completions bash > "$stage/usr/share/bash-completion/completions/petrel"
"$binary" completions zsh > "$stage/usr/share/zsh/vendor-completions/_petrel"
"$binary" completions fish > "$stage/usr/share/fish/vendor_completions.d/petrel.fish"

install -d "$stage/usr/share/doc/petrel"
install -m 0644 README.md docs/install.md docs/config.md docs/containerd.md docs/security.md "$stage/usr/share/doc/petrel/"
{
  echo "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/"
  echo "Upstream-Name: petrel"
  echo
  echo "Files: *"
  echo "License: Apache-2.0"
  echo " On Debian systems, the full text is in /usr/share/common-licenses/Apache-2.0."
} > "$stage/usr/share/doc/petrel/copyright"

install -d "$stage/DEBIAN"
installed_kib=$(du -sk --exclude=DEBIAN "$stage" | cut -f1)
cat > "$stage/DEBIAN/control" <<EOF
Package: petrel
Version: $version
Architecture: $arch
Maintainer: petrel developers <petrel@example.invalid>
Installed-Size: $installed_kib
Depends: libc6 (>= $glibc)
Recommends: containerd, fuse3
Section: admin
Priority: optional
Homepage: https://example.invalid/petrel
Description: lazy-loading container image filesystem
 petrel converts OCI images so that a node mounts them at once and fetches
 only what is read: a FUSE daemon serves the image from verified,
 deduplicated chunks, and a containerd remote snapshotter runs containers
 from it. This package installs the petrel command, the snapshotter's
 systemd unit and configuration, and a unit template for standalone mounts.
EOF
echo "/etc/petrel/snapshotter.toml" > "$stage/DEBIAN/conffiles"
# systemd learns about the units; nothing is enabled or started (the snapshotter
# needs containerd's proxy_plugins configured first: docs/install.md).
cat > "$stage/DEBIAN/postinst" <<'EOF'
#!/bin/sh
set -e
if [ "$1" = "configure" ] && [ -z "${DPKG_ROOT:-}" ] && [ -d /run/systemd/system ]; then
  systemctl daemon-reload || true
fi
EOF
# Removing the package leaves /var/lib/petrel (the node cache, snapshots) in place.
cat > "$stage/DEBIAN/postrm" <<'EOF'
#!/bin/sh
set -e
if [ "$1" = "remove" ] && [ -z "${DPKG_ROOT:-}" ] && [ -d /run/systemd/system ]; then
  systemctl daemon-reload || true
fi
EOF
chmod 0755 "$stage/DEBIAN/postinst" "$stage/DEBIAN/postrm"

mkdir -p "$out"
package="$out/petrel_${version}_${arch}.deb"
dpkg-deb --root-owner-group -Zxz --build "$stage" "$package" > /dev/null
echo "$package"
