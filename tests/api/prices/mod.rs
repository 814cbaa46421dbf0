//! Prices per model and per token: the reservation (the request price, the prompt's bound,
//! the output cap), the cap sent upstream and lowered for a low balance, the settlement to
//! the reported or counted usage with the rest given back, and the charge shown everywhere,
//! on both backends.

mod concurrency;
mod endings;
mod holds;
mod openai;
mod reasoning_models;
mod tool_calls;
mod usage_reports;

use axum::http::StatusCode;
use serde_json::{json, Value};
use tokenchat::config::DEFAULT_SYSTEM_PROMPT;

use tower::ServiceExt;

use crate::{
    common::{
        fake_llm::answers::{CompletionDetails, PromptDetails, Usage},
        Reply, TestApp, TestResponse,
    },
    streaming::EventReader,
};

/// One token per prompt token, half that cached, two per completion token, five per call,
/// answers of at most 50 tokens; the fake model's `llama3.2`, whose text tokenchat counts
/// by its bytes (it knows no encoding for it).
pub(crate) const BOOK: &str = r#"
[models."llama3.2"]
prompt = 1000000
cached_prompt = 500000
completion = 2000000
request = 5
max_output_tokens = 50
"#;

pub(crate) const REQUEST: i64 = 5;
pub(crate) const MAX_OUTPUT: i64 = 50;

/// An app with [`BOOK`] as its price book, and `overrides`.
pub(crate) struct PricedApp {
    pub app: TestApp,
    _dir: tempfile::TempDir,
}

impl std::ops::Deref for PricedApp {
    type Target = TestApp;

    fn deref(&self) -> &TestApp {
        &self.app
    }
}

/// A directory holding `book` as `tokenchat.toml`, and the file's path.
pub(crate) fn book_file(book: &str) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokenchat.toml");
    std::fs::write(&path, book).unwrap();
    let path = path.to_str().unwrap().to_string();
    (dir, path)
}

pub(crate) async fn priced_app(overrides: &[(&str, &str)]) -> PricedApp {
    let (dir, path) = book_file(BOOK);
    let mut vars = vec![("CONFIG_FILE", path.as_str())];
    vars.extend_from_slice(overrides);
    PricedApp {
        app: TestApp::with_env(&vars).await,
        _dir: dir,
    }
}

/// The bound of a `/chat` prompt of the system prompt and `message` alone: their bytes, 8
/// tokens around each message and 16 for the call.
pub(crate) fn chat_bound(message: &str) -> i64 {
    (DEFAULT_SYSTEM_PROMPT.len() + message.len() + 2 * 8 + 16) as i64
}

/// What a `/chat` chat of `message` reserves with an output cap of `cap`.
pub(crate) fn chat_reservation(message: &str, cap: i64) -> i64 {
    REQUEST + chat_bound(message) + 2 * cap
}

/// A usage as a model reports it, with `cached` of the prompt from its cache and `reasoning`
/// of the completion spent thinking.
pub(crate) fn usage(prompt: usize, cached: usize, completion: usize, reasoning: usize) -> Usage {
    Usage {
        prompt_tokens: prompt,
        completion_tokens: completion,
        total_tokens: prompt + completion,
        prompt_tokens_details: PromptDetails {
            cached_tokens: cached,
            audio_tokens: 0,
        },
        completion_tokens_details: CompletionDetails {
            reasoning_tokens: reasoning,
            audio_tokens: 0,
        },
    }
}

/// A chat's row as stored: the charge, the reservation, the usage and the prices applied.
#[derive(Debug, PartialEq, Eq, sqlx::FromRow)]
pub(crate) struct ChatRow {
    pub status: String,
    pub cost: i64,
    pub reserved: i64,
    pub usage_source: Option<String>,
    pub prompt_tokens: Option<i64>,
    pub cached_tokens: Option<i64>,
    pub completion_tokens: Option<i64>,
    pub output_cap: Option<i64>,
    pub model: Option<String>,
    pub price_prompt: Option<i64>,
    pub price_cached_prompt: Option<i64>,
    pub price_completion: Option<i64>,
    pub price_request: Option<i64>,
}

pub(crate) async fn chat_row(app: &TestApp, chat_id: i64) -> ChatRow {
    tokenchat::db_run!(&app.state.db, pool => sqlx::query_as(
        "SELECT status, cost, COALESCE(reserved, cost) AS reserved, usage_source,
                prompt_tokens, cached_tokens,
                completion_tokens, output_cap, model, price_prompt, price_cached_prompt,
                price_completion, price_request
         FROM chats WHERE id = $1",
    )
    .bind(chat_id)
    .fetch_one(pool)
    .await)
    .unwrap()
}

