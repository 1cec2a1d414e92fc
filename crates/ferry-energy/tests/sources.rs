//! Source parsers on fixture trees copied from real sysfs layouts (see fixtures/README.md), and
//! the meter with the estimate source on this machine.

use std::path::{Path, PathBuf};

use ferry_energy::ina3221::{discover, Ina3221Source};
use ferry_energy::meter::EnergyMeter;
use ferry_energy::rapl::RaplSource;
use ferry_energy::{open_sources, probe, EnergyConfig, EnergyError, PowerSource, SourceKind};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
        .join("sys")
}

/// A writable copy of a fixture tree.
fn copy_tree(src: &Path, dst: &Path) {
    for entry in std::fs::read_dir(src).unwrap() {
        let entry = entry.unwrap();
        let to = dst.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            std::fs::create_dir_all(&to).unwrap();
            copy_tree(&entry.path(), &to);
        } else {
            std::fs::copy(entry.path(), &to).unwrap();
        }
    }
}

#[test]
fn orin_hwmon_rails_and_module_default() {
    let rails = discover(&fixture("jetson-orin-nx"));
    let names: Vec<&str> = rails.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(
        names,
        ["VDD_IN", "VDD_CPU_GPU_CV", "VDD_SOC"],
        "unlabelled shunt channels are skipped"
    );
    let vdd_in = rails[0].watts().unwrap();
    assert!((vdd_in - 5.072 * 1.432).abs() < 1e-9, "{vdd_in}");

    let src = Ina3221Source::open(&fixture("jetson-orin-nx"), &[]).unwrap();
    assert_eq!(
        src.devices(),
        ["VDD_IN"],
        "the module input alone by default: no double counting"
    );
    let src = Ina3221Source::open(
        &fixture("jetson-orin-nx"),
        &["VDD_SOC".into(), "VDD_CPU_GPU_CV".into()],
    )
    .unwrap();
    assert_eq!(src.devices(), ["VDD_CPU_GPU_CV", "VDD_SOC"]);
    let err = Ina3221Source::open(&fixture("jetson-orin-nx"), &["VDD_GPU".into()]).unwrap_err();
    assert!(
        err.to_string().contains("VDD_IN"),
        "names the rails that exist: {err}"
    );
}

#[test]
fn xavier_iio_rails_without_module_input_count_all() {
    let src = Ina3221Source::open(&fixture("jetson-agx-xavier-l4t32"), &[]).unwrap();
    assert_eq!(src.devices(), ["GPU", "CPU", "SOC", "CV", "VDDRQ", "SYS5V"]);
    let watts: f64 = src.rails().iter().map(|r| r.watts().unwrap()).sum();
    assert!(
        (watts - (1.012 + 1.532 + 1.380 + 0.0 + 0.456 + 1.864)).abs() < 1e-9,
        "{watts}"
    );
}

#[test]
fn ina3221_integrates_power_into_energy() {
    let tmp = tempfile::tempdir().unwrap();
    copy_tree(&fixture("jetson-orin-nx"), tmp.path());
    let mut src = Ina3221Source::open(tmp.path(), &[]).unwrap();
    assert_eq!(src.read_joules().unwrap(), 0.0);
    std::thread::sleep(std::time::Duration::from_millis(100));
    let j = src.read_joules().unwrap();
    // ~7.26 W for >= 0.1 s.
    assert!((0.1 * 7.26 * 0.99..7.26).contains(&j), "{j}");
}

#[test]
fn rapl_counts_packages_only_and_handles_wrap_around() {
    let tmp = tempfile::tempdir().unwrap();
    copy_tree(&fixture("x86-rapl"), tmp.path());
    let mut src = RaplSource::open(tmp.path()).unwrap();
    assert_eq!(
        src.devices(),
        ["intel-rapl:0 (package-0)", "intel-rapl:1 (package-1)"]
    );
    assert_eq!(src.read_joules().unwrap(), 0.0);
    let zone0 = tmp.path().join("class/powercap/intel-rapl:0/energy_uj");
    let zone1 = tmp.path().join("class/powercap/intel-rapl:1/energy_uj");
    // Package 0: +2 J. Package 1: wraps from 73158202553 past 262143328850 to 500000.
    std::fs::write(&zone0, "73160201553\n").unwrap();
    std::fs::write(&zone1, "500000\n").unwrap();
    let j = src.read_joules().unwrap();
    let wrapped_uj = (262_143_328_850u64 - 73_158_202_553) + 500_000 + 1;
    let expected = 2.0 + wrapped_uj as f64 * 1e-6;
    assert!((j - expected).abs() < 1e-6, "{j} vs {expected}");
    assert!(src.read_joules().unwrap() >= j, "monotonic");
}

