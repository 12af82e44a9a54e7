//! A fixed pool of threads running queued jobs (reads waiting for fetches).

use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};

/// Jobs queued beyond the running ones before `run` blocks the FUSE thread.
const QUEUE_DEPTH: usize = 1024;

type Job = Box<dyn FnOnce() + Send>;

/// The pool; dropping it lets the threads finish their queue and exit.
#[derive(Debug)]
pub struct Workers {
    sender: SyncSender<Job>,
}

impl Workers {
    pub fn start(name: &str, threads: usize) -> Self {
        let (sender, receiver) = sync_channel::<Job>(QUEUE_DEPTH);
        let receiver = Arc::new(Mutex::new(receiver));
        for i in 0..threads.max(1) {
            let receiver: Arc<Mutex<Receiver<Job>>> = Arc::clone(&receiver);
            std::thread::Builder::new()
                .name(format!("{name}-{i}"))
                .spawn(move || loop {
                    let job = match receiver.lock() {
                        Ok(rx) => rx.recv(),
                        Err(_) => return,
                    };
                    match job {
                        Ok(job) => job(),
                        Err(_) => return,
                    }
                })
                .expect("spawn worker");
        }
        Workers { sender }
    }

    /// Queues a job (runs it here if the pool is gone).
    pub fn run(&self, job: Job) {
        if let Err(returned) = self.sender.send(job) {
            (returned.0)();
        }
    }
}
