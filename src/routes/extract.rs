//! Extractors: request bodies (JSON, form data, or no Content-Type), the client's address,
//! the authorised user, page parameters, a row's id in the path and idempotency keys.

use std::net::{IpAddr, SocketAddr};

use axum::{
    body::{Bytes, HttpBody},
    extract::{ConnectInfo, FromRequest, FromRequestParts, Path, Request},
    http::{header, request::Parts, HeaderMap, HeaderName},
    RequestExt,
};
use http_body_util::{BodyExt, LengthLimitError};
use serde::{de::DeserializeOwned, Deserialize};
use utoipa::IntoParams;

use super::error::ApiError as Error;
use crate::{
    domain::{self, PageRequest},
    server::{HeldBody, OverBudget},
    services::{auth::Credential, throttle::ClientAddress},
    state::AppState,
};

/// `Retry-After` of a body refused because the bodies in flight fill their budget.
const BUSY_RETRY_AFTER_SECS: u64 = 1;

/// A request body decoded from JSON, or from form data as Django REST framework allowed.
pub struct Payload<T>(pub T);

pub(super) enum BodyFormat {
    Json,
    Form,
}

impl<T> FromRequest<AppState> for Payload<T>
where
    T: DeserializeOwned,
{
    type Rejection = Error;

    async fn from_request(request: Request, state: &AppState) -> Result<Self, Error> {
        let (format, body) = read_body(request, state).await?;
        let decoded = match format {
            BodyFormat::Json => serde_json::from_slice(&body).map_err(|err| {
                let what = if err.is_data() {
                    "invalid request body"
                } else {
                    "the request body is not valid JSON"
                };
                Error::InvalidJson(format!("{what}: {err}"))
            }),
            BodyFormat::Form => check_form_is_utf8(&body).and_then(|()| {
                serde_urlencoded::from_bytes(&body)
                    .map_err(|err| Error::InvalidJson(format!("invalid form data: {err}")))
            }),
        };
        decoded.map(Payload)
    }
}

/// A JSON object's body as it came, unparsed, for a route that passes it on (`/v1`), with
/// what keeps its bytes counted against `MAX_INFLIGHT_BODY_BYTES` while they are held
/// (`None` when the router runs without tokenchat's server, as in tests).
pub struct RawJson {
    pub body: Bytes,
    pub hold: Option<HeldBody>,
}

impl FromRequest<AppState> for RawJson {
    type Rejection = Error;

    async fn from_request(request: Request, state: &AppState) -> Result<Self, Error> {
        let hold = request.extensions().get::<HeldBody>().cloned();
        let (format, body) = read_body(request, state).await?;
        match format {
            BodyFormat::Json => Ok(Self { body, hold }),
            BodyFormat::Form => Err(Error::InvalidJson(
                "the request body must be a JSON object".into(),
            )),
        }
    }
}

/// Reads a whole body within `BODY_READ_TIMEOUT_SECS`, as JSON (`application/json`, no
/// Content-Type, or form data that starts with `{`) or form data; JSON must be an object.
async fn read_body(request: Request, state: &AppState) -> Result<(BodyFormat, Bytes), Error> {
    let format = body_format(request.headers())?;
    // However slowly a client sends, the whole body must arrive within the limit.
    let deadline = state.config.connections.body_read_timeout;
    let body = tokio::time::timeout(deadline, collect(request))
        .await
        .map_err(|_| Error::RequestTimeout)?
        .map_err(|err| {
            if caused_by::<LengthLimitError>(&*err) {
                Error::PayloadTooLarge
            } else if OverBudget::caused(&*err) {
                // The bodies in flight hold the server's budget for them; they finish or
                // time out, so a retry in a moment may fit.
                Error::Busy {
                    retry_after_secs: BUSY_RETRY_AFTER_SECS,
                }
            } else {
                Error::InvalidJson("the request body could not be read".into())
            }
        })?;
    let Some(first_byte) = body.iter().find(|byte| !byte.is_ascii_whitespace()) else {
        return Err(Error::InvalidJson("the request body is empty".into()));
    };
    // `curl -d '{...}'` labels JSON as form data; no form body of ours starts with '{'.
    let format = match format {
        BodyFormat::Form if *first_byte == b'{' => BodyFormat::Json,
        other => other,
    };
    // serde would also fill a struct from an array; the contract's bodies are objects.
    if matches!(format, BodyFormat::Json) && *first_byte != b'{' {
        return Err(Error::InvalidJson(
            "the request body must be a JSON object".into(),
        ));
    }
    Ok((format, body))
}

/// The most of a body's declared length allocated before its bytes arrive: beyond it the
/// buffer grows with them, so a body that stops short (or is refused for the budget) never
/// holds memory for bytes it did not send.
const PREALLOCATED: usize = 1024 * 1024;