#[test]
fn unreadable_rapl_counter_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    copy_tree(&fixture("x86-rapl"), tmp.path());
    let counter = tmp.path().join("class/powercap/intel-rapl:0/energy_uj");
    // As root a mode-000 file is still readable, so make the counter unreadable by any user: a
    // directory where the file should be (open+read fails like an access error does).
    std::fs::remove_file(&counter).unwrap();
    std::fs::create_dir(&counter).unwrap();
    let mut src = RaplSource::open(tmp.path()).unwrap();
    let err = src.read_joules().unwrap_err();
    assert!(matches!(err, EnergyError::Unreadable(_)), "{err}");
    assert!(err.to_string().contains("intel-rapl:0/energy_uj"), "{err}");
    // probe() reports it as unavailable with that reason instead of failing.
    let cfg = EnergyConfig {
        sysfs_root: tmp.path().to_path_buf(),
        ..Default::default()
    };
    let rapl = probe(&cfg)
        .into_iter()
        .find(|p| p.kind == SourceKind::Rapl)
        .unwrap();
    assert!(!rapl.available);
    assert!(rapl.reason.unwrap().contains("energy_uj"));
}

#[test]
fn probe_on_this_machine_falls_back_to_the_estimate() {
    // An empty sysfs root: no RAPL, no Jetson rails. NVML is absent without an NVIDIA driver.
    let empty = tempfile::tempdir().unwrap();
    let cfg = EnergyConfig {
        sysfs_root: empty.path().to_path_buf(),
        ..Default::default()
    };
    let results = probe(&cfg);
    assert_eq!(results.len(), 4);
    for r in &results {
        if !r.available {
            assert!(r.reason.as_deref().is_some_and(|s| !s.is_empty()), "{r:?}");
        }
    }
    let est = results
        .iter()
        .find(|r| r.kind == SourceKind::Estimate)
        .unwrap();
    assert!(est.available);
    let sources = open_sources(&cfg).unwrap();
    let kinds: Vec<SourceKind> = sources.iter().map(|s| s.kind()).collect();
    if !results
        .iter()
        .any(|r| r.kind == SourceKind::Nvml && r.available)
    {
        assert_eq!(kinds, [SourceKind::Estimate]);
    }
}

#[test]
fn explicit_sources_must_exist() {
    let empty = tempfile::tempdir().unwrap();
    let cfg = EnergyConfig {
        sources: vec!["rapl".into()],
        sysfs_root: empty.path().to_path_buf(),
        ..Default::default()
    };
    let err = open_sources(&cfg).err().expect("rapl is absent");
    assert!(matches!(err, EnergyError::Absent(_)), "{err}");
    let bad = EnergyConfig {
        sources: vec!["battery".into()],
        ..Default::default()
    };
    assert!(open_sources(&bad).is_err());
}

#[test]
fn meter_charges_busy_work_to_requests_and_the_rest_to_idle() {
    let empty = tempfile::tempdir().unwrap();
    let cfg = EnergyConfig {
        sources: vec!["estimate".into()],
        sysfs_root: empty.path().to_path_buf(),
        ..Default::default()
    };
    let meter = EnergyMeter::start(open_sources(&cfg).unwrap(), 50.0).unwrap();
    assert_eq!(meter.source_label(), "estimate");
    std::thread::sleep(std::time::Duration::from_millis(100));
    let acct = meter.begin();
    // Real CPU work for ~200 ms.
    let t = std::time::Instant::now();
    let mut x = 0u64;
    while t.elapsed() < std::time::Duration::from_millis(200) {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
    }
    std::hint::black_box(x);
    let e = meter.end(acct);
    assert_eq!(e.source, "estimate");
    // At least idle power over 200 ms; at most full package power over a generous window.
    assert!(e.joules >= cfg.idle_watts * 0.2 * 0.9, "{e:?}");
    assert!(e.joules <= cfg.package_watts * 1.0, "{e:?}");
    meter.sample_now();
    let t = meter.totals();
    assert!(t.idle_joules > 0.0);
    assert!((t.attributed_joules + t.idle_joules - t.measured_joules).abs() < 1e-9);
}
