//! The HTTP/1 server behind [`crate::serve`]: an accept loop that caps open connections, in all
//! and per client address, closes clients that are slow to send their headers, idle too long
//! or not reading what they are sent, and shuts down by a deadline.
//!
//! Each connection is driven by hyper's `http1` connection inside a task that also keeps its
//! timers ([`connection`], [`timers`]). What the timers need to know is shared in an `Activity`: the socket notes when the
//! first bytes of a request arrive and when its writes stall, the request body notes when the
//! application waits for more of it, the service counts the request in flight until hyper
//! drops its response body, and the accept loop reads it all to pick a connection to evict.
//!
//! At the cap a connection is evicted, dropped at once, in this order: one already closing,
//! then the one idle the longest, then the one that has waited on its client the longest (a
//! body that does not arrive, output the client does not read). Only connections busy with the
//! server's own work (a chat waiting for the model, a request being answered) are never
//! evicted: a newcomer waits for them. At `MAX_CONNECTIONS_PER_ADDRESS` the same order picks
//! among that address's own connections; when none of them may go, the newcomer is closed.
//!
//! The bytes of request bodies held while they arrive count against one budget for all
//! connections, `MAX_INFLIGHT_BODY_BYTES` (see [`body_budget`]).
//!
//! hyper's own `header_read_timeout` is not used. hyper (1.12) starts it whenever it waits for
//! a request's headers: on a fresh connection and again right after each response, so it
//! would close every idle keep-alive connection after `HEADER_READ_TIMEOUT_SECS` instead of
//! `IDLE_TIMEOUT_SECS`. Here the header clock starts at the first byte of a request. Nor does
//! hyper's `graceful_shutdown` close a connection in the middle of its first request's
//! headers (it waits for that request), so such a connection is dropped instead.

mod body_budget;
mod connection;
mod io;
mod registry;
mod timers;

use std::{future::Future, io as stdio, pin::pin, sync::Arc, time::Duration};

