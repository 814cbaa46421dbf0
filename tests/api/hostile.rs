//! Property: whatever bytes, headers, methods and paths a client sends, to any route, the
//! server never answers 5xx; every answer but a 204 (and a bodiless HEAD), the page at `/`
//! and `/metrics` is `application/json`; every error is the contract's envelope (a sentence in `error`, a
//! snake_case `code` the contract lists for its status, `Allow` on 405, `Retry-After` on
//! 429); and only an answered chat moves a balance, by exactly `CHAT_COST`, and only for
//! the owner of the one live token it came with.
//!
//! What is generated: every method (odd and lower-case ones too) on every route with and
//! without its trailing slash, `/chats/{id}` with odd ids, odd query strings, unknown
//! paths; none, one or two `Authorization` headers (each user's live token in every
//! accepted form and in near-miss forms, the other user's, nobody's, arbitrary header
//! bytes); odd, garbage and doubled `Content-Type`s; `Content-Length`s that disagree with
//! the body or are no number; `Idempotency-Key`s, reused; bodies of arbitrary bytes (up to
//! 6 KB), any JSON value, objects of the routes' fields with values of every type and
//! strings at the limits (50/51-character usernames, 40/41-character messages in 1 to
//! 4-byte characters, combining marks, emoji sequences, invisible, right-to-left and NUL
//! characters), every string written as `\u` escapes, form data (with invalid UTF-8),
//! and hand-written near-JSON (lone surrogates, duplicate keys, deep nesting, trailing
//! garbage).
//!
//! Each property keeps one app (one database, one fake model that echoes) for all its
//! cases; each case gets two fresh users and sends a sequence of 1 to 6 requests. After
//! each case every balance is its starting balance less `CHAT_COST` per chat answered for
//! that user, the model was asked exactly once per answered chat, no chat is pending and
//! the ledger audit passes. The users are created with the queries `/register` and
//! `/login` run, minus Argon2 (one hash of `pass123` per app), so that password hashing is
//! paid only by the hostile requests that reach it, which the strategies keep a minority.
//! `PROPTEST_CASES=n` runs n cases of each property.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Mutex,
    },
    time::Instant,
};

use axum::{
    body::{Body, Bytes},
    http::{header, HeaderMap, HeaderValue, Method, Request, StatusCode, Uri},
};
use http_body_util::BodyExt;
use proptest::{
    collection::vec,
    prelude::*,
    sample::select,
    strategy::BoxedStrategy,
    test_runner::{Config, TestCaseError, TestRunner},
};
use serde_json::Value;
use tower::ServiceExt;

use crate::common::TestApp;

const MAX_MESSAGE_CHARS: usize = 40;
const MAX_BODY_BYTES: usize = 2048;
const INITIAL_TOKENS: i64 = 4000;
const CHAT_COST: i64 = 100;
const PASSWORD: &str = "pass123";

/// The fields the routes read, and one they do not.
const KEYS: [&str; 8] = [
    "message",
    "username",
    "password",
    "old_password",
    "new_password",
    "stream",
    "conversation_id",
    "extra",
];

/// Stand-ins in generated strings for what exists only once a case runs.
const USER: [&str; 2] = ["{{user0}}", "{{user1}}"];
/// The first user's name in capitals: the same account.
const USER_SHOUTED: &str = "{{USER0}}";
const TOKEN: [&str; 2] = ["{{token0}}", "{{token1}}"];
const LAST_CHAT: &str = "{{last_chat}}";

// ---------------------------------------------------------------------------------------
// What a case sends.

#[derive(Debug, Clone)]
struct Hostile {
    method: Method,
    target: Target,
    authorization: Vec<Auth>,
    content_type: Vec<Raw>,
    content_length: Vec<Length>,
    idempotency_key: Option<Raw>,
    body: BodySpec,
}

/// Bytes of a header value or body, shown escaped in failure reports.
#[derive(Clone)]
struct Raw(Vec<u8>);

impl fmt::Debug for Raw {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "b\"{}\"", self.0.escape_ascii())
    }
}

impl From<&str> for Raw {
    fn from(text: &str) -> Self {
        Self(text.as_bytes().to_vec())
    }
}

#[derive(Debug, Clone)]
enum Target {
    /// A route (or any path) with or without a trailing slash, and a query string.
    Route {
        path: &'static str,
        slash: bool,
        query: String,
    },
    /// `/chats/{id}`.
    Chat { id: String, slash: bool },
    /// Anything else that parses as a request target.
    Other(String),
}

