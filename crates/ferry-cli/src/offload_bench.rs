//! `ferry bench offload`: what ferryd adds to a request it offloads to ferry-cloud.
//!
//! Starts the real `ferry-cloud` and `ferryd` binaries (from the directory of this `ferry`, or
//! the given paths) on loopback ports, with the bundled SmolLM2 as the cloud model, and measures
//! in the same run:
//! - **added latency**: one request at a time, alternating ferryd → ferry-cloud and a direct call
//!   to ferry-cloud, time from sending to the completion, p50/p99 of each and their difference.
//!   Both use one request id that ferry-cloud already answered, so ferry-cloud replays the stored
//!   answer and the model's speed does not drown the difference: what remains is ferryd's work
//!   (validation, placement, endpoint choice) and its second gRPC hop.
//! - **streams per second** with `concurrency` streams in flight, through ferryd and directly.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use tonic::transport::Channel;

use ferry_proto::v1 as pb;
use pb::offload_client::OffloadClient;

use ferry_lab::bench::percentile;

/// Settings of `ferry bench offload`.
#[derive(Debug, Clone)]
pub struct OffloadBenchOptions {
    /// Directory of model manifests and of model files.
    pub manifest_dir: PathBuf,
    pub model_dir: PathBuf,
    /// The local (and cloud) model manifest.
    pub model: String,
    /// Sequential requests per path for the latency figures.
    pub requests: usize,
    /// Streams in flight for the throughput figures, and seconds each path is loaded.
    pub concurrency: usize,
    pub seconds: f64,
    /// The binaries; unset: next to the running `ferry`.
    pub ferryd: Option<PathBuf>,
    pub ferry_cloud: Option<PathBuf>,
}

/// Latency of one path, milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct PathLatency {
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub mean_ms: f64,
}

/// `ferry bench offload` figures.
#[derive(Debug, Clone, Serialize)]
pub struct OffloadBench {
    pub requests: usize,
    pub direct: PathLatency,
    pub via_ferryd: PathLatency,
    pub added_p50_ms: f64,
    pub added_p99_ms: f64,
    pub concurrency: usize,
    pub direct_streams_per_s: f64,
    pub via_ferryd_streams_per_s: f64,
    pub errors: u64,
}

/// A child process killed on drop.
pub(crate) struct Daemon(pub(crate) Child, pub(crate) &'static str);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub(crate) fn sibling(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the ferry binary")?;
    let p = exe.with_file_name(name);
    if !p.is_file() {
        bail!(
            "{} not found next to {}; build it (`cargo build --release --workspace --bins`) or pass --{name}",
            p.display(),
            exe.display()
        );
    }
    Ok(p)
}

/// Starts a daemon binary on `cfg` (warnings only on stderr); killed when the result drops.
pub(crate) fn spawn(bin: &Path, cfg: &Path, name: &'static str) -> Result<Daemon> {
    let child = Command::new(bin)
        .arg("--config")
        .arg(cfg)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    Ok(Daemon(child, name))
}

pub(crate) fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

pub(crate) fn abs(p: &Path) -> Result<PathBuf> {
    std::path::absolute(p).with_context(|| format!("resolving {}", p.display()))
}

const CLOUD_MODEL: &str = "bench-cloud";
const QUESTION: &str = "Name three colours of the rainbow.";

