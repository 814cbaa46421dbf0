//! What every answer must be: the envelope, the content type, the headers its status needs,
//! and what the case's requests so far allow (who is logged in, which chats were paid for).

use std::collections::BTreeSet;

use axum::http::{header, Method, StatusCode};
use serde_json::Value;

use super::case::{Auth, Hostile};
use super::harness::Answer;
use super::rendering::uri_shape;
use super::CHAT_COST;

/// What the requests of a case have done so far.
pub(super) struct CaseState {
    /// Whether the user's login token is still live (no logout with it yet).
    pub(super) alive: [bool; 2],
    /// The chats answered (and paid for) for each user.
    pub(super) answered: [BTreeSet<i64>; 2],
}

/// The routes that answer without a token (`/metrics` does while `METRICS_TOKEN` is unset).
const PUBLIC: [&str; 6] = ["/", "/health", "/ready", "/metrics", "/register", "/login"];

impl CaseState {
    /// Checks an answer against what the case has done, and records what it did.
    pub(super) fn follow(
        &mut self,
        hostile: &Hostile,
        answer: &Answer,
        json: Option<&Value>,
        balances: [i64; 2],
    ) -> Result<(), String> {
        // The user a request acts for: one Authorization header, in an accepted form.
        let acting = match hostile.authorization.as_slice() {
            [Auth::Token { user, scheme }] if scheme.is_valid() => Some(*user),
            _ => None,
        };
        let live = acting.filter(|user| self.alive[*user]);
        let uri = uri_shape(&hostile.target).expect("generated targets parse");
        let path = uri.path();
        let route = path
            .strip_suffix('/')
            .filter(|p| !p.is_empty())
            .unwrap_or(path);
        let route = if route.starts_with("/chats/") && route.matches('/').count() == 2 {
            "/chats/{id}"
        } else {
            route
        };
        let status = answer.status;

        if let Some(remaining) = answer.headers.get("x-tokens-remaining") {
            let Some(user) = live else {
                return Err(
                    "X-Tokens-Remaining on an answer to a request without a live token".into(),
                );
            };
            let remaining: i64 = remaining
                .to_str()
                .ok()
                .and_then(|text| text.parse().ok())
                .ok_or("X-Tokens-Remaining is not a number")?;
            // A stream's headers leave before its answer: they carry the balance before it
            // (the `done` event has the one after).
            let streamed = answer
                .headers
                .get(header::CONTENT_TYPE)
                .is_some_and(|value| value == "text/event-stream");
            let charged = if streamed {
                json.as_ref()
                    .and_then(|json| json["tokens_charged"].as_i64())
                    .unwrap_or(0)
            } else {
                0
            };
            if remaining != balances[user] + charged {
                return Err(format!(
                    "X-Tokens-Remaining {remaining}, but the balance is {}",
                    balances[user]
                ));
            }
        }
        if status.is_success() && !PUBLIC.contains(&route) && live.is_none() {
            return Err(format!("{status} on {route} without a live token"));
        }
        if json.is_some_and(|json| json["code"] == "unauthorized") && live.is_some() {
            return Err("401 unauthorized with a live token".into());
        }
        if !status.is_success() {
            return Ok(());
        }
        let user = live.unwrap_or_default();
        if status == StatusCode::NO_CONTENT && ["/logout", "/logout/all"].contains(&route) {
            self.alive[user] = false;
        }
        // An answer to HEAD has no body to look into.
        let Some(json) = json else {
            return Ok(());
        };
        let owned = |id: &Value, answered: &BTreeSet<i64>| {
            id.as_i64().is_some_and(|id| answered.contains(&id))
        };
        if let Some(chat_id) = json
            .get("chat_id")
            .filter(|_| json.get("response").is_some())
        {
            // An answered chat.
            if hostile.method != Method::POST || route != "/chat" {
                return Err(format!("a chat answer from {} {route}", hostile.method));
            }
            let chat_id = chat_id.as_i64().ok_or("chat_id is not a number")?;
            let replayed = answer
                .headers
                .get("idempotent-replayed")
                .is_some_and(|value| value == "true");
            if replayed {
                if !self.answered[user].contains(&chat_id) {
                    return Err(format!(
                        "replayed chat {chat_id} that this user never had answered"
                    ));
                }
            } else {
                if self.answered.iter().any(|chats| chats.contains(&chat_id)) {
                    return Err(format!("chat {chat_id} answered twice without a replay"));
                }
                if json["tokens_charged"] != CHAT_COST || json["tokens"] != balances[user] {
                    return Err(format!(
                        "charge or balance wrong; balance is {}",
                        balances[user]
                    ));
                }
                self.answered[user].insert(chat_id);
            }
        }
        match route {
            "/chats/{id}" if !owned(&json["id"], &self.answered[user]) => {
                return Err("someone else's chat".into());
            }
            "/chats" => {
                let chats = json["chats"].as_array().ok_or("no chats list")?;
                if !chats
                    .iter()
                    .all(|chat| owned(&chat["id"], &self.answered[user]))
                {
                    return Err("someone else's chat in the list".into());
                }
            }
            "/transactions" => {
                let entries = json["transactions"]
                    .as_array()
                    .ok_or("no transactions list")?;
                let theirs = |entry: &Value| {
                    entry["chat_id"].is_null() || owned(&entry["chat_id"], &self.answered[user])
                };
                if !entries.iter().all(theirs) {
                    return Err("someone else's transaction in the list".into());
                }
            }
            _ => {}
        }
        Ok(())
    }
}

