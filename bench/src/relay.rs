//! A shaping TCP relay for benchmarks: every byte is held `one_way` before it is
//! forwarded (so a request/response pair sees 2 × one_way extra RTT) and each
//! direction is limited to `rate` bytes/s shared by all connections (a token
//! bucket in time: the link is busy until `link_free_at`). Reading and delayed
//! writing run in separate threads, so the link is pipelined, not stop-and-wait.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One direction of the shaped link.
struct Link {
    one_way: Duration,
    bytes_per_second: f64,
    free_at: Mutex<Instant>,
}

impl Link {
    /// When `len` bytes read now may be delivered.
    fn release_time(&self, len: usize) -> Instant {
        let now = Instant::now();
        let mut free_at = self.free_at.lock().expect("link lock");
        let start = (*free_at).max(now);
        *free_at = start + Duration::from_secs_f64(len as f64 / self.bytes_per_second);
        *free_at + self.one_way
    }
}

/// Bytes the relay delivered from the server to clients (all connections).
pub static BYTES_DOWN: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// `petrel-bench relay UPSTREAM [--rtt-ms N] [--mbit N]`: a shaped link (20 ms
/// RTT and 100 Mbit/s, as the registry benchmark's, unless told) in front of
/// UPSTREAM until killed; prints its address.
pub fn run(args: &[String]) -> anyhow::Result<()> {
    let upstream = args.first().filter(|a| !a.starts_with("--"));
    let upstream =
        upstream.ok_or_else(|| anyhow::anyhow!("usage: petrel-bench relay UPSTREAM [--rtt-ms N] [--mbit N]"))?;
    let (mut rtt_ms, mut mbit) = (20.0f64, 100.0f64);
    let mut rest = args[1..].iter();
    while let Some(flag) = rest.next() {
        let value = rest.next().ok_or_else(|| anyhow::anyhow!("{flag} takes a value"))?;
        match flag.as_str() {
            "--rtt-ms" => rtt_ms = value.parse()?,
            "--mbit" => mbit = value.parse()?,
            other => anyhow::bail!("unknown flag {other}"),
        }
    }
    println!(
        "{}",
        start(upstream, Duration::from_secs_f64(rtt_ms / 2000.0), mbit * 1e6)
    );
    loop {
        std::thread::park();
    }
}

/// Starts the relay in front of `upstream`; returns its address.
pub fn start(upstream: &str, one_way: Duration, bits_per_second: f64) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind relay");
    let addr = listener.local_addr().expect("addr").to_string();
    let make = || {
        Arc::new(Link {
            one_way,
            bytes_per_second: bits_per_second / 8.0,
            free_at: Mutex::new(Instant::now()),
        })
    };
    let (up, down) = (make(), make());
    let upstream = upstream.to_string();
    std::thread::spawn(move || {
        for client in listener.incoming().flatten() {
            let Ok(server) = TcpStream::connect(&upstream) else {
                continue;
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            pump(
                client.try_clone().expect("clone"),
                server.try_clone().expect("clone"),
                Arc::clone(&up),
                false,
            );
            pump(server, client, Arc::clone(&down), true);
        }
    });
    addr
}

fn pump(mut from: TcpStream, mut to: TcpStream, link: Arc<Link>, count: bool) {
    // What the link holds in flight is bounded, about its bandwidth-delay product (at
    // least 8 reads): a reader that stops reading stops the sender, as over a real
    // link, instead of the relay draining the whole upstream response into memory.
    let in_flight_bytes = link.bytes_per_second * link.one_way.as_secs_f64() * 2.0;
    let slots = ((in_flight_bytes / (64 << 10) as f64).ceil() as usize).max(8);
    let (tx, rx) = mpsc::sync_channel::<(Instant, Vec<u8>)>(slots);
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if tx.send((link.release_time(n), buf[..n].to_vec())).is_err() {
                        break;
                    }
                }
            }
        }
    });
    std::thread::spawn(move || {
        for (when, data) in rx {
            let now = Instant::now();
            if when > now {
                std::thread::sleep(when - now);
            }
            if to.write_all(&data).is_err() {
                break;
            }
            if count {
                // Counted as delivered: what actually crossed the link.
                BYTES_DOWN.fetch_add(data.len() as u64, std::sync::atomic::Ordering::Relaxed);
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    });
}
