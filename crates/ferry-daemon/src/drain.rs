//! A graceful stop, as both daemons do it: once a daemon is draining (new requests refused,
//! health NOT_SERVING), its requests get a grace period to finish; then the rest are stopped and
//! the listeners closed, each given a few seconds so that a connection left open cannot hold
//! the process.

use std::fmt::Display;
use std::time::Duration;

use tokio::task::JoinHandle;

use crate::Daemon;

/// How long a listener may take to close once told to.
const CLOSE_WITHIN: Duration = Duration::from_secs(5);

/// Waits until the daemon holds no request or `grace` has passed; returns how many are left
/// (and says so in the log).
pub async fn wait_idle<D: Daemon + ?Sized>(daemon: &D, grace: Duration) -> usize {
    let deadline = tokio::time::Instant::now() + grace;
    while daemon.in_flight() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let left = daemon.in_flight();
    if left > 0 {
        tracing::warn!(
            in_flight = left,
            "grace period over; stopping in-flight requests"
        );
    }
    left
}

/// Waits for a server task (already told to stop) to end, at most a few seconds, and logs how
/// it ended; `what` names it (`server`, `HTTP server`).
pub async fn join<E: Display>(task: JoinHandle<std::result::Result<(), E>>, what: &str) {
    match tokio::time::timeout(CLOSE_WITHIN, task).await {
        Ok(Ok(Err(e))) => tracing::warn!(error = %e, "{what} ended with an error"),
        Ok(_) => {}
        Err(_) => tracing::warn!(
            "{what}'s listener did not close within {} s",
            CLOSE_WITHIN.as_secs()
        ),
    }
}
