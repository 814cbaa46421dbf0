//! A call's limits at the edge: the key's and the user's checked before anything is
//! reserved ([`limits::admit`]), a refusal as its answer (403 `model_not_allowed`, 429
//! `rate_limited` with `Retry-After`), and OpenAI's `x-ratelimit-*` headers on `/v1`.

use axum::{http::HeaderValue, response::IntoResponse, response::Response};

use super::{error::ApiError, extract::AuthUser};
use crate::{
    services::{
        limits::{self, Admitted, Caller, Refused},
        rates::RateState,
    },
    state::AppState,
};

/// Checks a call of `user` to `model` against its key's and its own limits, counting its
/// requests; a refusal as an error.
pub async fn admit(state: &AppState, user: &AuthUser, model: &str) -> Result<Admitted, ApiError> {
    match checked(state, user, model).await? {
        Ok(admitted) => Ok(admitted),
        Err(refused) => Err(refusal(refused, model)),
    }
}

/// As [`admit`], a refusal answered with OpenAI's headers saying where the rates stand.
pub async fn admit_v1(
    state: &AppState,
    user: &AuthUser,
    model: &str,
) -> Result<Admitted, Response> {
    match checked(state, user, model).await {
        Ok(Ok(admitted)) => Ok(admitted),
        Ok(Err(refused)) => {
            let (requests, tokens) = match &refused {
                Refused::Rate {
                    requests, tokens, ..
                } => (*requests, *tokens),
                Refused::ModelNotAllowed => (None, None),
            };
            let answer = refusal(refused, model).into_response();
            Err(with_rate_headers(answer, requests, tokens))
        }
        Err(err) => Err(err.into_response()),
    }
}

async fn checked(
    state: &AppState,
    user: &AuthUser,
    model: &str,
) -> Result<Result<Admitted, Refused>, ApiError> {
    let now_ms = state.config.clock.now_ms();
    let caller = Caller {
        user_id: user.id,
        user: &user.limits,
        key: user.credential.key_limits(),
        key_requests: user.key_requests,
    };
    Ok(limits::admit(&state.db, caller, model, now_ms).await?)
}

fn refusal(refused: Refused, model: &str) -> ApiError {
    match refused {
        Refused::ModelNotAllowed => ApiError::ModelNotAllowed(model.to_string()),
        Refused::Rate {
            retry_after_secs, ..
        } => ApiError::RateLimited { retry_after_secs },
    }
}

/// `answer` with OpenAI's `x-ratelimit-*-requests` and `-tokens` headers, for each rate
/// that applies.
pub fn with_rate_headers(
    mut answer: Response,
    requests: Option<RateState>,
    tokens: Option<RateState>,
) -> Response {
    let headers = answer.headers_mut();
    for (kind, rate) in [("requests", requests), ("tokens", tokens)] {
        let Some(rate) = rate else { continue };
        let reset = format!("{}s", rate.reset_ms as f64 / 1000.0);
        for (what, value) in [
            ("limit", rate.limit.to_string()),
            ("remaining", rate.remaining.to_string()),
            ("reset", reset),
        ] {
            if let Ok(value) = HeaderValue::from_str(&value) {
                let name = format!("x-ratelimit-{what}-{kind}");
                if let Ok(name) = axum::http::HeaderName::try_from(name) {
                    headers.insert(name, value);
                }
            }
        }
    }
    answer
}

/// `answer` with the headers of the rates `admitted` passed.
pub fn with_rates(answer: Response, admitted: &Admitted) -> Response {
    with_rate_headers(answer, admitted.requests, admitted.tokens)
}
