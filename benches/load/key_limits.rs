//! `BENCH_KEY_LIMITS=1` (with `BENCH_POSTGRES_URL`): what an API key's budget and requests a
//! minute cost `POST /chat` on PostgreSQL with two instances (issue 27's target: throughput
//! with both at least 90% of that without them). Two instances of the same binary, both
//! pinned to the server's core, share one fresh database; `CONNECTIONS` users are registered,
//! each with two keys: "no limits", and "budget and rpm", a budget of [`BUDGET`] tokens a
//! day and an `rpm` of [`RPM`] (the most), neither of which the run comes near. Each
//! connection chats with a key of its own user, as the backend comparison gives each
//! connection a user of its own: a key's budget and rate are rows the instances lock and
//! upsert, so this measures what the limits cost each request, not the contention of many
//! requests on one key's rows. Connection n talks to instance n mod 2, so half the
//! connections go to each, and a user's two keys are on the same instance. The fake model
//! reports a usage with each answer, as real ones do. `BENCH_TURNS` turns (default 5) of the
//! two variants in turn (forward, then backward the next turn, so a drift favours neither),
//! each a warm-up then a closed loop for `BENCH_SECS`; every chat must answer 200: a 402 or a
//! 429 (limits too small to measure) stops the run at once, any other error is counted in
//! the table and fails the run after the results. Then the ratios budget and rpm : no limits
//! of each turn's requests/s, their median and whether it meets the target.

use std::{net::SocketAddr, path::Path, sync::Arc, time::Duration};

use hyper::{Method, StatusCode};
use serde_json::{json, Value};

use crate::backends::{
    drop_database, postgres_database, register_users, transactions_committed, Fresh,
};
use crate::client::{request, send_once, MakeRequest};
use crate::fake_model::start_fake_model_with;
use crate::measure::{closed_loop_across, Outcome};
use crate::priced::{chat_body, in_turn, list, median};
use crate::report::{describe_machine, print_table, Row};
use crate::server::Server;
use crate::{CONNECTIONS, WARM_UP};

/// Each limited key's budget a day: 10^15 tokens, far more than a run can spend.
const BUDGET: i64 = 1_000_000_000_000_000;
/// Each limited key's requests a minute: the most a key may have, a thousand a second, where
/// one connection's closed loop makes a few hundred at most.
const RPM: i64 = 60_000;
/// Instances sharing the database.
const INSTANCES: usize = 2;
/// The target: budget and rpm at least this share of no limits' requests a second.
const TARGET: f64 = 0.9;
const VARIANTS: [&str; 2] = ["no limits", "budget and rpm"];

