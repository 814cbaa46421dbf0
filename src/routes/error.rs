//! The HTTP answers that are errors: each service error mapped to one status and one stable
//! code, rendered as the contract's `{"error", "code"}` envelope, and the error answers the
//! OpenAPI document lists, described once for the routes that share them.

use std::collections::BTreeMap;

use axum::{
    http::{header, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    Json,
};
use serde::Serialize;
use utoipa::{
    openapi::{response::Response as DocumentedResponse, Content, Ref, RefOr},
    ToSchema,
};

use crate::{
    domain::{BudgetOwner, Invalid},
    llm::LlmError,
    services::{error::with_sources, ServiceError},
};

/// What a 401 offers: a login token (or API key) as a Bearer token; `Token <t>` and a bare
/// token are accepted too.
const X_SHOULD_RETRY: header::HeaderName = header::HeaderName::from_static("x-should-retry");
const WWW_AUTHENTICATE: HeaderValue = HeaderValue::from_static("Bearer realm=\"tokenchat\"");

/// Every way a request can fail; each variant maps to one status and one stable code (its
/// snake_case name).
#[derive(Debug, thiserror::Error, strum::IntoStaticStr)]
#[strum(serialize_all = "snake_case")]
pub enum ApiError {
    #[error("{0}")]
    InvalidJson(String),
    #[error("{message}")]
    InvalidInput {
        field: &'static str,
        message: String,
    },
    #[error("missing, malformed, unknown or expired token")]
    Unauthorized,
    #[error("invalid username or password")]
    InvalidCredentials,
    #[error("Out of Tokens")]
    OutOfTokens { tokens: i64, required: i64 },
    /// `resets_at`: when the budget's next period begins (Unix seconds), `None` for a
    /// total budget.
    #[error("{} for its period is spent", owner.words())]
    BudgetExceeded {
        owner: BudgetOwner,
        resets_at: Option<i64>,
    },
    #[error("no such route")]
    NotFound,
    /// A chat, conversation or key that does not exist or is someone else's: the same
    /// answer for both, so ids cannot be probed.
    #[error("nothing of yours has this id")]
    #[strum(serialize = "not_found")]
    NoSuchItem,
    #[error("the model {0:?} is not served here; GET /v1/models lists those that are")]
    ModelNotFound(String),
    #[error("this API key may not ask for the model {0:?}; its owner chose the models it may use")]
    ModelNotAllowed(String),
    #[error("method not allowed on this route")]
    MethodNotAllowed,
    #[error("this username is already taken")]
    UsernameTaken,
    #[error("request body is too large")]
    PayloadTooLarge,
    #[error("request body must be JSON or form data")]
    UnsupportedMediaType,
    /// A compressed body (RFC 9110 answers a coding the server does not take with 415).
    #[error("request body must be sent as it is: no Content-Encoding is taken")]
    #[strum(serialize = "unsupported_media_type")]
    UnsupportedEncoding,
    #[error("this Idempotency-Key was already used with a different request")]
    IdempotencyKeyReused,
    #[error("a request with this Idempotency-Key is still in progress")]
    RequestInProgress,
    #[error("too many attempts; try again later")]
    RateLimited { retry_after_secs: u64 },
    #[error("registration is closed; ask an operator for an account")]
    RegistrationClosed,
    #[error("{0}")]
    Forbidden(&'static str),
    #[error("this account has been disabled by an operator")]
    AccountDisabled,
    #[error("the request body did not arrive in time")]
    RequestTimeout,
    #[error("the server is busy; try again shortly")]
    Busy { retry_after_secs: u64 },
    #[error("the server is shutting down; try again shortly")]
    ShuttingDown,
    #[error("the database cannot be reached right now; try again shortly")]
    DatabaseUnavailable,
    #[error("not ready: the database is unreachable or not migrated")]
    NotReady,
    #[error("the language model could not answer: {0}")]
    #[strum(serialize = "upstream_error")]
    Upstream(String),
    #[error("the language model did not answer in time")]
    UpstreamTimeout,
    /// The model refused the request as invalid; its own words.
    #[error("the language model rejected the request: {0}")]
    UpstreamRejected(String),
    #[error("the language model is busy; try again in {retry_after_secs} s")]
    UpstreamBusy { retry_after_secs: u64 },
    /// Logged whole, with its sources; shown without detail.
    #[error("internal error")]
    Internal(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl ApiError {
    pub fn invalid_input(field: &'static str, message: impl Into<String>) -> Self {
        Self::InvalidInput {
            field,
            message: message.into(),
        }
    }

    pub fn internal(err: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self::Internal(err.into())
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::InvalidJson(_) | Self::InvalidInput { .. } | Self::UpstreamRejected(_) => {
                StatusCode::BAD_REQUEST
            }
            Self::Unauthorized | Self::InvalidCredentials => StatusCode::UNAUTHORIZED,
            Self::OutOfTokens { .. } | Self::BudgetExceeded { .. } => StatusCode::PAYMENT_REQUIRED,
            Self::NotFound | Self::NoSuchItem | Self::ModelNotFound(_) => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::UsernameTaken | Self::RequestInProgress => StatusCode::CONFLICT,
            Self::IdempotencyKeyReused => StatusCode::UNPROCESSABLE_ENTITY,
            Self::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedMediaType | Self::UnsupportedEncoding => {
                StatusCode::UNSUPPORTED_MEDIA_TYPE
            }
            Self::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::RegistrationClosed
            | Self::Forbidden(_)
            | Self::AccountDisabled
            | Self::ModelNotAllowed(_) => StatusCode::FORBIDDEN,
            Self::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            Self::Busy { .. }
            | Self::ShuttingDown
            | Self::DatabaseUnavailable
            | Self::NotReady
            | Self::UpstreamBusy { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Self::Upstream(_) => StatusCode::BAD_GATEWAY,
            Self::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn code(&self) -> &'static str {
        self.into()
    }

    /// The error that stands for a bare status produced outside our handlers
    /// (axum's router, body limits, panics), so those get the envelope too.
    pub fn from_status(status: StatusCode) -> Self {
        match status {
            StatusCode::NOT_FOUND => Self::NotFound,
            StatusCode::METHOD_NOT_ALLOWED => Self::MethodNotAllowed,
            StatusCode::PAYLOAD_TOO_LARGE => Self::PayloadTooLarge,
            StatusCode::UNSUPPORTED_MEDIA_TYPE => Self::UnsupportedMediaType,
            StatusCode::UNAUTHORIZED => Self::Unauthorized,
            StatusCode::BAD_REQUEST => Self::InvalidJson("the request could not be read".into()),
            StatusCode::REQUEST_TIMEOUT => Self::RequestTimeout,
            _ => Self::internal(format!("bare {status} response")),
        }
    }

    fn public_message(&self) -> String {
        match self {
            Self::Internal(_) => "something went wrong on our side".to_string(),
            other => other.to_string(),
        }
    }
}

impl From<Invalid> for ApiError {
    fn from(invalid: Invalid) -> Self {
        Self::InvalidInput {
            field: invalid.field,
            message: invalid.message,
        }
    }
}

impl From<ServiceError> for ApiError {
    fn from(err: ServiceError) -> Self {
        match err {
            ServiceError::Invalid(invalid) => invalid.into(),
            ServiceError::NotAuthenticated => Self::Unauthorized,
            ServiceError::WrongCredentials => Self::InvalidCredentials,
            ServiceError::UsernameTaken => Self::UsernameTaken,
            ServiceError::RegistrationClosed => Self::RegistrationClosed,
            ServiceError::BudgetExceeded { owner, resets_at } => {
                Self::BudgetExceeded { owner, resets_at }
            }
            ServiceError::OutOfTokens { balance, required } => Self::OutOfTokens {
                tokens: balance,
                required,
            },
            ServiceError::NoSuchChat
            | ServiceError::NoSuchConversation
            | ServiceError::NoSuchKey => Self::NoSuchItem,
            ServiceError::Forbidden(why) => Self::Forbidden(why),
            ServiceError::AccountDisabled => Self::AccountDisabled,
            ServiceError::IdempotencyKeyReused => Self::IdempotencyKeyReused,
            ServiceError::RequestInProgress => Self::RequestInProgress,
            ServiceError::TooManyAttempts { retry_after_secs } => {
                Self::RateLimited { retry_after_secs }
            }
            ServiceError::HashersBusy { retry_after_secs } => Self::Busy { retry_after_secs },
            ServiceError::ShuttingDown => Self::ShuttingDown,
            // The model was too slow for the chat's deadline, as a time-out is.
            ServiceError::ChatExpired | ServiceError::Model(LlmError::Timeout) => {
                Self::UpstreamTimeout
            }
            // The client's fault: its request, in the model's words.
            ServiceError::Model(LlmError::Rejected(rejection)) => {
                Self::UpstreamRejected(rejection.message)
            }
            ServiceError::Model(LlmError::Busy {
                retry_after_secs, ..
            }) => Self::UpstreamBusy { retry_after_secs },
            ServiceError::Model(err) => Self::Upstream(err.to_string()),
            ServiceError::DatabaseUnavailable(err) => {
                tracing::warn!(error = %err, "database unavailable");
                Self::DatabaseUnavailable
            }
            other @ (ServiceError::NoSuchUser(_)
            | ServiceError::ClientGone
            | ServiceError::Database(_)
            | ServiceError::Hashing(_)
            | ServiceError::Task(_)
            | ServiceError::Inconsistent(_)) => Self::internal(other),
        }
    }
}

/// The contract's error envelope.
// (A `///` paragraph here would join the schema's description in the OpenAPI document.)
#[derive(Serialize, ToSchema)]
#[schema(as = Error)]
pub struct Envelope {
    /// Stable snake_case: invalid_json, invalid_input, unauthorized, invalid_credentials,
    /// out_of_tokens, not_found, method_not_allowed, username_taken, payload_too_large,
    /// unsupported_media_type, rate_limited, forbidden, account_disabled, internal,
    /// upstream_error, upstream_rejected, upstream_busy, database_unavailable, not_ready,
    /// upstream_timeout, ...
    pub code: &'static str,
    /// A sentence for a person.
    pub error: String,
    /// The field at fault (`invalid_input`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<&'static str>,
    /// The request's id (500s), as in `X-Request-Id`.
    // Never set here: `middleware::request_id` adds it to a 500's body on its way out,
    // whichever layer made it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// The balance (`out_of_tokens`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens: Option<i64>,
    /// What the call needs reserved (`out_of_tokens`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub required: Option<i64>,
    /// When the key's budget starts again (`budget_exceeded`): RFC 3339, or null for a
    /// total budget.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resets_at: Option<Option<String>>,
}

impl ApiError {
    /// The contract's envelope: `{"error", "code"}`, and `"field"`, or `"tokens"` and
    /// `"required"`, where they apply. Logs an internal error whole, since this is where it
    /// is answered.
    pub fn envelope(&self) -> Envelope {
        if let Self::Internal(err) = self {
            tracing::error!(error = %with_sources(err.as_ref()), "internal error");
        }
        let (field, tokens, required) = match self {
            Self::InvalidInput { field, .. } => (Some(*field), None, None),
            Self::ModelNotFound(_) | Self::ModelNotAllowed(_) => (Some("model"), None, None),
            Self::OutOfTokens { tokens, required } => (None, Some(*tokens), Some(*required)),
            _ => (None, None, None),
        };
        let resets_at = match self {
            Self::BudgetExceeded { resets_at, .. } => Some(resets_at.map(crate::clock::rfc3339)),
            _ => None,
        };
        Envelope {
            code: self.code(),
            error: self.public_message(),
            field,
            request_id: None,
            tokens,
            required,
            resets_at,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status(), Json(self.envelope())).into_response();
        let headers = response.headers_mut();
        match self {
            Self::RateLimited { retry_after_secs }
            | Self::Busy { retry_after_secs }
            | Self::UpstreamBusy { retry_after_secs } => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs));
            }
            // A model past its time-out may have been paid for by the operator, and is
            // likely to be as slow again: OpenAI's SDKs, which retry every 5xx twice by
            // default, take this header's word over their rule.
            Self::UpstreamTimeout => {
                headers.insert(X_SHOULD_RETRY, HeaderValue::from_static("false"));
            }
            // RFC 9110: a 401 names the scheme that would be accepted.
            Self::Unauthorized | Self::InvalidCredentials => {
                headers.insert(header::WWW_AUTHENTICATE, WWW_AUTHENTICATE);
            }
            _ => {}
        }
        response
    }
}

/// Declares unit types that stand, in a `#[utoipa::path]`'s `responses(...)`, for error
/// answers that several routes share: each `status: "description"` listed, with `$body`'s
/// schema as its JSON body.
macro_rules! error_responses {
    ($body:ty => $($(#[$doc:meta])* $name:ident { $($status:literal: $description:literal),+ $(,)? })+) => {$(
        $(#[$doc])*
        pub struct $name;

        impl utoipa::IntoResponses for $name {
            fn responses() -> std::collections::BTreeMap<
                String,
                utoipa::openapi::RefOr<utoipa::openapi::response::Response>,
            > {
                $crate::routes::error::documented::<$body>(&[$(($status, $description)),+])
            }
        }
    )+};
}
pub(super) use error_responses;

/// The responses of `statuses`, each `(status, description)` with `B` as its JSON body.
pub(super) fn documented<B: ToSchema>(
    statuses: &[(u16, &str)],
) -> BTreeMap<String, RefOr<DocumentedResponse>> {
    statuses
        .iter()
        .map(|&(status, description)| {
            let body = Content::new(Some(Ref::from_schema_name(B::name())));
            let response = DocumentedResponse::builder()
                .description(description)
                .content("application/json", body)
                .build();
            (status.to_string(), response.into())
        })
        .collect()
}

error_responses! { Envelope =>
    /// A body that is not JSON or form data, lacks a field or has one of the wrong type
    /// (`invalid_json`), or a field that fails validation (`invalid_input`).
    InvalidBody { 400: "invalid_json or invalid_input" }
    /// A `?limit=` or `?cursor=` that fails validation.
    InvalidPage { 400: "invalid_input" }
    /// What an authorised route answers before its handler runs.
    Unauthorised {
        401: "unauthorized",
        403: "account_disabled",
        429: "rate_limited: the key's or the user's requests a minute (rpm), with Retry-After",
    }
    /// An id that is not the user's.
    NotFound { 404: "not_found" }
    RateLimited { 429: "rate_limited" }
    /// What a route that hashes a password answers when there are too many attempts, or
    /// too many hashes waiting for a core.
    Hashing {
        429: "rate_limited, with Retry-After",
        503: "busy: the password hashing queue is full, with Retry-After",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::to_bytes;
    use serde_json::Value;

    async fn rendered(err: ServiceError) -> (StatusCode, Value) {
        let response = ApiError::from(err).into_response();
        let status = response.status();
        let body = to_bytes(response.into_body(), 4096).await.unwrap();
        (status, serde_json::from_slice(&body).unwrap())
    }

    #[tokio::test]
    async fn a_failure_beneath_the_services_is_a_500_without_its_detail() {
        let (status, body) = rendered(ServiceError::Database(sqlx::Error::Protocol(
            "secret detail".into(),
        )))
        .await;
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(body["code"], "internal");
        assert!(!body.to_string().contains("secret detail"), "{body}");
    }

    #[tokio::test]
    async fn a_chat_past_its_deadline_is_a_time_out_like_a_slow_model() {
        for late in [
            ServiceError::ChatExpired,
            ServiceError::Model(LlmError::Timeout),
        ] {
            let (status, body) = rendered(late).await;
            assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
            assert_eq!(body["code"], "upstream_timeout");
        }
        let (status, body) = rendered(ServiceError::Model(LlmError::Status(500))).await;
        assert_eq!(status, StatusCode::BAD_GATEWAY);
        assert_eq!(body["code"], "upstream_error");
        assert_eq!(
            body["error"],
            "the language model could not answer: it answered with status 500"
        );
    }

    #[tokio::test]
    async fn each_upstream_failure_is_answered_by_whose_fault_it_is() {
        let rejection = crate::llm::Rejection {
            status: 422,
            message: "tools[0] is not a valid schema".into(),
            kind: None,
            param: None,
            code: None,
        };
        let (status, body) = rendered(ServiceError::Model(LlmError::Rejected(rejection))).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(body["code"], "upstream_rejected");
        assert!(body["error"]
            .as_str()
            .unwrap()
            .ends_with("tools[0] is not a valid schema"));

        let (status, body) = rendered(ServiceError::Model(LlmError::RefusedCredentials(401))).await;
        assert_eq!(status, StatusCode::BAD_GATEWAY);
        assert_eq!(body["code"], "upstream_error");
        assert!(
            body["error"].as_str().unwrap().contains("upstream's key"),
            "{body}"
        );

        let busy = ApiError::from(ServiceError::Model(LlmError::Busy {
            status: 429,
            retry_after_secs: 7,
            said: true,
        }))
        .into_response();
        assert_eq!(busy.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(busy.headers()[header::RETRY_AFTER], "7");
    }

    #[tokio::test]
    async fn a_refused_value_names_its_field() {
        let invalid = Invalid::new("amount", "a grant must be positive");
        let (status, body) = rendered(invalid.into()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(body["code"], "invalid_input");
        assert_eq!(body["field"], "amount");
    }
}
