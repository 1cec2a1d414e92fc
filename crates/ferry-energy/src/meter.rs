//! The energy meter: a background sampler over the chosen sources, feeding the attribution
//! ledger. Requests call [`EnergyMeter::begin`] when they start running and
//! [`EnergyMeter::end`] when they finish; both close the current interval with a fresh reading,
//! so short requests between two sampler ticks are still charged what they used.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::attribution::{Ledger, Totals};
use crate::{EnergyError, PowerSource, SourceKind};

/// Energy of one finished request.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct RequestEnergy {
    pub joules: f64,
    /// Source label: one kind (`rapl`), or several joined with `+` (`nvml+rapl`).
    pub source: String,
    pub devices: Vec<String>,
}

struct Inner {
    sources: Vec<Box<dyn PowerSource>>,
    /// Last cumulative reading per source.
    last: Vec<f64>,
    ledger: Ledger,
    per_source: Vec<f64>,
    read_errors: u64,
}

impl Inner {
    /// Reads every source and books the increments since the last reading.
    fn sample(&mut self) {
        let mut delta = 0.0;
        for (i, s) in self.sources.iter_mut().enumerate() {
            match s.read_joules() {
                Ok(j) => {
                    let d = j - self.last[i];
                    self.last[i] = j;
                    if d > 0.0 {
                        self.per_source[i] += d;
                    }
                    delta += d;
                }
                Err(e) => {
                    self.read_errors += 1;
                    tracing::warn!(source = s.kind().as_str(), "energy read failed: {e}");
                }
            }
        }
        self.ledger.record(delta);
    }
}

/// A running meter. Dropping the last handle stops the sampler.
pub struct EnergyMeter {
    inner: Arc<Mutex<Inner>>,
    stop: Arc<AtomicBool>,
    label: String,
    devices: Vec<String>,
    kinds: Vec<SourceKind>,
    sampler: Option<std::thread::JoinHandle<()>>,
}

/// An open request account.
#[derive(Debug)]
#[must_use = "end the account with EnergyMeter::end"]
pub struct Account(u64);

impl EnergyMeter {
    /// Starts sampling `sources` at `sample_hz` on a background thread.
    pub fn start(
        mut sources: Vec<Box<dyn PowerSource>>,
        sample_hz: f64,
    ) -> Result<Self, EnergyError> {
        if sources.is_empty() {
            return Err(EnergyError::Config("no energy source to meter".into()));
        }
        let mut last = Vec::with_capacity(sources.len());
        for s in &mut sources {
            last.push(s.read_joules()?);
        }
        let mut kinds: Vec<SourceKind> = sources.iter().map(|s| s.kind()).collect();
        kinds.sort();
        kinds.dedup();
        let label = kinds
            .iter()
            .map(|k| k.as_str())
            .collect::<Vec<_>>()
            .join("+");
        let devices = sources.iter().flat_map(|s| s.devices()).collect();
        let n = sources.len();
        let inner = Arc::new(Mutex::new(Inner {
            sources,
            last,
            ledger: Ledger::new(),
            per_source: vec![0.0; n],
            read_errors: 0,
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let period = Duration::from_secs_f64(1.0 / sample_hz);
        let (inner2, stop2) = (inner.clone(), stop.clone());
        let sampler = std::thread::Builder::new()
            .name("ferry-energy".into())
            .spawn(move || {
                while !stop2.load(Ordering::Acquire) {
                    std::thread::park_timeout(period);
                    if stop2.load(Ordering::Acquire) {
                        break;
                    }
                    inner2.lock().expect("energy meter lock").sample();
                }
            })
            .map_err(|e| EnergyError::Config(format!("starting the sampler thread: {e}")))?;
        Ok(EnergyMeter {
            inner,
            stop,
            label,
            devices,
            kinds,
            sampler: Some(sampler),
        })
    }

    /// The source label figures carry (`estimate`, `rapl`, `nvml+rapl`, ...).
    pub fn source_label(&self) -> &str {
        &self.label
    }

    /// The kinds of source being read.
    pub fn kinds(&self) -> &[SourceKind] {
        &self.kinds
    }

    /// Devices being counted.
    pub fn devices(&self) -> &[String] {
        &self.devices
    }

    /// Opens an account for a request that starts running now.
    pub fn begin(&self) -> Account {
        let mut inner = self.inner.lock().expect("energy meter lock");
        inner.sample();
        Account(inner.ledger.begin())
    }

    /// Closes an account and returns the request's energy.
    pub fn end(&self, account: Account) -> RequestEnergy {
        let mut inner = self.inner.lock().expect("energy meter lock");
        inner.sample();
        RequestEnergy {
            joules: inner.ledger.end(account.0),
            source: self.label.clone(),
            devices: self.devices.clone(),
        }
    }

    /// Takes a reading now (tests and shutdown).
    pub fn sample_now(&self) {
        self.inner.lock().expect("energy meter lock").sample();
    }

    /// Totals since start.
    pub fn totals(&self) -> Totals {
        self.inner
            .lock()
            .expect("energy meter lock")
            .ledger
            .totals()
    }

    /// Joules measured per source kind since start.
    pub fn per_source(&self) -> Vec<(SourceKind, f64)> {
        let inner = self.inner.lock().expect("energy meter lock");
        inner
            .sources
            .iter()
            .zip(&inner.per_source)
            .map(|(s, j)| (s.kind(), *j))
            .collect()
    }

    /// Failed source reads since start.
    pub fn read_errors(&self) -> u64 {
        self.inner.lock().expect("energy meter lock").read_errors
    }
}

impl Drop for EnergyMeter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(h) = self.sampler.take() {
            h.thread().unpark();
            let _ = h.join();
        }
    }
}
