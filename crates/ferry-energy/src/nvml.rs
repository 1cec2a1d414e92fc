//! NVIDIA GPUs through NVML.
//!
//! Where the GPU has the driver's total-energy counter (mJ since driver load; Volta and later), it
//! is the truth, but reading it is slow: `nvmlDeviceGetTotalEnergyConsumption` took 4.07 ms of CPU
//! per call on an H200, against about 1 µs for `nvmlDeviceGetPowerUsage`. So the counter is read
//! only on exact reads ([`PowerSource::read_joules`]: the meter's request starts and ends) and at
//! most [`MAX_INTERPOLATION`] apart otherwise; the sampler's ticks
//! ([`PowerSource::read_joules_tick`]) integrate the power reading in between, scaled by a factor
//! calibrated against the counter ([`Interpolator`]). Every exact read lands on the counter again,
//! so what the meter books between two exact reads always adds up to the counter's own increment.
//!
//! GPUs without the counter (Tegra answers NOT_SUPPORTED; the INA3221 source covers it) integrate
//! power samples on every read. No library or no GPU makes the source absent, with the reason; it
//! never crashes the daemon.

use std::time::{Duration, Instant};

use nvml_wrapper::error::NvmlError;
use nvml_wrapper::Nvml;

use crate::{EnergyError, PowerIntegrator, PowerSource, SourceKind};

/// Longest stretch the sampler's ticks interpolate before a tick reads the counter itself.
pub const MAX_INTERPOLATION: Duration = Duration::from_secs(10);

/// Time constant of the calibration's memory: segments older than a few of these hardly count.
const CALIBRATION_TAU_S: f64 = 120.0;
/// The calibration is used once the segments behind it cover this much time...
const CALIBRATION_MIN_S: f64 = 2.0;
/// ... and this much energy (below it the counter's millijoule steps and the power reading's
/// update period dominate).
const CALIBRATION_MIN_J: f64 = 1.0;
/// A scale outside this range means a broken reading, not a sensor offset: ignore it.
const SCALE_RANGE: (f64, f64) = (0.5, 2.0);

/// A slow exact energy counter interpolated by a fast power reading.
///
/// Between two exact readings (`exact`) the cumulative energy is the last exact value plus the
/// trapezoidal integral of the power readings (`tick`) since then, times `scale`. At every exact
/// reading the value lands on the counter again, and the segment just closed updates `scale`:
/// the ratio of the counter's increments to the raw power integral over the same segments, with
/// exponentially fading weights. Within a segment the value never decreases; at an exact reading
/// it steps back when the interpolation overshot (by the overshoot, never more).
#[derive(Debug, Clone)]
pub struct Interpolator {
    /// Counter value that reads as 0 J.
    base_j: f64,
    /// Last exact reading: when, and the counter's raw value.
    anchor_at: Instant,
    anchor_counter_j: f64,
    /// Value reported at the anchor (counter - base).
    anchor_value_j: f64,
    last_power: Option<(Instant, f64)>,
    /// Raw (unscaled) power integral since the anchor.
    raw_since_anchor_j: f64,
    /// Faded sums over closed segments: counter increments, raw integrals, durations.
    sum_counter_j: f64,
    sum_raw_j: f64,
    sum_s: f64,
    scale: f64,
    value_j: f64,
}

impl Interpolator {
    /// Starts at an exact reading of `counter_j` (value 0), with a power reading when there is one.
    pub fn new(at: Instant, counter_j: f64, watts: Option<f64>) -> Self {
        Interpolator {
            base_j: counter_j,
            anchor_at: at,
            anchor_counter_j: counter_j,
            anchor_value_j: 0.0,
            last_power: watts.map(|w| (at, w.max(0.0))),
            raw_since_anchor_j: 0.0,
            sum_counter_j: 0.0,
            sum_raw_j: 0.0,
            sum_s: 0.0,
            scale: 1.0,
            value_j: 0.0,
        }
    }

    fn integrate(&mut self, at: Instant, watts: Option<f64>) {
        let Some(w) = watts.filter(|w| w.is_finite()).map(|w| w.max(0.0)) else {
            return;
        };
        if let Some((t0, w0)) = self.last_power {
            let dt = at.saturating_duration_since(t0).as_secs_f64();
            self.raw_since_anchor_j += 0.5 * (w0 + w) * dt;
        }
        self.last_power = Some((at, w));
    }

