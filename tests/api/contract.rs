//! The contract's routes through the router in-process: the original walkthrough,
//! validation, authentication and the error envelope from every layer.

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
    assert!(preflight
        .headers()
        .contains_key("access-control-allow-headers"));

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

#[tokio::test]
async fn form_data_and_a_missing_content_type_are_accepted() {
    let app = TestApp::new().await;
    let form = app
        .request(
            Method::POST,
            "/register/",
            &[("content-type", "application/x-www-form-urlencoded")],
            "username=formuser&password=pass123",
        )
        .await;
    assert_eq!(form.status, StatusCode::CREATED, "{form:?}");

    let bare = app
        .request(
            Method::POST,
            "/login/",
            &[],
            r#"{"username":"formuser","password":"pass123"}"#,
        )
        .await;
    assert_eq!(bare.status, StatusCode::OK, "{bare:?}");
    let token = bare.json["token"].as_str().unwrap();

    let chat = app
        .request(
            Method::POST,
            "/chat/",
            &[
                ("authorization", token),
                (
                    "content-type",
                    "application/x-www-form-urlencoded; charset=utf-8",
                ),
            ],
            "message=hello+there",
        )
        .await;
    assert_eq!(chat.json["response"], "Echo: hello there");
}

#[tokio::test]
async fn json_sent_as_form_data_by_curl_d_is_read_as_json() {
    let app = TestApp::new().await;
    let response = app
        .request(
            Method::POST,
            "/register",
            &[("content-type", "application/x-www-form-urlencoded")],
            r#"{"username":"curluser","password":"pass123"}"#,
        )
        .await;
    assert_eq!(response.status, StatusCode::CREATED, "{response:?}");
    assert_eq!(response.json["username"], "curluser");
}

#[tokio::test]
async fn usernames_are_unique_in_any_letter_case_and_stored_as_given() {
    let app = TestApp::new().await;
    assert_eq!(
        app.register("Alice", "pass123").await.json["username"],
        "Alice"
    );
    for taken in ["Alice", "alice", "ALICE", "aLiCe"] {
        app.register(taken, "pass123")
            .await
            .assert_error(StatusCode::CONFLICT, "username_taken");
    }
    let stored: Vec<String> =
        tokenchat::db_run!(&app.state.db, pool => sqlx::query_scalar("SELECT username FROM users")
        .fetch_all(pool)
        .await)
        .unwrap();
    assert_eq!(stored, ["Alice"]);
}

#[tokio::test]
async fn registration_rejects_each_invalid_field_by_name() {
    let app = TestApp::new().await;
    let too_long_name = "a".repeat(51);
    let too_long_password = "p".repeat(1025);
    for (username, password, field) in [
        ("", "pass123", "username"),
        (too_long_name.as_str(), "pass123", "username"),
        ("has space", "pass123", "username"),
        ("semi;colon", "pass123", "username"),
        ("slash/", "pass123", "username"),
        ("user", "12345", "password"),
        ("user", "", "password"),
        ("user", too_long_password.as_str(), "password"),
    ] {
        let response = app.register(username, password).await;
        response.assert_error(StatusCode::BAD_REQUEST, "invalid_input");
        assert_eq!(response.json["field"], field, "{username:?} {password:?}");
    }
    let users: i64 =
        tokenchat::db_run!(&app.state.db, pool => sqlx::query_scalar("SELECT COUNT(*) FROM users")
        .fetch_one(pool)
        .await)
        .unwrap();
    assert_eq!(users, 0);
}

#[tokio::test]
async fn registration_accepts_the_edges_of_the_rules() {
    let app = TestApp::new().await;
    let longest = "z".repeat(50);
    let longest_password = "p".repeat(1024);
    for (username, password) in [
        ("a", "123456"),
        (longest.as_str(), "pass123"),
        ("we.ird+name-x_y@host", "pass123"),
        ("Zoë", "pass123"),
        ("longpass", longest_password.as_str()),
    ] {
        let response = app.register(username, password).await;
        assert_eq!(
            response.status,
            StatusCode::CREATED,
            "{username:?}: {response:?}"
        );
    }
}

#[tokio::test]
async fn password_min_length_is_configurable() {
    let app = TestApp::with_env(&[("PASSWORD_MIN_LENGTH", "10")]).await;
    app.register("user", "pass123")
        .await
        .assert_error(StatusCode::BAD_REQUEST, "invalid_input");
    assert_eq!(
        app.register("user", "pass123456").await.status,
        StatusCode::CREATED
    );
}

