//! What every request passes through on its way to a handler and back: its id, its span and
//! log line, its metrics, the OPTIONS rule, panics caught and bare errors enveloped.
//!
//! Written as two [`Middleware`]s with concrete futures rather than `axum::middleware::from_fn`
//! layers and tower-http's `TraceLayer` and `CatchPanicLayer`: each `from_fn` boxes the next
//! service and its future on every call, axum boxes every layer a router gets once more, and
//! `CatchPanicLayer` boxes every response body. Together they were about 100 of the 150
//! allocations of a `GET /health` and a third of its time (BENCHMARKS.md, issue 23).
//! [`Edge`] is the outer of the two, and answers CORS; [`Guard`] the inner.

use std::{
    any::Any,
    convert::Infallible,
    future::Future,
    panic::AssertUnwindSafe,
    pin::Pin,
    task::{ready, Context, Poll},
    time::Instant,
};

use axum::{
    extract::{MatchedPath, Request},
    http::{HeaderValue, Method, StatusCode},
    response::{IntoResponse, Response},
};
use futures_util::{
    future::{BoxFuture, CatchUnwind},
    FutureExt,
};
use pin_project_lite::pin_project;
use tracing::Span;

use super::middleware::{
    envelope_bare_errors, panic_response, with_request_id_in_body, Inner, Middleware,
};
use super::{cors, error::ApiError, middleware::X_REQUEST_ID, openai};
use crate::state::AppState;

/// Where the request lines log from: the target they had when tower-http's `TraceLayer`
/// in `routes` made them, so that log filters written for it still work.
const LOG_TARGET: &str = "tokenchat::routes";

/// Gives every request an id (the client's `X-Request-Id` when it is 1 to 128 of
/// `[A-Za-z0-9._-]`, since anything else could forge or flood log lines; otherwise 16
/// random hex digits), runs it in a span named by that id, its method and its matched route
/// (never its headers: they hold tokens), logs its answer, counts it in the metrics, and
/// puts the id on the answer (and in the body of a 500, so that a user can quote it).
///
/// It also answers CORS (see `cors`): a preflight here, other answers with the headers
/// that let any origin read them. An OPTIONS request that is not a preflight is answered
/// like any method without a handler: 405 on a route, 404 elsewhere (under `/v1`, in
/// OpenAI's error object).
#[derive(Clone)]
pub struct Edge {
    pub state: AppState,
}

impl<S: Inner> Middleware<S> for Edge {
    type Future = EdgeFuture<S::Future>;

    fn call(&mut self, inner: &mut S, request: Request) -> Self::Future {
        let started = Instant::now();
        let route = request.extensions().get::<MatchedPath>().cloned();
        let method = request.method().clone();
        let id = RequestId::of(&request);
        let span = tracing::info_span!(
            target: LOG_TARGET,
            "request",
            request_id = id.as_str(),
            method = %method,
            route = route.as_ref().map_or("<unmatched>", MatchedPath::as_str),
        );
        let path = request.uri().path();
        let v1 = path == "/v1" || path.starts_with("/v1/");
        let reader = cors::reader(self.state.config.cors_origins.as_deref(), &request);
        let stage = match &reader {
            // Another site's page: refused before anything is done with it.
            None => {
                let refused =
                    ApiError::Forbidden("this origin may not call the API (CORS_ORIGINS)");
                let answer = if v1 {
                    openai::error_answer(refused)
                } else {
                    refused.into_response()
                };
                Stage::Answered {
                    response: Some(answer),
                }
            }
            Some(reader) if request.method() == Method::OPTIONS => {
                let answer = if cors::is_preflight(&request) {
                    cors::preflight_answer(reader)
                } else if v1 {
                    openai::options_answer(route.is_some(), request.uri())
                } else if route.is_some() {
                    ApiError::MethodNotAllowed.into_response()
                } else {
                    ApiError::NotFound.into_response()
                };
                Stage::Answered {
                    response: Some(answer),
                }
            }
            Some(_) => Stage::Inner {
                future: span.in_scope(|| inner.call(request)),
            },
        };
        EdgeFuture {
            stage,
            reader: reader.unwrap_or(cors::Reader::Own),
            span,
            started,
            route,
            method,
            id,
            state: self.state.clone(),
        }
    }
}

pin_project! {
    /// [`Edge`]'s answer: the inner service's, then (for a 500 only) its body with the id.
    pub struct EdgeFuture<F> {
        #[pin]
        stage: Stage<F>,
        reader: cors::Reader,
        span: Span,
        started: Instant,
        route: Option<MatchedPath>,
        method: Method,
        id: RequestId,
        state: AppState,
    }
}

