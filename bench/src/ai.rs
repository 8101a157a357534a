//! The ai scenario: R rooms of M subscribed members; one more member per room sends `/ai go`
//! A times (the agent answers them one after another); the provider is `cochat-bench fake-llm`,
//! whose every token is the time it was written. For every `ai.delta` a member receives, latency
//! = receive time - the token's time; per delta, the latency of the last member to get it (the
//! max over all members, across worker processes). Every member splices the deltas by `offset`
//! and checks the result against the text of the durable `ai.completed`.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use crate::fakellm::token_times;
use crate::net::{self, now_nanos, Target, Ws};
use crate::stats::Hist;
use crate::{
    cochat_setup, merged, open_and_wait_for_go, ready_summary, round3, rss_of, sum, Args, ConnSpec,
    Plan, Workers,
};

#[derive(Default)]
struct AiStats {
    /// ai.delta frames received, all members.
    deltas: u64,
    /// Tokens in them (one per delta unless the server merges tokens).
    tokens: u64,
    /// Per member and token: receive time - token time.
    latency: Hist,
    /// (message_id, offset) -> (max latency over this worker's members, members that got it).
    per_delta: HashMap<(String, u64), (u64, u32)>,
    first_delta_ns: u64,
    last_delta_ns: u64,
    completed: u64,
    text_matches: u64,
    text_mismatches: u64,
    failed: u64,
    cancelled: u64,
    /// Deltas whose offset was past the text so far (a gap), and deltas after the end.
    gaps: u64,
    late: u64,
    /// Members that have seen the end of every answer.
    members_done: usize,
    closes: u64,
    close_reasons: HashMap<String, u64>,
    first_error: Option<String>,
    first_mismatch: Option<String>,
}

type Shared = Arc<Mutex<AiStats>>;

fn lock(stats: &Shared) -> std::sync::MutexGuard<'_, AiStats> {
    stats.lock().unwrap_or_else(|e| e.into_inner())
}

#[derive(Deserialize)]
struct Delta<'a> {
    #[serde(borrow)]
    message_id: Cow<'a, str>,
    offset: u64,
    #[serde(borrow)]
    text: Cow<'a, str>,
}

/// `text` with its first `offset` characters kept and `delta` appended; false on a gap.
fn splice(text: &mut String, offset: u64, delta: &str) -> bool {
    let offset = offset as usize;
    let cut = match text.char_indices().nth(offset) {
        Some((at, _)) => at,
        None if text.chars().count() == offset => text.len(),
        None => return false,
    };
    text.truncate(cut);
    text.push_str(delta);
    true
}

async fn member(mut ws: Ws, answers: usize, stats: Shared) {
    let mut texts: HashMap<String, String> = HashMap::new();
    let mut ended: HashSet<String> = HashSet::new();
    let mut reason = "eof".to_owned();
    let mut done = false;
    while let Some(frame) = ws.next().await {
        let text = match frame {
            Ok(Message::Text(text)) => text,
            Ok(Message::Close(frame)) => {
                reason = frame
                    .map(|f| format!("{} {}", u16::from(f.code), f.reason))
                    .unwrap_or_else(|| "close".to_owned());
                break;
            }
            Ok(_) => continue,
            Err(e) => {
                reason = format!("error: {e}");
                break;
            }
        };
        let text = text.as_str();
        if text.starts_with("{\"type\":\"ai.delta\"")
            || (text.contains("\"type\":\"ai.delta\"") && !text.contains("\"type\":\"event\""))
        {
            let now_us = now_nanos() / 1000;
            let Ok(delta) = serde_json::from_str::<Delta>(text) else {
                lock(&stats)
                    .first_error
                    .get_or_insert_with(|| format!("unreadable ai.delta: {text}"));
                continue;
            };
            let mut s = lock(&stats);
            if ended.contains(delta.message_id.as_ref()) {
                s.late += 1;
                continue;
            }
            let entry = texts.entry(delta.message_id.to_string()).or_default();
            if !splice(entry, delta.offset, &delta.text) {
                s.gaps += 1;
            }
            s.deltas += 1;
            let now_ns = now_us * 1000;
            if s.first_delta_ns == 0 || now_ns < s.first_delta_ns {
                s.first_delta_ns = now_ns;
            }
            s.last_delta_ns = s.last_delta_ns.max(now_ns);
            let mut worst = 0;
            for t in token_times(&delta.text) {
                let latency = now_us.saturating_sub(t);
                s.tokens += 1;
                s.latency.record_us(latency);
                worst = worst.max(latency);
            }
            let slot = s
                .per_delta
                .entry((delta.message_id.into_owned(), delta.offset))
                .or_insert((0, 0));
            slot.0 = slot.0.max(worst);
            slot.1 += 1;
        } else if text.contains("\"kind\":\"ai.") {
            let Ok(v) = serde_json::from_str::<Value>(text) else {
                continue;
            };
            if v["type"] != "event" {
                continue;
            }
            let kind = v["event"]["kind"].as_str().unwrap_or("");
            if !matches!(kind, "ai.completed" | "ai.failed" | "ai.cancelled") {
                continue;
            }
            let message = &v["event"]["message"];
            let id = message["id"].as_str().unwrap_or("").to_owned();
            let final_text = message["text"].as_str().unwrap_or("");
            let spliced = texts.remove(&id).unwrap_or_default();
            ended.insert(id);
            let mut s = lock(&stats);
            match kind {
                "ai.completed" => {
                    s.completed += 1;
                    if spliced == final_text {
                        s.text_matches += 1;
                    } else {
                        s.text_mismatches += 1;
                        s.first_mismatch.get_or_insert_with(|| {
                            format!(
                                "spliced {} chars {:?}.. vs completed {} chars {:?}..",
                                spliced.chars().count(),
                                spliced.chars().take(60).collect::<String>(),
                                final_text.chars().count(),
                                final_text.chars().take(60).collect::<String>()
                            )
                        });
                    }
                }
                "ai.failed" => {
                    s.failed += 1;
                    s.first_error.get_or_insert_with(|| {
                        format!("ai.failed: {} {}", v["event"]["code"], v["event"]["reason"])
                    });
                }
                _ => s.cancelled += 1,
            }
            if !done && ended.len() >= answers {
                done = true;
                s.members_done += 1;
            }
        } else if text.contains("\"type\":\"error\"") {
            lock(&stats)
                .first_error
                .get_or_insert_with(|| text.to_owned());
        }
    }
    let mut s = lock(&stats);
    s.closes += 1;
    *s.close_reasons.entry(reason).or_default() += 1;
}

