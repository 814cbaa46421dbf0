//! `BENCH_UPSTREAMS=1`: what a dead upstream costs `POST /chat` once its breaker has opened
//! (issue 26's target: `/chat` p50 with one of three targets dead after its breaker opened
//! within 10% of all healthy). Two servers of the same binary on fresh SQLite databases, both
//! pinned to the server's core and idle but for the one measured, both with `LLM_BASE_URL`
//! empty and a `CONFIG_FILE` serving `llama3.2` from three upstreams `a`, `b` and `c`, one
//! target each, of weight 1 and priority 0: "all healthy", all three pointing at the one
//! instant fake model of this process (one fake for all: tokenchat's HTTP client pools
//! connections per host, so both servers reach it the same way and differ only in routing),
//! and "one dead", `c` pointing at a loopback port where nothing listens. Both run with
//! `UPSTREAM_FAILURES_TO_OPEN=5` and `UPSTREAM_COOLDOWN_SECS=3600`; before measuring, "one
//! dead" is sent sequential chats (each answered by `a` or `b`) until `/ready` shows `c`'s
//! target open, and it stays open for the run: what is measured is the routing around an
//! open breaker, not the failed attempts that opened it. `BENCH_TURNS` turns (default 5),
//! the servers in turn (forward, then backward the next turn, so a drift favours neither),
//! each a closed loop at `CONNECTIONS` connections then one at one connection; then the
//! ratios one dead : all healthy of each turn and their medians.

use std::{fmt::Write as _, path::Path, sync::Arc, time::Duration};

use hyper::{Method, StatusCode};

use crate::client::{request, send_once, Target};
use crate::fake_model::start_fake_model;
use crate::priced::{chat_body, in_turn, list, measure, median, Variant};
use crate::report::{describe_machine, print_table, Row};
use crate::server::Server;
use crate::CONNECTIONS;

/// The served model (tokenchat's default `LLM_MODEL`).
const MODEL: &str = "llama3.2";
/// The upstreams, the last of which is dead in the second server.
const UPSTREAMS: [&str; 3] = ["a", "b", "c"];
/// Warm-up chats at most before `c`'s breaker must have opened.
const MOST_WARM_UP_CHATS: usize = 200;

/// A configuration file serving [`MODEL`] from [`UPSTREAMS`] at `base_urls`, equally.
fn config_file(base_urls: [&str; 3]) -> String {
    let mut file = String::new();
    for (name, base_url) in UPSTREAMS.iter().zip(base_urls) {
        let _ = writeln!(file, "[upstreams.{name}]\nbase_url = \"{base_url}\"\n");
    }
    let _ = writeln!(file, "[models.\"{MODEL}\"]\ntargets = [");
    for name in UPSTREAMS {
        let _ = writeln!(
            file,
            "  {{ upstream = \"{name}\", weight = 1, priority = 0 }},"
        );
    }
    file.push_str("]\n");
    file
}

