//! Admission control, the same for ferryd and ferry-cloud: at most `max_concurrent` requests
//! generate at once and at most `max_queue` wait; anything beyond is refused at once with
//! RESOURCE_EXHAUSTED rather than queued without bound (the behaviour TGI's router and vLLM users
//! ask for). A request with a deadline is also refused at once when the expected wait for a slot
//! already exceeds it: the wait is estimated from how long recent requests held their slots, so
//! an app learns at once that it will not be served in time instead of timing out in the queue.
//!
//! Fairness between apps (an app is a bearer token's name; every unauthenticated caller is one
//! app): a freed slot goes to the waiting app that has used the least slot time (fair queuing
//! on the time its requests held slots, first come first served within an app), so a flood
//! from one app does not delay another's request behind the flood, and an app with long
//! requests does not get more of the CPU than one with short ones. An app that starts waiting
//! is charged at least the least slot time of the apps already waiting, so an app idle for an
//! hour cannot then hold the slots for as long. And one app may hold at most
//! `max_queue_per_app` of the waiting places, so it cannot fill the queue and get the others
//! refused.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::oneshot;

use ferry_core::{Error, Result};

/// Shared admission state.
#[derive(Debug)]
pub struct Admission {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    turns: Mutex<Turns>,
    /// Requests admitted and not yet finished (running + waiting).
    admitted: AtomicUsize,
    /// Moving average of how long a request held its slot, in ms as `f64` bits (0: none yet).
    held_ms: AtomicU64,
    max_concurrent: usize,
    capacity: usize,
    max_queue_per_app: usize,
}

/// Who runs next.
#[derive(Debug, Default)]
struct Turns {
    /// Slots no request holds (only while nobody waits).
    free: usize,
    /// Waiting requests of each app, first come first.
    waiting: HashMap<Arc<str>, VecDeque<oneshot::Sender<()>>>,
    /// Apps with waiting requests, in the order they started waiting (ties of slot time).
    order: VecDeque<Arc<str>>,
    /// Slot time each app's requests have held (ms), the fair-queuing clock.
    used_ms: HashMap<Arc<str>, f64>,
    /// Admitted requests of each app that do not run yet.
    queued: HashMap<Arc<str>, usize>,
}

/// Weight of the newest slot time in the moving average: about the last ten requests.
const HELD_EWMA_WEIGHT: f64 = 0.2;

/// A place in the system: held from admission until the request ends.
#[derive(Debug)]
pub struct Ticket {
    shared: Arc<Shared>,
    app: Arc<str>,
    /// Still counted among its app's queued requests (it has not started).
    queued: bool,
}

/// A running slot; dropping it hands the slot to the next app's request in turn and books how
/// long it was held.
#[derive(Debug)]
pub struct Slot {
    ticket: Ticket,
    since: Instant,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let ms = self.since.elapsed().as_secs_f64() * 1e3;
        let cell = &self.ticket.shared.held_ms;
        // A lost race between two releases drops one sample, which an average can afford.
        let old = f64::from_bits(cell.load(Ordering::Relaxed));
        let new = if old > 0.0 {
            old + HELD_EWMA_WEIGHT * (ms - old)
        } else {
            ms.max(f64::MIN_POSITIVE)
        };
        cell.store(new.to_bits(), Ordering::Relaxed);
        self.ticket.shared.release(Some((&self.ticket.app, ms)));
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if self.queued {
            self.shared.unqueue(&self.app);
        }
        self.shared.admitted.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Shared {
    /// Hands a freed slot to the waiting app that has used the least slot time (the earliest
    /// to start waiting among equals), or keeps it free; `used` charges the releasing app for
    /// the time it held the slot first.
    fn release(&self, used: Option<(&Arc<str>, f64)>) {
        let mut t = self.turns.lock();
        if let Some((app, ms)) = used {
            *t.used_ms.entry(app.clone()).or_default() += ms;
        }
        loop {
            let next = t
                .order
                .iter()
                .enumerate()
                .min_by(|(i, a), (j, b)| {
                    let used = |x: &Arc<str>| t.used_ms.get(x).copied().unwrap_or(0.0);
                    used(a).total_cmp(&used(b)).then(i.cmp(j))
                })
                .map(|(i, _)| i);
            let Some(i) = next else {
                t.free += 1;
                return;
            };
            let app = t.order[i].clone();
            let handed = match t.waiting.get_mut(&app) {
                // Senders whose request stopped waiting (the app left) are skipped.
                Some(queue) => loop {
                    let Some(tx) = queue.pop_front() else {
                        break false;
                    };
                    if tx.send(()).is_ok() {
                        break true;
                    }
                },
                None => false,
            };
            if t.waiting.get(&app).is_none_or(VecDeque::is_empty) {
                t.waiting.remove(&app);
                t.order.remove(i);
            }
            if handed {
                return;
            }
        }
    }

    fn unqueue(&self, app: &Arc<str>) {
        let mut t = self.turns.lock();
        if let Some(n) = t.queued.get_mut(app) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                t.queued.remove(app);
            }
        }
    }
}

