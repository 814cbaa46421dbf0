//! Limits per API key (issue 27): the models a key may ask for, refused with 403
//! `model_not_allowed` before the model is called and before anything is reserved; an
//! expiry past which the key is refused like a revoked one; a budget a period, never
//! passed whatever the concurrency, with 402 `budget_exceeded` beyond it. Set at creation,
//! changed with `PATCH /keys/{id}` (`null` removes one) and shown by `GET /keys`; requests a
//! minute, counted in the database, with OpenAI's `x-ratelimit-*` headers under `/v1`.
//! Model tokens a minute are in `token_rates.rs`, a user's limits in `user_limits.rs`.

use axum::http::StatusCode;
use serde_json::{json, Value};

use super::patch_key;
use crate::{
    common::{TestApp, TestResponse},
    openai::completions,
};

async fn embed(app: &TestApp, key: &str, model: &str) -> TestResponse {
    app.post_authorized(
        "/v1/embeddings",
        key,
        json!({ "model": model, "input": "hello" }),
    )
    .await
}

#[tokio::test]
async fn a_key_limited_to_some_models_is_refused_the_others_before_the_model_is_called() {
    let app = TestApp::with_env(&[("LLM_MODELS", "other,third")]).await;
    let token = app.user_with_token("user").await;
    let created = app
        .post_authorized(
            "/keys",
            &token,
            json!({ "name": "agent", "models": ["other", "other"] }),
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{created:?}");
    let key = created.json["key"].as_str().unwrap().to_string();
    let ask = |model: &'static str| {
        completions(
            &app,
            &key,
            json!({ "model": model, "messages": [{ "role": "user", "content": "hi" }] }),
        )
    };
    let refused = ask("llama3.2").await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN, "{refused:?}");
    assert_eq!(refused.json["error"]["code"], "model_not_allowed");
    assert_eq!(refused.json["error"]["type"], "permission_error");
    assert_eq!(refused.json["error"]["param"], "model");
    let refused_embedding = embed(&app, &key, "third").await;
    assert_eq!(refused_embedding.status, StatusCode::FORBIDDEN);
    // /chat asks for LLM_MODEL, which this key may not use.
    let chat = app.chat(&key, "hello").await;
    chat.assert_error(StatusCode::FORBIDDEN, "model_not_allowed");
    assert_eq!(app.llm.calls(), 0, "refused before the model is called");
    assert_eq!(app.balance(&token).await, 4000);
    let chats = app.get_authorized("/chats", &token).await;
    assert_eq!(chats.json["chats"], json!([]), "nothing reserved");
    let allowed = ask("other").await;
    assert_eq!(allowed.status, StatusCode::OK, "{allowed:?}");
    let listed = app.get_authorized("/v1/models", &key).await;
    let ids: Vec<&str> = listed.json["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|model| model["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["other"], "a key sees the models it may use");
    // A login token is limited by nothing.
    assert_eq!(app.chat(&token, "hello").await.status, StatusCode::OK);
    let keys = app.get_authorized("/keys", &token).await;
    assert_eq!(keys.json["keys"][0]["models"], json!(["other"]), "{keys:?}");
    assert_eq!(keys.json["keys"][0]["expires_at"], Value::Null);
}