/// Runs the benchmark.
pub async fn run(opts: &OffloadBenchOptions) -> Result<OffloadBench> {
    let dir = tempfile::tempdir().context("temporary directory")?;
    let cloud_port = free_port()?;
    let edge_port = free_port()?;
    let manifests = abs(&opts.manifest_dir)?;
    let models = abs(&opts.model_dir)?;
    let cloud_cfg = format!(
        "[server]\nlisten = \"127.0.0.1:{cloud_port}\"\nhttp_enabled = false\nmax_concurrent = 4\nmax_queue = 1024\n\
         [candle]\nmanifest_dir = {manifests:?}\nmodel_dir = {models:?}\n\
         [energy]\nsources = [\"estimate\"]\n\
         [[models]]\nid = \"{CLOUD_MODEL}\"\nbackend = \"candle\"\nmanifest = \"{}\"\n",
        opts.model
    );
    let edge_cfg = format!(
        "[server]\ngrpc_addr = \"127.0.0.1:{edge_port}\"\nhttp_enabled = false\n\
         [models]\nmanifest_dir = {manifests:?}\nmodel_dir = {models:?}\nload = [\"{m}\"]\ndefault = \"{m}\"\n\
         [state]\ndir = {state:?}\n\
         [energy]\nsources = [\"estimate\"]\n\
         [cloud]\nendpoints = [\"http://127.0.0.1:{cloud_port}\"]\nhealth_interval_ms = 500\n",
        m = opts.model,
        state = dir.path().join("state"),
    );
    let cloud_path = dir.path().join("cloud.toml");
    let edge_path = dir.path().join("edge.toml");
    std::fs::write(&cloud_path, cloud_cfg)?;
    std::fs::write(&edge_path, edge_cfg)?;
    let cloud_bin = match &opts.ferry_cloud {
        Some(p) => p.clone(),
        None => sibling("ferry-cloud")?,
    };
    let edge_bin = match &opts.ferryd {
        Some(p) => p.clone(),
        None => sibling("ferryd")?,
    };
    let mut cloud_proc = spawn(&cloud_bin, &cloud_path, "ferry-cloud")?;
    let mut edge_proc = spawn(&edge_bin, &edge_path, "ferryd")?;

    let cloud_addr = format!("http://127.0.0.1:{cloud_port}");
    let edge_addr = format!("http://127.0.0.1:{edge_port}");
    let started = Instant::now();
    let (mut direct, mut edge) = loop {
        for d in [&mut cloud_proc, &mut edge_proc] {
            if let Some(status) = d.0.try_wait()? {
                bail!("{} exited while starting: {status}", d.1);
            }
        }
        if started.elapsed() > Duration::from_secs(120) {
            bail!("ferry-cloud and ferryd were not ready within 120 s");
        }
        if let (Ok(c), Ok(e)) = (
            OffloadClient::connect(cloud_addr.clone()).await,
            crate::client::inference(&edge_addr).await,
        ) {
            let mut e = e;
            let listed = e
                .list_models(pb::ListModelsRequest {})
                .await
                .map(|r| r.into_inner().models.iter().any(|m| m.id == CLOUD_MODEL))
                .unwrap_or(false);
            if listed {
                break (c, e);
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };

    // One real generation; from then on ferry-cloud replays it for this request id.
    let id = "bench-offload";
    let first = offload_request(id);
    drain_direct(&mut direct, first)
        .await
        .context("the warm-up generation on ferry-cloud")?;
    for _ in 0..20 {
        drain_direct(&mut direct, offload_request(id)).await?;
        drain_edge(&mut edge, edge_request(id)).await?;
    }

    let mut d_ms = Vec::with_capacity(opts.requests);
    let mut e_ms = Vec::with_capacity(opts.requests);
    for _ in 0..opts.requests {
        let t = Instant::now();
        drain_direct(&mut direct, offload_request(id)).await?;
        d_ms.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        drain_edge(&mut edge, edge_request(id)).await?;
        e_ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let direct_lat = latency(&mut d_ms);
    let edge_lat = latency(&mut e_ms);

    let errors = Arc::new(AtomicU64::new(0));
    let seconds = Duration::from_secs_f64(opts.seconds);
    let direct_rate = load(
        opts.concurrency,
        seconds,
        &errors,
        direct.clone(),
        move |mut c| async move { drain_direct(&mut c, offload_request(id)).await },
    )
    .await;
    let edge_rate = load(
        opts.concurrency,
        seconds,
        &errors,
        edge.clone(),
        move |mut c| async move { drain_edge(&mut c, edge_request(id)).await },
    )
    .await;
    drop(edge_proc);
    drop(cloud_proc);
    Ok(OffloadBench {
        requests: opts.requests,
        added_p50_ms: edge_lat.p50_ms - direct_lat.p50_ms,
        added_p99_ms: edge_lat.p99_ms - direct_lat.p99_ms,
        direct: direct_lat,
        via_ferryd: edge_lat,
        concurrency: opts.concurrency,
        direct_streams_per_s: direct_rate,
        via_ferryd_streams_per_s: edge_rate,
        errors: errors.load(Ordering::Relaxed),
    })
}

fn latency(ms: &mut [f64]) -> PathLatency {
    ms.sort_by(|a, b| a.total_cmp(b));
    PathLatency {
        p50_ms: percentile(ms, 0.5),
        p99_ms: percentile(ms, 0.99),
        mean_ms: ms.iter().sum::<f64>() / ms.len().max(1) as f64,
    }
}

/// Runs `concurrency` loops of `call` on clones of `client` for `dur`; completed calls per
/// second. A failed call counts in `errors` and as a call.
async fn load<C, F, Fut>(
    concurrency: usize,
    dur: Duration,
    errors: &Arc<AtomicU64>,
    client: C,
    call: F,
) -> f64
where
    C: Clone + Send + Sync + 'static,
    F: Fn(C) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<()>> + Send,
{
    let call = Arc::new(call);
    let done = Arc::new(AtomicU64::new(0));
    let until = Instant::now() + dur;
    let started = Instant::now();
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            let (call, done, errors, client) =
                (call.clone(), done.clone(), errors.clone(), client.clone());
            tokio::spawn(async move {
                while Instant::now() < until {
                    if call(client.clone()).await.is_err() {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for t in tasks {
        let _ = t.await;
    }
    done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64()
}

fn message() -> pb::Message {
    pb::Message {
        role: pb::Role::User as i32,
        parts: vec![pb::ContentPart {
            kind: Some(pb::content_part::Kind::Text(QUESTION.to_string())),
        }],
    }
}

fn offload_request(id: &str) -> pb::OffloadRequest {
    pb::OffloadRequest {
        request_id: id.to_string(),
        model: CLOUD_MODEL.to_string(),
        messages: vec![message()],
        max_tokens: Some(16),
        temperature: Some(0.0),
        ..Default::default()
    }
}

fn edge_request(id: &str) -> pb::GenerateRequest {
    pb::GenerateRequest {
        model: CLOUD_MODEL.to_string(),
        messages: vec![message()],
        max_tokens: Some(16),
        temperature: Some(0.0),
        request_id: id.to_string(),
        ..Default::default()
    }
}

async fn drain_direct(c: &mut OffloadClient<Channel>, r: pb::OffloadRequest) -> Result<()> {
    let mut s = c.generate(r).await?.into_inner();
    let mut done = false;
    while let Some(m) = s.message().await? {
        if let Some(pb::offload_response::Event::Completion(_)) = m.event {
            done = true;
        }
    }
    if !done {
        bail!("ferry-cloud's stream ended without a completion");
    }
    Ok(())
}

async fn drain_edge(c: &mut crate::client::Client, r: pb::GenerateRequest) -> Result<()> {
    let mut s = c.generate(r).await?.into_inner();
    let mut tier = None;
    while let Some(m) = s.message().await? {
        if let Some(pb::generate_response::Event::Completion(done)) = m.event {
            tier = Some(done.tier);
        }
    }
    if tier != Some(pb::Tier::Cloud as i32) {
        bail!("ferryd did not serve the request from the cloud tier (tier {tier:?})");
    }
    Ok(())
}

/// The figures as a table.
pub fn render(b: &OffloadBench) -> String {
    let mut o = String::new();
    o.push_str(&format!(
        "offload over loopback, {} sequential requests per path (ferry-cloud replays a stored answer)\n",
        b.requests
    ));
    o.push_str("| path | p50 ms | p99 ms | mean ms |\n|---|---|---|---|\n");
    for (name, l) in [
        ("app -> ferry-cloud (direct)", &b.direct),
        ("app -> ferryd -> ferry-cloud", &b.via_ferryd),
    ] {
        o.push_str(&format!(
            "| {name} | {:.3} | {:.3} | {:.3} |\n",
            l.p50_ms, l.p99_ms, l.mean_ms
        ));
    }
    o.push_str(&format!(
        "| added by ferryd | {:.3} | {:.3} | |\n",
        b.added_p50_ms, b.added_p99_ms
    ));
    o.push_str(&format!(
        "\n{} concurrent streams: {:.0} streams/s direct, {:.0} streams/s through ferryd ({} errors)\n",
        b.concurrency, b.direct_streams_per_s, b.via_ferryd_streams_per_s, b.errors
    ));
    o
}