    /// A power reading: returns the interpolated cumulative joules.
    pub fn tick(&mut self, at: Instant, watts: f64) -> f64 {
        self.integrate(at, Some(watts));
        let v = self.anchor_value_j + self.scale * self.raw_since_anchor_j;
        // Monotone within a segment (the scale only changes at exact readings).
        self.value_j = self.value_j.max(v);
        self.value_j
    }

    /// An exact reading of the counter (with a power reading taken at the same time, when there
    /// is one): returns the counter's cumulative joules since the start.
    pub fn exact(&mut self, at: Instant, counter_j: f64, watts: Option<f64>) -> f64 {
        self.integrate(at, watts);
        let seg_counter = counter_j - self.anchor_counter_j;
        if seg_counter < 0.0 {
            // The counter went back (driver reload): continue from the value reported so far.
            self.base_j = counter_j - self.value_j;
        } else {
            let seg_s = at.saturating_duration_since(self.anchor_at).as_secs_f64();
            if self.raw_since_anchor_j > 0.0 && seg_s > 0.0 {
                let fade = (-seg_s / CALIBRATION_TAU_S).exp();
                self.sum_counter_j = self.sum_counter_j * fade + seg_counter;
                self.sum_raw_j = self.sum_raw_j * fade + self.raw_since_anchor_j;
                self.sum_s = self.sum_s * fade + seg_s;
                if self.sum_s >= CALIBRATION_MIN_S && self.sum_raw_j >= CALIBRATION_MIN_J {
                    let k = self.sum_counter_j / self.sum_raw_j;
                    if (SCALE_RANGE.0..=SCALE_RANGE.1).contains(&k) {
                        self.scale = k;
                    }
                }
            }
        }
        self.anchor_at = at;
        self.anchor_counter_j = counter_j;
        self.anchor_value_j = counter_j - self.base_j;
        self.raw_since_anchor_j = 0.0;
        self.value_j = self.anchor_value_j;
        self.value_j
    }

    /// Whether the last exact reading is at least [`MAX_INTERPOLATION`] old.
    pub fn due(&self, at: Instant) -> bool {
        at.saturating_duration_since(self.anchor_at) >= MAX_INTERPOLATION
    }

    /// Counter joules per raw power-integral joule (1 until calibrated).
    pub fn scale(&self) -> f64 {
        self.scale
    }
}

enum Counter {
    /// The driver's total-energy counter, interpolated by power readings on ticks.
    Total(Interpolator),
    /// Power samples only.
    Power(PowerIntegrator),
}

/// Every visible GPU.
pub struct NvmlSource {
    nvml: Nvml,
    gpus: Vec<(u32, String, Counter)>,
}

fn absent(e: NvmlError) -> EnergyError {
    match e {
        NvmlError::NoPermission => EnergyError::Unreadable(format!("NVML: {e}")),
        _ => EnergyError::Absent(format!("NVML: {e}")),
    }
}

impl NvmlSource {
    pub fn open() -> Result<Self, EnergyError> {
        let nvml = Nvml::init().map_err(absent)?;
        let count = nvml.device_count().map_err(absent)?;
        if count == 0 {
            return Err(EnergyError::Absent("NVML found no GPU".into()));
        }
        let mut gpus = Vec::new();
        for i in 0..count {
            let dev = nvml.device_by_index(i).map_err(absent)?;
            let name = dev.name().unwrap_or_else(|_| format!("gpu{i}"));
            let counter = match dev.total_energy_consumption() {
                Ok(mj) => {
                    let watts = dev.power_usage().ok().map(|mw| f64::from(mw) * 1e-3);
                    Counter::Total(Interpolator::new(Instant::now(), mj as f64 * 1e-3, watts))
                }
                Err(NvmlError::NotSupported) => {
                    // Tegra answers NOT_SUPPORTED for power too: the INA3221 source covers it.
                    dev.power_usage()
                        .map_err(|e| EnergyError::Absent(format!("NVML power on {name}: {e}")))?;
                    Counter::Power(PowerIntegrator::default())
                }
                Err(e) => return Err(absent(e)),
            };
            gpus.push((i, format!("gpu{i} ({name})"), counter));
        }
        Ok(NvmlSource { nvml, gpus })
    }

