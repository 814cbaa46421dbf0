//! Several upstreams serving one model: fake upstreams on loopback ports (one refusing
//! connections, one answering 500, one slow, one busy with `Retry-After`) in combinations.
//! A call lands on a good target and is charged once; weights hold; a breaker, once open,
//! keeps every connection from a dead target until its probe; `Retry-After` is honoured; a
//! stream that dies midway is not retried; an idempotent retry never reaches a second
//! upstream; every target out is 503 `upstream_busy` with `Retry-After`.

mod breaker;
mod busy;
mod fallback;

use std::sync::{
    atomic::{AtomicUsize, Ordering},
    Arc,
};

use crate::{
    common::{FakeLlm, Reply, TestApp, TestResponse},
    prices::book_file,
};

/// An app whose `llama3.2` is served only by `targets` (upstream name, base URL, weight,
/// priority), each upstream named in the configuration file, with `overrides`.
pub(crate) struct RoutedApp {
    pub app: TestApp,
    _dir: tempfile::TempDir,
}

impl std::ops::Deref for RoutedApp {
    type Target = TestApp;

    fn deref(&self) -> &TestApp {
        &self.app
    }
}

/// The configuration file serving `llama3.2` from `targets`.
pub(crate) fn routing_file(targets: &[(&str, &str, u32, u32)]) -> String {
    let mut file = String::new();
    for (name, base_url, _, _) in targets {
        file.push_str(&format!(
            "[upstreams.{name}]\nbase_url = \"{base_url}\"\n\n"
        ));
    }
    file.push_str("[models.\"llama3.2\"]\ntargets = [\n");
    for (name, _, weight, priority) in targets {
        file.push_str(&format!(
            "  {{ upstream = \"{name}\", weight = {weight}, priority = {priority} }},\n"
        ));
    }
    file.push_str("]\n");
    file
}

pub(crate) async fn routed_app(
    targets: &[(&str, &str, u32, u32)],
    overrides: &[(&str, &str)],
) -> RoutedApp {
    let (dir, path) = book_file(&routing_file(targets));
    let mut vars = vec![("CONFIG_FILE", path.as_str()), ("LLM_BASE_URL", "")];
    vars.extend_from_slice(overrides);
    RoutedApp {
        app: TestApp::with_env(&vars).await,
        _dir: dir,
    }
}

/// An upstream that takes connections and closes them at once, counting them: a dead
/// server behind a live port.
pub(crate) struct DeadUpstream {
    pub base_url: String,
    connections: Arc<AtomicUsize>,
}

impl DeadUpstream {
    pub(crate) async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base_url = format!("http://{}/v1", listener.local_addr().unwrap());
        let connections = Arc::new(AtomicUsize::new(0));
        let counted = connections.clone();
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                counted.fetch_add(1, Ordering::SeqCst);
                drop(socket);
            }
        });
        Self {
            base_url,
            connections,
        }
    }

    pub(crate) fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

/// A loopback address nothing listens on: connections are refused.
pub(crate) async fn refusing_url() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    drop(listener);
    format!("http://{address}/v1")
}

/// The upstream and attempts the chat `id`'s row records.
pub(crate) async fn served_by(app: &TestApp, id: i64) -> (Option<String>, Option<i64>) {
    tokenchat::db_run!(&app.state.db, pool => sqlx::query_as(
        "SELECT upstream, attempts FROM chats WHERE id = $1",
    )
    .bind(id)
    .fetch_one(pool)
    .await)
    .unwrap()
}

/// Two fake upstreams, `first` (answering `reply`) and `fallback` (echoing) at the next
/// priority, and an app serving `llama3.2` from them with `overrides`.
pub(crate) async fn first_and_fallback(
    (first, reply): (&str, Reply),
    fallback: &str,
    overrides: &[(&str, &str)],
) -> (RoutedApp, FakeLlm, FakeLlm) {
    let (primary, spare) = (FakeLlm::start().await, FakeLlm::start().await);
    primary.set_reply(reply);
    let targets = [
        (first, primary.base_url.as_str(), 1, 0),
        (fallback, spare.base_url.as_str(), 1, 1),
    ];
    (routed_app(&targets, overrides).await, primary, spare)
}

/// An answer's `Retry-After`, in seconds.
#[track_caller]
pub(crate) fn retry_after(answer: &TestResponse) -> u64 {
    answer.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap()
}