/// Sends `/ai go <k>` for k in 0..answers (each acked before the next); the agent queues them and
/// answers one at a time. Keeps reading afterwards so the socket stays healthy.
async fn asker(ws: Ws, room: String, global: usize, answers: usize, stats: Shared) {
    let (mut sink, mut stream) = ws.split();
    for k in 0..answers {
        let frame = format!(
            r#"{{"type":"send","id":{k},"room":"{room}","client_msg_id":"ai{global}-{k}-{}","text":"/ai go {k}"}}"#,
            now_nanos()
        );
        if sink.send(Message::text(frame)).await.is_err() {
            lock(&stats)
                .first_error
                .get_or_insert_with(|| "an asker's socket failed".to_owned());
            return;
        }
        loop {
            match stream.next().await {
                Some(Ok(Message::Text(t))) => {
                    let t = t.as_str();
                    if net::parse_ack(Target::Cochat, t) == Some(k as u64) {
                        break;
                    }
                    if t.contains("\"type\":\"error\"") {
                        lock(&stats)
                            .first_error
                            .get_or_insert_with(|| format!("trigger refused: {t}"));
                        return;
                    }
                }
                Some(Ok(_)) => {}
                _ => {
                    lock(&stats)
                        .first_error
                        .get_or_insert_with(|| "an asker's socket closed".to_owned());
                    return;
                }
            }
        }
    }
    while let Some(Ok(_)) = stream.next().await {}
}