pub async fn run(dir: &Path, pinned: bool, measured: Duration) {
    let turns = std::env::var("BENCH_TURNS")
        .ok()
        .and_then(|turns| turns.parse().ok())
        .unwrap_or(5usize);
    let model = start_fake_model().await;
    let fake = format!("http://{model}/v1");
    // A port that was free a moment ago: the listener is dropped at once, so nothing listens.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port");
    let dead = format!("http://{dead}/v1");
    let mut variants = Vec::new();
    for (name, label, c, c_state) in [
        ("all healthy", "healthy", &fake, "closed"),
        ("one of three dead, breaker open", "one-dead", &dead, "open"),
    ] {
        let path = dir.join(format!("upstreams-{label}.toml"));
        std::fs::write(&path, config_file([&fake, &fake, c])).expect("write the config file");
        let config_file = path.display().to_string();
        let sqlite = format!(
            "sqlite://{}",
            dir.join(format!("bench-{label}.db")).display()
        );
        // `Server` already sets INITIAL_TOKENS to 10^15 and CHAT_RATE_PER_MINUTE to 0, so
        // neither the balance nor the rate runs out.
        let env = [
            ("CONFIG_FILE", config_file.as_str()),
            ("LLM_BASE_URL", ""),
            ("LLM_MODEL", MODEL),
            ("UPSTREAM_FAILURES_TO_OPEN", "5"),
            ("UPSTREAM_COOLDOWN_SECS", "3600"),
        ];
        let server = Server::start_with(dir, &sqlite, model, pinned, &env).await;
        let target = Target {
            addr: server.addr,
            token: String::new(),
        };
        let token = target.register_and_login("bench", "bench-password").await;
        let target = Arc::new(Target { token, ..target });
        let chats = chat_until(&target, c_state).await;
        println!(
            "{name}: c's target {c_state} after {chats} warm-up chat(s), each answered; breakers {}",
            describe(&breakers(&target).await)
        );
        variants.push(Variant {
            name: name.to_string(),
            server,
            target,
        });
    }
    println!(
        "tokenchat upstreams /chat benchmark: {turns} turns, {} s per scenario",
        measured.as_secs()
    );
    println!("{}", describe_machine(pinned));
    println!();

    let mut rows = Vec::new();
    let mut rates = vec![Vec::new(); variants.len()];
    let mut p50s = vec![Vec::new(); variants.len()];
    let mut p99s = vec![Vec::new(); variants.len()];
    for turn in 0..turns {
        for index in in_turn(turn, variants.len()) {
            let variant = &variants[index];
            let make = variant.target.post("/chat", chat_body());
            let (outcome, _) = measure(variant, CONNECTIONS, measured, make.clone()).await;
            let name = format!("turn {}: POST /chat, {}", turn + 1, variant.name);
            let row = Row::new(&name, CONNECTIONS, &outcome, variant.server.peak_rss());
            rates[index].push(row.rps);
            rows.push(row);
            let (outcome, _) = measure(variant, 1, measured, make).await;
            let row = Row::new(&name, 1, &outcome, None);
            p50s[index].push(row.p50 as f64 / 1000.0);
            p99s[index].push(row.p99 as f64 / 1000.0);
            rows.push(row);
        }
    }
    let mut after = Vec::new();
    for variant in &variants {
        after.push(describe(&breakers(&variant.target).await));
    }
    print_table(&rows);
    println!();
    for (index, variant) in variants.iter().enumerate() {
        println!(
            "{}: /chat at {CONNECTIONS} connections, median {:.0} requests/s ({}); at 1 connection, p50 median {:.3} ms ({}), p99 median {:.3} ms ({}); breakers after: {}",
            variant.name,
            median(&rates[index]),
            list(&rates[index], 0),
            median(&p50s[index]),
            list(&p50s[index], 3),
            median(&p99s[index]),
            list(&p99s[index], 3),
            after[index],
        );
    }
    let ratios = |values: &[Vec<f64>]| -> Vec<f64> {
        values[1]
            .iter()
            .zip(&values[0])
            .map(|(dead, healthy)| dead / healthy)
            .collect()
    };
    let (rate_ratios, p50_ratios, p99_ratios) = (ratios(&rates), ratios(&p50s), ratios(&p99s));
    for turn in 0..turns {
        println!(
            "turn {}: one dead : all healthy: requests/s at {CONNECTIONS} connections {:.3} ({:.0} / {:.0}), p50 at 1 connection {:.3} ({:.3} / {:.3} ms), p99 at 1 connection {:.3}",
            turn + 1,
            rate_ratios[turn],
            rates[1][turn],
            rates[0][turn],
            p50_ratios[turn],
            p50s[1][turn],
            p50s[0][turn],
            p99_ratios[turn],
        );
    }
    let p50_ratio = median(&p50_ratios);
    println!(
        "one dead : all healthy, medians of the turns' ratios: requests/s at {CONNECTIONS} connections {:.3}, p50 at 1 connection {p50_ratio:.3}, p99 at 1 connection {:.3}; issue 26's target (p50 within 10%): {}",
        median(&rate_ratios),
        median(&p99_ratios),
        if p50_ratio <= 1.1 { "met" } else { "missed" },
    );
    // The breakers are as they were: c's never probed, nothing else ever opened.
    assert_eq!(after[0], "a closed, b closed, c closed", "all healthy");
    assert_eq!(after[1], "a closed, b closed, c open", "one dead");
}

/// Sequential chats, each of which must be answered, until `/ready` shows `c`'s target in
/// `state`; how many it took.
async fn chat_until(target: &Target, state: &str) -> usize {
    for chats in 1..=MOST_WARM_UP_CHATS {
        let chat = request(Method::POST, "/chat", Some(&target.token), chat_body());
        let (status, answer) = send_once(target.addr, chat).await;
        assert_eq!(status, StatusCode::OK, "warm-up chat {chats}: {answer}");
        let c = breakers(target)
            .await
            .into_iter()
            .find(|(name, _)| name == "c");
        if c.is_some_and(|(_, now)| now == state) {
            return chats;
        }
    }
    panic!("c's target not {state} after {MOST_WARM_UP_CHATS} chats");
}

/// Each upstream's name and its target's breaker state (`closed`, `open`, `half_open`,
/// `cooling`), as `/ready` shows them now.
async fn breakers(target: &Target) -> Vec<(String, String)> {
    let ready = request(Method::GET, "/ready", None, String::new());
    let (status, ready) = send_once(target.addr, ready).await;
    assert_eq!(status, StatusCode::OK, "/ready: {ready}");
    let mut states = Vec::new();
    for upstream in ready["upstreams"].as_array().expect("/ready's upstreams") {
        let name = upstream["name"].as_str().unwrap_or("?");
        let targets = upstream["targets"].as_array().expect("its targets");
        for target in targets {
            let state = target["state"].as_str().unwrap_or("?");
            states.push((name.to_string(), state.to_string()));
        }
    }
    states.sort();
    states
}

fn describe(breakers: &[(String, String)]) -> String {
    breakers
        .iter()
        .map(|(name, state)| format!("{name} {state}"))
        .collect::<Vec<_>>()
        .join(", ")
}
