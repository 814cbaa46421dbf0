//! Rendering a generated request for one case's users: stand-ins replaced by their names,
//! tokens and chat, the body encoded, the headers set.

use axum::{
    body::Body,
    http::{header, HeaderValue, Request, Uri},
};
use serde_json::Value;

use super::case::{Auth, BodySpec, Encoding, Hostile, Length, Target};
use super::{LAST_CHAT, TOKEN, USER, USER_SHOUTED};

pub(super) struct Names {
    pub(super) users: [String; 2],
    pub(super) tokens: [String; 2],
    pub(super) last_chat: i64,
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

    pub(super) fn request(&self, hostile: &Hostile) -> Request<Body> {
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
pub(super) fn uri_shape(target: &Target) -> Result<Uri, axum::http::uri::InvalidUri> {
    let stand_ins = Names {
        users: ["u0".into(), "u1".into()],
        tokens: ["t".repeat(32), "t".repeat(32)],
        last_chat: 1,
    };
    stand_ins.uri(target).parse()
}