pub async fn run(dir: &Path, pinned: bool, measured: Duration, postgres: Option<&str>) {
    let Some(postgres) = postgres else {
        panic!(
            "BENCH_KEY_LIMITS=1 needs BENCH_POSTGRES_URL=postgres://USER:PASSWORD@HOST/postgres \
             (a user that may create databases): it measures two instances on one PostgreSQL \
             database"
        );
    };
    let turns = std::env::var("BENCH_TURNS")
        .ok()
        .and_then(|turns| turns.parse().ok())
        .unwrap_or(5usize);
    let model = start_fake_model_with(true).await;
    let name = format!("tokenchat_bench_keys_{}", std::process::id());
    let database_url = postgres_database(postgres, &name, Fresh::Yes).await;
    // `Server` sets INITIAL_TOKENS to 10^15 (no balance runs out) and CHAT_RATE_PER_MINUTE to
    // 0 (only the keys' own limits apply).
    let mut servers = Vec::new();
    for _ in 0..INSTANCES {
        servers.push(Server::start(dir, &database_url, model, pinned).await);
    }
    let addrs: Vec<SocketAddr> = servers.iter().map(|server| server.addr).collect();
    let tokens = register_users(&addrs, CONNECTIONS).await;
    let mut keys = vec![Vec::new(); VARIANTS.len()];
    for (n, token) in tokens.iter().enumerate() {
        let addr = addrs[n % addrs.len()];
        let limited = json!({ "name": VARIANTS[1], "rpm": RPM,
            "budget": { "tokens": BUDGET, "period": "day" } });
        for (index, body) in [json!({ "name": VARIANTS[0] }), limited]
            .into_iter()
            .enumerate()
        {
            let created = request(Method::POST, "/keys", Some(token), body.to_string());
            let (status, created) = send_once(addr, created).await;
            assert_eq!(status, StatusCode::CREATED, "POST /keys: {created}");
            let key = created["key"].as_str().expect("the new key").to_string();
            // One chat with each key first: the keys work, and on the right instance.
            let chat = request(Method::POST, "/chat", Some(&key), chat_body());
            let (status, answer) = send_once(addr, chat).await;
            assert_eq!(status, StatusCode::OK, "{}: {answer}", VARIANTS[index]);
            keys[index].push(key);
        }
    }
    println!(
        "tokenchat key limits /chat benchmark: PostgreSQL, {INSTANCES} instances on one database, \
         {turns} turns, {} s per scenario, {CONNECTIONS} connections (half to each instance), \
         each a user of its own with a key of its own",
        measured.as_secs()
    );
    println!("{}", describe_machine(pinned));
    println!(
        "{}: {}; {}: {}",
        VARIANTS[0],
        describe_key(addrs[0], &tokens[0], VARIANTS[0]).await,
        VARIANTS[1],
        describe_key(addrs[0], &tokens[0], VARIANTS[1]).await,
    );
    println!();

    let mut rows = Vec::new();
    let mut rates = vec![Vec::new(); VARIANTS.len()];
    let mut cpu_per_chat = vec![Vec::new(); VARIANTS.len()];
    let mut statements = vec![Vec::new(); VARIANTS.len()];
    let mut errors = 0;
    for turn in 0..turns {
        for index in in_turn(turn, VARIANTS.len()) {
            let variant = VARIANTS[index];
            let keys = Arc::new(keys[index].clone());
            let make: Arc<MakeRequest> = Arc::new(move |conn, _| {
                request(Method::POST, "/chat", Some(&keys[conn]), chat_body())
            });
            let warm_up =
                closed_loop_across(&addrs, CONNECTIONS, WARM_UP, StatusCode::OK, make.clone())
                    .await;
            refuse_refusals(&warm_up, turn, variant, "warm-up");
            let commits_before = transactions_committed(postgres, &name, "PostgreSQL").await;
            servers.iter().for_each(Server::reset_peak);
            let cpu_before: Duration = servers.iter().map(Server::cpu_time).sum();
            let outcome =
                closed_loop_across(&addrs, CONNECTIONS, measured, StatusCode::OK, make).await;
            let cpu = servers.iter().map(Server::cpu_time).sum::<Duration>() - cpu_before;
            let commits =
                transactions_committed(postgres, &name, "PostgreSQL").await - commits_before;
            refuse_refusals(&outcome, turn, variant, "measurement");
            errors += warm_up.errors + outcome.errors;
            let answered = (outcome.requests - outcome.errors).max(1) as f64;
            cpu_per_chat[index].push(cpu.as_secs_f64() * 1e6 / answered);
            statements[index].push(commits as f64 / outcome.requests.max(1) as f64);
            let peak = servers.iter().filter_map(Server::peak_rss).max();
            let row = Row::new(
                &format!("turn {}: POST /chat, {variant}", turn + 1),
                CONNECTIONS,
                &outcome,
                peak,
            );
            rates[index].push(row.rps);
            rows.push(row);
        }
    }
    // The limits were in force: the budget counted what the run spent.
    let after = describe_key(addrs[0], &tokens[0], VARIANTS[1]).await;
    drop(servers);
    drop_database(postgres, &name).await;

    print_table(&rows);
    println!();
    for (index, variant) in VARIANTS.iter().enumerate() {
        println!(
            "{variant}: /chat at {CONNECTIONS} connections, median {:.0} requests/s ({}); both \
             instances' CPU per chat median {:.0} µs ({}); statements committed per chat median \
             {:.2} ({})",
            median(&rates[index]),
            list(&rates[index], 0),
            median(&cpu_per_chat[index]),
            list(&cpu_per_chat[index], 0),
            median(&statements[index]),
            list(&statements[index], 2),
        );
    }
    let ratios: Vec<f64> = rates[1]
        .iter()
        .zip(&rates[0])
        .map(|(limited, free)| limited / free)
        .collect();
    for (turn, ratio) in ratios.iter().enumerate() {
        println!(
            "turn {}: budget and rpm : no limits: requests/s at {CONNECTIONS} connections \
             {ratio:.3} ({:.0} / {:.0})",
            turn + 1,
            rates[1][turn],
            rates[0][turn],
        );
    }
    let ratio = median(&ratios);
    println!(
        "budget and rpm : no limits, median of the turns' ratios: requests/s at {CONNECTIONS} \
         connections {ratio:.3}; issue 27's target (at least {TARGET}): {}",
        if ratio >= TARGET { "met" } else { "missed" },
    );
    println!("after the run, bench0's {}: {after}", VARIANTS[1]);
    println!("errors (answers other than 200, or none), warm-ups included: {errors}");
    assert_eq!(errors, 0, "every chat must answer 200");
}

/// Stops the run if a chat was refused by its key's limits: they were set too low to measure.
fn refuse_refusals(outcome: &Outcome, turn: usize, variant: &str, phase: &str) {
    let refused: u64 = [402, 429]
        .iter()
        .filter_map(|status| outcome.statuses.get(status))
        .sum();
    assert!(
        refused == 0,
        "turn {}, {variant}, {phase}: {refused} chat(s) refused (402 budget / 429 rate): the \
         limits must be large enough never to refuse; answers other than 200 by status: {:?}",
        turn + 1,
        outcome.statuses,
    );
}

/// The key called `key_name` of the user logged in with `token`, as `GET /keys` shows it.
async fn describe_key(addr: SocketAddr, token: &str, key_name: &str) -> String {
    let (status, listed) = send_once(
        addr,
        request(Method::GET, "/keys", Some(token), String::new()),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "GET /keys: {listed}");
    let key = listed["keys"]
        .as_array()
        .and_then(|keys| keys.iter().find(|key| key["name"] == key_name))
        .cloned()
        .unwrap_or(Value::Null);
    format!(
        "budget {}, spent {}, rpm {}",
        key["budget"], key["spent"], key["rpm"]
    )
}
