//! What is printed: the table of scenarios and the description of the machine.

use std::fmt::Write as _;

use crate::measure::Outcome;
use crate::{LOAD_CORE, SERVER_CORE};

pub struct Row {
    pub name: String,
    connections: usize,
    pub rps: f64,
    pub p50: u64,
    p90: u64,
    pub p99: u64,
    errors: u64,
    peak_rss: Option<u64>,
    stolen: f64,
}

impl Row {
    pub fn new(name: &str, connections: usize, outcome: &Outcome, peak_rss: Option<u64>) -> Self {
        let histogram = &outcome.histogram;
        Self {
            name: name.to_string(),
            connections,
            rps: outcome.requests as f64 / outcome.elapsed.as_secs_f64(),
            p50: histogram.value_at_quantile(0.50),
            p90: histogram.value_at_quantile(0.90),
            p99: histogram.value_at_quantile(0.99),
            errors: outcome.errors,
            peak_rss,
            stolen: outcome.stolen,
        }
    }
}

pub fn print_table(rows: &[Row]) {
    let ms = |micros: u64| format!("{:.3}", micros as f64 / 1000.0);
    println!("| scenario | connections | requests/s | p50 ms | p90 ms | p99 ms | p99/p50 | errors | server peak RSS MB | CPU stolen |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for row in rows {
        println!(
            "| {} | {} | {:.0} | {} | {} | {} | {:.2} | {} | {} | {:.0}% |",
            row.name,
            row.connections,
            row.rps,
            ms(row.p50),
            ms(row.p90),
            ms(row.p99),
            row.p99 as f64 / row.p50.max(1) as f64,
            row.errors,
            row.peak_rss
                .map_or("-".to_string(), |rss| format!("{:.1}", rss as f64 / 1e6)),
            100.0 * row.stolen,
        );
    }
}

pub fn describe_machine(pinned: bool) -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|line| line.starts_with("model name"))
                .and_then(|line| line.split(':').nth(1))
                .map(|model| model.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |cores| cores.get());
    let mut text = format!("machine: {cpu}; ");
    if pinned {
        let _ = write!(text, "server pinned to core {SERVER_CORE}, load generator and fake model to core {LOAD_CORE}");
    } else {
        let _ = write!(text, "{cores} core(s): nothing pinned");
    }
    text
}
