//! Device and network profiles: what one local call and one cloud call cost, from the
//! published numbers the TMO authors use.
//!
//! Local: a 3.8e9-parameter model generating with `2·N/L_base · L_total` FLOPs (L_base 1024,
//! L_total 2048) at the device's peak throughput; energy = peak power × time, priced at
//! 16.68 ¢/kWh. Cloud: measured end-to-end latency and price per number of uploaded views,
//! per network.

use super::{Action, TmoError, VIEWS};

/// An edge device.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DeviceProfile {
    /// Short name used on command lines and in policy files.
    pub slug: &'static str,
    pub name: &'static str,
    /// Peak throughput, GFLOPS.
    pub gflops: f64,
    /// Peak power, W.
    pub watts: f64,
}

/// A network path to the cloud model.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NetworkProfile {
    pub slug: &'static str,
    pub name: &'static str,
    /// End-to-end latency (s) of a cloud call uploading k views, k = 0..=VIEWS.
    pub latency_s: [f64; VIEWS + 1],
    /// Price ($) of a cloud call uploading k views.
    pub cost_usd: [f64; VIEWS + 1],
}

#[rustfmt::skip]
pub const DEVICES: [DeviceProfile; 8] = [
    DeviceProfile { slug: "rpi-4b", name: "Raspberry Pi 4B", gflops: 13.5, watts: 8.0 },
    DeviceProfile { slug: "rpi-5", name: "Raspberry Pi 5", gflops: 31.4, watts: 12.0 },
    DeviceProfile { slug: "jetson-nano", name: "Jetson Nano", gflops: 472.0, watts: 10.0 },
    DeviceProfile { slug: "jetson-tx2", name: "Jetson TX2", gflops: 1.33e3, watts: 15.0 },
    DeviceProfile { slug: "jetson-xavier-nx", name: "Jetson Xavier NX", gflops: 21e3, watts: 20.0 },
    DeviceProfile { slug: "jetson-orin-nx", name: "Jetson Orin NX", gflops: 100e3, watts: 25.0 },
    DeviceProfile { slug: "jetson-agx-orin", name: "Jetson AGX Orin", gflops: 275e3, watts: 60.0 },
    DeviceProfile { slug: "iphone-15-pro", name: "iPhone 15 Pro", gflops: 35e3, watts: 15.0 },
];

/// Cloud prices do not depend on the network.
const CLOUD_USD: [f64; VIEWS + 1] = [0.00049, 0.00500, 0.00945, 0.01368];

#[rustfmt::skip]
pub const NETWORKS: [NetworkProfile; 4] = [
    NetworkProfile { slug: "wired", name: "Wired", latency_s: [6.46030, 4.76134, 6.24569, 6.98211], cost_usd: CLOUD_USD },
    NetworkProfile { slug: "wifi", name: "WiFi", latency_s: [0.5, 1.898, 2.016, 2.238], cost_usd: CLOUD_USD },
    NetworkProfile { slug: "5g", name: "5G", latency_s: [0.5, 6.037, 6.412, 7.118], cost_usd: CLOUD_USD },
    NetworkProfile { slug: "4g", name: "4G", latency_s: [0.5, 16.603, 17.636, 19.573], cost_usd: CLOUD_USD },
];

/// The authors' defaults.
pub const DEFAULT_DEVICE: &str = "jetson-tx2";
pub const DEFAULT_NETWORK: &str = "wired";

const PARAMS: f64 = 3.8e9;
const L_BASE: f64 = 1024.0;
const L_TOTAL: f64 = 2048.0;
/// Electricity price of the profiles' local calls (the authors' 16.68 ¢/kWh).
pub const CENTS_PER_KWH: f64 = 16.68;

fn norm(s: &str) -> String {
    s.chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .flat_map(|c| c.to_lowercase())
        .collect()
}

/// The entry of `table` whose slug or name is `name` (case, spaces and dashes ignored).
fn by_name<P: Copy>(
    what: &str,
    table: &[P],
    names: impl Fn(&P) -> (&'static str, &'static str),
    name: &str,
) -> Result<P, TmoError> {
    table
        .iter()
        .find(|p| {
            let (slug, long) = names(p);
            norm(slug) == norm(name) || norm(long) == norm(name)
        })
        .copied()
        .ok_or_else(|| {
            let known: Vec<_> = table.iter().map(|p| names(p).0).collect();
            TmoError::Invalid(format!(
                "unknown {what} `{name}` (known: {})",
                known.join(", ")
            ))
        })
}

/// A device by slug or name (case, spaces and dashes ignored).
pub fn device(name: &str) -> Result<DeviceProfile, TmoError> {
    by_name("device", &DEVICES, |d| (d.slug, d.name), name)
}

/// A network by slug or name.
pub fn network(name: &str) -> Result<NetworkProfile, TmoError> {
    by_name("network", &NETWORKS, |n| (n.slug, n.name), name)
}

/// Call kinds: local, and cloud with 0..=[`VIEWS`] views (a call's latency and price depend on
/// nothing else).
pub const CALL_KINDS: usize = VIEWS + 2;

/// Seconds and dollars one call of each kind costs: a profile's figures, or live estimates
/// ([`super::live::LiveCosts`]). The budget mask judges the next call by these.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CallPrices {
    /// By kind ([`CallPrices::kind`]).
    pub latency_s: [f64; CALL_KINDS],
    pub usd: [f64; CALL_KINDS],
}

impl CallPrices {
    /// The kind of `a`: 0 local, 1 + views sent for the cloud.
    pub fn kind(a: Action) -> usize {
        if a.is_local() {
            0
        } else {
            1 + a.views_sent()
        }
    }

