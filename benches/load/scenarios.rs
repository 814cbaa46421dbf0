//! The default run, step by step: the throughput scenarios (`BENCH_ONLY` picks among them),
//! reads during a login burst, logins on a busy core, then the overhead at one connection,
//! slow chats, streaming and raw Argon2, and the closing lines that compare them.

use std::{
    net::SocketAddr,
    path::Path,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use hyper::{Method, StatusCode};
use serde_json::json;

use crate::bare::BareServer;
use crate::client::{request, MakeRequest, Target};
use crate::cores::{raw_argon2_rate_on_server_core, CoreSpinner};
use crate::measure::{closed_loop, first_piece_latency, slow_chats, slow_streams, Outcome};
use crate::report::{describe_machine, print_table, Row};
use crate::server::Server;
use crate::{CONNECTIONS, LOGIN_BURST, READERS_DURING_LOGINS, SLOW_CHATS, SLOW_STREAMS, WARM_UP};

/// The default run on a fresh SQLite database in `dir`, `secs` seconds a scenario.
pub async fn run(dir: &Path, model: SocketAddr, pinned: bool, secs: u64) {
    let sqlite = format!("sqlite://{}", dir.join("bench.db").display());
    let server = Server::start(dir, &sqlite, model, pinned).await;
    let target = Target {
        addr: server.addr,
        token: String::new(),
    };
    let token = target.register_and_login("bench", "bench-password").await;
    let bare = BareServer::start(dir, &sqlite, pinned).await;
    let mut run = Scenarios {
        server,
        bare,
        target: Arc::new(Target { token, ..target }),
        model,
        pinned,
        measured: Duration::from_secs(secs),
        // BENCH_ONLY=chat (say) runs just the throughput scenarios whose name contains it,
        // for profiling one path.
        only: std::env::var("BENCH_ONLY").ok(),
        rows: Vec::new(),
    };

    println!(
        "tokenchat load benchmark: {secs} s per scenario, {CONNECTIONS} connections unless noted"
    );
    println!("{}", describe_machine(pinned));
    println!();

    run.throughput().await;
    run.reads_during_logins().await;
    run.logins_on_a_busy_core().await;
    if run.only.is_some() {
        print_table(&run.rows);
        run.against_bare();
        return;
    }
    let (direct, chat_one) = run.overhead_at_one_connection().await;
    let slow = run.many_slow_chats().await;
    let (first_direct, first_through) = run.first_pieces().await;
    let streams = run.many_slow_streams().await;
    run.server.reset_peak();
    let argon2_rate =
        raw_argon2_rate_on_server_core(pinned, run.measured.min(Duration::from_secs(5)));

    print_table(&run.rows);
    run.closing_lines(&Closing {
        direct,
        chat_one,
        slow,
        first_direct,
        first_through,
        streams,
        argon2_rate,
    });
}

/// What every step measures against, and the table's rows so far.
struct Scenarios {
    server: Server,
    /// The floor for the static and `/balance` routes (see `bare`).
    bare: BareServer,
    target: Arc<Target>,
    /// The fake model's address, for the direct calls.
    model: SocketAddr,
    pinned: bool,
    measured: Duration,
    /// `BENCH_ONLY`.
    only: Option<String>,
    rows: Vec<Row>,
}

/// The bare server's row measured right after tokenchat's scenario `name`, if it has one.
fn bare_counterpart(name: &str) -> Option<&'static str> {
    match name {
        STATIC => Some(BARE_STATIC),
        BALANCE => Some(BARE_BALANCE),
        _ => None,
    }
}

const STATIC: &str = "static GET /health";
const BALANCE: &str = "GET /balance";
const BARE_STATIC: &str = "bare axum: static GET /health";
const BARE_BALANCE: &str = "bare axum + sqlx: GET /balance";

/// The outcomes the closing lines compare.
struct Closing {
    direct: Outcome,
    chat_one: Outcome,
    slow: Outcome,
    first_direct: Outcome,
    first_through: Outcome,
    streams: Outcome,
    argon2_rate: f64,
}

fn chat_body() -> String {
    json!({ "message": "code hello world in python" }).to_string()
}

fn login_body() -> String {
    json!({ "username": "bench", "password": "bench-password" }).to_string()
}

impl Scenarios {
    /// Whether `BENCH_ONLY` leaves the scenario `name` in.
    fn selected(&self, name: &str) -> bool {
        self.only.as_deref().is_none_or(|only| name.contains(only))
    }

