//! The signals a daemon answers: SIGTERM (systemd, Kubernetes) and Ctrl-C stop it; SIGHUP asks it
//! to reload what can change while it runs (the token file; for ferryd also the placement
//! policy), and a reload that fails keeps what runs.

use tokio::signal::unix::{signal, Signal, SignalKind};

/// The installed handlers.
pub struct Signals {
    term: Signal,
    hup: Signal,
}

impl Signals {
    /// Installs the SIGTERM and SIGHUP handlers (Ctrl-C is tokio's own).
    pub fn install() -> std::io::Result<Self> {
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    /// Waits for a stop signal, calling `reload` on each SIGHUP meanwhile; returns the stop
    /// signal's name (`SIGTERM`, `SIGINT`).
    pub async fn until_stopped(&mut self, mut reload: impl FnMut()) -> &'static str {
        loop {
            tokio::select! {
                _ = self.term.recv() => return "SIGTERM",
                _ = tokio::signal::ctrl_c() => return "SIGINT",
                Some(()) = self.hup.recv() => reload(),
            }
        }
    }
}
