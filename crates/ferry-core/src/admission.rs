//! Admission control, the same for ferryd and ferry-cloud: at most `max_concurrent` requests
//! generate at once and at most `max_queue` wait; anything beyond is refused at once with RESOURCE_EXHAUSTED rather than
//! queued without bound (the behaviour TGI's router and vLLM users ask for). A request with a
//! deadline is also refused at once when the expected wait for a slot already exceeds it: the
//! wait is estimated from how long recent requests held their slots, so an app learns at once
//! that it will not be served in time instead of timing out in the queue.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::{Error, Result};

/// Shared admission state.
#[derive(Debug)]
pub struct Admission {
    slots: Arc<Semaphore>,
    /// Requests admitted and not yet finished (running + waiting).
    admitted: Arc<AtomicUsize>,
    /// Moving average of how long a request held its slot, in ms as `f64` bits (0: none yet).
    held_ms: Arc<AtomicU64>,
    max_concurrent: usize,
    capacity: usize,
}

/// Weight of the newest slot time in the moving average: about the last ten requests.
const HELD_EWMA_WEIGHT: f64 = 0.2;

/// A place in the system: held from admission until the request ends.
#[derive(Debug)]
pub struct Ticket {
    admitted: Arc<AtomicUsize>,
    slots: Arc<Semaphore>,
    held_ms: Arc<AtomicU64>,
}

