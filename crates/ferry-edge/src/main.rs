//! `ferryd`: parse the command line, start the server, tell systemd when it is ready (and feed
//! its watchdog), reload tokens on SIGHUP, stop it on SIGTERM or Ctrl-C.

use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use ferry_daemon::signals::Signals;
use ferry_edge::{Cli, RunningServer};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config = cli.resolve().context("invalid configuration")?;
    config.log.install_subscriber();
    let grace = Duration::from_secs(config.server.shutdown_grace_s);
    let mut server = RunningServer::start(config)
        .await
        .context("starting ferryd")?;

    let mut signals = Signals::install().context("installing the signal handlers")?;
    // SIGHUP re-reads the token file and the placement policy; a broken file keeps what runs.
    let state = server.state.clone();
    let reload = move || {
        if let Err(e) = state.auth.reload() {
            tracing::error!(error = %e, "SIGHUP: token file not reloaded; previous tokens stay in force");
        }
        if let Some(p) = &state.placement {
            if let Err(e) = p.reload() {
                tracing::error!(error = %e, "SIGHUP: placement policy not reloaded; the running one stays");
            }
        }
    };
    let notifier = std::sync::Arc::new(ferry_edge::sdnotify::Notifier::from_env());
    notifier.notify("STATUS=loading models");
    let ready = tokio::select! {
        ready = server.wait_ready() => Ok(ready),
        signal = signals.until_stopped(reload.clone()) => Err(signal),
    };
    let stop_reason = match ready {
        Ok(ready) => {
            ready.context("loading models")?;
            // Ready means: models loaded and router state restored (wait_ready covers both).
            notifier.notify("READY=1\nSTATUS=serving");
            if let Some(every) = notifier.watchdog_interval() {
                let n = notifier.clone();
                // Fed from the runtime itself: a wedged runtime stops the pings and systemd
                // restarts the service.
                tokio::spawn(async move {
                    let mut tick = tokio::time::interval(every);
                    loop {
                        tick.tick().await;
                        n.notify("WATCHDOG=1");
                    }
                });
            }
            signals.until_stopped(reload).await
        }
        Err(signal) => signal,
    };
    tracing::info!(signal = stop_reason, "shutting down");
    notifier.notify("STOPPING=1\nSTATUS=draining");
    server.shutdown(grace).await;
    Ok(())
}
