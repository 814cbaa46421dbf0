//! Connections over real TCP on 127.0.0.1: slow headers, idle keep-alive connections and
//! clients that read nothing are closed, the connection cap makes room by evicting idle
//! connections and ones waiting on their clients, one address cannot take every slot, a low
//! file-descriptor limit does not lock clients out, and shutdown ends by its deadline whatever
//! clients hold.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    os::unix::process::CommandExt,
    time::{Duration, Instant},
};

use serde_json::{json, Value};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWriteExt},
    net::{tcp::OwnedReadHalf, TcpSocket, TcpStream},
    time::{sleep, timeout},
};

use crate::{
    common::{FakeLlm, Reply, TestApp},
    server::{register_and_login, serve_in_process, wait_until, Server},
};

#[tokio::test]
async fn a_client_that_never_finishes_its_headers_is_disconnected_after_the_header_read_timeout() {
    let app = TestApp::with_env(&[("HEADER_READ_TIMEOUT_SECS", "1")]).await;
    let base = serve_in_process(&app).await;

    let mut slowloris = connect(&base).await;
    let started = Instant::now();
    slowloris
        .write_all(b"GET /health HTTP/1.1\r\nHost: tokenchat\r\n")
        .await
        .unwrap();
    // A header line every 200 ms, never the blank line that ends them: trickling must not
    // keep the connection open.
    let mut closed = false;
    for line in 0..25 {
        if server_closes_within(&mut slowloris, Duration::from_millis(200)).await {
            closed = true;
            break;
        }
        let header = format!("X-Trickle-{line}: still coming\r\n");
        if slowloris.write_all(header.as_bytes()).await.is_err() {
            closed = true;
            break;
        }
    }
    let waited = started.elapsed();
    assert!(closed, "still open after {waited:?}");
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(3),
        "closed after {waited:?}"
    );

    // Others are served as usual.
    let mut client = connect(&base).await;
    client.write_all(health(&base).as_bytes()).await.unwrap();
    assert_eq!(read_response(&mut client).await.0, 200);
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_after_the_idle_timeout_but_a_slow_chat_is_not_cut()
{
    let app = TestApp::with_env(&[
        ("IDLE_TIMEOUT_SECS", "1"),
        ("HEADER_READ_TIMEOUT_SECS", "1"),
    ])
    .await;
    let token = app.user_with_token("user").await;
    let base = serve_in_process(&app).await;
    app.llm.set_reply(Reply::Stall(Duration::from_millis(2500)));

    let mut idle = connect(&base).await;
    idle.write_all(health(&base).as_bytes()).await.unwrap();
    assert_eq!(read_response(&mut idle).await.0, 200);
    let idle_since = Instant::now();

    let mut busy = connect(&base).await;
    busy.write_all(chat(&base, &token, "a slow question").as_bytes())
        .await
        .unwrap();
    let asked_at = Instant::now();

    assert!(
        server_closes_within(&mut idle, Duration::from_secs(4)).await,
        "the idle connection is still open"
    );
    let idle_for = idle_since.elapsed();
    assert!(
        idle_for >= Duration::from_millis(900) && idle_for < Duration::from_secs(3),
        "closed after {idle_for:?} idle"
    );

    // The chat outlasts both time-outs and still gets its answer.
    let (status, answer) = read_response(&mut busy).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["response"], "Echo: a slow question");
    assert!(asked_at.elapsed() >= Duration::from_millis(2400));
    // The connection was kept alive, not condemned: it serves the next request, then closes
    // once idle in turn.
    busy.write_all(health(&base).as_bytes()).await.unwrap();
    assert_eq!(read_response(&mut busy).await.0, 200);
    assert!(server_closes_within(&mut busy, Duration::from_secs(4)).await);
    app.assert_all_settled().await;
}

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
async fn under_a_low_descriptor_limit_idle_connections_cannot_lock_new_clients_out() {
    let _ = rlimit::increase_nofile_limit(4096);
    let llm = FakeLlm::start().await;
    let dir = tempfile::tempdir().unwrap();
    // Every connection comes from 127.0.0.1: the per-address cap would hide the global one.
    let vars = [
        ("LLM_BASE_URL", llm.base_url.as_str()),
        ("MAX_CONNECTIONS_PER_ADDRESS", "0"),
    ];
    let server = start_with_descriptor_limit(dir.path(), &vars, 256);
    assert!(
        server
            .log
            .lock()
            .unwrap()
            .contains("file_descriptor_limit=256 max_connections=96"),
        "{}",
        server.log.lock().unwrap()
    );

    // Answering once shows it is past start-up and accepting.
    assert_answers_promptly(&server.base).await;

    // More idle connections than the server has descriptors for.
    let attack = open_idle_connections(&server.base, 400).await;
    let cpu_before = cpu_ticks(server.child.id());
    assert_answers_promptly(&server.base).await;
    sleep(Duration::from_secs(2)).await;
    assert_answers_promptly(&server.base).await;
    let cpu_used = cpu_ticks(server.child.id()) - cpu_before;
    assert!(cpu_used < 50, "{cpu_used} ticks of CPU in about 2 s");

    drop(attack);
    assert_answers_promptly(&server.base).await;
    let log = server.log.lock().unwrap().clone();
    assert!(!log.contains("cannot accept"), "{log}");
}

