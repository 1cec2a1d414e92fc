//! The fallback: system CPU utilisation (sysinfo) times a configured package power, integrated
//! over time. Always labelled `estimate`; used only when no measured source exists.

use std::time::Instant;

use sysinfo::{CpuRefreshKind, RefreshKind, System};

use crate::{EnergyError, PowerIntegrator, PowerSource, SourceKind};

/// `P = idle + (package - idle) × utilisation`.
pub struct EstimateSource {
    system: System,
    idle_watts: f64,
    package_watts: f64,
    integrator: PowerIntegrator,
}

impl EstimateSource {
    pub fn new(idle_watts: f64, package_watts: f64) -> Result<Self, EnergyError> {
        let mut system = System::new_with_specifics(
            RefreshKind::nothing().with_cpu(CpuRefreshKind::nothing().with_usage()),
        )
        .map_err(|e| EnergyError::Absent(format!("sysinfo cannot read CPU usage: {e}")))?;
        // The first utilisation reading needs a previous one to diff against.
        system.refresh_cpu_usage();
        Ok(EstimateSource {
            system,
            idle_watts,
            package_watts,
            integrator: PowerIntegrator::default(),
        })
    }

    /// Modelled power at a utilisation in [0, 1].
    pub fn watts_at(&self, utilisation: f64) -> f64 {
        self.idle_watts + (self.package_watts - self.idle_watts) * utilisation.clamp(0.0, 1.0)
    }
}

impl PowerSource for EstimateSource {
    fn kind(&self) -> SourceKind {
        SourceKind::Estimate
    }

    fn devices(&self) -> Vec<String> {
        vec![format!(
            "cpu (estimate: {:.1}-{:.1} W)",
            self.idle_watts, self.package_watts
        )]
    }

    fn read_joules(&mut self) -> Result<f64, EnergyError> {
        self.system.refresh_cpu_usage();
        let util = f64::from(self.system.global_cpu_usage()) / 100.0;
        Ok(self.integrator.add(Instant::now(), self.watts_at(util)))
    }
}
