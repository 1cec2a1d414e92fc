//! `ferry energy probe`: which energy sources this machine has, and what they read.

use std::path::PathBuf;

use clap::{Args, Subcommand};

#[derive(Args)]
pub(crate) struct EnergyArgs {
    /// Sources: auto, or a comma list of nvml, rapl, ina3221, estimate.
    #[arg(
        long,
        env = "FERRY_ENERGY_SOURCES",
        value_delimiter = ',',
        default_value = "auto"
    )]
    pub(crate) sources: Vec<String>,
    /// Jetson rails to count.
    #[arg(long, env = "FERRY_ENERGY_RAILS", value_delimiter = ',')]
    pub(crate) rails: Vec<String>,
    /// Root of the sysfs tree.
    #[arg(long, env = "FERRY_ENERGY_SYSFS_ROOT", default_value = "/sys")]
    pub(crate) sysfs_root: PathBuf,
}

impl EnergyArgs {
    pub(crate) fn config(&self) -> ferry_energy::EnergyConfig {
        ferry_energy::EnergyConfig {
            sources: self.sources.clone(),
            rails: self.rails.clone(),
            sysfs_root: self.sysfs_root.clone(),
            ..Default::default()
        }
    }
}

#[derive(Subcommand)]
pub(crate) enum EnergyCommand {
    /// Which power sources exist here, which devices they count, and why the others cannot be read.
    Probe {
        #[command(flatten)]
        energy: EnergyArgs,
        /// Also read every readable source for this many seconds and report the joules each
        /// counted and its mean power (does the sensor move with load?).
        #[arg(long)]
        measure_s: Option<f64>,
        #[arg(long)]
        json: bool,
    },
}

pub(crate) fn energy_probe(
    args: EnergyArgs,
    measure_s: Option<f64>,
    json: bool,
) -> anyhow::Result<()> {
    let cfg = args.config();
    let results = ferry_energy::probe(&cfg);
    let chosen = ferry_energy::open_sources(&cfg)
        .map(|s| {
            s.iter()
                .map(|s| s.kind().as_str())
                .collect::<Vec<_>>()
                .join("+")
        })
        .unwrap_or_else(|e| format!("none ({e})"));
    let measured = match measure_s {
        Some(secs) => measure_sources(&args, &results, secs)?,
        None => Vec::new(),
    };
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({"sources": results, "selected": chosen, "measured": measured})
            )?
        );
        return Ok(());
    }
    println!("{:<9} {:<10} DEVICES / REASON", "SOURCE", "READABLE");
    for r in &results {
        let detail = if r.available {
            r.devices.join(", ")
        } else {
            r.reason.clone().unwrap_or_default()
        };
        println!(
            "{:<9} {:<10} {detail}",
            r.kind.as_str(),
            if r.available { "yes" } else { "no" }
        );
    }
    println!("ferryd would use: {chosen}");
    for m in &measured {
        println!(
            "{}: {:.2} J over {:.2} s = {:.2} W mean",
            m["source"].as_str().unwrap_or("?"),
            m["joules"].as_f64().unwrap_or(f64::NAN),
            m["seconds"].as_f64().unwrap_or(f64::NAN),
            m["mean_watts"].as_f64().unwrap_or(f64::NAN)
        );
    }
    Ok(())
}

/// Reads each readable source over `secs` seconds (sampling at 10 Hz, as ferryd does, so power
/// sources integrate and counters cannot wrap unseen): joules and mean watts per source.
pub(crate) fn measure_sources(
    args: &EnergyArgs,
    results: &[ferry_energy::ProbeResult],
    secs: f64,
) -> anyhow::Result<Vec<serde_json::Value>> {
    anyhow::ensure!(
        secs.is_finite() && secs > 0.0,
        "--measure-s must be a positive number of seconds"
    );
    let mut out = Vec::new();
    for r in results.iter().filter(|r| r.available) {
        let mut cfg = args.config();
        cfg.sources = vec![r.kind.as_str().to_string()];
        let mut sources = ferry_energy::open_sources(&cfg)?;
        let Some(source) = sources.first_mut() else {
            continue;
        };
        let start = std::time::Instant::now();
        let first = source.read_joules()?;
        let mut last = first;
        while start.elapsed().as_secs_f64() < secs {
            std::thread::sleep(std::time::Duration::from_millis(100));
            last = source.read_joules()?;
        }
        let seconds = start.elapsed().as_secs_f64();
        out.push(serde_json::json!({
            "source": r.kind.as_str(),
            "devices": source.devices(),
            "joules": last - first,
            "seconds": seconds,
            "mean_watts": (last - first) / seconds,
        }));
    }
    Ok(out)
}

/// Runs `ferry energy …`.
pub(crate) fn run(cmd: EnergyCommand) -> anyhow::Result<()> {
    match cmd {
        EnergyCommand::Probe {
            energy,
            measure_s,
            json,
        } => energy_probe(energy, measure_s, json),
    }
}
