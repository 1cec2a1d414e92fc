//! What each request really costs in energy.
//!
//! `ferry-energy` owns the power sources ferry can read — NVML GPU counters, RAPL powercap CPU
//! counters, the Jetson INA3221 power rails, and a sysinfo-based estimate used only when nothing
//! better exists — and the attribution of the measured energy to requests. Every source reports
//! a cumulative, monotonic energy in joules; [`meter::EnergyMeter`] samples the chosen sources at a
//! fixed rate (and at every request start and end) and hands each interval's joules to the
//! [`attribution::Ledger`], which splits them among the requests running in that interval, or
//! books them as idle when none was. Every figure carries the source that produced it.

pub mod attribution;
pub mod estimate;
pub mod ina3221;
pub mod meter;
pub mod nvml;
pub mod rapl;

use std::path::PathBuf;

/// The kinds of power source, in the words figures are labelled with.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    /// NVIDIA GPUs through NVML.
    Nvml,
    /// CPU packages through the powercap RAPL interface (Intel and AMD).
    Rapl,
    /// Jetson INA3221 power-rail monitors.
    Ina3221,
    /// CPU utilisation times configured power: an estimate, never a measurement.
    Estimate,
}

impl SourceKind {
    /// Label used in responses and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            SourceKind::Nvml => "nvml",
            SourceKind::Rapl => "rapl",
            SourceKind::Ina3221 => "ina3221",
            SourceKind::Estimate => "estimate",
        }
    }

    /// All kinds, in order of preference.
    pub const ALL: [SourceKind; 4] = [
        SourceKind::Nvml,
        SourceKind::Rapl,
        SourceKind::Ina3221,
        SourceKind::Estimate,
    ];
}

impl std::str::FromStr for SourceKind {
    type Err = EnergyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SourceKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| {
                EnergyError::Config(format!(
                    "unknown energy source `{s}` (nvml, rapl, ina3221, estimate)"
                ))
            })
    }
}

/// Why a source cannot be used, or a read failed.
#[derive(Debug, thiserror::Error)]
pub enum EnergyError {
    /// The source does not exist on this machine (no GPU, no powercap, not a Jetson).
    #[error("not present: {0}")]
    Absent(String),
    /// The source exists but cannot be read (usually file permissions).
    #[error("not readable: {0}")]
    Unreadable(String),
    /// A file had unexpected contents.
    #[error("cannot parse {path}: {reason}")]
    Parse { path: PathBuf, reason: String },
    /// Bad energy configuration.
    #[error("energy config: {0}")]
    Config(String),
}

/// A readable power source.
pub trait PowerSource: Send {
    /// Which kind of source this is.
    fn kind(&self) -> SourceKind;
    /// The devices counted (GPU names, RAPL domains, rail names, "cpu").
    fn devices(&self) -> Vec<String>;
    /// Cumulative energy in joules since the source was opened, as exact as the source can
    /// read it; never decreases, except that an [`interpolating`](Self::interpolates) source
    /// steps back by what its ticks overshot. Sources that only report power integrate it
    /// between calls. The meter reads this way at every request start and end.
    fn read_joules(&mut self) -> Result<f64, EnergyError>;

    /// The same for the background sampler's tick, where the read must be cheap: a source whose
    /// exact reading is costly (NVML's total-energy counter) may interpolate it from a cheaper
    /// one here. By default the same as [`read_joules`](Self::read_joules).
    fn read_joules_tick(&mut self) -> Result<f64, EnergyError> {
        self.read_joules()
    }

    /// Whether ticks interpolate, so that an exact reading may come back lower than the tick
    /// before it: that step is a correction of the joules booked since the last exact reading,
    /// not a counter reset.
    fn interpolates(&self) -> bool {
        false
    }

    /// For an interpolating source: exact joules per joule of the cheap reading, as calibrated
    /// so far (1 before any calibration).
    fn calibration(&self) -> Option<f64> {
        None
    }
}

