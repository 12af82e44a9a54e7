//! The `petrel` binary end to end: build, inspect, check, unpack, and their exit
//! codes and messages on bad input.

use petrel_fixtures::layer_spec::write_layer;
use petrel_fixtures::sample::{sample_layers, sample_prefetch_list};
use petrel_fixtures::snapshot::{differences, scan};
use std::path::Path;
use std::process::{Command, Output};

fn petrel(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_petrel"))
        .args(args)
        .output()
        .expect("run petrel")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn build_sample(dir: &Path) -> String {
    let layers: Vec<Vec<u8>> = sample_layers().iter().map(|ops| write_layer(ops, "")).collect();
    let paths = petrel_fixtures::write_layer_files(&dir.join("layers"), &layers).unwrap();
    let list = dir.join("prefetch.list");
    std::fs::write(&list, sample_prefetch_list().join("\n")).unwrap();
    let image = dir.join("image");
    let mut args = vec![
        "build",
        "-o",
        image.to_str().unwrap(),
        "--prefetch-list",
        list.to_str().unwrap(),
    ];
    args.extend(paths.iter().map(|p| p.to_str().unwrap()));
    let out = petrel(&args);
    assert!(out.status.success(), "{}", text(&out));
    image.to_str().unwrap().to_string()
}

#[test]
fn build_inspect_check_unpack_the_sample() {
    let dir = tempfile::tempdir().unwrap();
    let image = build_sample(dir.path());

    let out = petrel(&["inspect", &image, "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["prefetch_files"], 4);
    let prefetch = summary["prefetch_bytes"].as_u64().unwrap();
    let blob = summary["blobs"][0]["compressed_size"].as_u64().unwrap();
    assert!(
        prefetch > 2 << 20 && prefetch < blob / 2,
        "python3 and friends lead the blob: {summary}"
    );
    assert!(summary["files"].as_u64().unwrap() > 700);

    let out = petrel(&["inspect", &image, "--tree"]);
    let listing = text(&out);
    assert!(
        listing.contains("/app/app.py") && listing.contains("/bin/python -> /usr/bin/python3"),
        "{listing}"
    );
    assert!(!listing.contains("pkg000.txt"), "whited out in layer 1");

    let out = petrel(&["check", &image]);
    assert!(out.status.success() && text(&out).starts_with("ok:"), "{}", text(&out));

    let target = dir.path().join("rootfs");
    let out = petrel(&["unpack", &image, target.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    let app = std::fs::read_to_string(target.join("app/app.py")).unwrap();
    assert!(app.contains("'release': 2"), "top layer wins: {app}");

    // The tar form holds the same tree.
    let tar = dir.path().join("rootfs.tar");
    assert!(petrel(&["unpack", &image, tar.to_str().unwrap()]).status.success());
    let again = dir.path().join("again");
    assert!(petrel(&["build", "-o", again.to_str().unwrap(), tar.to_str().unwrap()])
        .status
        .success());
    let target2 = dir.path().join("rootfs2");
    assert!(petrel(&["unpack", again.to_str().unwrap(), target2.to_str().unwrap()])
        .status
        .success());
    let diffs = differences(&scan(&target).unwrap(), &scan(&target2).unwrap());
    assert!(diffs.is_empty(), "{diffs:?}");
}

#[test]
fn check_names_the_bad_file_and_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let image = build_sample(dir.path());
    let blob = std::fs::read_dir(Path::new(&image).join("blobs/sha256"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let mut bytes = std::fs::read(&blob).unwrap();
    bytes[512 + 100] ^= 0xff;
    std::fs::write(&blob, &bytes).unwrap();
    let out = petrel(&["check", &image]);
    assert_eq!(out.status.code(), Some(1));
    let message = text(&out);
    assert!(
        message.contains("check failed: file \"app/app.py\": chunk 0 at blob offset 512"),
        "{message}"
    );
    let out = petrel(&["unpack", &image, dir.path().join("x").to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out).contains("digest mismatch") || text(&out).contains("zstd"),
        "{}",
        text(&out)
    );
}

#[test]
fn errors_are_clear() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope");
    let out = petrel(&["inspect", missing.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out).contains("opening image") && text(&out).contains("No such file"),
        "{}",
        text(&out)
    );

    let out = petrel(&[
        "build",
        "-o",
        dir.path().join("o").to_str().unwrap(),
        "--chunker",
        "fixed:5000",
        "x",
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("power of two"), "{}", text(&out));

    let junk = dir.path().join("junk.tar");
    std::fs::write(
        &junk,
        b"definitely not a tar archive, but long enough to have a header? no",
    )
    .unwrap();
    let out = petrel(&[
        "build",
        "-o",
        dir.path().join("o").to_str().unwrap(),
        junk.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).contains("layer 1"), "{}", text(&out));
}

#[test]
fn directory_input_round_trips_and_skips_sockets() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir_all(src.join("sub/deeper")).unwrap();
    std::fs::write(src.join("sub/a.txt"), b"alpha").unwrap();
    std::fs::write(src.join("big.bin"), petrel_fixtures::rng::Rng::new(4).mixed(3 << 20)).unwrap();
    std::fs::hard_link(src.join("sub/a.txt"), src.join("sub/deeper/a-link")).unwrap();
    std::os::unix::fs::symlink("../big.bin", src.join("sub/big-link")).unwrap();
    rustix::fs::lsetxattr(
        src.join("big.bin").as_path(),
        c"user.origin",
        b"petrel",
        rustix::fs::XattrFlags::empty(),
    )
    .unwrap();
    let socket = std::os::unix::net::UnixListener::bind(src.join("sock")).unwrap();
    let image = dir.path().join("image");
    let out = petrel(&["build", "-o", image.to_str().unwrap(), src.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("sockets cannot be stored"), "{}", text(&out));
    drop(socket);
    std::fs::remove_file(src.join("sock")).unwrap();
    let target = dir.path().join("out");
    assert!(petrel(&["unpack", image.to_str().unwrap(), target.to_str().unwrap()])
        .status
        .success());
    // Removing the socket changed the source root's mtime after the build; compare the rest.
    let (mut expected, mut actual) = (scan(&src).unwrap(), scan(&target).unwrap());
    expected.remove(&Vec::new());
    actual.remove(&Vec::new());
    let diffs = differences(&expected, &actual);
    assert!(diffs.is_empty(), "{diffs:#?}");
}

/// `build --compression-level 9` stores less than the default, names its level in
/// the image (`inspect`), and checks and unpacks to the same bytes.
#[test]
fn a_build_at_a_higher_compression_level_is_smaller_and_the_same_tree() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    let lines: String = (0..60_000)
        .map(|i| format!("line {i} of a log, user {}\n", i * 7919 % 1000))
        .collect();
    std::fs::write(src.join("app.log"), &lines).unwrap();
    let stored = |level: &str| -> u64 {
        let image = dir.path().join(format!("image-{level}"));
        let out = petrel(&[
            "build",
            "-o",
            image.to_str().unwrap(),
            "--compression-level",
            level,
            src.to_str().unwrap(),
        ]);
        assert!(out.status.success(), "{}", text(&out));
        let out = petrel(&["inspect", image.to_str().unwrap()]);
        assert!(text(&out).contains(&format!("zstd level {level})")), "{}", text(&out));
        assert!(petrel(&["check", image.to_str().unwrap()]).status.success());
        let target = dir.path().join(format!("out-{level}"));
        assert!(petrel(&["unpack", image.to_str().unwrap(), target.to_str().unwrap()])
            .status
            .success());
        assert_eq!(std::fs::read(target.join("app.log")).unwrap(), lines.as_bytes());
        let out = petrel(&["inspect", image.to_str().unwrap(), "--json"]);
        let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        summary["blobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["compressed_size"].as_u64().unwrap())
            .sum()
    };
    let (default, high) = (stored("3"), stored("9"));
    assert!(high < default, "level 9 stored {high} bytes, level 3 {default}");
    let out = petrel(&["build", "-o", "x", "--compression-level", "0", "y"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
}

#[test]
fn output_into_a_closed_pipe_ends_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let image = build_sample(dir.path());
    // The reader is gone before petrel writes (`petrel inspect --tree | head -0`).
    let mut child = Command::new(env!("CARGO_BIN_EXE_petrel"))
        .args(["inspect", &image, "--tree"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// Log lines carry a level and a time, as text or JSON, and no colour codes when
/// they go to a file (a daemon's log, a journal). (A dead mirror makes a warning.)
#[test]
fn logs_have_levels_and_times_and_no_colour_off_a_terminal() {
    let dir = tempfile::tempdir().unwrap();
    let dead = |port: u16| format!("127.0.0.1:{port}");
    let unused = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    };
    for format in ["text", "json"] {
        let out = Command::new(env!("CARGO_BIN_EXE_petrel"))
            .args(["--log-format", format, "warm"])
            .arg(format!("docker://{}/app:v1", dead(unused())))
            .arg("--mirror")
            .arg(format!("http://{}", dead(unused())))
            .args(["--retries", "1", "--retry-seconds", "1", "--cache-dir"])
            .arg(dir.path().join("cache"))
            .env_remove("PETREL_LOG")
            .output()
            .unwrap();
        assert!(!out.status.success());
        let text = String::from_utf8_lossy(&out.stderr);
        assert!(!text.contains('\u{1b}'), "no ANSI escape codes: {text:?}");
        let line = text
            .lines()
            .find(|l| l.contains("mirror failed"))
            .unwrap_or_else(|| panic!("{format}: a warning about the mirror: {text}"));
        if format == "json" {
            let value: serde_json::Value = serde_json::from_str(line).unwrap();
            assert!(value["timestamp"].is_string() && value["level"] == "WARN", "{line}");
        } else {
            assert!(
                line.starts_with("20") && line.contains("WARN"),
                "time and level first: {line}"
            );
        }
    }
}

/// A package installs a man page per subcommand and shell completions, made from
/// the same definitions as `--help`.
#[test]
fn man_pages_and_completions_cover_every_subcommand() {
    let dir = tempfile::tempdir().unwrap();
    let out = petrel(&["manpages", dir.path().to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    for page in [
        "petrel",
        "petrel-mount",
        "petrel-cache",
        "petrel-snapshotter",
        "petrel-convert",
    ] {
        let roff = std::fs::read_to_string(dir.path().join(format!("{page}.1"))).unwrap();
        assert!(roff.starts_with(".ie") || roff.contains(".TH"), "{page}: {roff}");
    }
    let mount = std::fs::read_to_string(dir.path().join("petrel-mount.1")).unwrap();
    assert!(mount.contains("spec") && mount.contains("readahead"), "{mount}");
    assert!(
        !dir.path().join("petrel-__record-sandbox-init.1").exists(),
        "internal subcommands have no page"
    );
    let out = petrel(&["completions", "bash"]);
    let script = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && script.contains("_petrel") && script.contains("mount"),
        "{script}"
    );
    assert_eq!(petrel(&["completions", "tcsh"]).status.code(), Some(2));
}

/// The three prefetch options have distinct names; the old spellings still work
/// for one release, hidden from `--help`.
#[test]
fn prefetch_options_have_distinct_names_and_the_old_ones_still_work() {
    for (command, new, old) in [
        ("build", "--prefetch-path", "--prefetch <"),
        ("build", "--prefetch-profile", "--prefetch-list <"),
        ("convert", "--prefetch-profile", "--prefetch <"),
        ("mount", "--prefetch-mode", "--prefetch <"),
    ] {
        let help = text(&petrel(&[command, "--help"]));
        assert!(help.contains(new), "{command}: {help}");
        assert!(!help.contains(old), "{command} hides {old}: {help}");
    }
    let dir = tempfile::tempdir().unwrap();
    let layers: Vec<Vec<u8>> = sample_layers().iter().map(|ops| write_layer(ops, "")).collect();
    let paths = petrel_fixtures::write_layer_files(&dir.path().join("layers"), &layers).unwrap();
    std::fs::write(dir.path().join("list"), sample_prefetch_list().join("\n")).unwrap();
    let layer = &paths[0];
    for (i, spelling) in ["--prefetch-profile", "--prefetch-list"].iter().enumerate() {
        let out_dir = dir.path().join(format!("img{i}"));
        let out = petrel(&[
            "build",
            "-o",
            out_dir.to_str().unwrap(),
            spelling,
            dir.path().join("list").to_str().unwrap(),
            layer.to_str().unwrap(),
        ]);
        assert!(out.status.success(), "{spelling}: {}", text(&out));
        let summary = text(&petrel(&["inspect", out_dir.to_str().unwrap()]));
        assert!(!summary.contains("prefetch     0 files"), "{spelling}: {summary}");
    }
}

/// Byte sizes take units in flags (`--max-bytes 1MiB`) as in config files.
#[test]
fn byte_sizes_take_units() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let out = petrel(&[
        "cache",
        "gc",
        "--max-bytes",
        "1.5GiB",
        "--cache-dir",
        cache.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let out = petrel(&[
        "cache",
        "gc",
        "--max-bytes",
        "3 parsecs",
        "--cache-dir",
        cache.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).contains("is not a byte size"), "{}", text(&out));
}