    /// The throughput scenarios: `CONNECTIONS` closed loops on one route each.
    async fn throughput(&mut self) {
        let target = &self.target;
        // Unique across warm-up and measurement: every registration must create a user.
        let registrations = Arc::new(AtomicU64::new(0));
        let scenarios: Vec<(&str, usize, Arc<MakeRequest>)> = vec![
            (STATIC, CONNECTIONS, target.get("/health")),
            (BALANCE, CONNECTIONS, target.get("/balance")),
            (
                "POST /chat (instant model)",
                CONNECTIONS,
                target.post("/chat", chat_body()),
            ),
            (
                "POST /login",
                CONNECTIONS,
                target.post("/login", login_body()),
            ),
            (
                "POST /register",
                CONNECTIONS,
                Arc::new(move |_, _| {
                    let n = registrations.fetch_add(1, Ordering::Relaxed);
                    let body =
                        json!({ "username": format!("user{n}"), "password": "bench-password" });
                    request(Method::POST, "/register", None, body.to_string())
                }),
            ),
        ];
        for (name, connections, make) in scenarios {
            if !self.selected(name) {
                continue;
            }
            let expected = if name.contains("register") {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            let addr = self.target.addr;
            closed_loop(addr, connections, WARM_UP, expected, make.clone()).await;
            self.server.reset_peak();
            let outcome =
                closed_loop(addr, connections, self.measured, expected, make.clone()).await;
            self.rows.push(Row::new(
                name,
                connections,
                &outcome,
                self.server.peak_rss(),
            ));
            if let Some(bare_name) = bare_counterpart(name) {
                // Right after, the same load on the bare server: the ratio is of one run.
                let bare = self.bare.addr;
                closed_loop(bare, connections, WARM_UP, expected, make.clone()).await;
                let outcome = closed_loop(bare, connections, self.measured, expected, make).await;
                self.rows
                    .push(Row::new(bare_name, connections, &outcome, None));
            }
        }
    }

    /// Reads while the server's core also hashes passwords: a few connections asking for
    /// the balance beside LOGIN_BURST connections logging in.
    async fn reads_during_logins(&mut self) {
        let during_logins = format!("GET /balance during {LOGIN_BURST} logins");
        if !self.selected(&during_logins) {
            return;
        }
        let (balance, logins) = (
            self.target.get("/balance"),
            self.target.post("/login", login_body()),
        );
        let both = |duration| {
            let (balance, logins) = (balance.clone(), logins.clone());
            let addr = self.target.addr;
            async move {
                tokio::join!(
                    closed_loop(
                        addr,
                        READERS_DURING_LOGINS,
                        duration,
                        StatusCode::OK,
                        balance
                    ),
                    closed_loop(addr, LOGIN_BURST, duration, StatusCode::OK, logins),
                )
            }
        };
        both(WARM_UP).await;
        self.server.reset_peak();
        let (balance, logins) = both(self.measured).await;
        self.rows.push(Row::new(
            &during_logins,
            READERS_DURING_LOGINS,
            &balance,
            self.server.peak_rss(),
        ));
        self.rows.push(Row::new(
            "POST /login beside those reads",
            LOGIN_BURST,
            &logins,
            self.server.peak_rss(),
        ));
    }

    /// Logins one at a time while another process keeps the server's core busy: what the
    /// hashing threads' low priority costs a login when the core has nothing left over.
    async fn logins_on_a_busy_core(&mut self) {
        let busy_core = "POST /login, server's core busy with another process";
        if !self.pinned || !self.selected(busy_core) {
            return;
        }
        let _spinner = CoreSpinner::start(self.measured);
        self.server.reset_peak();
        let logins = closed_loop(
            self.target.addr,
            1,
            self.measured,
            StatusCode::OK,
            self.target.post("/login", login_body()),
        )
        .await;
        self.rows
            .push(Row::new(busy_core, 1, &logins, self.server.peak_rss()));
    }

    /// Overhead at one connection: the same model call, direct and through tokenchat.
    async fn overhead_at_one_connection(&mut self) -> (Outcome, Outcome) {
        let direct_body = json!({
            "model": "llama3.2",
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
        let chat_one = self.target.post("/chat", chat_body());
        let (model, addr, measured) = (self.model, self.target.addr, self.measured);
        closed_loop(model, 1, WARM_UP, StatusCode::OK, direct.clone()).await;
        let direct = closed_loop(model, 1, measured, StatusCode::OK, direct).await;
        self.rows.push(Row::new(
            "direct model call (no tokenchat)",
            1,
            &direct,
            None,
        ));
        closed_loop(addr, 1, WARM_UP, StatusCode::OK, chat_one.clone()).await;
        self.server.reset_peak();
        let chat_one = closed_loop(addr, 1, measured, StatusCode::OK, chat_one).await;
        self.rows.push(Row::new(
            "POST /chat (instant model)",
            1,
            &chat_one,
            self.server.peak_rss(),
        ));
        (direct, chat_one)
    }

    /// SLOW_CHATS chats at once on a model that takes 2 s.
    async fn many_slow_chats(&mut self) -> Outcome {
        self.server.reset_peak();
        let slow = slow_chats(&self.target).await;
        self.rows.push(Row::new(
            "POST /chat, model takes 2 s (one shot)",
            SLOW_CHATS,
            &slow,
            self.server.peak_rss(),
        ));
        slow
    }

    /// Streaming: how long the first piece of an answer takes, from the model itself and
    /// through tokenchat (one client, one request at a time).
    async fn first_pieces(&mut self) -> (Outcome, Outcome) {
        let direct_stream_body = json!({
            "model": "llama3.2",
            "stream": true,
            "messages": [{ "role": "user", "content": "code hello world in python" }]
        })
        .to_string();
        let first_direct = first_piece_latency(
            self.model,
            Arc::new(move |_, _| {
                request(
                    Method::POST,
                    "/v1/chat/completions",
                    None,
                    direct_stream_body.clone(),
                )
            }),
            b"data:",
            self.measured,
        )
        .await;
        self.rows.push(Row::new(
            "first piece, direct model stream",
            1,
            &first_direct,
            None,
        ));
        self.server.reset_peak();
        let stream_body =
            json!({ "message": "code hello world in python", "stream": true }).to_string();
        let first_through = first_piece_latency(
            self.target.addr,
            self.target.post("/chat", stream_body),
            b"event: delta",
            self.measured,
        )
        .await;
        self.rows.push(Row::new(
            "first delta, POST /chat stream",
            1,
            &first_through,
            self.server.peak_rss(),
        ));
        (first_direct, first_through)
    }

    /// Then many slow streams at once.
    async fn many_slow_streams(&mut self) -> Outcome {
        self.server.reset_peak();
        let streams = slow_streams(&self.target).await;
        self.rows.push(Row::new(
            "POST /chat stream, 20 chunks over 2 s (one shot)",
            SLOW_STREAMS,
            &streams,
            self.server.peak_rss(),
        ));
        streams
    }

    /// Requests/s of a row whose name starts with `name` (0 when it did not run).
    fn rate(&self, name: &str) -> f64 {
        self.rows
            .iter()
            .find(|row| row.name.starts_with(name))
            .map_or(0.0, |row| row.rps)
    }

    /// The static route and `/balance` as fractions of the bare server's, when they ran.
    fn against_bare(&self) {
        let (static_ratio, balance_ratio) = (
            self.rate(STATIC) / self.rate(BARE_STATIC),
            self.rate(BALANCE) / self.rate(BARE_BALANCE),
        );
        if static_ratio.is_finite() || balance_ratio.is_finite() {
            println!(
                "against bare axum in this run: static /health {static_ratio:.2}, /balance {balance_ratio:.2} (of bare axum + sqlx)"
            );
        }
    }

    /// The lines under the table: overheads, ratios, the one-shot bursts and peak memory.
    fn closing_lines(&self, closing: &Closing) {
        let rate = |name: &str| self.rate(name);
        let overhead = |quantile: f64| {
            closing.chat_one.histogram.value_at_quantile(quantile) as f64 / 1000.0
                - closing.direct.histogram.value_at_quantile(quantile) as f64 / 1000.0
        };
        println!();
        println!(
            "chat overhead at 1 connection: p50 {:.3} ms, p99 {:.3} ms (chat minus direct model call)",
            overhead(0.5),
            overhead(0.99)
        );
        println!(
            "/balance is {:.0}% of the static route",
            100.0 * rate(BALANCE) / rate(STATIC)
        );
        self.against_bare();
        let argon2_rate = closing.argon2_rate;
        println!("raw Argon2id (19 MiB, t=2, p=1) on the server's core: {argon2_rate:.1} hashes/s; /login is {:.0}% of it", 100.0 * rate("POST /login") / argon2_rate);
        let slow = &closing.slow;
        println!(
            "{SLOW_CHATS} concurrent slow chats: {} answered, {} failed, all done in {:.2} s",
            slow.requests - slow.errors,
            slow.errors,
            slow.elapsed.as_secs_f64()
        );
        let first_overhead = |quantile: f64| {
            closing.first_through.histogram.value_at_quantile(quantile) as f64 / 1000.0
                - closing.first_direct.histogram.value_at_quantile(quantile) as f64 / 1000.0
        };
        println!(
            "time to first delta added by tokenchat at 1 connection: p50 {:.3} ms, p99 {:.3} ms",
            first_overhead(0.5),
            first_overhead(0.99)
        );
        let streams = &closing.streams;
        println!(
            "{SLOW_STREAMS} concurrent slow streams: {} completed with `done`, {} did not, all done in {:.2} s",
            streams.requests - streams.errors,
            streams.errors,
            streams.elapsed.as_secs_f64()
        );
        println!(
            "server peak RSS over the whole run (VmHWM): {:.1} MB",
            self.server.high_water_mark() as f64 / 1e6
        );
    }
}
