//! SQLite on a full disk: a write whose commit fails is an error, never an answer the
//! database did not keep. (The binary runs with a limit on the size of the files it
//! writes, which fills its "disk" without a filesystem of its own.)

use std::os::unix::process::CommandExt;

use serde_json::{json, Value};

use super::{binary::Server, register_and_login, send};
use crate::common::{FakeLlm, Reply};

/// The binary in `dir`, unable to write a file past `bytes`: a write past it fails as on
/// a full disk (`SIGXFSZ` ignored, so it is an error, not the end of the process).
#[allow(unsafe_code)] // `pre_exec` is the only way to set a child's limit before it starts
fn start_with_file_size_limit(dir: &std::path::Path, vars: &[(&str, &str)], bytes: u64) -> Server {
    let mut command = Server::command(dir, vars);
    // SAFETY: between fork and exec the closure makes two system calls; it neither
    // allocates nor takes locks.
    unsafe {
        command.pre_exec(move || {
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            rlimit::setrlimit(rlimit::Resource::FSIZE, bytes, bytes)
        });
    }
    Server::start_command(command)
}

/// The status and charge of chat `chat_id` in the SQLite file in `dir`.
async fn stored(dir: &std::path::Path, chat_id: i64) -> (String, i64) {
    let database_url = format!("sqlite://{}", dir.join("tokenchat.db").display());
    let db = tokenchat::db::connect(&database_url, tokenchat::db::Open::ExistingOnly)
        .await
        .unwrap();
    let row = tokenchat::db_run!(&db, pool => {
        sqlx::query_as("SELECT status, cost FROM chats WHERE id = $1")
            .bind(chat_id)
            .fetch_one(pool)
            .await
    })
    .unwrap();
    db.close().await;
    row
}

#[tokio::test]
async fn a_chat_whose_answer_a_full_disk_could_not_keep_is_an_error_not_an_answer() {
    let llm = FakeLlm::start().await;
    // A long answer: each chat's settlement writes far more than its reservation, so the
    // disk fills most likely as a settlement commits.
    let long = "word ".repeat(40_000);
    let whole = json!({ "id": "x", "object": "chat.completion", "model": "llama3.2",
        "choices": [{ "index": 0, "finish_reason": "stop",
                      "message": { "role": "assistant", "content": long } }],
        "usage": { "prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10 } });
    llm.set_reply(Reply::Verbatim {
        whole,
        chunks: Vec::new(),
    });
    let dir = tempfile::tempdir().unwrap();
    let vars = [
        ("LLM_BASE_URL", llm.base_url.as_str()),
        ("CHAT_RATE_PER_MINUTE", "0"),
    ];
    // Created and migrated without a limit; stopped, so its log is folded into the file.
    let http = reqwest::Client::new();
    let token = {
        let mut server = Server::start(dir.path(), &vars);
        let token = register_and_login(&http, &server.base, "pass123").await;
        server.signal("-TERM");
        server.child.wait().unwrap();
        token
    };
    let size = std::fs::metadata(dir.path().join("tokenchat.db"))
        .unwrap()
        .len();
    let server = start_with_file_size_limit(dir.path(), &vars, size + 1024 * 1024);
    let mut answered = Vec::new();
    let mut refused = 0;
    for _ in 0..30 {
        let chat = http
            .post(format!("{}/chat", server.base))
            .bearer_auth(&token);
        let (status, body): (u16, Value) = send(chat.json(&json!({ "message": "hi" }))).await;
        match status {
            200 => answered.push((
                body["chat_id"].as_i64().unwrap(),
                body["tokens_charged"].clone(),
            )),
            _ => {
                // Until some room is made, as when the database is away.
                assert_eq!(
                    (status, &body["code"]),
                    (503, &json!("database_unavailable"))
                );
                refused += 1;
            }
        }
        if refused == 3 {
            break;
        }
    }
    drop(server);
    assert!(
        refused > 0,
        "the disk never filled: {} answered",
        answered.len()
    );
    assert!(
        !answered.is_empty(),
        "nothing answered before the disk filled"
    );
    // Every answer the client got is one the database kept, and charged.
    for (chat_id, charged) in answered {
        assert_eq!(
            stored(dir.path(), chat_id).await,
            ("answered".to_string(), charged.as_i64().unwrap())
        );
    }
}