    /// Seconds one call of `a` takes.
    pub fn latency_s(&self, a: Action) -> f64 {
        self.latency_s[Self::kind(a)]
    }

    /// Dollars one call of `a` costs.
    pub fn usd(&self, a: Action) -> f64 {
        self.usd[Self::kind(a)]
    }
}

/// Latency and price of every action on one device and network, and their min-max
/// normalisation over the five call kinds (local, cloud with 0..=3 views).
#[derive(Debug, Clone, PartialEq)]
pub struct CostModel {
    pub device: DeviceProfile,
    pub network: NetworkProfile,
    /// Local call: seconds and dollars.
    pub local_s: f64,
    pub local_usd: f64,
}

impl CostModel {
    pub fn new(device: DeviceProfile, network: NetworkProfile) -> Self {
        let flops = 2.0 * PARAMS / L_BASE * L_TOTAL;
        let local_s = flops / (device.gflops * 1e9);
        let joules = device.watts * local_s;
        let usd_per_joule = CENTS_PER_KWH / 100.0 / 3.6e6;
        CostModel {
            device,
            network,
            local_s,
            local_usd: joules * usd_per_joule,
        }
    }

    /// By profile names.
    pub fn by_name(device_name: &str, network_name: &str) -> Result<Self, TmoError> {
        Ok(Self::new(device(device_name)?, network(network_name)?))
    }

    /// The authors' default: Jetson TX2 and a wired network.
    pub fn reference() -> Self {
        Self::by_name(DEFAULT_DEVICE, DEFAULT_NETWORK).expect("built-in profiles")
    }

    /// [local, cloud+0, .., cloud+VIEWS] latencies.
    fn kinds_s(&self) -> [f64; CALL_KINDS] {
        let mut k = [self.local_s; CALL_KINDS];
        k[1..].copy_from_slice(&self.network.latency_s);
        k
    }

    fn kinds_usd(&self) -> [f64; CALL_KINDS] {
        let mut k = [self.local_usd; CALL_KINDS];
        k[1..].copy_from_slice(&self.network.cost_usd);
        k
    }

    fn kind(a: Action) -> usize {
        CallPrices::kind(a)
    }

    /// The profile's price of every call kind.
    pub fn prices(&self) -> CallPrices {
        CallPrices {
            latency_s: self.kinds_s(),
            usd: self.kinds_usd(),
        }
    }

    /// Seconds one call of `a` takes.
    pub fn latency_s(&self, a: Action) -> f64 {
        self.kinds_s()[Self::kind(a)]
    }

    /// Dollars one call of `a` costs.
    pub fn cost_usd(&self, a: Action) -> f64 {
        self.kinds_usd()[Self::kind(a)]
    }

    /// `a`'s latency min-max normalised over the call kinds, in [0, 1].
    pub fn latency_norm(&self, a: Action) -> f64 {
        minmax(&self.kinds_s(), Self::kind(a))
    }

    /// `a`'s price min-max normalised over the call kinds, in [0, 1].
    pub fn cost_norm(&self, a: Action) -> f64 {
        minmax(&self.kinds_usd(), Self::kind(a))
    }

    /// The most expensive call (all views) in seconds and dollars.
    pub fn max_call(&self) -> (f64, f64) {
        let s = self.kinds_s().iter().cloned().fold(f64::MIN, f64::max);
        let u = self.kinds_usd().iter().cloned().fold(f64::MIN, f64::max);
        (s, u)
    }
}

fn minmax(v: &[f64], i: usize) -> f64 {
    let lo = v.iter().cloned().fold(f64::INFINITY, f64::min);
    let hi = v.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    if hi > lo {
        (v[i] - lo) / (hi - lo)
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tx2_local_call_matches_the_published_estimate() {
        let c = CostModel::reference();
        // 2·3.8e9/1024·2048 = 1.52e10 FLOPs at 1.33 TFLOPS ≈ 0.0114 s; × 15 W ≈ 0.171 J ≈ 7.9e-9 $.
        assert!((c.local_s - 0.011_428).abs() < 1e-5, "{}", c.local_s);
        assert!((c.local_usd - 7.94e-9).abs() < 1e-10, "{}", c.local_usd);
    }

    #[test]
    fn normalised_costs_span_zero_to_one() {
        for d in DEVICES {
            for n in NETWORKS {
                let c = CostModel::new(d, n);
                let norms: Vec<f64> = Action::all().map(|a| c.latency_norm(a)).collect();
                assert!(norms.iter().all(|x| (0.0..=1.0).contains(x)));
                assert!(norms.contains(&0.0) && norms.contains(&1.0));
                assert_eq!(c.cost_norm(Action::LOCAL), 0.0);
                assert_eq!(c.cost_norm(Action::cloud(0b111)), 1.0);
            }
        }
        // Wired: text-only cloud is slower than one view (the published measurement).
        let c = CostModel::reference();
        assert!(c.latency_s(Action::cloud(0)) > c.latency_s(Action::cloud(0b001)));
    }

    #[test]
    fn profiles_by_name() {
        assert_eq!(device("Jetson TX2").unwrap().slug, "jetson-tx2");
        assert_eq!(device("jetson_tx2").unwrap().slug, "jetson-tx2");
        assert_eq!(network("WiFi").unwrap().slug, "wifi");
        let e = device("cray-1").unwrap_err().to_string();
        assert!(
            e.contains("unknown device") && e.contains("jetson-nano"),
            "{e}"
        );
        assert!(network("carrier-pigeon").is_err());
    }
}
