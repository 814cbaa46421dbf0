//! The database going away, staged through a proxy so the other tests sharing the server
//! are not disturbed: every connection cut (503 while it lasts, all well after), or one
//! cut as it sends a given statement (a failure between two statements of one call).

use std::sync::{
    atomic::{AtomicBool, Ordering},
    Arc,
};

use axum::http::StatusCode;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{
    common::{
        database::{on_postgres, TestDatabase},
        TestApp,
    },
    prices::{priced_app, usage, REQUEST},
};

/// A TCP proxy on a loopback port in front of the PostgreSQL server, which a test can cut
/// (every connection through it dropped, new ones refused) and restore; and which, given a
/// statement's text, drops the first connection that sends it, before it reaches the
/// server. (Only a connection without TLS shows the text: the URL says `sslmode=disable`.)
struct CuttableProxy {
    address: std::net::SocketAddr,
    open: Arc<tokio::sync::watch::Sender<bool>>,
    /// Whether the statement given was seen, and its connection dropped.
    dropped_at_statement: Arc<AtomicBool>,
}

impl CuttableProxy {
    async fn start(upstream: std::net::SocketAddr, statement: Option<&'static str>) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let open = Arc::new(tokio::sync::watch::channel(true).0);
        let dropped_at_statement = Arc::new(AtomicBool::new(false));
        let (switch, dropped) = (open.clone(), dropped_at_statement.clone());
        tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                let mut cut = switch.subscribe();
                if !*cut.borrow() {
                    continue; // dropped: refused
                }
                let dropped = dropped.clone();
                tokio::spawn(async move {
                    let Ok(server) = tokio::net::TcpStream::connect(upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = relay(client, server, statement, &dropped) => {}
                        _ = cut.wait_for(|open| !*open) => {}
                    }
                });
            }
        });
        Self {
            address,
            open,
            dropped_at_statement,
        }
    }

    fn cut(&self) {
        self.open.send_replace(false);
    }

    fn restore(&self) {
        self.open.send_replace(true);
    }

    /// `url` (the test database's) through this proxy, without TLS.
    fn url_for(&self, url: &str) -> String {
        let mut url = reqwest::Url::parse(url).unwrap();
        url.set_port(Some(self.address.port())).unwrap();
        url.query_pairs_mut().append_pair("sslmode", "disable");
        url.to_string()
    }
}

/// Copies both ways until either side closes; returns at once, dropping both, when the
/// client sends `statement` and no connection has been dropped for it yet.
async fn relay(
    mut client: tokio::net::TcpStream,
    mut server: tokio::net::TcpStream,
    statement: Option<&'static str>,
    dropped: &AtomicBool,
) {
    let Some(statement) = statement else {
        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
        return;
    };
    let (mut from_client, mut to_client) = client.split();
    let (mut from_server, mut to_server) = server.split();
    let upward = async {
        let mut buffer = vec![0; 64 * 1024];
        loop {
            let read = match from_client.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(read) => read,
            };
            let sent = &buffer[..read];
            let carries = sent
                .windows(statement.len())
                .any(|window| window == statement.as_bytes());
            if carries && !dropped.swap(true, Ordering::SeqCst) {
                return;
            }
            if to_server.write_all(sent).await.is_err() {
                return;
            }
        }
    };
    let downward = tokio::io::copy(&mut from_server, &mut to_client);
    tokio::select! {
        _ = upward => {}
        _ = downward => {}
    }
}

/// The test database's server, as an address the proxy can connect to.
async fn server_of(database: &TestDatabase) -> std::net::SocketAddr {
    let url = reqwest::Url::parse(database.url()).unwrap();
    let server = (
        url.host_str().unwrap().to_string(),
        url.port().unwrap_or(5432),
    );
    tokio::net::lookup_host(server)
        .await
        .unwrap()
        .next()
        .unwrap()
}

#[tokio::test]
async fn while_the_database_is_away_requests_are_503_and_afterwards_all_is_well() {
    if !on_postgres() {
        println!("skipped: runs in the PostgreSQL run of the suite");
        return;
    }
    let database = TestDatabase::create().await;
    let proxy = CuttableProxy::start(server_of(&database).await, None).await;
    let url = proxy.url_for(database.url());
    let app = TestApp::with_env(&[("DATABASE_URL", url.as_str())]).await;
    let token = app.user_with_token("user").await;
    assert_eq!(app.chat(&token, "before").await.status, 200);

    proxy.cut();
    for _ in 0..2 {
        app.chat(&token, "during")
            .await
            .assert_error(StatusCode::SERVICE_UNAVAILABLE, "database_unavailable");
    }
    assert_eq!(
        app.llm.calls(),
        1,
        "the model was asked while the database was away"
    );

    proxy.restore();
    let after = app.chat(&token, "after").await;
    assert_eq!(after.status, 200, "{after:?}");
    assert_eq!(app.balance(&token).await, 3800);
    app.assert_all_settled().await;
    drop(database);
}

/// What a priced chat's settlement reads after it has committed: the balance its charge
/// left (`db::ledger::balance_after_settling`).
const BALANCE_AFTER_THE_CHARGE: &str =
    "SELECT balance_after FROM ledger WHERE chat_id = $1 AND reason = 'chat_charge'";

#[tokio::test]
async fn a_priced_chat_whose_charge_committed_is_answered_even_if_the_balance_cannot_be_read_after()
{
    if !on_postgres() {
        println!("skipped: runs in the PostgreSQL run of the suite");
        return;
    }
    let database = TestDatabase::create().await;
    let statement = Some(BALANCE_AFTER_THE_CHARGE);
    let proxy = CuttableProxy::start(server_of(&database).await, statement).await;
    let url = proxy.url_for(database.url());
    let app = priced_app(&[("DATABASE_URL", url.as_str())]).await;
    let token = app.user_with_token("payer").await;
    app.llm
        .set_reply(crate::common::Reply::EchoReporting(usage(10, 0, 5, 0)));
    let answered = app
        .post_authorized("/chat", &token, json!({ "message": "pay once" }))
        .await;
    assert!(
        proxy.dropped_at_statement.load(Ordering::SeqCst),
        "the read after the charge was never sent"
    );
    // Charged, so answered: 5 + 10 + 2 x 5.
    assert_eq!(answered.status, StatusCode::OK, "{answered:?}");
    let charged = REQUEST + 10 + 2 * 5;
    assert_eq!(answered.json["tokens_charged"], charged);
    assert_eq!(answered.json["tokens"], 4000 - charged);
    assert_eq!(app.balance(&token).await, 4000 - charged);
    app.assert_all_settled().await;
    drop(database);
}