/// A request waiting for its turn; if it stops waiting after its slot was handed over, the
/// slot goes on to the next request instead of being lost.
struct Waiting {
    rx: Option<oneshot::Receiver<()>>,
    shared: Arc<Shared>,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        if let Some(mut rx) = self.rx.take() {
            rx.close();
            if rx.try_recv().is_ok() {
                self.shared.release(None);
            }
        }
    }
}

impl Admission {
    /// Limits without a per-app cap on the waiting places (the whole queue per app).
    pub fn new(max_concurrent: usize, max_queue: usize) -> Self {
        Self::with_app_queue(max_concurrent, max_queue, max_queue)
    }

    /// Limits where one app may hold at most `max_queue_per_app` waiting places (at least 1).
    pub fn with_app_queue(
        max_concurrent: usize,
        max_queue: usize,
        max_queue_per_app: usize,
    ) -> Self {
        Admission {
            shared: Arc::new(Shared {
                turns: Mutex::new(Turns {
                    free: max_concurrent,
                    ..Turns::default()
                }),
                admitted: AtomicUsize::new(0),
                held_ms: AtomicU64::new(0),
                max_concurrent,
                capacity: max_concurrent + max_queue,
                max_queue_per_app: max_queue_per_app.max(1),
            }),
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
        self.admit_for("", deadline)
    }

    /// [`Admission::admit_within`] for a request of `app` (a bearer token's name; empty for an
    /// unauthenticated caller), which takes its turn among the apps and is refused when `app`
    /// already holds its share of the waiting places.
    pub fn admit_for(&self, app: &str, deadline: Option<Duration>) -> Result<Ticket> {
        let sh = &self.shared;
        let prev = sh.admitted.fetch_add(1, Ordering::AcqRel);
        let refuse = |e: Error| {
            sh.admitted.fetch_sub(1, Ordering::AcqRel);
            Err(e)
        };
        if prev >= sh.capacity {
            return refuse(Error::Overloaded(format!(
                "{} requests running and {} queued (limits: max_concurrent {}, max_queue {}); retry later",
                sh.max_concurrent.min(prev),
                prev.saturating_sub(sh.max_concurrent),
                sh.max_concurrent,
                sh.capacity - sh.max_concurrent
            )));
        }
        let app: Arc<str> = Arc::from(app);
        if let Some(deadline) = deadline {
            if let Some((wait_ms, ahead)) = self.expected_wait_for(&app) {
                if wait_ms > deadline.as_secs_f64() * 1e3 {
                    return refuse(Error::Overloaded(format!(
                        "the expected wait for a slot is {wait_ms:.0} ms ({ahead} requests to start before this one on {} slots, {:.0} ms each lately), over the request's deadline of {} ms; retry later or with a longer deadline",
                        sh.max_concurrent,
                        self.held_ms().unwrap_or(0.0),
                        deadline.as_millis()
                    )));
                }
            }
        }
        {
            let mut t = sh.turns.lock();
            let mine = t.queued.get(&app).copied().unwrap_or(0);
            // Only a request that will wait takes a waiting place.
            if mine >= t.free + sh.max_queue_per_app {
                drop(t);
                return refuse(Error::Overloaded(format!(
                    "this app already has {mine} requests waiting (server.max_queue_per_app {}), so that other apps keep their turn; retry later",
                    sh.max_queue_per_app
                )));
            }
            *t.queued.entry(app.clone()).or_default() += 1;
        }
        Ok(Ticket {
            shared: sh.clone(),
            app,
            queued: true,
        })
    }

    /// How long a request held its slot lately (moving average), once one has finished.
    pub fn held_ms(&self) -> Option<f64> {
        let ms = f64::from_bits(self.shared.held_ms.load(Ordering::Relaxed));
        (ms > 0.0).then_some(ms)
    }

    /// Expected wait for a slot of a request arriving with `ahead` requests in the system, if
    /// they all went first: the `ahead − max_concurrent + 1` that must finish first, each
    /// taking a slot time, spread over the slots, less half a slot time since the running ones
    /// are half done on average. (Admission uses [`Admission::expected_wait_for`], which knows
    /// whose turn comes first.)
    pub fn expected_wait_ms(&self, ahead: usize) -> Option<f64> {
        let held = self.held_ms()?;
        let n = self.shared.max_concurrent;
        let must_finish = (ahead + 1).saturating_sub(n);
        if must_finish == 0 {
            return Some(0.0);
        }
        Some((must_finish as f64 - 0.5) * held / n as f64)
    }

    /// Expected wait for a slot of a request of `app` arriving now, and how many waiting
    /// requests will start before it: the apps take their turns as [`Shared::release`] hands
    /// them out (least slot time used first, each start charged one recent slot time), so a
    /// light app's request goes ahead of most of a flood and waits for few, a flooding app's
    /// waits for its own backlog and the others' turns. `None` before any slot time is
    /// measured.
    pub fn expected_wait_for(&self, app: &str) -> Option<(f64, usize)> {
        let held = self.held_ms()?;
        let t = self.shared.turns.lock();
        let used = |a: &Arc<str>| t.used_ms.get(a).copied().unwrap_or(0.0);
        // Every admitted request that has not started (waiting, or about to ask for its turn)
        // of each app: (app, slot time used, requests), the waiting apps in the order they
        // started waiting, then the others.
        let mut apps: Vec<(Arc<str>, f64, usize)> = t
            .order
            .iter()
            .map(|a| (a.clone(), used(a), t.queued.get(a).copied().unwrap_or(0)))
            .collect();
        // An app that starts waiting is charged at least what the waiting apps have used.
        let floor = apps.iter().map(|x| x.1).fold(f64::INFINITY, f64::min);
        let charged = |a: &Arc<str>| match floor.is_finite() {
            true => used(a).max(floor),
            false => used(a),
        };
        let mut others: Vec<(Arc<str>, f64, usize)> = t
            .queued
            .iter()
            .filter(|(a, _)| !t.order.contains(a))
            .map(|(a, &n)| (a.clone(), charged(a), n))
            .collect();
        others.sort_by(|x, y| x.1.total_cmp(&y.1).then_with(|| x.0.cmp(&y.0)));
        apps.extend(others);
        let free = t.free;
        let own: Arc<str> = Arc::from(app);
        let own_used = charged(&own);
        drop(t);
        let mine = match apps.iter().position(|(a, _, _)| a.as_ref() == app) {
            Some(i) => i,
            None => {
                apps.push((own, own_used, 0));
                apps.len() - 1
            }
        };
        apps[mine].2 += 1;
        let mut before = 0usize;
        loop {
            let next = apps
                .iter()
                .enumerate()
                .filter(|(_, x)| x.2 > 0)
                .min_by(|(i, a), (j, b)| a.1.total_cmp(&b.1).then(i.cmp(j)))
                .map(|(i, _)| i);
            let Some(i) = next else { break };
            if i == mine && apps[i].2 == 1 {
                break;
            }
            apps[i].2 -= 1;
            apps[i].1 += held;
            before += 1;
        }
        if before < free {
            return Some((0.0, before));
        }
        let n = self.shared.max_concurrent as f64;
        // `before − free + 1` slots must free up; the running requests are half done on
        // average.
        Some(((before - free) as f64 + 0.5) * held / n).map(|w| (w, before))
    }

    /// Requests admitted and not finished.
    pub fn in_system(&self) -> usize {
        self.shared.admitted.load(Ordering::Acquire)
    }

    /// Requests holding a running slot now.
    pub fn running(&self) -> usize {
        let free = self.shared.turns.lock().free;
        self.shared.max_concurrent - free.min(self.shared.max_concurrent)
    }

    /// Most requests running at once.
    pub fn max_concurrent(&self) -> usize {
        self.shared.max_concurrent
    }

    /// Most requests waiting for a slot.
    pub fn max_queue(&self) -> usize {
        self.shared.capacity - self.shared.max_concurrent
    }

    /// Most requests one app may have waiting.
    pub fn max_queue_per_app(&self) -> usize {
        self.shared.max_queue_per_app
    }
}

impl Ticket {
    /// Waits for this request's turn and a running slot.
    pub async fn run(mut self) -> Slot {
        let rx = {
            let mut t = self.shared.turns.lock();
            if t.free > 0 {
                t.free -= 1;
                None
            } else {
                let (tx, rx) = oneshot::channel();
                t.waiting.entry(self.app.clone()).or_default().push_back(tx);
                if !t.order.contains(&self.app) {
                    // Starting to wait: charged at least what the waiting apps have used.
                    let floor = t
                        .order
                        .iter()
                        .map(|a| t.used_ms.get(a).copied().unwrap_or(0.0))
                        .fold(f64::INFINITY, f64::min);
                    if floor.is_finite() {
                        let used = t.used_ms.entry(self.app.clone()).or_default();
                        *used = used.max(floor);
                    }
                    t.order.push_back(self.app.clone());
                }
                Some(rx)
            }
        };
        if let Some(rx) = rx {
            let mut waiting = Waiting {
                rx: Some(rx),
                shared: self.shared.clone(),
            };
            if let Some(rx) = waiting.rx.as_mut() {
                // A sender is dropped unsent only by `release` after the receiver closed,
                // which this request has not: the result is always the handed-over slot.
                let _ = rx.await;
            }
            waiting.rx = None;
        }
        self.queued = false;
        self.shared.unqueue(&self.app);
        Slot {
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
        assert_eq!(err.kind(), ferry_core::ErrorKind::ResourceExhausted);
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
        assert_eq!(err.kind(), ferry_core::ErrorKind::ResourceExhausted);
        assert!(err.to_string().contains("deadline"), "{err}");
        assert_eq!(a.in_system(), 1, "a refused request holds no place");
        // A deadline longer than the wait, or none, queues.
        let _queued = a.admit_within(Some(Duration::from_secs(60))).unwrap();
        let _queued_too = a.admit().unwrap();
        assert_eq!(a.in_system(), 3);
    }

    #[tokio::test]
    async fn a_light_app_is_told_its_own_wait_not_the_floods() {
        let a = Admission::new(1, 16);
        // One request of the flooding app measures the slot time and charges the app for it.
        let first = a.admit_for("flood", None).unwrap().run().await;
        std::thread::sleep(Duration::from_millis(40));
        drop(first);
        let held = a.held_ms().unwrap();
        // The flood holds the slot and has six more requests waiting.
        let _running = a.admit_for("flood", None).unwrap().run().await;
        let waiting: Vec<_> = (0..6)
            .map(|_| tokio::spawn(a.admit_for("flood", None).unwrap().run()))
            .collect();
        while a
            .shared
            .turns
            .lock()
            .waiting
            .get("flood")
            .map_or(0, VecDeque::len)
            < 6
        {
            tokio::task::yield_now().await;
        }
        // Everyone queued ahead: 6.5 slot times. But the light app's request takes its turn
        // after one more of the flood's (they have used the same slot time once the light app
        // is charged the floor): 1.5 slot times.
        let (light_wait, ahead) = a.expected_wait_for("light").unwrap();
        assert_eq!(ahead, 1);
        assert!(
            (light_wait - 1.5 * held).abs() < 1e-9,
            "{light_wait} {held}"
        );
        let (flood_wait, ahead) = a.expected_wait_for("flood").unwrap();
        assert_eq!(ahead, 6);
        assert!(
            (flood_wait - 6.5 * held).abs() < 1e-9,
            "{flood_wait} {held}"
        );
        assert!((a.expected_wait_ms(a.in_system()).unwrap() - 6.5 * held).abs() < 1e-9);
        // So a deadline of three slot times admits the light request and refuses the flood's.
        let deadline = Some(Duration::from_secs_f64(3.0 * held / 1e3));
        let _light = a.admit_for("light", deadline).unwrap();
        let err = a.admit_for("flood", deadline).unwrap_err();
        assert_eq!(err.kind(), ferry_core::ErrorKind::ResourceExhausted);
        // Its own six, and the light request that now goes before its seventh.
        assert!(
            err.to_string()
                .contains("7 requests to start before this one"),
            "{err}"
        );
        for w in waiting {
            w.abort();
        }
    }

    /// Starts `ticket` on a task that records `name` when its turn comes and then holds the
    /// slot until told to finish.
    fn start(
        ticket: Ticket,
        name: &'static str,
        log: Arc<std::sync::Mutex<Vec<&'static str>>>,
    ) -> (
        tokio::task::JoinHandle<()>,
        tokio::sync::oneshot::Sender<()>,
    ) {
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
        let h = tokio::spawn(async move {
            let slot = ticket.run().await;
            log.lock().unwrap().push(name);
            let _ = done_rx.await;
            drop(slot);
        });
        (h, done_tx)
    }

    async fn settle() {
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn a_flood_from_one_app_does_not_delay_another_behind_the_flood() {
        let a = Admission::new(1, 10);
        let log = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut done = VecDeque::new();
        // App "a" takes the slot and queues three more; then "b" queues one.
        for name in ["a1", "a2", "a3", "a4"] {
            let (_, d) = start(a.admit_for("a", None).unwrap(), name, log.clone());
            done.push_back(d);
            settle().await;
        }
        let (_, d) = start(a.admit_for("b", None).unwrap(), "b1", log.clone());
        settle().await;
        assert_eq!(*log.lock().unwrap(), vec!["a1"]);
        // Finish whoever runs, one at a time: "b" has used no slot time, "a" has, so "b" runs
        // next, not after the flood (first come first served would give a2, a3, a4, b1).
        let mut b_done = Some(d);
        for _ in 0..4 {
            let last = *log.lock().unwrap().last().unwrap();
            if last == "b1" {
                let _ = b_done.take().unwrap().send(());
            } else {
                let _ = done.pop_front().unwrap().send(());
            }
            settle().await;
        }
        assert_eq!(*log.lock().unwrap(), vec!["a1", "b1", "a2", "a3", "a4"]);
    }

    #[tokio::test]
    async fn an_app_with_long_requests_yields_to_one_with_short_ones() {
        let a = Admission::new(1, 10);
        let log = Arc::new(std::sync::Mutex::new(Vec::new()));
        // Each request holds its slot for `ms`, then lets the next in.
        let hold = |ticket: Ticket, name: &'static str, ms: u64| {
            let log = log.clone();
            tokio::spawn(async move {
                let slot = ticket.run().await;
                log.lock().unwrap().push(name);
                tokio::time::sleep(Duration::from_millis(ms)).await;
                drop(slot);
            })
        };
        let mut all = vec![hold(a.admit_for("long", None).unwrap(), "L1", 100)];
        settle().await;
        for name in ["L2", "L3"] {
            all.push(hold(a.admit_for("long", None).unwrap(), name, 100));
        }
        for name in ["S1", "S2", "S3"] {
            all.push(hold(a.admit_for("short", None).unwrap(), name, 1));
        }
        for h in all {
            h.await.unwrap();
        }
        // Taking turns by request would give L1 L2 S1 L3 S2 S3: "long" would hold the slot
        // three times as long; by slot time "short" runs until it has used as much.
        assert_eq!(
            *log.lock().unwrap(),
            vec!["L1", "S1", "S2", "S3", "L2", "L3"]
        );
    }

    #[tokio::test]
    async fn one_app_holds_at_most_its_share_of_the_waiting_places() {
        let a = Admission::with_app_queue(1, 4, 2);
        let running = a.admit_for("a", None).unwrap().run().await;
        let _w1 = a.admit_for("a", None).unwrap();
        let _w2 = a.admit_for("a", None).unwrap();
        let err = a.admit_for("a", None).unwrap_err();
        assert_eq!(err.kind(), ferry_core::ErrorKind::ResourceExhausted);
        assert!(err.to_string().contains("max_queue_per_app"), "{err}");
        // Another app still finds a place.
        let _b = a.admit_for("b", None).unwrap();
        assert_eq!(a.in_system(), 4);
        drop(running);
    }

    #[tokio::test]
    async fn a_waiting_request_that_leaves_does_not_take_the_slot_with_it() {
        let a = Admission::new(1, 4);
        let log = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (_, first) = start(a.admit_for("a", None).unwrap(), "a1", log.clone());
        settle().await;
        let (gone, _keep) = start(a.admit_for("b", None).unwrap(), "b1", log.clone());
        settle().await;
        gone.abort();
        settle().await;
        let (_, _c) = start(a.admit_for("c", None).unwrap(), "c1", log.clone());
        settle().await;
        let _ = first.send(());
        settle().await;
        assert_eq!(*log.lock().unwrap(), vec!["a1", "c1"]);
        assert_eq!(a.running(), 1);
        assert_eq!(a.in_system(), 1, "the request that left holds no place");
    }
}
