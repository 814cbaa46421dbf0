//! [`LlmError`], why a call to a model gave no usable answer, and [`Rejection`], its refusal
//! of a request as invalid.

/// Why the model gave no usable answer, sorted by whose fault it is.
#[derive(Debug, thiserror::Error, strum::IntoStaticStr)]
#[strum(serialize_all = "snake_case")]
pub enum LlmError {
    #[error("it did not answer in time")]
    Timeout,
    #[error("it could not be reached")]
    Unreachable,
    /// An error status that is the model's own (a 5xx but 503, or one unforeseen).
    #[error("it answered with status {0}")]
    Status(u16),
    /// The model refused the request as invalid (400, 404, 413, 422): the client's fault.
    #[error("it rejected the request: {}", .0.message)]
    Rejected(Rejection),
    /// The model refused tokenchat's own credentials (401, 403): the operator's fault.
    #[error(
        "it refused this server's credentials (status {0}); the operator must check the \
         upstream's key"
    )]
    #[strum(serialize = "refused_credentials")]
    RefusedCredentials(u16),
    /// The model is rate-limited or overloaded (429, 503): try again after this long.
    /// `said`: the model gave that time in `Retry-After` (only then is the target left
    /// alone for it, rather than tried again by the next call).
    #[error("it is busy (status {status}); try again in {retry_after_secs} s")]
    Busy {
        status: u16,
        retry_after_secs: u64,
        said: bool,
    },
    #[error("its answer was unusable ({0})")]
    Unusable(&'static str),
    #[error("it broke off its answer")]
    BrokeOff,
}

impl LlmError {
    /// A stable word for the kind of failure, for metrics.
    pub fn kind(&self) -> &'static str {
        self.into()
    }
}

/// A request the model refused as invalid: its status, and its error object's fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub status: u16,
    pub message: String,
    /// OpenAI's `type` (`invalid_request_error`, ...), `param` and `code`, when it sent them.
    pub kind: Option<String>,
    pub param: Option<String>,
    pub code: Option<String>,
}
