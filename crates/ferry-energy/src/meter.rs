//! The energy meter: a background sampler over the chosen sources, feeding the attribution
//! ledger. Requests call [`EnergyMeter::begin`] when they start running and
//! [`EnergyMeter::end`] when they finish; both close the current interval with a fresh, exact
//! reading ([`PowerSource::read_joules`]), so short requests between two sampler ticks are still
//! charged what they used. The sampler's ticks use the cheap reading
//! ([`PowerSource::read_joules_tick`]); what an interpolating source's ticks overshot or
//! undershot comes back as a correction at the next exact reading, and goes to the requests that
//! ran since then ([`Ledger::correct`]), so a request's joules add up to the exact readings at its
//! start and end.

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
    stats: MeterStats,
}

/// How often and how long the meter read its sources.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct MeterStats {
    /// Cheap reads: sampler ticks, and request starts and ends when they are not exact.
    pub ticks: u64,
    /// Exact reads (request starts and ends, [`EnergyMeter::sample_now`]).
    pub exact_reads: u64,
    /// Wall time spent in exact reads, seconds: what they add to requests.
    pub exact_read_s: f64,
    /// Wall time spent in ticks, seconds.
    pub tick_s: f64,
}

impl Inner {
    /// Reads every source (exactly, or the cheap way for a tick) and books the increments
    /// since the last reading.
    fn sample(&mut self, exact: bool) {
        let t = std::time::Instant::now();
        // Increments of counters (a negative one is a reset: ignored), and of interpolating
        // sources (a negative one corrects their ticks: taken back).
        let mut plain = 0.0;
        let mut signed = 0.0;
        for (i, s) in self.sources.iter_mut().enumerate() {
            let reading = if exact {
                s.read_joules()
            } else {
                s.read_joules_tick()
            };
            match reading {
                Ok(j) => {
                    let d = j - self.last[i];
                    self.last[i] = j;
                    if s.interpolates() {
                        self.per_source[i] += d;
                        signed += d;
                    } else {
                        if d > 0.0 {
                            self.per_source[i] += d;
                        }
                        plain += d;
                    }
                }
                Err(e) => {
                    self.read_errors += 1;
                    tracing::warn!(source = s.kind().as_str(), "energy read failed: {e}");
                }
            }
        }
        if plain >= 0.0 {
            self.ledger.correct(plain + signed);
        } else {
            self.ledger.record(plain);
            self.ledger.correct(signed);
        }
        let secs = t.elapsed().as_secs_f64();
        if exact {
            self.stats.exact_reads += 1;
            self.stats.exact_read_s += secs;
        } else {
            self.stats.ticks += 1;
            self.stats.tick_s += secs;
        }
    }
}

