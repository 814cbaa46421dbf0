//! An OpenAI client's request, passed upstream as it sent it: the fields tokenchat owns
//! (`model`, `stream`, `stream_options`, and the system prompt at the head of `messages`)
//! written anew, every other field copied as the raw JSON the client sent, in pieces that
//! share the memory of the client's body rather than a copy of it.

use std::{
    any::Any,
    collections::VecDeque,
    convert::Infallible,
    pin::Pin,
    task::{Context, Poll},
};

use axum::body::Bytes;
use http_body::{Frame, SizeHint};
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};

use super::output_cap::CapField;
use super::raw::{json_string, push_name, slice_of, write_object, Element, Field, Fields};

/// From this size a raw value goes upstream as a slice of the client's body (an image);
/// smaller ones are copied together, so the body is a few pieces, not two per field.
const SLICED_FROM_BYTES: usize = 16 * 1024;
/// The most copied into one piece: below glibc's mmap threshold (128 KiB, see
/// `server::body_budget`), so each piece comes from the allocator's arenas, reused from one
/// request to the next, rather than from pages mapped and faulted in anew for each
/// (measured: a 100 KB request copied into one growing buffer spent 7% of the server's
/// time in page faults).
const COPIED_PIECE_BYTES: usize = 64 * 1024;

/// Whatever keeps a client's body counted against the budget of bodies in memory
/// (`MAX_INFLIGHT_BODY_BYTES`) while tokenchat holds it: dropped with the request, once
/// an upstream has begun to answer it (a call that moves on to another target sends it
/// again).
pub type BodyHold = Box<dyn Any + Send + Sync>;

/// A request of an OpenAI client (`/v1/chat/completions`, `/v1/embeddings`), as it sent it.
pub struct Forwarded {
    /// The served model it asked for.
    pub model: String,
    /// Whether it asked for a streamed answer.
    pub stream: bool,
    /// Whether it asked for the usage chunk of a stream (`stream_options.include_usage`).
    pub include_usage: bool,
    /// The size of the client's body: with [`media_parts`](Self::media_parts), what bounds
    /// the prompt of a priced model (a byte-level token is at least one byte).
    pub body_bytes: u64,
    /// Parts of its messages that are not text (images, audio, files): each reserved at
    /// the model's `media_part_tokens`. Counted only for a priced model.
    pub media_parts: u64,
    /// The client's own output cap (`max_tokens` or `max_completion_tokens`, the smaller).
    pub client_cap: Option<u64>,
    /// Choices asked for (`n`), 1 when not said.
    pub choices: u64,
    /// The output cap tokenchat sends as `max_tokens` when the client set none: a priced
    /// model's `max_output_tokens`, or what a low balance covers.
    pub output_cap: Option<u64>,
    /// `messages` holds no system (or developer) message: `LLM_SYSTEM_PROMPT` goes first.
    pub wants_system_prompt: bool,
    /// Every field but `model`, and, when streamed, `stream` and `stream_options`, as sent,
    /// each in pieces: an expanded array (`messages`) written anew from its objects' raw
    /// fields, every value as sent.
    fields: Vec<(String, Vec<Bytes>)>,
    /// `stream_options` to send, when streamed: the client's with `include_usage` true.
    stream_options: Option<String>,
    /// Released with the request, once it is answered (or given up on).
    _hold: Option<BodyHold>,
}

/// A stream's `stream_options`: the client's (`options`, read by the route) with
/// `include_usage` true, every other option as the client wrote it (vLLM's
/// `continuous_usage_stats`, OpenAI's `include_obfuscation`, ...).
fn asking_for_usage(options: Option<&Fields<'_>>) -> String {
    let others = options.into_iter().flat_map(|options| {
        options
            .raw()
            .filter(|(name, _)| *name != "include_usage")
            .map(|(name, value)| (name, value.get()))
    });
    write_object(others.chain([("include_usage", "true")]))
}

/// The fields [`Forwarded::from_fields`] writes itself rather than copying.
const WRITTEN: [&str; 3] = ["model", "stream", "stream_options"];
/// The fields in which a client caps the answer's length.
pub const CAPS: [&str; 2] = ["max_tokens", "max_completion_tokens"];

