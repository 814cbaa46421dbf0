//! Conversations: every chat belongs to one, the model is sent its earlier answered turns
//! within the budget, they are private to their owner, and deleting one erases its text
//! but never the money history.

use std::time::Duration;

use axum::http::{Method, StatusCode};
use serde_json::{json, Value};

use crate::common::{Reply, TestApp, TestResponse};

async fn chat_in(app: &TestApp, token: &str, conversation: &Value, message: &str) -> TestResponse {
    app.post_authorized(
        "/chat",
        token,
        json!({ "message": message, "conversation_id": conversation }),
    )
    .await
}

/// The messages the fake model received with the newest request, as (role, content).
fn last_prompt(app: &TestApp) -> Vec<(String, String)> {
    let received = app.llm.received();
    received.last().unwrap().body["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|message| {
            (
                message["role"].as_str().unwrap().to_string(),
                message["content"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

async fn delete(app: &TestApp, token: &str, path: &str) -> TestResponse {
    let authorization = format!("Bearer {token}");
    app.request(
        Method::DELETE,
        path,
        &[("authorization", &authorization)],
        "",
    )
    .await
}

#[tokio::test]
async fn a_chat_without_a_conversation_starts_one_titled_with_its_message() {
    let app = TestApp::new().await;
    let token = app.user_with_token("user").await;
    let long = format!("{} and then some", "é".repeat(85));
    let first = app.chat(&token, &long).await;
    assert_eq!(first.status, StatusCode::OK);
    let second = app.chat(&token, "  another topic  ").await;
    let (one, two) = (
        &first.json["conversation_id"],
        &second.json["conversation_id"],
    );
    assert!(one.is_i64() && two.is_i64() && one != two, "{one} {two}");

    let listed = app.get_authorized("/conversations", &token).await;
    assert_eq!(listed.status, StatusCode::OK);
    let conversations = listed.json["conversations"].as_array().unwrap();
    assert_eq!(conversations.len(), 2);
    assert_eq!(&conversations[0]["id"], two, "newest first");
    assert_eq!(conversations[0]["title"], "another topic");
    assert_eq!(conversations[1]["title"], "é".repeat(80));
    assert!(conversations[1]["created_at"]
        .as_str()
        .unwrap()
        .ends_with('Z'));
    assert_eq!(listed.json["next"], Value::Null);
    // The chat names its conversation in history too.
    let chat = app
        .get_authorized(&format!("/chats/{}", first.json["chat_id"]), &token)
        .await;
    assert_eq!(&chat.json["conversation_id"], one);
}

#[tokio::test]
async fn the_model_is_sent_the_earlier_answered_turns_then_the_new_message() {
    let app = TestApp::new().await;
    let token = app.user_with_token("user").await;
    let first = app.chat(&token, "my name is Ada").await;
    let conversation = first.json["conversation_id"].clone();
    // A failed turn is not sent.
    let failed = chat_in(&app, &token, &conversation, "[fail] this one").await;
    assert_eq!(failed.status, StatusCode::BAD_GATEWAY);
    let second = chat_in(&app, &token, &conversation, "what is my name?").await;
    assert_eq!(second.status, StatusCode::OK);
    assert_eq!(second.json["conversation_id"], conversation);
    let prompt = last_prompt(&app);
    let roles: Vec<&str> = prompt.iter().map(|(role, _)| role.as_str()).collect();
    assert_eq!(roles, ["system", "user", "assistant", "user"]);
    assert_eq!(prompt[1].1, "my name is Ada");
    assert_eq!(prompt[2].1, "Echo: my name is Ada");
    assert_eq!(prompt[3].1, "what is my name?");
    // Another conversation knows nothing of it.
    app.chat(&token, "fresh start").await;
    assert_eq!(last_prompt(&app).len(), 2);
}

#[tokio::test]
async fn earlier_turns_are_kept_newest_first_and_whole_within_the_budget() {
    // Each turn below is 10 + 16 = 26 characters: one fits in 30, two do not.
    let app = TestApp::with_env(&[("CONTEXT_MAX_CHARS", "30")]).await;
    let token = app.user_with_token("user").await;
    let first = app.chat(&token, "aaaaaaaaaa").await;
    let conversation = first.json["conversation_id"].clone();
    chat_in(&app, &token, &conversation, "bbbbbbbbbb").await;
    chat_in(&app, &token, &conversation, "cccccccccc").await;
    let prompt = last_prompt(&app);
    assert_eq!(prompt.len(), 4, "{prompt:?}");
    assert_eq!(prompt[1].1, "bbbbbbbbbb");
    assert_eq!(prompt[2].1, "Echo: bbbbbbbbbb");

    let none_fit = TestApp::with_env(&[("CONTEXT_MAX_CHARS", "0")]).await;
    let token = none_fit.user_with_token("user").await;
    let first = none_fit.chat(&token, "hello").await;
    chat_in(&none_fit, &token, &first.json["conversation_id"], "again").await;
    assert_eq!(last_prompt(&none_fit).len(), 2);
}

#[tokio::test]
async fn a_bad_page_is_400_before_the_conversation_id_is_looked_at() {
    let app = TestApp::new().await;
    let alice = app.user_with_token("alice").await;
    let on_the_list = app.get_authorized("/conversations?limit=0", &alice).await;
    assert_eq!(
        on_the_list.status,
        StatusCode::BAD_REQUEST,
        "{on_the_list:?}"
    );
    for missing in ["abc", "%FF", "999999"] {
        let refused = app
            .get_authorized(&format!("/conversations/{missing}?limit=0"), &alice)
            .await;
        assert_eq!(refused.status, on_the_list.status, "{missing}: {refused:?}");
        assert_eq!(refused.json, on_the_list.json, "{missing}");
        app.get_authorized(&format!("/conversations/{missing}?limit=1"), &alice)
            .await
            .assert_error(StatusCode::NOT_FOUND, "not_found");
    }
}

#[tokio::test]
async fn someone_elses_or_an_unknown_conversation_is_404_and_charges_nothing() {
    let app = TestApp::new().await;
    let alice = app.user_with_token("alice").await;
    let bob = app.user_with_token("bob").await;
    let hers = app.chat(&alice, "secret plans").await.json["conversation_id"].clone();
    let path = format!("/conversations/{hers}");
    for refused in [
        chat_in(&app, &bob, &hers, "let me in").await,
        chat_in(&app, &bob, &json!(999_999), "nowhere").await,
        app.get_authorized(&path, &bob).await,
        delete(&app, &bob, &path).await,
        app.get_authorized("/conversations/999999", &alice).await,
        app.get_authorized("/conversations/abc", &alice).await,
        // Not even text once percent-decoded: as much not a conversation as "abc".
        app.get_authorized("/conversations/%FF", &alice).await,
        delete(&app, &alice, "/conversations/%FF").await,
    ] {
        refused.assert_error(StatusCode::NOT_FOUND, "not_found");
        // The route is there: what is missing is the conversation.
        assert_eq!(refused.json["error"], "nothing of yours has this id");
    }
    assert_eq!(app.balance(&bob).await, 4000);
    assert_eq!(app.llm.calls(), 1);
    let listed = app.get_authorized("/conversations", &bob).await;
    assert_eq!(listed.json["conversations"], json!([]));
    // Still hers, untouched.
    let shown = app.get_authorized(&path, &alice).await;
    assert_eq!(shown.json["chats"][0]["message"], "secret plans");
    app.assert_all_settled().await;
}

#[tokio::test]
async fn a_conversation_shows_its_chats_oldest_first_a_page_at_a_time() {
    let app = TestApp::new().await;
    let token = app.user_with_token("user").await;
    let first = app.chat(&token, "one").await;
    let conversation = first.json["conversation_id"].clone();
    for message in ["two", "three"] {
        chat_in(&app, &token, &conversation, message).await;
    }
    let path = format!("/conversations/{conversation}");
    let page = app.get_authorized(&format!("{path}?limit=2"), &token).await;
    assert_eq!(page.status, StatusCode::OK, "{page:?}");
    assert_eq!(page.json["id"], conversation);
    assert_eq!(page.json["title"], "one");
    let messages: Vec<&Value> = page.json["chats"]
        .as_array()
        .unwrap()
        .iter()
        .map(|chat| &chat["message"])
        .collect();
    assert_eq!(messages, ["one", "two"]);
    let next = page.json["next"].as_str().unwrap();
    let rest = app
        .get_authorized(&format!("{path}?limit=2&cursor={next}"), &token)
        .await;
    assert_eq!(rest.json["chats"][0]["message"], "three");
    assert_eq!(rest.json["chats"][0]["response"], "Echo: three");
    assert_eq!(rest.json["next"], Value::Null);
}

/// The chats of the database that still hold any text of a message or an answer.
async fn chats_with_text(app: &TestApp) -> i64 {
    tokenchat::db_run!(&app.state.db, pool => sqlx::query_scalar(
        "SELECT COUNT(*) FROM chats WHERE message <> '' OR response IS NOT NULL
                                          OR tool_calls IS NOT NULL")
        .fetch_one(pool)
        .await)
    .unwrap()
}

#[tokio::test]
async fn a_conversation_deleted_while_its_chat_is_answered_keeps_none_of_that_chats_text() {
    let flat = TestApp::new().await;
    let charged = delete_while_answering(&flat).await;
    assert_eq!(charged, 100);
    // Priced, the settlement that charges the usage is another statement.
    let priced = crate::prices::priced_app(&[]).await;
    let charged = delete_while_answering(&priced).await;
    assert!(charged > 0);
}

/// Deletes a conversation while its second chat waits for the model; checks that the chat
/// is answered and charged but none of its text stored, and returns its charge.
async fn delete_while_answering(app: &TestApp) -> i64 {
    let token = app.user_with_token("user").await;
    let first = app.chat(&token, "a first secret").await;
    let conversation = first.json["conversation_id"].clone();
    let path = format!("/conversations/{conversation}");
    app.llm.set_reply(Reply::Stall(Duration::from_millis(500)));
    let (answered, deleted) = tokio::join!(
        chat_in(app, &token, &conversation, "a second secret"),
        async {
            // Deleted once the second chat is reserved and waiting for the model.
            for _ in 0..1000 {
                if app.llm.calls() >= 2 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            assert_eq!(
                app.llm.calls(),
                2,
                "the second chat never reached the model"
            );
            delete(app, &token, &path).await
        }
    );
    assert_eq!(deleted.status, StatusCode::NO_CONTENT);
    // Its client is answered and charged, as any chat in flight is.
    assert_eq!(answered.status, StatusCode::OK, "{answered:?}");
    assert_eq!(answered.json["response"], "Echo: a second secret");
    let charged = answered.json["tokens_charged"].as_i64().unwrap();
    let first_charged = first.json["tokens_charged"].as_i64().unwrap();
    assert_eq!(app.balance(&token).await, 4000 - first_charged - charged);
    // The answer that came after the deletion is not stored: the erasure holds.
    assert_eq!(chats_with_text(app).await, 0);
    app.assert_all_settled().await;
    charged
}

#[tokio::test]
async fn deleting_a_conversation_erases_its_text_but_keeps_the_charges_and_the_audit() {
    let app = TestApp::new().await;
    let token = app.user_with_token("user").await;
    let kept = app.chat(&token, "keep me").await;
    let doomed = app.chat(&token, "forget me").await;
    let conversation = doomed.json["conversation_id"].clone();
    chat_in(&app, &token, &conversation, "and me").await;
    let ledger_before = app
        .get_authorized("/transactions?limit=100", &token)
        .await
        .json;

    let path = format!("/conversations/{conversation}");
    let deleted = delete(&app, &token, &path).await;
    assert_eq!(deleted.status, StatusCode::NO_CONTENT);
    assert_eq!(deleted.tokens_remaining(), 3700);
    delete(&app, &token, &path)
        .await
        .assert_error(StatusCode::NOT_FOUND, "not_found");
    app.get_authorized(&path, &token)
        .await
        .assert_error(StatusCode::NOT_FOUND, "not_found");
    app.get_authorized(&format!("/chats/{}", doomed.json["chat_id"]), &token)
        .await
        .assert_error(StatusCode::NOT_FOUND, "not_found");

    let chats = app.get_authorized("/chats", &token).await.json;
    let chats = chats["chats"].as_array().unwrap();
    assert_eq!(chats.len(), 1);
    assert_eq!(chats[0]["id"], kept.json["chat_id"]);
    let conversations = app.get_authorized("/conversations", &token).await.json;
    assert_eq!(conversations["conversations"].as_array().unwrap().len(), 1);
    // Money history is never deleted.
    let ledger_after = app
        .get_authorized("/transactions?limit=100", &token)
        .await
        .json;
    assert_eq!(ledger_after, ledger_before);
    assert_eq!(app.balance(&token).await, 3700);
    // The text is gone from the database, not only hidden.
    let left: i64 = tokenchat::db_run!(&app.state.db, pool => sqlx::query_scalar(
        "SELECT COUNT(*) FROM chats WHERE message LIKE '%me' OR response LIKE '%me'")
        .fetch_one(pool)
        .await)
    .unwrap();
    assert_eq!(left, 1, "only the kept chat still holds its text");
    app.assert_all_settled().await;
    // Nor on disk: not in the file's free pages, nor in its write-ahead log.
    let Some(file) = app.database.sqlite_file() else {
        println!("on PostgreSQL the erased rows stay in the server's files until its vacuum");
        return;
    };
    let mut on_disk = Vec::new();
    for suffix in ["", "-wal"] {
        let path = format!("{}{suffix}", file.display());
        on_disk.extend(std::fs::read(path).unwrap_or_default());
    }
    assert!(on_disk.len() > 4096);
    let kept: &[u8] = b"Echo: keep me";
    assert!(on_disk.windows(kept.len()).any(|window| window == kept));
    for erased in [&b"forget me"[..], b"and me"] {
        assert!(
            !on_disk.windows(erased.len()).any(|window| window == erased),
            "{} is still on disk",
            String::from_utf8_lossy(erased)
        );
    }
}

#[tokio::test]
async fn a_repeated_key_in_another_conversation_is_a_reuse() {
    let app = TestApp::new().await;
    let token = app.user_with_token("user").await;
    let first = app.chat_with_key(&token, "k1", "hello").await;
    assert_eq!(first.status, StatusCode::OK);
    let authorization = format!("Token {token}");
    let elsewhere = app
        .request(
            Method::POST,
            "/chat",
            &[
                ("content-type", "application/json"),
                ("authorization", &authorization),
                ("idempotency-key", "k1"),
            ],
            json!({ "message": "hello", "conversation_id": first.json["conversation_id"] })
                .to_string(),
        )
        .await;
    elsewhere.assert_error(StatusCode::UNPROCESSABLE_ENTITY, "idempotency_key_reused");
    let replayed = app.chat_with_key(&token, "k1", "hello").await;
    assert_eq!(
        replayed.json["conversation_id"],
        first.json["conversation_id"]
    );
    assert_eq!(app.balance(&token).await, 3900);
}