#[tokio::test]
async fn when_descriptors_run_out_the_server_backs_off_and_closes_idle_connections_instead_of_spinning(
) {
    let _ = rlimit::increase_nofile_limit(4096);
    let llm = FakeLlm::start().await;
    let dir = tempfile::tempdir().unwrap();
    // A cap the descriptor limit cannot honour: accept itself fails with EMFILE.
    let vars = [
        ("LLM_BASE_URL", llm.base_url.as_str()),
        ("MAX_CONNECTIONS", "1000"),
        ("MAX_CONNECTIONS_PER_ADDRESS", "0"),
    ];
    let server = start_with_descriptor_limit(dir.path(), &vars, 256);

    assert_answers_promptly(&server.base).await;

    let started = Instant::now();
    let attack = open_idle_connections(&server.base, 400).await;
    let cpu_before = cpu_ticks(server.child.id());
    assert_answers_promptly(&server.base).await;
    sleep(Duration::from_secs(2)).await;
    assert_answers_promptly(&server.base).await;
    let cpu_used = cpu_ticks(server.child.id()) - cpu_before;
    assert!(cpu_used < 50, "{cpu_used} ticks of CPU in about 2 s");

    drop(attack);
    assert_answers_promptly(&server.base).await;
    let log = server.log.lock().unwrap().clone();
    let accept_failures = log.matches("cannot accept connections").count();
    let seconds = started.elapsed().as_secs() as usize;
    assert!(
        (1..=seconds + 1).contains(&accept_failures),
        "{accept_failures} accept failures logged in {seconds} s:\n{log}"
    );
}

#[tokio::test]
async fn sigterm_ends_a_half_sent_request_and_refunds_a_stalled_chat_within_the_grace() {
    let llm = FakeLlm::start().await;
    let dir = tempfile::tempdir().unwrap();
    let vars = [
        ("LLM_BASE_URL", llm.base_url.as_str()),
        ("LLM_TIMEOUT_SECS", "30"),
        ("SHUTDOWN_GRACE_SECS", "2"),
    ];
    let mut server = Server::start(dir.path(), &vars);
    let http = reqwest::Client::new();
    let base = server.base.clone();
    let token = register_and_login(&http, &base, "pass123").await;

    llm.set_reply(Reply::Stall(Duration::from_secs(30)));
    let stalled = http
        .post(format!("{base}/chat"))
        .bearer_auth(&token)
        .json(&json!({ "message": "never answered" }));
    let stalled = tokio::spawn(stalled.send());
    wait_until(|| async { llm.calls() == 1 }).await;
    // Headers complete, a body of 1000 bytes promised and 10 sent.
    let mut half_sent = connect(&base).await;
    let headers = format!(
        "POST /chat HTTP/1.1\r\nHost: tokenchat\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{\"message\""
    );
    half_sent.write_all(headers.as_bytes()).await.unwrap();
    sleep(Duration::from_millis(300)).await;

    let signalled = Instant::now();
    server.signal("-TERM");
    let mut exit = None;
    while exit.is_none() && signalled.elapsed() < Duration::from_secs(10) {
        exit = server.child.try_wait().unwrap();
        sleep(Duration::from_millis(50)).await;
    }
    let exit = exit.expect("still running 10 s after SIGTERM");
    let took = signalled.elapsed();
    assert!(exit.success(), "{exit:?}");
    assert!(
        took >= Duration::from_millis(1800) && took < Duration::from_secs(6),
        "exited {took:?} after SIGTERM"
    );
    if let Ok(response) = stalled.await.unwrap() {
        assert_eq!(response.status(), 503);
    }
    assert!(server_closes_within(&mut half_sent, Duration::from_secs(1)).await);
    assert!(server
        .log
        .lock()
        .unwrap()
        .contains("shutdown grace is over"));

    let settled = crate::server::only_chat_and_its_balance(dir.path()).await;
    assert_eq!(settled, ("failed".to_string(), 4000));
    let audit = Server::command(dir.path(), &vars)
        .arg("audit")
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&audit.stdout);
    assert!(audit.status.success(), "{report}");
}

