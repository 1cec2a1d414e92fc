//! Bearer tokens, shared by every ferry server that checks them (ferryd on gRPC and HTTP,
//! ferry-cloud on gRPC): the token file, stored hashed at rest, reloaded on SIGHUP.
//!
//! Token file (`auth.tokens_file`): one token per line, `<name> sha256:<hex digest of the
//! token>`; `#` starts a comment. `ferry token new --name APP --file FILE` makes a random token,
//! prints it once and appends its line; deleting the line and sending SIGHUP revokes it. Tokens
//! are 256 random bits, so one SHA-256 is the right hash (a slow password hash buys nothing when
//! the secret cannot be guessed), and digests are compared in constant time.
//!
//! Every refusal says the same thing ([`REFUSED`]) — missing, malformed, wrong and revoked tokens
//! are not told apart — so a caller learns nothing about which tokens exist.

use parking_lot::RwLock;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use ferry_core::token::digest;
use ferry_core::{Error, Result};

/// The message of every refusal.
pub const REFUSED: &str = "missing or invalid bearer token";

/// The calling app, as its bearer token's name (empty when authentication is off): the token
/// check puts it in a request's extensions, and admission takes turns between apps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppName(pub String);

/// The `[auth]` section of a ferry server's configuration: who may call it over TCP.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Bearer tokens, hashed (`<name> sha256:<hex>` per line; `ferry token new` writes them);
    /// reloaded on SIGHUP. Unset: no token is asked.
    pub tokens_file: Option<PathBuf>,
    /// Allow listening on a non-loopback address with no authentication. Off: the server
    /// refuses to start exposed and open.
    pub allow_unauthenticated_network: bool,
}

/// A parsed token file.
#[derive(Debug, Clone, Default)]
struct Tokens {
    /// (name, SHA-256 digest)
    entries: Vec<(String, [u8; 32])>,
}

/// The token check of one server; without a file, authentication is off.
#[derive(Debug)]
pub struct Auth {
    file: Option<PathBuf>,
    tokens: RwLock<Tokens>,
}

fn parse(text: &str, path: &Path) -> Result<Tokens> {
    let bad = |line: usize, why: &str| Error::InvalidFile {
        what: "token file",
        path: path.to_path_buf(),
        reason: format!("line {line}: {why}"),
    };
    let mut entries = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let mut fields = line.split_whitespace();
        let (Some(name), Some(hash), None) = (fields.next(), fields.next(), fields.next()) else {
            return Err(bad(i + 1, "expected `<name> sha256:<64 hex digits>`"));
        };
        let hex_digest = hash.strip_prefix("sha256:").ok_or_else(|| {
            bad(
                i + 1,
                "the hash must start with `sha256:` (tokens are stored hashed, never in clear)",
            )
        })?;
        let mut d = [0u8; 32];
        hex::decode_to_slice(hex_digest, &mut d)
            .map_err(|_| bad(i + 1, "the digest must be 64 hex digits"))?;
        entries.push((name.to_string(), d));
    }
    Ok(Tokens { entries })
}

/// Checks the text of a token file (`path` is only named in errors): the number of tokens it
/// holds, or the first malformed line.
pub fn check_token_file(text: &str, path: &Path) -> Result<usize> {
    parse(text, path).map(|t| t.entries.len())
}

fn read(path: &Path) -> Result<Tokens> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::io(format!("reading token file {}", path.display()), e))?;
    parse(&text, path)
}