/// The ledger rows that name a chat, in order: reason and amount.
pub(crate) async fn chat_ledger(app: &TestApp, chat_id: i64) -> Vec<(String, i64)> {
    tokenchat::db_run!(&app.state.db, pool => sqlx::query_as(
        "SELECT reason, amount FROM ledger WHERE chat_id = $1 ORDER BY id",
    )
    .bind(chat_id)
    .fetch_all(pool)
    .await)
    .unwrap()
}

/// Checks that a priced chat reserved `reserved` (a hold: its row records it, the ledger does
/// not) and that its ledger rows are `rows`, in order: reason and amount.
pub(crate) async fn assert_reserved_then(
    app: &TestApp,
    chat_id: i64,
    reserved: i64,
    rows: &[(&str, i64)],
) {
    assert_eq!(
        chat_row(app, chat_id).await.reserved,
        reserved,
        "chat {chat_id}"
    );
    let rows: Vec<(String, i64)> = rows
        .iter()
        .map(|(reason, amount)| (reason.to_string(), *amount))
        .collect();
    assert_eq!(chat_ledger(app, chat_id).await, rows, "chat {chat_id}");
}

/// The body the fake model received last.
pub(crate) fn last_sent(app: &TestApp) -> Value {
    app.llm
        .received()
        .last()
        .expect("the model was asked")
        .body
        .clone()
}

pub(crate) async fn chat(app: &TestApp, token: &str, message: &str) -> TestResponse {
    app.post_authorized("/chat", token, json!({ "message": message }))
        .await
}

#[tokio::test]
async fn an_answered_chat_is_charged_its_usage_and_the_rest_of_its_reservation_comes_back() {
    let app = priced_app(&[]).await;
    let token = app.user_with_token("payer").await;
    // 30 prompt tokens, 10 of them cached; 7 completion tokens, 5 of them reasoning.
    app.llm.set_reply(Reply::EchoReporting(usage(30, 10, 7, 5)));
    let message = "what does this cost";
    let answered = chat(&app, &token, message).await;
    assert_eq!(answered.status, StatusCode::OK, "{answered:?}");
    // 5 + ceil((20 x 1,000,000 + 10 x 500,000 + 7 x 2,000,000) / 1,000,000) = 5 + 39.
    let charged = 44;
    let reserved = chat_reservation(message, MAX_OUTPUT);
    assert_eq!(answered.json["tokens_charged"], charged);
    assert_eq!(answered.json["tokens"], 4000 - charged);
    assert_eq!(answered.tokens_remaining(), 4000 - charged);
    assert!(answered.headers.get("x-max-tokens-applied").is_none());
    // The model was told the cap it was reserved for.
    assert_eq!(last_sent(&app)["max_tokens"], MAX_OUTPUT);

    let chat_id = answered.json["chat_id"].as_i64().unwrap();
    assert_eq!(
        chat_row(&app, chat_id).await,
        ChatRow {
            status: "answered".into(),
            cost: charged,
            reserved,
            usage_source: Some("model".into()),
            prompt_tokens: Some(30),
            cached_tokens: Some(10),
            completion_tokens: Some(7),
            output_cap: Some(MAX_OUTPUT),
            model: Some("llama3.2".into()),
            price_prompt: Some(1_000_000),
            price_cached_prompt: Some(500_000),
            price_completion: Some(2_000_000),
            price_request: Some(5),
        }
    );
    assert_reserved_then(&app, chat_id, reserved, &[("chat_charge", -charged)]).await;
    let history = app.get_authorized("/chats", &token).await;
    assert_eq!(
        history.json["chats"][0]["tokens_charged"], charged,
        "{history:?}"
    );
    let moves = app.get_authorized("/transactions", &token).await;
    let charge = &moves.json["transactions"][0];
    assert_eq!(charge["reason"], "chat_charge", "{moves:?}");
    assert_eq!(charge["amount"], -charged);
    assert_eq!(charge["balance_after"], 4000 - charged);
    assert_eq!(charge["chat_id"], chat_id);
    assert_eq!(moves.json["transactions"].as_array().unwrap().len(), 2);
    assert_eq!(app.balance(&token).await, 4000 - charged);
    app.assert_all_settled().await;
}

