"""Reads `cargo metadata` on stdin; fails unless the workspace's rust-version covers
every dependency's rust-version."""
import json
import sys


def version(text):
    parts = [int(x) for x in (text or "0").split(".")]
    return tuple((parts + [0, 0, 0])[:3])


def show(v):
    return ".".join(str(x) for x in v)


meta = json.load(sys.stdin)
members = set(meta["workspace_members"])
ours = {version(p["rust_version"]) for p in meta["packages"] if p["id"] in members}
if len(ours) != 1:
    sys.exit(f"workspace members state different rust-versions: {sorted(ours)}")
msrv = ours.pop()
needs = [(version(p["rust_version"]), p["name"], p["version"]) for p in meta["packages"] if p["id"] not in members]
too_new = sorted(n for n in needs if n[0] > msrv)
if too_new:
    listed = ", ".join(f"{name} {ver} (rust {show(v)})" for v, name, ver in too_new)
    sys.exit(f"rust-version {show(msrv)} is below what these dependencies need: {listed}")
print(f"rust-version {show(msrv)} covers all {len(needs)} dependencies")
