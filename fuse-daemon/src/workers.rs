//! Pools of threads: a fixed one running queued jobs (reads waiting for fetches)
//! and an elastic one (fetches a reader hands off).

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

/// Threads started as work arrives and kept a while for more: a fetch handed off
/// by a reader, which should start at once rather than queue behind the tails of
/// other fetches. At most `max` run at once; beyond that the caller runs its job
/// itself.
#[derive(Debug)]
pub struct Elastic {
    name: &'static str,
    max: usize,
    state: Mutex<ElasticState>,
    arrived: std::sync::Condvar,
}

#[derive(Default)]
struct ElasticState {
    queue: std::collections::VecDeque<Job>,
    idle: usize,
    threads: usize,
    spawned: usize,
}

impl std::fmt::Debug for ElasticState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ElasticState")
            .field("queued", &self.queue.len())
            .field("idle", &self.idle)
            .field("threads", &self.threads)
            .finish()
    }
}

/// How long an idle thread of an [`Elastic`] pool waits for work before it exits.
const ELASTIC_IDLE: std::time::Duration = std::time::Duration::from_secs(30);

impl Elastic {
    pub fn new(name: &'static str, max: usize) -> Arc<Self> {
        Arc::new(Elastic {
            name,
            max: max.max(1),
            state: Mutex::new(ElasticState::default()),
            arrived: std::sync::Condvar::new(),
        })
    }

    /// Runs `job` on an idle thread, or on a new one; hands it back when `max`
    /// threads are busy (or a thread cannot be started).
    pub fn try_run(self: &Arc<Self>, job: Job) -> Result<(), Job> {
        let mut state = self.state.lock().expect("pool lock");
        if state.idle > state.queue.len() {
            state.queue.push_back(job);
            self.arrived.notify_one();
            return Ok(());
        }
        if state.threads >= self.max {
            return Err(job);
        }
        state.threads += 1;
        state.spawned += 1;
        let number = state.spawned;
        drop(state);
        let pool = Arc::clone(self);
        let slot = Arc::new(Mutex::new(Some(job)));
        let first = Arc::clone(&slot);
        let started = std::thread::Builder::new()
            .name(format!("{}-{number}", self.name))
            .spawn(move || {
                if let Some(job) = first.lock().ok().and_then(|mut j| j.take()) {
                    job();
                }
                pool.serve();
            });
        if started.is_err() {
            self.state.lock().expect("pool lock").threads -= 1;
            let job = slot.lock().ok().and_then(|mut j| j.take());
            return job.map_or(Ok(()), Err);
        }
        Ok(())
    }

    /// A thread's life after its first job: takes queued jobs until none came
    /// for `ELASTIC_IDLE`.
    fn serve(&self) {
        let mut state = self.state.lock().expect("pool lock");
        loop {
            if let Some(job) = state.queue.pop_front() {
                drop(state);
                job();
                state = self.state.lock().expect("pool lock");
                continue;
            }
            state.idle += 1;
            let (next, timeout) = self
                .arrived
                .wait_timeout_while(state, ELASTIC_IDLE, |s| s.queue.is_empty())
                .expect("pool lock");
            state = next;
            state.idle -= 1;
            if timeout.timed_out() && state.queue.is_empty() {
                state.threads -= 1;
                return;
            }
        }
    }

    /// Threads alive now (busy or idle).
    #[cfg(test)]
    fn threads(&self) -> usize {
        self.state.lock().expect("pool lock").threads
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};

    #[test]
    fn an_elastic_pool_starts_a_thread_per_busy_job_up_to_its_bound() {
        let pool = Elastic::new("test", 3);
        let (release, gate) = std::sync::mpsc::channel::<()>();
        let gate = Arc::new(Mutex::new(gate));
        let ran = Arc::new(AtomicUsize::new(0));
        for _ in 0..3 {
            let (gate, ran) = (Arc::clone(&gate), Arc::clone(&ran));
            assert!(pool
                .try_run(Box::new(move || {
                    let _ = gate.lock().unwrap().recv();
                    ran.fetch_add(1, SeqCst);
                }))
                .is_ok());
        }
        assert_eq!(pool.threads(), 3);
        // All three are busy: a fourth job comes back to its caller.
        assert!(pool.try_run(Box::new(|| {})).is_err());
        for _ in 0..3 {
            release.send(()).unwrap();
        }
        while ran.load(SeqCst) < 3 {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        // Once idle, the threads take new jobs instead of new threads starting.
        std::thread::sleep(std::time::Duration::from_millis(50));
        let done = Arc::new(AtomicUsize::new(0));
        for _ in 0..3 {
            let done = Arc::clone(&done);
            assert!(pool
                .try_run(Box::new(move || {
                    done.fetch_add(1, SeqCst);
                }))
                .is_ok());
        }
        while done.load(SeqCst) < 3 {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(pool.threads(), 3);
    }
}
