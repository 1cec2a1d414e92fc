//! `ferry-cloud --config configs/cloud.toml`: parse the command line, bind the listeners, load
//! the models, reload the token file on SIGHUP (also while loading), drain on SIGTERM or Ctrl-C.

use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use ferry_cloud::{Cli, CloudServer};
use ferry_daemon::signals::Signals;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config = cli.resolve().context("invalid configuration")?;
    config.log.install_subscriber();
    let grace = Duration::from_secs(config.server.shutdown_grace_s);
    let mut signals = Signals::install().context("installing the signal handlers")?;
    // Listen first (health NOT_SERVING, /readyz 503), then load: probes see a live process
    // while large models load, and a signal during loading still drains cleanly.
    let server = CloudServer::bind(config)
        .await
        .context("starting ferry-cloud")?;
    // SIGHUP re-reads the bearer token file (a broken file keeps the tokens in force).
    let state = server.state.clone();
    let reload = move || {
        if let Err(e) = state.auth.reload() {
            tracing::error!(error = %e, "reloading the token file failed; the previous tokens stay in force");
        }
    };
    let loaded = tokio::select! {
        r = server.load() => Ok(r),
        signal = signals.until_stopped(reload.clone()) => Err(signal),
    };
    let reason = match loaded {
        Ok(Ok(())) => signals.until_stopped(reload).await,
        Ok(Err(e)) => {
            server.shutdown(Duration::ZERO).await;
            return Err(e).context("loading the models");
        }
        Err(signal) => {
            tracing::info!(signal, "signal while loading; shutting down");
            server.shutdown(grace).await;
            return Ok(());
        }
    };
    tracing::info!(signal = reason, "shutting down");
    server.shutdown(grace).await;
    Ok(())
}
