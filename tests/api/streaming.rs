//! Streamed chats: server-sent events from `POST /chat`, and the charge rule in every way a
//! stream can end (finished, the model failing or going silent, the client going away),
//! against the fake model's streams; and the built-in demo model.

use std::time::Duration;

use axum::{
    body::Body,
    http::{header, Method, Request, StatusCode},
};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tower::ServiceExt;

use crate::common::{Reply, TestApp, TestResponse};

/// A streamed answer as a client reads it, an event at a time.
pub(crate) struct EventReader {
    body: Body,
    buffer: String,
    /// Comment lines (`: keep-alive`) seen so far.
    comments: usize,
}

impl EventReader {
    pub(crate) fn new(body: Body) -> Self {
        Self {
            body,
            buffer: String::new(),
            comments: 0,
        }
    }

    /// The next event's name and data, or `None` once the stream ended.
    pub(crate) async fn next(&mut self) -> Option<(String, Value)> {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let mut name = String::from("message");
                let mut data = String::new();
                for line in block.lines() {
                    if let Some(value) = line.strip_prefix("event:") {
                        name = value.trim().to_string();
                    } else if let Some(value) = line.strip_prefix("data:") {
                        data.push_str(value.trim_start());
                    } else if line.starts_with(':') {
                        self.comments += 1;
                    }
                }
                if data.is_empty() {
                    continue;
                }
                return Some((
                    name,
                    serde_json::from_str(&data).expect("event data is JSON"),
                ));
            }
            let frame = tokio::time::timeout(Duration::from_secs(10), self.body.frame())
                .await
                .expect("no event within 10 s")?
                .expect("the stream broke");
            if let Ok(bytes) = frame.into_data() {
                self.buffer.push_str(std::str::from_utf8(&bytes).unwrap());
            }
        }
    }

    /// Reads on until a `: keep-alive` comment arrives; how long that took, or `None` if the
    /// stream sent anything else first or nothing within `within`.
    async fn keep_alive(&mut self, within: Duration) -> Option<Duration> {
        let started = std::time::Instant::now();
        loop {
            if self.buffer.contains(": keep-alive\n") {
                return Some(started.elapsed());
            }
            if !self.buffer.trim().is_empty() {
                return None;
            }
            let left = within.checked_sub(started.elapsed())?;
            let frame = tokio::time::timeout(left, self.body.frame())
                .await
                .ok()??
                .ok()?;
            if let Ok(bytes) = frame.into_data() {
                self.buffer.push_str(std::str::from_utf8(&bytes).unwrap());
            }
        }
    }

    /// Every event to the end of the stream.
    pub(crate) async fn rest(&mut self) -> Vec<(String, Value)> {
        let mut events = Vec::new();
        while let Some(event) = self.next().await {
            events.push(event);
        }
        events
    }
}

/// What came back from a streamed chat: the stream, or the JSON error it was refused with.
pub(crate) enum Streamed {
    Events(EventReader),
    Refused(TestResponse),
}

impl Streamed {
    #[track_caller]
    pub(crate) fn events(self) -> EventReader {
        match self {
            Self::Events(reader) => reader,
            Self::Refused(response) => panic!("refused: {response:?}"),
        }
    }

    #[track_caller]
    pub(crate) fn refused(self) -> TestResponse {
        match self {
            Self::Refused(response) => response,
            Self::Events(_) => panic!("a stream began"),
        }
    }
}

async fn stream_chat(app: &TestApp, token: &str, body: Value, accept: Option<&str>) -> Streamed {
    let mut request = Request::builder()
        .method(Method::POST)
        .uri("/chat")
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::AUTHORIZATION, format!("Bearer {token}"));
    if let Some(accept) = accept {
        request = request.header(header::ACCEPT, accept);
    }
    let response = app
        .router
        .clone()
        .oneshot(request.body(Body::from(body.to_string())).unwrap())
        .await
        .unwrap();
    let is_stream = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|value| value.as_bytes().starts_with(b"text/event-stream"));
    if !is_stream {
        return Streamed::Refused(TestResponse::read(response).await);
    }
    assert_eq!(response.status(), StatusCode::OK);
    Streamed::Events(EventReader {
        body: response.into_body(),
        buffer: String::new(),
        comments: 0,
    })
}

