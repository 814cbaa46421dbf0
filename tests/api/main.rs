//! The integration suite, one binary: the contract, the accounting, the real server and
//! binary, and attacks on both. `TEST_LOG=1 cargo test` shows the server's logs.

mod alerts;
mod chat_charges;
mod common;
mod connections;
mod contract;
mod conversations;
mod fixed_weaknesses;
mod keys;
mod ledger;
mod limits;
mod memory;
mod migrations;
mod openai;
mod openapi;
mod operations;
mod page;
mod postgres;
mod prices;
mod properties;
mod request_fuzzing;
mod sdk;
mod server;
mod stream_limits;
mod streaming;
mod upstreams;
