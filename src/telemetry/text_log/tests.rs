//! The text line against the crate's default format: the same bytes but for the time.

use std::{
    io,
    sync::{Arc, Mutex},
};

use tracing::Level;
use tracing_subscriber::fmt::{format::FmtSpan, MakeWriter};

use super::{format_second, TextFields, TextLine};

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl io::Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Captured {
    type Writer = Self;

    fn make_writer(&'a self) -> Self {
        self.clone()
    }
}

#[derive(Debug)]
struct Failed(std::fmt::Error);

impl std::fmt::Display for Failed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the outer \x1b[31m failure")
    }
}

impl std::error::Error for Failed {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.0)
    }
}

/// Every kind of value and span the service logs, and a few it might.
fn log_everything() {
    tracing::info!("outside any span");
    let request = tracing::info_span!(
        "request",
        request_id = "abc-1",
        method = %http::Method::GET,
        route = "/health",
        late = tracing::field::Empty,
    );
    let entered = request.enter();
    tracing::info!(status = 200u16, latency_us = 42u64, "answered");
    request.record("late", 7);
    tracing::warn!(
        quoted = "say \"hi\"\n\tback\\slash, é and \u{85}",
        negative = -5i64,
        yes = true,
        ratio = 0.25f64,
        big = 1u128 << 100,
        debugged = ?Some("x"),
        shown = %"shown \x1b",
        r#type = "raw",
        "with {} arguments and \x07\x08\x0c\x7f\x1b[0m \u{9f} controls",
        2
    );
    tracing::error!(
        error = &Failed(std::fmt::Error) as &dyn std::error::Error,
        "failed"
    );
    tracing::info!(message = "message as a str \x1b");
    tracing::debug!(only = "fields");
    {
        let inner = tracing::info_span!("inner");
        let _inner = inner.enter();
        let long = "y".repeat(300);
        let nested = tracing::trace_span!("nested", long = long.as_str(), n = 3);
        let _nested = nested.enter();
        tracing::trace!(long = long.as_str(), "deep");
    }
    drop(entered);
}

fn lines(ours: bool, ansi: bool) -> Vec<String> {
    let captured = Captured::default();
    let builder = tracing_subscriber::fmt()
        .with_writer(captured.clone())
        .with_max_level(Level::TRACE)
        .with_span_events(FmtSpan::NEW)
        .with_ansi(ansi);
    if ours {
        let subscriber = builder
            .fmt_fields(TextFields)
            .event_format(TextLine::default())
            .finish();
        tracing::subscriber::with_default(subscriber, log_everything);
    } else {
        tracing::subscriber::with_default(builder.finish(), log_everything);
    }
    let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    text.lines().map(str::to_string).collect()
}

/// The line without its timestamp, which it checks for shape: `2026-12-07T00:02:01.123456Z `.
fn untimed(line: &str) -> &str {
    let (time, rest) = line.split_at(28);
    let shape = time.bytes().enumerate().all(|(at, byte)| match at {
        4 | 7 => byte == b'-',
        10 => byte == b'T',
        13 | 16 => byte == b':',
        19 => byte == b'.',
        26 => byte == b'Z',
        27 => byte == b' ',
        _ => byte.is_ascii_digit(),
    });
    assert!(shape, "{line}");
    rest
}

#[test]
fn the_line_is_the_crates_default_line() {
    let (ours, default) = (lines(true, false), lines(false, false));
    assert_eq!(ours.len(), default.len(), "{ours:#?}\n{default:#?}");
    assert_eq!(ours.len(), 10, "{ours:#?}");
    for (ours, default) in ours.iter().zip(&default) {
        assert_eq!(untimed(ours), untimed(default));
    }
    let answered = ours.iter().find(|line| line.contains("answered")).unwrap();
    assert_eq!(
        untimed(answered),
        " INFO request{request_id=\"abc-1\" method=GET route=\"/health\"}: \
         tokenchat::telemetry::text_log::tests: answered status=200 latency_us=42"
    );
    // What could drive a terminal is escaped in a message, as the crate escapes it.
    assert!(ours
        .iter()
        .any(|line| line.contains(r"\x07\x08\x0c\x7f\x1b[0m \u{9f}")));
}

#[test]
fn a_colour_terminal_gets_the_crates_line() {
    let (ours, default) = (lines(true, true), lines(false, true));
    assert_eq!(ours.len(), default.len());
    for (ours, default) in ours.iter().zip(&default) {
        // The time differs; what follows it (its `Z`) must not.
        assert_eq!(
            ours.split_once('Z').unwrap().1,
            default.split_once('Z').unwrap().1
        );
    }
}

#[test]
fn a_second_is_written_as_the_crate_writes_it() {
    for (epoch, text) in [
        (0, "1970-01-01T00:00:00."),
        (1_700_000_000, "2023-11-14T22:13:20."),
        (2_000_000_000, "2033-05-18T03:33:20."),
        (253_402_300_799, "9999-12-31T23:59:59."),
    ] {
        let second = format_second(epoch).unwrap();
        assert_eq!(std::str::from_utf8(&second.text).unwrap(), text);
    }
    // Past 9999, the crate's own timer writes it.
    assert!(format_second(253_402_300_800).is_none());
}
