//! The chat history and the transactions, page by page: every row once, newest first,
//! private to their owner, with validated page parameters.

use crate::common::TestApp;
use axum::http::StatusCode;
use serde_json::{json, Value};

/// Follows `next` from the first page of `route` to the last; the ids of every row seen.
async fn walk_pages(app: &TestApp, token: &str, route: &str, rows: &str, limit: usize) -> Vec<i64> {
    let mut seen = Vec::new();
    let mut path = format!("{route}?limit={limit}");
    loop {
        let page = app.get_authorized(&path, token).await;
        assert_eq!(page.status, StatusCode::OK, "{page:?}");
        let items = page.json[rows].as_array().unwrap();
        assert!(items.len() <= limit);
        seen.extend(items.iter().map(|item| item["id"].as_i64().unwrap()));
        match page.json["next"].as_str() {
            Some(next) => path = format!("{route}?limit={limit}&cursor={next}"),
            None => return seen,
        }
    }
}

async fn ids_newest_first(app: &TestApp, table: &str) -> Vec<i64> {
    tokenchat::db_run!(&app.state.db, pool => sqlx::query_scalar(&format!("SELECT id FROM {table} ORDER BY id DESC"))
        .fetch_all(pool)
        .await)
        .unwrap()
}

#[tokio::test]
async fn chat_history_pages_cover_every_chat_once_newest_first() {
    let app = TestApp::with_env(&[("INITIAL_TOKENS", "100000")]).await;
    let token = app.user_with_token("user").await;
    for i in 0..23 {
        let message = if i % 4 == 0 {
            format!("[fail] {i}")
        } else {
            format!("question {i}")
        };
        app.chat(&token, &message).await;
    }
    let seen = walk_pages(&app, &token, "/chats/", "chats", 7).await;
    assert_eq!(seen, ids_newest_first(&app, "chats").await);

    let newest = app.get_authorized("/chats?limit=1", &token).await.json["chats"][0].clone();
    assert_eq!(newest["message"], "question 22");
    assert_eq!(newest["response"], "Echo: question 22");
    assert_eq!(newest["status"], "answered");
    assert_eq!(newest["tokens_charged"], 100);
    assert!(newest["created_at"].as_str().unwrap().ends_with('Z'));
    assert!(newest["finished_at"].as_str().unwrap().ends_with('Z'));

    let failed = app.get_authorized("/chats?limit=100", &token).await.json["chats"]
        .as_array()
        .unwrap()
        .iter()
        .find(|chat| chat["message"] == "[fail] 20")
        .cloned()
        .unwrap();
    assert_eq!(
        (failed["status"].as_str(), failed["tokens_charged"].as_i64()),
        (Some("failed"), Some(0))
    );
    assert_eq!(failed["response"], Value::Null);
}

#[tokio::test]
async fn transaction_pages_cover_every_ledger_row_once() {
    let app = TestApp::new().await;
    let token = app.user_with_token("user").await;
    for i in 0..9 {
        app.chat(&token, if i % 3 == 0 { "[fail] x" } else { "fine" })
            .await;
    }
    let seen = walk_pages(&app, &token, "/transactions", "transactions", 4).await;
    assert_eq!(seen, ids_newest_first(&app, "ledger").await);
    assert_eq!(seen.len(), 1 + 9 + 3);
}

#[tokio::test]
async fn no_user_can_see_another_users_chats_or_transactions() {
    let app = TestApp::new().await;
    let alice = app.user_with_token("alice").await;
    let bob = app.user_with_token("bob").await;
    let alices_chat = app.chat(&alice, "alice's secret").await.json["chat_id"]
        .as_i64()
        .unwrap();

    let mine = app
        .get_authorized(&format!("/chats/{alices_chat}/"), &alice)
        .await;
    assert_eq!(mine.json["message"], "alice's secret");
    for path in [
        format!("/chats/{alices_chat}"),
        "/chats/0".into(),
        "/chats/abc".into(),
        "/chats/%FF".into(),
    ] {
        app.get_authorized(&path, &bob)
            .await
            .assert_error(StatusCode::NOT_FOUND, "not_found");
    }
    assert_eq!(
        app.get_authorized("/chats", &bob).await.json["chats"],
        json!([])
    );
    let bobs_rows = app.get_authorized("/transactions", &bob).await.json["transactions"].clone();
    assert_eq!(bobs_rows.as_array().unwrap().len(), 1);
    assert_eq!(bobs_rows[0]["reason"], "initial_grant");
}

#[tokio::test]
async fn page_parameters_are_validated() {
    let app = TestApp::new().await;
    let token = app.user_with_token("user").await;
    for (query, field) in [
        ("limit=0", "limit"),
        ("limit=101", "limit"),
        ("limit=ten", "limit"),
        ("cursor=abc", "cursor"),
        ("cursor=-4", "cursor"),
    ] {
        for route in ["/chats", "/transactions"] {
            let response = app
                .get_authorized(&format!("{route}?{query}"), &token)
                .await;
            response.assert_error(StatusCode::BAD_REQUEST, "invalid_input");
            assert_eq!(response.json["field"], field);
        }
    }
    let full = app.get_authorized("/transactions?limit=100", &token).await;
    assert_eq!(full.status, StatusCode::OK);
}
