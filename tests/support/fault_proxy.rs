//! An HTTP/1.1 proxy in front of the test registry that injects faults into blob
//! reads: 500s, 429 with Retry-After, dropped connections, bodies cut short, slow
//! or trickling answers, Range headers ignored, corrupted bodies, or a registry that is down.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    Status500,
    TooManyRequests,
    DropConnection,
    CutBody,
    Slow(Duration),
    /// Headers at once, then the body one byte per this delay (a slow-loris registry).
    Trickle(Duration),
    IgnoreRange,
    CorruptBody,
    /// Held until `FaultState::release` is set.
    Hold,
    /// Headers and the first half of the body at once, the rest once
    /// `FaultState::release` is set (a large answer still arriving).
    HoldSecondHalf,
    /// Passes unchanged (to aim a later fault).
    Pass,
}

#[derive(Debug, Default)]
pub struct FaultState {
    /// Faults for the next blob GETs, in order; then requests pass.
    pub plan: Mutex<VecDeque<Fault>>,
    /// Every request is dropped while set.
    pub down: AtomicBool,
    /// Every blob GET loses its Range header while set.
    pub ignore_range: AtomicBool,
    pub blob_requests: AtomicU64,
    /// Blob GETs asking for several ranges (`Range: bytes=a-b,c-d`).
    pub multi_range_requests: AtomicU64,
    pub faults_injected: AtomicU64,
    /// When set, the proxy acts as a token-authenticated registry: requests need
    /// `Authorization: Bearer <this token>`, and `/token` issues it.
    pub bearer: Mutex<Option<String>>,
    pub tokens_issued: AtomicU64,
    /// Releases held requests.
    pub release: AtomicBool,
    /// Requests currently held.
    pub held: AtomicU64,
    /// Once this many blob GETs have passed, every later one has its body cut
    /// (0: never).
    pub cut_after: AtomicU64,
    /// Every PATCH (the bytes of a chunked upload) is answered 500 while set.
    pub refuse_patch: AtomicBool,
    pub patches_refused: AtomicU64,
    /// Connections accepted, and requests passed on to the registry.
    pub connections: AtomicU64,
    pub forwarded: AtomicU64,
}

/// The proxy; its thread stops with the test process.
pub struct FaultProxy {
    pub addr: String,
    pub state: Arc<FaultState>,
}

impl FaultProxy {
    pub fn start(upstream: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let state = Arc::new(FaultState::default());
        let upstream = upstream.to_string();
        let shared = Arc::clone(&state);
        std::thread::spawn(move || {
            let own = listener.local_addr().expect("addr").to_string();
            for client in listener.incoming().flatten() {
                let state = Arc::clone(&shared);
                let upstream = upstream.clone();
                let own = own.clone();
                std::thread::spawn(move || {
                    let _ = serve(client, &upstream, &own, &state);
                });
            }
        });
        FaultProxy { addr, state }
    }

    pub fn plan(&self, faults: &[Fault]) {
        self.state.plan.lock().unwrap().extend(faults.iter().copied());
    }
}

