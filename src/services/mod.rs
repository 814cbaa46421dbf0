//! The service layer: the rules of the product, between the routes and the database.

pub mod accounts;
pub mod alerts;
pub mod audit;
pub mod auth;
pub mod chat;
pub mod conversations;
pub mod error;
pub mod health;
pub mod history;
pub mod keys;
pub mod limits;
pub mod passwords;
pub mod rates;
pub mod recovery;
pub mod throttle;
pub mod user_limits;

use sha2::{Digest, Sha256};

pub use error::{ServiceError, ServiceResult};

/// Hex SHA-256: how login tokens and idempotent requests are fingerprinted.
pub fn sha256_hex(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}
