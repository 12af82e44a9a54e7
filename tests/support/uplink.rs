//! A rate-limited TCP relay that counts the bytes it delivers from its upstream:
//! an edge site's uplink to the origin. It streams (16 KiB at a time, paced), so a
//! client that stops reading stops the upstream too, as over a real link.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub struct Uplink {
    pub addr: String,
    delivered: Arc<AtomicU64>,
}

impl Uplink {
    /// Relays to `upstream` at `bytes_per_second` per connection and direction.
    pub fn start(upstream: &str, bytes_per_second: u64) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let delivered = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&delivered);
        let upstream = upstream.to_string();
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let Ok(server) = TcpStream::connect(&upstream) else {
                    continue;
                };
                let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                std::thread::spawn(move || copy_paced(c2, s2, bytes_per_second, None));
                let counter = Arc::clone(&counter);
                std::thread::spawn(move || copy_paced(server, client, bytes_per_second, Some(&counter)));
            }
        });
        Uplink { addr, delivered }
    }

    /// Bytes delivered from the upstream so far.
    pub fn delivered(&self) -> u64 {
        self.delivered.load(Ordering::SeqCst)
    }
}

fn copy_paced(mut from: TcpStream, mut to: TcpStream, rate: u64, count: Option<&AtomicU64>) {
    let started = Instant::now();
    let mut sent = 0u64;
    let mut buf = [0u8; 16 << 10];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let due = started + Duration::from_secs_f64(sent as f64 / rate as f64);
        std::thread::sleep(due.saturating_duration_since(Instant::now()));
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
        sent += n as u64;
        if let Some(count) = count {
            count.fetch_add(n as u64, Ordering::SeqCst);
        }
    }
    let _ = to.shutdown(Shutdown::Write);
    let _ = from.shutdown(Shutdown::Read);
}