#[tokio::test]
async fn patch_changes_removes_and_keeps_limits_and_an_expired_key_is_refused() {
    let app = TestApp::new().await;
    let token = app.user_with_token("user").await;
    let created = app
        .post_authorized(
            "/keys",
            &token,
            json!({ "name": "ci", "expires_at": "2999-01-01T00:00:00+02:00" }),
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{created:?}");
    let id = created.json["id"].as_i64().unwrap();
    let key = created.json["key"].as_str().unwrap().to_string();
    let listed = app.get_authorized("/keys", &token).await;
    assert_eq!(listed.json["keys"][0]["expires_at"], "2998-12-31T22:00:00Z");
    assert_eq!(app.chat(&key, "hello").await.status, StatusCode::OK);

    let limited = patch_key(&app, &token, id, json!({ "models": ["llama3.2"] })).await;
    assert_eq!(limited.status, StatusCode::OK, "{limited:?}");
    assert_eq!(limited.json["models"], json!(["llama3.2"]));
    assert_eq!(limited.json["expires_at"], "2998-12-31T22:00:00Z", "kept");
    let expired = patch_key(
        &app,
        &token,
        id,
        json!({ "expires_at": "2020-01-01T00:00:00Z" }),
    )
    .await;
    assert_eq!(expired.json["models"], json!(["llama3.2"]), "kept");
    let refused = app.chat(&key, "hello").await;
    refused.assert_error(StatusCode::UNAUTHORIZED, "unauthorized");
    let removed = patch_key(
        &app,
        &token,
        id,
        json!({ "expires_at": null, "models": null }),
    )
    .await;
    assert_eq!(removed.status, StatusCode::OK);
    assert_eq!(
        (&removed.json["expires_at"], &removed.json["models"]),
        (&Value::Null, &Value::Null)
    );
    assert_eq!(app.chat(&key, "hello again").await.status, StatusCode::OK);
    assert_eq!(app.balance(&token).await, 3800);

    // A key cannot change keys, and nobody changes someone else's.
    let by_key = patch_key(&app, &key, id, json!({ "models": null })).await;
    by_key.assert_error(StatusCode::FORBIDDEN, "forbidden");
    let other = app.user_with_token("other").await;
    let theirs = patch_key(&app, &other, id, json!({ "models": null })).await;
    theirs.assert_error(StatusCode::NOT_FOUND, "not_found");
}

#[tokio::test]
async fn a_bad_limit_is_refused_naming_its_field() {
    let app = TestApp::new().await;
    let token = app.user_with_token("user").await;
    for (body, field) in [
        (json!({ "name": "k", "models": ["gpt-9"] }), "models"),
        (json!({ "name": "k", "models": [] }), "models"),
        (
            json!({ "name": "k", "expires_at": "tomorrow" }),
            "expires_at",
        ),
        (
            json!({ "name": "k", "budget": { "tokens": 100, "period": "fortnight" } }),
            "budget",
        ),
        (
            json!({ "name": "k", "budget": { "tokens": 0, "period": "day" } }),
            "budget",
        ),
        (json!({ "name": "k", "rpm": 0 }), "rpm"),
        (json!({ "name": "k", "tpm": 0 }), "tpm"),
        (json!({ "name": "k", "tpm": 10_000_000_001_i64 }), "tpm"),
    ] {
        let refused = app.post_authorized("/keys", &token, body.clone()).await;
        assert_eq!(
            refused.status,
            StatusCode::BAD_REQUEST,
            "{body}: {refused:?}"
        );
        refused.assert_error(StatusCode::BAD_REQUEST, "invalid_input");
        assert_eq!(refused.json["field"], field, "{body}: {refused:?}");
    }
    let none = app.get_authorized("/keys", &token).await;
    assert_eq!(none.json["keys"], json!([]), "nothing created");
    let created = app
        .post_authorized("/keys", &token, json!({ "name": "k", "rpm": null }))
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "null is no limit");
    let id = created.json["id"].as_i64().unwrap();
    let refused = patch_key(&app, &token, id, json!({ "tpm": -5 })).await;
    assert_eq!(refused.json["field"], "tpm", "{refused:?}");
}