use axum::Router;
use tokio::{
    net::TcpListener,
    time::{sleep, timeout, Instant},
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{config::ConnectionLimits, in_flight::WorkInFlight};

use body_budget::BodyBudget;
pub use body_budget::HeldBody;
pub(crate) use body_budget::OverBudget;
use registry::Registry;

/// File descriptors kept back from client connections when the cap is derived from the limit:
/// standard streams, the runtime's event queue, the SQLite files, the log, DNS look-ups.
const DESCRIPTORS_RESERVED: u64 = 64;
/// The highest cap derived from the descriptor limit; set `MAX_CONNECTIONS` to go beyond.
const MAX_DERIVED_CONNECTIONS: u64 = 10_000;
/// After a failed accept, the pause before the next try, so a full descriptor table is not
/// retried in a tight loop.
const ACCEPT_RETRY_DELAY: Duration = Duration::from_millis(50);
/// The most often a failing accept is logged; the rest are counted into the next line.
const ACCEPT_FAILURE_LOG_INTERVAL: Duration = Duration::from_secs(1);
/// How long a connection asked to close may take (to flush what it was writing to a client
/// that does not read) before it is dropped.
const CLOSE_LINGER: Duration = Duration::from_secs(5);
/// After shutdown's grace, how long chats get to refund themselves and connections to close.
const AFTER_GRACE: Duration = Duration::from_secs(5);
/// Once the chats cancelled at the end of the grace have settled, how long their connections
/// get to write the 503 they now hold before every connection is dropped. Writing a small
/// response to a reading client takes milliseconds; one that does not read loses nothing more.
const WRITE_BEFORE_FORCE_CLOSE: Duration = Duration::from_secs(1);
/// How long a connection with a request in flight must have waited on its client (for body
/// bytes, or for it to take output) before it may be evicted at the cap. A second is the
/// initial TCP retransmission time-out (RFC 6298), so a client whose next segment is merely
/// lost and resent is not cut off mid-request.
const WAITING_ON_CLIENT_EVICTABLE_AFTER: Duration = Duration::from_secs(1);
/// At the cap with nothing to evict, how often to look again: a busy connection becomes
/// evictable by waiting on its client long enough, which wakes nobody.
const ROOM_RECHECK_INTERVAL: Duration = Duration::from_millis(250);
/// The most hyper buffers of one connection's input (and queues of its output). A request
/// head must fit (beyond it hyper answers 431 itself); hyper's default of about 400 KB would
/// let every connection still sending its headers hold that much memory.
const MAX_CONNECTION_BUFFER_BYTES: usize = 64 * 1024;
/// Marks an `Activity` clock that is not running.
const NOT_WAITING: u64 = u64::MAX;

/// How many connections may be open at once: `MAX_CONNECTIONS` when set, else derived from the
/// process's current file-descriptor soft limit (see [`connections_for_descriptor_limit`]).
pub fn connection_cap(limits: &ConnectionLimits) -> usize {
    limits
        .max_connections
        .unwrap_or_else(|| connections_for_descriptor_limit(descriptor_limit()))
}

/// The cap for a soft limit of `descriptors`: 64 are kept back for the process itself
/// (standard streams, the runtime, the SQLite files), and half of the rest goes to client
/// connections, because every client connection may be waiting on a chat that holds a second
/// socket, to the model. At least 1, at most 10,000.
pub fn connections_for_descriptor_limit(descriptors: u64) -> usize {
    let cap =
        (descriptors.saturating_sub(DESCRIPTORS_RESERVED) / 2).clamp(1, MAX_DERIVED_CONNECTIONS);
    usize::try_from(cap).unwrap_or(1)
}

#[cfg(unix)]
fn descriptor_limit() -> u64 {
    rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(1024, |(soft, _hard)| soft)
}

#[cfg(not(unix))]
fn descriptor_limit() -> u64 {
    u64::MAX
}

/// Serves `router` on `listener` within `limits` until `shutdown` resolves, then shuts down
/// within `SHUTDOWN_GRACE_SECS`, waiting for `chats` too (see [`Server::shut_down`]).
pub(crate) async fn run(
    listener: TcpListener,
    router: Router,
    limits: ConnectionLimits,
    chats: WorkInFlight,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> stdio::Result<()> {
    let budget = Arc::new(BodyBudget::new(limits.max_inflight_body_bytes));
    let server = Arc::new(Server {
        router,
        cap: connection_cap(&limits),
        limits,
        registry: Registry::new(),
        budget: budget.clone(),
        connections: TaskTracker::new(),
        stop: CancellationToken::new(),
        force_close: CancellationToken::new(),
    });
    let stop = server.stop.clone();
    let watcher = tokio::spawn(async move {
        shutdown.await;
        stop.cancel();
    });
    let trimming = CancellationToken::new();
    let trimmer = tokio::spawn(budget.trim_freed_memory(trimming.clone()));
    server.accept_until_stopped(&listener).await;
    drop(listener);
    watcher.abort();
    server.shut_down(&chats).await;
    trimming.cancel();
    let _ = trimmer.await;
    Ok(())
}

struct Server {
    router: Router,
    limits: ConnectionLimits,
    cap: usize,
    registry: Registry,
    /// Body bytes of all requests in flight (`MAX_INFLIGHT_BODY_BYTES`).
    budget: Arc<BodyBudget>,
    connections: TaskTracker,
    /// Cancelled when shutdown begins: no more accepts, every connection closes gracefully.
    stop: CancellationToken,
    /// Cancelled when shutdown's grace is over: every connection still open is dropped.
    force_close: CancellationToken,
}

impl Server {
    async fn accept_until_stopped(self: &Arc<Self>, listener: &TcpListener) {
        let mut failures = AcceptFailures::default();
        loop {
            let accepted = tokio::select! {
                () = self.stop.cancelled() => return,
                accepted = listener.accept() => accepted,
            };
            match accepted {
                Ok((stream, peer)) => {
                    // At its cap an address makes room the way the global cap does, from
                    // its own connections only: clients behind one NAT are not locked out
                    // by idle sockets of their own address.
                    if self
                        .limits
                        .max_connections_per_address
                        .is_some_and(|cap| !self.registry.make_room_from(peer.ip(), cap))
                    {
                        // Every connection from the address is busy with the server's own
                        // work: closed before it costs anything, so one address cannot take
                        // every slot. Logged at debug only: an attacker would flood the log.
                        tracing::debug!(%peer, "connection refused: MAX_CONNECTIONS_PER_ADDRESS reached");
                        drop(stream);
                        continue;
                    }
                    // Until there is room this one waits, accepted but not served, and the
                    // clients after it wait in the kernel's backlog.
                    if !self.wait_for_room().await {
                        return;
                    }
                    // A streamed answer is many small writes: each must leave at once, not
                    // wait (Nagle's algorithm) for the client to acknowledge the one before.
                    if let Err(err) = stream.set_nodelay(true) {
                        tracing::debug!(error = %err, "could not set TCP_NODELAY");
                    }
                    self.spawn_connection(stream, peer);
                }
                // The client gave up while queued; each such error uses up its connection, so
                // retrying at once cannot spin, and a pause would let anyone slow our accepts.
                Err(err) if is_the_clients_doing(&err) => {
                    tracing::debug!(error = %err, "a queued connection failed before accept");
                }
                Err(err) => {
                    failures.record(&err);
                    // Most likely out of file descriptors (EMFILE, ENFILE): closing an idle
                    // connection gives one back.
                    let mut room = pin!(self.registry.room.notified());
                    room.as_mut().enable();
                    let making_room = self.registry.evict_one();
                    tokio::select! {
                        () = self.stop.cancelled() => return,
                        () = room, if making_room => {}
                        () = sleep(ACCEPT_RETRY_DELAY) => {}
                    }
                }
            }
        }
    }

    /// Waits until fewer than the cap are open, evicting a connection to make room (see the
    /// module's documentation); `false` when shutdown began first.
    async fn wait_for_room(&self) -> bool {
        loop {
            // Registered before looking, so a connection that closes in between still wakes us.
            let mut room = pin!(self.registry.room.notified());
            room.as_mut().enable();
            if self.registry.len() < self.cap {
                return true;
            }
            // With none to evict, a connection that finishes its request or starts closing
            // wakes us as well; one that starts waiting on its client does not, hence the
            // recheck.
            let making_room = self.registry.evict_one();
            tokio::select! {
                () = self.stop.cancelled() => return false,
                () = room => {}
                () = sleep(ROOM_RECHECK_INTERVAL), if !making_room => {}
            }
        }
    }

    /// Stops accepting (the caller has dropped the listener), lets every connection finish the
    /// request it is serving, then waits for connections and chats for up to
    /// `SHUTDOWN_GRACE_SECS`.
    ///
    /// When the grace is over, chats still waiting for the model are cancelled: they refund
    /// themselves and answer 503, which their connections get a moment to write. Then every
    /// connection still open is dropped, including clients holding a half-sent request:
    /// shutdown always ends.
    async fn shut_down(&self, chats: &WorkInFlight) {
        self.stop.cancel();
        self.connections.close();
        chats.tasks.close();
        let settled = async {
            self.connections.wait().await;
            chats.tasks.wait().await;
        };
        if timeout(self.limits.shutdown_grace, settled).await.is_ok() {
            return;
        }
        tracing::warn!(
            connections = self.registry.len(),
            chats = chats.tasks.len(),
            "shutdown grace is over: refunding chats in progress and closing connections"
        );
        chats.cut_short.cancel();
        if timeout(AFTER_GRACE, chats.tasks.wait()).await.is_err() {
            tracing::warn!(
                chats = chats.tasks.len(),
                "chats did not settle; the next start's recovery refunds them"
            );
        }
        // Connections close on their own once their 503 is written (they were asked to close
        // when shutdown began); dropping them at once would lose it.
        let _ = timeout(WRITE_BEFORE_FORCE_CLOSE, self.connections.wait()).await;
        self.force_close.cancel();
        // Dropping a connection is immediate; this only lets the tasks see the cancellation.
        let _ = timeout(AFTER_GRACE, self.connections.wait()).await;
    }
}

/// Errors of accept that belong to one queued connection, not to the server.
fn is_the_clients_doing(err: &stdio::Error) -> bool {
    matches!(
        err.kind(),
        stdio::ErrorKind::ConnectionAborted
            | stdio::ErrorKind::ConnectionReset
            | stdio::ErrorKind::Interrupted
            | stdio::ErrorKind::WouldBlock
    )
}

/// Logs failing accepts at most once per [`ACCEPT_FAILURE_LOG_INTERVAL`], with a count of the
/// ones in between, so a descriptor shortage does not flood the log.
#[derive(Default)]
struct AcceptFailures {
    last_logged: Option<Instant>,
    unlogged: u64,
}

impl AcceptFailures {
    fn record(&mut self, err: &stdio::Error) {
        let now = Instant::now();
        if self
            .last_logged
            .is_some_and(|at| now.duration_since(at) < ACCEPT_FAILURE_LOG_INTERVAL)
        {
            self.unlogged += 1;
            return;
        }
        tracing::warn!(
            error = %err,
            failures_since_last_line = self.unlogged,
            "cannot accept connections; closing an idle one and retrying"
        );
        self.last_logged = Some(now);
        self.unlogged = 0;
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_derived_cap_keeps_descriptors_back_and_halves_the_rest() {
        assert_eq!(connections_for_descriptor_limit(1024), 480);
        assert_eq!(connections_for_descriptor_limit(256), 96);
        assert_eq!(connections_for_descriptor_limit(64), 1);
        assert_eq!(connections_for_descriptor_limit(0), 1);
        assert_eq!(connections_for_descriptor_limit(1 << 20), 10_000);
        assert_eq!(connections_for_descriptor_limit(u64::MAX), 10_000);
    }

    #[tokio::test]
    async fn every_request_carries_the_client_address() {
        use std::net::SocketAddr;

        use axum::{extract::ConnectInfo, routing::get};
        use tokio::{
            io::{AsyncReadExt, AsyncWriteExt},
            net::TcpStream,
        };

        let config = crate::Config::from_lookup(|_| None).unwrap();
        let chats = WorkInFlight::default();
        let peer_echo = Router::new().route(
            "/peer",
            get(|ConnectInfo(peer): ConnectInfo<SocketAddr>| async move { peer.to_string() }),
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(run(
            listener,
            peer_echo,
            config.connections,
            chats,
            std::future::pending(),
        ));

        let mut client = TcpStream::connect(address).await.unwrap();
        let client_address = client.local_addr().unwrap();
        client
            .write_all(b"GET /peer HTTP/1.1\r\nHost: tokenchat\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut response = String::new();
        timeout(Duration::from_secs(5), client.read_to_string(&mut response))
            .await
            .unwrap()
            .unwrap();
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        assert!(
            response.ends_with(&client_address.to_string()),
            "{response}"
        );
    }

    #[test]
    fn an_explicit_cap_wins_over_the_derived_one() {
        let limits = ConnectionLimits {
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            body_read_timeout: Duration::from_secs(30),
            write_stall_timeout: Duration::from_secs(30),
            max_connections: Some(7),
            max_connections_per_address: Some(64),
            max_inflight_body_bytes: 64 * 1024 * 1024,
            shutdown_grace: Duration::from_secs(30),
        };
        assert_eq!(connection_cap(&limits), 7);
    }
}
