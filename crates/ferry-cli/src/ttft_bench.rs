//! `ferry bench ttft`: time to first token as an app sees it, beside llama.cpp's.
//!
//! Starts the real `ferryd` (from the directory of this `ferry`, or a given path) on loopback
//! with the local zoo loaded and mixrank routing `auto`, waits for `/readyz`, and streams one short
//! chat question over the OpenAI-compatible API, `requests` times per target (`auto` first, so the
//! very first request after start is an `auto` one, routing included), timing from sending the
//! request to the first SSE chunk that carries content. It reports each target's first request,
//! p50, min and max, and ferryd's resident memory after loading and after the requests. In the
//! same run the peer, llama.cpp through llama-cpp-python (`bench/llama_cpp_ttft.py`), streams the
//! same question with the same GGUF's chat template in-process (no HTTP, no routing: it pays less
//! than an app talking to ferryd does).

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::offload_bench::{abs, free_port, sibling, spawn};

/// The question: short, with a checkable answer, the kind an app's chat sends.
pub const QUESTION: &str = "What is the capital of France?";

/// Settings of `ferry bench ttft`.
#[derive(Debug, Clone)]
pub struct TtftBenchOptions {
    pub manifest_dir: PathBuf,
    pub model_dir: PathBuf,
    /// Models ferryd loads (its local zoo, which `auto` routes among).
    pub load: Vec<String>,
    /// What the requests name, in order (`auto` or a loaded model).
    pub targets: Vec<String>,
    /// Requests per target.
    pub requests: usize,
    /// Generated tokens per request.
    pub max_tokens: usize,
    pub ferryd: Option<PathBuf>,
    /// The peer: llama.cpp on this model's GGUF, or none (`--no-peer`).
    pub peer: Option<PeerOptions>,
}

/// How to run the llama.cpp peer.
#[derive(Debug, Clone)]
pub struct PeerOptions {
    pub python: PathBuf,
    pub script: PathBuf,
    /// The GGUF the peer loads (the first named model's).
    pub gguf: PathBuf,
    pub model: String,
    pub threads: usize,
}

/// One target's times to first token, milliseconds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TtftRow {
    pub target: String,
    pub requests: usize,
    pub first_ms: f64,
    pub p50_ms: f64,
    pub min_ms: f64,
    pub max_ms: f64,
}

/// The peer's row, as `bench/llama_cpp_ttft.py --json` prints it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PeerTtft {
    pub engine: String,
    pub version: Option<String>,
    pub model: String,
    pub requests: usize,
    pub first_ms: f64,
    pub p50_ms: f64,
    pub min_ms: f64,
    pub max_ms: f64,
}

/// `ferry bench ttft` figures.
#[derive(Debug, Clone, Serialize)]
pub struct TtftBench {
    pub question: &'static str,
    pub max_tokens: usize,
    pub loaded: Vec<String>,
    pub rows: Vec<TtftRow>,
    /// ferryd's resident set (`VmRSS`) after loading and after the requests, MB (Linux).
    pub rss_loaded_mb: Option<f64>,
    pub rss_after_mb: Option<f64>,
    /// Seconds from spawning ferryd to `/readyz` answering 200.
    pub ready_s: f64,
    /// The peer's row; `None` with `--no-peer` or when it failed.
    pub peer: Option<PeerTtft>,
    /// Why the peer did not run (the command then fails after printing ferryd's rows).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer_error: Option<String>,
}

/// One HTTP/1.1 exchange on loopback (`Connection: close`): the status code, and the time at
/// which `until` first held for the bytes received so far (from sending), if it ever did.
async fn exchange(
    port: u16,
    request: &str,
    until: impl Fn(&[u8]) -> bool,
) -> Result<(u16, Option<Duration>, Vec<u8>)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await?;
    s.set_nodelay(true)?;
    let t = Instant::now();
    s.write_all(request.as_bytes()).await?;
    let mut got = Vec::new();
    let mut at = None;
    let mut buf = [0u8; 8192];
    loop {
        let n = s.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
        if at.is_none() && until(&got) {
            at = Some(t.elapsed());
        }
    }
    let status = std::str::from_utf8(&got[..got.len().min(16)])
        .ok()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok((status, at, got))
}