/// The whole body (within the route's limit) in one buffer, each frame copied in and let go
/// as it arrives: a body in many frames takes its own size once, not twice, as gathering
/// the frames first and then joining them would (a 20 MiB image request, issue 24).
async fn collect(request: Request) -> Result<Bytes, axum::BoxError> {
    let mut body = request.into_limited_body();
    // The declared length, already checked against the route's limit (`check_body`).
    let declared = usize::try_from(body.size_hint().lower()).unwrap_or(0);
    let mut whole: Option<Vec<u8>> = None;
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else {
            continue;
        };
        match &mut whole {
            // One frame: the body itself, no copy.
            None if body.is_end_stream() => return Ok(data),
            None => {
                let mut buffer = Vec::with_capacity(declared.min(PREALLOCATED).max(data.len()));
                buffer.extend_from_slice(&data);
                whole = Some(buffer);
            }
            Some(buffer) => buffer.extend_from_slice(&data),
        }
    }
    Ok(whole.map(Bytes::from).unwrap_or_default())
}

/// Whether `err`, or any error beneath it, is an `E`.
fn caused_by<E: std::error::Error + 'static>(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(err);
    while let Some(err) = cause {
        if err.is::<E>() {
            return true;
        }
        cause = err.source();
    }
    false
}

/// serde_urlencoded decodes invalid UTF-8 (`message=%ff`) to U+FFFD without a word; form
/// data must be as strictly UTF-8 as JSON is.
fn check_form_is_utf8(body: &[u8]) -> Result<(), Error> {
    let all_utf8 = body
        .split(|byte| matches!(byte, b'&' | b'='))
        .all(|part| percent_encoding::percent_decode(part).decode_utf8().is_ok());
    if all_utf8 {
        Ok(())
    } else {
        Err(Error::InvalidJson("form data is not valid UTF-8".into()))
    }
}

pub(super) fn body_format(headers: &HeaderMap) -> Result<BodyFormat, Error> {
    // A body read as it came: a compressed one would be taken for bad JSON, or, with a
    // coding that changes nothing, answered as if the client had not said it. (`utf-8` is
    // a charset some clients send here by mistake, as they always did: no coding.)
    let encoded = headers
        .get_all(header::CONTENT_ENCODING)
        .iter()
        .any(|value| {
            let codings = value.to_str().unwrap_or("?").split(',');
            let mut codings = codings.map(str::trim).filter(|coding| !coding.is_empty());
            codings.any(|coding| {
                let none = ["identity", "utf-8", "utf8"];
                !none.iter().any(|none| coding.eq_ignore_ascii_case(none))
            })
        });
    if encoded {
        return Err(Error::UnsupportedEncoding);
    }
    let Some(value) = headers.get(header::CONTENT_TYPE) else {
        return Ok(BodyFormat::Json);
    };
    let value = value.to_str().map_err(|_| Error::UnsupportedMediaType)?;
    let media_type = value
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    match media_type.as_str() {
        "application/json" => Ok(BodyFormat::Json),
        "application/x-www-form-urlencoded" => Ok(BodyFormat::Form),
        _ => Err(Error::UnsupportedMediaType),
    }
}

/// The address a request came from: the peer of its connection, or, behind a trusted
/// proxy (`TRUST_PROXY_HEADERS=true`), the last address in `X-Forwarded-For`, the one
/// that proxy appended.
pub struct Client(pub ClientAddress);

impl FromRequestParts<AppState> for Client {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Error> {
        let forwarded = state
            .config
            .abuse
            .trust_proxy_headers
            .then(|| forwarded_for(&parts.headers))
            .flatten();
        let peer = || {
            parts
                .extensions
                .get::<ConnectInfo<SocketAddr>>()
                .map(|info| info.0.ip())
        };
        Ok(Self(
            forwarded
                .or_else(peer)
                .map_or_else(ClientAddress::unknown, ClientAddress::new),
        ))
    }
}

/// The last address in the last `X-Forwarded-For` header, in any form proxies write it:
/// `203.0.113.9`, `203.0.113.9:5040`, `2001:db8::1` or `[2001:db8::1]:443`. A value that is
/// none of these (`unknown`, a name) is logged and the connection's own address is used.
fn forwarded_for(headers: &HeaderMap) -> Option<IpAddr> {
    let last_header = headers.get_all("x-forwarded-for").iter().next_back()?;
    let last_hop = last_header
        .to_str()
        .ok()
        .and_then(|value| value.rsplit(',').next())
        .map(|hop| hop.trim().trim_matches('"'));
    let address = last_hop.and_then(|hop| {
        hop.parse::<IpAddr>()
            .ok()
            .or_else(|| hop.parse::<SocketAddr>().ok().map(|socket| socket.ip()))
            .or_else(|| {
                let bracketed = hop.strip_prefix('[')?.strip_suffix(']')?;
                bracketed.parse().ok()
            })
    });
    if address.is_none() {
        tracing::warn!("X-Forwarded-For names no address; counting the proxy's own");
    }
    address
}

