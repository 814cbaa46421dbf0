//! Another site's page calling the API from a visitor's browser: with `CORS_ORIGINS` it is
//! refused before anything is done, so it can neither lock the visitor's address out of a
//! login nor register accounts on it; the origins listed and the page at `/` served at an
//! address still call it, a page under a name that merely matches `Host` (DNS rebinding) not.

use axum::{
    body::Body,
    http::{HeaderMap, Method, Request, StatusCode},
};
use tower::ServiceExt;

use crate::common::{TestApp, TestResponse};

const LISTED: &str = "https://app.example";
const OTHER: &str = "https://evil.example";

async fn from(app: &TestApp, origin: &str, method: Method, path: &str, body: &str) -> TestResponse {
    let form = "application/x-www-form-urlencoded";
    let headers = [("origin", origin), ("content-type", form)];
    app.request(method, path, &headers, body.to_string()).await
}

/// A CORS preflight of a POST from `origin`: its status and headers (its body is empty).
async fn preflight(app: &TestApp, origin: &str) -> (StatusCode, HeaderMap) {
    let request = Request::builder()
        .method(Method::OPTIONS)
        .uri("/login")
        .header("origin", origin)
        .header("access-control-request-method", "POST")
        .body(Body::empty())
        .unwrap();
    let response = app.router.clone().oneshot(request).await.unwrap();
    (response.status(), response.headers().clone())
}

#[tokio::test]
async fn with_cors_origins_another_sites_page_cannot_lock_out_a_login_or_register_but_listed_ones_can_call(
) {
    let app = TestApp::with_env(&[("CORS_ORIGINS", LISTED)]).await;
    app.user_with_token("victim").await;
    // A plain cross-site form, twelve wrong passwords: refused, and counted nowhere.
    for _ in 0..12 {
        let refused = from(
            &app,
            OTHER,
            Method::POST,
            "/login",
            "username=victim&password=wrong1",
        )
        .await;
        refused.assert_error(StatusCode::FORBIDDEN, "forbidden");
        assert!(!refused.headers.contains_key("access-control-allow-origin"));
    }
    assert_eq!(app.login("victim", "pass123").await.status, StatusCode::OK);
    let farmed = from(
        &app,
        OTHER,
        Method::POST,
        "/register",
        "username=farm&password=pass123",
    )
    .await;
    farmed.assert_error(StatusCode::FORBIDDEN, "forbidden");
    assert_eq!(
        app.login("farm", "pass123").await.status,
        StatusCode::UNAUTHORIZED
    );
    let v1 = from(&app, OTHER, Method::GET, "/v1/models", "").await;
    assert_eq!(v1.status, StatusCode::FORBIDDEN);
    assert_eq!(v1.json["error"]["code"], "forbidden", "{v1:?}");
    let (status, headers) = preflight(&app, OTHER).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(!headers.contains_key("access-control-allow-origin"));

    // A listed origin's page: its own origin named, not `*`.
    let (status, headers) = preflight(&app, LISTED).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["access-control-allow-origin"], LISTED);
    let login = from(
        &app,
        LISTED,
        Method::POST,
        "/login",
        "username=victim&password=pass123",
    )
    .await;
    assert_eq!(login.status, StatusCode::OK, "{login:?}");
    assert_eq!(login.headers["access-control-allow-origin"], LISTED);
    assert!(login.headers["vary"].to_str().unwrap().contains("origin"));

    // The page at `/` served at an address sends its own origin: taken as the API's own.
    let body = r#"{"username":"victim","password":"pass123"}"#;
    for (origin, host) in [
        ("http://127.0.0.1:8000", "127.0.0.1:8000"),
        ("http://[::1]:8000", "[::1]:8000"),
        ("http://localhost:8000", "localhost:8000"),
    ] {
        let own = [("origin", origin), ("host", host)];
        let login = app.request(Method::POST, "/login", &own, body).await;
        assert_eq!(login.status, StatusCode::OK, "{origin}: {login:?}");
        assert!(!login.headers.contains_key("access-control-allow-origin"));
    }
    // Under a name it is not: another site can point a name of its own here (DNS
    // rebinding), and its page's `Origin` then matches `Host`, the browser even saying
    // `same-origin`. A page served under a name has its origin listed.
    let rebound = [
        ("origin", "http://evil.example:8000"),
        ("host", "evil.example:8000"),
        ("sec-fetch-site", "same-origin"),
    ];
    let login = app.request(Method::POST, "/login", &rebound, body).await;
    login.assert_error(StatusCode::FORBIDDEN, "forbidden");
    // A client that is no browser sends no Origin, as before.
    assert_eq!(app.login("victim", "pass123").await.status, StatusCode::OK);
}
