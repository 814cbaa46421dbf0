//! Many priced chats at once against a balance that covers only some: none overspends, each
//! charge is within its reservation, and the ledger is the balance; and random prices,
//! usages and endings, after which the audit always passes.

use axum::http::StatusCode;
use futures_util::future::join_all;
use proptest::prelude::*;
use serde_json::json;

use super::{book_file, chat_reservation, priced_app, usage, MAX_OUTPUT, REQUEST};
use crate::{
    common::{Reply, TestApp},
    streaming::{stream_message, Streamed},
};

#[tokio::test]
async fn two_hundred_concurrent_priced_chats_never_overspend() {
    let app = priced_app(&[("INITIAL_TOKENS", "3000")]).await;
    let token = app.user_with_token("crowd").await;
    app.llm.set_reply(Reply::EchoReporting(usage(20, 5, 10, 2)));
    let message = "all at once";
    let chats =
        (0..200).map(|_| app.post_authorized("/chat", &token, json!({ "message": message })));
    let mut answered = 0;
    let mut reported = Vec::new();
    for response in join_all(chats).await {
        match response.status {
            StatusCode::OK => {
                answered += 1;
                let chat_id = response.json["chat_id"].as_i64().unwrap();
                reported.push((chat_id, response.json["tokens"].as_i64().unwrap()));
            }
            StatusCode::PAYMENT_REQUIRED => {}
            other => panic!("unexpected {other}: {response:?}"),
        }
    }
    // 5 + ceil(15 + 2.5 + 20) = 43 a chat.
    let charged = REQUEST + 38;
    let balance = app.balance(&token).await;
    assert!(answered > 0);
    assert_eq!(balance, 3000 - answered * charged);
    assert!(balance >= 0);
    let reserved = chat_reservation(message, MAX_OUTPUT);
    let (over, total): (i64, i64) = tokenchat::db_run!(&app.state.db, pool => sqlx::query_as(
        "SELECT CAST(COALESCE(SUM(CASE WHEN cost > reserved THEN 1 ELSE 0 END), 0) AS BIGINT),
                CAST(COALESCE(SUM(cost), 0) AS BIGINT)
         FROM chats WHERE status = 'answered'",
    )
    .fetch_one(pool)
    .await)
    .unwrap();
    assert_eq!((over, total), (0, answered * charged));
    assert!(reserved > charged);
    // Each answer's balance is its own charge row's, however the settlements interleaved.
    for (chat_id, tokens) in reported {
        let settled: i64 = tokenchat::db_run!(&app.state.db, pool => sqlx::query_scalar(
            "SELECT balance_after FROM ledger WHERE chat_id = $1 AND reason = 'chat_charge'",
        )
        .bind(chat_id)
        .fetch_one(pool)
        .await)
        .unwrap();
        assert_eq!(tokens, settled, "chat {chat_id}");
    }
    app.assert_all_settled().await;
}

/// How one chat of the property test ends.
#[derive(Debug, Clone)]
enum Ending {
    Reports {
        prompt: usize,
        cached: usize,
        completion: usize,
    },
    ReportsNothing,
    Fails,
    DiesMidStream,
}

fn ending() -> impl Strategy<Value = Ending> {
    prop_oneof![
        3 => (0..5_000usize, 0..6_000usize, 0..400usize)
            .prop_map(|(prompt, cached, completion)| Ending::Reports { prompt, cached, completion }),
        1 => Just(Ending::ReportsNothing),
        1 => Just(Ending::Fails),
        1 => Just(Ending::DiesMidStream),
    ]
}

async fn run_sequence(prices: (u64, u64, u64, u64, u64), endings: Vec<(Ending, bool)>) {
    let (prompt, cached, completion, request, max_output) = prices;
    let book = format!(
        "[models.\"llama3.2\"]\nprompt = {prompt}\ncached_prompt = {cached}\n\
         completion = {completion}\nrequest = {request}\nmax_output_tokens = {max_output}\n"
    );
    let (_dir, path) = book_file(&book);
    let app = TestApp::with_env(&[("CONFIG_FILE", &path), ("INITIAL_TOKENS", "20000")]).await;
    let token = app.user_with_token("random").await;
    for (ending, streamed) in endings {
        let (reply, message) = match ending {
            Ending::Reports {
                prompt,
                cached,
                completion,
            } => (
                Reply::EchoReporting(usage(prompt, cached, completion, 1)),
                "a b c",
            ),
            Ending::ReportsNothing => (Reply::EchoWithoutUsage, "a b c"),
            Ending::Fails => (Reply::Status(500), "a b c"),
            Ending::DiesMidStream => (Reply::Echo, "[die-mid-stream] a b c"),
        };
        app.llm.set_reply(reply);
        if streamed {
            match stream_message(&app, &token, message).await {
                Streamed::Events(mut events) => {
                    let events = events.rest().await;
                    let (name, _) = events.last().unwrap();
                    assert!(name == "done" || name == "error", "{events:?}");
                }
                Streamed::Refused(response) => assert!(
                    [402, 502].contains(&response.status.as_u16()),
                    "{response:?}"
                ),
            }
        } else {
            let body = json!({ "message": message });
            let response = app.post_authorized("/chat", &token, body).await;
            assert!(
                [200, 402, 502].contains(&response.status.as_u16()),
                "{response:?}"
            );
        }
        app.assert_all_settled().await;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

    #[test]
    fn the_audit_passes_after_any_sequence_of_priced_chats(
        prices in (0..3_000_000u64, 0..3_000_000u64, 0..9_000_000u64, 0..20u64, 1..400u64),
        endings in proptest::collection::vec((ending(), any::<bool>()), 1..8),
    ) {
        tokio::runtime::Runtime::new()
            .unwrap()
            .block_on(run_sequence(prices, endings));
    }
}
