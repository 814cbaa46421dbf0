//! A whole `chat.completion` that a server answered to a stream request, as the one
//! `chat.completion.chunk` that says the same; a body labelled JSON that holds events, read
//! as events.
//!
//! Some OpenAI-compatible servers do not stream, or ignore `stream: true` for some models,
//! and answer the request whole. Read as server-sent events, such a body holds no event:
//! the answer, delivered and paid for by the operator, was lost and the client got an
//! error. Written by hand because it is a restructuring of one object: each choice's
//! `message` becomes its `delta` (with the `index` every tool-call piece of a stream has),
//! everything else is kept as written, numbers too.

use std::{collections::BTreeMap, time::Duration};

use axum::body::Bytes;
use futures_util::{stream, Stream, StreamExt};
use serde_json::value::RawValue;

use super::{chunks_of, classify, read_chunk, MAX_ANSWER_BYTES};
use crate::llm::{AnswerStream, LlmError};

type Fields = BTreeMap<String, Box<RawValue>>;

const UNREADABLE: LlmError =
    LlmError::Unusable("a whole answer to a stream request was not the expected JSON");

/// A body whose head said JSON, read as what it holds: a whole answer (a JSON object starts
/// with `{`) as its one chunk, or events labelled wrongly (they never start so) live, as
/// they come. Each piece must come within `idle`, as a stream's do.
pub(super) async fn whole_or_events<S>(mut body: S, idle: Duration) -> AnswerStream
where
    S: Stream<Item = Result<Bytes, reqwest::Error>> + Send + Unpin + 'static,
{
    let mut read = Vec::new();
    let first = loop {
        match next_piece(&mut body, idle).await {
            Err(err) => return stream::iter([Err(err)]).boxed(),
            Ok(None) => break None,
            Ok(Some(piece)) => {
                let first = piece.trim_ascii_start().first().copied();
                read.push(piece);
                if first.is_some() {
                    break first;
                }
            }
        }
    };
    if first != Some(b'{') {
        let seen = stream::iter(read.into_iter().map(Ok));
        return chunks_of(seen.chain(body), idle);
    }
    tracing::debug!("a stream request was answered whole");
    let mut whole = read.concat();
    loop {
        match next_piece(&mut body, idle).await {
            Err(err) => return stream::iter([Err(err)]).boxed(),
            Ok(None) => break,
            Ok(Some(_)) if whole.len() > MAX_ANSWER_BYTES => {
                return stream::iter([Err(LlmError::Unusable("an answer too large"))]).boxed()
            }
            Ok(Some(piece)) => whole.extend_from_slice(&piece),
        }
    }
    let chunk = as_one_chunk(&whole).and_then(read_chunk);
    stream::iter([chunk]).boxed()
}

/// The body's next piece within `idle`; `None` at its end.
async fn next_piece<S>(body: &mut S, idle: Duration) -> Result<Option<Bytes>, LlmError>
where
    S: Stream<Item = Result<Bytes, reqwest::Error>> + Unpin,
{
    match tokio::time::timeout(idle, body.next()).await {
        Err(_) => Err(LlmError::Timeout),
        Ok(None) => Ok(None),
        Ok(Some(piece)) => piece.map(Some).map_err(classify),
    }
}

/// The chunk that says what the whole answer `body` says: its choices' messages as deltas.
/// An error object stays one, so that it is read as a stream's error event is.
pub(super) fn as_one_chunk(body: &[u8]) -> Result<String, LlmError> {
    let mut answer: Fields = serde_json::from_slice(body).map_err(|_| UNREADABLE)?;
    if let Some(choices) = answer.get_mut("choices") {
        let mut read: Vec<Fields> = serde_json::from_str(choices.get()).map_err(|_| UNREADABLE)?;
        for choice in &mut read {
            if let Some(message) = choice.remove("message") {
                choice.insert("delta".to_owned(), as_delta(&message).ok_or(UNREADABLE)?);
            }
        }
        *choices = raw(&read)?;
    }
    answer.insert("object".to_owned(), raw(&"chat.completion.chunk")?);
    serde_json::to_string(&answer).map_err(|_| UNREADABLE)
}

