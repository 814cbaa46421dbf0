//! The middlewares: what runs around the handlers, on every route or on the authorised
//! ones: body checks, authorisation, the envelope for errors made outside our handlers.

use std::{
    any::Any,
    convert::Infallible,
    future::{ready, Future, Ready},
    task::{Context, Poll},
};

use axum::{
    body::HttpBody,
    extract::Request,
    http::{header, HeaderName, HeaderValue, Response as HttpResponse},
    response::{IntoResponse, Response},
};
use futures_util::future::{BoxFuture, Either};
use tower::{Layer, Service};

use super::{
    error::ApiError as Error,
    extract::{body_format, AuthUser, TokensRemaining, X_TOKENS_REMAINING},
};
use crate::{
    services::{auth, rates::KeyRate},
    state::AppState,
};

/// `Cache-Control` of every answer to a request with a credential.
const NO_STORE: HeaderValue = HeaderValue::from_static("no-store");

/// A service the middlewares wrap: a router's, which answers every request.
pub trait Inner: Service<Request, Response = Response, Error = Infallible> {}

impl<S: Service<Request, Response = Response, Error = Infallible>> Inner for S {}

/// What one middleware does to a request on its way to the service it wraps (`inner`) and
/// to the answer on its way back. The tower plumbing every middleware shares (readiness is
/// the inner service's, nothing fails) is [`Around`]'s. Concrete futures, not
/// `axum::middleware::from_fn`: see `edge`.
pub trait Middleware<S: Inner> {
    type Future: Future<Output = Result<Response, Infallible>>;

    fn call(&mut self, inner: &mut S, request: Request) -> Self::Future;
}

/// The layer that puts `middleware` around a service.
pub fn around<M: Clone>(middleware: M) -> AroundLayer<M> {
    AroundLayer(middleware)
}

/// See [`around`].
#[derive(Clone, Copy)]
pub struct AroundLayer<M>(M);

impl<M: Clone, S> Layer<S> for AroundLayer<M> {
    type Service = Around<M, S>;

    fn layer(&self, inner: S) -> Around<M, S> {
        Around {
            middleware: self.0.clone(),
            inner,
        }
    }
}

/// `inner` with the middleware `M` around it: a tower service.
#[derive(Clone)]
pub struct Around<M, S> {
    middleware: M,
    inner: S,
}

impl<M: Middleware<S>, S: Inner> Service<Request> for Around<M, S> {
    type Response = Response;
    type Error = Infallible;
    type Future = M::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> M::Future {
        self.middleware.call(&mut self.inner, request)
    }
}

/// Layer of every route: a body in a format we do not read is 415, and one declared longer
/// than the route's limit is 413, even on a route that reads no body (`POST /balance`), as
/// the contract says of any body. (A body that only turns out too long as it is read is
/// caught where it is read.) A [`Middleware`], not `from_fn`: see `edge`.
#[derive(Clone, Copy)]
pub struct CheckBody {
    pub max_body_bytes: usize,
}

impl<S: Inner> Middleware<S> for CheckBody {
    type Future = Either<Ready<Result<Response, Infallible>>, S::Future>;

    fn call(&mut self, inner: &mut S, request: Request) -> Self::Future {
        match check_body(&request, self.max_body_bytes) {
            Ok(()) => Either::Right(inner.call(request)),
            Err(error) => Either::Left(ready(Ok(error.into_response()))),
        }
    }
}

fn check_body(request: &Request, max_body_bytes: usize) -> Result<(), Error> {
    let body = request.body();
    if !body.is_end_stream() {
        body_format(request.headers())?;
        if body.size_hint().lower() > max_body_bytes as u64 {
            return Err(Error::PayloadTooLarge);
        }
    }
    Ok(())
}

/// Authorises the request before `inner` runs: see [`authorize`].
#[derive(Clone)]
pub struct Authorize {
    pub state: AppState,
}

impl<S> Middleware<S> for Authorize
where
    S: Inner + Clone + Send + 'static,
    S::Future: Send,
{
    type Future = BoxFuture<'static, Result<Response, Infallible>>;

    fn call(&mut self, inner: &mut S, request: Request) -> Self::Future {
        // The service that was made ready goes into the future; its clone stays for the next.
        let ready = inner.clone();
        let inner = std::mem::replace(inner, ready);
        let state = self.state.clone();
        Box::pin(async move {
            Ok(authorize(state, request, inner)
                .await
                .unwrap_or_else(IntoResponse::into_response))
        })
    }
}