/// A user with a balance for 1,000 chats and a key whose budget of `tokens` a `period` is
/// `CHAT_COST` (100) times what it buys.
async fn budgeted_key(app: &TestApp, tokens: i64, period: &str) -> (String, i64, String) {
    let token = app.user_with_token("user").await;
    let grant = tokenchat::domain::GrantAmount::parse(96_000).unwrap();
    let name = tokenchat::domain::Username::parse("user").unwrap();
    tokenchat::services::accounts::grant(&app.state.db, &name, grant)
        .await
        .unwrap();
    let created = app
        .post_authorized(
            "/keys",
            &token,
            json!({ "name": "agent", "budget": { "tokens": tokens, "period": period } }),
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{created:?}");
    let key = created.json["key"].as_str().unwrap().to_string();
    (token, created.json["id"].as_i64().unwrap(), key)
}

#[tokio::test]
async fn two_hundred_concurrent_chats_on_a_key_whose_budget_covers_thirty_answer_thirty() {
    let app = TestApp::new().await;
    let (token, _, key) = budgeted_key(&app, 3_000, "total").await;
    let chats = futures_util::future::join_all((0..200).map(|n| {
        let (app, key) = (&app, &key);
        async move { app.chat(key, &format!("n{n}")).await }
    }))
    .await;
    let answered = chats
        .iter()
        .filter(|chat| chat.status == StatusCode::OK)
        .count();
    assert_eq!(answered, 30);
    for refused in chats.iter().filter(|chat| chat.status != StatusCode::OK) {
        refused.assert_error(StatusCode::PAYMENT_REQUIRED, "budget_exceeded");
        assert_eq!(
            refused.json["resets_at"],
            Value::Null,
            "a total budget never resets"
        );
    }
    assert_eq!(app.llm.calls(), 30, "the refused never reached the model");
    assert_eq!(app.balance(&token).await, 100_000 - 3_000);
    let keys = app.get_authorized("/keys", &token).await;
    let listed = &keys.json["keys"][0];
    assert_eq!(
        listed["budget"],
        json!({ "tokens": 3000, "period": "total" })
    );
    assert_eq!(
        (&listed["spent"], &listed["resets_at"]),
        (&json!(3000), &Value::Null)
    );
    // A login token is not held by the key's budget.
    assert_eq!(app.chat(&token, "mine").await.status, StatusCode::OK);
    app.assert_audit_passes().await;
    // The audit checks the key's spending against its calls.
    app.assert_audit_finds_after(
        "UPDATE api_keys SET budget_spent = budget_spent - 100",
        "has 2900 spent this period but its calls hold 3000",
    )
    .await;
}

#[tokio::test]
async fn a_refunded_call_gives_its_budget_back_and_embeddings_count_against_it() {
    let app = TestApp::new().await;
    let (token, id, key) = budgeted_key(&app, 201, "day").await;
    app.llm.set_reply(crate::common::Reply::Status(500));
    let failed = app.chat(&key, "fails").await;
    failed.assert_error(StatusCode::BAD_GATEWAY, "upstream_error");
    app.llm.set_reply(crate::common::Reply::Echo);
    for n in 0..2 {
        assert_eq!(
            app.chat(&key, &format!("n{n}")).await.status,
            StatusCode::OK
        );
    }
    let spent = |keys: &TestResponse| keys.json["keys"][0]["spent"].clone();
    assert_eq!(spent(&app.get_authorized("/keys", &token).await), 200);
    // One token left: an embeddings call (EMBEDDING_COST 1) fits, the next does not.
    assert_eq!(embed(&app, &key, "llama3.2").await.status, StatusCode::OK);
    let over = embed(&app, &key, "llama3.2").await;
    assert_eq!(over.status, StatusCode::PAYMENT_REQUIRED, "{over:?}");
    assert_eq!(over.json["error"]["code"], "budget_exceeded");
    let day = 24 * 60 * 60;
    let tomorrow = (tokenchat::rfc3339((tokenchat::db::unix_now() / day + 1) * day)).to_string();
    assert_eq!(over.json["error"]["resets_at"], tomorrow.as_str());
    let refused = app.chat(&key, "over").await;
    refused.assert_error(StatusCode::PAYMENT_REQUIRED, "budget_exceeded");
    assert_eq!(refused.json["resets_at"], tomorrow.as_str());
    let keys = app.get_authorized("/keys", &token).await;
    assert_eq!(
        (spent(&keys), &keys.json["keys"][0]["resets_at"]),
        (json!(201), &json!(tomorrow))
    );

    // The period rolls over: as if the key and its calls above were yesterday's.
    for table in ["api_keys", "chats", "embeddings"] {
        let column = if table == "api_keys" {
            "id"
        } else {
            "api_key_id"
        };
        let yesterday = format!(
            "UPDATE {table} SET budget_period_start = budget_period_start - 86400
             WHERE {column} = $1"
        );
        tokenchat::db_run!(&app.state.db, pool => sqlx::query(&yesterday)
            .bind(id)
            .execute(pool)
            .await
            .map(|_| ()))
        .unwrap();
    }
    assert_eq!(
        spent(&app.get_authorized("/keys", &token).await),
        0,
        "a new day"
    );
    assert_eq!(app.chat(&key, "today").await.status, StatusCode::OK);
    assert_eq!(spent(&app.get_authorized("/keys", &token).await), 100);
    // A bigger budget from now on: the day's spending is kept.
    let raised = patch_key(
        &app,
        &token,
        id,
        json!({ "budget": { "tokens": 1000, "period": "day" } }),
    )
    .await;
    assert_eq!(
        (&raised.json["spent"], &raised.json["budget"]["tokens"]),
        (&json!(100), &json!(1000))
    );
    let lifted = patch_key(&app, &token, id, json!({ "budget": null })).await;
    assert_eq!(lifted.json["budget"], Value::Null);
    assert!(lifted.json.get("spent").is_none(), "{lifted:?}");
    app.assert_audit_passes().await;
}

#[tokio::test]
async fn a_keys_requests_a_minute_are_counted_across_its_routes_with_openais_headers() {
    let app = TestApp::new().await;
    let token = app.user_with_token("user").await;
    let created = app
        .post_authorized("/keys", &token, json!({ "name": "agent", "rpm": 3 }))
        .await;
    let (id, key) = (
        created.json["id"].as_i64().unwrap(),
        created.json["key"].as_str().unwrap().to_string(),
    );
    let ask = || {
        completions(
            &app,
            &key,
            json!({ "model": "llama3.2", "messages": [{ "role": "user", "content": "hi" }] }),
        )
    };
    for remaining in ["2", "1"] {
        let answered = ask().await;
        assert_eq!(answered.status, StatusCode::OK, "{answered:?}");
        assert_eq!(answered.headers["x-ratelimit-limit-requests"], "3");
        assert_eq!(
            answered.headers["x-ratelimit-remaining-requests"],
            remaining
        );
        let reset = answered.headers["x-ratelimit-reset-requests"]
            .to_str()
            .unwrap();
        assert!(reset.ends_with('s'), "{reset}");
    }
    // The third of the minute on /chat: the key's minute is one, whatever the route.
    assert_eq!(app.chat(&key, "third").await.status, StatusCode::OK);
    let refused = ask().await;
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS, "{refused:?}");
    assert_eq!(refused.json["error"]["code"], "rate_limit_exceeded");
    assert_eq!(refused.headers["x-ratelimit-remaining-requests"], "0");
    assert_eq!(refused.headers["x-ratelimit-limit-requests"], "3");
    let wait: u64 = refused.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=20).contains(&wait), "{wait}");
    let chat = app.chat(&key, "fourth").await;
    chat.assert_error(StatusCode::TOO_MANY_REQUESTS, "rate_limited");
    assert_eq!(app.llm.calls(), 3, "the refused never reached the model");
    assert_eq!(app.balance(&token).await, 4000 - 300);
    let keys = app.get_authorized("/keys", &token).await;
    assert_eq!(keys.json["keys"][0]["rpm"], 3);
    let lifted = patch_key(&app, &token, id, json!({ "rpm": null })).await;
    assert_eq!(lifted.json["rpm"], Value::Null);
    let free = ask().await;
    assert_eq!(free.status, StatusCode::OK);
    assert!(!free.headers.contains_key("x-ratelimit-limit-requests"));
}

