//! The built-in `demo` model, used when `LLM_BASE_URL` is empty: the original system's own
//! "AI", a fixed table of hello-world programs, so a fresh machine can chat with nothing
//! else installed.

use std::time::Duration;

use futures_util::{future::BoxFuture, FutureExt, StreamExt};
use serde::Deserialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::{
    AnswerStream, Ask, Backend, Chunk, Completion, Embedding, EmbeddingUsage, Forwarded, LlmError,
    ModelProbe, PromptMessage, Rejection, Role, Streamed, TargetReport, UpstreamProbe, Usage,
};

/// How long the demo model takes per word, so that it streams as a model would.
const DEMO_WORD_DELAY: Duration = Duration::from_millis(15);
/// The most choices (`n`) it writes, as OpenAI's API allows.
const MAX_CHOICES: u64 = 128;
/// The size of its embeddings unless `dimensions` asks for another.
const EMBEDDING_DIMENSIONS: u64 = 16;
const MAX_EMBEDDING_DIMENSIONS: u64 = 4096;

/// The demo model as a backend: answers at once, streams word by word, reaches nothing.
pub(super) struct Demo;

impl Backend for Demo {
    fn complete<'a>(&'a self, ask: Ask<'a>) -> BoxFuture<'a, Result<Completion, LlmError>> {
        let completion = match ask {
            Ask::Turns { prompt: turns, .. } => Ok(Completion {
                content: answer(last_user_message(&turns)),
                tool_calls: None,
                unstored: String::new(),
                usage: None,
                body: None,
                served_by: None,
            }),
            Ask::Forwarded {
                request,
                last_user_text,
            } => whole_answer(&request, last_user_text),
        };
        futures_util::future::ready(completion).boxed()
    }

    fn stream<'a>(&'a self, ask: Ask<'a>) -> BoxFuture<'a, Result<Streamed, LlmError>> {
        let stream = match ask {
            Ask::Turns { prompt: turns, .. } => {
                let text = answer(last_user_message(&turns));
                Ok(demo_stream(text, None))
            }
            Ask::Forwarded {
                request,
                last_user_text,
            } => {
                Asked::read(&request).map(|asked| demo_stream(answer(last_user_text), Some(asked)))
            }
        };
        let streamed = stream.map(|chunks| Streamed {
            chunks,
            served_by: None,
        });
        futures_util::future::ready(streamed).boxed()
    }

    fn embed(&self, request: Forwarded) -> BoxFuture<'_, Result<Embedding, LlmError>> {
        futures_util::future::ready(embeddings(&request)).boxed()
    }

    fn probe(&self) -> BoxFuture<'_, (ModelProbe, Vec<UpstreamProbe>)> {
        futures_util::future::ready((ModelProbe::BuiltIn, Vec::new())).boxed()
    }

    fn targets(&self) -> Vec<TargetReport> {
        Vec::new()
    }
}

/// What the demo model honours of an OpenAI client's request: its model, `n`, its output cap
/// (a word and its space are one token here), `stop`, and whether a stream ends with the
/// usage chunk. What it cannot honour (structured output, log probabilities, audio) it
/// refuses, as a model would, rather than answer something else; tools it answers with
/// text, as a model may.
struct Asked {
    id: String,
    model: String,
    created: i64,
    choices: u64,
    cap: Option<usize>,
    stop: Vec<String>,
}

