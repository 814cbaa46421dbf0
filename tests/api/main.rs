//! The integration suite, one binary: the contract, the accounting, the real server and
//! binary, and attacks on both. `TEST_LOG=1 cargo test` shows the server's logs.

mod accounting;
mod billing;
mod common;
mod connections;
mod contract;
mod conversations;
mod hardening;
mod hostile;
mod keys;
mod memory;
mod migrations;
mod openai;
mod openapi;
mod operations;
mod page;
mod postgres;
mod properties;
mod sdk;
mod server;
mod stream_limits;
mod streaming;
