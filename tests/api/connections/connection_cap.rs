//! At the connection cap a new client gets a slot: the longest idle connection, clients that
//! never read and clients dribbling their bodies make way; busy connections make it wait.

use std::time::{Duration, Instant};

use tokio::{
    io::AsyncWriteExt,
    time::{sleep, timeout},
};

use crate::{
    common::{Reply, TestApp},
    server::{serve_in_process, wait_until},
};

use super::{
    chat, connect, health, pipeline_without_reading, read_response, server_closes_within,
    PIPELINED_REQUESTS,
};

#[tokio::test]
async fn at_the_connection_cap_the_longest_idle_connection_makes_way_for_a_new_client() {
    let app = TestApp::with_env(&[("MAX_CONNECTIONS", "20")]).await;
    let base = serve_in_process(&app).await;
    let mut held = Vec::new();
    for _ in 0..20 {
        let mut connection = connect(&base).await;
        connection
            .write_all(health(&base).as_bytes())
            .await
            .unwrap();
        assert_eq!(read_response(&mut connection).await.0, 200);
        held.push(connection);
    }

    let started = Instant::now();
    let mut newcomer = connect(&base).await;
    newcomer.write_all(health(&base).as_bytes()).await.unwrap();
    assert_eq!(read_response(&mut newcomer).await.0, 200);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );

    assert!(
        server_closes_within(&mut held[0], Duration::from_secs(2)).await,
        "the longest-idle connection is still open"
    );
    for (index, connection) in held.iter_mut().enumerate().skip(1) {
        assert!(
            !server_closes_within(connection, Duration::from_millis(20)).await,
            "connection {index} was closed too"
        );
    }
}

#[tokio::test]
async fn at_the_connection_cap_with_every_connection_busy_a_new_client_waits_its_turn() {
    let app = TestApp::with_env(&[("MAX_CONNECTIONS", "20"), ("CHAT_RATE_PER_MINUTE", "0")]).await;
    let token = app.user_with_token("user").await;
    let base = serve_in_process(&app).await;
    app.llm.set_reply(Reply::Stall(Duration::from_secs(2)));

    let busy: Vec<_> = (0..20)
        .map(|index| {
            let (base, token) = (base.clone(), token.clone());
            tokio::spawn(async move {
                let mut connection = connect(&base).await;
                let request = chat(&base, &token, &format!("question {index}"));
                connection.write_all(request.as_bytes()).await.unwrap();
                let (status, _) = read_response(&mut connection).await;
                // The connection is returned, so it stays open: idle, not closed.
                (status, Instant::now(), connection)
            })
        })
        .collect();
    wait_until(|| async { app.llm.calls() == 20 }).await;
    // Were the 21st served at once, it would be answered at once.
    app.llm.set_reply(Reply::Echo);

    let mut newcomer = connect(&base).await;
    newcomer
        .write_all(chat(&base, &token, "the 21st").as_bytes())
        .await
        .unwrap();
    let (status, answer) = read_response(&mut newcomer).await;
    let newcomer_answered = Instant::now();
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["response"], "Echo: the 21st");

    let mut first_answered = None::<Instant>;
    let mut still_open = Vec::new();
    for handle in busy {
        let (status, answered, connection) = handle.await.unwrap();
        assert_eq!(status, 200);
        first_answered = Some(first_answered.map_or(answered, |first| first.min(answered)));
        still_open.push(connection);
    }
    let first_answered = first_answered.unwrap();
    assert!(
        newcomer_answered >= first_answered,
        "the 21st was answered {:?} before any of the 20",
        first_answered - newcomer_answered
    );
    app.assert_all_settled().await;
}

#[tokio::test]
async fn at_the_connection_cap_clients_that_never_read_make_way_for_a_new_client_at_once() {
    // The write-stall time-out is left at its 30 s: eviction alone must make the room.
    let app = TestApp::with_env(&[("MAX_CONNECTIONS", "4")]).await;
    let base = serve_in_process(&app).await;

    let mut attackers = Vec::new();
    for round in 0..3 {
        // A fresh set each round, as an attacker would open them, filling every slot.
        for _ in 0..4 {
            attackers.push(pipeline_without_reading(&base, PIPELINED_REQUESTS).await);
        }
        sleep(Duration::from_millis(1500)).await;
        let started = Instant::now();
        let mut newcomer = connect(&base).await;
        newcomer.write_all(health(&base).as_bytes()).await.unwrap();
        let answered = timeout(Duration::from_secs(2), read_response(&mut newcomer)).await;
        let waited = started.elapsed();
        assert!(
            matches!(answered, Ok((200, _))),
            "round {round}: no answer within {waited:?}"
        );
        assert!(waited < Duration::from_secs(1), "round {round}: {waited:?}");
    }
}

#[tokio::test]
async fn at_the_connection_cap_clients_dribbling_their_bodies_make_way_but_a_slow_chat_is_not_cut()
{
    let app = TestApp::with_env(&[("MAX_CONNECTIONS", "4")]).await;
    let token = app.user_with_token("user").await;
    let base = serve_in_process(&app).await;
    app.llm.set_reply(Reply::Stall(Duration::from_secs(4)));

    let mut chatting = connect(&base).await;
    chatting
        .write_all(chat(&base, &token, "a slow question").as_bytes())
        .await
        .unwrap();
    wait_until(|| async { app.llm.calls() == 1 }).await;
    // The other three slots: a login that promises 1000 bytes of body and sends one every 2 s.
    let mut dribblers = Vec::new();
    for _ in 0..3 {
        let mut dribbler = connect(&base).await;
        let host = base.trim_start_matches("http://");
        let headers = format!(
            "POST /login HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n\
             Content-Length: 1000\r\n\r\n{{"
        );
        dribbler.write_all(headers.as_bytes()).await.unwrap();
        dribblers.push(dribbler);
    }
    let dribbling = tokio::spawn(async move {
        for _ in 0..5 {
            sleep(Duration::from_secs(2)).await;
            for dribbler in &mut dribblers {
                let _ = dribbler.write_all(b" ").await;
            }
        }
    });
    sleep(Duration::from_millis(1200)).await;

    for newcomer in 0..3 {
        let started = Instant::now();
        let mut client = connect(&base).await;
        client.write_all(health(&base).as_bytes()).await.unwrap();
        let answered = timeout(Duration::from_secs(2), read_response(&mut client)).await;
        let waited = started.elapsed();
        assert!(
            matches!(answered, Ok((200, _))),
            "newcomer {newcomer}: no answer within {waited:?}"
        );
        assert!(
            waited < Duration::from_secs(1),
            "newcomer {newcomer}: {waited:?}"
        );
    }

    let (status, answer) = read_response(&mut chatting).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["response"], "Echo: a slow question");
    dribbling.abort();
    app.assert_all_settled().await;
}
