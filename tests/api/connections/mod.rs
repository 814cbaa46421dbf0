//! Connections over real TCP on 127.0.0.1: slow headers, idle keep-alive connections and
//! clients that read nothing are closed, the connection cap makes room by evicting idle
//! connections and ones waiting on their clients, one address cannot take every slot, a low
//! file-descriptor limit does not lock clients out, shutdown ends by its deadline whatever
//! clients hold, and an answer before its body was read says the connection closes.

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use serde_json::{json, Value};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWriteExt},
    net::{tcp::OwnedReadHalf, TcpSocket, TcpStream},
    time::{sleep, timeout},
};

mod connection_cap;
mod descriptor_limit;
mod early_answers;
mod per_address_cap;
mod shutdown;
mod timeouts;

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
