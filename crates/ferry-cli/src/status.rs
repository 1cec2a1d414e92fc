//! `ferry status`: how a running ferryd is doing, as a table for people or JSON for scripts —
//! readiness, models of both tiers, the admission queue, energy metering, the cloud endpoints
//! (health, circuit state, load), and each MESS+ router's SLA target, virtual queues, call mix
//! and satisfaction so far.

use std::fmt::Write;

use ferry_proto::v1 as pb;

fn tier_name(tier: i32) -> &'static str {
    match pb::Tier::try_from(tier) {
        Ok(pb::Tier::Local) => "local",
        Ok(pb::Tier::Cloud) => "cloud",
        _ => "unspecified",
    }
}

fn satisfaction(r: &pb::RouterStatus) -> Option<f64> {
    (r.feedback > 0).then(|| r.satisfied as f64 / r.feedback as f64)
}

/// The status as one JSON object (stable field names, for scripts).
pub fn to_json(s: &pb::StatusResponse) -> serde_json::Value {
    let energy = s.energy.clone().unwrap_or_default();
    serde_json::json!({
        "version": s.version,
        "ready": s.ready,
        "draining": s.draining,
        "uptime_s": s.uptime_s,
        "requests": {
            "completed": s.requests_completed,
            "failed": s.requests_failed,
            "rejected": s.requests_rejected,
        },
        "admission": {
            "running": s.running,
            "queued": s.queued,
            "max_concurrent": s.max_concurrent,
            "max_queue": s.max_queue,
        },
        "models": s.models.iter().map(|m| serde_json::json!({
            "id": m.id,
            "family": m.family,
            "tier": tier_name(m.tier),
            "loaded": m.loaded,
            "default": m.is_default,
        })).collect::<Vec<_>>(),
        "energy": {
            "source": energy.source,
            "devices": energy.devices,
            "measured_joules": energy.measured_joules,
            "attributed_joules": energy.attributed_joules,
            "idle_joules": energy.idle_joules,
        },
        "cloud_endpoints": s.cloud_endpoints.iter().map(|e| serde_json::json!({
            "uri": e.uri,
            "healthy": e.healthy,
            "circuit": e.circuit,
            "in_flight": e.in_flight,
            "models": e.models,
            "circuit_opened_total": e.circuit_opened_total,
            "last_error": (!e.last_error.is_empty()).then_some(&e.last_error),
        })).collect::<Vec<_>>(),
        "routers": s.routers.iter().map(|r| {
            let total: u64 = r.models.iter().map(|m| m.calls).sum();
            serde_json::json!({
                "tier": tier_name(r.tier),
                "policy": r.policy,
                "alpha": r.alpha,
                "v_per_joule": r.v_per_joule,
                "q": r.q,
                "q_tracked": r.q_tracked,
                "requests": r.requests,
                "explored": r.explored,
                "exploration_probability": r.exploration_probability,
                "debt": r.debt,
                "prior": (!r.prior.is_empty()).then_some(&r.prior),
                "feedback": r.feedback,
                "satisfied": r.satisfied,
                "satisfaction": satisfaction(r),
                "judge": (!r.judge_model.is_empty()).then(|| serde_json::json!({
                    "model": r.judge_model,
                    "verdicts": r.judge_verdicts,
                    "satisfied": r.judge_satisfied,
                })),
                "calls": r.models.iter().map(|m| (m.model.clone(), serde_json::json!({
                    "calls": m.calls,
                    "fraction": if total > 0 { m.calls as f64 / total as f64 } else { 0.0 },
                    "mean_joules": m.mean_joules,
                    "rate": m.rate,
                    "rate_low": m.rate_low,
                    "rate_high": m.rate_high,
                    "labels": m.labels,
                }))).collect::<serde_json::Map<_, _>>(),
                "state_file": r.state_file,
                "saved_unix_ms": (r.saved_unix_ms > 0).then_some(r.saved_unix_ms),
            })
        }).collect::<Vec<_>>(),
    })
}

