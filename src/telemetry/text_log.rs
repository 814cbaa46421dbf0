//! The text log line (`LOG_FORMAT=text`): the same line as `tracing_subscriber`'s default
//! (`Full`) format without colours, written for less.
//!
//! The default format writes every field through `Debug` and `write!`, paints every name and
//! separator with a `nu_ansi_term` style even when the style is empty, escapes the message one
//! character at a time, and formats the whole timestamp for every line: about 9k instructions
//! of a 41k-instruction `GET /health` (BENCHMARKS.md, issue 23). Here, when the output has no
//! colours, strings, integers and booleans are written as they are (quoted as `Debug` quotes
//! them), the message is escaped by runs, and the timestamp's date and second are formatted
//! once a second per thread; other values (`%display`, `?debug`, floats) are written through
//! `Debug` as the crate writes them. Errors, raw identifiers (`r#type`) and a colour terminal
//! go to the crate's own formatters. So the text is the crate's byte for byte, which
//! `text_log/tests.rs` and `tests/api/operations/logs.rs` hold it to. (The crate also drops
//! `log.*` fields when its `tracing-log` feature is on; this build does not turn it on.)

use std::{
    cell::Cell,
    fmt::{self, Write as _},
    time::UNIX_EPOCH,
};

use tracing::{field::Field, Event, Level, Subscriber};
use tracing_subscriber::{
    field::{RecordFields, Visit, VisitOutput},
    fmt::{
        format::{DefaultFields, DefaultVisitor, Format, Full, Writer},
        time::{FormatTime, SystemTime},
        FmtContext, FormatEvent, FormatFields, FormattedFields,
    },
    registry::LookupSpan,
};

/// The event formatter of the text format: the crate's `Full` format, which it falls back
/// to for a colour terminal.
#[derive(Default)]
pub struct TextLine {
    coloured: Format<Full, SystemTime>,
}

impl<S, N> FormatEvent<S, N> for TextLine
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        if writer.has_ansi_escapes() {
            return self.coloured.format_event(ctx, writer, event);
        }
        let meta = event.metadata();
        write_timestamp(&mut writer)?;
        writer.write_str(match *meta.level() {
            Level::TRACE => "TRACE ",
            Level::DEBUG => "DEBUG ",
            Level::INFO => " INFO ",
            Level::WARN => " WARN ",
            Level::ERROR => "ERROR ",
        })?;
        if let Some(scope) = ctx.event_scope() {
            let mut seen = false;
            for span in scope.from_root() {
                writer.write_str(span.metadata().name())?;
                seen = true;
                let extensions = span.extensions();
                if let Some(fields) = extensions.get::<FormattedFields<N>>() {
                    if !fields.is_empty() {
                        writer.write_char('{')?;
                        writer.write_str(fields)?;
                        writer.write_char('}')?;
                    }
                }
                writer.write_char(':')?;
            }
            if seen {
                writer.write_char(' ')?;
            }
        }
        writer.write_str(meta.target())?;
        writer.write_str(": ")?;
        ctx.format_fields(writer.by_ref(), event)?;
        writer.write_char('\n')
    }
}

/// The last second a thread formatted: seconds since the epoch, and its text up to and
/// including the `.` before the microseconds (`2026-12-07T00:02:01.`).
#[derive(Clone, Copy)]
struct Second {
    epoch: u64,
    text: [u8; 20],
}

thread_local! {
    static LAST_SECOND: Cell<Option<Second>> = const { Cell::new(None) };
}