/// A streamed chat's events read as the whole answer they add up to: the `done` event's
/// fields with the deltas' text as `response`, or the `error` event's envelope. Every
/// event's data must be JSON, `start` must come first, and one of those must end it.
fn streamed_answer(body: &[u8]) -> Result<Value, String> {
    let text = std::str::from_utf8(body).map_err(|_| "a stream that is not UTF-8")?;
    let mut events = Vec::new();
    for block in text.split("\n\n").filter(|block| !block.trim().is_empty()) {
        let mut name = "";
        let mut data = String::new();
        for line in block.lines() {
            if let Some(value) = line.strip_prefix("event: ") {
                name = value;
            } else if let Some(value) = line.strip_prefix("data: ") {
                data.push_str(value);
            }
        }
        if data.is_empty() {
            continue; // a keep-alive comment
        }
        let data: Value =
            serde_json::from_str(&data).map_err(|err| format!("event data is not JSON: {err}"))?;
        events.push((name, data));
    }
    if events.first().map(|(name, _)| *name) != Some("start") {
        return Err(format!(
            "a stream that does not begin with start: {events:?}"
        ));
    }
    let response: String = events
        .iter()
        .filter(|(name, _)| *name == "delta")
        .filter_map(|(_, data)| data["content"].as_str())
        .collect();
    match events.last() {
        Some(("done", done)) => {
            let mut answer = done.clone();
            answer["response"] = response.into();
            Ok(answer)
        }
        Some(("error", envelope)) => Ok(envelope.clone()),
        other => Err(format!("a stream that ends with {other:?}")),
    }
}

/// The contract's rules for any answer; the body as JSON, unless it is empty by design.
pub(super) fn check_answer(method: &Method, answer: &Answer) -> Result<Option<Value>, String> {
    let status = answer.status;
    if status.is_server_error() {
        return Err(format!("{status}: a server error"));
    }
    if status == StatusCode::NO_CONTENT {
        return if answer.body.is_empty() {
            Ok(None)
        } else {
            Err("204 with a body".into())
        };
    }
    // An answer to HEAD has no body, whatever it would have been.
    if *method == Method::HEAD && answer.body.is_empty() {
        return Ok(None);
    }
    let content_type = answer
        .headers
        .get(header::CONTENT_TYPE)
        .map(|value| value.as_bytes());
    if status == StatusCode::OK && content_type == Some(b"text/event-stream") {
        return streamed_answer(&answer.body).map(Some);
    }
    // The two answers that are not JSON by design: the page at `/` and `/metrics`.
    let not_json_by_design: [&[u8]; 2] = [
        b"text/html; charset=utf-8",
        b"text/plain; version=0.0.4; charset=utf-8",
    ];
    if status == StatusCode::OK
        && content_type.is_some_and(|kind| not_json_by_design.contains(&kind))
    {
        return Ok(None);
    }
    if content_type != Some(b"application/json") {
        return Err(format!("{status} with Content-Type {content_type:?}"));
    }
    let json: Value = serde_json::from_slice(&answer.body)
        .map_err(|err| format!("{status}: body is not JSON: {err}"))?;
    if status.is_success() {
        return Ok(Some(json));
    }
    let error = json["error"].as_str().unwrap_or_default();
    let code = json["code"].as_str().unwrap_or_default();
    if error.is_empty() {
        return Err(format!("{status} without an error sentence"));
    }
    let snake_case = !code.is_empty()
        && code.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
        && !code.starts_with('_')
        && !code.ends_with('_')
        && !code.contains("__");
    if !snake_case {
        return Err(format!("{status} with code {code:?}, not snake_case"));
    }
    let lower = answer.body.to_ascii_lowercase();
    let leaks = [&b"sqlite"[..], b"panicked", b"sqlx"];
    if leaks
        .iter()
        .any(|word| lower.windows(word.len()).any(|w| w == *word))
    {
        return Err(format!("{status}: the error shows internals"));
    }
    let codes: &[&str] = match status.as_u16() {
        400 => &["invalid_json", "invalid_input"],
        401 => &["unauthorized", "invalid_credentials"],
        402 => &["out_of_tokens"],
        403 => &["forbidden", "account_disabled", "registration_closed"],
        404 => &["not_found"],
        405 => &["method_not_allowed"],
        408 => &["request_timeout"],
        409 => &["username_taken", "request_in_progress"],
        413 => &["payload_too_large"],
        415 => &["unsupported_media_type"],
        422 => &["idempotency_key_reused"],
        429 => &["rate_limited"],
        _ => &[],
    };
    if !codes.contains(&code) {
        return Err(format!(
            "{status} with code {code:?}, not one the contract lists for it"
        ));
    }
    match status.as_u16() {
        400 if code == "invalid_input" && !json["field"].is_string() => {
            return Err("invalid_input without its field".into());
        }
        402 if !json["tokens"]
            .as_i64()
            .is_some_and(|tokens| (0..CHAT_COST).contains(&tokens)) =>
        {
            return Err("out_of_tokens without the balance".into());
        }
        405 if !answer.headers.contains_key(header::ALLOW) => {
            return Err("405 without Allow".into());
        }
        429 if !answer.headers.contains_key(header::RETRY_AFTER) => {
            return Err("429 without Retry-After".into());
        }
        _ => {}
    }
    Ok(Some(json))
}
