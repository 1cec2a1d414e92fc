//! Jetson power rails from the INA3221 monitors.
//!
//! NVML answers NOT_SUPPORTED for power on Tegra, so these rails are the Jetson path. Two sysfs
//! layouts exist:
//! - JetPack 5/6 (mainline `ina3221` hwmon driver, Orin and later Xaviers):
//!   `/sys/bus/i2c/drivers/ina3221/<bus>-<addr>/hwmon/hwmonN/in{1,2,3}_label`, `in*_input` (mV),
//!   `curr*_input` (mA);
//! - JetPack 4 / L4T 32 (NVIDIA's `ina3221x` IIO driver, Nano/TX2/Xavier):
//!   `/sys/bus/i2c/drivers/ina3221x/<bus>-<addr>/iio:deviceN/rail_name_{0,1,2}`,
//!   `in_power{0,1,2}_input` (mW).
//!
//! Power is sampled and integrated into energy. Which rails count is configurable; by default
//! `VDD_IN` (the whole module; `POM_5V_IN` on the Nano) when present, since the other rails are
//! branches of it and adding them would count energy twice.

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::{read_text, EnergyError, PowerIntegrator, PowerSource, SourceKind, SysfsValue};

/// Rails that measure the whole module input, preferred by default.
const MODULE_INPUT_RAILS: &[&str] = &["VDD_IN", "POM_5V_IN", "5V_IN", "VIN_SYS_5V0"];

#[derive(Debug, Clone)]
enum Reading {
    /// hwmon: voltage (mV) and current (mA) files.
    VoltsAmps { mv: SysfsValue, ma: SysfsValue },
    /// IIO: power file (mW).
    Milliwatts(SysfsValue),
}

/// One power rail.
#[derive(Debug, Clone)]
pub struct Rail {
    /// Rail label, e.g. `VDD_IN`.
    pub name: String,
    /// The sensor directory it was found in.
    pub sensor: PathBuf,
    reading: Reading,
}

impl Rail {
    /// Instantaneous power in watts.
    pub fn watts(&self) -> Result<f64, EnergyError> {
        match &self.reading {
            Reading::VoltsAmps { mv, ma } => {
                Ok(mv.read_u64()? as f64 * ma.read_u64()? as f64 * 1e-6)
            }
            Reading::Milliwatts(p) => Ok(p.read_u64()? as f64 * 1e-3),
        }
    }
}

fn dirs(path: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(path)
        .map(|rd| {
            rd.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_dir())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Every rail under `<sysfs>/bus/i2c/drivers/ina3221*`, in both layouts.
pub fn discover(sysfs_root: &Path) -> Vec<Rail> {
    let drivers = sysfs_root.join("bus/i2c/drivers");
    let mut rails = Vec::new();
    for driver in dirs(&drivers) {
        let dname = driver
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if !dname.starts_with("ina3221") {
            continue;
        }
        for device in dirs(&driver) {
            // hwmon layout
            for hwmon in dirs(&device.join("hwmon")) {
                for ch in 1..=3 {
                    let Ok(label) = read_text(&hwmon.join(format!("in{ch}_label"))) else {
                        continue;
                    };
                    let mv = hwmon.join(format!("in{ch}_input"));
                    let ma = hwmon.join(format!("curr{ch}_input"));
                    if mv.exists() && ma.exists() && !label.starts_with("NC") {
                        rails.push(Rail {
                            name: label,
                            sensor: hwmon.clone(),
                            reading: Reading::VoltsAmps {
                                mv: SysfsValue::new(mv),
                                ma: SysfsValue::new(ma),
                            },
                        });
                    }
                }
            }
            // IIO layout
            for iio in dirs(&device) {
                let is_iio = iio
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("iio:device"));
                if !is_iio {
                    continue;
                }
                for ch in 0..=2 {
                    let Ok(label) = read_text(&iio.join(format!("rail_name_{ch}"))) else {
                        continue;
                    };
                    let p = iio.join(format!("in_power{ch}_input"));
                    if p.exists() {
                        rails.push(Rail {
                            name: label,
                            sensor: iio.clone(),
                            reading: Reading::Milliwatts(SysfsValue::new(p)),
                        });
                    }
                }
            }
        }
    }
    rails
}

/// Sum of the selected rails, integrated over time.
#[derive(Debug)]
pub struct Ina3221Source {
    rails: Vec<Rail>,
    integrator: PowerIntegrator,
}

impl Ina3221Source {
    /// Selects `wanted` rails by name (empty = module input when present, else all).
    pub fn open(sysfs_root: &Path, wanted: &[String]) -> Result<Self, EnergyError> {
        let all = discover(sysfs_root);
        if all.is_empty() {
            return Err(EnergyError::Absent(format!(
                "no INA3221 rails under {}/bus/i2c/drivers/ina3221* (not a Jetson)",
                sysfs_root.display()
            )));
        }
        let rails: Vec<Rail> = if wanted.is_empty() {
            let module: Vec<Rail> = all
                .iter()
                .filter(|r| MODULE_INPUT_RAILS.contains(&r.name.as_str()))
                .cloned()
                .collect();
            if module.is_empty() {
                all.clone()
            } else {
                module
            }
        } else {
            let missing: Vec<&String> = wanted
                .iter()
                .filter(|w| !all.iter().any(|r| &r.name == *w))
                .collect();
            if !missing.is_empty() {
                let have: Vec<&str> = all.iter().map(|r| r.name.as_str()).collect();
                return Err(EnergyError::Config(format!(
                    "rails {missing:?} not found; this device has {have:?}"
                )));
            }
            all.iter()
                .filter(|r| wanted.contains(&r.name))
                .cloned()
                .collect()
        };
        Ok(Ina3221Source {
            rails,
            integrator: PowerIntegrator::default(),
        })
    }

    /// The rails being counted.
    pub fn rails(&self) -> &[Rail] {
        &self.rails
    }
}

impl PowerSource for Ina3221Source {
    fn kind(&self) -> SourceKind {
        SourceKind::Ina3221
    }

    fn devices(&self) -> Vec<String> {
        self.rails.iter().map(|r| r.name.clone()).collect()
    }

    fn read_joules(&mut self) -> Result<f64, EnergyError> {
        let mut watts = 0.0;
        for r in &self.rails {
            watts += r.watts()?;
        }
        Ok(self.integrator.add(Instant::now(), watts))
    }
}
