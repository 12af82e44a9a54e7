//! Credentials belong to their host (docs/security.md): a mirror never receives the
//! origin's credentials, not even when it asks for them or names a token realm of
//! its own; `convert` takes separate credentials for its source and its target.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use support::*;

/// A hostile "mirror": records every request head it gets and answers each with a
/// 401 asking for credentials (Basic, or Bearer with a token realm of its own).
fn capturing_mirror(bearer: bool) -> (String, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (captured, own) = (Arc::clone(&seen), addr.clone());
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut head = String::new();
            let mut reader = BufReader::new(&stream);
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                head.push_str(&line);
            }
            let answer = if head.starts_with("GET /token") {
                let body = r#"{"token":"mirror-token"}"#;
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                )
            } else if bearer {
                format!("HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Bearer realm=\"http://{own}/token\",service=\"m\",scope=\"repository:x:pull\"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            } else {
                "HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Basic realm=\"mirror\"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_string()
            };
            captured.lock().unwrap().push(head);
            let _ = (&stream).write_all(answer.as_bytes());
        }
    });
    (addr, seen)
}

fn push_small_image(registry: &TestRegistry, dir: &std::path::Path, repo: &str) {
    let mut w = petrel_fixtures::layer_writer::LayerWriter::new();
    w.file("etc/motd", &Default::default(), b"private image\n");
    petrel_fixtures::oci_layout::write_oci_layout(&dir.join(repo), "v1", &[w.finish()]).unwrap();
    registry.push_layout(&dir.join(repo), repo, "v1");
}

#[test]
fn a_mirror_never_receives_the_origins_credentials() {
    if !registry_tools_available() {
        return;
    }
    let registry = TestRegistry::start(true);
    let work = tempfile::tempdir().unwrap();
    push_small_image(&registry, work.path(), "private");
    let (basic_mirror, basic_seen) = capturing_mirror(false);
    let (bearer_mirror, bearer_seen) = capturing_mirror(true);

    let out = petrel()
        .arg("convert")
        .arg(format!("docker://{}/private:v1", registry.addr))
        .arg(format!("oci:{}:petrel", work.path().join("out").display()))
        .arg("--mirror")
        .arg(format!("http://{basic_mirror}"))
        .arg("--mirror")
        .arg(format!("http://{bearer_mirror}"))
        .env("PETREL_CREDS", registry.creds().unwrap())
        .env("HOME", work.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "reads fall through to the origin: {}",
        output_text(&out)
    );
    let basic = basic_seen.lock().unwrap().clone();
    let bearer = bearer_seen.lock().unwrap().clone();
    assert!(!basic.is_empty() && !bearer.is_empty(), "both mirrors were asked first");
    for head in basic.iter().chain(&bearer) {
        let lower = head.to_ascii_lowercase();
        assert!(
            !lower.contains("authorization: basic"),
            "a mirror got credentials:\n{head}"
        );
    }
    assert!(
        bearer.iter().any(|h| h.starts_with("GET /token")),
        "the bearer mirror's realm was asked, without credentials: {bearer:?}"
    );
}

#[test]
fn convert_takes_separate_credentials_for_source_and_target() {
    if !registry_tools_available() {
        return;
    }
    let source = TestRegistry::start(true);
    let target = TestRegistry::start(true);
    let work = tempfile::tempdir().unwrap();
    push_small_image(&source, work.path(), "app");
    let good = source.creds_file().unwrap();
    let wrong = work.path().join("wrong");
    std::fs::write(&wrong, "petrel:not-the-password").unwrap();
    let convert = |extra: &[&std::ffi::OsStr]| {
        petrel()
            .arg("convert")
            .arg(format!("docker://{}/app:v1", source.addr))
            .arg(format!("docker://{}/app:petrel", target.addr))
            .args(extra)
            .env("HOME", work.path())
            .env_remove("PETREL_CREDS")
            .output()
            .unwrap()
    };
    // The source's credentials alone do not open the target.
    let out = convert(&["--src-creds".as_ref(), good.as_ref()]);
    assert!(!out.status.success());
    assert!(output_text(&out).contains(&target.addr), "{}", output_text(&out));
    // Wrong target credentials: refused at the target, never printed.
    let out = convert(&[
        "--src-creds".as_ref(),
        good.as_ref(),
        "--dest-creds".as_ref(),
        wrong.as_os_str(),
    ]);
    assert!(!out.status.success());
    assert!(!output_text(&out).contains("not-the-password"), "{}", output_text(&out));
    // Each side with its own file: converted.
    let target_creds = target.creds_file().unwrap();
    let out = convert(&[
        "--src-creds".as_ref(),
        good.as_ref(),
        "--dest-creds".as_ref(),
        target_creds.as_ref(),
    ]);
    assert!(out.status.success(), "{}", output_text(&out));
}
