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

use crate::common::{TestApp, TestResponse};

mod endings;
mod events;
mod metering;

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

/// Every event of a streamed chat of `message`, to the stream's end.
pub(crate) async fn stream_to_end(
    app: &TestApp,
    token: &str,
    message: &str,
) -> Vec<(String, Value)> {
    stream_message(app, token, message)
        .await
        .events()
        .rest()
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
