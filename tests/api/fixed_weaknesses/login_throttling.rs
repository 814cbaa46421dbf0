//! Login throttling: failed logins lock out an address or a username, never the owner
//! elsewhere; forwarded addresses count only behind a trusted proxy; impossible usernames
//! are not counted, and huge unique ones do not grow memory.

use axum::http::StatusCode;
use serde_json::json;

use crate::common::TestApp;

use super::retry_after;

#[tokio::test]
async fn failed_logins_from_one_address_never_lock_the_owner_out_from_another() {
    let app = TestApp::with_env(&[("TRUST_PROXY_HEADERS", "true")]).await;
    app.register("alice", "pass123").await;
    let guess = json!({ "username": "alice", "password": "wrong!" });
    for _ in 0..10 {
        app.post_from("203.0.113.9", "/login", guess.clone())
            .await
            .assert_error(StatusCode::UNAUTHORIZED, "invalid_credentials");
    }
    let locked = app
        .post_from(
            "203.0.113.9",
            "/login",
            json!({ "username": "alice", "password": "pass123" }),
        )
        .await;
    locked.assert_error(StatusCode::TOO_MANY_REQUESTS, "rate_limited");
    assert!((1..=900).contains(&retry_after(&locked)));

    let owner = app
        .post_from(
            "198.51.100.7",
            "/login",
            json!({ "username": "alice", "password": "pass123" }),
        )
        .await;
    assert_eq!(owner.status, StatusCode::OK, "{owner:?}");
}

#[tokio::test]
async fn one_address_may_try_only_so_many_logins_a_minute() {
    let app = TestApp::with_env(&[
        ("TRUST_PROXY_HEADERS", "true"),
        // Few enough that the attempts all fit in the 12 s the limit takes to let one more
        // through, however slowly a busy machine hashes (30 a minute gave 2 s, which a
        // full run of the suite sometimes took for 30 hashes).
        ("LOGIN_ATTEMPTS_PER_MINUTE", "5"),
    ])
    .await;
    // Spraying: a different username every time, so no per-username lock ever engages.
    for n in 0..5 {
        let body = json!({ "username": format!("user{n}"), "password": "pass123" });
        app.post_from("203.0.113.9", "/login", body)
            .await
            .assert_error(StatusCode::UNAUTHORIZED, "invalid_credentials");
    }
    let body = json!({ "username": "user5", "password": "pass123" });
    let limited = app.post_from("203.0.113.9", "/login", body.clone()).await;
    limited.assert_error(StatusCode::TOO_MANY_REQUESTS, "rate_limited");
    assert!((1..=60).contains(&retry_after(&limited)));
    // Another address is counted on its own.
    app.post_from("198.51.100.7", "/login", body)
        .await
        .assert_error(StatusCode::UNAUTHORIZED, "invalid_credentials");
}

#[tokio::test]
async fn failures_from_many_addresses_lock_a_username_everywhere() {
    let app = TestApp::with_env(&[
        ("TRUST_PROXY_HEADERS", "true"),
        ("LOGIN_FAILURES_PER_USER", "5"),
    ])
    .await;
    app.register("alice", "pass123").await;
    for n in 1..=5 {
        let guess = json!({ "username": "alice", "password": "wrong!" });
        app.post_from(&format!("203.0.113.{n}"), "/login", guess)
            .await
            .assert_error(StatusCode::UNAUTHORIZED, "invalid_credentials");
    }
    let right = json!({ "username": "alice", "password": "pass123" });
    app.post_from("198.51.100.7", "/login", right)
        .await
        .assert_error(StatusCode::TOO_MANY_REQUESTS, "rate_limited");
}

#[tokio::test]
async fn forwarded_addresses_count_only_behind_a_trusted_proxy() {
    // Untrusted: X-Forwarded-For is the client's own claim, so every request below comes
    // from the same (in-process, unknown) address and ten failures lock the pair.
    let app = TestApp::new().await;
    app.register("alice", "pass123").await;
    for n in 0..10 {
        let guess = json!({ "username": "alice", "password": "wrong!" });
        app.post_from(&format!("203.0.113.{n}"), "/login", guess)
            .await;
    }
    let right = json!({ "username": "alice", "password": "pass123" });
    app.post_from("198.51.100.7", "/login", right)
        .await
        .assert_error(StatusCode::TOO_MANY_REQUESTS, "rate_limited");
}

#[tokio::test]
async fn usernames_that_cannot_exist_fail_like_unknown_ones_and_are_never_counted() {
    let app = TestApp::new().await;
    for name in [
        "x".repeat(65_000),
        "no spaces allowed".into(),
        "\u{430}dmin".into(),
    ] {
        // Well past the ten failures that lock a real username: never locked, because
        // nothing about such a name is remembered.
        for _ in 0..12 {
            app.login(&name, "pass123")
                .await
                .assert_error(StatusCode::UNAUTHORIZED, "invalid_credentials");
        }
    }
}

/// Resident memory of a process, in kB.
fn resident_kb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find(|line| line.starts_with("VmRSS:"))
        .unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[tokio::test]
async fn failed_logins_with_huge_unique_usernames_do_not_grow_memory() {
    let dir = tempfile::tempdir().unwrap();
    let server = crate::server::Server::start(
        dir.path(),
        &[
            ("LOGIN_ATTEMPTS_PER_MINUTE", "0"),
            ("MAX_BODY_BYTES", "70000"),
        ],
    );
    let http = reqwest::Client::new();
    let attempt = |n: usize| {
        let http = http.clone();
        let url = format!("{}/login", server.base);
        async move {
            let username = format!("{n:08}{}", "u".repeat(60_000));
            let body = json!({ "username": username, "password": "wrong!" });
            let response = http.post(url).json(&body).send().await.unwrap();
            assert_eq!(response.status(), 401);
        }
    };
    // Warm up the allocator and the connection pool, then measure.
    futures_join_all((0..40).map(attempt)).await;
    let before = resident_kb(server.child.id());
    for wave in 0..10 {
        futures_join_all((0..40).map(|n| attempt(1000 + wave * 40 + n))).await;
    }
    let after = resident_kb(server.child.id());
    // 400 usernames of 60 KB: 24 MB if any were kept.
    assert!(
        after < before + 8 * 1024,
        "resident memory grew from {before} kB to {after} kB"
    );
}

async fn futures_join_all<F: std::future::Future<Output = ()> + Send + 'static>(
    futures: impl Iterator<Item = F>,
) {
    let tasks: Vec<_> = futures.map(tokio::spawn).collect();
    for task in tasks {
        task.await.unwrap();
    }
}
