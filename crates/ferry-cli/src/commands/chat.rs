//! `ferry chat` and `ferry status`: talk to a running ferryd over gRPC.

use std::io::Write;

use anyhow::bail;
use clap::Args;
use futures::StreamExt;

use ferry_cli::client;
use ferry_proto::v1 as pb;

#[derive(Args)]
pub(crate) struct ChatArgs {
    /// The user message.
    pub(crate) prompt: String,
    /// ferryd address: host:port, http://host:port or unix:/path.
    #[arg(long, env = "FERRY_ADDR", default_value = "127.0.0.1:50051")]
    pub(crate) addr: String,
    /// Model id, or auto.
    #[arg(long, default_value = "auto")]
    pub(crate) model: String,
    /// Optional system message.
    #[arg(long)]
    pub(crate) system: Option<String>,
    #[arg(long)]
    pub(crate) max_tokens: Option<u32>,
    /// 0 = greedy.
    #[arg(long)]
    pub(crate) temperature: Option<f32>,
    #[arg(long)]
    pub(crate) top_p: Option<f32>,
    #[arg(long)]
    pub(crate) top_k: Option<u32>,
    #[arg(long)]
    pub(crate) seed: Option<u64>,
    /// Stop string (repeatable).
    #[arg(long)]
    pub(crate) stop: Vec<String>,
    /// Print the final accounting as JSON on stdout after the text.
    #[arg(long)]
    pub(crate) json: bool,
}

pub(crate) async fn chat(args: ChatArgs, token: Option<String>) -> anyhow::Result<()> {
    let mut c = client::inference_with_token(&args.addr, token.as_deref()).await?;
    let text = |role: pb::Role, t: &str| pb::Message {
        role: role as i32,
        parts: vec![pb::ContentPart {
            kind: Some(pb::content_part::Kind::Text(t.to_string())),
        }],
    };
    let mut messages = Vec::new();
    if let Some(s) = &args.system {
        messages.push(text(pb::Role::System, s));
    }
    messages.push(text(pb::Role::User, &args.prompt));
    let req = pb::GenerateRequest {
        model: args.model.clone(),
        messages,
        max_tokens: args.max_tokens,
        temperature: args.temperature,
        top_p: args.top_p,
        top_k: args.top_k,
        seed: args.seed,
        stop: args.stop.clone(),
        ..Default::default()
    };
    let mut stream = c.generate(req).await.map_err(status_err)?.into_inner();
    let mut out = std::io::stdout();
    let mut completion = None;
    while let Some(msg) = stream.next().await {
        match msg.map_err(status_err)?.event {
            Some(pb::generate_response::Event::Delta(d)) => {
                out.write_all(d.text.as_bytes())?;
                out.flush()?;
            }
            Some(pb::generate_response::Event::Completion(c)) => completion = Some(c),
            None => {}
        }
    }
    writeln!(out)?;
    let Some(c) = completion else {
        bail!("the stream ended without a completion");
    };
    let usage = c.usage.unwrap_or_default();
    let lat = c.latency.unwrap_or_default();
    if args.json {
        let v = serde_json::json!({
            "request_id": c.request_id,
            "model": c.model,
            "tier": pb::Tier::try_from(c.tier).map(|t| t.as_str_name()).unwrap_or("?"),
            "finish_reason": pb::FinishReason::try_from(c.finish_reason).map(|f| f.as_str_name()).unwrap_or("?"),
            "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens,
            "time_to_first_token_ms": lat.time_to_first_token_ms,
            "total_ms": lat.total_ms,
            "energy": c.energy.map(|e| serde_json::json!({"joules": e.joules, "source": e.source})),
            "placement": c.placement.map(|p| serde_json::json!({"fallback": p.fallback, "reason": p.reason})),
        });
        println!("{v}");
    } else {
        let tier = pb::Tier::try_from(c.tier)
            .map(|t| t.as_str_name().trim_start_matches("TIER_").to_lowercase())
            .unwrap_or_default();
        let fallback = c
            .placement
            .as_ref()
            .filter(|p| p.fallback)
            .map(|p| format!(" · fallback: {}", p.reason))
            .unwrap_or_default();
        eprintln!(
            "[{} ({tier}) · {} prompt + {} completion tokens · first token {:.0} ms · total {:.0} ms · {}{fallback}]",
            c.model,
            usage.prompt_tokens,
            usage.completion_tokens,
            lat.time_to_first_token_ms,
            lat.total_ms,
            pb::FinishReason::try_from(c.finish_reason)
                .map(|f| f
                    .as_str_name()
                    .trim_start_matches("FINISH_REASON_")
                    .to_lowercase())
                .unwrap_or_default()
        );
    }
    Ok(())
}

pub(crate) async fn status(addr: String, json: bool, token: Option<String>) -> anyhow::Result<()> {
    let mut c = client::inference_with_token(&addr, token.as_deref()).await?;
    let s = c
        .status(pb::StatusRequest {})
        .await
        .map_err(status_err)?
        .into_inner();
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&ferry_cli::status::to_json(&s))?
        );
    } else {
        print!("{}", ferry_cli::status::render(&s));
    }
    Ok(())
}

pub(crate) fn status_err(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("ferryd answered {:?}: {}", s.code(), s.message())
}