/// The status as a short report for a terminal.
pub fn render(s: &pb::StatusResponse) -> String {
    let mut o = String::new();
    let state = match (s.ready, s.draining) {
        (_, true) => "draining",
        (true, false) => "ready",
        (false, false) => "starting",
    };
    let _ = writeln!(
        o,
        "ferryd {} — {state}, up {:.0} s; requests: {} completed, {} failed, {} rejected",
        s.version, s.uptime_s, s.requests_completed, s.requests_failed, s.requests_rejected
    );
    let _ = writeln!(
        o,
        "admission: {} running / {} max, {} queued / {} max",
        s.running, s.max_concurrent, s.queued, s.max_queue
    );
    if let Some(e) = &s.energy {
        let _ = writeln!(
            o,
            "energy: {} ({}): {:.1} J measured, {:.1} J attributed to requests, {:.1} J idle",
            e.source,
            if e.devices.is_empty() {
                "no devices".to_string()
            } else {
                e.devices.join(", ")
            },
            e.measured_joules,
            e.attributed_joules,
            e.idle_joules
        );
    }
    let _ = writeln!(o, "models:");
    for m in &s.models {
        let _ = writeln!(
            o,
            "  {:<28} {:<8} {:<6} {}{}",
            m.id,
            m.family,
            tier_name(m.tier),
            if m.loaded { "loaded" } else { "not loaded" },
            if m.is_default { ", default" } else { "" }
        );
    }
    if s.cloud_endpoints.is_empty() {
        let _ = writeln!(o, "cloud tier: not configured (every request runs locally)");
    }
    for e in &s.cloud_endpoints {
        let _ = writeln!(
            o,
            "cloud endpoint {}: {}, circuit {} (opened {} times), {} in flight, models [{}]{}",
            e.uri,
            if e.healthy { "healthy" } else { "UNHEALTHY" },
            e.circuit,
            e.circuit_opened_total,
            e.in_flight,
            e.models.join(", "),
            if e.last_error.is_empty() {
                String::new()
            } else {
                format!(" — last probe: {}", e.last_error)
            }
        );
    }
    if s.routers.is_empty() {
        let _ = writeln!(o, "routing: off (model auto uses the default model)");
    }
    for r in &s.routers {
        let sat = satisfaction(r)
            .map(|x| format!("{:.1} % of {} judged", 100.0 * x, r.feedback))
            .unwrap_or_else(|| "no feedback yet".to_string());
        if r.policy == "mixrank" {
            let _ = writeln!(
                o,
                "routing ({} tier): mixrank alpha {} — satisfaction {sat}; SLA debt {:.1} requests; {} requests, {} explored; prior: {}",
                tier_name(r.tier),
                r.alpha,
                r.debt,
                r.requests,
                r.explored,
                if r.prior.is_empty() { "none" } else { &r.prior }
            );
        } else {
            let _ = writeln!(
                o,
                "routing ({} tier): {} alpha {} — satisfaction {sat}; Q {:.3}, Q_tracked {:.3}; {} requests, {} explored (next p {:.3})",
                tier_name(r.tier),
                r.policy,
                r.alpha,
                r.q,
                r.q_tracked,
                r.requests,
                r.explored,
                r.exploration_probability
            );
        }
        if !r.judge_model.is_empty() {
            let _ = writeln!(
                o,
                "  judge {}: {} answers graded, {} satisfying (judge labels, not the apps' feedback)",
                r.judge_model, r.judge_verdicts, r.judge_satisfied
            );
        }
        let total: u64 = r.models.iter().map(|m| m.calls).sum();
        for m in &r.models {
            let _ = writeln!(
                o,
                "  {:<28} {:>6} calls {:>5.1} %  {}",
                m.model,
                m.calls,
                if total > 0 {
                    100.0 * m.calls as f64 / total as f64
                } else {
                    0.0
                },
                m.mean_joules
                    .map(|j| if r.tier == pb::Tier::Cloud as i32 {
                        format!("{j:.3e} (cloud unit)/request")
                    } else {
                        format!("{j:.2} J/request")
                    })
                    .unwrap_or_else(|| "not run yet".to_string())
            );
            if let (Some(rate), Some(lo), Some(hi)) = (m.rate, m.rate_low, m.rate_high) {
                let _ = writeln!(
                    o,
                    "  {:<28} rate {:.3} [{:.3}, {:.3}] from {} labels",
                    "", rate, lo, hi, m.labels
                );
            }
        }
        let _ = writeln!(
            o,
            "  state: {}{}",
            r.state_file,
            if r.saved_unix_ms > 0 {
                ""
            } else {
                " (not written yet)"
            }
        );
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> pb::StatusResponse {
        pb::StatusResponse {
            version: "0.1.0".into(),
            ready: true,
            routers: vec![pb::RouterStatus {
                tier: pb::Tier::Local as i32,
                policy: "mess-plus-fb".into(),
                alpha: 0.7,
                feedback: 4,
                satisfied: 3,
                judge_model: "big".into(),
                judge_verdicts: 5,
                judge_satisfied: 2,
                models: vec![
                    pb::ModelCalls {
                        model: "a".into(),
                        calls: 3,
                        mean_joules: Some(1.5),
                        ..Default::default()
                    },
                    pb::ModelCalls {
                        model: "b".into(),
                        calls: 1,
                        mean_joules: None,
                        ..Default::default()
                    },
                ],
                ..Default::default()
            }],
            cloud_endpoints: vec![pb::CloudEndpointStatus {
                uri: "https://cloud-0:50061".into(),
                healthy: false,
                circuit: "open".into(),
                circuit_opened_total: 2,
                models: vec!["llama".into()],
                last_error: "UNAVAILABLE: connection refused".into(),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn cloud_endpoints_show_health_and_circuit() {
        let t = render(&sample());
        assert!(
            t.contains("https://cloud-0:50061: UNHEALTHY, circuit open (opened 2 times)"),
            "{t}"
        );
        assert!(t.contains("connection refused"), "{t}");
        let v = to_json(&sample());
        assert_eq!(v["cloud_endpoints"][0]["circuit"], "open");
        assert_eq!(v["cloud_endpoints"][0]["healthy"], false);
        assert!(render(&pb::StatusResponse::default()).contains("cloud tier: not configured"));
    }

    #[test]
    fn json_has_call_mix_and_satisfaction() {
        let v = to_json(&sample());
        let r = &v["routers"][0];
        assert_eq!(r["satisfaction"], 0.75);
        // The judge's labels are reported apart from the apps' feedback.
        assert_eq!(r["judge"]["verdicts"], 5);
        assert_eq!(r["judge"]["model"], "big");
        assert!(render(&sample()).contains("judge big: 5 answers graded, 2 satisfying"));
        assert_eq!(r["calls"]["a"]["fraction"], 0.75);
        assert_eq!(r["calls"]["b"]["mean_joules"], serde_json::Value::Null);
        assert_eq!(r["tier"], "local");
    }

    #[test]
    fn mixrank_shows_rates_with_intervals_and_the_prior() {
        let mut s = sample();
        let r = &mut s.routers[0];
        r.policy = "mixrank".into();
        r.debt = -2.5;
        r.prior = "ferry-difficulty-prior v1 trained on arc_easy".into();
        r.models[0].rate = Some(0.61);
        r.models[0].rate_low = Some(0.52);
        r.models[0].rate_high = Some(0.7);
        r.models[0].labels = 40;
        let t = render(&s);
        assert!(t.contains("SLA debt -2.5"), "{t}");
        assert!(
            t.contains("rate 0.610 [0.520, 0.700] from 40 labels"),
            "{t}"
        );
        assert!(
            t.contains("prior: ferry-difficulty-prior v1 trained on arc_easy"),
            "{t}"
        );
        let v = to_json(&s);
        assert_eq!(v["routers"][0]["calls"]["a"]["rate_low"], 0.52);
        assert_eq!(
            v["routers"][0]["calls"]["b"]["rate"],
            serde_json::Value::Null
        );
    }

    #[test]
    fn text_names_alpha_and_models() {
        let t = render(&sample());
        assert!(t.contains("alpha 0.7"), "{t}");
        assert!(t.contains("75.0 % of 4 judged"), "{t}");
        assert!(t.contains("not run yet"), "{t}");
    }
}