impl Forwarded {
    /// A request whose top-level `fields` were read from `body`; the route has checked what
    /// tokenchat needs of them (`model`, `stream`, `messages`).
    pub fn from_fields(
        body: &Bytes,
        fields: &Fields<'_>,
        model: String,
        stream: bool,
        wants_system_prompt: bool,
        hold: Option<BodyHold>,
    ) -> Self {
        let stream_options = fields
            .get("stream_options")
            .map(RawValue::get)
            .filter(|raw| *raw != "null")
            .and_then(|raw| Fields::parse(raw).ok());
        let include_usage = stream_options
            .as_ref()
            .and_then(|options| options.get("include_usage"))
            .is_some_and(|raw| raw.get() == "true");
        let copied = fields
            .iter()
            .filter(|(name, _)| *name != "model" && (!stream || !WRITTEN.contains(name)))
            .filter_map(|(name, value)| {
                let mut pieces = Pieces::writer(body, written_size(value));
                match value {
                    Field::Raw(raw) => pieces.raw(raw.get()),
                    Field::Array(elements) => pieces.objects(elements),
                    // Refused by the route before it would be sent.
                    Field::NotAnArray => return None,
                }
                Some((name.to_string(), pieces.finish()))
            })
            .collect();
        Self {
            model,
            stream,
            include_usage,
            body_bytes: body.len() as u64,
            media_parts: 0,
            client_cap: None,
            choices: 1,
            output_cap: None,
            wants_system_prompt,
            fields: copied,
            stream_options: stream.then(|| asking_for_usage(stream_options.as_ref())),
            _hold: hold,
        }
    }

    /// The raw JSON of a field copied as sent.
    pub fn field(&self, name: &str) -> Option<Vec<u8>> {
        self.fields
            .iter()
            .find(|(field, _)| field == name)
            .map(|(_, pieces)| pieces.concat())
    }

    /// What makes two requests the same for an `Idempotency-Key`: the model and every field
    /// sent upstream (by name, so their order does not matter), but how the answer is
    /// delivered (`stream`, `stream_options`), as hex SHA-256.
    pub fn fingerprint(&self) -> String {
        let mut fields: Vec<&(String, Vec<Bytes>)> = self
            .fields
            .iter()
            .filter(|(name, _)| !WRITTEN.contains(&name.as_str()))
            .collect();
        fields.sort_by(|a, b| a.0.cmp(&b.0));
        let mut hash = Sha256::new();
        hash.update(self.model.as_bytes());
        for (name, pieces) in fields {
            // Lengths first, so that no two different requests hash the same bytes.
            hash.update((name.len() as u64).to_le_bytes());
            hash.update(name.as_bytes());
            let length: usize = pieces.iter().map(Bytes::len).sum();
            hash.update((length as u64).to_le_bytes());
            for piece in pieces {
                hash.update(piece);
            }
        }
        format!("{:x}", hash.finalize())
    }

    /// The output cap tokenchat writes itself: its own when the client set none.
    pub(super) fn written_cap(&self) -> Option<u64> {
        self.output_cap.filter(|_| self.client_cap.is_none())
    }

    /// The body to send upstream, asking for `upstream_model`, with `system_prompt` first
    /// in `messages` when the client sent no system message of its own, and tokenchat's
    /// output cap, if it writes one, in the field `cap`.
    pub(super) fn body(&self, upstream_model: &str, system_prompt: &str, cap: CapField) -> Pieces {
        let mut pieces = VecDeque::with_capacity(2 * self.fields.len() + 4);
        let mut head = String::from("{");
        push_name(&mut head, "model");
        head.push_str(&json_string(upstream_model));
        if let Some(options) = &self.stream_options {
            head.push(',');
            push_name(&mut head, "stream");
            head.push_str("true,");
            push_name(&mut head, "stream_options");
            head.push_str(options);
        }
        // Written only when the client set no cap, so its own fields are null if present.
        let written = self.written_cap();
        if let Some(written) = written {
            head.push(',');
            push_name(&mut head, cap.name());
            head.push_str(&written.to_string());
        }
        for (name, value) in &self.fields {
            if written.is_some() && CAPS.contains(&name.as_str()) {
                continue;
            }
            head.push(',');
            push_name(&mut head, name);
            let mut value = value.iter().cloned();
            let first = value.next().unwrap_or_default();
            if name == "messages" && self.wants_system_prompt && first.first() == Some(&b'[') {
                // `[`, the system message, and the client's messages after its `[`.
                head.push('[');
                head.push_str(&system_message(system_prompt));
                let rest = std::iter::once(first.slice(1..)).chain(value);
                let rest: Vec<Bytes> = rest.collect();
                let empty = rest
                    .iter()
                    .flat_map(|piece| piece.iter())
                    .find(|byte| !byte.is_ascii_whitespace())
                    .is_none_or(|byte| *byte == b']');
                if !empty {
                    head.push(',');
                }
                pieces.push_back(Bytes::from(std::mem::take(&mut head)));
                pieces.extend(rest);
            } else {
                pieces.push_back(Bytes::from(std::mem::take(&mut head)));
                pieces.push_back(first);
                pieces.extend(value);
            }
        }
        head.push('}');
        pieces.push_back(Bytes::from(head));
        let remaining = pieces.iter().map(|piece| piece.len() as u64).sum();
        Pieces { pieces, remaining }
    }
}