impl Asked {
    fn read(request: &Forwarded) -> Result<Self, LlmError> {
        let field = |name| -> Option<Value> {
            request
                .field(name)
                .and_then(|raw| serde_json::from_slice(&raw).ok())
                .filter(|value: &Value| !value.is_null())
        };
        if let Some(format) = field("response_format") {
            if format["type"] != "text" {
                return Err(refused(
                    "response_format",
                    "the built-in demo model writes only text: set LLM_BASE_URL to a model for structured output",
                ));
            }
        }
        if field("logprobs").is_some_and(|logprobs| logprobs != false) {
            return Err(refused(
                "logprobs",
                "the built-in demo model has no log probabilities",
            ));
        }
        let audio = field("modalities")
            .and_then(|modalities| modalities.as_array().cloned())
            .is_some_and(|modalities| modalities.iter().any(|modality| modality != "text"));
        if audio || field("audio").is_some() {
            return Err(refused(
                "modalities",
                "the built-in demo model writes only text",
            ));
        }
        let choices = match field("n") {
            None => 1,
            Some(n) => n
                .as_u64()
                .filter(|n| (1..=MAX_CHOICES).contains(n))
                .ok_or_else(|| refused("n", "n must be 1 to 128"))?,
        };
        let mut cap = None;
        for name in ["max_tokens", "max_completion_tokens"] {
            if let Some(value) = field(name) {
                let most = value.as_u64().filter(|most| *most >= 1).ok_or_else(|| {
                    refused(
                        name,
                        &format!("{name} must be a whole number of at least 1"),
                    )
                })?;
                let most = usize::try_from(most).unwrap_or(usize::MAX);
                cap = Some(cap.map_or(most, |other: usize| other.min(most)));
            }
        }
        let stop = match field("stop") {
            None => Vec::new(),
            Some(Value::String(one)) => vec![one],
            Some(Value::Array(many)) if many.len() <= 4 && many.iter().all(Value::is_string) => {
                many.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_owned)
                    .collect()
            }
            Some(_) => {
                let message = "stop must be a string or an array of at most 4 strings";
                return Err(refused("stop", message));
            }
        };
        let random: u64 = rand::Rng::gen(&mut rand::rngs::OsRng);
        Ok(Self {
            id: format!("chatcmpl-demo{random:016x}"),
            model: request.model.clone(),
            created: crate::clock::unix_now(),
            choices,
            cap,
            stop,
        })
    }

    /// `text` as asked: cut before the first `stop` it holds, then to the cap; with its
    /// finish reason (`length` when the cap cut it).
    fn shaped(&self, mut text: String) -> (String, &'static str) {
        let stops = self.stop.iter().filter(|stop| !stop.is_empty());
        if let Some(at) = stops.filter_map(|stop| text.find(stop.as_str())).min() {
            text.truncate(at);
        }
        match self.cap {
            Some(cap) if pieces(&text).len() > cap => (pieces(&text)[..cap].concat(), "length"),
            _ => (text, "stop"),
        }
    }

    /// A `chat.completion.chunk` of these `choices`, or none and the usage.
    fn chunk(&self, choices: Vec<Value>, usage: bool) -> String {
        let mut chunk = json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        });
        if usage {
            chunk["usage"] = zero_usage();
        }
        chunk.to_string()
    }
}

fn refused(param: &str, message: &str) -> LlmError {
    LlmError::Rejected(Rejection {
        status: 400,
        message: message.to_string(),
        kind: Some("invalid_request_error".into()),
        param: Some(param.to_string()),
        code: Some("unsupported_parameter".into()),
    })
}

/// The usage the demo model reports to an OpenAI client, which a priced `demo` is charged
/// by (its request price): it counts nothing.
const ZERO_USAGE: Usage = Usage {
    prompt_tokens: 0,
    completion_tokens: Some(0),
    cached_tokens: 0,
};