pub(crate) async fn stream_message(app: &TestApp, token: &str, message: &str) -> Streamed {
    stream_chat(
        app,
        token,
        json!({ "message": message, "stream": true }),
        None,
    )
    .await
}

/// The one chat of the user, as `/chats` shows it.
pub(crate) async fn only_chat(app: &TestApp, token: &str) -> Value {
    let chats = app.get_authorized("/chats", token).await;
    assert_eq!(
        chats.json["chats"].as_array().unwrap().len(),
        1,
        "{chats:?}"
    );
    chats.json["chats"][0].clone()
}

/// Waits until the user's only chat is settled (no longer pending), or fails the test.
pub(crate) async fn settled_chat(app: &TestApp, token: &str) -> Value {
    for _ in 0..300 {
        let chat = only_chat(app, token).await;
        if chat["status"] != "pending" {
            return chat;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the chat was never settled");
}

#[tokio::test]
async fn a_streamed_answer_arrives_as_start_deltas_and_done_and_is_charged_once() {
    let app = TestApp::new().await;
    let token = app.user_with_token("user").await;
    let mut events = stream_message(&app, &token, "tell me a story")
        .await
        .events();
    let (name, start) = events.next().await.unwrap();
    assert_eq!(name, "start");
    let chat_id = start["chat_id"].as_i64().unwrap();
    assert!(start["conversation_id"].is_i64(), "{start}");
    let rest = events.rest().await;
    let (done, deltas) = rest.split_last().unwrap();
    assert!(deltas.len() >= 4, "one delta per word: {deltas:?}");
    let text: String = deltas
        .iter()
        .map(|(name, data)| {
            assert_eq!(name, "delta");
            data["content"].as_str().unwrap()
        })
        .collect();
    assert_eq!(text, "Echo: tell me a story");
    assert_eq!(done.0, "done");
    assert_eq!(done.1["chat_id"], chat_id);
    assert_eq!(done.1["conversation_id"], start["conversation_id"]);
    assert_eq!(done.1["tokens"], 3900);
    assert_eq!(done.1["tokens_charged"], 100);
    assert!(
        done.1["usage"]["prompt_tokens"].as_i64().unwrap() > 0,
        "{done:?}"
    );
    assert_eq!(done.1["usage"]["completion_tokens"], 5);

    // Asked upstream as a stream, with usage.
    let asked = &app.llm.received()[0].body;
    assert_eq!(asked["stream"], true);
    assert_eq!(asked["stream_options"]["include_usage"], true);

    let chat = only_chat(&app, &token).await;
    assert_eq!(chat["id"], chat_id);
    assert_eq!(chat["status"], "answered");
    assert_eq!(chat["response"], "Echo: tell me a story");
    assert_eq!(chat["tokens_charged"], 100);
    assert_eq!(chat["usage"], done.1["usage"]);
    assert_eq!(chat["conversation_id"], start["conversation_id"]);

    // A stream continues a conversation like a whole answer does.
    let again = json!({ "message": "and then?", "stream": true, "conversation_id": start["conversation_id"] });
    let events = stream_chat(&app, &token, again, None)
        .await
        .events()
        .rest()
        .await;
    assert_eq!(events[0].1["conversation_id"], start["conversation_id"]);
    let prompt = &app.llm.received()[1].body["messages"];
    assert_eq!(prompt[2]["content"], "Echo: tell me a story");
    assert_eq!(prompt[3]["content"], "and then?");
    assert_eq!(app.balance(&token).await, 3800);
    app.assert_all_settled().await;
}

#[tokio::test]
async fn an_accept_header_asks_for_a_stream_and_an_explicit_false_does_not() {
    let app = TestApp::new().await;
    let token = app.user_with_token("user").await;
    let accepted = stream_chat(
        &app,
        &token,
        json!({ "message": "hi" }),
        Some("application/json, text/event-stream;q=0.9"),
    )
    .await;
    let events = accepted.events().rest().await;
    assert_eq!(events.last().unwrap().0, "done");
    let whole = stream_chat(
        &app,
        &token,
        json!({ "message": "hi", "stream": false }),
        Some("text/event-stream"),
    )
    .await
    .refused();
    assert_eq!(whole.status, StatusCode::OK);
    assert_eq!(whole.json["response"], "Echo: hi");
    assert_eq!(app.balance(&token).await, 3800);
}

#[tokio::test]
async fn what_is_refused_before_the_stream_begins_is_an_ordinary_json_error() {
    let app = TestApp::with_env(&[("INITIAL_TOKENS", "150")]).await;
    let token = app.user_with_token("user").await;
    stream_chat(
        &app,
        "not-a-token",
        json!({ "message": "hi", "stream": true }),
        None,
    )
    .await
    .refused()
    .assert_error(StatusCode::UNAUTHORIZED, "unauthorized");
    stream_message(&app, &token, "   ")
        .await
        .refused()
        .assert_error(StatusCode::BAD_REQUEST, "invalid_input");
    stream_chat(
        &app,
        &token,
        json!({ "message": "hi", "stream": "yes" }),
        None,
    )
    .await
    .refused()
    .assert_error(StatusCode::BAD_REQUEST, "invalid_json");
    // A model failing before its first token.
    stream_message(&app, &token, "[fail] now")
        .await
        .refused()
        .assert_error(StatusCode::BAD_GATEWAY, "upstream_error");
    assert_eq!(app.balance(&token).await, 150);
    stream_message(&app, &token, "one")
        .await
        .events()
        .rest()
        .await;
    let refused = stream_message(&app, &token, "two").await.refused();
    refused.assert_error(StatusCode::PAYMENT_REQUIRED, "out_of_tokens");
    assert_eq!(refused.json["tokens"], 50);
    app.assert_all_settled().await;
}

#[tokio::test]
async fn a_model_that_dies_after_text_was_delivered_ends_the_stream_with_an_error_and_charges_by_the_abandoned_rule(
) {
    for message in ["[die-mid-stream] a b c d", "[error-mid-stream] a b c d"] {
        for (rule, charged) in [("delivered", 100), ("never", 0)] {
            let app = TestApp::with_env(&[("ABANDONED_STREAM_CHARGE", rule)]).await;
            let token = app.user_with_token("user").await;
            let events = stream_message(&app, &token, message)
                .await
                .events()
                .rest()
                .await;
            let (name, error) = events.last().unwrap();
            assert_eq!(name, "error", "{message}: {events:?}");
            assert_eq!(error["code"], "upstream_error");
            assert_eq!(error["tokens_charged"], charged, "{rule}");
            assert!(error["error"].as_str().is_some_and(|text| !text.is_empty()));
            let deltas = deltas(&events).concat();
            assert!(!deltas.is_empty(), "{events:?}");
            let chat = only_chat(&app, &token).await;
            let status = if charged > 0 { "abandoned" } else { "failed" };
            assert_eq!(chat["status"], status, "{rule}");
            assert_eq!(chat["tokens_charged"], charged);
            assert_eq!(chat["response"], deltas, "the partial text is kept");
            assert_eq!(app.balance(&token).await, 4000 - charged);
            app.assert_all_settled().await;
        }
    }
}

#[tokio::test]
async fn a_model_that_dies_before_any_text_is_refunded_whatever_the_rule() {
    let app = TestApp::new().await;
    let token = app.user_with_token("user").await;
    app.llm.set_reply(Reply::DieMidStream { after_words: 0 });
    let events = stream_message(&app, &token, "hello")
        .await
        .events()
        .rest()
        .await;
    let (name, error) = events.last().unwrap();
    assert_eq!(name, "error", "{events:?}");
    assert_eq!(error["tokens_charged"], 0);
    assert!(deltas(&events).concat().is_empty(), "{events:?}");
    let chat = only_chat(&app, &token).await;
    assert_eq!(chat["status"], "failed");
    assert_eq!(app.balance(&token).await, 4000);
    app.assert_all_settled().await;
}

#[tokio::test]
async fn a_model_silent_past_the_idle_limit_ends_as_a_time_out_charged_for_what_was_delivered() {
    let app = TestApp::with_env(&[("LLM_STREAM_IDLE_SECS", "1")]).await;
    let token = app.user_with_token("user").await;
    let started = std::time::Instant::now();
    let events = stream_message(&app, &token, "[stall-mid-stream] a b")
        .await
        .events()
        .rest()
        .await;
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    let (name, error) = events.last().unwrap();
    assert_eq!(name, "error");
    assert_eq!(error["code"], "upstream_timeout");
    assert_eq!(error["tokens_charged"], 100);
    let chat = only_chat(&app, &token).await;
    assert_eq!(chat["status"], "abandoned");
    assert_eq!(chat["response"], "Echo: ");
    assert_eq!(app.balance(&token).await, 3900);
    // The silent upstream request was let go.
    assert!(
        app.llm
            .wait_for_cancelled_streams(1, Duration::from_secs(1))
            .await
    );
    app.assert_all_settled().await;
}

#[tokio::test]
async fn a_client_gone_after_a_delta_leaves_an_abandoned_chat_charged_and_the_model_stopped() {
    let app = TestApp::new().await;
    let token = app.user_with_token("user").await;
    app.llm.set_reply(Reply::SlowStream {
        every: Duration::from_millis(200),
    });
    let mut events = stream_message(&app, &token, "one two three four five six")
        .await
        .events();
    assert_eq!(events.next().await.unwrap().0, "start");
    let (name, first) = events.next().await.unwrap();
    assert_eq!(name, "delta");
    drop(events);
    assert!(
        app.llm
            .wait_for_cancelled_streams(1, Duration::from_secs(1))
            .await,
        "the upstream request was not dropped within a second"
    );
    let chat = settled_chat(&app, &token).await;
    assert_eq!(chat["status"], "abandoned");
    assert_eq!(chat["tokens_charged"], 100);
    let stored = chat["response"].as_str().unwrap();
    assert!(
        stored.starts_with(first["content"].as_str().unwrap()),
        "{chat}"
    );
    assert!(
        stored.len() < "Echo: one two three four five six".len(),
        "{chat}"
    );
    assert_eq!(app.balance(&token).await, 3900);
    assert_eq!(app.llm.finished_streams(), 0);
    app.assert_all_settled().await;
}

#[tokio::test]
async fn a_client_gone_before_any_delta_is_refunded_and_never_means_always_refunded() {
    // Gone after the start, before the model wrote a word.
    let app = TestApp::new().await;
    let token = app.user_with_token("user").await;
    app.llm.set_reply(Reply::StallMidStream {
        after_words: 0,
        stall: Duration::from_secs(60),
    });
    let mut events = stream_message(&app, &token, "hello").await.events();
    assert_eq!(events.next().await.unwrap().0, "start");
    drop(events);
    assert!(
        app.llm
            .wait_for_cancelled_streams(1, Duration::from_secs(1))
            .await
    );
    let chat = settled_chat(&app, &token).await;
    assert_eq!(chat["status"], "abandoned");
    assert_eq!(chat["tokens_charged"], 0);
    assert_eq!(app.balance(&token).await, 4000);
    app.assert_all_settled().await;

    // ABANDONED_STREAM_CHARGE=never: refunded even after deltas.
    let app = TestApp::with_env(&[("ABANDONED_STREAM_CHARGE", "never")]).await;
    let token = app.user_with_token("user").await;
    app.llm.set_reply(Reply::SlowStream {
        every: Duration::from_millis(200),
    });
    let mut events = stream_message(&app, &token, "one two three four")
        .await
        .events();
    events.next().await.unwrap();
    assert_eq!(events.next().await.unwrap().0, "delta");
    drop(events);
    let chat = settled_chat(&app, &token).await;
    assert_eq!(chat["status"], "abandoned");
    assert_eq!(chat["tokens_charged"], 0);
    assert!(!chat["response"].as_str().unwrap().is_empty());
    assert_eq!(app.balance(&token).await, 4000);
    app.assert_all_settled().await;
}

#[tokio::test]
async fn a_finished_answer_is_charged_even_when_its_client_left_before_done() {
    let app = TestApp::new().await;
    let token = app.user_with_token("user").await;
    let mut events = stream_message(&app, &token, "quick").await.events();
    assert_eq!(events.next().await.unwrap().0, "start");
    // Let the model finish while nobody reads, then leave.
    assert!(wait_until(|| app.llm.finished_streams() == 1).await);
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(events);
    let chat = settled_chat(&app, &token).await;
    assert_eq!(chat["status"], "answered");
    assert_eq!(chat["response"], "Echo: quick");
    assert_eq!(app.balance(&token).await, 3900);
    app.assert_all_settled().await;
}

#[tokio::test]
async fn many_concurrent_streams_never_overspend_a_balance() {
    let app = TestApp::with_env(&[("INITIAL_TOKENS", "500")]).await;
    let token = app.user_with_token("user").await;
    let streams = (0..12).map(|n| {
        let (app, token) = (&app, &token);
        async move {
            match stream_message(app, token, &format!("stream {n}")).await {
                Streamed::Events(mut events) => events.rest().await.last().unwrap().0.clone(),
                Streamed::Refused(response) => {
                    response.assert_error(StatusCode::PAYMENT_REQUIRED, "out_of_tokens");
                    "refused".to_string()
                }
            }
        }
    });
    let endings = futures_util::future::join_all(streams).await;
    assert_eq!(
        endings.iter().filter(|end| *end == "done").count(),
        5,
        "{endings:?}"
    );
    assert_eq!(endings.iter().filter(|end| *end == "refused").count(), 7);
    assert_eq!(app.balance(&token).await, 0);
    app.assert_all_settled().await;
}

#[tokio::test]
async fn a_model_that_reports_no_usage_leaves_it_null() {
    let app = TestApp::new().await;
    let token = app.user_with_token("user").await;
    app.llm.set_reply(Reply::EchoWithoutUsage);
    let events = stream_message(&app, &token, "hi")
        .await
        .events()
        .rest()
        .await;
    assert_eq!(events.last().unwrap().1["usage"], Value::Null);
    let whole = app.chat(&token, "hi again").await;
    assert_eq!(whole.status, StatusCode::OK);
    let chats = app.get_authorized("/chats", &token).await.json;
    assert_eq!(chats["chats"][0]["usage"], Value::Null);
    assert_eq!(chats["chats"][1]["usage"], Value::Null);
    // With usage, whole answers store it too.
    app.llm.set_reply(Reply::Echo);
    app.chat(&token, "counted").await;
    let chats = app.get_authorized("/chats", &token).await.json;
    assert_eq!(chats["chats"][0]["usage"]["completion_tokens"], 2);
}

#[tokio::test]
async fn a_repeated_idempotency_key_replays_the_stream_without_a_second_charge() {
    let app = TestApp::new().await;
    let token = app.user_with_token("user").await;
    let request = || {
        Request::builder()
            .method(Method::POST)
            .uri("/chat")
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::AUTHORIZATION, format!("Bearer {token}"))
            .header("idempotency-key", "stream-1")
            .body(Body::from(
                json!({ "message": "hi", "stream": true }).to_string(),
            ))
            .unwrap()
    };
    let mut texts = Vec::new();
    for _ in 0..2 {
        let response = app.router.clone().oneshot(request()).await.unwrap();
        let replayed = response.headers().contains_key("idempotent-replayed");
        let mut events = EventReader {
            body: response.into_body(),
            buffer: String::new(),
            comments: 0,
        };
        let events = events.rest().await;
        let text = deltas(&events).concat();
        assert_eq!(events.last().unwrap().1["tokens"], 3900);
        texts.push((text, replayed));
    }
    assert_eq!(texts[0], ("Echo: hi".to_string(), false));
    assert_eq!(texts[1], ("Echo: hi".to_string(), true));
    assert_eq!(app.llm.calls(), 1);
    assert_eq!(app.balance(&token).await, 3900);
}

#[tokio::test]
async fn with_no_upstream_the_demo_model_answers_whole_and_streamed_and_is_metered() {
    let app = TestApp::with_env(&[("LLM_BASE_URL", "")]).await;
    let token = app.user_with_token("user").await;
    let whole = app.chat(&token, "code hello world in python").await;
    assert_eq!(whole.status, StatusCode::OK, "{whole:?}");
    let answer = whole.json["response"].as_str().unwrap();
    assert!(
        answer.starts_with("Code for 'Hello World' in Python:"),
        "{answer}"
    );
    assert!(answer.contains("print(\"Hello, World!\")"), "{answer}");
    assert_eq!(whole.json["tokens"], 3900);

    let events = stream_message(&app, &token, "what is the weather like")
        .await
        .events()
        .rest()
        .await;
    let pieces = deltas(&events);
    assert!(pieces.len() > 10, "word by word: {pieces:?}");
    let text = pieces.concat();
    assert!(
        text.starts_with("Sorry, I could not generate 'Hello World'"),
        "{text}"
    );
    assert!(text.contains("LLM_BASE_URL"), "{text}");
    assert_eq!(events.last().unwrap().1["tokens"], 3800);
    assert_eq!(app.llm.calls(), 0, "no upstream was asked");
    app.assert_all_settled().await;
}

#[tokio::test]
async fn a_stream_cut_by_the_end_of_shutdown_grace_ends_with_an_error_and_is_refunded() {
    let app = TestApp::new().await;
    let token = app.user_with_token("user").await;
    app.llm.set_reply(Reply::SlowStream {
        every: Duration::from_millis(200),
    });
    let mut events = stream_message(&app, &token, "one two three four five")
        .await
        .events();
    assert_eq!(events.next().await.unwrap().0, "start");
    assert_eq!(events.next().await.unwrap().0, "delta");
    app.state.cancel_chats.cancel();
    let rest = events.rest().await;
    let (name, error) = rest.last().unwrap();
    assert_eq!(name, "error");
    assert_eq!(error["code"], "shutting_down");
    let chat = only_chat(&app, &token).await;
    assert_eq!(chat["status"], "failed");
    assert_eq!(chat["tokens_charged"], 0);
    assert_eq!(app.balance(&token).await, 4000);
    app.assert_all_settled().await;
}

#[tokio::test]
async fn a_stream_whose_model_is_silent_says_keep_alive_every_fifteen_seconds() {
    let app =
        TestApp::with_env(&[("LLM_TIMEOUT_SECS", "60"), ("LLM_STREAM_IDLE_SECS", "40")]).await;
    let token = app.user_with_token("user").await;
    app.llm.set_reply(Reply::StallMidStream {
        after_words: 1,
        stall: Duration::from_secs(30),
    });
    let mut events = stream_message(&app, &token, "hello there").await.events();
    assert_eq!(events.next().await.unwrap().0, "start");
    assert_eq!(events.next().await.unwrap().0, "delta");
    let waited = events.keep_alive(Duration::from_secs(20)).await;
    let waited = waited.expect("no keep-alive comment within 20 s of silence");
    assert!(waited > Duration::from_secs(10), "{waited:?}");
    drop(events);
    settled_chat(&app, &token).await;
    app.assert_all_settled().await;
}

/// The texts of the `delta` events, in order.
pub(crate) fn deltas(events: &[(String, Value)]) -> Vec<&str> {
    events
        .iter()
        .filter(|(name, _)| name == "delta")
        .map(|(_, data)| data["content"].as_str().unwrap())
        .collect()
}

/// Polls `condition` every 10 ms for up to 5 s.
async fn wait_until(condition: impl Fn() -> bool) -> bool {
    for _ in 0..500 {
        if condition() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}
