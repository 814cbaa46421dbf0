//! The contract's routes through the router in-process: the original walkthrough,
//! validation, authentication and the error envelope from every layer.

mod login_and_tokens;
mod registration;
mod request_bodies;
mod walkthrough;