    fn read(&mut self, exact: bool) -> Result<f64, EnergyError> {
        let mut total = 0.0;
        for (i, name, counter) in &mut self.gpus {
            let dev = self.nvml.device_by_index(*i).map_err(absent)?;
            let unreadable = |e: NvmlError| EnergyError::Unreadable(format!("{name}: {e}"));
            let watts = || dev.power_usage().map(|mw| f64::from(mw) * 1e-3);
            total += match counter {
                Counter::Total(interp) => {
                    let now = Instant::now();
                    if exact || interp.due(now) {
                        let mj = dev.total_energy_consumption().map_err(unreadable)?;
                        interp.exact(Instant::now(), mj as f64 * 1e-3, watts().ok())
                    } else {
                        interp.tick(now, watts().map_err(unreadable)?)
                    }
                }
                Counter::Power(integ) => integ.add(Instant::now(), watts().map_err(unreadable)?),
            };
        }
        Ok(total)
    }
}

/// NVML's own total-energy counter of every visible GPU, summed, read directly and nothing else:
/// the reference `ferry bench requests` holds the meter's per-request joules against.
pub struct NvmlCounter {
    nvml: Nvml,
    count: u32,
}

impl NvmlCounter {
    pub fn open() -> Result<Self, EnergyError> {
        let nvml = Nvml::init().map_err(absent)?;
        let count = nvml.device_count().map_err(absent)?;
        if count == 0 {
            return Err(EnergyError::Absent("NVML found no GPU".into()));
        }
        let c = NvmlCounter { nvml, count };
        c.joules()?;
        Ok(c)
    }

    /// The counters' sum in joules (since driver load).
    pub fn joules(&self) -> Result<f64, EnergyError> {
        let mut mj = 0u64;
        for i in 0..self.count {
            let dev = self.nvml.device_by_index(i).map_err(absent)?;
            mj += dev
                .total_energy_consumption()
                .map_err(|e| EnergyError::Unreadable(format!("gpu{i}: {e}")))?;
        }
        Ok(mj as f64 * 1e-3)
    }

    /// The power readings' sum in watts.
    pub fn watts(&self) -> Result<f64, EnergyError> {
        let mut mw = 0u64;
        for i in 0..self.count {
            let dev = self.nvml.device_by_index(i).map_err(absent)?;
            mw += u64::from(
                dev.power_usage()
                    .map_err(|e| EnergyError::Unreadable(format!("gpu{i}: {e}")))?,
            );
        }
        Ok(mw as f64 * 1e-3)
    }
}

impl PowerSource for NvmlSource {
    fn kind(&self) -> SourceKind {
        SourceKind::Nvml
    }

    fn devices(&self) -> Vec<String> {
        self.gpus.iter().map(|(_, n, _)| n.clone()).collect()
    }

    fn read_joules(&mut self) -> Result<f64, EnergyError> {
        self.read(true)
    }

    fn read_joules_tick(&mut self) -> Result<f64, EnergyError> {
        self.read(false)
    }

    fn interpolates(&self) -> bool {
        self.gpus
            .iter()
            .any(|(_, _, c)| matches!(c, Counter::Total(_)))
    }

