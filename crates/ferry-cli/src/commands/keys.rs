//! `ferry token` and `ferry certs`: bearer tokens for ferryd and certificates for mutual TLS.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Subcommand;

#[derive(Subcommand)]
pub(crate) enum TokenCommand {
    /// Make a random token, append its hash to FILE (created 0600 if missing) and print the
    /// token once; ferryd picks it up on SIGHUP. Revoke by deleting its line and sending SIGHUP.
    New {
        /// A name for the app or person holding the token (no spaces).
        #[arg(long)]
        name: String,
        /// The token file ferryd reads (auth.tokens_file).
        #[arg(long)]
        file: PathBuf,
    },
}

pub(crate) fn token_new(name: &str, file: &Path) -> anyhow::Result<()> {
    use rand::RngCore;
    use std::os::unix::fs::OpenOptionsExt;
    anyhow::ensure!(
        !name.is_empty() && !name.chars().any(|c| c.is_whitespace() || c == '#'),
        "--name must be non-empty, without spaces or #"
    );
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    let token = format!("ferry_{}", hex::encode(bytes));
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(file)
        .with_context(|| format!("opening {}", file.display()))?;
    writeln!(f, "{}", ferry_core::token::token_line(name, &token))
        .with_context(|| format!("writing {}", file.display()))?;
    eprintln!(
        "added `{name}` to {}; send ferryd SIGHUP to load it. The token (shown once):",
        file.display()
    );
    println!("{token}");
    Ok(())
}

#[derive(Subcommand)]
pub(crate) enum CertsCommand {
    /// Make a development CA with a server certificate for ferry-cloud and a client certificate
    /// for ferryd (ca.pem/ca.key, cloud.pem/cloud.key, edge.pem/edge.key; keys mode 0600), and
    /// print the config snippets. Use a real CA in production.
    Dev {
        /// Output directory.
        #[arg(long, default_value = "certs/dev")]
        out: PathBuf,
        /// Another DNS name or IP address of ferry-cloud's certificate (repeatable); localhost,
        /// 127.0.0.1 and ::1 are always there.
        #[arg(long = "san")]
        sans: Vec<String>,
        /// Validity in days.
        #[arg(long, default_value_t = 365)]
        days: u32,
        /// Replace existing files.
        #[arg(long)]
        force: bool,
    },
}

pub(crate) fn certs_dev(opts: ferry_cli::certs::DevCertsOptions) -> anyhow::Result<()> {
    let certs = ferry_cli::certs::write_dev_certs(&opts)?;
    eprintln!(
        "wrote {} in {} (development only: keep ca.key private, use a real CA in production)",
        ferry_cli::certs::FILES.join(", "),
        certs.dir.display()
    );
    print!("{}", ferry_cli::certs::config_snippets(&certs));
    Ok(())
}

/// Runs `ferry token …`.
pub(crate) fn token(cmd: TokenCommand) -> anyhow::Result<()> {
    match cmd {
        TokenCommand::New { name, file } => token_new(&name, &file),
    }
}

/// Runs `ferry certs …`.
pub(crate) fn certs(cmd: CertsCommand) -> anyhow::Result<()> {
    match cmd {
        CertsCommand::Dev {
            out,
            sans,
            days,
            force,
        } => certs_dev(ferry_cli::certs::DevCertsOptions {
            out,
            sans,
            days,
            force,
        }),
    }
}
