//! Strategies for the head of a request: methods, routes and odd targets, query strings,
//! `Authorization` headers, `Content-Type`s, `Content-Length`s and `Idempotency-Key`s.

use axum::http::{HeaderValue, Method};
use proptest::{collection::vec, prelude::*, sample::select, strategy::BoxedStrategy};

use super::case::{Auth, Length, Raw, Scheme, Target};
use super::LAST_CHAT;

/// Header bytes the http crate accepts (visible ASCII, space, tab and obs-text 0x80-0xff),
/// from arbitrary bytes.
fn header_bytes(max: usize) -> BoxedStrategy<Raw> {
    vec(any::<u8>(), 0..max)
        .prop_map(|bytes| {
            Raw(bytes
                .into_iter()
                .filter(|byte| HeaderValue::from_bytes(&[*byte]).is_ok())
                .collect())
        })
        .boxed()
}

pub(super) fn method() -> BoxedStrategy<Method> {
    let odd = [
        "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "TRACE", "CONNECT", "get", "post", "FOO",
        "M-SEARCH", "PROPFIND",
    ]
    .map(|name| Method::from_bytes(name.as_bytes()).unwrap());
    prop_oneof![
        6 => Just(Method::POST),
        3 => Just(Method::GET),
        2 => select(odd.to_vec()),
    ]
    .boxed()
}

const ROUTES: [&str; 12] = [
    "/health",
    "/ready",
    "/metrics",
    "/register",
    "/login",
    "/chat",
    "/balance",
    "/chats",
    "/transactions",
    "/logout",
    "/logout/all",
    "/password",
];

pub(super) fn query() -> BoxedStrategy<String> {
    let odd = [
        "?",
        "?limit=0",
        "?limit=1",
        "?limit=100",
        "?limit=101",
        "?limit=-1",
        "?limit=abc",
        "?limit=1.5",
        "?limit=+5",
        "?limit=%205",
        "?limit=1&limit=2",
        "?limit=99999999999999999999",
        "?cursor=0",
        "?cursor=1",
        "?cursor=-5",
        "?cursor=%FF",
        "?cursor=%00",
        "?cursor=9223372036854775807",
        "?cursor=9223372036854775808",
        "?limit=%00",
        "?=&&=",
        "?limit",
        "?%",
        "?%%",
        "?limit=1%",
        "?limit[]=1",
        "?cursor=1&limit=1&x=y",
        "?a=%C3%28",
    ];
    prop_oneof![
        6 => Just(String::new()),
        3 => select(odd.to_vec()).prop_map(str::to_string),
        1 => "[a-z=&%0-9+;._~-]{0,24}".prop_map(|q| format!("?{q}")),
    ]
    .boxed()
}

pub(super) fn chat_id() -> BoxedStrategy<String> {
    let odd = [
        "1",
        "2",
        "0",
        "-1",
        "007",
        "+1",
        "1e3",
        "0x10",
        "9223372036854775807",
        "9223372036854775808",
        "-9223372036854775808",
        "99999999999999999999999999",
        "abc",
        "%00",
        "%FF",
        "%C3%28",
        "%F0%9F%98%80",
        "%20",
        "1%2F2",
        "..",
        "%2e%2e",
        "%25",
        "%",
        "%zz",
        "%7Bid%7D",
        "1;2",
        "1.0",
    ];
    prop_oneof![
        3 => Just(LAST_CHAT.to_string()),
        3 => select(odd.to_vec()).prop_map(str::to_string),
        1 => "[A-Za-z0-9%._~!$&'()*+,;=:@-]{1,24}",
    ]
    .boxed()
}

fn unknown_target() -> BoxedStrategy<String> {
    let odd = [
        "/",
        "//",
        "/chat//",
        "//chat",
        "/CHAT",
        "/Chat/",
        "/chat/x",
        "/chat/1",
        "/chats/1/2",
        "/chats//",
        "/chats/1//",
        "/admin",
        "/health/x",
        "/logout/all/x",
        "/logout/everything",
        "/logout//all",
        "/%00",
        "/.env",
        "/chat%2F",
        "/%63hat",
        "/chat/%2e%2e/balance",
        "/register/../chat",
        "/api/chat",
        "/chat.json",
        "/chat?",
        "http://127.0.0.1/chat",
        "http://127.0.0.1:8000/balance/?limit=1",
        "*",
    ];
    prop_oneof![
        3 => select(odd.to_vec()).prop_map(str::to_string),
        1 => "/[A-Za-z0-9%._~!$&'()*+,;=:@/-]{0,30}",
    ]
    .boxed()
}

