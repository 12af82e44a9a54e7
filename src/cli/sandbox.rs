//! The sandbox `petrel record` runs an image's own program in. The program is a
//! stranger's and runs as root, so it gets:
//! - its own mount, PID, IPC, UTS and network namespaces (`unshare(1)`, with private
//!   mount propagation; the namespaces die with the recording);
//! - the image's tree as its root by `pivot_root`, the host's tree detached, so there
//!   is no path back (`/proc/<pid>/root` of every process it can see is inside);
//! - a `/proc` of its own PID namespace, a minimal `/dev` (null, zero, full, random,
//!   urandom, tty, a private devpts and shm; no host block device), a private `/tmp`;
//!   every writable mount `nodev`;
//! - a network namespace with only loopback;
//! - a capability bounding set cut to a container runtime's defaults without
//!   `CAP_MKNOD`: no `CAP_SYS_ADMIN` (no new mounts), no `CAP_SYS_MODULE`,
//!   `CAP_SYS_RAWIO`, `CAP_SYS_PTRACE`, `CAP_NET_ADMIN`, `CAP_DAC_READ_SEARCH`
//!   (no `open_by_handle_at` to host files).
//!
//! `run_init` is the sandbox's PID 1: the hidden subcommand `unshare` starts.

use anyhow::Context;
use rustix::mount::{MountFlags, UnmountFlags};
use rustix::thread::CapabilitySet;
use std::path::Path;
use std::process::{Command, ExitCode};

/// The hidden subcommand that runs as the sandbox's PID 1.
pub const INIT_COMMAND: &str = "__record-sandbox-init";

/// Device nodes the workload gets, bound one by one from the host.
const DEVICES: [&str; 6] = ["null", "zero", "full", "random", "urandom", "tty"];

/// Where the host's root is put by `pivot_root`, then detached.
const OLD_ROOT: &str = ".petrel-host-root";

/// Capabilities the workload keeps (a container runtime's defaults, less CAP_MKNOD).
fn kept_capabilities() -> CapabilitySet {
    CapabilitySet::CHOWN
        | CapabilitySet::DAC_OVERRIDE
        | CapabilitySet::FSETID
        | CapabilitySet::FOWNER
        | CapabilitySet::NET_RAW
        | CapabilitySet::SETGID
        | CapabilitySet::SETUID
        | CapabilitySet::SETFCAP
        | CapabilitySet::SETPCAP
        | CapabilitySet::NET_BIND_SERVICE
        | CapabilitySet::SYS_CHROOT
        | CapabilitySet::KILL
        | CapabilitySet::AUDIT_WRITE
}

/// The command that runs `workload` in a sandbox rooted at `root` (a mount point).
pub fn command(root: &Path, workload: &[String]) -> anyhow::Result<Command> {
    let petrel = std::env::current_exe().context("finding the petrel binary")?;
    let mut command = Command::new("unshare");
    command
        .args([
            "--mount",
            "--propagation",
            "private",
            "--pid",
            "--fork",
            "--kill-child",
            "--ipc",
            "--uts",
            "--net",
            "--",
        ])
        .arg(petrel)
        .arg(INIT_COMMAND)
        .arg(root)
        .arg("--")
        .args(workload);
    Ok(command)
}

