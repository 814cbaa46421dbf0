//! Limits per API key and per user (issue 27): a key's ([`keys`]), a user's set by the
//! operator or by the configuration's defaults ([`users`]), model tokens a minute
//! ([`token_rates`]) and budget periods that roll over on a clock the tests move
//! ([`periods`]).

mod keys;
mod limit_changes;
mod periods;
mod token_rates;
mod users;

use serde_json::{json, Value};

use crate::common::{TestApp, TestResponse};

/// `PATCH /keys/{id}` with `body`.
pub(crate) async fn patch_key(app: &TestApp, token: &str, id: i64, body: Value) -> TestResponse {
    let authorization = format!("Bearer {token}");
    app.request(
        axum::http::Method::PATCH,
        &format!("/keys/{id}"),
        &[
            ("authorization", authorization.as_str()),
            ("content-type", "application/json"),
        ],
        body.to_string(),
    )
    .await
}

/// A key of `token`'s user with `limits` (beside its name); the key and its id.
pub(crate) async fn key_with(app: &TestApp, token: &str, limits: Value) -> (String, i64) {
    let mut body = json!({ "name": "agent" });
    body.as_object_mut()
        .unwrap()
        .extend(limits.as_object().unwrap().clone());
    let created = app.post_authorized("/keys", token, body).await;
    assert_eq!(
        created.status,
        axum::http::StatusCode::CREATED,
        "{created:?}"
    );
    (
        created.json["key"].as_str().unwrap().to_string(),
        created.json["id"].as_i64().unwrap(),
    )
}

/// Grants `tokens` more to `username`.
pub(crate) async fn grant(app: &TestApp, username: &str, tokens: i64) {
    let grant = tokenchat::domain::GrantAmount::parse(tokens).unwrap();
    let name = tokenchat::domain::Username::parse(username).unwrap();
    tokenchat::services::accounts::grant(&app.state.db, &name, grant)
        .await
        .unwrap();
}
