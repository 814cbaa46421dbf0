//! `BENCH_PRICED=1`: what prices per model and per token (issue 25) cost `POST /chat`. Three
//! servers of the same binary on fresh SQLite databases, all pinned to the server's core and
//! idle but for the one measured: flat (`CONFIG_FILE` empty), priced with the `o200k_base`
//! tokenizer, and priced counting bytes. The fake model reports a usage with each answer, as
//! real ones do, so a priced chat reserves at its counted prompt and settles to that usage.
//! `BENCH_TURNS` turns (default 5) of `/chat` at `CONNECTIONS` connections, the servers in
//! turn (forward, then backward the next turn, so a drift favours none), then as many turns
//! at one connection beside the direct model call.
//!
//! `BENCH_BUILDS=<binary>,<binary>,...` runs the same turns on flat servers of several builds
//! instead (the first is the base the others are compared with): two builds measured in one
//! run, each on a database of its own, neither disturbed by the other's earlier scenarios.

use std::{net::SocketAddr, path::Path, sync::Arc, time::Duration};

use hyper::{Method, StatusCode};
use serde_json::json;

use crate::client::{request, send_once, MakeRequest, Target};
use crate::fake_model::start_fake_model_with;
use crate::measure::{closed_loop, Outcome};
use crate::report::{describe_machine, print_table, Row};
use crate::server::Server;
use crate::{CONNECTIONS, WARM_UP};

/// The served model the price book prices (tokenchat's default `LLM_MODEL`).
const MODEL: &str = "llama3.2";

/// The price book of [`MODEL`], counted with `tokenizer`.
fn price_book(tokenizer: &str) -> String {
    format!(
        "[models.\"{MODEL}\"]\nprompt = 150\ncached_prompt = 75\ncompletion = 600\nrequest = 1\nmax_output_tokens = 4096\ntokenizer = \"{tokenizer}\"\n"
    )
}

/// One server under test.
pub(crate) struct Variant {
    pub(crate) name: String,
    pub(crate) server: Server,
    pub(crate) target: Arc<Target>,
}

pub async fn run(dir: &Path, pinned: bool, measured: Duration) {
    let model = start_fake_model_with(true).await;
    let mut variants = Vec::new();
    for (name, tokenizer) in [
        ("flat", None),
        ("priced, o200k_base", Some("o200k_base")),
        ("priced, bytes", Some("bytes")),
    ] {
        let config_file = match tokenizer {
            Some(tokenizer) => {
                let path = dir.join(format!("prices-{tokenizer}.toml"));
                std::fs::write(&path, price_book(tokenizer)).expect("write the price book");
                path.display().to_string()
            }
            None => String::new(),
        };
        let label = tokenizer.unwrap_or("flat");
        let sqlite = format!(
            "sqlite://{}",
            dir.join(format!("bench-{label}.db")).display()
        );
        let env = [("CONFIG_FILE", config_file.as_str()), ("LLM_MODEL", MODEL)];
        let server = Server::start_with(dir, &sqlite, model, pinned, &env).await;
        let variant = Variant::ready(name.to_string(), server).await;
        println!("(CONFIG_FILE={config_file:?})");
        variants.push(variant);
    }
    in_turns(&variants, model, pinned, measured, "priced /chat").await;
}

/// `BENCH_BUILDS`: flat `/chat` of each build in `binaries`, in turns.
pub async fn compare_builds(dir: &Path, pinned: bool, measured: Duration, binaries: &[String]) {
    let model = start_fake_model_with(true).await;
    let mut variants = Vec::new();
    for (index, binary) in binaries.iter().enumerate() {
        let sqlite = format!(
            "sqlite://{}",
            dir.join(format!("build-{index}.db")).display()
        );
        let env = [("CONFIG_FILE", ""), ("LLM_MODEL", MODEL)];
        let server = Server::start_binary(binary, dir, &sqlite, model, pinned, &env).await;
        variants.push(Variant::ready(binary.clone(), server).await);
    }
    in_turns(&variants, model, pinned, measured, "builds' /chat").await;
}

