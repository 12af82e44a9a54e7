//! Layers as real tools write them: PAX records whose values hold newlines (binary
//! file capabilities, notes) written by Go's `archive/tar` (docker, buildkit),
//! Python's `tarfile`, GNU tar and bsdtar keep
//! every record through the builder (the `tar` crate split them at newlines; see
//! vendor/tar/PETREL-PATCHES.md).

mod common;

use common::*;
use petrel_builder::BuildOptions;
use std::path::Path;
use std::process::Command;

const NOTE: &[u8] = b"line one\nline two\n";
/// A VFS_CAP_REVISION_2 capability (cap_net_raw) with 0x0a bytes in it.
const CAPABILITY: &[u8] = b"\x01\x00\x00\x02\x0a\x20\x00\x00\x0a\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00";

fn tool_available(tool: &str) -> bool {
    let ok = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        petrel_fixtures::report_skip(&format!("needs {tool} (scripts/install-deps.sh)"));
    }
    ok
}

/// A tree with one file carrying both xattrs (set as root).
fn source_tree(dir: &Path) -> std::path::PathBuf {
    let tree = dir.join("src");
    std::fs::create_dir_all(tree.join("usr/bin")).unwrap();
    let file = tree.join("usr/bin/ping");
    std::fs::write(&file, b"binary").unwrap();
    rustix::fs::setxattr(&file, "user.note", NOTE, rustix::fs::XattrFlags::empty()).unwrap();
    rustix::fs::setxattr(
        &file,
        "security.capability",
        CAPABILITY,
        rustix::fs::XattrFlags::empty(),
    )
    .unwrap();
    tree
}

fn assert_keeps_xattrs(layer: &Path, writer: &str) {
    let dir = tempfile::tempdir().unwrap();
    let layer = std::fs::read(layer).unwrap();
    let (image, _) =
        build_layers(dir.path(), &[layer], BuildOptions::default()).unwrap_or_else(|e| panic!("{writer}: {e}"));
    let tree = unpack_and_scan(&image, dir.path(), "out");
    let ping = &tree[&b"usr/bin/ping".to_vec()];
    assert_eq!(
        ping.xattrs,
        [
            (b"security.capability".to_vec(), CAPABILITY.to_vec()),
            (b"user.note".to_vec(), NOTE.to_vec()),
        ],
        "{writer}"
    );
}

