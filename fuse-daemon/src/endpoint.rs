//! Serving a local endpoint (a mount's control socket, the snapshotter's metrics) to
//! several clients at once, each bounded in time and in what it may send: one idle
//! or slow client never holds up another, nor a thread forever.

use std::io::{Read, Write};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Connections served at once; a connection beyond this is closed at once.
pub const MAX_CLIENTS: usize = 32;
/// How long a client may take to send its request, or to take the answer.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);
/// The most bytes of a request that are read.
pub const MAX_REQUEST_BYTES: u64 = 8 << 10;

/// What answers a request: its bytes in, the reply out.
pub type Answer = Arc<dyn Fn(&[u8]) -> Vec<u8> + Send + Sync>;

/// A connected client stream whose reads and writes can time out.
pub trait Connection: Read + Write + Send + 'static {
    fn set_timeouts(&self, timeout: Duration) -> std::io::Result<()>;
}

impl Connection for std::os::unix::net::UnixStream {
    fn set_timeouts(&self, timeout: Duration) -> std::io::Result<()> {
        self.set_read_timeout(Some(timeout))?;
        self.set_write_timeout(Some(timeout))
    }
}

impl Connection for std::net::TcpStream {
    fn set_timeouts(&self, timeout: Duration) -> std::io::Result<()> {
        self.set_read_timeout(Some(timeout))?;
        self.set_write_timeout(Some(timeout))
    }
}

/// Answers each connection of `incoming` on a thread of its own (at most
/// `MAX_CLIENTS` at once): `answer` gets the first `MAX_REQUEST_BYTES` of what the
/// client sends before `is_complete` says the request is whole (or the client stops
/// sending), and returns the reply.
pub fn serve<C: Connection>(
    incoming: impl Iterator<Item = std::io::Result<C>>,
    is_complete: fn(&[u8]) -> bool,
    answer: Answer,
) {
    let active = Arc::new(AtomicUsize::new(0));
    for stream in incoming.flatten() {
        if active.fetch_add(1, Ordering::SeqCst) >= MAX_CLIENTS {
            active.fetch_sub(1, Ordering::SeqCst);
            continue;
        }
        let (active, answer) = (Arc::clone(&active), Arc::clone(&answer));
        let spawned = std::thread::Builder::new()
            .name("petrel-endpoint".into())
            .spawn(move || {
                let _ = serve_one(stream, is_complete, answer.as_ref());
                active.fetch_sub(1, Ordering::SeqCst);
            });
        if spawned.is_err() {
            // The closure (and its count) never ran.
            continue;
        }
    }
}

fn serve_one<C: Connection>(
    mut stream: C,
    is_complete: fn(&[u8]) -> bool,
    answer: &(dyn Fn(&[u8]) -> Vec<u8> + Send + Sync),
) -> std::io::Result<()> {
    stream.set_timeouts(CLIENT_TIMEOUT)?;
    let mut request = Vec::new();
    let mut buffer = [0u8; 1024];
    while (request.len() as u64) < MAX_REQUEST_BYTES && !is_complete(&request) {
        let n = stream.read(&mut buffer)?;
        if n == 0 {
            break;
        }
        request.extend_from_slice(&buffer[..n]);
    }
    request.truncate(MAX_REQUEST_BYTES as usize);
    stream.write_all(&answer(&request))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::{UnixListener, UnixStream};

    #[test]
    fn an_idle_client_does_not_hold_up_another() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let listener = UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            serve(
                listener.incoming(),
                |r| r.contains(&b'\n'),
                Arc::new(|r: &[u8]| [b"got ".as_slice(), r].concat()),
            )
        });
        // Idle clients that never send a byte, and one that sends endlessly.
        let idle: Vec<UnixStream> = (0..4).map(|_| UnixStream::connect(&path).unwrap()).collect();
        let mut flood = UnixStream::connect(&path).unwrap();
        std::thread::spawn(move || while flood.write_all(&[b'x'; 4096]).is_ok() {});
        let mut client = UnixStream::connect(&path).unwrap();
        client.write_all(b"stats\n").unwrap();
        let mut reply = String::new();
        client.read_to_string(&mut reply).unwrap();
        assert_eq!(reply, "got stats\n");
        // Answered while every idle client is still being waited for (none was
        // closed for its timeout yet, which a serial server would have needed).
        for stream in &idle {
            stream.set_nonblocking(true).unwrap();
            let err = (&*stream).read(&mut [0u8; 1]).unwrap_err();
            assert_eq!(err.kind(), std::io::ErrorKind::WouldBlock);
        }
    }
}