impl Writer<'_> {
    fn text(&mut self, text: &str) {
        if self.copied.len() + text.len() > COPIED_PIECE_BYTES && !self.copied.is_empty() {
            self.pieces
                .push(Bytes::from(std::mem::take(&mut self.copied)));
        }
        if self.copied.capacity() == 0 {
            // What is left of the value, up to a piece: one allocation per piece.
            let wanted = self
                .left
                .clamp(text.len(), COPIED_PIECE_BYTES.max(text.len()));
            self.copied.reserve_exact(wanted);
        }
        self.left = self.left.saturating_sub(text.len());
        self.copied.extend_from_slice(text.as_bytes());
    }

    fn raw(&mut self, raw: &str) {
        if raw.len() < SLICED_FROM_BYTES {
            return self.text(raw);
        }
        if !self.copied.is_empty() {
            self.pieces
                .push(Bytes::from(std::mem::take(&mut self.copied)));
        }
        self.pieces.push(slice_of(self.body, raw));
    }

    /// `[{"name":value,...},...]`, each object as sent but for the white space between its
    /// fields; an element that is no object is left out (the route refuses those first).
    fn objects(&mut self, elements: &[Element<'_>]) {
        self.text("[");
        let objects = elements.iter().filter_map(|element| match element {
            Element::Object(fields) => Some(fields),
            Element::NotAnObject => None,
        });
        for (index, fields) in objects.enumerate() {
            self.text(if index == 0 { "{" } else { ",{" });
            for (position, (name, value)) in fields.iter().enumerate() {
                let mut named = String::new();
                if position > 0 {
                    named.push(',');
                }
                push_name(&mut named, name);
                self.text(&named);
                self.raw(value.get());
            }
            self.text("}");
        }
        self.text("]");
    }

    fn finish(mut self) -> Vec<Bytes> {
        if !self.copied.is_empty() {
            self.pieces.push(Bytes::from(self.copied));
        }
        self.pieces
    }
}

/// About how many bytes `value` takes written: its raw text, or its objects' fields.
fn written_size(value: &Field<'_>) -> usize {
    match value {
        Field::Raw(raw) => raw.get().len(),
        Field::Array(elements) => {
            elements
                .iter()
                .map(|element| match element {
                    Element::Object(fields) => {
                        fields
                            .iter()
                            .map(|(name, value)| name.len() + value.get().len() + 4)
                            .sum::<usize>()
                            + 2
                    }
                    Element::NotAnObject => 0,
                })
                .sum::<usize>()
                + 2
        }
        Field::NotAnArray => 0,
    }
}

fn system_message(prompt: &str) -> String {
    format!(r#"{{"role":"system","content":{}}}"#, json_string(prompt))
}

/// A request body sent as the pieces it was assembled from, its length known up front (so
/// it goes with `Content-Length`).
pub(super) struct Pieces {
    pieces: VecDeque<Bytes>,
    remaining: u64,
}

/// Writes a field's value in pieces: text of its own and small raw values copied together,
/// big raw values as slices of the client's body.
struct Writer<'b> {
    body: &'b Bytes,
    pieces: Vec<Bytes>,
    copied: Vec<u8>,
    /// About how many bytes of the value are still to be written.
    left: usize,
}

impl Pieces {
    fn writer(body: &Bytes, size: usize) -> Writer<'_> {
        Writer {
            body,
            pieces: Vec::new(),
            copied: Vec::new(),
            left: size,
        }
    }

    pub(super) fn len(&self) -> u64 {
        self.remaining
    }

    /// The whole body in one buffer, for tests to look at.
    #[cfg(test)]
    pub(super) fn concat(&self) -> Vec<u8> {
        self.pieces
            .iter()
            .flat_map(|piece| piece.iter().copied())
            .collect()
    }
}

impl http_body::Body for Pieces {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        match this.pieces.pop_front() {
            Some(piece) => {
                this.remaining -= piece.len() as u64;
                Poll::Ready(Some(Ok(Frame::data(piece))))
            }
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.pieces.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn forwarded(body: &'static str, stream: bool, system: bool) -> Forwarded {
        let body = Bytes::from_static(body.as_bytes());
        let text = std::str::from_utf8(&body).unwrap();
        let fields = Fields::parse_expanding(text, Some("messages")).unwrap();
        Forwarded::from_fields(&body, &fields, "served".into(), stream, system, None)
    }