/// Writes the time as the crate's `SystemTime` timer does (RFC 3339, UTC, microseconds:
/// `2026-12-07T00:02:01.123456Z `), reusing the date and second of the thread's last line.
/// Caching is not something `tracing_subscriber`'s timers do, hence this; the date itself is
/// the `time` crate's. A time the cache cannot hold (before 1970, after 9999) is the crate
/// timer's.
fn write_timestamp(writer: &mut Writer<'_>) -> fmt::Result {
    let Ok(now) = std::time::SystemTime::now().duration_since(UNIX_EPOCH) else {
        return crate_timestamp(writer);
    };
    let epoch = now.as_secs();
    let second = match LAST_SECOND.get() {
        Some(second) if second.epoch == epoch => second,
        _ => match format_second(epoch) {
            Some(second) => {
                LAST_SECOND.set(Some(second));
                second
            }
            None => return crate_timestamp(writer),
        },
    };
    let mut micros = now.subsec_micros();
    let mut digits = *b"000000Z ";
    for digit in digits[..6].iter_mut().rev() {
        *digit = b'0' + (micros % 10) as u8;
        micros /= 10;
    }
    // Both are ASCII digits and punctuation, written above or by `format_second`.
    writer.write_str(std::str::from_utf8(&second.text).map_err(|_| fmt::Error)?)?;
    writer.write_str(std::str::from_utf8(&digits).map_err(|_| fmt::Error)?)
}

fn format_second(epoch: u64) -> Option<Second> {
    let at = time::OffsetDateTime::from_unix_timestamp(i64::try_from(epoch).ok()?).ok()?;
    if at.year() > 9999 {
        return None;
    }
    let mut text = [0u8; 20];
    let mut cursor = &mut text[..];
    std::io::Write::write_fmt(
        &mut cursor,
        format_args!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.",
            at.year(),
            u8::from(at.month()),
            at.day(),
            at.hour(),
            at.minute(),
            at.second()
        ),
    )
    .ok()?;
    cursor.is_empty().then_some(Second { epoch, text })
}

fn crate_timestamp(writer: &mut Writer<'_>) -> fmt::Result {
    if SystemTime.format_time(writer).is_err() {
        writer.write_str("<unknown time>")?;
    }
    writer.write_char(' ')
}

/// The field formatter of the text format (a span's fields, once, when it is made; an
/// event's on its line). A colour terminal gets the crate's [`DefaultFields`].
#[derive(Default)]
pub struct TextFields;

impl<'writer> FormatFields<'writer> for TextFields {
    fn format_fields<R: RecordFields>(&self, writer: Writer<'writer>, fields: R) -> fmt::Result {
        if writer.has_ansi_escapes() || !writer.sanitizes_ansi_escapes() {
            return DefaultFields::new().format_fields(writer, fields);
        }
        // Gathered on the stack and handed over in one piece: a span's fields go into a new
        // `String`, which would otherwise grow (and reallocate) a few times per span.
        let mut gathered = Gathered {
            bytes: [0; GATHERED],
            len: 0,
            to: writer,
        };
        let mut visitor = TextVisitor {
            writer: Writer::new(&mut gathered),
            is_empty: true,
            result: Ok(()),
        };
        fields.record(&mut visitor);
        visitor.result?;
        gathered.flush()
    }
}

const GATHERED: usize = 256;

/// A small buffer in front of a [`Writer`], emptied into it when full and at the end.
struct Gathered<'writer> {
    bytes: [u8; GATHERED],
    len: usize,
    to: Writer<'writer>,
}

impl Gathered<'_> {
    fn flush(&mut self) -> fmt::Result {
        // Only whole `&str`s are copied in, so the bytes are UTF-8.
        let text = std::str::from_utf8(&self.bytes[..self.len]).map_err(|_| fmt::Error)?;
        self.to.write_str(text)?;
        self.len = 0;
        Ok(())
    }
}

impl fmt::Write for Gathered<'_> {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        if self.len + text.len() > GATHERED {
            self.flush()?;
            if text.len() > GATHERED {
                return self.to.write_str(text);
            }
        }
        self.bytes[self.len..self.len + text.len()].copy_from_slice(text.as_bytes());
        self.len += text.len();
        Ok(())
    }

    fn write_char(&mut self, character: char) -> fmt::Result {
        match self.bytes.get_mut(self.len) {
            Some(byte) if character.is_ascii() => {
                *byte = character as u8;
                self.len += 1;
                Ok(())
            }
            _ => self.write_str(character.encode_utf8(&mut [0; 4])),
        }
    }
}

/// Writes fields as the crate's [`DefaultVisitor`] does without colours and with ANSI
/// sanitization (its defaults), and hands it what is not written here.
struct TextVisitor<'a> {
    writer: Writer<'a>,
    is_empty: bool,
    result: fmt::Result,
}

