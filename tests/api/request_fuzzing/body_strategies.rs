//! Strategies for bodies: texts at the routes' limits, JSON values and the routes' fields,
//! encodings, hand-written near-JSON, form data and arbitrary bytes.

use proptest::{collection::vec, prelude::*, sample::select, strategy::BoxedStrategy};
use serde_json::Value;

use super::case::{BodySpec, Encoding, Raw};
use super::{KEYS, LAST_CHAT, MAX_MESSAGE_CHARS, PASSWORD, TOKEN, USER, USER_SHOUTED};

/// Messages around the limits: 40 and 41 characters of one to several bytes each,
/// combining marks, emoji sequences, invisible and right-to-left text, NULs.
pub(super) fn message_text() -> BoxedStrategy<String> {
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

pub(super) fn chat_fields() -> BoxedStrategy<Vec<(String, Value)>> {
    shaped_fields(vec![("message", message_text())])
}

pub(super) fn credential_fields() -> BoxedStrategy<Vec<(String, Value)>> {
    shaped_fields(vec![
        ("username", username_text()),
        ("password", password_text()),
    ])
}

pub(super) fn password_fields() -> BoxedStrategy<Vec<(String, Value)>> {
    shaped_fields(vec![
        ("old_password", password_text()),
        ("new_password", password_text()),
    ])
}

pub(super) fn encoding() -> BoxedStrategy<Encoding> {
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

pub(super) fn small_body() -> BoxedStrategy<BodySpec> {
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
pub(super) fn body() -> BoxedStrategy<BodySpec> {
    prop_oneof![
        10 => small_body(),
        1 => vec(any::<u8>(), 0..6000).prop_map(|bytes| BodySpec::Bytes(Raw(bytes))),
        1 => (small_body(), 1500..6000usize)
            .prop_map(|(body, spaces)| BodySpec::Padded(Box::new(body), spaces)),
    ]
    .boxed()
}
