//! The requests each property generates: anything, fields a client might mean, and hostile
//! headers around chats that would be answered.

use axum::http::Method;
use proptest::{prelude::*, sample::select, strategy::BoxedStrategy};
use serde_json::Value;

use super::body_strategies::{
    body, chat_fields, credential_fields, encoding, message_text, password_fields, small_body,
};
use super::case::{Auth, BodySpec, Encoding, Hostile, Raw, Scheme, Target};
use super::header_strategies::{
    authorization, chat_id, content_length, content_type, content_types, idempotency_key, method,
    query, target,
};

/// Any method, any path, any headers, any body.
pub(super) fn anything() -> BoxedStrategy<Hostile> {
    (
        method(),
        target(),
        authorization(),
        content_types(),
        content_length(),
        idempotency_key(),
        body(),
    )
        .prop_map(
            |(
                method,
                target,
                authorization,
                content_type,
                content_length,
                idempotency_key,
                body,
            )| {
                Hostile {
                    method,
                    target,
                    authorization,
                    content_type,
                    content_length,
                    idempotency_key,
                    body,
                }
            },
        )
        .boxed()
}

/// A request a client might mean: the right method on a real route, mostly a live token,
/// a body shaped for the route, and hostile values in its fields. Registration, login and
/// password changes, which cost an Argon2 hash when well formed, are a small share.
pub(super) fn plausible() -> BoxedStrategy<Hostile> {
    let route = |path: &'static str, slash: bool| Target::Route {
        path,
        slash,
        query: String::new(),
    };
    let fields = |fields: BoxedStrategy<Vec<(String, Value)>>| {
        (fields, encoding()).prop_map(|(fields, encoding)| BodySpec::Fields(fields, encoding))
    };
    let request = prop_oneof![
        12 => (any::<bool>(), fields(chat_fields()))
            .prop_map(move |(slash, body)| (Method::POST, route("/chat", slash), body)),
        1 => (any::<bool>(), fields(credential_fields()))
            .prop_map(move |(slash, body)| (Method::POST, route("/register", slash), body)),
        1 => (any::<bool>(), fields(credential_fields()))
            .prop_map(move |(slash, body)| (Method::POST, route("/login", slash), body)),
        1 => (any::<bool>(), fields(password_fields()))
            .prop_map(move |(slash, body)| (Method::POST, route("/password", slash), body)),
        2 => (select(vec!["/balance", "/logout", "/logout/all"]), any::<bool>(), small_body())
            .prop_map(move |(path, slash, body)| (Method::POST, route(path, slash), body)),
        3 => (select(vec!["/chats", "/transactions", "/balance"]), any::<bool>(), query())
            .prop_map(|(path, slash, query)| {
                (Method::GET, Target::Route { path, slash, query }, BodySpec::Empty)
            }),
        2 => (chat_id(), any::<bool>())
            .prop_map(|(id, slash)| (Method::GET, Target::Chat { id, slash }, BodySpec::Empty)),
    ];
    let live = prop_oneof![
        4 => Just(vec![Auth::Token { user: 0, scheme: Scheme::Token }]),
        2 => (0..2usize, select(Scheme::VALID.to_vec()))
            .prop_map(|(user, scheme)| vec![Auth::Token { user, scheme }]),
        1 => authorization(),
    ];
    let content_type = prop_oneof![
        4 => Just(None),
        4 => Just(Some(Raw::from("application/json"))),
        2 => content_type(),
    ];
    (
        request,
        live,
        content_type,
        content_length(),
        idempotency_key(),
    )
        .prop_map(
            |(
                (method, target, body),
                authorization,
                content_type,
                content_length,
                idempotency_key,
            )| {
                // Form data says so, mostly.
                let content_type = match (&body, content_type) {
                    (BodySpec::Fields(_, Encoding::Form), Some(raw))
                        if raw.0 == b"application/json" =>
                    {
                        vec![Raw::from("application/x-www-form-urlencoded")]
                    }
                    (_, content_type) => content_type.into_iter().collect(),
                };
                Hostile {
                    method,
                    target,
                    authorization,
                    content_type,
                    content_length,
                    idempotency_key,
                    body,
                }
            },
        )
        .boxed()
}

/// Chats that would be answered but for their headers: hostile `Authorization`,
/// `Content-Type`, `Content-Length` and `Idempotency-Key` (a few keys, reused, so that
/// replays and conflicting reuses happen).
pub(super) fn chat_with_hostile_headers() -> BoxedStrategy<Hostile> {
    let message = prop_oneof![
        4 => select(vec!["hello", "hello again", "code hello world in go"]).prop_map(str::to_string),
        1 => message_text(),
    ];
    let idempotency_key = prop_oneof![
        2 => Just(None),
        2 => select(vec!["k1", "k2"]).prop_map(|key| Some(Raw::from(key))),
        1 => idempotency_key(),
    ];
    let authorization = prop_oneof![
        3 => (0..2usize, select(Scheme::VALID.to_vec()))
            .prop_map(|(user, scheme)| vec![Auth::Token { user, scheme }]),
        2 => authorization(),
    ];
    let content_type = prop_oneof![
        2 => Just(Some(Raw::from("application/json"))),
        2 => content_type(),
    ];
    (
        any::<bool>(),
        message,
        encoding(),
        authorization,
        content_type,
        content_length(),
        idempotency_key,
    )
        .prop_map(
            |(
                slash,
                message,
                encoding,
                authorization,
                content_type,
                content_length,
                idempotency_key,
            )| {
                Hostile {
                    method: Method::POST,
                    target: Target::Route {
                        path: "/chat",
                        slash,
                        query: String::new(),
                    },
                    authorization,
                    content_type: content_type.into_iter().collect(),
                    content_length,
                    idempotency_key,
                    body: BodySpec::Fields(
                        vec![("message".to_string(), Value::String(message))],
                        encoding,
                    ),
                }
            },
        )
        .boxed()
}