    fn sent(forwarded: Forwarded) -> Value {
        let body = forwarded.body("upstream", "be kind", CapField::MaxTokens);
        let bytes = body.concat();
        assert_eq!(bytes.len() as u64, body.len());
        serde_json::from_slice(&bytes).unwrap()
    }

    #[test]
    fn every_field_goes_upstream_as_sent_but_those_tokenchat_owns() {
        let body = r#"{"model":"served","messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"data:x"}}]}],"tools":[{"type":"function","function":{"name":"f"}}],"n":2,"stream":false}"#;
        let sent = sent(forwarded(body, false, true));
        assert_eq!(sent["model"], "upstream");
        assert_eq!(sent["n"], 2);
        assert_eq!(sent["stream"], false);
        assert_eq!(sent["tools"][0]["function"]["name"], "f");
        assert_eq!(sent["messages"][0]["role"], "system");
        assert_eq!(sent["messages"][0]["content"], "be kind");
        assert_eq!(sent["messages"][1]["content"][0]["type"], "image_url");
    }

    #[test]
    fn a_streams_options_go_on_as_the_client_wrote_them_but_include_usage() {
        let options = r#"{"continuous_usage_stats":true,"big":123456789012345678901234567890,"far":1e309,"odd":"\ud800","z":-0,"a":[1]}"#;
        let body =
            format!(r#"{{"model":"m","messages":[],"stream":true,"stream_options":{options}}}"#);
        let body = Bytes::from(body);
        let text = std::str::from_utf8(&body).unwrap();
        let fields = Fields::parse_expanding(text, Some("messages")).unwrap();
        let forwarded = Forwarded::from_fields(&body, &fields, "m".into(), true, false, None);
        let sent =
            String::from_utf8(forwarded.body("m", "", CapField::MaxTokens).concat()).unwrap();
        let expected = r#""stream_options":{"continuous_usage_stats":true,"big":123456789012345678901234567890,"far":1e309,"odd":"\ud800","z":-0,"a":[1],"include_usage":true}"#;
        assert!(sent.contains(expected), "{sent}");
    }

    #[test]
    fn a_stream_always_asks_for_usage_keeping_the_clients_other_options() {
        let body = r#"{"model":"served","messages":[ ],"stream":true,"stream_options":{"include_usage":false,"other":1}}"#;
        let forwarded = forwarded(body, true, true);
        assert!(!forwarded.include_usage);
        let sent = sent(forwarded);
        assert_eq!(sent["stream"], true);
        assert_eq!(sent["stream_options"]["include_usage"], true);
        assert_eq!(sent["stream_options"]["other"], 1);
        assert_eq!(sent["messages"].as_array().unwrap().len(), 1);
    }

    #[test]
    fn a_request_with_its_own_system_message_gets_no_other() {
        let body = r#"{"messages":[{"role":"developer","content":"x"}],"model":"served"}"#;
        let sent = sent(forwarded(body, false, false));
        assert_eq!(sent["messages"].as_array().unwrap().len(), 1);
    }

    #[test]
    fn a_big_value_goes_as_a_slice_of_the_clients_body_and_small_ones_copied_together() {
        let image = "A".repeat(SLICED_FROM_BYTES);
        let text = format!(
            r#"{{"model":"m","messages":[{{"role":"user","content":[{{"type":"image_url","image_url":{{"url":"{image}"}}}}]}}],"n":1}}"#
        );
        let body = Bytes::from(text);
        let fields =
            Fields::parse_expanding(std::str::from_utf8(&body).unwrap(), Some("messages")).unwrap();
        let forwarded = Forwarded::from_fields(&body, &fields, "m".into(), false, false, None);
        let body_range = body.as_ptr() as usize..body.as_ptr() as usize + body.len();
        let messages = &forwarded.fields[0].1;
        assert_eq!(messages.len(), 3, "copied, the image's content, copied");
        assert!(body_range.contains(&(messages[1].as_ptr() as usize)));
        assert!(messages[1].len() > SLICED_FROM_BYTES);
        let sent: Value =
            serde_json::from_slice(&forwarded.body("m", "", CapField::MaxTokens).concat()).unwrap();
        assert_eq!(sent["messages"][0]["content"][0]["image_url"]["url"], image);
    }

    #[test]
    fn the_fingerprint_ignores_field_order_and_delivery() {
        let one = forwarded(r#"{"model":"m","a":1,"b":[2]}"#, false, true);
        let two = forwarded(
            r#"{"b":[2],"stream":true,"a":1,"model":"m","stream_options":{}}"#,
            true,
            true,
        );
        let three = forwarded(r#"{"model":"m","a":1,"b":[3]}"#, false, true);
        assert_eq!(one.fingerprint(), two.fingerprint());
        assert_ne!(one.fingerprint(), three.fingerprint());
    }
}