/// Settings for opening sources.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EnergyConfig {
    /// Sources to use: `["auto"]` picks the measured sources present (NVML and RAPL, or the
    /// Jetson rails) and falls back to `estimate`; or list kinds explicitly.
    pub sources: Vec<String>,
    /// Sampling rate of the background sampler.
    pub sample_hz: f64,
    /// INA3221 rails to count; empty = `VDD_IN` (whole module) when present, else every rail.
    pub rails: Vec<String>,
    /// Estimate: package power at 100 % CPU utilisation, watts.
    pub package_watts: f64,
    /// Estimate: package power when idle, watts.
    pub idle_watts: f64,
    /// Root of the sysfs tree (tests point it at fixtures).
    pub sysfs_root: PathBuf,
}

impl Default for EnergyConfig {
    fn default() -> Self {
        EnergyConfig {
            sources: vec!["auto".to_string()],
            sample_hz: 10.0,
            rails: Vec::new(),
            package_watts: 15.0,
            idle_watts: 2.0,
            sysfs_root: PathBuf::from("/sys"),
        }
    }
}

impl EnergyConfig {
    /// Checks values that parse but cannot work.
    pub fn validate(&self) -> Result<(), EnergyError> {
        if !(self.sample_hz > 0.0 && self.sample_hz <= 1000.0) {
            return Err(EnergyError::Config("sample_hz must be in (0, 1000]".into()));
        }
        if !(self.idle_watts >= 0.0 && self.package_watts >= self.idle_watts) {
            return Err(EnergyError::Config(
                "need 0 <= idle_watts <= package_watts".into(),
            ));
        }
        for s in &self.sources {
            if s != "auto" {
                s.parse::<SourceKind>()?;
            }
        }
        Ok(())
    }
}

/// The outcome of trying one kind of source.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ProbeResult {
    pub kind: SourceKind,
    /// Whether it can be read now.
    pub available: bool,
    /// Devices it would count.
    pub devices: Vec<String>,
    /// Why not, when unavailable.
    pub reason: Option<String>,
}

fn open(kind: SourceKind, cfg: &EnergyConfig) -> Result<Box<dyn PowerSource>, EnergyError> {
    let mut src: Box<dyn PowerSource> = match kind {
        SourceKind::Nvml => Box::new(nvml::NvmlSource::open()?),
        SourceKind::Rapl => Box::new(rapl::RaplSource::open(&cfg.sysfs_root)?),
        SourceKind::Ina3221 => Box::new(ina3221::Ina3221Source::open(&cfg.sysfs_root, &cfg.rails)?),
        SourceKind::Estimate => Box::new(estimate::EstimateSource::new(
            cfg.idle_watts,
            cfg.package_watts,
        )?),
    };
    // A source that opens but cannot be read (permissions) is not usable.
    src.read_joules()?;
    Ok(src)
}

/// Tries every kind of source and says which can be read, with the reason for each that cannot.
pub fn probe(cfg: &EnergyConfig) -> Vec<ProbeResult> {
    SourceKind::ALL
        .into_iter()
        .map(|kind| match open(kind, cfg) {
            Ok(s) => ProbeResult {
                kind,
                available: true,
                devices: s.devices(),
                reason: None,
            },
            Err(e) => ProbeResult {
                kind,
                available: false,
                devices: Vec::new(),
                reason: Some(e.to_string()),
            },
        })
        .collect()
}