#[tokio::test]
async fn a_client_that_never_reads_its_responses_is_dropped_after_the_write_stall_timeout() {
    let app = TestApp::with_env(&[("WRITE_STALL_TIMEOUT_SECS", "1")]).await;
    let base = serve_in_process(&app).await;

    let mut never_reads = pipeline_without_reading(&base, PIPELINED_REQUESTS).await;
    // Its output stalls within milliseconds; a second later it is dropped.
    sleep(Duration::from_secs(3)).await;
    let (responses, closed) = count_responses_until_closed(&mut never_reads, 5).await;
    assert!(closed, "still open; {responses} responses read");
    assert!(
        responses < PIPELINED_REQUESTS,
        "all {responses} responses were written"
    );

    // A client that reads is never stalled for long, however much it asks for, and may then
    // stay quiet for longer than the write-stall time-out.
    let mut reads = connect(&base).await;
    let pipelined = health(&base).repeat(2000);
    let (mut reader, mut writer) = reads.split();
    let (written, (responses, closed)) = tokio::join!(
        writer.write_all(pipelined.as_bytes()),
        count_responses_until(&mut reader, 2000, 10)
    );
    written.unwrap();
    assert_eq!((responses, closed), (2000, false));
    sleep(Duration::from_millis(1500)).await;
    reads.write_all(health(&base).as_bytes()).await.unwrap();
    assert_eq!(read_response(&mut reads).await.0, 200);
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

#[tokio::test]
async fn a_request_head_beyond_64_kib_is_refused_without_being_served() {
    let app = TestApp::new().await;
    let base = serve_in_process(&app).await;
    let host = base.trim_start_matches("http://");

    let mut client = connect(&base).await;
    let request = format!(
        "GET /health HTTP/1.1\r\nHost: {host}\r\nX-Padding: {}\r\n\r\n",
        "a".repeat(100 * 1024)
    );
    // The server may answer and close before it has read all of it.
    let _ = client.write_all(request.as_bytes()).await;
    let mut received = Vec::new();
    let _ = timeout(Duration::from_secs(5), client.read_to_end(&mut received)).await;
    let head = String::from_utf8_lossy(&received);
    assert!(
        head.is_empty() || head.starts_with("HTTP/1.1 431") || head.starts_with("HTTP/1.1 400"),
        "{head}"
    );

    // A head within the limit is served.
    let mut client = connect(&base).await;
    let request = format!(
        "GET /health HTTP/1.1\r\nHost: {host}\r\nX-Padding: {}\r\n\r\n",
        "a".repeat(32 * 1024)
    );
    client.write_all(request.as_bytes()).await.unwrap();
    assert_eq!(read_response(&mut client).await.0, 200);
}

#[tokio::test]
async fn sigterm_past_the_grace_delivers_the_503_of_a_cancelled_chat_and_exits_cleanly() {
    let llm = FakeLlm::start().await;
    let dir = tempfile::tempdir().unwrap();
    let vars = [
        ("LLM_BASE_URL", llm.base_url.as_str()),
        ("LLM_TIMEOUT_SECS", "30"),
        ("SHUTDOWN_GRACE_SECS", "1"),
    ];
    let mut server = Server::start(dir.path(), &vars);
    let http = reqwest::Client::new();
    let base = server.base.clone();
    let token = register_and_login(&http, &base, "pass123").await;

    llm.set_reply(Reply::Stall(Duration::from_secs(30)));
    let mut chatting = connect(&base).await;
    chatting
        .write_all(chat(&base, &token, "never answered").as_bytes())
        .await
        .unwrap();
    wait_until(|| async { llm.calls() == 1 }).await;

    server.signal("-TERM");
    let (status, answer) = read_response(&mut chatting).await;
    assert_eq!(status, 503, "{answer}");
    assert_eq!(answer["code"], "shutting_down");
    let signalled = Instant::now();
    let mut exit = None;
    while exit.is_none() && signalled.elapsed() < Duration::from_secs(10) {
        exit = server.child.try_wait().unwrap();
        sleep(Duration::from_millis(50)).await;
    }
    let exit = exit.expect("still running 10 s after SIGTERM");
    assert!(exit.success(), "{exit:?}");
}

/// The binary, started with a file-descriptor limit of `limit` (soft and hard, so it cannot
/// raise it).
#[allow(unsafe_code)] // `pre_exec` is the only way to set a child's limit before it starts
fn start_with_descriptor_limit(dir: &std::path::Path, vars: &[(&str, &str)], limit: u64) -> Server {
    let mut command = Server::command(dir, vars);
    // SAFETY: between fork and exec the closure only makes one system call; it neither
    // allocates nor takes locks.
    unsafe {
        command.pre_exec(move || rlimit::setrlimit(rlimit::Resource::NOFILE, limit, limit));
    }
    Server::start_command(command)
}

/// Opens `count` connections that never send a byte.
async fn open_idle_connections(base: &str, count: usize) -> Vec<TcpStream> {
    let mut connections = Vec::with_capacity(count);
    for _ in 0..count {
        connections.push(connect(base).await);
    }
    connections
}

/// A new client asks for `/health` and is answered within three seconds.
async fn assert_answers_promptly(base: &str) {
    let started = Instant::now();
    let mut client = connect(base).await;
    client.write_all(health(base).as_bytes()).await.unwrap();
    let (status, _) = timeout(Duration::from_secs(3), read_response(&mut client))
        .await
        .expect("no answer within three seconds");
    assert_eq!(status, 200);
    assert!(started.elapsed() < Duration::from_secs(3));
}

/// CPU time the process has used, user and system, in clock ticks (hundredths of a second).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // The fields after the command name, which is in parentheses and may hold spaces: utime
    // and stime are the 14th and 15th of the line, the 12th and 13th after the name.
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 1..]
        .split_whitespace()
        .collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