/// [`ZERO_USAGE`] as OpenAI writes it.
fn zero_usage() -> Value {
    json!({ "prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0 })
}

/// How many choices it writes beside the first.
fn others(asked: &Asked) -> usize {
    usize::try_from(asked.choices.saturating_sub(1)).unwrap_or(0)
}

/// The demo model's whole answer to an OpenAI client: `n` choices of the same text.
fn whole_answer(request: &Forwarded, last_user_text: &str) -> Result<Completion, LlmError> {
    let asked = Asked::read(request)?;
    let (content, finish) = asked.shaped(answer(last_user_text));
    if content.trim().is_empty() {
        // Cut to nothing by a `stop` at its start: no answer, as for any model.
        return Err(LlmError::Unusable(super::answer::EMPTY_ANSWER));
    }
    let choices: Vec<Value> = (0..asked.choices)
        .map(|index| {
            json!({
                "index": index,
                "message": { "role": "assistant", "content": content, "refusal": null },
                "logprobs": null,
                "finish_reason": finish,
            })
        })
        .collect();
    let body = json!({
        "id": asked.id,
        "object": "chat.completion",
        "created": asked.created,
        "model": asked.model,
        "choices": choices,
        "usage": zero_usage(),
    });
    Ok(Completion {
        unstored: content.repeat(others(&asked)),
        content,
        tool_calls: None,
        usage: Some(ZERO_USAGE),
        body: Some(body.to_string().into()),
        served_by: None,
    })
}

/// The demo model's answer, a word at a time; to an OpenAI client, as OpenAI's chunks: the
/// role, the words (of every choice), the finish and, when asked, the usage.
fn demo_stream(answer: String, asked: Option<Asked>) -> AnswerStream {
    let (answer, finish) = match &asked {
        Some(asked) => asked.shaped(answer),
        None => (answer, "stop"),
    };
    let words = pieces(&answer);
    let Some(asked) = asked else {
        return Box::pin(futures_util::stream::iter(words).then(|word| async move {
            tokio::time::sleep(DEMO_WORD_DELAY).await;
            Ok(Chunk {
                substantial: !word.trim().is_empty(),
                text: word,
                ..Chunk::default()
            })
        }));
    };
    let every = |delta: Value, finish: Option<&str>| -> Vec<Value> {
        (0..asked.choices)
            .map(|index| json!({ "index": index, "delta": delta, "logprobs": null, "finish_reason": finish }))
            .collect()
    };
    let mut chunks = vec![Chunk {
        data: asked.chunk(
            every(json!({ "role": "assistant", "content": "" }), None),
            false,
        ),
        ..Chunk::default()
    }];
    for word in words {
        chunks.push(Chunk {
            data: asked.chunk(every(json!({ "content": word }), None), false),
            substantial: !word.trim().is_empty(),
            unstored: word.repeat(others(&asked)),
            text: word,
            ..Chunk::default()
        });
    }
    chunks.push(Chunk {
        data: asked.chunk(every(json!({}), Some(finish)), false),
        ..Chunk::default()
    });
    // Always, as tokenchat asks every upstream: it is what the call is charged by, and the
    // relay drops it for a client that did not ask for it.
    chunks.push(Chunk {
        data: asked.chunk(Vec::new(), true),
        usage: Some(ZERO_USAGE),
        ..Chunk::default()
    });
    Box::pin(futures_util::stream::iter(chunks).then(|chunk| async move {
        if !chunk.text.is_empty() {
            tokio::time::sleep(DEMO_WORD_DELAY).await;
        }
        Ok(chunk)
    }))
}

fn last_user_message<'a>(turns: &[PromptMessage<'a>]) -> &'a str {
    turns
        .iter()
        .rev()
        .find(|turn| turn.role == Role::User)
        .map_or("", |turn| turn.content)
}

/// What the demo model reads of an embeddings request.
#[derive(Deserialize)]
#[serde(untagged)]
enum Input {
    One(String),
    Many(Vec<Value>),
}

/// The demo model's embeddings: for each input, a unit vector of word hashes, the same for
/// the same words, so that texts sharing words are near each other. Floats, or base64 of
/// little-endian 32-bit floats (`encoding_format`, which OpenAI's Python SDK asks for).
fn embeddings(request: &Forwarded) -> Result<Embedding, LlmError> {
    let field = |name| {
        request
            .field(name)
            .map(|raw| serde_json::from_slice::<Value>(&raw))
    };
    let input = request.field("input");
    let inputs = match input.as_deref().map(serde_json::from_slice::<Input>) {
        Some(Ok(Input::One(text))) => vec![text],
        Some(Ok(Input::Many(items))) if !items.is_empty() => items
            .into_iter()
            .map(|item| match item {
                Value::String(text) => text,
                other => other.to_string(),
            })
            .collect(),
        _ => {
            return Err(refused(
                "input",
                "input must be a string or a non-empty array",
            ))
        }
    };
    let dimensions = match field("dimensions") {
        None | Some(Ok(Value::Null)) => EMBEDDING_DIMENSIONS,
        Some(Ok(value)) => value
            .as_u64()
            .filter(|dimensions| (1..=MAX_EMBEDDING_DIMENSIONS).contains(dimensions))
            .ok_or_else(|| refused("dimensions", "dimensions must be 1 to 4096"))?,
        Some(Err(_)) => return Err(refused("dimensions", "dimensions must be 1 to 4096")),
    };
    let base64 = match field("encoding_format") {
        None | Some(Ok(Value::Null)) => false,
        Some(Ok(Value::String(format))) if format == "float" => false,
        Some(Ok(Value::String(format))) if format == "base64" => true,
        _ => {
            return Err(refused(
                "encoding_format",
                "encoding_format must be float or base64",
            ))
        }
    };
    let mut words = 0;
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(index, text)| {
            words += text.split_whitespace().count() as i64;
            let vector = embed_words(text, dimensions as usize);
            let embedding = if base64 {
                let bytes: Vec<u8> = vector.iter().flat_map(|x| x.to_le_bytes()).collect();
                Value::from(base64::Engine::encode(
                    &base64::engine::general_purpose::STANDARD,
                    bytes,
                ))
            } else {
                json!(vector)
            };
            json!({ "object": "embedding", "index": index, "embedding": embedding })
        })
        .collect();
    let usage = EmbeddingUsage {
        prompt_tokens: words,
        total_tokens: words,
    };
    let body = json!({ "object": "list", "data": data, "model": request.model, "usage": usage });
    Ok(Embedding {
        body: body.to_string().into(),
        usage: Some(usage),
    })
}

