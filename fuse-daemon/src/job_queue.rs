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
        self.next_batch(|_| false)?.pop()
    }

    /// The next job, waiting for one, and with it the jobs waiting behind it (in
    /// the order `next` would take them) for as long as `more` accepts each, all
    /// taken at once (no other worker takes one in between); None once the queue is
    /// closed.
    pub fn next_batch(&self, mut more: impl FnMut(&J) -> bool) -> Option<Vec<J>> {
        let mut state = self.state.lock().expect("job queue lock");
        let mut batch = Vec::new();
        loop {
            if state.1 {
                return None;
            }
            let candidate = match self.take {
                Take::Oldest => state.0.front(),
                Take::Newest => state.0.back(),
            };
            match candidate {
                None if batch.is_empty() => {
                    state = self.wake.wait(state).expect("job queue lock");
                    continue;
                }
                Some(job) if batch.is_empty() || more(job) => {}
                _ => return Some(batch),
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

    #[test]
    fn a_batch_takes_what_fits_at_once_and_leaves_the_rest() {
        let queue = JobQueue::new(16, Take::Newest);
        queue.push([1u32, 2, 3, 4, 5]);
        let mut sum = 5;
        // The first job always; then while the running sum stays within 12.
        let batch = queue.next_batch(|job| {
            sum += job;
            sum <= 12
        });
        assert_eq!(batch, Some(vec![5, 4, 3]));
        assert_eq!(queue.next_batch(|_| true), Some(vec![2, 1]));
        // Workers waiting at once: every job is taken by exactly one of them.
        let queue = Arc::new(JobQueue::<u32>::new(64, Take::Oldest));
        let workers: Vec<_> = (0..4)
            .map(|_| {
                let queue = Arc::clone(&queue);
                std::thread::spawn(move || {
                    let mut taken = Vec::new();
                    while let Some(batch) = queue.next_batch(|_| true) {
                        taken.extend(batch);
                    }
                    taken
                })
            })
            .collect();
        queue.push(0..40);
        std::thread::sleep(std::time::Duration::from_millis(50));
        queue.close();
        let mut all: Vec<u32> = workers.into_iter().flat_map(|w| w.join().unwrap()).collect();
        all.sort_unstable();
        assert_eq!(all, (0..40).collect::<Vec<_>>());
    }
}
