//! What the properties found, each kept as an ordinary test.

use axum::{
    body::Body,
    http::{header, Method, Request, StatusCode},
};
use tower::ServiceExt;

use crate::common::TestApp;

/// Found by `hostile_requests_of_any_shape_to_any_route`: tower-http's CORS layer answered
/// every OPTIONS request as a preflight, `200` with an empty body and no Content-Type, on
/// any path, even without `Origin` and `Access-Control-Request-Method`.
#[tokio::test]
async fn an_options_request_that_is_no_preflight_is_answered_like_any_other_method() {
    let app = TestApp::new().await;
    let on_a_route = app.request(Method::OPTIONS, "/chat", &[], "").await;
    on_a_route.assert_error(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed");
    assert_eq!(on_a_route.headers[header::ALLOW], "POST");
    let with_origin_only = app
        .request(
            Method::OPTIONS,
            "/balance/",
            &[("origin", "https://app.example")],
            "",
        )
        .await;
    with_origin_only.assert_error(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed");
    app.request(Method::OPTIONS, "/nowhere", &[], "")
        .await
        .assert_error(StatusCode::NOT_FOUND, "not_found");

    // A preflight still gets the CORS answer.
    let preflight = Request::builder()
        .method(Method::OPTIONS)
        .uri("/chat")
        .header("origin", "https://app.example")
        .header("access-control-request-method", "POST")
        .body(Body::empty())
        .unwrap();
    let preflight = app.router.clone().oneshot(preflight).await.unwrap();
    assert_eq!(preflight.status(), StatusCode::OK);
    assert_eq!(preflight.headers()["access-control-allow-origin"], "*");
}
