//! `petrel record` runs an image's own program as root, so it runs it in a sandbox
//! (docs/security.md, "petrel record is a sandbox"). A hostile workload tries the
//! host's filesystem through /proc and by path, host devices, new mounts and device
//! nodes, and the host's network; it must reach none of them.

mod support;

use std::io::Read;
use std::path::Path;
use support::*;

fn can_run() -> bool {
    let ok = fuse_available() && Path::new("/bin/busybox").exists();
    if !ok {
        petrel_fixtures::report_skip("needs /dev/fuse, root and /bin/busybox (scripts/install-deps.sh)");
    }
    ok
}

#[test]
fn a_hostile_workload_reaches_neither_the_host_filesystem_nor_its_devices_nor_its_network() {
    if !can_run() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    std::fs::create_dir_all(src.join("bin")).unwrap();
    std::fs::copy("/bin/busybox", src.join("bin/busybox")).unwrap();
    let image = work.path().join("image");
    let out = petrel().arg("build").arg("-o").arg(&image).arg(&src).output().unwrap();
    assert!(out.status.success(), "{}", output_text(&out));

    // A secret on the host, and a listener on the host's loopback.
    let marker = work.path().join("host-secret");
    std::fs::write(&marker, "HOST-SECRET-7c1f\n").unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    listener.set_nonblocking(true).unwrap();

    let script = format!(
        r#"b=/bin/busybox
for p in /proc/[0-9]*; do $b cat $p/root{marker} 2>/dev/null && echo LEAK-proc-root; done
$b cat {marker} 2>/dev/null && echo LEAK-path
$b cat /proc/1/root{marker} 2>/dev/null && echo LEAK-pid1
$b ls /proc/1/root/ | $b tr '\n' ' '; echo
echo "devices: $($b ls /dev | $b tr '\n' ' ')"
for d in /dev/sda /dev/vda /dev/nvme0n1 /dev/mem /dev/kmem /dev/port /dev/kmsg /dev/fuse /dev/loop0; do [ -e $d ] && echo LEAK-dev $d; done
$b mknod /tmp/disk b 253 0 2>/dev/null && echo LEAK-mknod
$b mknod /disk b 8 0 2>/dev/null && echo LEAK-mknod-root
$b mkdir -p /mnt; $b mount -t tmpfs x /mnt 2>/dev/null && echo LEAK-mount
$b mount -o remount,rw /proc 2>/dev/null && echo LEAK-remount
echo hello | $b nc -w 2 127.0.0.1 {port} 2>/dev/null && echo LEAK-net
$b ip link set lo down 2>/dev/null && echo LEAK-net-admin
echo "pid $$ host $($b hostname)"
echo DONE"#,
        marker = marker.display(),
        port = port
    );
    let out = petrel()
        .arg("record")
        .arg(&image)
        .arg("--profile")
        .arg(work.path().join("profile.json"))
        .arg("--cache-dir")
        .arg(work.path().join("cache"))
        .args(["--timeout", "60", "--", "/bin/busybox", "sh", "-c", &script])
        .output()
        .unwrap();
    let text = output_text(&out);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("DONE"), "the workload ran to the end: {text}");
    assert!(!text.contains("LEAK") && !text.contains("HOST-SECRET"), "{text}");
    // In a PID namespace of its own (the sandbox's init is 1), with its own hostname.
    let (pid, host) = text
        .lines()
        .find_map(|l| l.strip_prefix("pid ")?.split_once(" host "))
        .expect("pid and host line");
    assert!(pid.parse::<u32>().unwrap() < 10, "{text}");
    assert_eq!(host, "petrel-record");
    // The workload's root is the image (busybox only), not the host.
    assert!(text.contains("bin "), "{text}");
    assert!(!text.contains(" usr ") && !text.contains(" etc "), "{text}");
    let devices: Vec<&str> = text
        .lines()
        .find_map(|l| l.strip_prefix("devices: "))
        .expect("the device list")
        .split_whitespace()
        .collect();
    for device in &devices {
        assert!(
            [
                "null", "zero", "full", "random", "urandom", "tty", "pts", "shm", "ptmx", "fd", "stdin", "stdout",
                "stderr"
            ]
            .contains(device),
            "unexpected device {device}: {devices:?}"
        );
    }
    // Nothing reached the host's loopback.
    match listener.accept() {
        Ok((mut stream, _)) => {
            let mut got = String::new();
            let _ = stream.read_to_string(&mut got);
            panic!("the workload reached the host's network: {got:?}");
        }
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock),
    }
}