    /// The mean scale over the GPUs with a total-energy counter.
    fn calibration(&self) -> Option<f64> {
        let scales: Vec<f64> = self
            .gpus
            .iter()
            .filter_map(|(_, _, c)| match c {
                Counter::Total(i) => Some(i.scale()),
                Counter::Power(_) => None,
            })
            .collect();
        (!scales.is_empty()).then(|| scales.iter().sum::<f64>() / scales.len() as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(t0: Instant, s: f64) -> Instant {
        t0 + Duration::from_secs_f64(s)
    }

    /// True power `p(t)`, a sensor that reads `gain * p`, and an exact counter.
    struct Gpu {
        t0: Instant,
        gain: f64,
        counter_j: f64,
        t: f64,
        p: fn(f64) -> f64,
    }

    impl Gpu {
        /// Advances to `s` seconds (fine steps, so the counter is the exact integral).
        fn advance(&mut self, s: f64) {
            let steps = ((s - self.t) / 1e-3).ceil().max(1.0) as usize;
            let dt = (s - self.t) / steps as f64;
            for _ in 0..steps {
                self.counter_j += 0.5 * ((self.p)(self.t) + (self.p)(self.t + dt)) * dt;
                self.t += dt;
            }
        }
        fn sensor(&self) -> f64 {
            self.gain * (self.p)(self.t)
        }
    }

    #[test]
    fn exact_reads_land_on_the_counter_and_ticks_interpolate() {
        let t0 = Instant::now();
        let mut gpu = Gpu {
            t0,
            gain: 1.0,
            counter_j: 5000.0,
            t: 0.0,
            p: |_| 100.0,
        };
        let mut i = Interpolator::new(at(t0, 0.0), gpu.counter_j, Some(gpu.sensor()));
        for k in 1..=5 {
            gpu.advance(0.1 * k as f64);
            let v = i.tick(at(gpu.t0, gpu.t), gpu.sensor());
            assert!((v - 100.0 * gpu.t).abs() < 1e-6, "{v}");
        }
        gpu.advance(0.7);
        let v = i.exact(at(t0, 0.7), gpu.counter_j, Some(gpu.sensor()));
        assert!((v - 70.0).abs() < 1e-6, "counter-relative: {v}");
        assert_eq!(i.scale(), 1.0, "too short to calibrate yet");
    }

    #[test]
    fn calibration_removes_a_sensor_gain_error() {
        let t0 = Instant::now();
        // The power reading is 4 % low; the load varies.
        let mut gpu = Gpu {
            t0,
            gain: 0.96,
            counter_j: 0.0,
            t: 0.0,
            p: |t| 150.0 + 100.0 * (t * 0.7).sin().abs(),
        };
        let mut i = Interpolator::new(t0, 0.0, Some(gpu.sensor()));
        let mut t = 0.0;
        // Requests of 0.5 s with exact reads at both ends, ticks at 10 Hz in between.
        for _ in 0..20 {
            for _ in 0..5 {
                t += 0.1;
                gpu.advance(t);
                i.tick(at(t0, t), gpu.sensor());
            }
            i.exact(at(t0, t), gpu.counter_j, Some(gpu.sensor()));
        }
        assert!((i.scale() - 1.0 / 0.96).abs() < 2e-3, "{}", i.scale());
        // Now interpolate 5 s of ticks alone: within 0.5 % of the counter.
        let start_v = i.exact(at(t0, t), gpu.counter_j, Some(gpu.sensor()));
        let start_c = gpu.counter_j;
        for _ in 0..50 {
            t += 0.1;
            gpu.advance(t);
            let v = i.tick(at(t0, t), gpu.sensor());
            let truth = gpu.counter_j - start_c;
            assert!(
                ((v - start_v) - truth).abs() <= 0.005 * truth + 1e-9,
                "{} vs {truth}",
                v - start_v
            );
        }
    }

    #[test]
    fn overshoot_steps_back_exactly_to_the_counter() {
        let t0 = Instant::now();
        let mut i = Interpolator::new(t0, 10.0, Some(200.0));
        // The sensor claims 200 W for 1 s but the counter only moved 150 J.
        let v = i.tick(at(t0, 1.0), 200.0);
        assert!((v - 200.0).abs() < 1e-9);
        let v = i.exact(at(t0, 1.0), 160.0, Some(200.0));
        assert!((v - 150.0).abs() < 1e-9, "{v}");
        // Ticks never go below the exact value.
        assert!(i.tick(at(t0, 1.0), 0.0) >= 150.0);
    }

    #[test]
    fn implausible_segments_do_not_move_the_scale() {
        let t0 = Instant::now();
        let mut i = Interpolator::new(t0, 0.0, Some(100.0));
        i.tick(at(t0, 3.0), 100.0);
        // The counter claims 10x the integral: a broken reading, not a gain error.
        i.exact(at(t0, 3.0), 3000.0, Some(100.0));
        assert_eq!(i.scale(), 1.0);
    }

    #[test]
    fn counter_reset_continues_from_the_reported_value() {
        let t0 = Instant::now();
        let mut i = Interpolator::new(t0, 1000.0, Some(50.0));
        assert!((i.exact(at(t0, 1.0), 1050.0, Some(50.0)) - 50.0).abs() < 1e-9);
        // Driver reload: the counter restarts near zero.
        assert!((i.exact(at(t0, 2.0), 3.0, Some(50.0)) - 50.0).abs() < 1e-9);
        assert!((i.exact(at(t0, 3.0), 53.0, Some(50.0)) - 100.0).abs() < 1e-9);
    }

    #[test]
    fn due_after_the_longest_interpolation() {
        let t0 = Instant::now();
        let mut i = Interpolator::new(t0, 0.0, None);
        assert!(!i.due(at(t0, 9.9)));
        assert!(i.due(at(t0, 10.0)));
        i.exact(at(t0, 10.0), 1.0, None);
        assert!(!i.due(at(t0, 19.0)));
        // No power reading at all: ticks hold the last exact value.
        assert_eq!(i.tick(at(t0, 11.0), f64::NAN), 1.0);
    }
}