/// A running slot; dropping it lets the next queued request start and books how long it was
/// held.
#[derive(Debug)]
pub struct Slot {
    _permit: OwnedSemaphorePermit,
    ticket: Ticket,
    since: Instant,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let ms = self.since.elapsed().as_secs_f64() * 1e3;
        let cell = &self.ticket.held_ms;
        // A lost race between two releases drops one sample, which an average can afford.
        let old = f64::from_bits(cell.load(Ordering::Relaxed));
        let new = if old > 0.0 {
            old + HELD_EWMA_WEIGHT * (ms - old)
        } else {
            ms.max(f64::MIN_POSITIVE)
        };
        cell.store(new.to_bits(), Ordering::Relaxed);
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.admitted.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Admission {
    pub fn new(max_concurrent: usize, max_queue: usize) -> Self {
        Admission {
            slots: Arc::new(Semaphore::new(max_concurrent)),
            admitted: Arc::new(AtomicUsize::new(0)),
            held_ms: Arc::new(AtomicU64::new(0)),
            max_concurrent,
            capacity: max_concurrent + max_queue,
        }
    }

    /// Reserves a place or refuses at once when running + waiting would exceed the limits.
    pub fn admit(&self) -> Result<Ticket> {
        self.admit_within(None)
    }

    /// [`Admission::admit`] for a request that must start within `deadline`: also refused at
    /// once (RESOURCE_EXHAUSTED) when the expected wait for a slot exceeds it. Without a slot
    /// time measured yet, only the limits apply.
    pub fn admit_within(&self, deadline: Option<Duration>) -> Result<Ticket> {
        let prev = self.admitted.fetch_add(1, Ordering::AcqRel);
        if prev >= self.capacity {
            self.admitted.fetch_sub(1, Ordering::AcqRel);
            return Err(Error::Overloaded(format!(
                "{} requests running and {} queued (limits: max_concurrent {}, max_queue {}); retry later",
                self.max_concurrent.min(prev),
                prev.saturating_sub(self.max_concurrent),
                self.max_concurrent,
                self.capacity - self.max_concurrent
            )));
        }
        if let Some(deadline) = deadline {
            if let Some(wait_ms) = self.expected_wait_ms(prev) {
                if wait_ms > deadline.as_secs_f64() * 1e3 {
                    self.admitted.fetch_sub(1, Ordering::AcqRel);
                    return Err(Error::Overloaded(format!(
                        "the expected wait for a slot is {wait_ms:.0} ms ({} requests ahead on {} slots, {:.0} ms each lately), over the request's deadline of {} ms; retry later or with a longer deadline",
                        prev,
                        self.max_concurrent,
                        self.held_ms().unwrap_or(0.0),
                        deadline.as_millis()
                    )));
                }
            }
        }
        Ok(Ticket {
            admitted: self.admitted.clone(),
            slots: self.slots.clone(),
            held_ms: self.held_ms.clone(),
        })
    }

    /// How long a request held its slot lately (moving average), once one has finished.
    pub fn held_ms(&self) -> Option<f64> {
        let ms = f64::from_bits(self.held_ms.load(Ordering::Relaxed));
        (ms > 0.0).then_some(ms)
    }

    /// Expected wait for a slot of a request arriving with `ahead` requests in the system:
    /// the `ahead − max_concurrent + 1` that must finish first, each taking a slot time, spread
    /// over the slots, less half a slot time since the running ones are half done on average.
    pub fn expected_wait_ms(&self, ahead: usize) -> Option<f64> {
        let held = self.held_ms()?;
        let must_finish = (ahead + 1).saturating_sub(self.max_concurrent);
        if must_finish == 0 {
            return Some(0.0);
        }
        Some((must_finish as f64 - 0.5) * held / self.max_concurrent as f64)
    }

    /// Requests admitted and not finished.
    pub fn in_system(&self) -> usize {
        self.admitted.load(Ordering::Acquire)
    }

    /// Requests holding a running slot now.
    pub fn running(&self) -> usize {
        self.max_concurrent - self.slots.available_permits().min(self.max_concurrent)
    }

    /// Most requests running at once.
    pub fn max_concurrent(&self) -> usize {
        self.max_concurrent
    }

    /// Most requests waiting for a slot.
    pub fn max_queue(&self) -> usize {
        self.capacity - self.max_concurrent
    }
}

impl Ticket {
    /// Waits for a running slot.
    pub async fn run(self) -> Slot {
        let permit = self
            .slots
            .clone()
            .acquire_owned()
            .await
            .expect("admission semaphore is never closed");
        Slot {
            _permit: permit,
            ticket: self,
            since: Instant::now(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn refuses_beyond_running_plus_queue_and_recovers() {
        let a = Admission::new(1, 1);
        let t1 = a.admit().unwrap();
        let t2 = a.admit().unwrap();
        let err = a.admit().unwrap_err();
        assert_eq!(err.kind(), crate::ErrorKind::ResourceExhausted);
        let s1 = t1.run().await;
        drop(s1);
        let s2 = t2.run().await;
        assert_eq!(a.in_system(), 1);
        drop(s2);
        assert_eq!(a.in_system(), 0);
        assert!(a.admit().is_ok());
    }

    #[tokio::test]
    async fn a_deadline_shorter_than_the_expected_wait_is_refused_at_once() {
        let a = Admission::new(1, 4);
        // No slot time measured yet: only the limits apply.
        let t1 = a.admit_within(Some(Duration::from_millis(1))).unwrap();
        let s1 = t1.run().await;
        std::thread::sleep(Duration::from_millis(40));
        drop(s1);
        let held = a.held_ms().unwrap();
        assert!(held >= 40.0, "{held}");
        // Nothing ahead: no wait, whatever the deadline.
        assert_eq!(a.expected_wait_ms(0), Some(0.0));
        let running = a.admit_within(Some(Duration::from_millis(1))).unwrap();
        let _slot = running.run().await;
        // One running, half done on average: about half a slot time to wait.
        let wait = a.expected_wait_ms(1).unwrap();
        assert!((wait - held / 2.0).abs() < 1e-9, "{wait} {held}");
        let err = a.admit_within(Some(Duration::from_millis(1))).unwrap_err();
        assert_eq!(err.kind(), crate::ErrorKind::ResourceExhausted);
        assert!(err.to_string().contains("deadline"), "{err}");
        assert_eq!(a.in_system(), 1, "a refused request holds no place");
        // A deadline longer than the wait, or none, queues.
        let _queued = a.admit_within(Some(Duration::from_secs(60))).unwrap();
        let _queued_too = a.admit().unwrap();
        assert_eq!(a.in_system(), 3);
    }
}