fn run(command: &mut Command) {
    let out = command.output().unwrap();
    assert!(
        out.status.success(),
        "{command:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn gnu_tar_posix_xattrs() {
    if !tool_available("tar") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let tree = source_tree(dir.path());
    let layer = dir.path().join("gnu.tar");
    run(Command::new("tar")
        .args(["--format=posix", "--xattrs", "--xattrs-include=*", "-C"])
        .arg(&tree)
        .arg("-cf")
        .arg(&layer)
        .arg("usr"));
    assert_keeps_xattrs(&layer, "GNU tar");
}

#[test]
fn bsdtar_xattrs() {
    if !tool_available("bsdtar") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let tree = source_tree(dir.path());
    let layer = dir.path().join("bsd.tar");
    run(Command::new("bsdtar")
        .args(["--format", "pax", "--xattrs", "-C"])
        .arg(&tree)
        .arg("-cf")
        .arg(&layer)
        .arg("usr"));
    assert_keeps_xattrs(&layer, "bsdtar");
}

#[test]
fn python_tarfile_pax_headers() {
    if !tool_available("python3") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let layer = dir.path().join("python.tar");
    let script = r#"
import sys, tarfile, io
note = b"line one\nline two\n"
cap = bytes([1,0,0,2,10,32,0,0,10,0,0,0,0,0,0,0,0,0,0,0])
with tarfile.open(sys.argv[1], "w", format=tarfile.PAX_FORMAT) as t:
    for d in ("usr", "usr/bin"):
        info = tarfile.TarInfo(d); info.type = tarfile.DIRTYPE; info.mode = 0o755; t.addfile(info)
    info = tarfile.TarInfo("usr/bin/ping"); info.size = 6; info.mode = 0o755
    info.pax_headers = {
        "SCHILY.xattr.security.capability": cap.decode("utf-8", "surrogateescape"),
        "SCHILY.xattr.user.note": note.decode(),
    }
    t.addfile(info, io.BytesIO(b"binary"))
"#;
    run(Command::new("python3").arg("-c").arg(script).arg(&layer));
    assert_keeps_xattrs(&layer, "Python tarfile");
}

/// GNU tar's incremental archives store directories as dump directories ('D'): they
/// keep their mode, owner and mtime like any directory.
#[test]
fn gnu_dump_directories_keep_their_metadata() {
    if !tool_available("tar") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("src");
    std::fs::create_dir_all(tree.join("srv/private")).unwrap();
    std::fs::write(tree.join("srv/private/key"), b"k").unwrap();
    std::os::unix::fs::chown(tree.join("srv/private"), Some(1234), Some(5678)).unwrap();
    std::fs::set_permissions(
        tree.join("srv/private"),
        std::os::unix::fs::PermissionsExt::from_mode(0o710),
    )
    .unwrap();
    let mtime = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_600_000_000);
    std::fs::File::open(tree.join("srv/private"))
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    let layer = dir.path().join("incremental.tar");
    run(Command::new("tar")
        .arg("--listed-incremental")
        .arg(dir.path().join("snapshot.snar"))
        .arg("-C")
        .arg(&tree)
        .arg("-cf")
        .arg(&layer)
        .arg("srv"));
    let bytes = std::fs::read(&layer).unwrap();
    assert!(
        bytes.chunks(512).any(|block| block[156] == b'D'),
        "GNU tar wrote dump directories"
    );
    let (image, _) = build_layers(dir.path(), &[bytes], BuildOptions::default()).unwrap();
    let tree = unpack_and_scan(&image, dir.path(), "out");
    let private = &tree[&b"srv/private".to_vec()];
    assert_eq!(
        (private.permissions, private.uid, private.gid, private.mtime.0),
        (0o710, 1234, 5678, 1_600_000_000)
    );
    assert!(tree.contains_key(b"srv/private/key".as_slice()));
}

/// Go's `archive/tar` (what docker, buildkit and containerd use) with PAX records.
#[test]
fn go_archive_tar_pax_records() {
    if !tool_available("go") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let program = dir.path().join("write_layer.go");
    std::fs::write(
        &program,
        r#"package main

import (
	"archive/tar"
	"os"
)

func main() {
	out, err := os.Create(os.Args[1])
	if err != nil {
		panic(err)
	}
	w := tar.NewWriter(out)
	for _, d := range []string{"usr/", "usr/bin/"} {
		if err := w.WriteHeader(&tar.Header{Name: d, Typeflag: tar.TypeDir, Mode: 0755, Format: tar.FormatPAX}); err != nil {
			panic(err)
		}
	}
	capability := string([]byte{1, 0, 0, 2, 10, 32, 0, 0, 10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0})
	header := &tar.Header{
		Name: "usr/bin/ping", Typeflag: tar.TypeReg, Mode: 0755, Size: 6, Format: tar.FormatPAX,
		PAXRecords: map[string]string{
			"SCHILY.xattr.security.capability": capability,
			"SCHILY.xattr.user.note":           "line one\nline two\n",
		},
	}
	if err := w.WriteHeader(header); err != nil {
		panic(err)
	}
	if _, err := w.Write([]byte("binary")); err != nil {
		panic(err)
	}
	if err := w.Close(); err != nil {
		panic(err)
	}
	out.Close()
}
"#,
    )
    .unwrap();
    let layer = dir.path().join("go.tar");
    run(Command::new("go")
        .arg("run")
        .arg(&program)
        .arg(&layer)
        .env("GOCACHE", dir.path().join("gocache"))
        .env("GOPATH", dir.path().join("gopath"))
        .env("GO111MODULE", "off")
        .env("GOFLAGS", "")
        .env("GOTOOLCHAIN", "local"));
    assert_keeps_xattrs(&layer, "Go archive/tar");
}