/// Constant-time equality of two digests.
fn same(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Auth {
    /// Authentication off: every caller is accepted.
    pub fn off() -> Self {
        Auth {
            file: None,
            tokens: RwLock::new(Tokens::default()),
        }
    }

    /// Reads the token file; an unreadable or malformed file is an error (a server must not
    /// start open by accident).
    pub fn from_file(path: &Path) -> Result<Self> {
        let tokens = read(path)?;
        tracing::info!(path = %path.display(), tokens = tokens.entries.len(), "bearer tokens loaded");
        Ok(Auth {
            file: Some(path.to_path_buf()),
            tokens: RwLock::new(tokens),
        })
    }

    /// The check `config` asks for: the token file's, or off when none is set.
    pub fn from_config(config: &AuthConfig) -> Result<Self> {
        match &config.tokens_file {
            Some(path) => Auth::from_file(path),
            None => Ok(Auth::off()),
        }
    }

    /// True when callers must present a token.
    pub fn enabled(&self) -> bool {
        self.file.is_some()
    }

    /// Re-reads the token file. On error the previous tokens stay in force.
    pub fn reload(&self) -> Result<usize> {
        let Some(path) = &self.file else {
            return Ok(0);
        };
        let tokens = read(path)?;
        let n = tokens.entries.len();
        *self.tokens.write() = tokens;
        tracing::info!(path = %path.display(), tokens = n, "bearer tokens reloaded");
        Ok(n)
    }

    /// Checks an `Authorization` header value; returns the token's name.
    pub fn check(&self, authorization: Option<&str>) -> Result<String> {
        if !self.enabled() {
            return Ok(String::new());
        }
        let refused = || Error::Unauthenticated(REFUSED.to_string());
        let value = authorization.ok_or_else(refused)?;
        let (scheme, token) = value.trim().split_once(' ').ok_or_else(refused)?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(refused());
        }
        let d = digest(token.trim());
        let tokens = self.tokens.read();
        // Look at every entry so the time taken does not depend on which one matched.
        let mut found = None;
        for (name, stored) in &tokens.entries {
            if same(stored, &d) && found.is_none() {
                found = Some(name.clone());
            }
        }
        found.ok_or_else(refused)
    }

    /// Checks the `authorization` metadata of a gRPC call; returns the token's name.
    pub fn check_metadata(&self, metadata: &tonic::metadata::MetadataMap) -> Result<String> {
        self.check(metadata.get("authorization").and_then(|v| v.to_str().ok()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_core::token::token_line;

    fn file(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("tokens");
        std::fs::write(&p, text).unwrap();
        (dir, p)
    }

    #[test]
    fn accepts_listed_tokens_only_and_reloads() {
        let (_d, p) = file(&format!(
            "# apps\n{}\n{}  # second\n",
            token_line("a", "secret-a"),
            token_line("b", "secret-b")
        ));
        let auth = Auth::from_file(&p).unwrap();
        assert_eq!(auth.check(Some("Bearer secret-a")).unwrap(), "a");
        assert_eq!(auth.check(Some("bearer secret-b")).unwrap(), "b");
        for bad in [
            None,
            Some("Bearer nope"),
            Some("Basic secret-a"),
            Some("secret-a"),
        ] {
            let e = auth.check(bad).unwrap_err();
            assert_eq!(e.to_string(), format!("unauthenticated: {REFUSED}"));
        }
        std::fs::write(&p, token_line("b", "secret-b")).unwrap();
        assert_eq!(auth.reload().unwrap(), 1);
        assert!(auth.check(Some("Bearer secret-a")).is_err(), "revoked");
        assert!(auth.check(Some("Bearer secret-b")).is_ok());
        // A broken file keeps the previous tokens.
        std::fs::write(&p, "b plaintext-token\n").unwrap();
        assert!(auth.reload().is_err());
        assert!(auth.check(Some("Bearer secret-b")).is_ok());
    }

    #[test]
    fn refuses_clear_text_or_malformed_files() {
        let (_d, p) = file("app hunter2\n");
        let e = Auth::from_file(&p).unwrap_err().to_string();
        assert!(e.contains("line 1") && e.contains("sha256:"), "{e}");
        let (_d, p) = file("app sha256:abcd\n");
        assert!(Auth::from_file(&p).is_err());
        assert!(Auth::from_file(Path::new("/nonexistent/tokens")).is_err());
    }

    #[test]
    fn off_accepts_everyone() {
        assert!(Auth::off().check(None).is_ok());
        let off = Auth::from_config(&AuthConfig::default()).unwrap();
        assert!(!off.enabled());
        assert!(off
            .check_metadata(&tonic::metadata::MetadataMap::new())
            .is_ok());
    }

    #[test]
    fn checks_grpc_metadata() {
        let (_d, p) = file(&token_line("edge", "s3cret"));
        let auth = Auth::from_config(&AuthConfig {
            tokens_file: Some(p),
            ..AuthConfig::default()
        })
        .unwrap();
        let mut m = tonic::metadata::MetadataMap::new();
        let e = auth.check_metadata(&m).unwrap_err();
        assert_eq!(e.kind(), ferry_core::ErrorKind::Unauthenticated);
        m.insert("authorization", "Bearer wrong".parse().unwrap());
        assert!(auth.check_metadata(&m).is_err());
        m.insert("authorization", "Bearer s3cret".parse().unwrap());
        assert_eq!(auth.check_metadata(&m).unwrap(), "edge");
    }
}
