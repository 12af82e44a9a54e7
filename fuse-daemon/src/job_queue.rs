//! The bounded work queue of the readahead threads: jobs pushed by the read path
//! (never blocking it), taken by worker threads, the oldest dropped beyond a bound,
//! closed when its owner goes.

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex};

/// Which waiting job a worker takes first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Take {
    /// The oldest (a stream read ahead in order).
    Oldest,
    /// The newest (the directory just missed in matters more than older guesses).
    Newest,
}

#[derive(Debug)]
pub struct JobQueue<J> {
    state: Mutex<(VecDeque<J>, bool)>,
    wake: Condvar,
    max: usize,
    take: Take,
}

impl<J> JobQueue<J> {
    /// A queue of at most `max` waiting jobs.
    pub fn new(max: usize, take: Take) -> Self {
        JobQueue {
            state: Mutex::new((VecDeque::new(), false)),
            wake: Condvar::new(),
            max,
            take,
        }
    }

    /// Adds jobs; beyond the bound the oldest waiting ones are dropped.
    pub fn push(&self, jobs: impl IntoIterator<Item = J>) {
        let mut state = self.state.lock().expect("job queue lock");
        let before = state.0.len();
        state.0.extend(jobs);
        if state.0.len() == before {
            return;
        }
        while state.0.len() > self.max {
            state.0.pop_front();
        }
        self.wake.notify_all();
    }

    /// The next job, waiting for one; None once the queue is closed.
    pub fn next(&self) -> Option<J> {
        let mut state = self.state.lock().expect("job queue lock");
        loop {
            if state.1 {
                return None;
            }
            let job = match self.take {
                Take::Oldest => state.0.pop_front(),
                Take::Newest => state.0.pop_back(),
            };
            if job.is_some() {
                return job;
            }
            state = self.wake.wait(state).expect("job queue lock");
        }
    }

    /// The next job, waiting for one, and with it the jobs waiting behind it (in
    /// the order `next` would take them) for as long as `more` accepts each; None
    /// once the queue is closed.
    pub fn next_batch(&self, mut more: impl FnMut(&J) -> bool) -> Option<Vec<J>> {
        let first = self.next()?;
        let mut batch = vec![first];
        let mut state = self.state.lock().expect("job queue lock");
        loop {
            let candidate = match self.take {
                Take::Oldest => state.0.front(),
                Take::Newest => state.0.back(),
            };
            if !candidate.is_some_and(&mut more) {
                return Some(batch);
            }
            let job = match self.take {
                Take::Oldest => state.0.pop_front(),
                Take::Newest => state.0.pop_back(),
            };
            batch.extend(job);
        }
    }

    /// Ends every worker's `next` (jobs still waiting are dropped).
    pub fn close(&self) {
        self.state.lock().expect("job queue lock").1 = true;
        self.wake.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn bounded_ordered_and_closed() {
        let oldest = JobQueue::new(3, Take::Oldest);
        oldest.push(1..=5);
        assert_eq!(
            [oldest.next(), oldest.next(), oldest.next()],
            [Some(3), Some(4), Some(5)]
        );
        let newest = JobQueue::new(3, Take::Newest);
        newest.push(1..=5);
        assert_eq!(newest.next(), Some(5));

        let queue = Arc::new(JobQueue::<u32>::new(8, Take::Oldest));
        let worker = {
            let queue = Arc::clone(&queue);
            std::thread::spawn(move || std::iter::from_fn(|| queue.next()).count())
        };
        queue.push([7, 8]);
        std::thread::sleep(std::time::Duration::from_millis(50));
        queue.close();
        assert_eq!(worker.join().unwrap(), 2, "both taken, then the worker ends");
    }
}