#[tokio::test]
async fn a_keys_requests_a_minute_count_every_request_it_makes_whatever_the_route() {
    let app = TestApp::new().await;
    let token = app.user_with_token("user").await;
    let created = app
        .post_authorized("/keys", &token, json!({ "name": "agent", "rpm": 2 }))
        .await;
    let key = created.json["key"].as_str().unwrap().to_string();
    assert_eq!(
        app.get_authorized("/balance", &key).await.status,
        StatusCode::OK
    );
    let models = app.get_authorized("/v1/models", &key).await;
    assert_eq!(models.status, StatusCode::OK);
    let refused = app.get_authorized("/balance", &key).await;
    refused.assert_error(StatusCode::TOO_MANY_REQUESTS, "rate_limited");
    assert!(refused.headers.contains_key("retry-after"));
    assert_eq!(refused.headers["x-ratelimit-remaining-requests"], "0");
    app.chat(&key, "hi")
        .await
        .assert_error(StatusCode::TOO_MANY_REQUESTS, "rate_limited");
    assert_eq!(app.llm.calls(), 0);
    // The owner's login token is not the key.
    assert_eq!(app.chat(&token, "hi").await.status, StatusCode::OK);
}

#[tokio::test]
async fn a_mistyped_limit_is_refused_naming_it_rather_than_making_a_key_without_it() {
    let app = TestApp::new().await;
    let token = app.user_with_token("user").await;
    for (body, named) in [
        (
            json!({ "name": "k", "budgets": { "tokens": 100, "period": "day" } }),
            "budgets",
        ),
        (json!({ "name": "k", "rmp": 5 }), "rmp"),
        (
            json!({ "name": "k", "budget": { "tokens": 100, "period": "day", "hard": true } }),
            "hard",
        ),
    ] {
        let refused = app.post_authorized("/keys", &token, body.clone()).await;
        refused.assert_error(StatusCode::BAD_REQUEST, "invalid_json");
        let said = refused.json["error"].as_str().unwrap();
        assert!(said.contains(named), "{body}: {said}");
    }
    let none = app.get_authorized("/keys", &token).await;
    assert_eq!(none.json["keys"], json!([]), "nothing created");
    let created = app
        .post_authorized("/keys", &token, json!({ "name": "k" }))
        .await;
    let id = created.json["id"].as_i64().unwrap();
    let refused = patch_key(&app, &token, id, json!({ "tmp": 5 })).await;
    refused.assert_error(StatusCode::BAD_REQUEST, "invalid_json");
    assert!(refused.json["error"].as_str().unwrap().contains("tmp"));
}