impl Variant {
    /// `server` with a user logged in, after one chat that shows how it is charged.
    async fn ready(name: String, server: Server) -> Self {
        let target = Target {
            addr: server.addr,
            token: String::new(),
        };
        let token = target.register_and_login("bench", "bench-password").await;
        let target = Arc::new(Target { token, ..target });
        let (status, answer) = send_once(
            target.addr,
            request(Method::POST, "/chat", Some(&target.token), chat_body()),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{name}: {answer}");
        println!("{name}: one chat charged {}", answer["tokens_charged"]);
        Self {
            name,
            server,
            target,
        }
    }
}

/// `BENCH_TURNS` turns (default 5) of `/chat` at [`CONNECTIONS`] connections, the variants in
/// turn, then as many at one connection beside the direct model call; each figure also as a
/// share of the first variant's.
async fn in_turns(
    variants: &[Variant],
    model: SocketAddr,
    pinned: bool,
    measured: Duration,
    what: &str,
) {
    let turns = std::env::var("BENCH_TURNS")
        .ok()
        .and_then(|turns| turns.parse().ok())
        .unwrap_or(5usize);
    println!(
        "tokenchat {what} benchmark: {turns} turns, {} s per scenario",
        measured.as_secs()
    );
    println!("{}", describe_machine(pinned));
    println!();

    let mut rows = Vec::new();
    let mut rates = vec![Vec::new(); variants.len()];
    // The server's CPU time per answered chat, in microseconds: what the rates would be in
    // proportion to if the server's core were the bottleneck and its own.
    let mut cpu_per_chat = vec![Vec::new(); variants.len()];
    for turn in 0..turns {
        for index in in_turn(turn, variants.len()) {
            let variant = &variants[index];
            let make = variant.target.post("/chat", chat_body());
            let (outcome, cpu) = measure(variant, CONNECTIONS, measured, make).await;
            rates[index].push(outcome.requests as f64 / outcome.elapsed.as_secs_f64());
            let answered = (outcome.requests - outcome.errors).max(1) as f64;
            cpu_per_chat[index].push(cpu.as_secs_f64() * 1e6 / answered);
            let name = format!("turn {}: POST /chat, {}", turn + 1, variant.name);
            rows.push(Row::new(
                &name,
                CONNECTIONS,
                &outcome,
                variant.server.peak_rss(),
            ));
        }
    }

    // One connection: each server and the direct model call, in turns.
    let direct_body = json!({
        "model": MODEL,
        "messages": [{ "role": "system", "content": "You are a helpful assistant." },
                     { "role": "user", "content": "code hello world in python" }]
    })
    .to_string();
    let direct: Arc<MakeRequest> = Arc::new(move |_, _| {
        request(
            Method::POST,
            "/v1/chat/completions",
            None,
            direct_body.clone(),
        )
    });
    let mut p50s = vec![Vec::new(); variants.len() + 1];
    let mut p99s = vec![Vec::new(); variants.len() + 1];
    for turn in 0..turns {
        for index in in_turn(turn, variants.len() + 1) {
            let (name, outcome) = match variants.get(index) {
                Some(variant) => {
                    let make = variant.target.post("/chat", chat_body());
                    let (outcome, _) = measure(variant, 1, measured, make).await;
                    (format!("POST /chat, {}", variant.name), outcome)
                }
                None => {
                    closed_loop(model, 1, WARM_UP, StatusCode::OK, direct.clone()).await;
                    let outcome =
                        closed_loop(model, 1, measured, StatusCode::OK, direct.clone()).await;
                    ("direct model call".to_string(), outcome)
                }
            };
            p50s[index].push(outcome.histogram.value_at_quantile(0.5) as f64 / 1000.0);
            p99s[index].push(outcome.histogram.value_at_quantile(0.99) as f64 / 1000.0);
            rows.push(Row::new(
                &format!("turn {}: {name}", turn + 1),
                1,
                &outcome,
                None,
            ));
        }
    }

    print_table(&rows);
    println!();
    let first = median(&rates[0]);
    for (index, variant) in variants.iter().enumerate() {
        let per_turn: Vec<f64> = rates[index]
            .iter()
            .zip(&rates[0])
            .map(|(rate, flat)| rate / flat)
            .collect();
        println!(
            "{}: /chat at {CONNECTIONS} connections, median {:.0} requests/s ({}); of {}: {:.1}% (medians), per turn {}",
            variant.name,
            median(&rates[index]),
            list(&rates[index], 0),
            variants[0].name,
            100.0 * median(&rates[index]) / first,
            list(&per_turn.iter().map(|ratio| 100.0 * ratio).collect::<Vec<_>>(), 1),
        );
    }
    let first_cpu = median(&cpu_per_chat[0]);
    for (index, variant) in variants.iter().enumerate() {
        println!(
            "{}: server CPU per chat at {CONNECTIONS} connections, median {:.0} µs ({}); {}'s as % of it: {:.1}%",
            variant.name,
            median(&cpu_per_chat[index]),
            list(&cpu_per_chat[index], 0),
            variants[0].name,
            100.0 * first_cpu / median(&cpu_per_chat[index]),
        );
    }
    let direct_p50 = median(&p50s[variants.len()]);
    let direct_p99 = median(&p99s[variants.len()]);
    println!(
        "direct model call at 1 connection: p50 median {direct_p50:.3} ms ({}), p99 median {direct_p99:.3} ms",
        list(&p50s[variants.len()], 3),
    );
    for (index, variant) in variants.iter().enumerate() {
        println!(
            "{}: /chat at 1 connection, p50 median {:.3} ms ({}), p99 median {:.3} ms ({}); added to the direct call: p50 {:.3} ms, p99 {:.3} ms",
            variant.name,
            median(&p50s[index]),
            list(&p50s[index], 3),
            median(&p99s[index]),
            list(&p99s[index], 3),
            median(&p50s[index]) - direct_p50,
            median(&p99s[index]) - direct_p99,
        );
    }
}

pub(crate) fn chat_body() -> String {
    json!({ "message": "code hello world in python" }).to_string()
}

/// The order of the `count` scenarios in `turn`: forward, then backward.
pub(crate) fn in_turn(turn: usize, count: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..count).collect();
    if turn % 2 == 1 {
        order.reverse();
    }
    order
}

/// A warm-up, then `connections` closed loops on `variant` for `measured`; with the CPU time
/// the server used meanwhile.
pub(crate) async fn measure(
    variant: &Variant,
    connections: usize,
    measured: Duration,
    make: Arc<MakeRequest>,
) -> (Outcome, Duration) {
    let addr: SocketAddr = variant.target.addr;
    closed_loop(addr, connections, WARM_UP, StatusCode::OK, make.clone()).await;
    variant.server.reset_peak();
    let before = variant.server.cpu_time();
    let outcome = closed_loop(addr, connections, measured, StatusCode::OK, make).await;
    (outcome, variant.server.cpu_time().saturating_sub(before))
}

pub(crate) fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => f64::NAN,
        len if len % 2 == 1 => sorted[len / 2],
        len => (sorted[len / 2 - 1] + sorted[len / 2]) / 2.0,
    }
}

pub(crate) fn list(values: &[f64], decimals: usize) -> String {
    values
        .iter()
        .map(|value| format!("{value:.decimals$}"))
        .collect::<Vec<_>>()
        .join(" / ")
}
