//! The floor tokenchat's fixed cost is measured against: a bare axum server with the same two
//! read routes and nothing else (no layers, no logging, no metrics), in a copy of this
//! binary on the server's core, reading the same SQLite file.
//!
//! `GET /health` answers the same static JSON; `GET /balance` hashes the bearer token with
//! SHA-256 and reads the balance with the same join tokenchat's authorisation runs, on a
//! pool like tokenchat's readers'. The throughput scenarios run each route against both
//! servers in turn, so the ratio comes from one run.

use std::{net::SocketAddr, path::Path, process::Child, str::FromStr, time::Duration};

use axum::{http::HeaderMap, http::StatusCode, routing::get, Json, Router};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use sqlx::sqlite::{SqliteConnectOptions, SqlitePool, SqlitePoolOptions};
use tokio::net::TcpStream;

use crate::{cores::this_binary_as, ROLE};

const ADDR_VAR: &str = "TOKENCHAT_BENCH_BARE_ADDR";
const DATABASE_VAR: &str = "TOKENCHAT_BENCH_BARE_DATABASE";

/// The bare server, running until dropped.
pub struct BareServer {
    child: Child,
    pub addr: SocketAddr,
}

impl BareServer {
    /// Starts it on the server's core (when `pinned`) over tokenchat's database `sqlite_url`.
    pub async fn start(dir: &Path, sqlite_url: &str, pinned: bool) -> Self {
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .expect("a free port");
        let child = this_binary_as("bare", pinned, Duration::ZERO)
            .current_dir(dir)
            .env(ADDR_VAR, addr.to_string())
            .env(DATABASE_VAR, sqlite_url)
            .spawn()
            .expect("start the bare server");
        for _ in 0..200 {
            if TcpStream::connect(addr).await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Self { child, addr }
    }
}

impl Drop for BareServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The role's body: serves until killed, on a runtime built as tokenchat's `#[tokio::main]`.
pub fn serve_bare() {
    assert_eq!(std::env::var(ROLE).as_deref(), Ok("bare"));
    let addr: SocketAddr = std::env::var(ADDR_VAR)
        .expect("the bare server's address")
        .parse()
        .expect("an address");
    let url = std::env::var(DATABASE_VAR).expect("the bare server's database");
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(async move {
            let options = SqliteConnectOptions::from_str(&url)
                .expect("a SQLite URL")
                .pragma("query_only", "ON");
            let pool = SqlitePoolOptions::new()
                .max_connections(4)
                .test_before_acquire(false)
                .connect_with(options)
                .await
                .expect("open the database");
            let app = Router::new()
                .route("/health", get(|| async { Json(json!({ "status": "ok" })) }))
                .route("/balance", get(balance))
                .with_state(pool);
            let listener = tokio::net::TcpListener::bind(addr).await.expect("bind");
            axum::serve(listener, app).await.expect("serve");
        });
}

async fn balance(
    axum::extract::State(pool): axum::extract::State<SqlitePool>,
    headers: HeaderMap,
) -> Result<Json<Value>, StatusCode> {
    let token = headers
        .get("authorization")
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .ok_or(StatusCode::UNAUTHORIZED)?;
    let hash = format!("{:x}", Sha256::digest(token.as_bytes()));
    let row: Option<(i64,)> = sqlx::query_as(
        "SELECT u.tokens FROM login_tokens t JOIN users u ON u.id = t.user_id
         WHERE t.token_hash = $1 AND (t.expires_at IS NULL OR t.expires_at > $2)",
    )
    .bind(hash)
    .bind(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |since| since.as_secs() as i64),
    )
    .fetch_optional(&pool)
    .await
    .map_err(|_| StatusCode::INTERNAL_SERVER_ERROR)?;
    let (tokens,) = row.ok_or(StatusCode::UNAUTHORIZED)?;
    Ok(Json(json!({ "tokens": tokens })))
}
