//! Docker credential helpers (`docker-credential-<name> get`): the server URL on
//! standard input, `{"Username": …, "Secret": …}` on standard output, as the Docker
//! CLI runs them. A helper's answer is bounded (size and time) and never logged.

use crate::auth::Credentials;
use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The largest answer read from a helper.
const MAX_ANSWER: u64 = 64 << 10;
/// How long a helper may take.
const TIMEOUT: Duration = Duration::from_secs(30);

/// Asks helper `name` for `server`'s credentials: none when it has none (the
/// Docker CLI's "credentials not found"), an error when it cannot be run or answers
/// nonsense.
pub fn get(name: &str, server: &str) -> Result<Option<Credentials>, String> {
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
        return Err(format!("{name:?} is not a credential helper name"));
    }
    let program = format!("docker-credential-{name}");
    let mut child = Command::new(&program)
        .arg("get")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("running {program}: {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(server.as_bytes());
    }
    let stdout = child.stdout.take().expect("piped");
    let reader = std::thread::spawn(move || {
        let mut answer = Vec::new();
        let _ = stdout.take(MAX_ANSWER + 1).read_to_end(&mut answer);
        answer
    });
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            break status;
        }
        if started.elapsed() > TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("{program} did not answer within {TIMEOUT:?}"));
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let answer = reader.join().unwrap_or_default();
    if !status.success() {
        // Helpers exit non-zero with "credentials not found" for unknown servers.
        return Ok(None);
    }
    if answer.len() as u64 > MAX_ANSWER {
        return Err(format!("{program} answered more than {MAX_ANSWER} bytes"));
    }
    let value: serde_json::Value =
        serde_json::from_slice(&answer).map_err(|_| format!("{program} did not answer JSON"))?;
    let field = |key: &str| value.get(key).and_then(|v| v.as_str()).unwrap_or_default().to_string();
    let (username, secret) = (field("Username"), field("Secret"));
    if username == "<token>" {
        return Err(format!(
            "{program} holds an identity token for {server}; petrel needs a username and password"
        ));
    }
    if username.is_empty() && secret.is_empty() {
        return Ok(None);
    }
    Ok(Some(Credentials {
        username,
        password: secret,
    }))
}