/// Opens the sources the config asks for. `auto`: every measured source present (NVML, RAPL,
/// INA3221), else the estimate. Explicit kinds that cannot be opened are errors.
pub fn open_sources(cfg: &EnergyConfig) -> Result<Vec<Box<dyn PowerSource>>, EnergyError> {
    cfg.validate()?;
    if cfg.sources.iter().any(|s| s == "auto") {
        let mut out: Vec<Box<dyn PowerSource>> = Vec::new();
        for kind in [SourceKind::Nvml, SourceKind::Rapl, SourceKind::Ina3221] {
            match open(kind, cfg) {
                Ok(s) => out.push(s),
                Err(e) => tracing::debug!(source = kind.as_str(), "energy source skipped: {e}"),
            }
        }
        if out.is_empty() {
            tracing::info!(
                "no measured power source on this machine; using the CPU-utilisation estimate"
            );
            out.push(open(SourceKind::Estimate, cfg)?);
        }
        return Ok(out);
    }
    cfg.sources.iter().map(|s| open(s.parse()?, cfg)).collect()
}

/// Reads a sysfs file as trimmed text.
pub(crate) fn read_text(path: &std::path::Path) -> Result<String, EnergyError> {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::PermissionDenied => EnergyError::Unreadable(format!(
                "{}: permission denied (needs root or a udev rule/group granting read access)",
                path.display()
            )),
            std::io::ErrorKind::NotFound => {
                EnergyError::Absent(format!("{} does not exist", path.display()))
            }
            _ => EnergyError::Unreadable(format!("{}: {e}", path.display())),
        })
}

/// Reads a sysfs file holding one unsigned integer.
pub(crate) fn read_u64(path: &std::path::Path) -> Result<u64, EnergyError> {
    let text = read_text(path)?;
    text.parse().map_err(|e| EnergyError::Parse {
        path: path.to_path_buf(),
        reason: format!("`{text}`: {e}"),
    })
}

/// A sysfs attribute kept open and re-read with `pread` at offset 0: sysfs regenerates the value
/// on every read from the start, and skipping `open`/`close` halves the cost of a sample.
#[derive(Debug)]
pub(crate) struct SysfsValue {
    path: std::path::PathBuf,
    file: std::sync::Mutex<Option<std::fs::File>>,
}

impl Clone for SysfsValue {
    fn clone(&self) -> Self {
        SysfsValue::new(self.path.clone())
    }
}

impl SysfsValue {
    pub(crate) fn new(path: std::path::PathBuf) -> Self {
        SysfsValue {
            path,
            file: std::sync::Mutex::new(None),
        }
    }

    /// Reads the attribute as an unsigned integer.
    pub(crate) fn read_u64(&self) -> Result<u64, EnergyError> {
        use std::os::unix::fs::FileExt;
        let mut guard = self.file.lock().expect("sysfs value lock");
        if guard.is_none() {
            // Opening reports permissions and absence with the same wording as one-shot reads.
            read_u64(&self.path)?;
            *guard =
                Some(std::fs::File::open(&self.path).map_err(|e| {
                    EnergyError::Unreadable(format!("{}: {e}", self.path.display()))
                })?);
        }
        let mut buf = [0u8; 64];
        let n = guard
            .as_ref()
            .expect("opened above")
            .read_at(&mut buf, 0)
            .map_err(|e| EnergyError::Unreadable(format!("{}: {e}", self.path.display())))?;
        let text = std::str::from_utf8(&buf[..n]).unwrap_or("").trim();
        text.parse().map_err(|e| EnergyError::Parse {
            path: self.path.clone(),
            reason: format!("`{text}`: {e}"),
        })
    }
}

/// Trapezoidal integration of power samples into energy, for sources that only report power.
#[derive(Debug, Default)]
pub(crate) struct PowerIntegrator {
    last: Option<(std::time::Instant, f64)>,
    joules: f64,
}

impl PowerIntegrator {
    /// Adds a power sample (watts) taken `at`; returns the cumulative joules.
    pub(crate) fn add(&mut self, at: std::time::Instant, watts: f64) -> f64 {
        let watts = watts.max(0.0);
        if let Some((t0, w0)) = self.last {
            let dt = at.saturating_duration_since(t0).as_secs_f64();
            self.joules += 0.5 * (w0 + watts) * dt;
        }
        self.last = Some((at, watts));
        self.joules
    }
}