#[tokio::test]
async fn a_call_short_of_both_its_balance_and_its_keys_budget_is_refused_for_its_balance() {
    let app = TestApp::with_env(&[("INITIAL_TOKENS", "60")]).await;
    let token = app.user_with_token("user").await;
    let created = app
        .post_authorized(
            "/keys",
            &token,
            json!({ "name": "agent", "budget": { "tokens": 50, "period": "total" } }),
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{created:?}");
    let key = created.json["key"].as_str().unwrap();
    // A chat costs 100: over the key's budget of 50 and the balance of 60 alike. The balance
    // is what the payer can do something about, so it is what the answer names, on both
    // backends.
    let short = app.chat(key, "hello").await;
    short.assert_error(StatusCode::PAYMENT_REQUIRED, "out_of_tokens");
    assert_eq!(short.json["tokens"], 60, "{short:?}");
    let v1 = completions(
        &app,
        key,
        json!({ "model": "llama3.2", "messages": [{ "role": "user", "content": "hi" }] }),
    )
    .await;
    assert_eq!(v1.status, StatusCode::PAYMENT_REQUIRED, "{v1:?}");
    assert_eq!(v1.json["error"]["code"], "insufficient_quota", "{v1:?}");
    assert_eq!(v1.json["error"]["tokens"], 60, "{v1:?}");
    assert_eq!(app.llm.calls(), 0);
    assert_eq!(app.balance(&token).await, 60);
    let keys = app.get_authorized("/keys", &token).await;
    assert_eq!(keys.json["keys"][0]["spent"], 0, "{keys:?}");
    app.assert_audit_passes().await;
}
