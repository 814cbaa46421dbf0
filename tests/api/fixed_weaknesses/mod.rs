//! Attacks and operator mistakes that once worked, each tried again: lock-outs, spraying,
//! token farming, questionable input, ambiguous credentials, corrupting grants, chats
//! refunded by a process with another time-out, database work a request abandons
//! half-way, and another site's page calling from a visitor's browser.

mod abandoned_statements;
mod cross_site;
mod database_and_command_line;
mod login_throttling;
mod questionable_input;
mod request_limits;
mod token_revocation;

fn retry_after(response: &crate::common::TestResponse) -> u64 {
    response.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap()
}