/// Answers 401 without a live token, and stamps every answer to an authorised request with
/// `X-Tokens-Remaining`.
async fn authorize<S>(state: AppState, mut request: Request, mut next: S) -> Result<Response, Error>
where
    S: Service<Request, Response = Response, Error = Infallible>,
{
    let mut headers = request.headers().get_all(header::AUTHORIZATION).iter();
    let (Some(header), None) = (headers.next(), headers.next()) else {
        // None, or two: which one would be meant is anyone's guess.
        return Err(Error::Unauthorized);
    };
    let credential = header
        .to_str()
        .ok()
        .and_then(credential_from_header)
        .ok_or(Error::Unauthorized)?;
    let (defaults, now_ms) = (&state.config.user_limits, state.config.clock.now_ms());
    let owner = auth::authenticate(&state.db, credential, defaults, now_ms).await?;
    // A key past its requests a minute, whatever it asked for.
    let key_requests = match owner.key_rate {
        None => None,
        Some(KeyRate::Admitted(rate)) => Some(rate),
        Some(KeyRate::Refused {
            retry_after_secs,
            state: rate,
        }) => {
            let mut refused = Error::RateLimited { retry_after_secs }.into_response();
            refused
                .headers_mut()
                .insert(header::CACHE_CONTROL, NO_STORE);
            return Ok(super::limits::with_rate_headers(refused, Some(rate), None));
        }
    };
    let balance = owner.tokens;
    request.extensions_mut().insert(AuthUser {
        id: owner.user_id,
        tokens: owner.tokens,
        credential: owner.credential,
        limits: owner.user_limits,
        key_requests,
    });
    let Ok(mut response) = next.call(request).await;
    // A handler that moved the balance says what it left; any other answer leaves the
    // balance read with the token, in this same request.
    let remaining = response
        .extensions()
        .get::<TokensRemaining>()
        .map_or(balance, |known| known.0);
    let headers = response.headers_mut();
    headers.insert(X_TOKENS_REMAINING, HeaderValue::from(remaining));
    // A user's answers (conversations, keys, balances) are theirs alone: kept by no cache,
    // a browser's disk cache on a shared computer among them.
    headers.insert(header::CACHE_CONTROL, NO_STORE);
    Ok(response)
}

/// The header that names a request in the logs and in its answer.
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// A 500's JSON body with `"request_id"` added, so that a user can quote it and an
/// operator find the request's log lines (where the error is logged whole).
pub(super) async fn with_request_id_in_body(response: Response, id: HeaderValue) -> Response {
    let (mut parts, body) = response.into_parts();
    // Our 500 bodies are a few hundred bytes; anything else is passed on as it was.
    let Ok(bytes) = axum::body::to_bytes(body, 64 * 1024).await else {
        return Error::internal("an unreadable 500 body").into_response();
    };
    let Ok(serde_json::Value::Object(mut object)) = serde_json::from_slice(&bytes) else {
        return Response::from_parts(parts, axum::body::Body::from(bytes));
    };
    let id = id.to_str().unwrap_or_default();
    object.insert("request_id".into(), id.into());
    let body = serde_json::Value::Object(object).to_string();
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, axum::body::Body::from(body))
}

/// The credential in an `Authorization` header value, in any of the three accepted forms:
/// `Token <t>`, `Bearer <t>` (either scheme in any letter case) or a bare `<t>`.
pub(super) fn credential_from_header(value: &str) -> Option<&str> {
    let value = value.trim();
    match value.split_once(' ') {
        Some((scheme, rest))
            if scheme.eq_ignore_ascii_case("token") || scheme.eq_ignore_ascii_case("bearer") =>
        {
            Some(rest.trim())
        }
        Some(_) => None,
        None => Some(value),
    }
}

/// Gives the envelope to error responses built outside our handlers (axum's 405, a body
/// limit hit inside a layer): anything that is an error and not already JSON.
pub fn envelope_bare_errors(response: Response) -> Response {
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|value| value.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let mut enveloped = Error::from_status(status).into_response();
    if let Some(allow) = response.headers().get(header::ALLOW) {
        enveloped.headers_mut().insert(header::ALLOW, allow.clone());
    }
    enveloped
}

/// What a handler that panicked answers: a 500 envelope, the panic's text only in the log.
pub fn panic_response(panic: Box<dyn Any + Send + 'static>) -> HttpResponse<axum::body::Body> {
    let detail = panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| panic.downcast_ref::<&str>().copied())
        .unwrap_or("a non-string panic");
    Error::internal(format!("handler panicked: {detail}")).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::{body::to_bytes, http::StatusCode};
    use serde_json::Value;

    const TOKEN: &str = "abcdefghijklmnopqrstuvwxyzABCDE1";

    #[test]
    fn all_three_header_forms_yield_the_token() {
        for header in [
            TOKEN.to_string(),
            format!("Token {TOKEN}"),
            format!("Bearer {TOKEN}"),
            format!("bearer  {TOKEN} "),
        ] {
            assert_eq!(credential_from_header(&header), Some(TOKEN), "{header}");
        }
    }

    #[test]
    fn other_schemes_yield_nothing() {
        for header in [
            "Basic dXNlcjpwYXNz",
            &format!("Basic {TOKEN}"),
            "Digest a b",
        ] {
            assert_eq!(credential_from_header(header), None, "{header}");
        }
    }

    #[tokio::test]
    async fn a_panic_becomes_a_500_envelope_without_its_detail() {
        let response = panic_response(Box::new("secret detail".to_string()));
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(response.headers()[header::CONTENT_TYPE], "application/json");
        let body = to_bytes(response.into_body(), 1024).await.unwrap();
        let body: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["code"], "internal");
        assert!(!body.to_string().contains("secret detail"));
    }

    #[tokio::test]
    async fn a_bare_error_status_gets_the_envelope_and_keeps_allow() {
        let bare = Response::builder()
            .status(StatusCode::METHOD_NOT_ALLOWED)
            .header(header::ALLOW, "POST")
            .body(axum::body::Body::empty())
            .unwrap();
        let response = envelope_bare_errors(bare);
        assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(response.headers()[header::ALLOW], "POST");
        let body = to_bytes(response.into_body(), 1024).await.unwrap();
        let body: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["code"], "method_not_allowed");
    }
}