#[tokio::test]
async fn malformed_bodies_get_invalid_json() {
    let app = TestApp::new().await;
    for body in [
        "",
        "{",
        "not json",
        r#"{"username": "user"}"#,
        r#"{"username": 5, "password": "pass123"}"#,
        r#"{"username": null, "password": "pass123"}"#,
        r#"["user", "pass123"]"#,
    ] {
        app.request(
            Method::POST,
            "/register",
            &[("content-type", "application/json")],
            body,
        )
        .await
        .assert_error(StatusCode::BAD_REQUEST, "invalid_json");
    }
    app.request(
        Method::POST,
        "/register",
        &[("content-type", "application/x-www-form-urlencoded")],
        "username=only",
    )
    .await
    .assert_error(StatusCode::BAD_REQUEST, "invalid_json");
}

#[tokio::test]
async fn other_content_types_get_415() {
    let app = TestApp::new().await;
    for content_type in [
        "text/plain",
        "multipart/form-data; boundary=x",
        "application/xml",
    ] {
        app.request(
            Method::POST,
            "/register/",
            &[("content-type", content_type)],
            r#"{"username":"user","password":"pass123"}"#,
        )
        .await
        .assert_error(StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type");
    }
}

#[tokio::test]
async fn a_body_in_another_format_is_415_even_where_no_body_is_read() {
    let app = TestApp::new().await;
    let token = app.user_with_token("user").await;
    let authorization = format!("Token {token}");
    app.request(
        Method::POST,
        "/balance",
        &[
            ("authorization", &authorization),
            ("content-type", "text/plain"),
        ],
        "tokens please",
    )
    .await
    .assert_error(StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type");
    // A Content-Type with no body, as some clients send, is fine.
    let empty = app
        .request(
            Method::POST,
            "/balance",
            &[
                ("authorization", &authorization),
                ("content-type", "text/plain"),
            ],
            "",
        )
        .await;
    assert_eq!(empty.json, json!({ "tokens": 4000 }));
}

#[tokio::test]
async fn an_oversized_body_gets_413_and_changes_nothing() {
    // /chat's limit is raised to fit the longest valid message in any encoding: 12 bytes
    // a character and 4 KiB besides, here 5,296 bytes.
    let app = TestApp::with_env(&[("MAX_BODY_BYTES", "1024"), ("MAX_MESSAGE_CHARS", "100")]).await;
    let token = app.user_with_token("user").await;
    let huge = json!({ "message": "x".repeat(5300) }).to_string();
    let authorization = format!("Bearer {token}");
    app.request(
        Method::POST,
        "/chat/",
        &[
            ("authorization", &authorization),
            ("content-type", "application/json"),
        ],
        huge,
    )
    .await
    .assert_error(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large");
    assert_eq!(app.balance(&token).await, 4000);
    assert_eq!(app.llm.calls(), 0);

    // Also where no body is read, as long as the length is declared.
    let declared = "x".repeat(2000);
    app.request(
        Method::POST,
        "/balance",
        &[
            ("authorization", &authorization),
            ("content-type", "application/json"),
        ],
        declared,
    )
    .await
    .assert_error(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large");
}

#[tokio::test]
async fn unknown_routes_and_wrong_methods_get_the_envelope() {
    let app = TestApp::new().await;
    app.request(Method::GET, "/nope", &[], "")
        .await
        .assert_error(StatusCode::NOT_FOUND, "not_found");
    // `/` is the page: GET only.
    app.request(Method::POST, "/", &[], "")
        .await
        .assert_error(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed");
    for (method, path) in [
        (Method::GET, "/register"),
        (Method::GET, "/login/"),
        (Method::GET, "/chat"),
        (Method::DELETE, "/balance/"),
    ] {
        let response = app.request(method, path, &[], "").await;
        response.assert_error(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed");
        assert!(response.headers.contains_key("allow"), "{response:?}");
    }
}

#[tokio::test]
async fn login_fails_alike_for_unknown_users_and_wrong_passwords() {
    let app = TestApp::new().await;
    app.register("user", "pass123").await;
    let unknown = app.login("nobody", "pass123").await;
    let wrong = app.login("user", "wrong-password").await;
    unknown.assert_error(StatusCode::UNAUTHORIZED, "invalid_credentials");
    wrong.assert_error(StatusCode::UNAUTHORIZED, "invalid_credentials");
    assert_eq!(unknown.json, wrong.json);
}

#[tokio::test]
async fn login_ignores_the_letter_case_of_the_username() {
    let app = TestApp::new().await;
    app.register("Alice", "pass123").await;
    assert_eq!(app.login("aLICE", "pass123").await.status, StatusCode::OK);
}

#[tokio::test]
async fn login_validates_its_fields() {
    let app = TestApp::new().await;
    let response = app.login("", "pass123").await;
    response.assert_error(StatusCode::BAD_REQUEST, "invalid_input");
    assert_eq!(response.json["field"], "username");
    let response = app.login("user", "").await;
    assert_eq!(response.json["field"], "password");
}

#[tokio::test]
async fn every_login_issues_a_new_token_and_earlier_ones_stay_valid() {
    let app = TestApp::new().await;
    app.register("user", "pass123").await;
    let first = app.login("user", "pass123").await.json["token"]
        .as_str()
        .unwrap()
        .to_string();
    let second = app.login("user", "pass123").await.json["token"]
        .as_str()
        .unwrap()
        .to_string();
    assert_ne!(first, second);
    assert_eq!(app.balance(&first).await, 4000);
    assert_eq!(app.balance(&second).await, 4000);
}

#[tokio::test]
async fn repeated_failed_logins_are_rate_limited_with_retry_after() {
    let app = TestApp::new().await;
    app.register("user", "pass123").await;
    for _ in 0..10 {
        app.login("user", "guess")
            .await
            .assert_error(StatusCode::UNAUTHORIZED, "invalid_credentials");
    }
    let limited = app.login("USER", "pass123").await;
    limited.assert_error(StatusCode::TOO_MANY_REQUESTS, "rate_limited");
    let retry_after: u64 = limited.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=900).contains(&retry_after));
    // Other usernames are not affected.
    app.register("other", "pass123").await;
    assert_eq!(app.login("other", "pass123").await.status, StatusCode::OK);
}

#[tokio::test]
async fn missing_malformed_and_unknown_tokens_get_401() {
    let app = TestApp::new().await;
    let valid_looking = "A".repeat(32);
    let unknown_bearer = format!("Bearer {valid_looking}");
    for headers in [
        vec![],
        vec![("authorization", "")],
        vec![("authorization", "Bearer")],
        vec![("authorization", "Basic dXNlcjpwYXNz")],
        vec![("authorization", "short")],
        vec![("authorization", valid_looking.as_str())],
        vec![("authorization", unknown_bearer.as_str())],
    ] {
        app.request(Method::POST, "/balance/", &headers, "")
            .await
            .assert_error(StatusCode::UNAUTHORIZED, "unauthorized");
        let mut with_body = headers.clone();
        with_body.push(("content-type", "application/json"));
        app.request(Method::POST, "/chat/", &with_body, r#"{"message":"hi"}"#)
            .await
            .assert_error(StatusCode::UNAUTHORIZED, "unauthorized");
    }
    assert_eq!(app.llm.calls(), 0);
}

#[tokio::test]
async fn an_expired_token_gets_401() {
    let app = TestApp::with_env(&[("TOKEN_TTL_SECS", "1")]).await;
    let token = app.user_with_token("user").await;
    assert_eq!(app.balance(&token).await, 4000);
    tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
    app.post_authorized("/balance/", &token, json!({}))
        .await
        .assert_error(StatusCode::UNAUTHORIZED, "unauthorized");
}

#[tokio::test]
async fn a_zero_ttl_issues_tokens_that_never_expire() {
    let app = TestApp::with_env(&[("TOKEN_TTL_SECS", "0")]).await;
    app.register("user", "pass123").await;
    let login = app.login("user", "pass123").await;
    assert_eq!(login.json["expires_at"], serde_json::Value::Null);
    let expires: Option<i64> = tokenchat::db_run!(&app.state.db, pool => sqlx::query_scalar("SELECT expires_at FROM login_tokens")
        .fetch_one(pool)
        .await)
        .unwrap();
    assert_eq!(expires, None);
}

#[tokio::test]
async fn chat_messages_are_validated_and_nothing_is_charged() {
    let app = TestApp::with_env(&[("MAX_MESSAGE_CHARS", "10")]).await;
    let token = app.user_with_token("user").await;
    for message in ["", "   ", "\n\t ", "12345678901"] {
        let response = app.chat(&token, message).await;
        response.assert_error(StatusCode::BAD_REQUEST, "invalid_input");
        assert_eq!(response.json["field"], "message");
    }
    app.post_authorized("/chat/", &token, json!({ "message": 42 }))
        .await
        .assert_error(StatusCode::BAD_REQUEST, "invalid_json");
    app.post_authorized("/chat/", &token, json!({}))
        .await
        .assert_error(StatusCode::BAD_REQUEST, "invalid_json");
    // Ten characters, multi-byte ones included, is within the limit.
    assert_eq!(app.chat(&token, "ééééééééé!").await.status, StatusCode::OK);
    assert_eq!(app.balance(&token).await, 3900);
    assert_eq!(app.llm.calls(), 1);
}