#[tokio::test]
async fn cached_tokens_are_priced_once_at_their_own_price_and_rounded_up_once_per_call() {
    let app = priced_app(&[]).await;
    let token = app.user_with_token("cached").await;
    // Every prompt token cached: 3 x 500,000 = 1,500,000 millionths, 1.5 rounded up to 2.
    app.llm.set_reply(Reply::EchoReporting(usage(3, 3, 0, 0)));
    let first = chat(&app, &token, "all from the cache").await;
    assert_eq!(first.json["tokens_charged"], REQUEST + 2, "{first:?}");
    // More cached tokens than prompt tokens (a broken report): no more than the prompt.
    app.llm.set_reply(Reply::EchoReporting(usage(2, 9, 1, 0)));
    let second = chat(&app, &token, "a broken report").await;
    assert_eq!(second.json["tokens_charged"], REQUEST + 1 + 2, "{second:?}");
    app.assert_all_settled().await;
}

#[tokio::test]
async fn a_low_balance_gets_a_shorter_answer_and_the_model_is_sent_the_lowered_cap() {
    let message = "tell me a long story";
    // 40 tokens past the prompt: 20 completion tokens at 2 each.
    let initial = REQUEST + chat_bound(message) + 40;
    let app = priced_app(&[("INITIAL_TOKENS", &initial.to_string())]).await;
    let token = app.user_with_token("short").await;
    let answered = chat(&app, &token, message).await;
    assert_eq!(answered.status, StatusCode::OK, "{answered:?}");
    assert_eq!(answered.headers["x-max-tokens-applied"], "20");
    assert_eq!(last_sent(&app)["max_tokens"], 20);
    let chat_id = answered.json["chat_id"].as_i64().unwrap();
    let row = chat_row(&app, chat_id).await;
    assert_eq!((row.reserved, row.output_cap), (initial, Some(20)));
    assert!(row.cost <= row.reserved);
    app.assert_all_settled().await;

    // Streamed, the same, in the response's head.
    let again = priced_app(&[("INITIAL_TOKENS", &initial.to_string())]).await;
    let token = again.user_with_token("streamer").await;
    let request = axum::http::Request::post("/chat")
        .header("content-type", "application/json")
        .header("authorization", format!("Bearer {token}"))
        .body(axum::body::Body::from(
            json!({ "message": message, "stream": true }).to_string(),
        ))
        .unwrap();
    let response = again.router.clone().oneshot(request).await.unwrap();
    assert_eq!(response.headers()["x-max-tokens-applied"], "20");
    let events = EventReader::new(response.into_body()).rest().await;
    let (name, done) = events.last().unwrap();
    assert_eq!(name, "done", "{events:?}");
    assert_eq!(last_sent(&again)["max_tokens"], 20);
    assert_eq!(
        done["tokens"],
        initial - done["tokens_charged"].as_i64().unwrap()
    );
    again.assert_all_settled().await;
}

#[tokio::test]
async fn a_balance_below_the_shortest_answer_is_refused_with_what_is_required() {
    let message = "tell me a long story";
    // One token short of 16 completion tokens.
    let initial = REQUEST + chat_bound(message) + 2 * 16 - 1;
    let app = priced_app(&[("INITIAL_TOKENS", &initial.to_string())]).await;
    let token = app.user_with_token("broke").await;
    let refused = chat(&app, &token, message).await;
    refused.assert_error(StatusCode::PAYMENT_REQUIRED, "out_of_tokens");
    assert_eq!(refused.json["error"], "Out of Tokens");
    assert_eq!(refused.json["tokens"], initial);
    assert_eq!(
        refused.json["required"],
        REQUEST + chat_bound(message) + 2 * 16
    );
    assert_eq!(app.llm.calls(), 0);
    assert_eq!(app.balance(&token).await, initial);
    assert_eq!(app.chat_counts().await, []);
    app.assert_audit_passes().await;
}

#[tokio::test]
async fn a_model_that_reports_no_usage_is_counted_and_the_chat_says_so() {
    let app = priced_app(&[]).await;
    let token = app.user_with_token("uncounted").await;
    app.llm.set_reply(Reply::EchoWithoutUsage);
    let message = "count me";
    let answered = chat(&app, &token, message).await;
    // By bytes: the prompt's text and OpenAI's 3 tokens a message and 3 for the reply;
    // the completion "Echo: count me".
    let prompt = (DEFAULT_SYSTEM_PROMPT.len() + message.len() + 2 * 3 + 3) as i64;
    let completion = "Echo: count me".len() as i64;
    let charged = REQUEST + prompt + 2 * completion;
    assert_eq!(answered.json["tokens_charged"], charged, "{answered:?}");
    let row = chat_row(&app, answered.json["chat_id"].as_i64().unwrap()).await;
    assert_eq!(row.usage_source.as_deref(), Some("counted"));
    assert_eq!(
        (row.prompt_tokens, row.cached_tokens, row.completion_tokens),
        (Some(prompt), Some(0), Some(completion))
    );
    app.assert_all_settled().await;
}