/// The user whose login token came in the `Authorization` header; set by
/// [`authorize`](super::middleware::authorize).
#[derive(Clone)]
pub struct AuthUser {
    pub id: i64,
    /// The balance read with the token, during this request.
    pub tokens: i64,
    /// What the request came with: a login token (by its hash) or an API key.
    pub credential: Credential,
    /// The user's limits (their own, or the configuration's defaults).
    pub limits: crate::domain::Limits,
    /// An API key with `rpm`: where its requests a minute stand after this one.
    pub key_requests: Option<crate::services::rates::RateState>,
}

impl<S: Send + Sync> FromRequestParts<S> for AuthUser {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Error> {
        parts
            .extensions
            .get::<AuthUser>()
            .cloned()
            .ok_or(Error::Unauthorized)
    }
}

/// The balance a handler's work left, for [`authorize`](super::middleware::authorize) to
/// put in `X-Tokens-Remaining`.
#[derive(Clone, Copy)]
pub struct TokensRemaining(pub i64);

pub const X_TOKENS_REMAINING: HeaderName = HeaderName::from_static("x-tokens-remaining");

/// `?limit=` and `?cursor=`: which page of a history (see [`PageRequest`]).
pub struct PageQuery(pub PageRequest);

/// The query string [`PageQuery`] reads, as the OpenAPI document describes it. Both are
/// read as text so that a bad value gets the contract's `invalid_page` rather than serde's.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PageParams {
    /// 1 to 100
    #[param(value_type = Option<u32>, minimum = 1, maximum = 100)]
    limit: Option<String>,
    /// `next` of the page before
    cursor: Option<String>,
}

impl<S: Send + Sync> FromRequestParts<S> for PageQuery {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Error> {
        let raw: PageParams = serde_urlencoded::from_str(parts.uri.query().unwrap_or_default())
            .map_err(|err| Error::InvalidJson(format!("invalid query string: {err}")))?;
        let page = PageRequest::parse(raw.limit.as_deref(), raw.cursor.as_deref())?;
        Ok(Self(page))
    }
}

/// The `{id}` of a route to one of the user's own rows: a chat, a conversation, a key. Read
/// without refusing: the handler takes the id with [`PathId::get`] once its other
/// extractors (a page, a body) have had their say, so their 400s come first. Not a number,
/// or not even text once percent-decoded, is answered like someone else's row: 404, there is
/// no such thing for this user.
pub struct PathId(Option<i64>);

impl<S: Send + Sync> FromRequestParts<S> for PathId {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let text = Path::<String>::from_request_parts(parts, state).await;
        Ok(Self(text.ok().and_then(|Path(text)| text.parse().ok())))
    }
}

impl PathId {
    /// The id, or 404.
    pub fn get(self) -> Result<i64, Error> {
        self.0.ok_or(Error::NoSuchItem)
    }
}

/// The optional `Idempotency-Key` header (see [`domain::IdempotencyKey`]).
pub struct IdempotencyKey(pub Option<domain::IdempotencyKey>);

impl<S: Send + Sync> FromRequestParts<S> for IdempotencyKey {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Error> {
        let Some(value) = parts.headers.get("idempotency-key") else {
            return Ok(Self(None));
        };
        // Not text at all: as malformed as text that breaks the key's rules.
        let text = value.to_str().unwrap_or("\u{0}");
        Ok(Self(Some(domain::IdempotencyKey::parse(text)?)))
    }
}

/// For the one route that keeps no answer to replay, `/v1/embeddings`: a request with an
/// `Idempotency-Key` is refused rather than its key ignored, since a retry would be charged
/// again. A malformed key is refused for its form first, as on every route.
pub struct NoIdempotencyKey;

impl<S: Send + Sync> FromRequestParts<S> for NoIdempotencyKey {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Error> {
        match IdempotencyKey::from_request_parts(parts, state).await? {
            IdempotencyKey(None) => Ok(Self),
            IdempotencyKey(Some(_)) => Err(Error::invalid_input(
                "Idempotency-Key",
                "Idempotency-Key is not supported on /v1/embeddings",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn forwarded_addresses_are_read_in_every_form_proxies_write() {
        for (value, expected) in [
            ("203.0.113.9", Some("203.0.113.9")),
            ("10.0.0.1, 203.0.113.9:5040", Some("203.0.113.9")),
            ("2001:db8::1", Some("2001:db8::1")),
            ("[2001:db8::1]:443", Some("2001:db8::1")),
            ("[2001:db8::1]", Some("2001:db8::1")),
            ("\"198.51.100.7\"", Some("198.51.100.7")),
            ("unknown", None),
            ("", None),
        ] {
            let mut headers = HeaderMap::new();
            headers.insert("x-forwarded-for", HeaderValue::from_str(value).unwrap());
            let expected = expected.map(|text: &str| text.parse::<IpAddr>().unwrap());
            assert_eq!(forwarded_for(&headers), expected, "{value}");
        }
    }
}
