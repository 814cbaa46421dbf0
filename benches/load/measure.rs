//! How load is driven and measured: closed loops of keep-alive connections, one-shot
//! bursts, the latency of a stream's first piece; their outcomes in HDR histograms with
//! the CPU time they cost.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use hdrhistogram::Histogram;
use http_body_util::BodyExt;
use hyper::{Method, StatusCode};
use serde_json::{json, Value};

use crate::client::{connect, request, MakeRequest, Target};
use crate::{SLOW_CHATS, SLOW_STREAMS, WARM_UP};

/// What one scenario measured.
pub struct Outcome {
    pub requests: u64,
    pub errors: u64,
    pub elapsed: Duration,
    pub histogram: Histogram<u64>,
    /// The share of the machine's CPU time the hypervisor took (steal) while it ran.
    pub stolen: f64,
    /// The answers of another status than the one expected, by status (closed loops only;
    /// requests that got no answer count in `errors` alone).
    pub statuses: BTreeMap<u16, u64>,
}

impl Outcome {
    pub fn new() -> Self {
        Self {
            requests: 0,
            errors: 0,
            elapsed: Duration::ZERO,
            histogram: histogram(),
            stolen: 0.0,
            statuses: BTreeMap::new(),
        }
    }
}

/// The machine's CPU time counters (`/proc/stat`, all cores), in clock ticks.
#[derive(Clone, Copy)]
struct CpuTimes {
    total: u64,
    steal: u64,
}

impl CpuTimes {
    fn now() -> Self {
        let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        let fields: Vec<u64> = stat
            .lines()
            .next()
            .unwrap_or_default()
            .split_whitespace()
            .skip(1)
            .filter_map(|field| field.parse().ok())
            .collect();
        Self {
            // user, nice, system, idle, iowait, irq, softirq, steal (guest time is in user).
            total: fields.iter().take(8).sum(),
            steal: fields.get(7).copied().unwrap_or(0),
        }
    }

    /// The share of CPU time stolen from this machine since `self`: a noisy neighbour's.
    fn stolen_since(self) -> f64 {
        let now = Self::now();
        (now.steal - self.steal) as f64 / (now.total - self.total).max(1) as f64
    }
}

impl Outcome {
    /// Adds another measurement of the same scenario to this one.
    pub fn absorb(&mut self, other: Outcome) {
        let (mine, theirs) = (self.elapsed.as_secs_f64(), other.elapsed.as_secs_f64());
        self.stolen = (self.stolen * mine + other.stolen * theirs) / (mine + theirs).max(1e-9);
        self.requests += other.requests;
        self.errors += other.errors;
        for (status, count) in other.statuses {
            *self.statuses.entry(status).or_default() += count;
        }
        self.elapsed += other.elapsed;
        self.histogram.add(other.histogram).expect("same bounds");
    }
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 120_000_000, 3).expect("histogram")
}

/// `connections` clients, each sending its next request as soon as the last is answered,
/// until `duration` is over. Latencies in microseconds.
pub async fn closed_loop(
    addr: SocketAddr,
    connections: usize,
    duration: Duration,
    expected: StatusCode,
    make: Arc<MakeRequest>,
) -> Outcome {
    closed_loop_across(&[addr], connections, duration, expected, make).await
}

/// [`closed_loop`] with the connections spread evenly over several servers.
pub async fn closed_loop_across(
    addrs: &[SocketAddr],
    connections: usize,
    duration: Duration,
    expected: StatusCode,
    make: Arc<MakeRequest>,
) -> Outcome {
    let start = Instant::now();
    let cpu = CpuTimes::now();
    let deadline = start + duration;
    let clients: Vec<_> = (0..connections)
        .map(|conn| {
            let make = make.clone();
            let addr = addrs[conn % addrs.len()];
            tokio::spawn(async move {
                let mut sender = connect(addr).await;
                let mut histogram = histogram();
                let (mut requests, mut errors) = (0u64, 0u64);
                let mut statuses = BTreeMap::<u16, u64>::new();
                while Instant::now() < deadline {
                    let request = make(conn, requests);
                    let sent = Instant::now();
                    let ok = match sender.send_request(request).await {
                        Ok(response) => {
                            let status = response.status();
                            if status != expected {
                                *statuses.entry(status.as_u16()).or_default() += 1;
                            }
                            response.into_body().collect().await.is_ok() && status == expected
                        }
                        Err(_) => false,
                    };
                    histogram.saturating_record(sent.elapsed().as_micros() as u64);
                    requests += 1;
                    if !ok {
                        errors += 1;
                        if sender.ready().await.is_err() {
                            sender = connect(addr).await;
                        }
                    }
                }
                (requests, errors, histogram, statuses)
            })
        })
        .collect();
    let mut outcome = Outcome::new();
    for client in clients {
        let (requests, errors, histogram, statuses) = client.await.expect("client task");
        outcome.requests += requests;
        outcome.errors += errors;
        for (status, count) in statuses {
            *outcome.statuses.entry(status).or_default() += count;
        }
        outcome.histogram.add(histogram).expect("same bounds");
    }
    outcome.elapsed = start.elapsed();
    outcome.stolen = cpu.stolen_since();
    outcome
}

