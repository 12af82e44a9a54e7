//! The Debian package: `scripts/build-deb.sh` builds it from this build's binary,
//! dpkg installs it into a clean root, every promised file is there, and the
//! snapshotter starts from the installed unit's own command line.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use support::*;

fn tools_available() -> bool {
    let found = ["dpkg", "dpkg-deb", "objdump", "unshare"].iter().all(|tool| {
        Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success())
    });
    let ok = found && rustix::process::geteuid().is_root();
    if !ok {
        petrel_fixtures::report_skip("needs root, dpkg, dpkg-deb, objdump and unshare");
    }
    ok
}

fn run(command: &mut Command) -> String {
    let out = command.output().unwrap();
    assert!(out.status.success(), "{command:?}: {}", output_text(&out));
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn build_package(out: &Path) -> PathBuf {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/build-deb.sh");
    let printed = run(Command::new(script)
        .arg("--binary")
        .arg(env!("CARGO_BIN_EXE_petrel"))
        .arg("--out")
        .arg(out));
    PathBuf::from(printed.trim())
}

/// The package installs the binary, a configuration whose keys are all there
/// (commented, but for where the snapshotter lives) and marked a conffile, the two
/// systemd units, a man page for every subcommand and completions for three shells;
/// then the snapshotter runs from the unit's ExecStart (paths into the installed
/// root, in a mount namespace whose /run and /var/lib are private to it), makes its
/// state directory 0700 and its socket, and stops cleanly on SIGTERM.
#[test]
fn the_debian_package_installs_into_a_clean_root_and_its_unit_starts_the_snapshotter() {
    if !tools_available() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let package = build_package(&work.path().join("out"));
    let field = |name: &str| {
        run(Command::new("dpkg-deb").arg("-f").arg(&package).arg(name))
            .trim()
            .to_string()
    };
    assert_eq!(field("Package"), "petrel");
    assert_eq!(field("Version"), env!("CARGO_PKG_VERSION"));
    assert!(field("Depends").starts_with("libc6 (>= 2."), "{}", field("Depends"));

    let root = work.path().join("root");
    let admin = root.join("var/lib/dpkg");
    std::fs::create_dir_all(admin.join("updates")).unwrap();
    std::fs::create_dir_all(admin.join("info")).unwrap();
    std::fs::write(admin.join("status"), "").unwrap();
    // A clean root has no libc6 to satisfy Depends; the maintainer scripts run on
    // the host with DPKG_ROOT set (and then do nothing).
    run(Command::new("dpkg")
        .arg(format!("--root={}", root.display()))
        .args(["--force-depends", "--force-script-chrootless", "--log=/dev/null", "-i"])
        .arg(&package));
    let listed = run(Command::new("dpkg")
        .arg(format!("--root={}", root.display()))
        .args(["-L", "petrel"]));
    let subcommands: Vec<String> = String::from_utf8_lossy(
        &Command::new(env!("CARGO_BIN_EXE_petrel"))
            .arg("--help")
            .output()
            .unwrap()
            .stdout,
    )
    .lines()
    .skip_while(|l| !l.starts_with("Commands:"))
    .skip(1)
    .take_while(|l| l.starts_with("  "))
    .filter_map(|l| l.split_whitespace().next().map(str::to_string))
    .filter(|name| name != "help")
    .collect();
    assert!(subcommands.len() > 10, "{subcommands:?}");
    let mut expected: Vec<String> = [
        "/usr/bin/petrel",
        "/etc/petrel/snapshotter.toml",
        "/lib/systemd/system/petrel-snapshotter.service",
        "/lib/systemd/system/petrel-mount@.service",
        "/usr/share/man/man1/petrel.1.gz",
        "/usr/share/bash-completion/completions/petrel",
        "/usr/share/zsh/vendor-completions/_petrel",
        "/usr/share/fish/vendor_completions.d/petrel.fish",
        "/usr/share/doc/petrel/copyright",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    expected.extend(
        subcommands
            .iter()
            .map(|s| format!("/usr/share/man/man1/petrel-{s}.1.gz")),
    );
    for path in &expected {
        assert!(listed.lines().any(|l| l == path), "{path} not installed:\n{listed}");
        assert!(root.join(&path[1..]).exists(), "{path} missing on disk");
    }
    let conffiles = std::fs::read_to_string(admin.join("info/petrel.conffiles")).unwrap();
    assert_eq!(conffiles.trim(), "/etc/petrel/snapshotter.toml");

    // Every key of the reference page is in the installed configuration.
    let config = std::fs::read_to_string(root.join("etc/petrel/snapshotter.toml")).unwrap();
    let reference = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/config.md")).unwrap();
    let keys = reference
        .lines()
        .skip_while(|l| *l != "```toml")
        .skip(1)
        .take_while(|l| *l != "```")
        .filter(|l| !l.starts_with('#') && l.contains(" = "))
        .map(|l| l.split(" = ").next().unwrap().to_string());
    for key in keys {
        let active = config.lines().any(|l| l.starts_with(&format!("{key} = ")));
        let commented = config.lines().any(|l| l.starts_with(&format!("# {key} = ")));
        assert!(active || commented, "{key} missing from the installed configuration");
    }

    // The unit's command line, with its paths inside the installed root.
    let unit = std::fs::read_to_string(root.join("lib/systemd/system/petrel-snapshotter.service")).unwrap();
    let exec = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("ExecStart")
        .replace("/usr/bin/petrel", &root.join("usr/bin/petrel").display().to_string())
        .replace("/etc/petrel/", &format!("{}/", root.join("etc/petrel").display()));
    let script = format!(
        "set -e\nmount -t tmpfs tmpfs /run\nmount -t tmpfs tmpfs /var/lib\n\
         {exec} > {log} 2>&1 &\npid=$!\n\
         for i in $(seq 200); do [ -S /run/petrel/snapshotter.sock ] && break; sleep 0.05; done\n\
         [ -S /run/petrel/snapshotter.sock ] && echo socket\n\
         stat -c 'state %a' /var/lib/petrel/snapshotter\n\
         kill -TERM $pid\nstatus=0\nwait $pid || status=$?\necho exit $status\n",
        log = work.path().join("snapshotter.log").display()
    );
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&out.stdout);
    let log = std::fs::read_to_string(work.path().join("snapshotter.log")).unwrap_or_default();
    assert!(
        printed.contains("socket") && printed.contains("state 700") && printed.contains("exit 0"),
        "{printed}\n{}\nsnapshotter log:\n{log}",
        String::from_utf8_lossy(&out.stderr)
    );
}
