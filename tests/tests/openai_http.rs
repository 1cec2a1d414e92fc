//! ferryd's HTTP surface with the real model: the official `openai` Python SDK against the
//! OpenAI-compatible API, the exact SSE framing on the wire, OpenAI-style error bodies, the
//! probes, and `/metrics` as Prometheus text whose counters move with traffic. One server per
//! test binary is enough: the Prometheus recorder is process-global.

use ferry_integration::{http, TestServer, DEFAULT_MODEL};

/// Parses Prometheus text: every non-comment line is `name{labels} value`; returns the samples.
fn prometheus_samples(text: &str) -> Vec<(String, f64)> {
    let mut out = Vec::new();
    for line in text.lines() {
        if line.is_empty() || line.starts_with('#') {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let kind = rest.split_whitespace().nth(1).unwrap_or("");
                assert!(
                    matches!(
                        kind,
                        "counter" | "gauge" | "histogram" | "summary" | "untyped"
                    ),
                    "bad TYPE line {line}"
                );
            }
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("series and value");
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line}"));
        let name = series.split('{').next().unwrap();
        assert!(
            name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "bad metric name in {line}"
        );
        assert!(name.starts_with("ferry_"), "unprefixed metric {name}");
        if let Some(labels) = series.strip_prefix(name) {
            assert!(
                labels.is_empty() || (labels.starts_with('{') && labels.ends_with('}')),
                "bad labels in {line}"
            );
        }
        out.push((series.to_string(), value));
    }
    out
}

fn sample(samples: &[(String, f64)], series: &str) -> f64 {
    samples
        .iter()
        .find(|(s, _)| s == series)
        .map(|(_, v)| *v)
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_sdk_sse_errors_probes_and_metrics() {
    let t = TestServer::start(|_| {}).await;
    let addr = t.server.http_addr.expect("HTTP enabled");

    let live = http(addr, "GET", "/healthz", None).await;
    assert_eq!(live.status, 200);
    let ready = http(addr, "GET", "/readyz", None).await;
    assert_eq!((ready.status, ready.body.trim()), (200, "ready"));

    let before = prometheus_samples(&http(addr, "GET", "/metrics", None).await.body);
    let ok_series =
        format!("ferry_requests_total{{tier=\"local\",model=\"{DEFAULT_MODEL}\",outcome=\"ok\"}}");

    // The official SDK, unmodified.
    ferry_integration::run_python_client(
        "openai_client.py",
        vec!["--base-url".into(), format!("http://{addr}/v1")],
        "python openai client: OK",
    )
    .await;

    // The wire format of a stream: data lines, the last chunk with finish_reason and the ferry
    // extension, then [DONE].
    let body = serde_json::json!({
        "model": DEFAULT_MODEL,
        "messages": [{"role": "user", "content": "Say hello."}],
        "max_tokens": 5, "temperature": 0, "stream": true
    })
    .to_string();
    let sse = http(addr, "POST", "/v1/chat/completions", Some(&body)).await;
    assert_eq!(sse.status, 200);
    assert!(sse
        .header("content-type")
        .is_some_and(|c| c.starts_with("text/event-stream")));
    assert!(sse.header("x-ferry-request-id").is_some());
    let events: Vec<&str> = sse
        .body
        .split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .map(|e| e.strip_prefix("data: ").expect("data event"))
        .collect();
    assert_eq!(*events.last().unwrap(), "[DONE]");
    let last: serde_json::Value = serde_json::from_str(events[events.len() - 2]).unwrap();
    assert_eq!(last["object"], "chat.completion.chunk");
    assert!(last["choices"][0]["finish_reason"].is_string());
    assert_eq!(last["ferry"]["tier"], "local");
    assert!(last["ferry"]["joules"].as_f64().unwrap() > 0.0);

    // Errors: OpenAI-shaped bodies with the mapped status.
    let bad = http(
        addr,
        "POST",
        "/v1/chat/completions",
        Some("{\"messages\": 3}"),
    )
    .await;
    assert_eq!(bad.status, 400);
    let v: serde_json::Value = serde_json::from_str(&bad.body).unwrap();
    assert_eq!(v["error"]["type"], "invalid_request_error");
    let empty = serde_json::json!({"messages": []}).to_string();
    let bad = http(addr, "POST", "/v1/chat/completions", Some(&empty)).await;
    assert_eq!(bad.status, 400);
    let v: serde_json::Value = serde_json::from_str(&bad.body).unwrap();
    assert_eq!(v["error"]["param"], "messages", "{v}");

    // Metrics moved: requests (SDK 2 non-streaming + 1 streaming on the named model, our raw
    // stream), tokens, rejections by reason, energy.
    let after = prometheus_samples(&http(addr, "GET", "/metrics", None).await.body);
    let served = sample(&after, &ok_series) - sample(&before, &ok_series);
    assert!(served >= 2.0, "ferry_requests_total moved by {served}");
    let tokens = format!("ferry_tokens_total{{model=\"{DEFAULT_MODEL}\",kind=\"completion\"}}");
    assert!(sample(&after, &tokens) > sample(&before, &tokens));
    assert!(
        sample(
            &after,
            "ferry_requests_rejected_total{reason=\"invalid_argument\"}"
        ) >= 2.0
    );
    assert!(after
        .iter()
        .any(|(s, v)| s.starts_with("ferry_request_duration_seconds_count") && *v >= 2.0));
    assert!(after
        .iter()
        .any(|(s, _)| s.starts_with("ferry_energy_joules{")));
    assert_eq!(sample(&after, "ferry_ready"), 1.0);

    t.server.shutdown(std::time::Duration::from_secs(5)).await;
}
