//! `MAX_CONNECTIONS_PER_ADDRESS`: one address cannot take every slot; at its cap its own
//! longest idle connection makes way, or the new one is closed.

use std::{
    net::{IpAddr, Ipv4Addr},
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    time::timeout,
};

use crate::{
    common::{Reply, TestApp},
    server::{serve_in_process, wait_until},
};

use super::{chat, connect_from, health, read_response, server_closes_within};

#[tokio::test]
async fn at_max_connections_per_address_that_addresss_longest_idle_connection_makes_way_for_a_new_one(
) {
    let app = TestApp::with_env(&[("MAX_CONNECTIONS_PER_ADDRESS", "4")]).await;
    let base = serve_in_process(&app).await;
    // One office behind NAT: every client comes from the same address.
    let office = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3));

    // The first never sends a byte; the other three have been answered and are idle.
    let mut held = vec![connect_from(&base, office).await];
    for _ in 0..3 {
        let mut connection = connect_from(&base, office).await;
        connection
            .write_all(health(&base).as_bytes())
            .await
            .unwrap();
        assert_eq!(read_response(&mut connection).await.0, 200);
        held.push(connection);
    }

    for (round, evicted) in [(0, 0), (1, 1)] {
        let started = Instant::now();
        let mut newcomer = connect_from(&base, office).await;
        newcomer.write_all(health(&base).as_bytes()).await.unwrap();
        let answered = timeout(Duration::from_secs(2), read_response(&mut newcomer)).await;
        let waited = started.elapsed();
        assert!(
            matches!(answered, Ok((200, _))),
            "round {round}: no answer within {waited:?}"
        );
        assert!(waited < Duration::from_secs(1), "round {round}: {waited:?}");
        assert!(
            server_closes_within(&mut held[evicted], Duration::from_secs(1)).await,
            "round {round}: the longest-idle connection {evicted} is still open"
        );
        for (index, connection) in held.iter_mut().enumerate().skip(evicted + 1) {
            assert!(
                !server_closes_within(connection, Duration::from_millis(20)).await,
                "round {round}: connection {index} was closed too"
            );
        }
        // Now among the address's idle connections, the newest.
        held.push(newcomer);
    }
}

#[tokio::test]
async fn at_max_connections_per_address_with_every_connection_busy_a_new_one_from_it_is_closed_at_once(
) {
    let app = TestApp::with_env(&[
        ("MAX_CONNECTIONS_PER_ADDRESS", "3"),
        ("CHAT_RATE_PER_MINUTE", "0"),
    ])
    .await;
    let token = app.user_with_token("user").await;
    let base = serve_in_process(&app).await;
    let first_address = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1));
    let second_address = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
    app.llm.set_reply(Reply::Stall(Duration::from_secs(3)));

    // Each of the address's three connections waits for the model: busy with the server's
    // own work, which is never evicted.
    let mut chatting = Vec::new();
    for index in 0..3 {
        let mut connection = connect_from(&base, first_address).await;
        let request = chat(&base, &token, &format!("question {index}"));
        connection.write_all(request.as_bytes()).await.unwrap();
        chatting.push(connection);
    }
    wait_until(|| async { app.llm.calls() == 3 }).await;

    let mut one_too_many = connect_from(&base, first_address).await;
    // The request may meet a closed socket already.
    let _ = one_too_many.write_all(health(&base).as_bytes()).await;
    let mut received = Vec::new();
    let closed = timeout(
        Duration::from_secs(1),
        one_too_many.read_to_end(&mut received),
    )
    .await;
    assert!(closed.is_ok(), "the fourth connection is still open");
    assert!(
        received.is_empty(),
        "{}",
        String::from_utf8_lossy(&received)
    );

    // Another address is served as usual.
    let mut elsewhere = connect_from(&base, second_address).await;
    elsewhere.write_all(health(&base).as_bytes()).await.unwrap();
    assert_eq!(read_response(&mut elsewhere).await.0, 200);

    // Every chat is answered, and the first address, its connections idle again, makes room.
    for (index, connection) in chatting.iter_mut().enumerate() {
        let (status, answer) = read_response(connection).await;
        assert_eq!(status, 200, "{answer}");
        assert_eq!(answer["response"], format!("Echo: question {index}"));
    }
    let mut again = connect_from(&base, first_address).await;
    again.write_all(health(&base).as_bytes()).await.unwrap();
    let answered = timeout(Duration::from_secs(2), read_response(&mut again)).await;
    assert!(matches!(answered, Ok((200, _))));
    app.assert_all_settled().await;
}
