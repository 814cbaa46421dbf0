//! The original walkthrough with every authorization form, and the basics around it: CORS,
//! `/health` without a token, the first chat's balance, trailing slashes, and the request
//! the model is sent.

use crate::common::TestApp;
use axum::http::{Method, StatusCode};
use serde_json::json;
use tower::ServiceExt;

#[tokio::test]
async fn the_original_walkthrough_works_with_every_authorization_form() {
    let app = TestApp::new().await;

    let registered = app.register("user", "pass123").await;
    assert_eq!(registered.status, StatusCode::CREATED);
    assert_eq!(
        registered.json,
        json!({ "message": "Registration Successful", "username": "user", "tokens": 4000 })
    );
    assert_eq!(registered.content_type.as_deref(), Some("application/json"));

    let login = app.login("user", "pass123").await;
    assert_eq!(login.status, StatusCode::OK);
    let token = login.json["token"].as_str().unwrap().to_string();
    assert_eq!(token.len(), 32);
    assert!(token.bytes().all(|b| b.is_ascii_alphanumeric()));
    assert!(login.json["expires_at"].as_str().unwrap().ends_with('Z'));

    let mut expected_balance = 4000;
    for authorization in [
        token.clone(),
        format!("Token {token}"),
        format!("Bearer {token}"),
    ] {
        let chat = app
            .request(
                Method::POST,
                "/chat/",
                &[
                    ("authorization", &authorization),
                    ("content-type", "application/json"),
                ],
                json!({ "message": "code hello world in python" }).to_string(),
            )
            .await;
        expected_balance -= 100;
        assert_eq!(chat.status, StatusCode::OK, "{chat:?}");
        assert_eq!(chat.json["response"], "Echo: code hello world in python");
        assert_eq!(chat.json["tokens"], expected_balance);
        assert_eq!(chat.json["tokens_charged"], 100);
        assert!(chat.json["chat_id"].as_i64().is_some());
    }
    assert_eq!(app.balance(&token).await, 3700);

    let get_balance = app
        .request(Method::GET, "/balance", &[("authorization", &token)], "")
        .await;
    assert_eq!(get_balance.status, StatusCode::OK);
    assert_eq!(get_balance.json, json!({ "tokens": 3700 }));
}

#[tokio::test]
async fn browsers_on_other_origins_may_call_the_api_and_read_its_headers() {
    let app = TestApp::new().await;
    let preflight = app
        .router
        .clone()
        .oneshot(
            axum::http::Request::builder()
                .method(Method::OPTIONS)
                .uri("/chat/")
                .header("origin", "https://app.example")
                .header("access-control-request-method", "POST")
                .header(
                    "access-control-request-headers",
                    "authorization, content-type, idempotency-key",
                )
                .body(axum::body::Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(preflight.status(), StatusCode::OK);
    assert_eq!(preflight.headers()["access-control-allow-origin"], "*");
    assert!(preflight
        .headers()
        .contains_key("access-control-allow-methods"));
    // Every header, and `Authorization` by name: the Fetch standard's `*` leaves it out.
    let allowed = preflight.headers()["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .to_ascii_lowercase();
    let allowed: Vec<&str> = allowed.split(',').map(str::trim).collect();
    assert!(allowed.contains(&"*"), "{allowed:?}");
    assert!(allowed.contains(&"authorization"), "{allowed:?}");

    let token = app.user_with_token("user").await;
    let balance = app
        .request(
            Method::GET,
            "/balance",
            &[("origin", "https://app.example"), ("authorization", &token)],
            "",
        )
        .await;
    assert_eq!(balance.headers["access-control-allow-origin"], "*");
    assert_eq!(balance.headers["access-control-expose-headers"], "*");
    let refused = app
        .request(
            Method::GET,
            "/balance",
            &[("origin", "https://app.example")],
            "",
        )
        .await;
    refused.assert_error(StatusCode::UNAUTHORIZED, "unauthorized");
    assert_eq!(refused.headers["access-control-allow-origin"], "*");
}

#[tokio::test]
async fn health_answers_without_a_token() {
    let app = TestApp::new().await;
    for path in ["/health", "/health/"] {
        let response = app.request(Method::GET, path, &[], "").await;
        assert_eq!(response.status, StatusCode::OK);
        assert_eq!(response.json, json!({ "status": "ok" }));
    }
}

#[tokio::test]
async fn the_first_chat_leaves_3900_as_in_the_original() {
    let app = TestApp::new().await;
    let token = app.user_with_token("user").await;
    let chat = app.chat(&token, "code hello world in python").await;
    assert_eq!(chat.json["tokens"], 3900);
    assert_eq!(app.balance(&token).await, 3900);
}

#[tokio::test]
async fn every_route_answers_with_and_without_its_trailing_slash() {
    let app = TestApp::new().await;
    for path in ["/register", "/register/"] {
        let name = format!("u{}", path.len());
        assert_eq!(
            app.post_json(path, json!({ "username": name, "password": "pass123" }))
                .await
                .status,
            StatusCode::CREATED
        );
    }
    for path in ["/login", "/login/"] {
        assert_eq!(
            app.post_json(path, json!({ "username": "u9", "password": "pass123" }))
                .await
                .status,
            StatusCode::OK
        );
    }
    let token = app.user_with_token("slashes").await;
    for path in ["/chat", "/chat/"] {
        assert_eq!(
            app.post_authorized(path, &token, json!({ "message": "hi" }))
                .await
                .status,
            StatusCode::OK
        );
    }
    for path in ["/balance", "/balance/"] {
        assert_eq!(
            app.post_authorized(path, &token, json!({})).await.json["tokens"],
            3800
        );
    }
}

#[tokio::test]
async fn the_chat_request_upstream_follows_the_openai_protocol() {
    let app = TestApp::with_env(&[
        ("LLM_MODEL", "test-model"),
        ("LLM_SYSTEM_PROMPT", "Be brief."),
        ("LLM_API_KEY", "sk-test-key"),
    ])
    .await;
    let token = app.user_with_token("user").await;
    assert_eq!(app.chat(&token, "hello").await.status, StatusCode::OK);

    let received = app.llm.received();
    assert_eq!(received.len(), 1);
    assert_eq!(
        received[0].authorization.as_deref(),
        Some("Bearer sk-test-key")
    );
    assert_eq!(
        received[0].body,
        json!({
            "model": "test-model",
            "messages": [
                { "role": "system", "content": "Be brief." },
                { "role": "user", "content": "hello" }
            ]
        })
    );
}

#[tokio::test]
async fn no_key_means_no_authorization_header_upstream() {
    let app = TestApp::new().await;
    let token = app.user_with_token("user").await;
    app.chat(&token, "hello").await;
    assert_eq!(app.llm.received()[0].authorization, None);
}
