//! What a case sends: a request's method, target, headers and body as generated, with
//! stand-ins for the users, tokens and chat that exist only once the case runs.

use std::fmt;

use axum::http::Method;
use serde_json::Value;

#[derive(Debug, Clone)]
pub(super) struct Hostile {
    pub(super) method: Method,
    pub(super) target: Target,
    pub(super) authorization: Vec<Auth>,
    pub(super) content_type: Vec<Raw>,
    pub(super) content_length: Vec<Length>,
    pub(super) idempotency_key: Option<Raw>,
    pub(super) body: BodySpec,
}

/// Bytes of a header value or body, shown escaped in failure reports.
#[derive(Clone)]
pub(super) struct Raw(pub(super) Vec<u8>);

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
pub(super) enum Target {
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
pub(super) enum Auth {
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
pub(super) enum Scheme {
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
    pub(super) const VALID: [Self; 6] = [
        Self::Bare,
        Self::Token,
        Self::Bearer,
        Self::Sloppy,
        Self::Shouted,
        Self::Indented,
    ];
    pub(super) const INVALID: [Self; 7] = [
        Self::Tab,
        Self::Basic,
        Self::Truncated,
        Self::Extended,
        Self::Doubled,
        Self::Quoted,
        Self::Listed,
    ];

    pub(super) fn is_valid(self) -> bool {
        Self::VALID.contains(&self)
    }

    pub(super) fn render(self, token: &str) -> String {
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
pub(super) enum Length {
    /// The body's length plus this (a disagreeing header unless 0).
    Off(i64),
    Text(&'static str),
}

#[derive(Debug, Clone)]
pub(super) enum BodySpec {
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
pub(super) enum Encoding {
    Json,
    /// JSON with every string character written as a `\u` escape.
    Escaped,
    Form,
}