impl<'a> TextVisitor<'a> {
    /// `name=` after a space unless first; `None` when the field is the crate visitor's.
    fn begin(&mut self, field: &Field) -> Option<&mut Writer<'a>> {
        if self.result.is_err() {
            return None;
        }
        let name = field.name();
        if name.starts_with("r#") {
            return None;
        }
        if !std::mem::take(&mut self.is_empty) {
            self.result = self.writer.write_char(' ');
        }
        if self.result.is_ok() && name != "message" {
            self.result = self
                .writer
                .write_str(name)
                .and_then(|()| self.writer.write_char('='));
        }
        Some(&mut self.writer)
    }

    fn by_crate(&mut self, record: impl FnOnce(&mut DefaultVisitor<'_>)) {
        if self.result.is_err() {
            return;
        }
        let mut visitor = DefaultVisitor::new(self.writer.by_ref(), self.is_empty);
        record(&mut visitor);
        self.result = visitor.finish();
        self.is_empty = false;
    }

    fn record_quoted(&mut self, field: &Field, value: &str) {
        let Some(writer) = self.begin(field) else {
            return self.by_crate(|crate_visitor| crate_visitor.record_str(field, value));
        };
        // `Debug` of a string that needs no escape is the string in quotes.
        let plain = value
            .bytes()
            .all(|byte| (b' '..=b'~').contains(&byte) && byte != b'"' && byte != b'\\');
        let result = if plain {
            writer
                .write_char('"')
                .and_then(|()| writer.write_str(value))
                .and_then(|()| writer.write_char('"'))
        } else {
            write!(writer, "{value:?}")
        };
        self.result = self.result.and(result);
    }
}

impl Visit for TextVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            return self.record_debug(field, &format_args!("{value}"));
        }
        self.record_quoted(field, value);
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        match self.begin(field) {
            Some(writer) => {
                let result = writer.write_str(itoa::Buffer::new().format(value));
                self.result = self.result.and(result);
            }
            None => self.by_crate(|crate_visitor| crate_visitor.record_u64(field, value)),
        }
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        match self.begin(field) {
            Some(writer) => {
                let result = writer.write_str(itoa::Buffer::new().format(value));
                self.result = self.result.and(result);
            }
            None => self.by_crate(|crate_visitor| crate_visitor.record_i64(field, value)),
        }
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        match self.begin(field) {
            Some(writer) => {
                let result = writer.write_str(if value { "true" } else { "false" });
                self.result = self.result.and(result);
            }
            None => self.by_crate(|crate_visitor| crate_visitor.record_bool(field, value)),
        }
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.by_crate(|crate_visitor| crate_visitor.record_error(field, value));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        let message = field.name() == "message";
        let Some(writer) = self.begin(field) else {
            return self.by_crate(|crate_visitor| crate_visitor.record_debug(field, value));
        };
        let result = if message {
            write!(Sanitized(writer), "{value:?}")
        } else {
            write!(writer, "{value:?}")
        };
        self.result = self.result.and(result);
    }
}

/// Escapes, as the crate does in a message, what could drive a terminal: ESC, BEL, BS, FF,
/// DEL as `\x1b` and so on, and the C1 controls (U+0080 to U+009F) as `\u{80}` and so on.
/// The crate's own escaper is private and writes one character at a time; this one writes
/// the runs between them whole.
struct Sanitized<'w, 'a>(&'w mut Writer<'a>);

impl fmt::Write for Sanitized<'_, '_> {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        let mut clean = 0;
        for (at, character) in text.char_indices() {
            let escape = match character {
                '\x1b' => "\\x1b",
                '\x07' => "\\x07",
                '\x08' => "\\x08",
                '\x0c' => "\\x0c",
                '\x7f' => "\\x7f",
                '\u{80}'..='\u{9f}' => "",
                _ => continue,
            };
            self.0.write_str(&text[clean..at])?;
            if escape.is_empty() {
                write!(self.0, "\\u{{{:x}}}", u32::from(character))?;
            } else {
                self.0.write_str(escape)?;
            }
            clean = at + character.len_utf8();
        }
        self.0.write_str(&text[clean..])
    }
}

#[cfg(test)]
mod tests;
