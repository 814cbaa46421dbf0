//! Property: whatever bytes, headers, methods and paths a client sends, to any route, the
//! server never answers 5xx; every answer but a 204 (and a bodiless HEAD), the page at `/`
//! and `/metrics` is `application/json`; every error is the contract's envelope (a sentence in `error`, a
//! snake_case `code` the contract lists for its status, `Allow` on 405, `Retry-After` on
//! 429); and only an answered chat moves a balance, by exactly `CHAT_COST`, and only for
//! the owner of the one live token it came with.
//!
//! What is generated: every method (odd and lower-case ones too) on every route with and
//! without its trailing slash, `/chats/{id}` with odd ids, odd query strings, unknown
//! paths; none, one or two `Authorization` headers (each user's live token in every
//! accepted form and in near-miss forms, the other user's, nobody's, arbitrary header
//! bytes); odd, garbage and doubled `Content-Type`s; `Content-Length`s that disagree with
//! the body or are no number; `Idempotency-Key`s, reused; bodies of arbitrary bytes (up to
//! 6 KB), any JSON value, objects of the routes' fields with values of every type and
//! strings at the limits (50/51-character usernames, 40/41-character messages in 1 to
//! 4-byte characters, combining marks, emoji sequences, invisible, right-to-left and NUL
//! characters), every string written as `\u` escapes, form data (with invalid UTF-8),
//! and hand-written near-JSON (lone surrogates, duplicate keys, deep nesting, trailing
//! garbage).
//!
//! Each property keeps one app (one database, one fake model that echoes) for all its
//! cases; each case gets two fresh users and sends a sequence of 1 to 6 requests. After
//! each case every balance is its starting balance less `CHAT_COST` per chat answered for
//! that user, the model was asked exactly once per answered chat, no chat is pending and
//! the ledger audit passes. The users are created with the queries `/register` and
//! `/login` run, minus Argon2 (one hash of `pass123` per app), so that password hashing is
//! paid only by the hostile requests that reach it, which the strategies keep a minority.
//! `PROPTEST_CASES=n` runs n cases of each property.

use proptest::{prelude::*, sample::select, strategy::BoxedStrategy};

const MAX_MESSAGE_CHARS: usize = 40;
const MAX_BODY_BYTES: usize = 2048;
const INITIAL_TOKENS: i64 = 4000;
const CHAT_COST: i64 = 100;
const PASSWORD: &str = "pass123";

/// The fields the routes read, and one they do not.
const KEYS: [&str; 8] = [
    "message",
    "username",
    "password",
    "old_password",
    "new_password",
    "stream",
    "conversation_id",
    "extra",
];

/// Stand-ins in generated strings for what exists only once a case runs.
const USER: [&str; 2] = ["{{user0}}", "{{user1}}"];
/// The first user's name in capitals: the same account.
const USER_SHOUTED: &str = "{{USER0}}";
const TOKEN: [&str; 2] = ["{{token0}}", "{{token1}}"];
const LAST_CHAT: &str = "{{last_chat}}";

mod body_strategies;
mod case;
mod case_strategies;
mod checks;
mod findings;
mod harness;
mod header_strategies;
mod rendering;

use self::case_strategies::{anything, chat_with_hostile_headers, plausible};
use self::harness::Harness;

// ---------------------------------------------------------------------------------------
// The properties.

fn full_balances() -> BoxedStrategy<[i64; 2]> {
    Just([INITIAL_TOKENS, INITIAL_TOKENS]).boxed()
}

#[test]
fn hostile_requests_of_any_shape_to_any_route() {
    Harness::check("anything", 1200, anything(), full_balances());
}

#[test]
fn hostile_fields_in_requests_a_client_might_mean() {
    Harness::check("plausible", 1200, plausible(), full_balances());
}

/// The second user sometimes has one chat's worth of tokens or a little more, so that
/// `out_of_tokens` comes up.
#[test]
fn hostile_headers_around_chats_that_would_be_answered() {
    let initial = prop_oneof![
        2 => Just([INITIAL_TOKENS, INITIAL_TOKENS]),
        1 => select(vec![CHAT_COST, CHAT_COST + 50]).prop_map(|low| [INITIAL_TOKENS, low]),
    ];
    Harness::check("chats", 600, chat_with_hostile_headers(), initial.boxed());
}