/// A message as a delta: the same fields, each tool call numbered by its place.
fn as_delta(message: &RawValue) -> Option<Box<RawValue>> {
    let mut delta: Fields = serde_json::from_str(message.get()).ok()?;
    if let Some(calls) = delta.get_mut("tool_calls") {
        let mut numbered: Vec<Fields> = serde_json::from_str(calls.get()).ok()?;
        for (index, call) in numbered.iter_mut().enumerate() {
            if !call.contains_key("index") {
                call.insert("index".to_owned(), raw(&index).ok()?);
            }
        }
        *calls = raw(&numbered).ok()?;
    }
    raw(&delta).ok()
}

fn raw<T: serde::Serialize>(value: &T) -> Result<Box<RawValue>, LlmError> {
    serde_json::value::to_raw_value(value).map_err(|_| UNREADABLE)
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};

    use super::*;

    fn chunk_of(whole: &str) -> Value {
        serde_json::from_str(&as_one_chunk(whole.as_bytes()).unwrap()).unwrap()
    }

    #[test]
    fn a_whole_answer_becomes_one_chunk_with_its_messages_as_deltas() {
        let chunk = chunk_of(
            r#"{"id":"c1","object":"chat.completion","created":1,"model":"m",
               "choices":[{"index":0,"message":{"role":"assistant","content":"Hi"},"finish_reason":"stop","logprobs":null}],
               "usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}"#,
        );
        assert_eq!(
            chunk,
            json!({"id":"c1","object":"chat.completion.chunk","created":1,"model":"m",
                   "choices":[{"index":0,"delta":{"role":"assistant","content":"Hi"},"finish_reason":"stop","logprobs":null}],
                   "usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}})
        );
    }

    #[test]
    fn tool_calls_are_numbered_as_a_stream_numbers_them() {
        let chunk = chunk_of(
            r#"{"choices":[{"index":0,"finish_reason":"tool_calls","message":{"role":"assistant","content":null,
               "tool_calls":[{"id":"a","type":"function","function":{"name":"f","arguments":"{}"}},
                             {"id":"b","type":"function","function":{"name":"g","arguments":"{}"}}]}}]}"#,
        );
        let calls = &chunk["choices"][0]["delta"]["tool_calls"];
        assert_eq!(calls[0]["index"], 0);
        assert_eq!(calls[1]["index"], 1);
        assert_eq!(calls[1]["function"]["name"], "g");
    }

    #[test]
    fn numbers_are_kept_as_written() {
        let chunk = as_one_chunk(
            br#"{"choices":[],"usage":{"prompt_tokens":1e2,"x":12345678901234567890123}}"#,
        )
        .unwrap();
        assert!(chunk.contains(r#""prompt_tokens":1e2"#), "{chunk}");
        assert!(chunk.contains("12345678901234567890123"), "{chunk}");
    }

    /// The texts of the chunks read from `pieces`, or the first error's description.
    async fn read_from(pieces: &[&str]) -> Vec<Result<String, String>> {
        let pieces: Vec<Result<Bytes, reqwest::Error>> = pieces
            .iter()
            .map(|piece| Ok(Bytes::from(piece.to_string())))
            .collect();
        let chunks = whole_or_events(stream::iter(pieces), Duration::from_secs(1)).await;
        let texts = chunks.map(|chunk| chunk.map(|chunk| chunk.text));
        texts
            .map(|text| text.map_err(|err| format!("{err:?}")))
            .collect()
            .await
    }

    #[tokio::test]
    async fn a_json_body_is_one_chunk_and_events_labelled_json_are_read_as_events() {
        let whole =
            r#"{"choices":[{"index":0,"message":{"content":"Hi"},"finish_reason":"stop"}]}"#;
        let (head, tail) = whole.split_at(20);
        assert_eq!(read_from(&["  ", head, tail]).await, [Ok("Hi".to_string())]);
        let event = |text: &str| {
            format!(
                r#"data: {{"choices":[{{"index":0,"delta":{{"content":"{text}"}},"finish_reason":null}}]}}"#
            )
        };
        let (one, two) = (event("a") + "\n\n", event("b") + "\n\ndata: [DONE]\n\n");
        let read = read_from(&[": keep-alive\n\n", &one, &two]).await;
        assert_eq!(read, [Ok("a".to_string()), Ok("b".to_string())]);
    }

    #[test]
    fn what_is_not_an_answer_object_is_unusable() {
        for body in [
            &b"[1]"[..],
            b"{\"choices\": 3}",
            b"{\"choices\":[{\"message\":\"x\"}]}",
            b"{",
        ] {
            assert!(
                as_one_chunk(body).is_err(),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }
}
