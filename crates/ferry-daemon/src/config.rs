//! What the daemons' configurations share: reading a TOML file into a typed config with errors
//! that name the file, and the `[log]` section.

use std::path::Path;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use ferry_core::{Error, Result};

/// Parses config text into `T`; `path` names the file in errors.
pub fn parse_toml<T: DeserializeOwned>(text: &str, path: &Path) -> Result<T> {
    toml::from_str(text).map_err(|e| Error::InvalidFile {
        what: "config",
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// Reads and parses a config file into `T`.
pub fn read_toml<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::io(format!("reading config {}", path.display()), e))?;
    parse_toml(&text, path)
}

/// The config file format's version, `version = 1` at the top of a file; a file without it reads
/// as version 1. A later format gets a new number, so that a daemon refuses a file it would
/// misread instead of guessing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ConfigVersion(pub u32);

impl ConfigVersion {
    /// The one version this build reads.
    pub const CURRENT: ConfigVersion = ConfigVersion(1);

    /// Refuses a version this build does not read.
    pub fn validate(self) -> Result<()> {
        if self == Self::CURRENT {
            return Ok(());
        }
        Err(Error::invalid(
            "version",
            format!(
                "config format version {} is not one this build reads (it reads version {})",
                self.0,
                Self::CURRENT.0
            ),
        ))
    }
}

impl Default for ConfigVersion {
    fn default() -> Self {
        Self::CURRENT
    }
}

/// Log output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `text` or `json`.
    pub format: String,
    /// tracing filter directive, e.g. `info` or `ferry_edge=debug,info`; `RUST_LOG` wins.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: "text".to_string(),
            level: "info".to_string(),
        }
    }
}

impl LogConfig {
    /// Installs the process's log subscriber (stderr; `RUST_LOG` overrides `level`). For the
    /// binaries' `main`, once.
    pub fn install_subscriber(&self) {
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&self.level));
        let builder = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr);
        if self.format == "json" {
            builder.json().init();
        } else {
            builder.init();
        }
    }

    /// Checks the format name.
    pub fn validate(&self) -> Result<()> {
        if !matches!(self.format.as_str(), "text" | "json") {
            return Err(Error::invalid("log.format", "must be `text` or `json`"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_of_another_format_version_is_refused_and_none_reads_as_version_1() {
        #[derive(Deserialize, Default)]
        #[serde(default)]
        struct C {
            version: ConfigVersion,
        }
        let p = Path::new("c.toml");
        let c: C = parse_toml("", p).unwrap();
        assert_eq!(c.version, ConfigVersion::CURRENT);
        let c: C = parse_toml("version = 1", p).unwrap();
        assert!(c.version.validate().is_ok());
        let c: C = parse_toml("version = 2", p).unwrap();
        let e = c.version.validate().unwrap_err().to_string();
        assert!(e.contains("version 2"), "{e}");
    }

    #[test]
    fn errors_name_the_file_and_unknown_keys_are_refused() {
        let e = parse_toml::<LogConfig>("bogus = 1\n", Path::new("/etc/x.toml")).unwrap_err();
        assert!(e.to_string().contains("/etc/x.toml"), "{e}");
        let l: LogConfig = parse_toml("format = \"json\"\n", Path::new("x")).unwrap();
        assert_eq!(l.level, "info");
        assert!(LogConfig {
            format: "xml".into(),
            ..LogConfig::default()
        }
        .validate()
        .is_err());
    }
}
