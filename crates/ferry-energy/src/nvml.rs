//! NVIDIA GPUs through NVML: the driver's total-energy counter (mJ since driver load) where the
//! GPU has one (Volta and later), otherwise power samples (mW) integrated over time. No library
//! or no GPU makes the source absent, with the reason; it never crashes the daemon.

use std::time::Instant;

use nvml_wrapper::error::NvmlError;
use nvml_wrapper::Nvml;

use crate::{EnergyError, PowerIntegrator, PowerSource, SourceKind};

enum Counter {
    /// Millijoules at open time.
    Total {
        start_mj: u64,
    },
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
                Ok(mj) => Counter::Total { start_mj: mj },
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
}

impl PowerSource for NvmlSource {
    fn kind(&self) -> SourceKind {
        SourceKind::Nvml
    }

    fn devices(&self) -> Vec<String> {
        self.gpus.iter().map(|(_, n, _)| n.clone()).collect()
    }

    fn read_joules(&mut self) -> Result<f64, EnergyError> {
        let mut total = 0.0;
        for (i, name, counter) in &mut self.gpus {
            let dev = self.nvml.device_by_index(*i).map_err(absent)?;
            total += match counter {
                Counter::Total { start_mj } => {
                    let mj = dev
                        .total_energy_consumption()
                        .map_err(|e| EnergyError::Unreadable(format!("{name}: {e}")))?;
                    mj.saturating_sub(*start_mj) as f64 * 1e-3
                }
                Counter::Power(integ) => {
                    let mw = dev
                        .power_usage()
                        .map_err(|e| EnergyError::Unreadable(format!("{name}: {e}")))?;
                    integ.add(Instant::now(), f64::from(mw) * 1e-3)
                }
            };
        }
        Ok(total)
    }
}
