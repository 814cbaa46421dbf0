//! API keys: created with a login token, shown once, stored as hashes, accepted wherever a
//! login token is, listed by prefix, and refused once revoked.

use axum::http::{Method, StatusCode};
use serde_json::{json, Value};

use crate::common::{TestApp, TestResponse};

async fn create_key(app: &TestApp, credential: &str, name: &str) -> TestResponse {
    app.post_authorized("/keys", credential, json!({ "name": name }))
        .await
}

async fn new_key(app: &TestApp, token: &str, name: &str) -> (i64, String) {
    let created = create_key(app, token, name).await;
    assert_eq!(created.status, StatusCode::CREATED, "{created:?}");
    (
        created.json["id"].as_i64().unwrap(),
        created.json["key"].as_str().unwrap().to_string(),
    )
}

async fn delete_key(app: &TestApp, credential: &str, id: &Value) -> TestResponse {
    let authorization = format!("Bearer {credential}");
    app.request(
        Method::DELETE,
        &format!("/keys/{id}"),
        &[("authorization", &authorization)],
        "",
    )
    .await
}

#[tokio::test]
async fn a_key_is_shown_once_stored_as_its_hash_and_works_like_a_login_token() {
    let app = TestApp::new().await;
    let token = app.user_with_token("user").await;
    let created = create_key(&app, &token, "laptop").await;
    assert_eq!(created.status, StatusCode::CREATED);
    let key = created.json["key"].as_str().unwrap().to_string();
    assert!(key.starts_with("tc_") && key.len() == 43, "{key}");
    assert!(key[3..].bytes().all(|byte| byte.is_ascii_alphanumeric()));
    assert_eq!(created.json["name"], "laptop");
    assert!(created.json["created_at"].as_str().unwrap().ends_with('Z'));

    let stored: Vec<String> = tokenchat::db_run!(&app.state.db, pool => sqlx::query_scalar(
        "SELECT key_hash FROM api_keys")
        .fetch_all(pool)
        .await)
    .unwrap();
    assert_eq!(stored, [tokenchat::services::sha256_hex(key.as_bytes())]);

    // Every form of the Authorization header, on every kind of route.
    for authorization in [format!("Bearer {key}"), format!("Token {key}"), key.clone()] {
        let balance = app
            .request(
                Method::GET,
                "/balance",
                &[("authorization", &authorization)],
                "",
            )
            .await;
        assert_eq!(balance.status, StatusCode::OK, "{balance:?}");
    }
    let chat = app.chat(&key, "hello").await;
    assert_eq!(chat.status, StatusCode::OK);
    assert_eq!(chat.json["tokens"], 3900);
    assert_eq!(chat.tokens_remaining(), 3900);
    assert_eq!(
        app.get_authorized("/chats", &key).await.json["chats"][0]["message"],
        "hello"
    );

    let listed = app.get_authorized("/keys", &token).await;
    assert_eq!(listed.status, StatusCode::OK);
    let keys = listed.json["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 1);
    assert_eq!(keys[0]["id"], created.json["id"]);
    assert_eq!(keys[0]["prefix"], key[..7]);
    assert!(keys[0]["last_used_at"].is_string(), "{listed:?}");
    assert!(
        !listed.json.to_string().contains(&key[7..]),
        "the key itself is never listed"
    );
}

#[tokio::test]
async fn a_key_cannot_manage_keys_or_the_account() {
    let app = TestApp::new().await;
    let token = app.user_with_token("user").await;
    let (id, key) = new_key(&app, &token, "ci").await;
    create_key(&app, &key, "another")
        .await
        .assert_error(StatusCode::FORBIDDEN, "forbidden");
    app.get_authorized("/keys", &key)
        .await
        .assert_error(StatusCode::FORBIDDEN, "forbidden");
    delete_key(&app, &key, &json!(id))
        .await
        .assert_error(StatusCode::FORBIDDEN, "forbidden");
    for logout in ["/logout", "/logout/", "/logout/all", "/logout/all/"] {
        app.post_authorized(logout, &key, json!({}))
            .await
            .assert_error(StatusCode::FORBIDDEN, "forbidden");
    }
    app.post_authorized(
        "/password",
        &key,
        json!({ "old_password": "pass123", "new_password": "another-one" }),
    )
    .await
    .assert_error(StatusCode::FORBIDDEN, "forbidden");
    // Still live and still the only one, and the owner is still signed in.
    assert_eq!(app.balance(&key).await, 4000);
    assert_eq!(app.balance(&token).await, 4000);
    assert_eq!(
        app.get_authorized("/keys", &token).await.json["keys"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
}

#[tokio::test]
async fn a_revoked_key_is_refused_and_no_longer_listed() {
    let app = TestApp::new().await;
    let token = app.user_with_token("user").await;
    let (id, key) = new_key(&app, &token, "old").await;
    let (_, kept) = new_key(&app, &token, "kept").await;
    let deleted = delete_key(&app, &token, &json!(id)).await;
    assert_eq!(deleted.status, StatusCode::NO_CONTENT);
    app.get_authorized("/balance", &key)
        .await
        .assert_error(StatusCode::UNAUTHORIZED, "unauthorized");
    app.chat(&key, "hello")
        .await
        .assert_error(StatusCode::UNAUTHORIZED, "unauthorized");
    delete_key(&app, &token, &json!(id))
        .await
        .assert_error(StatusCode::NOT_FOUND, "not_found");
    let keys = app.get_authorized("/keys", &token).await.json;
    assert_eq!(keys["keys"].as_array().unwrap().len(), 1);
    assert_eq!(keys["keys"][0]["name"], "kept");
    assert_eq!(app.balance(&kept).await, 4000);
    // Logging out the login token does not revoke keys.
    app.post_authorized("/logout", &token, json!({})).await;
    assert_eq!(app.balance(&kept).await, 4000);
}

#[tokio::test]
async fn a_key_change_it_cannot_read_is_400_before_its_key_id_is_looked_at() {
    let app = TestApp::new().await;
    let token = app.user_with_token("user").await;
    let (id, _) = new_key(&app, &token, "laptop").await;
    let patch = |id: String, body: &'static str| {
        let authorization = format!("Bearer {token}");
        let app = &app;
        async move {
            let headers = [
                ("authorization", authorization.as_str()),
                ("content-type", "application/json"),
            ];
            app.request(Method::PATCH, &format!("/keys/{id}"), &headers, body)
                .await
        }
    };
    let on_a_key = patch(id.to_string(), "{not json").await;
    assert_eq!(on_a_key.status, StatusCode::BAD_REQUEST, "{on_a_key:?}");
    for missing in ["abc", "%FF", "999999"] {
        let refused = patch(missing.to_string(), "{not json").await;
        assert_eq!(refused.status, on_a_key.status, "{missing}: {refused:?}");
        assert_eq!(refused.json, on_a_key.json, "{missing}");
        // A body it reads, on a key that is not there: 404; and so is revoking it.
        patch(missing.to_string(), "{}")
            .await
            .assert_error(StatusCode::NOT_FOUND, "not_found");
        let authorization = format!("Bearer {token}");
        app.request(
            Method::DELETE,
            &format!("/keys/{missing}"),
            &[("authorization", authorization.as_str())],
            "",
        )
        .await
        .assert_error(StatusCode::NOT_FOUND, "not_found");
    }
}

#[tokio::test]
async fn a_key_belongs_to_its_user_only() {
    let app = TestApp::new().await;
    let alice = app.user_with_token("alice").await;
    let bob = app.user_with_token("bob").await;
    let (alice_key_id, _) = new_key(&app, &alice, "hers").await;
    let (_, bob_key) = new_key(&app, &bob, "his").await;
    // Bob's key spends Bob's tokens, never Alice's.
    assert_eq!(app.chat(&bob_key, "mine").await.json["tokens"], 3900);
    assert_eq!(app.balance(&alice).await, 4000);
    assert_eq!(
        app.get_authorized("/chats", &bob_key).await.json["chats"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    assert_eq!(
        app.get_authorized("/chats", &alice).await.json["chats"],
        json!([])
    );
    // Alice's key id is not Bob's to delete or see.
    delete_key(&app, &bob, &json!(alice_key_id))
        .await
        .assert_error(StatusCode::NOT_FOUND, "not_found");
    delete_key(&app, &bob, &json!("abc"))
        .await
        .assert_error(StatusCode::NOT_FOUND, "not_found");
    assert_eq!(
        app.get_authorized("/keys", &bob).await.json["keys"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    assert_eq!(
        app.get_authorized("/keys", &alice).await.json["keys"][0]["id"],
        alice_key_id
    );
}

#[tokio::test]
async fn a_user_holds_at_most_twenty_five_live_keys_and_names_are_checked() {
    let app = TestApp::new().await;
    let token = app.user_with_token("user").await;
    let mut first = None;
    for n in 0..25 {
        let (id, _) = new_key(&app, &token, &format!("key {n}")).await;
        first.get_or_insert(id);
    }
    create_key(&app, &token, "one too many")
        .await
        .assert_error(StatusCode::BAD_REQUEST, "invalid_input");
    assert_eq!(
        delete_key(&app, &token, &json!(first.unwrap()))
            .await
            .status,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        create_key(&app, &token, "room again").await.status,
        StatusCode::CREATED
    );
    for bad in ["", "   ", &"x".repeat(101)] {
        let refused = create_key(&app, &token, bad).await;
        refused.assert_error(StatusCode::BAD_REQUEST, "invalid_input");
        assert_eq!(refused.json["field"], "name");
    }
    app.post_authorized("/keys", &token, json!({}))
        .await
        .assert_error(StatusCode::BAD_REQUEST, "invalid_json");
}
