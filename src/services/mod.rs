//! The service layer: the rules of the product, between the routes and the database.

pub mod accounts;
pub mod auth;
pub mod billing;
pub mod llm;
pub mod passwords;
pub mod throttle;
