//! `cargo bench --bench routing`: what routing costs one call of a model served by several
//! upstreams (issue 26): choosing a target (by priority, weight and breaker), booking its
//! success on the breaker, and counting the attempt in the metrics, as every call does
//! before and after the upstream's own answer. Nothing is sent: the cost is tokenchat's alone.
//!
//! Three targets of one model (weights 3, 1 and a fallback), and, beside it, the same with
//! the first target's upstream at `max_concurrent` 1 (the slot taken and given back each
//! call). Each case routes `BENCH_ITERATIONS` calls (default 200,000) after 10,000 to warm,
//! each timed alone in batches of 100 (one clock read per batch, so the clock's own cost is
//! spread); printed: the median and p99 of a batch's mean per call, in microseconds. Pin it
//! to one core (`taskset -c 0`) for figures comparable with the server's.

use std::{
    hint::black_box,
    time::{Duration, Instant},
};

use tokenchat::{llm::LlmClient, telemetry::Metrics, Config};

const BATCH: usize = 100;

fn client(file: &str) -> (LlmClient, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokenchat.toml");
    std::fs::write(&path, file).unwrap();
    let path = path.to_str().unwrap().to_string();
    let config = Config::from_lookup(|name| match name {
        "CONFIG_FILE" => Some(path.clone()),
        _ => None,
    })
    .unwrap();
    let client = LlmClient::new(&config, Metrics::new()).unwrap();
    (client, dir)
}

fn three_targets(first_upstream: &str) -> String {
    format!(
        "{first_upstream}\n\
         [upstreams.b]\nbase_url = \"http://127.0.0.1:9/v1\"\n\n\
         [upstreams.c]\nbase_url = \"http://127.0.0.1:9/v1\"\n\n\
         [models.\"llama3.2\"]\ntargets = [\n\
           {{ upstream = \"a\", weight = 3 }},\n\
           {{ upstream = \"b\", model = \"other-name\", weight = 1 }},\n\
           {{ upstream = \"c\", priority = 1 }},\n]\n"
    )
}

fn measure(name: &str, client: &LlmClient, iterations: usize) {
    for _ in 0..10_000 {
        black_box(client.route_without_calling("llama3.2"));
    }
    let mut per_call: Vec<Duration> = Vec::with_capacity(iterations / BATCH);
    for _ in 0..iterations / BATCH {
        let began = Instant::now();
        for _ in 0..BATCH {
            let chosen = client.route_without_calling("llama3.2");
            assert!(black_box(chosen).is_some());
        }
        per_call.push(began.elapsed() / BATCH as u32);
    }
    per_call.sort();
    let at = |q: f64| per_call[((per_call.len() - 1) as f64 * q) as usize];
    println!(
        "{name:<48} median {:>6.2} µs   p99 {:>6.2} µs   ({} calls)",
        at(0.5).as_secs_f64() * 1e6,
        at(0.99).as_secs_f64() * 1e6,
        per_call.len() * BATCH
    );
}

fn main() {
    let iterations: usize = std::env::var("BENCH_ITERATIONS")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(200_000);
    let (plain, _dir) = client(&three_targets(
        "[upstreams.a]\nbase_url = \"http://127.0.0.1:9/v1\"\n",
    ));
    measure("three targets, all closed", &plain, iterations);
    let (limited, _dir) = client(&three_targets(
        "[upstreams.a]\nbase_url = \"http://127.0.0.1:9/v1\"\nmax_concurrent = 1\n",
    ));
    measure(
        "three targets, the first at max_concurrent 1",
        &limited,
        iterations,
    );
}