/// Opens `SLOW_CHATS` connections, then sends one chat on each at once to a model that
/// takes two seconds to answer.
pub async fn slow_chats(target: &Target) -> Outcome {
    let body = json!({ "message": "[slow] code hello world in python" });
    one_shot(target, SLOW_CHATS, body, |_| true).await
}

/// Opens `SLOW_STREAMS` connections, then starts one streamed chat on each at once, on a
/// model that writes its answer in 20 chunks over 2 s; a stream counts when it ends with
/// `done`.
pub async fn slow_streams(target: &Target) -> Outcome {
    let body = json!({ "message": "[slow] code hello world in python", "stream": true });
    one_shot(target, SLOW_STREAMS, body, |body| {
        body.windows(11).any(|window| window == b"event: done")
    })
    .await
}

/// Opens `connections` connections, then sends `body` to `/chat` on each at once; a request
/// counts when it is a 200 whose whole body passes `complete`.
async fn one_shot(
    target: &Target,
    connections: usize,
    body: Value,
    complete: fn(&[u8]) -> bool,
) -> Outcome {
    let mut senders = Vec::with_capacity(connections);
    for _ in 0..connections {
        senders.push(connect(target.addr).await);
    }
    let body = body.to_string();
    let start = Instant::now();
    let cpu = CpuTimes::now();
    let requests: Vec<_> = senders
        .into_iter()
        .map(|mut sender| {
            let request = request(Method::POST, "/chat", Some(&target.token), body.clone());
            tokio::spawn(async move {
                let sent = Instant::now();
                let ok = match sender.send_request(request).await {
                    Ok(response) if response.status() == StatusCode::OK => {
                        match response.into_body().collect().await {
                            Ok(body) => complete(&body.to_bytes()),
                            Err(_) => false,
                        }
                    }
                    _ => false,
                };
                (ok, sent.elapsed())
            })
        })
        .collect();
    let mut outcome = Outcome::new();
    for request in requests {
        let (ok, latency) = request.await.expect("request task");
        outcome.requests += 1;
        outcome.errors += u64::from(!ok);
        outcome
            .histogram
            .saturating_record(latency.as_micros() as u64);
    }
    outcome.elapsed = start.elapsed();
    outcome.stolen = cpu.stolen_since();
    outcome
}

/// One client sending one request at a time for `duration`: the latency to the first byte
/// sequence `marker` in each response body (the rest is read before the next request).
pub async fn first_piece_latency(
    addr: SocketAddr,
    make: Arc<MakeRequest>,
    marker: &'static [u8],
    duration: Duration,
) -> Outcome {
    let mut sender = connect(addr).await;
    let mut outcome = Outcome::new();
    let start = Instant::now();
    let cpu = CpuTimes::now();
    let deadline = start + WARM_UP + duration;
    while Instant::now() < deadline {
        let request = make(0, outcome.requests);
        let sent = Instant::now();
        let mut first = None;
        let mut ok = false;
        if let Ok(response) = sender.send_request(request).await {
            let mut body = response.into_body();
            let mut seen = Vec::new();
            while let Some(Ok(frame)) = body.frame().await {
                if let Ok(data) = frame.into_data() {
                    seen.extend_from_slice(&data);
                    if first.is_none() && seen.windows(marker.len()).any(|w| w == marker) {
                        first = Some(sent.elapsed());
                    }
                }
            }
            ok = first.is_some();
        }
        // The first second warms up, as in every other scenario.
        if sent.duration_since(start) < WARM_UP {
            continue;
        }
        outcome.requests += 1;
        outcome.errors += u64::from(!ok);
        if let Some(latency) = first {
            outcome
                .histogram
                .saturating_record(latency.as_micros() as u64);
        }
    }
    outcome.elapsed = start.elapsed() - WARM_UP;
    outcome.stolen = cpu.stolen_since();
    outcome
}