/// The sandbox's PID 1 (already in its namespaces): builds the root, drops the
/// host's tree and capabilities, runs the workload and exits with its status.
pub fn run_init(root: &Path, workload: &[String]) -> anyhow::Result<ExitCode> {
    let (program, arguments) = workload.split_first().context("no workload to run")?;
    prepare_root(root)?;
    enter_root(root)?;
    rustix::system::sethostname(b"petrel-record").context("naming the sandbox's host")?;
    drop_capabilities()?;
    let status = Command::new(program)
        .args(arguments)
        .env_clear()
        .env("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
        .env("HOME", "/root")
        .env("TERM", "xterm")
        .status()
        .with_context(|| format!("starting {program} in the sandbox"))?;
    Ok(ExitCode::from(status.code().map_or(128, |c| c as u8)))
}

fn mount(source: &str, target: &Path, fstype: &str, flags: MountFlags, data: &str) -> anyhow::Result<()> {
    std::fs::create_dir_all(target).with_context(|| format!("creating {}", target.display()))?;
    let data = std::ffi::CString::new(data)?;
    rustix::mount::mount(source, target, fstype, flags, Some(data.as_c_str()))
        .with_context(|| format!("mounting {fstype} at {}", target.display()))
}

/// /proc, a minimal /dev and /tmp inside `root`, and loopback up.
fn prepare_root(root: &Path) -> anyhow::Result<()> {
    let private = MountFlags::NOSUID | MountFlags::NODEV;
    mount("proc", &root.join("proc"), "proc", private | MountFlags::NOEXEC, "")?;
    let dev = root.join("dev");
    mount(
        "tmpfs",
        &dev,
        "tmpfs",
        MountFlags::NOSUID | MountFlags::NOEXEC,
        "mode=0755,size=1m",
    )?;
    for device in DEVICES {
        let node = dev.join(device);
        std::fs::File::create(&node).with_context(|| format!("creating {}", node.display()))?;
        rustix::mount::mount_bind(Path::new("/dev").join(device), &node)
            .with_context(|| format!("binding /dev/{device}"))?;
    }
    mount(
        "devpts",
        &dev.join("pts"),
        "devpts",
        MountFlags::NOSUID | MountFlags::NOEXEC,
        "newinstance,ptmxmode=0666,mode=0620",
    )?;
    mount("shm", &dev.join("shm"), "tmpfs", private, "mode=1777,size=64m")?;
    for (link, target) in [
        ("ptmx", "pts/ptmx"),
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        std::os::unix::fs::symlink(target, dev.join(link)).with_context(|| format!("linking /dev/{link}"))?;
    }
    mount("tmpfs", &root.join("tmp"), "tmpfs", private, "mode=1777")?;
    // Loopback only (servers that print a ready line often listen on it).
    let up = Command::new("ip").args(["link", "set", "lo", "up"]).status();
    if !up.is_ok_and(|s| s.success()) {
        tracing::warn!("could not bring up loopback in the record sandbox (is iproute2 installed?)");
    }
    Ok(())
}

/// Makes `root` the root directory and detaches the host's tree.
fn enter_root(root: &Path) -> anyhow::Result<()> {
    rustix::process::chdir(root).with_context(|| format!("entering {}", root.display()))?;
    std::fs::create_dir_all(OLD_ROOT)?;
    rustix::process::pivot_root(".", OLD_ROOT).context("pivot_root into the image")?;
    rustix::process::chdir("/")?;
    rustix::mount::unmount(format!("/{OLD_ROOT}").as_str(), UnmountFlags::DETACH)
        .context("detaching the host's tree")?;
    let _ = std::fs::remove_dir(format!("/{OLD_ROOT}"));
    Ok(())
}

/// Cuts the capability bounding set to `kept_capabilities` (the workload, exec'd
/// after this, can never hold more), and the current sets with it.
fn drop_capabilities() -> anyhow::Result<()> {
    let kept = kept_capabilities();
    for bit in 0..64u32 {
        let capability = CapabilitySet::from_bits_retain(1 << bit);
        if kept.contains(capability) {
            continue;
        }
        match rustix::thread::remove_capability_from_bounding_set(capability) {
            Ok(()) | Err(rustix::io::Errno::INVAL) => {}
            Err(e) => return Err(e).with_context(|| format!("dropping capability {bit}")),
        }
    }
    let mut sets = rustix::thread::capabilities(None).context("reading capabilities")?;
    sets.effective &= kept;
    sets.permitted &= kept;
    sets.inheritable &= kept;
    rustix::thread::set_capabilities(None, sets).context("setting capabilities")?;
    Ok(())
}