pub(super) fn target() -> BoxedStrategy<Target> {
    let route = prop_oneof![
        3 => Just("/chat"),
        7 => select(ROUTES.to_vec()),
    ];
    prop_oneof![
        8 => (route, any::<bool>(), query())
            .prop_map(|(path, slash, query)| Target::Route { path, slash, query }),
        2 => (chat_id(), any::<bool>()).prop_map(|(id, slash)| Target::Chat { id, slash }),
        2 => unknown_target().prop_map(Target::Other),
    ]
    .boxed()
}

fn scheme() -> BoxedStrategy<Scheme> {
    prop_oneof![
        4 => select(Scheme::VALID.to_vec()),
        1 => select(Scheme::INVALID.to_vec()),
    ]
    .boxed()
}

fn auth() -> BoxedStrategy<Auth> {
    let odd = [
        String::new(),
        " ".into(),
        "Token".into(),
        "Bearer ".into(),
        "Token  ".into(),
        "Basic dXNlcjpwYXNz".into(),
        "null".into(),
        "Token null".into(),
        "Bearer undefined".into(),
        format!("Token {}", "a".repeat(10_000)),
        "a".repeat(32 * 1024),
    ];
    prop_oneof![
        6 => (0..2usize, scheme()).prop_map(|(user, scheme)| Auth::Token { user, scheme }),
        1 => Just(Auth::Unknown),
        2 => header_bytes(48).prop_map(Auth::Raw),
        1 => select(odd.to_vec()).prop_map(|text| Auth::Raw(Raw(text.into_bytes()))),
    ]
    .boxed()
}

/// None, one or two `Authorization` headers.
pub(super) fn authorization() -> BoxedStrategy<Vec<Auth>> {
    prop_oneof![
        3 => Just(Vec::new()),
        6 => auth().prop_map(|auth| vec![auth]),
        1 => vec(auth(), 2..=2),
    ]
    .boxed()
}

pub(super) fn content_type() -> BoxedStrategy<Option<Raw>> {
    let odd = [
        "application/json; charset=utf-8",
        "application/json;charset=UTF-8",
        "APPLICATION/JSON",
        "application/json; charset=latin1",
        "application/json;;;",
        "application/json, text/plain",
        "application/x-www-form-urlencoded",
        "application/x-www-form-urlencoded; charset=utf-8",
        "application/vnd.api+json",
        "application/problem+json",
        "application/+json",
        "+json",
        "text/plain",
        "text/json",
        "text/html; charset=utf-8",
        "multipart/form-data; boundary=xyz",
        "application/jsonp",
        "application/json-seq",
        "application/octet-stream",
        "*/*",
        "application/*",
        "",
        " ",
        ";",
        "json",
    ];
    prop_oneof![
        3 => Just(None),
        3 => Just(Some("application/json".into())),
        3 => select(odd.to_vec()).prop_map(|text| Some(text.into())),
        1 => header_bytes(40).prop_map(Some),
    ]
    .boxed()
}

/// No `Content-Type`, one, or (rarely) two.
pub(super) fn content_types() -> BoxedStrategy<Vec<Raw>> {
    prop_oneof![
        9 => content_type().prop_map(|raw| raw.into_iter().collect()),
        1 => (content_type(), content_type())
            .prop_map(|(a, b)| a.into_iter().chain(b).collect()),
    ]
    .boxed()
}

fn length() -> BoxedStrategy<Length> {
    let odd = [
        "0",
        "1",
        "-1",
        "abc",
        "",
        " 5 ",
        "5, 5",
        "0x10",
        "1e3",
        "18446744073709551615",
        "18446744073709551616",
        "99999999999999999999999999999",
    ];
    prop_oneof![
        1 => Just(Length::Off(0)),
        1 => select(vec![-100i64, -1, 1, 100, 1 << 20]).prop_map(Length::Off),
        2 => select(odd.to_vec()).prop_map(Length::Text),
    ]
    .boxed()
}

/// No `Content-Length`, one, or two.
pub(super) fn content_length() -> BoxedStrategy<Vec<Length>> {
    prop_oneof![
        8 => Just(Vec::new()),
        2 => length().prop_map(|length| vec![length]),
        1 => vec(length(), 2..=2),
    ]
    .boxed()
}

pub(super) fn idempotency_key() -> BoxedStrategy<Option<Raw>> {
    let odd = [
        String::new(),
        " ".into(),
        " padded ".into(),
        "a".repeat(255),
        "a".repeat(256),
        "key\twith tab".into(),
    ];
    prop_oneof![
        6 => Just(None),
        2 => select(vec!["k1", "k2"]).prop_map(|key| Some(key.into())),
        1 => select(odd.to_vec()).prop_map(|key| Some(Raw(key.into_bytes()))),
        1 => header_bytes(64).prop_map(Some),
    ]
    .boxed()
}