/// A running meter. Dropping the last handle stops the sampler.
pub struct EnergyMeter {
    inner: Arc<Mutex<Inner>>,
    stop: Arc<AtomicBool>,
    label: String,
    devices: Vec<String>,
    kinds: Vec<SourceKind>,
    /// Read exactly at request starts and ends (see [`EnergyMeter::set_exact_at_requests`]).
    exact_at_requests: AtomicBool,
    /// The sampler thread's id (for its CPU time), once it has started.
    sampler_tid: Arc<Mutex<Option<String>>>,
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
        if !(sample_hz > 0.0 && sample_hz.is_finite()) {
            return Err(EnergyError::Config("sample_hz must be positive".into()));
        }
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
            stats: MeterStats::default(),
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let period = Duration::from_secs_f64(1.0 / sample_hz);
        let (inner2, stop2) = (inner.clone(), stop.clone());
        let sampler_tid = Arc::new(Mutex::new(None));
        let tid2 = sampler_tid.clone();
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
        let sampler = std::thread::Builder::new()
            .name("ferry-energy".into())
            .spawn(move || {
                // "<pid>/task/<tid>": where this thread's CPU time can be read.
                *tid2.lock().expect("sampler tid lock") = std::fs::read_link("/proc/thread-self")
                    .ok()
                    .map(|p| p.to_string_lossy().into_owned());
                let _ = ready_tx.send(());
                // Ticks at fixed times, not fixed gaps: the rate stays sample_hz however long a
                // read takes.
                let mut next = std::time::Instant::now() + period;
                while !stop2.load(Ordering::Acquire) {
                    let now = std::time::Instant::now();
                    if now < next {
                        std::thread::park_timeout(next - now);
                        continue;
                    }
                    next += period;
                    if next < now {
                        next = now + period;
                    }
                    inner2.lock().expect("energy meter lock").sample(false);
                }
            })
            .map_err(|e| EnergyError::Config(format!("starting the sampler thread: {e}")))?;
        // The thread's id is known before anyone asks for its CPU time.
        let _ = ready_rx.recv();
        Ok(EnergyMeter {
            inner,
            stop,
            label,
            devices,
            kinds,
            exact_at_requests: AtomicBool::new(true),
            sampler_tid,
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
        inner.sample(self.exact_at_requests.load(Ordering::Relaxed));
        Account(inner.ledger.begin())
    }

    /// Closes an account and returns the request's energy.
    pub fn end(&self, account: Account) -> RequestEnergy {
        let mut inner = self.inner.lock().expect("energy meter lock");
        inner.sample(self.exact_at_requests.load(Ordering::Relaxed));
        RequestEnergy {
            joules: inner.ledger.end(account.0),
            source: self.label.clone(),
            devices: self.devices.clone(),
        }
    }

    /// Takes an exact reading now (tests and shutdown).
    pub fn sample_now(&self) {
        self.inner.lock().expect("energy meter lock").sample(true);
    }

    /// Whether request starts and ends read the sources exactly (the default) or the cheap way,
    /// as a tick does. Off, a request's joules are as exact as the sources' interpolation:
    /// `ferry bench requests` uses it to show what the calibration alone gets.
    pub fn set_exact_at_requests(&self, exact: bool) {
        self.exact_at_requests.store(exact, Ordering::Relaxed);
    }

    /// How often and how long the sources were read.
    pub fn stats(&self) -> MeterStats {
        self.inner.lock().expect("energy meter lock").stats
    }

    /// CPU time the sampler thread has used, in seconds (Linux: from its `schedstat`, else its
    /// `stat`); `None` where neither can be read.
    pub fn sampler_cpu_s(&self) -> Option<f64> {
        let task = self.sampler_tid.lock().expect("sampler tid lock").clone()?;
        let dir = std::path::Path::new("/proc").join(task);
        if let Ok(text) = std::fs::read_to_string(dir.join("schedstat")) {
            if let Some(ns) = text
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<u64>().ok())
            {
                return Some(ns as f64 * 1e-9);
            }
        }
        // utime and stime, fields 14 and 15, in clock ticks (100 per second on Linux).
        let text = std::fs::read_to_string(dir.join("stat")).ok()?;
        let after = &text[text.rfind(')')? + 2..];
        let f: Vec<&str> = after.split_whitespace().collect();
        let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
        Some(ticks as f64 / 100.0)
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

    /// The calibration of each interpolating source (see [`PowerSource::calibration`]).
    pub fn calibration(&self) -> Vec<(SourceKind, f64)> {
        let inner = self.inner.lock().expect("energy meter lock");
        inner
            .sources
            .iter()
            .filter_map(|s| Some((s.kind(), s.calibration()?)))
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A GPU whose exact counter is `energy` and whose ticks see the energy since the last exact
    /// read times `gain` (a power sensor that reads high or low).
    #[derive(Clone)]
    struct FakeGpu(Arc<Mutex<(f64, f64, f64)>>); // (energy, at last exact read, gain)

    impl FakeGpu {
        fn new(gain: f64) -> Self {
            FakeGpu(Arc::new(Mutex::new((0.0, 0.0, gain))))
        }
        fn burn(&self, joules: f64) {
            self.0.lock().unwrap().0 += joules;
            // Let the sampler tick a few times on the new energy.
            std::thread::sleep(Duration::from_millis(15));
        }
    }

    impl PowerSource for FakeGpu {
        fn kind(&self) -> SourceKind {
            SourceKind::Nvml
        }
        fn devices(&self) -> Vec<String> {
            vec!["gpu0 (fake)".into()]
        }
        fn read_joules(&mut self) -> Result<f64, EnergyError> {
            let mut g = self.0.lock().unwrap();
            g.1 = g.0;
            Ok(g.0)
        }
        fn read_joules_tick(&mut self) -> Result<f64, EnergyError> {
            let g = self.0.lock().unwrap();
            Ok(g.1 + g.2 * (g.0 - g.1))
        }
        fn interpolates(&self) -> bool {
            true
        }
    }

    #[test]
    fn requests_get_the_exact_counter_whatever_the_ticks_say() {
        for gain in [1.3, 0.7, 1.0] {
            let gpu = FakeGpu::new(gain);
            let meter = EnergyMeter::start(vec![Box::new(gpu.clone())], 1000.0).unwrap();
            #[cfg(target_os = "linux")]
            assert!(meter.sampler_cpu_s().is_some(), "readable from the start");
            gpu.burn(5.0); // idle
            let a = meter.begin();
            gpu.burn(10.0);
            let b = meter.begin();
            gpu.burn(6.0);
            let ea = meter.end(a);
            gpu.burn(4.0);
            let eb = meter.end(b);
            gpu.burn(2.0);
            meter.sample_now();
            assert!(
                (ea.joules - 13.0).abs() < 1e-9,
                "gain {gain}: {}",
                ea.joules
            );
            assert!((eb.joules - 7.0).abs() < 1e-9, "gain {gain}: {}", eb.joules);
            let t = meter.totals();
            assert!((t.measured_joules - 27.0).abs() < 1e-9, "{t:?}");
            assert!((t.idle_joules - 7.0).abs() < 1e-9, "{t:?}");
            assert_eq!(t.ignored_negative_joules, 0.0);
            assert!((meter.per_source()[0].1 - 27.0).abs() < 1e-9);
            let stats = meter.stats();
            assert!(stats.ticks > 0 && stats.exact_reads == 5, "{stats:?}");
            #[cfg(target_os = "linux")]
            assert!(meter.sampler_cpu_s().is_some());
        }
    }

    #[test]
    fn without_exact_reads_requests_are_booked_from_ticks() {
        let gpu = FakeGpu::new(1.25);
        let meter = EnergyMeter::start(vec![Box::new(gpu.clone())], 1000.0).unwrap();
        meter.set_exact_at_requests(false);
        let reads = meter.stats().exact_reads;
        let a = meter.begin();
        gpu.burn(4.0);
        let e = meter.end(a);
        assert_eq!(e.joules, 5.0, "the ticks' view, 25 % high");
        assert_eq!(
            meter.stats().exact_reads,
            reads,
            "no exact read per request"
        );
        // The next exact read finds the overshoot after the request has ended: nothing running
        // to take it back from, so it is counted as ignored.
        meter.sample_now();
        let t = meter.totals();
        assert_eq!((t.measured_joules, t.attributed_joules), (5.0, 5.0));
        assert_eq!(t.ignored_negative_joules, 1.0);
    }
}