/// A unit vector of `dimensions`, each word of `text` (lower case) adding its hash's signs.
fn embed_words(text: &str, dimensions: usize) -> Vec<f32> {
    let mut vector = vec![0f32; dimensions];
    for word in text.to_lowercase().split_whitespace() {
        let hash = Sha256::digest(word.as_bytes());
        for (i, value) in vector.iter_mut().enumerate() {
            let bit = hash[(i / 8) % hash.len()] >> (i % 8) & 1;
            *value += if bit == 1 { 1.0 } else { -1.0 };
        }
    }
    let norm = vector.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        vector.iter_mut().for_each(|x| *x /= norm);
    }
    vector
}

/// The name the demo model is served under.
pub const MODEL_NAME: &str = crate::config::DEMO_MODEL_NAME;

/// The languages the original knew, in the order it checked them.
const PROGRAMS: [(&str, &str); 5] = [
    ("python", "print(\"Hello, World!\")"),
    (
        "c++",
        "#include <iostream>\n\nint main() {\n    std::cout << \"Hello, World!\" << std::endl;\n    return 0;\n}",
    ),
    (
        "java",
        "public class HelloWorld {\n    public static void main(String[] args) {\n        System.out.println(\"Hello, World!\");\n    }\n}",
    ),
    (
        "c",
        "#include <stdio.h>\n\nint main(void) {\n    printf(\"Hello, World!\\n\");\n    return 0;\n}",
    ),
    (
        "go",
        "package main\n\nimport \"fmt\"\n\nfunc main() {\n    fmt.Println(\"Hello, World!\")\n}",
    ),
];

const SORRY: &str = "Sorry, I could not generate 'Hello World' for your requested language.";

const ABOUT: &str = "(This is tokenchat's built-in demo model: it knows hello-world programs in \
    Python, C++, Java, C and Go. Set LLM_BASE_URL to an OpenAI-compatible API, for example \
    a local Ollama's http://127.0.0.1:11434/v1, to chat with a real model.)";

/// The demo model's answer to `message`: the program for the first language it names, as a
/// whole word in any letter case (so "go" is not found in "code", as the original's
/// substring match found "c" there); otherwise the original's apology and a sentence on
/// what this model is.
pub fn answer(message: &str) -> String {
    let lowered = message.to_lowercase();
    let words: Vec<&str> = lowered
        .split(|c: char| !(c.is_alphanumeric() || c == '+'))
        .filter(|word| !word.is_empty())
        .collect();
    PROGRAMS
        .iter()
        .find(|(language, _)| words.contains(language))
        // The language as the original wrote it: lower case (`../shared/spec/API.md`).
        .map(|(language, program)| format!("Code for 'Hello World' in {language}:\n\n{program}"))
        .unwrap_or_else(|| format!("{SORRY} {ABOUT}"))
}

/// `text` in the pieces a model would stream it in: each word with the white space after it,
/// so the pieces joined are `text` again.
pub fn pieces(text: &str) -> Vec<String> {
    let mut pieces = Vec::new();
    let mut current = String::new();
    let mut in_space = false;
    for c in text.chars() {
        if !c.is_whitespace() && in_space {
            pieces.push(std::mem::take(&mut current));
        }
        in_space = c.is_whitespace();
        current.push(c);
    }
    if !current.is_empty() {
        pieces.push(current);
    }
    pieces
}

#[cfg(test)]
mod tests;