#[derive(Debug, Clone)]
enum Auth {
    /// A live token of one of the case's two users, in some header form.
    Token {
        user: usize,
        scheme: Scheme,
    },
    /// Well formed, but nobody's.
    Unknown,
    Raw(Raw),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scheme {
    Bare,
    Token,
    Bearer,
    /// `bearer  <t> `
    Sloppy,
    /// `TOKEN <t>`
    Shouted,
    /// ` Bearer <t>`
    Indented,
    // Forms that carry the token but are not one of the accepted ones.
    Tab,
    Basic,
    Truncated,
    Extended,
    Doubled,
    Quoted,
    Listed,
}

impl Scheme {
    const VALID: [Self; 6] = [
        Self::Bare,
        Self::Token,
        Self::Bearer,
        Self::Sloppy,
        Self::Shouted,
        Self::Indented,
    ];
    const INVALID: [Self; 7] = [
        Self::Tab,
        Self::Basic,
        Self::Truncated,
        Self::Extended,
        Self::Doubled,
        Self::Quoted,
        Self::Listed,
    ];

    fn is_valid(self) -> bool {
        Self::VALID.contains(&self)
    }

    fn render(self, token: &str) -> String {
        match self {
            Self::Bare => token.to_string(),
            Self::Token => format!("Token {token}"),
            Self::Bearer => format!("Bearer {token}"),
            Self::Sloppy => format!("bearer  {token} "),
            Self::Shouted => format!("TOKEN {token}"),
            Self::Indented => format!(" Bearer {token}"),
            Self::Tab => format!("Token\t{token}"),
            Self::Basic => format!("Basic {token}"),
            Self::Truncated => format!("Token {}", &token[1..]),
            Self::Extended => format!("Token {token}0"),
            Self::Doubled => format!("Token Token {token}"),
            Self::Quoted => format!("Bearer \"{token}\""),
            Self::Listed => format!("Token {token}, Token {token}"),
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Length {
    /// The body's length plus this (a disagreeing header unless 0).
    Off(i64),
    Text(&'static str),
}

#[derive(Debug, Clone)]
enum BodySpec {
    Empty,
    Bytes(Raw),
    /// Any JSON value, serialised.
    Json(Value),
    /// An object written field by field (so keys may repeat), in some encoding.
    Fields(Vec<(String, Value)>, Encoding),
    /// Form data whose values are arbitrary bytes, percent-encoded or not.
    FormBytes(Vec<(String, Raw, bool)>),
    /// Text written by hand: lone surrogates, truncations, trailing garbage...
    Text(String),
    /// Another body after this many spaces.
    Padded(Box<BodySpec>, usize),
}

#[derive(Debug, Clone, Copy)]
enum Encoding {
    Json,
    /// JSON with every string character written as a `\u` escape.
    Escaped,
    Form,
}

// ---------------------------------------------------------------------------------------
// Strategies.

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

fn method() -> BoxedStrategy<Method> {
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

fn query() -> BoxedStrategy<String> {
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

fn chat_id() -> BoxedStrategy<String> {
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

fn target() -> BoxedStrategy<Target> {
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
fn authorization() -> BoxedStrategy<Vec<Auth>> {
    prop_oneof![
        3 => Just(Vec::new()),
        6 => auth().prop_map(|auth| vec![auth]),
        1 => vec(auth(), 2..=2),
    ]
    .boxed()
}

fn content_type() -> BoxedStrategy<Option<Raw>> {
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
fn content_types() -> BoxedStrategy<Vec<Raw>> {
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
fn content_length() -> BoxedStrategy<Vec<Length>> {
    prop_oneof![
        8 => Just(Vec::new()),
        2 => length().prop_map(|length| vec![length]),
        1 => vec(length(), 2..=2),
    ]
    .boxed()
}

fn idempotency_key() -> BoxedStrategy<Option<Raw>> {
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

/// Messages around the limits: 40 and 41 characters of one to several bytes each,
/// combining marks, emoji sequences, invisible and right-to-left text, NULs.
fn message_text() -> BoxedStrategy<String> {
    let limit = MAX_MESSAGE_CHARS;
    let odd = vec![
        "code hello world in python".to_string(),
        "a".repeat(limit),
        "a".repeat(limit + 1),
        "é".repeat(limit),
        "é".repeat(limit + 1),
        "😀".repeat(limit),
        "😀".repeat(limit + 1),
        // A letter and a combining acute: two characters each.
        "e\u{301}".repeat(limit / 2),
        "e\u{301}".repeat(limit / 2 + 1),
        // A family: seven characters (four people, three joiners).
        "👨\u{200d}👩\u{200d}👧\u{200d}👦".repeat(5),
        "👨\u{200d}👩\u{200d}👧\u{200d}👦".repeat(6),
        "\u{200b}\u{200c}\u{200d}\u{2060}\u{feff}".into(),
        "\u{202e}olleh\u{202c}".into(),
        "مرحبا بالعالم".into(),
        "שלום \u{200f}עולם".into(),
        " \t\n\r ".into(),
        "\u{a0}\u{3000}".into(),
        "a\0b".into(),
        "\0".into(),
        format!("{}x", " ".repeat(limit)),
        "\u{fffd}\u{fffe}\u{ffff}".into(),
        "\u{10ffff}".into(),
    ];
    prop_oneof![
        4 => "[a-zA-Z0-9 ,.?!]{1,40}",
        4 => select(odd),
        2 => ".{0,45}",
    ]
    .boxed()
}

fn username_text() -> BoxedStrategy<String> {
    let odd = vec![
        USER[0].to_string(),
        USER[1].to_string(),
        USER_SHOUTED.to_string(),
        "a".repeat(50),
        "a".repeat(51),
        "é".repeat(50),
        "é".repeat(51),
        "e\u{301}".repeat(25),
        "ａｄｍｉｎ".into(),
        "\u{430}dmin".into(),
        "user name".into(),
        "user/name".into(),
        "me@example.com".into(),
        String::new(),
        " ".into(),
        "\0".into(),
        "a\0b".into(),
        "😀".into(),
        "\u{202e}nimda".into(),
        "a\u{200b}b".into(),
    ];
    prop_oneof![
        4 => select(odd),
        1 => "[a-z0-9@.+_-]{1,12}",
        1 => ".{0,52}",
    ]
    .boxed()
}

fn password_text() -> BoxedStrategy<String> {
    let odd = vec![
        PASSWORD.to_string(),
        String::new(),
        "12345".into(),
        "p".repeat(1024),
        "p".repeat(1025),
        "é".repeat(512),
        "é".repeat(513),
        "pass\0word".into(),
        "😀".repeat(6),
        " ".repeat(6),
        "\u{200b}".into(),
    ];
    prop_oneof![
        4 => select(odd),
        1 => ".{0,12}",
    ]
    .boxed()
}

fn any_text() -> BoxedStrategy<String> {
    prop_oneof![
        3 => message_text(),
        2 => username_text(),
        2 => password_text(),
        1 => select(vec![TOKEN[0], TOKEN[1], LAST_CHAT]).prop_map(str::to_string),
        1 => any::<String>(),
    ]
    .boxed()
}

fn number() -> BoxedStrategy<Value> {
    prop_oneof![
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("JSON numbers are finite", |x| x.is_finite())
            .prop_map(Value::from),
        select(vec![0i64, 1, -1, 100]).prop_map(Value::from),
    ]
    .boxed()
}

fn key() -> BoxedStrategy<String> {
    prop_oneof![
        8 => select(KEYS.to_vec()).prop_map(str::to_string),
        1 => ".{0,12}",
    ]
    .boxed()
}

/// Any JSON value: nested arrays and objects (with our keys), every scalar type.
fn json_value() -> BoxedStrategy<Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        number(),
        any_text().prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 24, 5, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..5).prop_map(Value::Array),
            vec((key(), inner), 0..5)
                .prop_map(|fields| Value::Object(fields.into_iter().collect())),
        ]
    })
    .boxed()
}

/// Mostly a string of the field's kind, sometimes a value of another type.
fn field_value(text: BoxedStrategy<String>) -> BoxedStrategy<Value> {
    prop_oneof![
        5 => text.prop_map(Value::String),
        1 => json_value(),
    ]
    .boxed()
}

/// Fields that are not what the route reads.
fn extra_fields(max: usize) -> BoxedStrategy<Vec<(String, Value)>> {
    vec((key(), field_value(any_text())), 0..max).boxed()
}

/// `wanted` fields, each sometimes missing, followed by some others.
fn shaped_fields(
    wanted: Vec<(&'static str, BoxedStrategy<String>)>,
) -> BoxedStrategy<Vec<(String, Value)>> {
    let fields: Vec<_> = wanted
        .into_iter()
        .map(|(name, text)| {
            proptest::option::weighted(0.9, field_value(text))
                .prop_map(move |value| value.map(|value| (name.to_string(), value)))
        })
        .collect();
    (fields, extra_fields(3))
        .prop_map(|(wanted, extra)| wanted.into_iter().flatten().chain(extra).collect())
        .boxed()
}

fn chat_fields() -> BoxedStrategy<Vec<(String, Value)>> {
    shaped_fields(vec![("message", message_text())])
}

fn credential_fields() -> BoxedStrategy<Vec<(String, Value)>> {
    shaped_fields(vec![
        ("username", username_text()),
        ("password", password_text()),
    ])
}

fn password_fields() -> BoxedStrategy<Vec<(String, Value)>> {
    shaped_fields(vec![
        ("old_password", password_text()),
        ("new_password", password_text()),
    ])
}

fn encoding() -> BoxedStrategy<Encoding> {
    prop_oneof![
        6 => Just(Encoding::Json),
        1 => Just(Encoding::Escaped),
        2 => Just(Encoding::Form),
    ]
    .boxed()
}

/// JSON-ish text no serialiser would write.
fn handmade_text() -> BoxedStrategy<String> {
    let odd = vec![
        r#"{"message":"\ud800"}"#.to_string(),
        r#"{"message":"\udc00x"}"#.into(),
        r#"{"message":"a\ud800\ud800b"}"#.into(),
        r#"{"message":"\ud83d\ude00"}"#.into(),
        r#"{"message":"\u0000"}"#.into(),
        r#"{"message":"a\u0000b"}"#.into(),
        r#"{"username":"a\ud800","password":"pass123"}"#.into(),
        r#"{"username":"{{user0}}","password":"\udfff"}"#.into(),
        r#"{"old_password":"\ud800","new_password":"\ud800\udc00\ud800"}"#.into(),
        r#"{"message":"hi","message":"again"}"#.into(),
        r#"{"message":"hi"} trailing"#.into(),
        r#"{"message":"hi"}{"message":"hi"}"#.into(),
        r#"{"message":"hi""#.into(),
        r#"{"message":1e400}"#.into(),
        r#"{"message":-0}"#.into(),
        r#"{"message":"\x41"}"#.into(),
        r#"{"message":'single'}"#.into(),
        r#"{message:"unquoted"}"#.into(),
        r#"{"message":"hi",}"#.into(),
        "{\"message\":\"tab\tinside\"}".into(),
        "{\"message\":\"nul\0inside\"}".into(),
        "\u{feff}{\"message\":\"bom\"}".into(),
        "{}".into(),
        "[]".into(),
        "null".into(),
        "\"message\"".into(),
        "{".into(),
        "}".into(),
        "message=hi".into(),
        "message=hi&message=again".into(),
        "message=%ff".into(),
        "message=%".into(),
        "message=%ED%A0%80".into(),
        "message=%C0%AE".into(),
        "message=%F4%90%80%80".into(),
        "message=a%00b".into(),
        "message=+++".into(),
        "message".into(),
        "=hi".into(),
        "&&&".into(),
        "username=&password=".into(),
        format!("{}{}", "[".repeat(2000), "]".repeat(2000)),
        format!("{{\"message\":{}1{}}}", "[".repeat(300), "]".repeat(300)),
        format!("{}\"message\":1{}", "{\"a\":".repeat(300), "}".repeat(300)),
    ];
    prop_oneof![
        4 => select(odd),
        1 => ".{0,64}",
    ]
    .boxed()
}

/// JSON that is not UTF-8, or holds what a JSON string may not.
fn handmade_bytes() -> BoxedStrategy<Vec<u8>> {
    let odd: Vec<&[u8]> = vec![
        b"{\"message\":\"\xff\"}",
        b"{\"message\":\"\xed\xa0\x80\"}",
        b"{\"message\":\"\xc0\xae\"}",
        b"{\"message\":\"\xf4\x90\x80\x80\"}",
        b"{\"message\":\"a\x00b\"}",
        b"{\"message\":\"a\x1fb\"}",
        b"{\"message\":\"hi\"}\x00",
        b"\x00{\"message\":\"hi\"}",
        b"{\"username\":\"\xfe\",\"password\":\"pass123\"}",
        b"\xff\xfe{\x00\"\x00",
    ];
    select(odd).prop_map(<[u8]>::to_vec).boxed()
}

fn form_bytes() -> BoxedStrategy<BodySpec> {
    vec(
        (key(), vec(any::<u8>(), 0..24).prop_map(Raw), any::<bool>()),
        0..4,
    )
    .prop_map(BodySpec::FormBytes)
    .boxed()
}

fn small_body() -> BoxedStrategy<BodySpec> {
    prop_oneof![
        1 => Just(BodySpec::Empty),
        2 => vec(any::<u8>(), 0..64).prop_map(|bytes| BodySpec::Bytes(Raw(bytes))),
        2 => json_value().prop_map(BodySpec::Json),
        4 => (extra_fields(5), encoding()).prop_map(|(fields, encoding)| BodySpec::Fields(fields, encoding)),
        2 => (chat_fields(), encoding()).prop_map(|(fields, encoding)| BodySpec::Fields(fields, encoding)),
        2 => handmade_text().prop_map(BodySpec::Text),
        1 => handmade_bytes().prop_map(|bytes| BodySpec::Bytes(Raw(bytes))),
        1 => form_bytes(),
    ]
    .boxed()
}

/// Any body: small ones, a few KB of arbitrary bytes, or a small one padded past the
/// body limits (2 KB, and the chat route's larger one).
fn body() -> BoxedStrategy<BodySpec> {
    prop_oneof![
        10 => small_body(),
        1 => vec(any::<u8>(), 0..6000).prop_map(|bytes| BodySpec::Bytes(Raw(bytes))),
        1 => (small_body(), 1500..6000usize)
            .prop_map(|(body, spaces)| BodySpec::Padded(Box::new(body), spaces)),
    ]
    .boxed()
}

/// Any method, any path, any headers, any body.
fn anything() -> BoxedStrategy<Hostile> {
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
fn plausible() -> BoxedStrategy<Hostile> {
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
fn chat_with_hostile_headers() -> BoxedStrategy<Hostile> {
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

// ---------------------------------------------------------------------------------------
// Rendering a request for one case's users.

struct Names {
    users: [String; 2],
    tokens: [String; 2],
    last_chat: i64,
}

impl Names {
    fn resolve(&self, text: &str) -> String {
        if !text.contains("{{") {
            return text.to_string();
        }
        let mut text = text.to_string();
        for user in 0..2 {
            text = text
                .replace(USER[user], &self.users[user])
                .replace(TOKEN[user], &self.tokens[user]);
        }
        text.replace(USER_SHOUTED, &self.users[0].to_uppercase())
            .replace(LAST_CHAT, &self.last_chat.to_string())
    }

    fn resolve_value(&self, value: &Value) -> Value {
        match value {
            Value::String(text) => Value::String(self.resolve(text)),
            Value::Array(items) => {
                Value::Array(items.iter().map(|v| self.resolve_value(v)).collect())
            }
            Value::Object(fields) => Value::Object(
                fields
                    .iter()
                    .map(|(k, v)| (self.resolve(k), self.resolve_value(v)))
                    .collect(),
            ),
            other => other.clone(),
        }
    }

    fn uri(&self, target: &Target) -> String {
        let slash = |slash: bool| if slash { "/" } else { "" };
        match target {
            Target::Route {
                path,
                slash: s,
                query,
            } => format!("{path}{}{query}", slash(*s)),
            Target::Chat { id, slash: s } => format!("/chats/{}{}", self.resolve(id), slash(*s)),
            Target::Other(target) => target.clone(),
        }
    }

    fn authorization(&self, auth: &Auth) -> HeaderValue {
        let bytes = match auth {
            Auth::Token { user, scheme } => scheme.render(&self.tokens[*user]).into_bytes(),
            Auth::Unknown => b"Token abcdefghijklmnopqrstuvwxyzABCDE1".to_vec(),
            Auth::Raw(raw) => raw.0.clone(),
        };
        HeaderValue::from_bytes(&bytes).expect("generated header values are valid")
    }

    fn body(&self, body: &BodySpec) -> Vec<u8> {
        match body {
            BodySpec::Empty => Vec::new(),
            BodySpec::Bytes(raw) => raw.0.clone(),
            BodySpec::Json(value) => self.resolve_value(value).to_string().into_bytes(),
            BodySpec::Fields(fields, encoding) => {
                let fields = fields
                    .iter()
                    .map(|(k, v)| (self.resolve(k), self.resolve_value(v)));
                match encoding {
                    Encoding::Json | Encoding::Escaped => {
                        let write = |text: &str| match encoding {
                            Encoding::Escaped => escape_every_char(text),
                            _ => Value::from(text).to_string(),
                        };
                        let pairs: Vec<String> = fields
                            .map(|(k, v)| {
                                let v = match &v {
                                    Value::String(text) => write(text),
                                    other => other.to_string(),
                                };
                                format!("{}:{v}", write(&k))
                            })
                            .collect();
                        format!("{{{}}}", pairs.join(",")).into_bytes()
                    }
                    Encoding::Form => {
                        let pairs: Vec<String> = fields
                            .map(|(k, v)| {
                                let v = match v {
                                    Value::String(text) => text,
                                    other => other.to_string(),
                                };
                                format!(
                                    "{}={}",
                                    form_encode(k.as_bytes()),
                                    form_encode(v.as_bytes())
                                )
                            })
                            .collect();
                        pairs.join("&").into_bytes()
                    }
                }
            }
            BodySpec::FormBytes(fields) => {
                let mut out = Vec::new();
                for (i, (k, v, encode)) in fields.iter().enumerate() {
                    if i > 0 {
                        out.push(b'&');
                    }
                    out.extend(form_encode(k.as_bytes()).bytes());
                    out.push(b'=');
                    if *encode {
                        out.extend(form_encode(&v.0).bytes());
                    } else {
                        out.extend(&v.0);
                    }
                }
                out
            }
            BodySpec::Text(text) => self.resolve(text).into_bytes(),
            BodySpec::Padded(inner, spaces) => {
                let mut out = vec![b' '; *spaces];
                out.extend(self.body(inner));
                out
            }
        }
    }

    fn request(&self, hostile: &Hostile) -> Request<Body> {
        let body = self.body(&hostile.body);
        let mut request = Request::builder()
            .method(hostile.method.clone())
            .uri(self.uri(&hostile.target));
        for auth in &hostile.authorization {
            request = request.header(header::AUTHORIZATION, self.authorization(auth));
        }
        for raw in &hostile.content_type {
            request = request.header(
                header::CONTENT_TYPE,
                HeaderValue::from_bytes(&raw.0).unwrap(),
            );
        }
        for length in &hostile.content_length {
            let value = match length {
                Length::Off(off) => (body.len() as i64 + off).to_string(),
                Length::Text(text) => text.to_string(),
            };
            request = request.header(header::CONTENT_LENGTH, value);
        }
        if let Some(raw) = &hostile.idempotency_key {
            request = request.header("idempotency-key", HeaderValue::from_bytes(&raw.0).unwrap());
        }
        request
            .body(Body::from(body))
            .expect("generated requests are valid")
    }
}

/// A JSON string with every character a `\u` escape (surrogate pairs beyond the BMP).
fn escape_every_char(text: &str) -> String {
    let mut out = String::from("\"");
    for unit in text.encode_utf16() {
        out.push_str(&format!("\\u{unit:04x}"));
    }
    out.push('"');
    out
}

fn form_encode(bytes: &[u8]) -> String {
    percent_encoding::percent_encode(bytes, percent_encoding::NON_ALPHANUMERIC).to_string()
}

/// The URI a target becomes; placeholders never change its shape, so stand-ins do.
fn uri_shape(target: &Target) -> Result<Uri, axum::http::uri::InvalidUri> {
    let stand_ins = Names {
        users: ["u0".into(), "u1".into()],
        tokens: ["t".repeat(32), "t".repeat(32)],
        last_chat: 1,
    };
    stand_ins.uri(target).parse()
}

// ---------------------------------------------------------------------------------------
// Running a case and checking every answer.

/// What came back, unparsed.
struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl fmt::Debug for Answer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {:?} {:?}",
            self.status,
            self.headers,
            String::from_utf8_lossy(&self.body)
        )
    }
}

/// One of the case's users.
struct User {
    id: i64,
    initial: i64,
}

/// One property's app, shared by its cases, and what its cases saw.
struct Harness {
    runtime: tokio::runtime::Runtime,
    app: TestApp,
    password_hash: String,
    cases: AtomicUsize,
    seen: Mutex<BTreeMap<String, usize>>,
}

impl Harness {
    fn new() -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let (app, password_hash) = runtime.block_on(async {
            let app = TestApp::with_env(&[
                ("MAX_MESSAGE_CHARS", &MAX_MESSAGE_CHARS.to_string()),
                ("MAX_BODY_BYTES", &MAX_BODY_BYTES.to_string()),
                ("INITIAL_TOKENS", &INITIAL_TOKENS.to_string()),
                ("CHAT_COST", &CHAT_COST.to_string()),
            ])
            .await;
            let hash = app.state.passwords.hash(PASSWORD.into()).await.unwrap();
            (app, hash)
        });
        Self {
            runtime,
            app,
            password_hash,
            cases: AtomicUsize::new(0),
            seen: Mutex::default(),
        }
    }

    /// A user with `initial` tokens and a live login token, as `/register` and `/login`
    /// would leave them.
    /// `name` is the one the user got: a hostile registration may have taken the first.
    async fn user(&self, name: &mut String, initial: i64) -> (User, String) {
        let db = &self.app.state.db;
        let id = loop {
            let key = tokenchat::domain::username_key(name);
            let inserted =
                tokenchat::db::users::insert(db, name, &key, &self.password_hash, initial)
                    .await
                    .unwrap();
            match inserted {
                Some(id) => break id,
                None => name.push('x'),
            }
        };
        let token = tokenchat::services::auth::issue(db, id, Some(86_400))
            .await
            .unwrap()
            .token;
        (User { id, initial }, token)
    }

    async fn balance(&self, user: &User) -> i64 {
        tokenchat::db::users::balance(&self.app.state.db, user.id)
            .await
            .unwrap()
    }

    async fn send(&self, request: Request<Body>) -> Answer {
        let response = self.app.router.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        Answer {
            status,
            headers,
            body,
        }
    }

    fn record(&self, answer: &Answer, json: Option<&Value>) {
        let code = json
            .and_then(|json| json["code"].as_str())
            .map_or(String::new(), |code| format!(" {code}"));
        let key = format!("{}{code}", answer.status.as_u16());
        *self.seen.lock().unwrap().entry(key).or_default() += 1;
    }

    /// Sends `requests` for two fresh users, checking every answer and, at the end, the
    /// balances, the model's calls and the ledger audit.
    async fn run_case(
        &self,
        requests: Vec<Hostile>,
        initial: [i64; 2],
    ) -> Result<(), TestCaseError> {
        let case = self.cases.fetch_add(1, Ordering::SeqCst);
        let mut names = [format!("case{case}.a"), format!("case{case}.b")];
        let (user0, token0) = self.user(&mut names[0], initial[0]).await;
        let (user1, token1) = self.user(&mut names[1], initial[1]).await;
        let users = [user0, user1];
        let mut names = Names {
            users: names,
            tokens: [token0, token1],
            last_chat: 1,
        };
        let llm_calls = self.app.llm.calls();
        let mut state = CaseState {
            alive: [true, true],
            answered: [BTreeSet::new(), BTreeSet::new()],
        };
        for hostile in &requests {
            let request = names.request(hostile);
            let shown = format!("{hostile:#?}\nsent as {request:?}");
            let answer = self.send(request).await;
            let json = check_answer(&hostile.method, &answer).map_err(|err| {
                TestCaseError::fail(format!("{err}\nrequest: {shown}\nanswer: {answer:?}"))
            })?;
            self.record(&answer, json.as_ref());
            let balances = [self.balance(&users[0]).await, self.balance(&users[1]).await];
            state
                .follow(hostile, &answer, json.as_ref(), balances)
                .map_err(|err| {
                    TestCaseError::fail(format!("{err}\nrequest: {shown}\nanswer: {answer:?}"))
                })?;
            if let Some(last) = state.answered.iter().flatten().max() {
                names.last_chat = *last;
            }
        }
        for (n, user) in users.iter().enumerate() {
            let answered = state.answered[n].len() as i64;
            prop_assert_eq!(
                self.balance(user).await,
                user.initial - CHAT_COST * answered,
                "user {}: {} answered chats; requests: {:#?}",
                n,
                answered,
                requests
            );
        }
        let answered = state.answered.iter().map(BTreeSet::len).sum::<usize>();
        prop_assert_eq!(
            self.app.llm.calls() - llm_calls,
            answered,
            "the model was asked once per answered chat and never otherwise; requests: {:#?}",
            requests
        );
        self.app.assert_all_settled().await;
        Ok(())
    }

    /// Runs `cases` cases of 1 to 6 requests from `strategy`, and prints what came back.
    fn check(
        name: &str,
        cases: u32,
        strategy: BoxedStrategy<Hostile>,
        initial: BoxedStrategy<[i64; 2]>,
    ) {
        // `PROPTEST_CASES=n` runs n cases of each property instead.
        let cases = std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|cases| cases.parse().ok())
            .unwrap_or(cases);
        let harness = Self::new();
        let started = Instant::now();
        let mut runner = TestRunner::new(Config {
            cases,
            source_file: Some(file!()),
            ..Config::default()
        });
        let requests = vec(
            strategy.prop_filter("a target that parses", |h| uri_shape(&h.target).is_ok()),
            1..=6,
        );
        let result = runner.run(&(requests, initial), |(requests, initial)| {
            harness
                .runtime
                .block_on(harness.run_case(requests, initial))
        });
        let seen = harness.seen.lock().unwrap().clone();
        let total: usize = seen.values().sum();
        eprintln!(
            "hostile::{name}: {} cases, {total} requests in {:.1?}; answers: {seen:?}",
            harness.cases.load(Ordering::SeqCst),
            started.elapsed()
        );
        if let Err(err) = result {
            panic!("{err}");
        }
    }
}

/// What the requests of a case have done so far.
struct CaseState {
    /// Whether the user's login token is still live (no logout with it yet).
    alive: [bool; 2],
    /// The chats answered (and paid for) for each user.
    answered: [BTreeSet<i64>; 2],
}

/// The routes that answer without a token (`/metrics` does while `METRICS_TOKEN` is unset).
const PUBLIC: [&str; 6] = ["/", "/health", "/ready", "/metrics", "/register", "/login"];

impl CaseState {
    /// Checks an answer against what the case has done, and records what it did.
    fn follow(
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
fn check_answer(method: &Method, answer: &Answer) -> Result<Option<Value>, String> {
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

// ---------------------------------------------------------------------------------------
// The properties.

fn full_balances() -> BoxedStrategy<[i64; 2]> {
    Just([INITIAL_TOKENS, INITIAL_TOKENS]).boxed()
}

#[test]
fn hostile_requests_of_any_shape_to_any_route() {
    Harness::check("anything", 1200, anything(), full_balances());
}

#[test]
fn hostile_fields_in_requests_a_client_might_mean() {
    Harness::check("plausible", 1200, plausible(), full_balances());
}

/// The second user sometimes has one chat's worth of tokens or a little more, so that
/// `out_of_tokens` comes up.
#[test]
fn hostile_headers_around_chats_that_would_be_answered() {
    let initial = prop_oneof![
        2 => Just([INITIAL_TOKENS, INITIAL_TOKENS]),
        1 => select(vec![CHAT_COST, CHAT_COST + 50]).prop_map(|low| [INITIAL_TOKENS, low]),
    ];
    Harness::check("chats", 600, chat_with_hostile_headers(), initial.boxed());
}

// ---------------------------------------------------------------------------------------
// What the properties found.

/// Found by `hostile_requests_of_any_shape_to_any_route`: tower-http's CORS layer answered
/// every OPTIONS request as a preflight, `200` with an empty body and no Content-Type, on
/// any path, even without `Origin` and `Access-Control-Request-Method`.
#[tokio::test]
async fn an_options_request_that_is_no_preflight_is_answered_like_any_other_method() {
    let app = TestApp::new().await;
    let on_a_route = app.request(Method::OPTIONS, "/chat", &[], "").await;
    on_a_route.assert_error(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed");
    assert_eq!(on_a_route.headers[header::ALLOW], "POST");
    let with_origin_only = app
        .request(
            Method::OPTIONS,
            "/balance/",
            &[("origin", "https://app.example")],
            "",
        )
        .await;
    with_origin_only.assert_error(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed");
    app.request(Method::OPTIONS, "/nowhere", &[], "")
        .await
        .assert_error(StatusCode::NOT_FOUND, "not_found");

    // A preflight still gets the CORS answer.
    let preflight = Request::builder()
        .method(Method::OPTIONS)
        .uri("/chat")
        .header("origin", "https://app.example")
        .header("access-control-request-method", "POST")
        .body(Body::empty())
        .unwrap();
    let preflight = app.router.clone().oneshot(preflight).await.unwrap();
    assert_eq!(preflight.status(), StatusCode::OK);
    assert_eq!(preflight.headers()["access-control-allow-origin"], "*");
}
