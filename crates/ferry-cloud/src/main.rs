//! `ferry-cloud --config configs/cloud.toml`: parse the command line, bind the listeners, load
//! the models, reload the token file on SIGHUP, drain on SIGTERM or Ctrl-C.

use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use ferry_cloud::{Cli, CloudServer};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config = cli.resolve().context("invalid configuration")?;
    config.log.install_subscriber();
    let grace = Duration::from_secs(config.server.shutdown_grace_s);
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    // Listen first (health NOT_SERVING, /readyz 503), then load: probes see a live process
    // while large models load, and a signal during loading still drains cleanly.
    let server = CloudServer::bind(config)
        .await
        .context("starting ferry-cloud")?;
    let loaded = tokio::select! {
        r = server.load() => Some(r),
        _ = sigterm.recv() => None,
        _ = tokio::signal::ctrl_c() => None,
    };
    match loaded {
        Some(Ok(())) => {}
        Some(Err(e)) => {
            server.shutdown(Duration::ZERO).await;
            return Err(e).context("loading the models");
        }
        None => {
            tracing::info!("signal while loading; shutting down");
            server.shutdown(grace).await;
            return Ok(());
        }
    }
    // SIGHUP re-reads the bearer token file (a broken file keeps the tokens in force).
    let mut sighup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("installing the SIGHUP handler")?;
    let reason = loop {
        tokio::select! {
            _ = sigterm.recv() => break "SIGTERM",
            _ = tokio::signal::ctrl_c() => break "SIGINT",
            _ = sighup.recv() => {
                if let Err(e) = server.state.auth.reload() {
                    tracing::error!(error = %e, "reloading the token file failed; the previous tokens stay in force");
                }
            }
        }
    };
    tracing::info!(signal = reason, "shutting down");
    server.shutdown(grace).await;
    Ok(())
}
