//! RAPL through the Linux powercap interface: `/sys/class/powercap/intel-rapl:N/energy_uj`.
//!
//! The same files exist on Intel and on AMD Zen (the `intel-rapl` name is historical). Only the
//! top-level zones (`intel-rapl:N`, one per package, plus `psys` where present) are counted, so
//! sub-zones (core, uncore, dram) are never added twice. Counters wrap at
//! `max_energy_range_uj`; since 2020 (CVE-2020-8694) `energy_uj` is readable by root only.

use std::path::Path;

use crate::{read_text, read_u64, EnergyError, PowerSource, SourceKind, SysfsValue};

#[derive(Debug)]
struct Zone {
    name: String,
    energy: SysfsValue,
    max_range_uj: u64,
    last_uj: Option<u64>,
    total_uj: u128,
}

impl Zone {
    /// Reads the counter and adds the increment since the last read, across at most one wrap.
    fn read(&mut self) -> Result<(), EnergyError> {
        let now = self.energy.read_u64()?;
        if let Some(last) = self.last_uj {
            let delta = if now >= last {
                now - last
            } else {
                // Wrapped: the counter runs 0..=max_energy_range_uj.
                (self.max_range_uj - last) + now + 1
            };
            self.total_uj += u128::from(delta);
        }
        self.last_uj = Some(now);
        Ok(())
    }
}

/// Sum of the top-level RAPL zones.
#[derive(Debug)]
pub struct RaplSource {
    zones: Vec<Zone>,
}

impl RaplSource {
    /// Finds the top-level zones under `<sysfs>/class/powercap`.
    pub fn open(sysfs_root: &Path) -> Result<Self, EnergyError> {
        let base = sysfs_root.join("class/powercap");
        let entries = std::fs::read_dir(&base).map_err(|_| {
            EnergyError::Absent(format!(
                "{} does not exist (no powercap driver, or a VM)",
                base.display()
            ))
        })?;
        let mut zones = Vec::new();
        let mut names: Vec<String> = entries
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| {
                // Top level: `intel-rapl:0`, not `intel-rapl:0:1`; `intel-rapl` itself is the control type.
                n.strip_prefix("intel-rapl:")
                    .is_some_and(|rest| !rest.contains(':'))
            })
            .collect();
        names.sort();
        for dir_name in names {
            let dir = base.join(&dir_name);
            let name = read_text(&dir.join("name")).unwrap_or_else(|_| dir_name.clone());
            let max_range_uj = read_u64(&dir.join("max_energy_range_uj"))?;
            zones.push(Zone {
                name: format!("{dir_name} ({name})"),
                energy: SysfsValue::new(dir.join("energy_uj")),
                max_range_uj,
                last_uj: None,
                total_uj: 0,
            });
        }
        if zones.is_empty() {
            return Err(EnergyError::Absent(format!(
                "no intel-rapl:N zones under {}",
                base.display()
            )));
        }
        Ok(RaplSource { zones })
    }
}

impl PowerSource for RaplSource {
    fn kind(&self) -> SourceKind {
        SourceKind::Rapl
    }

    fn devices(&self) -> Vec<String> {
        self.zones.iter().map(|z| z.name.clone()).collect()
    }

    fn read_joules(&mut self) -> Result<f64, EnergyError> {
        for z in &mut self.zones {
            z.read()?;
        }
        Ok(self.zones.iter().map(|z| z.total_uj as f64 * 1e-6).sum())
    }
}