/// Pipelined requests a client that never reads sends: far more responses than the kernel's
/// buffers between server and client hold.
const PIPELINED_REQUESTS: usize = 20_000;

/// A connection with a receive buffer of about a kilobyte that sends `count` pipelined
/// `GET /health` (from a task of its own, since the server soon stops reading them) and reads
/// nothing.
async fn pipeline_without_reading(base: &str, count: usize) -> OwnedReadHalf {
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(1024).unwrap();
    let address: SocketAddr = base.trim_start_matches("http://").parse().unwrap();
    let stream = timeout(Duration::from_secs(5), socket.connect(address))
        .await
        .expect("connect timed out")
        .unwrap();
    let (reader, mut writer) = stream.into_split();
    let pipelined = health(base).repeat(count);
    tokio::spawn(async move {
        // Fails once the server drops the connection.
        if writer.write_all(pipelined.as_bytes()).await.is_ok() {
            // Dropping the writing half would end the requests (FIN): keep it a while.
            sleep(Duration::from_secs(15)).await;
        }
    });
    reader
}

/// Reads until the server closes the connection (or `seconds` pass), counting the responses
/// that arrive; and whether it closed.
async fn count_responses_until_closed<R: AsyncRead + Unpin>(
    stream: &mut R,
    seconds: u64,
) -> (usize, bool) {
    count_responses_until(stream, usize::MAX, seconds).await
}