#[tokio::test]
async fn a_model_the_book_does_not_price_keeps_the_flat_cost() {
    let (_dir, path) = book_file("[models.\"another\"]\nprompt = 1\n");
    let app = TestApp::with_env(&[("CONFIG_FILE", &path)]).await;
    let token = app.user_with_token("flat").await;
    let answered = chat(&app, &token, "hello").await;
    assert_eq!(answered.json["tokens_charged"], 100, "{answered:?}");
    assert!(last_sent(&app).get("max_tokens").is_none());
    let row = chat_row(&app, answered.json["chat_id"].as_i64().unwrap()).await;
    assert_eq!((row.cost, row.reserved, row.price_prompt), (100, 100, None));
    app.assert_all_settled().await;
}

/// The README's book ("Prices").
const README_BOOK: &str = r#"
[models."gpt-4o-mini"]
prompt = 1500
cached_prompt = 750
completion = 6000
request = 1
max_output_tokens = 4096
"#;

#[tokio::test]
async fn the_readmes_worked_example_holds_to_the_token() {
    let (_dir, path) = book_file(README_BOOK);
    let question = "What is the capital of France?";
    let with_balance = |initial: &'static str| {
        let path = path.clone();
        async move {
            let app = TestApp::with_env(&[
                ("CONFIG_FILE", &path),
                ("LLM_MODEL", "gpt-4o-mini"),
                ("INITIAL_TOKENS", initial),
            ])
            .await;
            let token = app.user_with_token("reader").await;
            app.llm
                .set_reply(Reply::EchoReporting(usage(34, 0, 120, 0)));
            (app, token)
        }
    };
    let (app, token) = with_balance("4000").await;
    let answered = chat(&app, &token, question).await;
    assert_eq!(
        (&answered.json["tokens_charged"], &answered.json["tokens"]),
        (&json!(2), &json!(3998)),
        "{answered:?}"
    );
    assert_eq!(last_sent(&app)["max_tokens"], 4096);
    let moves = app.get_authorized("/transactions", &token).await;
    let rows: Vec<(&str, i64, i64)> = moves.json["transactions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| {
            (
                row["reason"].as_str().unwrap(),
                row["amount"].as_i64().unwrap(),
                row["balance_after"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        rows,
        [("chat_charge", -2, 3998), ("initial_grant", 4000, 4000)]
    );
    let chat_id = answered.json["chat_id"].as_i64().unwrap();
    assert_eq!(chat_row(&app, chat_id).await.reserved, 26);

    let (app, token) = with_balance("10").await;
    let answered = chat(&app, &token, question).await;
    assert_eq!(
        answered.headers["x-max-tokens-applied"], "1487",
        "{answered:?}"
    );
    assert_eq!(last_sent(&app)["max_tokens"], 1487);

    let (app, token) = with_balance("1").await;
    let refused = chat(&app, &token, question).await;
    refused.assert_error(StatusCode::PAYMENT_REQUIRED, "out_of_tokens");
    assert_eq!(
        (&refused.json["tokens"], &refused.json["required"]),
        (&json!(1), &json!(2))
    );
}

#[test]
fn tokenchat_models_lists_the_book_and_a_bad_book_stops_start_up_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("tokenchat.toml"), README_BOOK).unwrap();
    let database = format!("sqlite://{}", dir.path().join("t.db").display());
    let vars = [("DATABASE_URL", database.as_str())];
    let listed = crate::server::Server::command(dir.path(), &vars)
        .arg("models")
        .output()
        .unwrap();
    assert!(listed.status.success(), "{listed:?}");
    let listed = String::from_utf8_lossy(&listed.stdout);
    let line = listed
        .lines()
        .find(|line| line.starts_with("gpt-4o-mini"))
        .unwrap_or_else(|| panic!("{listed}"));
    let cells: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(
        cells,
        [
            "gpt-4o-mini",
            "1500",
            "750",
            "6000",
            "1",
            "4096",
            "o200k_base"
        ]
    );

    std::fs::write(
        dir.path().join("tokenchat.toml"),
        "[models.\"gpt-4o-mini\"]\nprompt = 1500\ncompletion = \"lots\"\n",
    )
    .unwrap();
    let refused = crate::server::Server::command(dir.path(), &vars)
        .output()
        .unwrap();
    assert!(!refused.status.success());
    let said = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(said.trim().lines().count(), 1, "{said}");
    assert!(
        said.contains("invalid CONFIG_FILE: tokenchat.toml, line 3, field completion: "),
        "{said}"
    );
}