/// Whether an SSE body holds a chunk with non-empty `content` (the first token's text; a
/// role-only first delta does not count).
pub fn has_content(body: &[u8]) -> bool {
    const KEY: &[u8] = b"\"content\":\"";
    body.windows(KEY.len())
        .enumerate()
        .any(|(i, w)| w == KEY && body.get(i + KEY.len()).is_some_and(|&c| c != b'"'))
}

fn chat_request(model: &str, max_tokens: usize) -> String {
    let body = serde_json::json!({
        "model": model,
        "stream": true,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "messages": [{"role": "user", "content": QUESTION}],
    })
    .to_string();
    format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// One streamed chat request; milliseconds to its first content.
async fn first_token_ms(port: u16, model: &str, max_tokens: usize) -> Result<f64> {
    let (status, at, body) = exchange(port, &chat_request(model, max_tokens), has_content).await?;
    if status != 200 {
        bail!(
            "{model}: HTTP {status}: {}",
            String::from_utf8_lossy(&body[..body.len().min(400)])
        );
    }
    let at = at.with_context(|| format!("{model}: the stream carried no content"))?;
    Ok(at.as_secs_f64() * 1e3)
}

/// `VmRSS` of a process, MB.
fn rss_mb(pid: u32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: f64 = s
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

/// Runs llama.cpp's side; any way it fails is an error naming what installs it.
pub fn run_peer(p: &PeerOptions, requests: usize, max_tokens: usize) -> Result<PeerTtft> {
    let mut cmd = Command::new(&p.python);
    cmd.arg(&p.script)
        .arg("--model")
        .arg(&p.gguf)
        .args(["--question", QUESTION])
        .args(["--requests", &requests.to_string()])
        .args(["--max-tokens", &max_tokens.to_string()])
        .args(["--threads", &p.threads.to_string()])
        .arg("--json");
    let mut row: PeerTtft =
        ferry_lab::bench::run_peer(cmd, "llama.cpp peer", "scripts/setup-bench-peer")?;
    row.model = p.model.clone();
    Ok(row)
}

fn summary(target: &str, ms: &[f64]) -> TtftRow {
    let mut sorted = ms.to_vec();
    sorted.sort_by(f64::total_cmp);
    TtftRow {
        target: target.to_string(),
        requests: ms.len(),
        first_ms: ms.first().copied().unwrap_or(f64::NAN),
        p50_ms: ferry_lab::bench::percentile(&sorted, 0.5),
        min_ms: sorted.first().copied().unwrap_or(f64::NAN),
        max_ms: sorted.last().copied().unwrap_or(f64::NAN),
    }
}

/// Runs the benchmark: ferryd's side, then the peer's (never both at once, so neither slows the other).
pub async fn run(opts: &TtftBenchOptions) -> Result<TtftBench> {
    if opts.requests == 0 || opts.targets.is_empty() || opts.load.is_empty() {
        bail!("ferry bench ttft needs at least one request, one target and one model to load");
    }
    let dir = tempfile::tempdir().context("temporary directory")?;
    let (grpc_port, http_port) = (free_port()?, free_port()?);
    let load = opts
        .load
        .iter()
        .map(|m| format!("{m:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    let cfg = format!(
        "[server]\ngrpc_addr = \"127.0.0.1:{grpc_port}\"\nhttp_enabled = true\nhttp_addr = \"127.0.0.1:{http_port}\"\n\
         [models]\nmanifest_dir = {manifests:?}\nmodel_dir = {models:?}\nload = [{load}]\ndefault = {first:?}\n\
         [state]\ndir = {state:?}\n\
         [energy]\nsources = [\"estimate\"]\n\
         [router]\nenabled = true\npolicy = \"mixrank\"\n",
        manifests = abs(&opts.manifest_dir)?,
        models = abs(&opts.model_dir)?,
        first = opts.load[0],
        state = dir.path().join("state"),
    );
    let cfg_path = dir.path().join("ferryd.toml");
    std::fs::write(&cfg_path, cfg)?;
    let bin = match &opts.ferryd {
        Some(p) => p.clone(),
        None => sibling("ferryd")?,
    };
    let started = Instant::now();
    let mut daemon = spawn(&bin, &cfg_path, "ferryd")?;
    let ready = "GET /readyz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
    loop {
        if let Some(status) = daemon.0.try_wait()? {
            bail!("ferryd exited while starting: {status}");
        }
        if started.elapsed() > Duration::from_secs(300) {
            bail!("ferryd was not ready within 300 s");
        }
        if let Ok((200, _, _)) = exchange(http_port, ready, |_| false).await {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ready_s = started.elapsed().as_secs_f64();
    let pid = daemon.0.id();
    let rss_loaded_mb = rss_mb(pid);
    let mut rows = Vec::new();
    for target in &opts.targets {
        let mut ms = Vec::with_capacity(opts.requests);
        for _ in 0..opts.requests {
            ms.push(first_token_ms(http_port, target, opts.max_tokens).await?);
        }
        rows.push(summary(target, &ms));
    }
    let rss_after_mb = rss_mb(pid);
    drop(daemon);
    let (peer, peer_error) = match opts
        .peer
        .as_ref()
        .map(|p| run_peer(p, opts.requests, opts.max_tokens))
    {
        Some(Ok(p)) => (Some(p), None),
        Some(Err(e)) => (None, Some(format!("{e:#}"))),
        None => (None, None),
    };
    Ok(TtftBench {
        question: QUESTION,
        max_tokens: opts.max_tokens,
        loaded: opts.load.clone(),
        rows,
        rss_loaded_mb,
        rss_after_mb,
        ready_s,
        peer,
        peer_error,
    })
}

/// The Markdown table.
pub fn render(b: &TtftBench) -> String {
    let mut o = format!(
        "time to first token, {:?} streamed over the OpenAI API ({} tokens), ferryd loading {} (ready in {:.1} s)\n",
        b.question,
        b.max_tokens,
        b.loaded.join(", "),
        b.ready_s
    );
    o.push_str("| engine | model | requests | first ms | p50 ms | min ms | max ms |\n|---|---|---|---|---|---|---|\n");
    for r in &b.rows {
        o.push_str(&format!(
            "| ferryd (HTTP) | {} | {} | {:.1} | {:.1} | {:.1} | {:.1} |\n",
            r.target, r.requests, r.first_ms, r.p50_ms, r.min_ms, r.max_ms
        ));
    }
    match &b.peer {
        Some(p) => o.push_str(&format!(
            "| {} {} (in-process) | {} | {} | {:.1} | {:.1} | {:.1} | {:.1} |\n",
            p.engine,
            p.version.as_deref().unwrap_or(""),
            p.model,
            p.requests,
            p.first_ms,
            p.p50_ms,
            p.min_ms,
            p.max_ms
        )),
        None => match &b.peer_error {
            Some(why) => o.push_str(&format!("peer FAILED: {why}\n")),
            None => o.push_str("peer skipped (--no-peer): no comparison\n"),
        },
    }
    let mb = |v: Option<f64>| v.map_or("n/a".to_string(), |v| format!("{v:.0} MB"));
    o.push_str(&format!(
        "ferryd RSS: {} after loading, {} after the requests\n",
        mb(b.rss_loaded_mb),
        mb(b.rss_after_mb)
    ));
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_is_found_only_when_a_chunk_carries_text() {
        let role =
            b"data: {\"choices\":[{\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\n";
        assert!(!has_content(role));
        let text = b"data: {\"choices\":[{\"delta\":{\"content\":\"Paris\"}}]}\n\n";
        assert!(has_content(text));
        let mut both = role.to_vec();
        both.extend_from_slice(text);
        assert!(has_content(&both));
        assert!(!has_content(b""));
    }

    #[test]
    fn a_summary_keeps_the_first_request_apart_from_the_median() {
        let r = summary("auto", &[50.0, 20.0, 30.0, 10.0, 40.0]);
        assert_eq!(r.first_ms, 50.0);
        assert_eq!(r.p50_ms, 30.0);
        assert_eq!((r.min_ms, r.max_ms), (10.0, 50.0));
        assert_eq!(r.requests, 5);
    }
}
