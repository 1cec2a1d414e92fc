//! Admission control: at most `max_concurrent` requests generate at once and at most
//! `max_queue` wait; anything beyond is refused at once with RESOURCE_EXHAUSTED rather than
//! queued without bound (the behaviour TGI's router and vLLM users ask for).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use ferry_core::{Error, Result};

/// Shared admission state.
#[derive(Debug)]
pub struct Admission {
    slots: Arc<Semaphore>,
    /// Requests admitted and not yet finished (running + waiting).
    admitted: Arc<AtomicUsize>,
    max_concurrent: usize,
    capacity: usize,
}

/// A place in the system: held from admission until the request ends.
#[derive(Debug)]
pub struct Ticket {
    admitted: Arc<AtomicUsize>,
    slots: Arc<Semaphore>,
}

/// A running slot; dropping it lets the next queued request start.
#[derive(Debug)]
pub struct Slot {
    _permit: OwnedSemaphorePermit,
    _ticket: Ticket,
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
            max_concurrent,
            capacity: max_concurrent + max_queue,
        }
    }

    /// Reserves a place or refuses at once when running + waiting would exceed the limits.
    pub fn admit(&self) -> Result<Ticket> {
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
        Ok(Ticket {
            admitted: self.admitted.clone(),
            slots: self.slots.clone(),
        })
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
            _ticket: self,
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
        assert_eq!(err.kind(), ferry_core::ErrorKind::ResourceExhausted);
        let s1 = t1.run().await;
        drop(s1);
        let s2 = t2.run().await;
        assert_eq!(a.in_system(), 1);
        drop(s2);
        assert_eq!(a.in_system(), 0);
        assert!(a.admit().is_ok());
    }
}
