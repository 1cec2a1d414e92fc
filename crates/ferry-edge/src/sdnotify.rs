//! systemd's notification protocol, for `Type=notify` units: `READY=1` once the models are
//! loaded and the router state restored, `WATCHDOG=1` while the runtime is alive, `STOPPING=1`
//! when draining starts, and `STATUS=` lines for `systemctl status`.
//!
//! The protocol is one datagram per message to the Unix socket named by `$NOTIFY_SOCKET` (a
//! path, or `@name` for the abstract namespace). Outside systemd the variable is unset and every
//! call is a no-op, so the daemon runs the same under any supervisor.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

/// A connection to the service manager, if there is one.
pub struct Notifier {
    socket: Option<(UnixDatagram, std::os::unix::net::SocketAddr)>,
    watchdog: Option<Duration>,
}

impl Notifier {
    /// Reads `$NOTIFY_SOCKET`, `$WATCHDOG_USEC` and `$WATCHDOG_PID` from the environment.
    pub fn from_env() -> Self {
        let socket = std::env::var_os("NOTIFY_SOCKET").and_then(|path| {
            let path = path.to_string_lossy().into_owned();
            let addr = if let Some(name) = path.strip_prefix('@') {
                use std::os::linux::net::SocketAddrExt;
                std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).ok()?
            } else {
                std::os::unix::net::SocketAddr::from_pathname(&path).ok()?
            };
            let sock = UnixDatagram::unbound().ok()?;
            Some((sock, addr))
        });
        // The watchdog is ours only when systemd set it for this very process.
        let for_us = std::env::var("WATCHDOG_PID")
            .ok()
            .and_then(|p| p.parse::<u32>().ok())
            .is_none_or(|pid| pid == std::process::id());
        let watchdog = std::env::var("WATCHDOG_USEC")
            .ok()
            .and_then(|u| u.parse::<u64>().ok())
            .filter(|&u| u > 0 && for_us)
            .map(Duration::from_micros);
        Notifier { socket, watchdog }
    }

    /// True when running under a service manager that listens.
    pub fn enabled(&self) -> bool {
        self.socket.is_some()
    }

    /// How often to send `WATCHDOG=1`: half the configured timeout, as systemd recommends.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog.map(|d| d / 2)
    }

    /// Sends one message (`KEY=value` lines); failures are logged, never fatal.
    pub fn notify(&self, message: &str) {
        if let Some((sock, addr)) = &self.socket {
            if let Err(e) = sock.send_to_addr(message.as_bytes(), addr) {
                tracing::warn!(error = %e, "sd_notify failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sends_datagrams_to_the_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let listener = UnixDatagram::bind(&path).unwrap();
        let n = Notifier {
            socket: Some((
                UnixDatagram::unbound().unwrap(),
                std::os::unix::net::SocketAddr::from_pathname(&path).unwrap(),
            )),
            watchdog: Some(Duration::from_secs(10)),
        };
        n.notify("READY=1\nSTATUS=serving");
        let mut buf = [0u8; 64];
        let len = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"READY=1\nSTATUS=serving");
        assert_eq!(n.watchdog_interval(), Some(Duration::from_secs(5)));
    }

    #[test]
    fn without_a_manager_it_is_a_no_op() {
        let n = Notifier {
            socket: None,
            watchdog: None,
        };
        assert!(!n.enabled());
        n.notify("READY=1");
    }
}
