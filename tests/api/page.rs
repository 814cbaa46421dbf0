//! The page at `/`, driven in headless Chromium by `tests/browser/page_test.py` (selenium
//! and chromedriver) with the Python of `TOKENCHAT_SDK_PYTHON`, which `.ci/run` makes and
//! gives selenium; skipped, saying so, when that is not set. It saves a screenshot to
//! `target/page-screenshot.png` (the README's is a copy of one).

use axum::http::Method;
use tower::ServiceExt;

use crate::{common::TestApp, server::serve_in_process};

#[tokio::test]
async fn the_page_is_one_self_contained_html_file() {
    let app = TestApp::new().await;
    let (status, content_type, html) = app.request_raw(Method::GET, "/", &[], "").await;
    assert_eq!(status, 200);
    assert_eq!(content_type, "text/html; charset=utf-8");
    assert!(html.starts_with("<!doctype html>"));
    // No external assets: it works offline and leaks nothing to a third party.
    for external in ["http://", "https://", "src=\"//", "@import"] {
        assert!(!html.contains(external), "{external}");
    }
}

#[tokio::test]
async fn the_page_cannot_be_framed_sniffed_or_made_to_run_other_scripts() {
    let app = TestApp::new().await;
    let request = axum::http::Request::get("/").body(axum::body::Body::empty());
    let response = app.router.clone().oneshot(request.unwrap()).await.unwrap();
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .unwrap_or_else(|| panic!("no {name}"))
            .to_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(header("x-frame-options"), "DENY");
    assert_eq!(header("x-content-type-options"), "nosniff");
    assert_eq!(header("referrer-policy"), "no-referrer");
    let policy = header("content-security-policy");
    for directive in [
        "default-src 'none'",
        "frame-ancestors 'none'",
        "connect-src 'self'",
        "base-uri 'none'",
    ] {
        assert!(policy.contains(directive), "{directive} in {policy}");
    }
    // The one inline script is allowed by its hash, and nothing else by any keyword.
    let (_, _, html) = app.request_raw(Method::GET, "/", &[], "").await;
    let script = html.split("<script>").nth(1).unwrap();
    let script = script.split("</script>").next().unwrap();
    use base64::Engine;
    use sha2::Digest;
    let hash = base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(script));
    assert!(
        policy.contains(&format!("script-src 'sha256-{hash}'")),
        "{policy}"
    );
    assert!(!policy.contains("unsafe"), "{policy}");
}

/// Runs a browser script with `python` and `args`, failing the test with its output unless
/// it succeeds. On a blocking thread: this test's runtime serves the page meanwhile.
async fn run_to_success<const N: usize>(python: String, args: [&str; N]) {
    let args: Vec<String> = args.iter().map(|arg| arg.to_string()).collect();
    let run =
        tokio::task::spawn_blocking(move || std::process::Command::new(python).args(args).output())
            .await
            .unwrap()
            .unwrap();
    assert!(
        run.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
}

#[tokio::test]
async fn in_a_browser_a_new_user_chats_sees_the_answer_stream_and_the_balance_drop_then_runs_out() {
    let Ok(python) = std::env::var("TOKENCHAT_SDK_PYTHON") else {
        println!("page test skipped: set TOKENCHAT_SDK_PYTHON to a Python with selenium");
        return;
    };
    // The built-in demo model, as on a fresh machine; a balance of one chat.
    let app = TestApp::with_env(&[("LLM_BASE_URL", ""), ("INITIAL_TOKENS", "100")]).await;
    let base = serve_in_process(&app).await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/browser/page_test.py");
    let screenshot = concat!(env!("CARGO_MANIFEST_DIR"), "/target/page-screenshot.png");
    let _ = std::fs::remove_file(screenshot);
    run_to_success(python, [script, &base, screenshot, "100"]).await;
    let png = std::fs::read(screenshot).unwrap();
    assert!(png.starts_with(b"\x89PNG"), "a PNG screenshot");
    // What the page showed is what the database holds.
    let token = app.login("browser-user", "pass123").await.json["token"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(app.balance(&token).await, 0);
    app.assert_audit_passes().await;
}

#[tokio::test]
async fn in_a_browser_older_pages_show_enter_sends_once_a_cut_charge_is_told_and_logout_forgets() {
    let Ok(python) = std::env::var("TOKENCHAT_SDK_PYTHON") else {
        println!("page test skipped: set TOKENCHAT_SDK_PYTHON to a Python with selenium");
        return;
    };
    // A model time-out past the fake's 10 s "[stall]": that answer starts late, not never.
    // Another origin listed: the page, served at an address, is still the API's own.
    let app = TestApp::with_env(&[
        ("INITIAL_TOKENS", "6000"),
        ("LLM_TIMEOUT_SECS", "15"),
        ("CORS_ORIGINS", "https://app.example"),
    ])
    .await;
    let token = app.user_with_token("browser-user").await;
    for n in 1..=24 {
        app.chat(&token, &format!("conversation {n}")).await;
    }
    let first = app.chat(&token, "turn 1").await;
    let conversation = first.json["conversation_id"].clone();
    for n in 2..=25 {
        let body =
            serde_json::json!({ "message": format!("turn {n}"), "conversation_id": conversation });
        assert_eq!(app.post_authorized("/chat", &token, body).await.status, 200);
    }
    let base = serve_in_process(&app).await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/browser/page_faults.py");
    run_to_success(python, [script, &base, &token]).await;
    // Enter pressed three times made one chat; the cut one was charged, as the page said.
    // (The page's logout revoked its token.)
    let token = app.login("browser-user", "pass123").await.json["token"]
        .as_str()
        .unwrap()
        .to_string();
    let chats = app.get_authorized("/chats?limit=100", &token).await.json["chats"].clone();
    let sent = |message: &str| {
        let chats = chats.as_array().unwrap().iter();
        chats.filter(|chat| chat["message"] == message).count()
    };
    assert_eq!(sent("only once"), 1);
    assert_eq!(sent("[die-mid-stream] a b c d"), 1);
    // The message after switching back went to the conversation shown, not the late one's.
    let conversation_of = |message: &str| {
        let mut chats = chats.as_array().unwrap().iter();
        chats.find(|chat| chat["message"] == message).unwrap()["conversation_id"].clone()
    };
    assert_eq!(conversation_of("after switching back"), conversation);
    assert_ne!(conversation_of("[stall] late start"), conversation);
    // The message on its way at logout was ended before its answer began: refunded.
    assert_eq!(sent("[stall] on its way at logout"), 1);
    assert_eq!(app.balance(&token).await, 6000 - 53 * 100);
    app.assert_audit_passes().await;
}

#[tokio::test]
async fn a_users_answers_and_login_tokens_are_kept_by_no_cache_a_browsers_included() {
    let app = TestApp::new().await;
    let token = app.user_with_token("user").await;
    let login = app.login("user", "pass123").await;
    assert_eq!(login.headers["cache-control"], "no-store");
    app.chat(&token, "hello").await;
    for path in ["/balance", "/conversations", "/chats", "/keys"] {
        let answer = app.get_authorized(path, &token).await;
        assert_eq!(answer.status, 200, "{path}");
        assert_eq!(answer.headers["cache-control"], "no-store", "{path}");
    }
}