/// The worker process's side (`plan.ai_answers > 0`).
pub async fn worker(plan: Arc<Plan>, index: usize, count: usize) -> Result<()> {
    let stats: Shared = Arc::new(Mutex::new(AiStats::default()));
    let answers = plan.ai_answers;
    let (senders, connected) = open_and_wait_for_go(&plan, index, count, |_spec, ws| {
        tokio::spawn(member(ws, answers, stats.clone()));
    })
    .await?;
    let deadline = Instant::now() + Duration::from_secs_f64(plan.duration_s);
    let cpu_at_go = net::cpu_seconds(std::process::id());
    for (global, spec, ws) in senders {
        tokio::spawn(asker(
            ws,
            plan.rooms[spec.room].clone(),
            global,
            answers,
            stats.clone(),
        ));
    }
    // Until every member here has seen every answer end (or the deadline).
    while Instant::now() < deadline && lock(&stats).members_done < connected {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let cpu_s = net::cpu_seconds(std::process::id()) - cpu_at_go;
    tokio::time::sleep(Duration::from_secs_f64(plan.drain_s)).await;
    let s = lock(&stats);
    let per_delta: Vec<Value> = s
        .per_delta
        .iter()
        .map(|((id, offset), (max, n))| json!([id, offset, max, n]))
        .collect();
    let result = json!({
        "deltas": s.deltas, "tokens": s.tokens, "latency": s.latency.to_pairs(), "per_delta": per_delta,
        "first_delta_ns": s.first_delta_ns, "last_delta_ns": s.last_delta_ns,
        "completed": s.completed, "text_matches": s.text_matches, "text_mismatches": s.text_mismatches,
        "failed": s.failed, "cancelled": s.cancelled, "gaps": s.gaps, "late": s.late,
        "members_done": s.members_done, "closes": s.closes, "close_reasons": s.close_reasons,
        "first_error": s.first_error, "first_mismatch": s.first_mismatch, "cpu_s": cpu_s,
    });
    println!("RESULT {result}");
    std::process::exit(0)
}

/// The parent's side: `cochat-bench ai`.
pub async fn run(args: &Args) -> Result<Value> {
    let nodes = args.nodes()?;
    let rooms: usize = args.num("rooms", 1)?.max(1);
    let members: usize = args.num("members", 10)?.max(1);
    let answers: usize = args.num("answers", 3)?.max(1);
    let tokens: usize = args.num("tokens", 100)?.max(1);
    let rate: f64 = args.num("rate", 50.0)?;
    let workers: usize = args.num("workers", 1)?.max(1);
    let users: usize = args.num("users", members.min(20))?.max(1);
    let pids = args.pids();
    let answer_s = tokens as f64 / rate.max(0.001);
    let timeout: f64 = args.num("timeout", answers as f64 * (answer_s + 2.0) * 2.0 + 30.0)?;
    let setup = cochat_setup(&nodes[0], users, rooms, true).await?;
    // Members of room r: j = 0..M, user j % U (every user is a member of every room), nodes round-robin.
    let receivers: Vec<ConnSpec> = (0..rooms * members)
        .map(|i| ConnSpec {
            node: i % nodes.len(),
            user: (i / rooms) % users,
            room: i % rooms,
        })
        .collect();
    let askers: Vec<ConnSpec> = (0..rooms)
        .map(|r| ConnSpec {
            node: r % nodes.len(),
            user: r % users,
            room: r,
        })
        .collect();
    let plan = Plan {
        target: Target::Cochat,
        nodes,
        tokens: setup.tokens,
        rooms: setup.rooms,
        receivers,
        senders: askers,
        rate_per_sender: 0.0,
        window: 0,
        duration_s: timeout,
        drain_s: args.num("drain", 0.5)?,
        text_bytes: 0,
        connect_concurrency: args.num("concurrency", 64)?,
        ai_answers: answers,
    };
    let mut w = Workers::spawn(&plan, workers).await?;
    let ready = w.collect("READY", Duration::from_secs(600)).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_ready = rss_of(&pids);
    let server_cpu_at_go: f64 = pids.iter().map(|p| net::cpu_seconds(*p)).sum();
    let started = Instant::now();
    w.go().await?;
    let results = w
        .collect("RESULT", Duration::from_secs_f64(timeout + 60.0))
        .await?;
    let wall = started.elapsed().as_secs_f64();
    let server_cpu_s: f64 =
        pids.iter().map(|p| net::cpu_seconds(*p)).sum::<f64>() - server_cpu_at_go;
    let generator_cpu_s: f64 = results
        .iter()
        .map(|r| r["cpu_s"].as_f64().unwrap_or(0.0))
        .sum();
    let connected = sum(&ready, "receivers");

    // Per delta: the last member to get it, over all workers.
    let mut per_delta: HashMap<(String, u64), (u64, u64)> = HashMap::new();
    for r in &results {
        for d in r["per_delta"].as_array().into_iter().flatten() {
            let key = (
                d[0].as_str().unwrap_or("").to_owned(),
                d[1].as_u64().unwrap_or(0),
            );
            let slot = per_delta.entry(key).or_insert((0, 0));
            slot.0 = slot.0.max(d[2].as_u64().unwrap_or(0));
            slot.1 += d[3].as_u64().unwrap_or(0);
        }
    }
    let mut last_member = Hist::default();
    let mut partial = 0u64;
    for (max, n) in per_delta.values() {
        if *n >= connected / rooms as u64 {
            last_member.record_us(*max);
        } else {
            partial += 1;
        }
    }
    let answer_ids: HashSet<&str> = per_delta.keys().map(|(id, _)| id.as_str()).collect();
    let deltas = sum(&results, "deltas");
    let first = results
        .iter()
        .filter_map(|r| r["first_delta_ns"].as_u64())
        .filter(|t| *t > 0)
        .min()
        .unwrap_or(0);
    let last = results
        .iter()
        .filter_map(|r| r["last_delta_ns"].as_u64())
        .max()
        .unwrap_or(0);
    let span_s = if last > first {
        (last - first) as f64 / 1e9
    } else {
        0.0
    };
    let per_s = |n: u64| {
        if span_s > 0.0 {
            (n as f64 / span_s).round()
        } else {
            0.0
        }
    };
    let completed = sum(&results, "completed");
    let matches = sum(&results, "text_matches");
    let expected_completions = connected * answers as u64;
    let first_error = results
        .iter()
        .find_map(|v| v["first_error"].as_str().map(|s| json!(s)))
        .unwrap_or(Value::Null);
    let first_mismatch = results
        .iter()
        .find_map(|v| v["first_mismatch"].as_str().map(|s| json!(s)))
        .unwrap_or(Value::Null);
    let all_ok = completed == expected_completions
        && matches == completed
        && partial == 0
        && sum(&results, "gaps") == 0;
    if deltas == 0 || completed == 0 {
        bail!(
            "no answer arrived ({deltas} deltas, {completed} ai.completed): is cochat started with AI_BASE_URL pointing at `cochat-bench fake-llm`? first error: {first_error}"
        );
    }
    if !all_ok {
        eprintln!("ai: WARNING: not every member got every answer intact: {completed}/{expected_completions} completed, {matches} texts match, {partial} deltas not seen by every member; first mismatch: {first_mismatch}; first error: {first_error}");
    }
    Ok(json!({
        "target": "cochat",
        "params": {
            "rooms": rooms, "members": members, "answers_per_room": answers, "tokens_per_answer": tokens,
            "provider_tokens_per_s": rate, "workers": workers, "users": users, "nodes": plan.nodes.len(),
        },
        "setup_s": setup.took_s,
        "results": {
            "connections": ready_summary(&ready),
            "wall_s": round3(wall),
            "answers_seen": answer_ids.len(),
            "provider_deltas": per_delta.len(),
            "deltas_delivered": deltas,
            "tokens_delivered": sum(&results, "tokens"),
            "expected_deltas_delivered": connected * (answers * tokens) as u64,
            "delivery_span_s": round3(span_s),
            "provider_deltas_per_s": per_s(per_delta.len() as u64),
            "deltas_delivered_per_s": per_s(deltas),
            "latency_provider_to_member": merged(&results, "latency").summary_ms(),
            "latency_provider_to_last_member": last_member.summary_ms(),
            "deltas_not_seen_by_every_member": partial,
            "ai_completed_seen": completed,
            "expected_ai_completed": expected_completions,
            "spliced_text_matches_completed": matches,
            "spliced_text_mismatches": sum(&results, "text_mismatches"),
            "all_members_got_every_answer_intact": all_ok,
            "ai_failed_seen": sum(&results, "failed"),
            "ai_cancelled_seen": sum(&results, "cancelled"),
            "delta_gaps": sum(&results, "gaps"),
            "deltas_after_end": sum(&results, "late"),
            "closed_during_run": sum(&results, "closes"),
            "first_error": first_error,
            "first_mismatch": first_mismatch,
            "server_cpu_s": round3(server_cpu_s),
            "server_cpu_us_per_delivery": if deltas > 0 { round3(server_cpu_s * 1e6 / deltas as f64) } else { 0.0 },
            "generator_cpu_s": round3(generator_cpu_s),
            "generator_cpu_us_per_delivery": if deltas > 0 { round3(generator_cpu_s * 1e6 / deltas as f64) } else { 0.0 },
            "loadavg_at_end": std::fs::read_to_string("/proc/loadavg").unwrap_or_default().split_whitespace().take(3).collect::<Vec<_>>().join(" "),
            "server_rss_ready_bytes": rss_ready,
            "server_rss_end_bytes": rss_of(&pids),
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splicing_follows_the_protocol() {
        let mut t = String::new();
        assert!(splice(&mut t, 0, "héllo"));
        assert!(splice(&mut t, 5, " world"));
        assert_eq!(t, "héllo world");
        assert!(splice(&mut t, 2, "y"));
        assert_eq!(t, "héy");
        assert!(!splice(&mut t, 9, "gap"));
        assert_eq!(t, "héy");
    }

    #[test]
    fn deltas_parse() {
        let d: Delta = serde_json::from_str(r#"{"type":"ai.delta","room":"r","message_id":"m","offset":18,"text":"t1732240000000001 "}"#).expect("a valid delta");
        assert_eq!((d.message_id.as_ref(), d.offset), ("m", 18));
        assert_eq!(token_times(&d.text).next(), Some(1732240000000001));
    }
}