pin_project! {
    #[project = StageProjection]
    enum Stage<F> {
        Inner { #[pin] future: F },
        Answered { response: Option<Response> },
        AddingIdToBody { future: BoxFuture<'static, Response> },
    }
}

impl<F> Future for EdgeFuture<F>
where
    F: Future<Output = Result<Response, Infallible>>,
{
    type Output = Result<Response, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let _entered = this.span.enter();
        let mut response = loop {
            match this.stage.as_mut().project() {
                StageProjection::Inner { future } => {
                    let Ok(mut response) = ready!(future.poll(cx));
                    cors::allow(&mut response, this.reader);
                    if response.status() != StatusCode::INTERNAL_SERVER_ERROR {
                        break response;
                    }
                    let future = with_request_id_in_body(response, this.id.header_value());
                    this.stage.set(Stage::AddingIdToBody {
                        future: future.boxed(),
                    });
                }
                StageProjection::Answered { response } => match response.take() {
                    Some(response) => break response,
                    // Polled again after it answered: there is nothing more to give.
                    None => return Poll::Pending,
                },
                StageProjection::AddingIdToBody { future } => break ready!(future.poll_unpin(cx)),
            }
        };
        let latency = this.started.elapsed();
        let status = response.status().as_u16();
        tracing::info!(
            target: LOG_TARGET,
            status,
            latency_us = latency.as_micros() as u64,
            "answered"
        );
        let route = this.route.as_ref().map(MatchedPath::as_str);
        this.state
            .metrics
            .request(route, this.method, status, latency);
        response
            .headers_mut()
            .insert(X_REQUEST_ID, this.id.header_value());
        Poll::Ready(Ok(response))
    }
}

/// A request's id: the client's, or 16 hex digits made here.
enum RequestId {
    Given(HeaderValue),
    Made([u8; 16]),
}

impl RequestId {
    fn of(request: &Request) -> Self {
        let given = request.headers().get(X_REQUEST_ID).filter(|value| {
            (1..=128).contains(&value.len())
                && value
                    .as_bytes()
                    .iter()
                    .all(|byte| byte.is_ascii_alphanumeric() || b"._-".contains(byte))
        });
        if let Some(given) = given {
            return Self::Given(given.clone());
        }
        // An id needs to be unique, not secret: the thread's generator (seeded from the
        // system's) makes it without a system call.
        let random: u64 = rand::random();
        let mut hex = [0; 16];
        for (digit, shift) in hex.iter_mut().zip((0..16).rev()) {
            *digit = b"0123456789abcdef"[(random >> (4 * shift)) as usize & 0xf];
        }
        Self::Made(hex)
    }

    fn as_str(&self) -> &str {
        match self {
            Self::Given(value) => value.to_str().unwrap_or_default(),
            Self::Made(hex) => std::str::from_utf8(hex).unwrap_or_default(),
        }
    }

    fn header_value(&self) -> HeaderValue {
        match self {
            Self::Given(value) => value.clone(),
            Self::Made(hex) => HeaderValue::from_bytes(hex).expect("hex is a valid header value"),
        }
    }
}

/// Turns a handler's panic into a 500 envelope (the panic's text only in the log), and
/// gives the envelope to error answers made outside our handlers (axum's 405, a body limit
/// hit inside a layer).
#[derive(Clone, Copy)]
pub struct Guard;

impl<S: Inner> Middleware<S> for Guard {
    type Future = GuardFuture<S::Future>;

    fn call(&mut self, inner: &mut S, request: Request) -> Self::Future {
        match std::panic::catch_unwind(AssertUnwindSafe(|| inner.call(request))) {
            Ok(future) => GuardFuture::Running {
                future: AssertUnwindSafe(future).catch_unwind(),
            },
            Err(panic) => GuardFuture::Panicked { panic: Some(panic) },
        }
    }
}

pin_project! {
    #[project = GuardProjection]
    pub enum GuardFuture<F> {
        Running { #[pin] future: CatchUnwind<AssertUnwindSafe<F>> },
        Panicked { panic: Option<Box<dyn Any + Send + 'static>> },
    }
}

impl<F> Future for GuardFuture<F>
where
    F: Future<Output = Result<Response, Infallible>>,
{
    type Output = Result<Response, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let response = match self.project() {
            GuardProjection::Running { future } => match ready!(future.poll(cx)) {
                Ok(Ok(response)) => envelope_bare_errors(response),
                Err(panic) => panic_response(panic),
            },
            GuardProjection::Panicked { panic } => match panic.take() {
                Some(panic) => panic_response(panic),
                None => return Poll::Pending,
            },
        };
        Poll::Ready(Ok(response))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id_of(given: Option<&'static str>) -> String {
        let mut request = Request::builder().uri("/");
        if let Some(given) = given {
            request = request.header("x-request-id", given);
        }
        let request = request.body(axum::body::Body::empty()).unwrap();
        let id = RequestId::of(&request);
        assert_eq!(id.header_value().to_str().unwrap(), id.as_str());
        id.as_str().to_string()
    }

    #[test]
    fn every_request_gets_an_id_keeping_a_sane_one_from_the_client() {
        assert_eq!(id_of(Some("trace-42.a_b")), "trace-42.a_b");
        for bad in [None, Some("has space"), Some("new\\nline"), Some("")] {
            let id = id_of(bad);
            assert_eq!(id.len(), 16, "{bad:?}: {id}");
            assert!(id.bytes().all(|byte| byte.is_ascii_hexdigit()));
        }
        assert_ne!(id_of(None), id_of(None));
    }
}
