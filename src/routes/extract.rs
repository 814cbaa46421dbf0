//! Extractors: request bodies (JSON, form data, or no Content-Type) and the authorised user.

use axum::{
    body::Bytes,
    extract::{FromRequest, FromRequestParts, Request},
    http::{header, request::Parts, HeaderMap, StatusCode},
};
use serde::de::DeserializeOwned;

use crate::{error::Error, services::auth, AppState};

/// A request body decoded from JSON, or from form data as Django REST framework allowed.
pub struct Payload<T>(pub T);

enum BodyFormat {
    Json,
    Form,
}

impl<T, S> FromRequest<S> for Payload<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = Error;

    async fn from_request(request: Request, state: &S) -> Result<Self, Error> {
        let format = body_format(request.headers())?;
        let body =
            Bytes::from_request(request, state)
                .await
                .map_err(|rejection| match rejection.status() {
                    StatusCode::PAYLOAD_TOO_LARGE => Error::PayloadTooLarge,
                    _ => Error::InvalidJson("the request body could not be read".into()),
                })?;
        let Some(first_byte) = body.iter().find(|byte| !byte.is_ascii_whitespace()) else {
            return Err(Error::InvalidJson("the request body is empty".into()));
        };
        // `curl -d '{...}'` labels JSON as form data; no form body of ours starts with '{'.
        let format = match format {
            BodyFormat::Form if *first_byte == b'{' => BodyFormat::Json,
            other => other,
        };
        let decoded = match format {
            // serde would also fill a struct from an array; the contract's bodies are objects.
            BodyFormat::Json if *first_byte != b'{' => Err(Error::InvalidJson(
                "the request body must be a JSON object".into(),
            )),
            BodyFormat::Json => serde_json::from_slice(&body).map_err(|err| {
                let what = if err.is_data() {
                    "invalid request body"
                } else {
                    "the request body is not valid JSON"
                };
                Error::InvalidJson(format!("{what}: {err}"))
            }),
            BodyFormat::Form => serde_urlencoded::from_bytes(&body)
                .map_err(|err| Error::InvalidJson(format!("invalid form data: {err}"))),
        };
        decoded.map(Payload)
    }
}

fn body_format(headers: &HeaderMap) -> Result<BodyFormat, Error> {
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
        other if other.starts_with("application/") && other.ends_with("+json") => {
            Ok(BodyFormat::Json)
        }
        _ => Err(Error::UnsupportedMediaType),
    }
}

/// The user whose login token came in the `Authorization` header.
pub struct AuthUser {
    pub id: i64,
}

impl FromRequestParts<AppState> for AuthUser {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Error> {
        let header = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .ok_or(Error::Unauthorized)?;
        let id = auth::authenticate(&state.db, header).await?;
        Ok(Self { id })
    }
}
