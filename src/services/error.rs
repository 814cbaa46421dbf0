//! What the product's rules refuse, and what went wrong beneath them, in the product's words;
//! the routes decide how each is answered over HTTP, the command line prints it.

use crate::{
    db,
    domain::{BudgetOwner, Invalid},
    llm::LlmError,
};

/// Every way a service call can end without its outcome. Failures of the parts beneath
/// (the database, the model, a task) keep their error as the source, so a log shows the
/// whole chain.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// A value broke one of its rules.
    #[error(transparent)]
    Invalid(#[from] Invalid),
    #[error("no live login token was presented")]
    NotAuthenticated,
    #[error("invalid username or password")]
    WrongCredentials,
    #[error("this username is already taken")]
    UsernameTaken,
    #[error("this account has been disabled by an operator")]
    AccountDisabled,
    #[error("no user named {0}")]
    NoSuchUser(String),
    #[error("registration is closed; ask an operator for an account")]
    RegistrationClosed,
    /// `required`: what the call would reserve (its cost, or the most a priced call can
    /// cost with the shortest answer it may be given).
    #[error("the balance of {balance} tokens does not cover the {required} the call needs")]
    OutOfTokens { balance: i64, required: i64 },
    /// The key's or the user's budget for its period would be passed; `resets_at`: when
    /// the next period begins (Unix seconds), `None` for a total budget.
    #[error("{} for its period is spent", owner.words())]
    BudgetExceeded {
        owner: BudgetOwner,
        resets_at: Option<i64>,
    },
    #[error("no such chat")]
    NoSuchChat,
    #[error("no such conversation")]
    NoSuchConversation,
    #[error("no such API key")]
    NoSuchKey,
    /// The credential presented may not do this (an API key managing keys, say).
    #[error("{0}")]
    Forbidden(&'static str),
    #[error("this Idempotency-Key was already used with a different request")]
    IdempotencyKeyReused,
    #[error("a request with this Idempotency-Key is still in progress")]
    RequestInProgress,
    /// Too many attempts (logins, registrations, chats, password changes) for now.
    #[error("too many attempts; try again in {retry_after_secs} s")]
    TooManyAttempts { retry_after_secs: u64 },
    /// Every password-hashing slot is taken and the queue for them is full.
    #[error("the server is busy; try again in {retry_after_secs} s")]
    HashersBusy { retry_after_secs: u64 },
    #[error("the server is shutting down; the chat was refunded")]
    ShuttingDown,
    #[error("the client went away before the answer was stored; the chat was refunded")]
    ClientGone,
    /// The model answered too late: recovery had judged the chat abandoned and refunded it.
    #[error("the chat outlived its deadline and was refunded")]
    ChatExpired,
    #[error("the language model could not answer")]
    Model(#[source] LlmError),
    #[error("the database cannot be reached right now")]
    DatabaseUnavailable(#[source] sqlx::Error),
    #[error("a database statement failed")]
    Database(#[source] sqlx::Error),
    #[error("password hashing failed: {0}")]
    Hashing(String),
    #[error("a background task failed")]
    Task(#[from] tokio::task::JoinError),
    /// A stored fact that should hold did not (a bug or a hand-edited database).
    #[error("inconsistent data: {0}")]
    Inconsistent(String),
}

pub type ServiceResult<T> = Result<T, ServiceError>;

impl From<sqlx::Error> for ServiceError {
    fn from(err: sqlx::Error) -> Self {
        if db::is_unreachable(&err) {
            Self::DatabaseUnavailable(err)
        } else {
            Self::Database(err)
        }
    }
}

impl From<LlmError> for ServiceError {
    fn from(err: LlmError) -> Self {
        Self::Model(err)
    }
}

/// `err` and every error beneath it, joined with `: `, for a log line or a terminal.
pub fn with_sources(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_database_failure_keeps_its_cause() {
        let err = ServiceError::from(sqlx::Error::RowNotFound);
        assert!(matches!(err, ServiceError::Database(_)));
        let chain = with_sources(&err);
        assert!(
            chain.starts_with("a database statement failed: "),
            "{chain}"
        );
        assert!(chain.contains("no rows returned"), "{chain}");
    }

    #[test]
    fn an_unreachable_database_is_told_apart() {
        let gone = sqlx::Error::Io(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert!(matches!(
            ServiceError::from(gone),
            ServiceError::DatabaseUnavailable(_)
        ));
        assert!(matches!(
            ServiceError::from(sqlx::Error::PoolTimedOut),
            ServiceError::DatabaseUnavailable(_)
        ));
    }
}