fn serve(client: TcpStream, upstream: &str, own: &str, state: &FaultState) -> std::io::Result<()> {
    state.connections.fetch_add(1, Ordering::SeqCst);
    client.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut reader = BufReader::new(client.try_clone()?);
    let mut head = Vec::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        if line == "\r\n" || line == "\n" {
            break;
        }
        head.push(line);
    }
    let request_line = head.first().cloned().unwrap_or_default();
    let is_blob_get = request_line.starts_with("GET ") && request_line.contains("/blobs/");
    let mut client = client;
    if state.down.load(Ordering::SeqCst) {
        return Ok(());
    }
    let bearer = state.bearer.lock().unwrap().clone();
    if let Some(valid) = &bearer {
        if request_line.starts_with("GET /token") {
            state.tokens_issued.fetch_add(1, Ordering::SeqCst);
            let body = format!("{{\"token\":\"{valid}\",\"expires_in\":60}}");
            return client.write_all(format!("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()).as_bytes());
        }
        let expected = format!("authorization: bearer {}", valid.to_ascii_lowercase());
        if !head.iter().any(|l| l.to_ascii_lowercase().trim_end() == expected) {
            let challenge =
                format!("Bearer realm=\"http://{own}/token\",service=\"petrel-test\",scope=\"repository:faults:pull\"");
            return client.write_all(format!("HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: {challenge}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").as_bytes());
        }
    }
    let fault = if is_blob_get {
        let seen = state.blob_requests.fetch_add(1, Ordering::SeqCst) + 1;
        if head
            .iter()
            .any(|l| l.to_ascii_lowercase().starts_with("range:") && l.contains(','))
        {
            state.multi_range_requests.fetch_add(1, Ordering::SeqCst);
        }
        let cut_after = state.cut_after.load(Ordering::SeqCst);
        let planned = state.plan.lock().unwrap().pop_front();
        planned.or((cut_after > 0 && seen > cut_after).then_some(Fault::CutBody))
    } else {
        None
    };
    if fault == Some(Fault::Hold) {
        state.held.fetch_add(1, Ordering::SeqCst);
        while !state.release.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(10));
        }
        state.held.fetch_sub(1, Ordering::SeqCst);
    }
    if fault.is_some() {
        state.faults_injected.fetch_add(1, Ordering::SeqCst);
    }
    match fault {
        Some(Fault::Status500) => {
            return client
                .write_all(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        }
        Some(Fault::TooManyRequests) => {
            return client.write_all(
                b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            )
        }
        Some(Fault::DropConnection) => return Ok(()),
        _ => {}
    }
    let drop_range = is_blob_get && (fault == Some(Fault::IgnoreRange) || state.ignore_range.load(Ordering::SeqCst));
    let mut body_len = 0usize;
    let mut forwarded = String::new();
    for line in &head {
        let lower = line.to_ascii_lowercase();
        let strip_auth = bearer.is_some() && lower.starts_with("authorization:");
        if strip_auth || lower.starts_with("connection:") || (drop_range && lower.starts_with("range:")) {
            continue;
        }
        if let Some(v) = lower.strip_prefix("content-length:") {
            body_len = v.trim().parse().unwrap_or(0);
        }
        forwarded.push_str(line);
    }
    forwarded.push_str("Connection: close\r\n\r\n");
    let mut body = vec![0u8; body_len];
    reader.read_exact(&mut body)?;
    if request_line.starts_with("PATCH ") && state.refuse_patch.load(Ordering::SeqCst) {
        state.patches_refused.fetch_add(1, Ordering::SeqCst);
        return client
            .write_all(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    }
    state.forwarded.fetch_add(1, Ordering::SeqCst);
    let mut up = TcpStream::connect(upstream)?;
    up.write_all(forwarded.as_bytes())?;
    up.write_all(&body)?;
    let mut response = Vec::new();
    up.read_to_end(&mut response)?;
    let header_end = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(response.len(), |p| p + 4);
    match fault {
        Some(Fault::CutBody) => {
            let keep = header_end + (response.len() - header_end) / 2;
            client.write_all(&response[..keep])?;
            return Ok(());
        }
        Some(Fault::HoldSecondHalf) => {
            let half = header_end + (response.len() - header_end) / 2;
            client.write_all(&response[..half])?;
            client.flush()?;
            state.held.fetch_add(1, Ordering::SeqCst);
            while !state.release.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(10));
            }
            state.held.fetch_sub(1, Ordering::SeqCst);
            return client.write_all(&response[half..]);
        }
        Some(Fault::Slow(delay)) => std::thread::sleep(delay),
        Some(Fault::Trickle(delay)) => {
            client.write_all(&response[..header_end])?;
            for byte in &response[header_end..] {
                client.write_all(std::slice::from_ref(byte))?;
                client.flush()?;
                std::thread::sleep(delay);
            }
            return Ok(());
        }
        Some(Fault::CorruptBody) if response.len() > header_end => {
            let at = header_end + (response.len() - header_end) / 2;
            response[at] ^= 0x5a;
        }
        _ => {}
    }
    client.write_all(&response)
}