/// Reads until `expected` responses have arrived, the server closes the connection or
/// `seconds` pass: the responses counted, and whether it closed.
async fn count_responses_until<R: AsyncRead + Unpin>(
    stream: &mut R,
    expected: usize,
    seconds: u64,
) -> (usize, bool) {
    let status_line = b"HTTP/1.1 200";
    let mut responses = 0;
    // The bytes from the newest status line on, so that the last response is read whole
    // before returning and the next read starts at a response of its own.
    let mut tail = Vec::new();
    let mut scan_from = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(seconds);
    let mut chunk = vec![0u8; 64 * 1024];
    while responses < expected || !holds_a_whole_response(&tail) {
        let read = match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
            Err(_) => return (responses, false),
            Ok(Ok(0) | Err(_)) => return (responses, true),
            Ok(Ok(read)) => read,
        };
        tail.extend_from_slice(&chunk[..read]);
        let mut scanned = scan_from;
        let mut newest = None;
        while let Some(at) = find(&tail[scanned..], status_line) {
            responses += 1;
            newest = Some(scanned + at);
            scanned += at + status_line.len();
        }
        match newest {
            Some(start) => {
                tail.drain(..start);
                scan_from = scanned - start;
            }
            // What may be the start of a status line split across reads is scanned again.
            None => {
                scan_from = tail
                    .len()
                    .saturating_sub(status_line.len() - 1)
                    .max(scan_from)
            }
        }
    }
    (responses, false)
}

/// Whether `bytes` (a response's first bytes) hold its whole head and body.
fn holds_a_whole_response(bytes: &[u8]) -> bool {
    let Some(end) = find(bytes, b"\r\n\r\n") else {
        return false;
    };
    let length = String::from_utf8_lossy(&bytes[..end])
        .lines()
        .find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse::<usize>().ok())?
        })
        .unwrap_or(0);
    bytes.len() >= end + 4 + length
}

/// A connection from `source`, any address of the loopback network.
pub(crate) async fn connect_from(base: &str, source: IpAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(source, 0)).unwrap();
    let address: SocketAddr = base.trim_start_matches("http://").parse().unwrap();
    timeout(Duration::from_secs(5), socket.connect(address))
        .await
        .expect("connect timed out")
        .unwrap()
}

async fn connect(base: &str) -> TcpStream {
    let address = base.trim_start_matches("http://");
    timeout(Duration::from_secs(5), TcpStream::connect(address))
        .await
        .expect("connect timed out")
        .unwrap()
}

fn health(base: &str) -> String {
    let host = base.trim_start_matches("http://");
    format!("GET /health HTTP/1.1\r\nHost: {host}\r\n\r\n")
}

fn chat(base: &str, token: &str, message: &str) -> String {
    let host = base.trim_start_matches("http://");
    let body = json!({ "message": message }).to_string();
    format!(
        "POST /chat HTTP/1.1\r\nHost: {host}\r\nAuthorization: Token {token}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// Reads one response with a `Content-Length` body: its status and JSON body. Fails the test
/// when the server closes first or takes over ten seconds.
async fn read_response(stream: &mut TcpStream) -> (u16, Value) {
    let (status, _head, body) = read_whole_response(stream).await;
    (status, body)
}

/// [`read_response`] from any stream, with the response's head (status line and headers).
pub(crate) async fn read_whole_response<R: AsyncRead + Unpin>(
    stream: &mut R,
) -> (u16, String, Value) {
    let read = async {
        let mut received = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(end) = find(&received, b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&received[..end]).to_string();
                let length: usize = head
                    .lines()
                    .find_map(|line| {
                        let (name, value) = line.split_once(':')?;
                        name.eq_ignore_ascii_case("content-length")
                            .then(|| value.trim().parse().ok())?
                    })
                    .unwrap_or_else(|| panic!("no Content-Length in {head}"));
                if received.len() >= end + 4 + length {
                    let status = head
                        .split_whitespace()
                        .nth(1)
                        .and_then(|code| code.parse().ok())
                        .unwrap_or_else(|| panic!("no status in {head}"));
                    let body = &received[end + 4..end + 4 + length];
                    let body = serde_json::from_slice(body).unwrap_or(Value::Null);
                    return (status, head, body);
                }
            }
            let read = stream.read(&mut chunk).await.unwrap();
            assert!(read > 0, "the server closed the connection mid-response");
            received.extend_from_slice(&chunk[..read]);
        }
    };
    timeout(Duration::from_secs(10), read)
        .await
        .expect("no response within ten seconds")
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}

/// Whether the server closes (or resets) the connection within `limit`; anything it sends
/// meanwhile is read and ignored.
async fn server_closes_within(stream: &mut TcpStream, limit: Duration) -> bool {
    let closed = async {
        let mut chunk = [0u8; 1024];
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    timeout(limit, closed).await.is_ok()
}
