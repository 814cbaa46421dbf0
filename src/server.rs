//! The HTTP/1 server behind [`crate::serve`]: an accept loop that caps open connections, in all
//! and per client address, closes clients that are slow to send their headers, idle too long
//! or not reading what they are sent, and shuts down by a deadline.
//!
//! Each connection is driven by hyper's `http1` connection inside a task that also keeps its
//! timers. What the timers need to know is shared in an `Activity`: the socket notes when the
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
//! The bytes of request bodies held while they arrive count against one budget for all
//! connections, `MAX_INFLIGHT_BODY_BYTES` (see [`body_budget`]).
//!
//! hyper's own `header_read_timeout` is not used. hyper (1.12) starts it whenever it waits for
//! a request's headers: on a fresh connection and again right after each response, so it
//! would close every idle keep-alive connection after `HEADER_READ_TIMEOUT_SECS` instead of
//! `IDLE_TIMEOUT_SECS`. Here the header clock starts at the first byte of a request. Nor does
//! hyper's `graceful_shutdown` close a connection in the middle of its first request's
//! headers (it waits for that request), so such a connection is dropped instead.

use std::{
    collections::HashMap,
    convert::Infallible,
    future::Future,
    io,
    net::{IpAddr, SocketAddr},
    pin::{pin, Pin},
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex, PoisonError,
    },
    task::{Context, Poll},
    time::Duration,
};

use axum::{
    body::{Body, Bytes},
    extract::ConnectInfo,
    Router,
};
use hyper::{
    body::{Frame, Incoming, SizeHint},
    server::conn::http1,
    service::service_fn,
    Request,
};
use hyper_util::rt::TokioIo;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::Notify,
    time::{sleep, sleep_until, timeout, Instant},
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tower::ServiceExt;

use crate::{config::ConnectionLimits, routes::router, AppState};

mod body_budget;

use body_budget::BodyBudget;
pub(crate) use body_budget::OverBudget;

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

/// Serves `state`'s application on `listener` until `shutdown` resolves, then shuts down
/// within `SHUTDOWN_GRACE_SECS` (see [`Server::shut_down`]).
pub(crate) async fn run(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    serve_router(listener, router(state.clone()), state, shutdown).await
}

/// [`run`] with any router; `state` gives the limits and the chats shutdown waits for.
async fn serve_router(
    listener: TcpListener,
    router: Router,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let budget = Arc::new(BodyBudget::new(
        state.config.connections.max_inflight_body_bytes,
    ));
    let server = Arc::new(Server {
        router,
        limits: state.config.connections.clone(),
        cap: connection_cap(&state.config.connections),
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
    server.shut_down(&state).await;
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

    fn spawn_connection(self: &Arc<Self>, stream: TcpStream, peer: SocketAddr) {
        let activity = self.registry.register(peer.ip());
        let server = self.clone();
        self.connections.spawn(async move {
            let _registered = Registered {
                registry: &server.registry,
                id: activity.id,
            };
            server.drive(stream, peer, activity).await;
        });
    }

    /// Serves one connection until it ends, is timed out, evicted or closed by shutdown.
    async fn drive(&self, stream: TcpStream, peer: SocketAddr, activity: Arc<Activity>) {
        let socket = TokioIo::new(WatchedStream {
            stream,
            activity: activity.clone(),
        });
        let router = self.router.clone();
        let requests = activity.clone();
        let budget = self.budget.clone();
        let service = service_fn(move |request: Request<Incoming>| {
            let in_flight = RequestInFlight::begin(requests.clone());
            let mut request = request.map(|body| WatchedBody {
                body,
                activity: requests.clone(),
                budget: budget.clone(),
                held: 0,
            });
            request.extensions_mut().insert(ConnectInfo(peer));
            let router = router.clone();
            async move {
                let response = router.oneshot(request).await?;
                Ok::<_, Infallible>(response.map(|body| CountedBody {
                    body,
                    _in_flight: in_flight,
                }))
            }
        });
        let connection = http1::Builder::new()
            // See the module's documentation: the header clock is kept below instead.
            .header_read_timeout(None)
            .max_buf_size(MAX_CONNECTION_BUFFER_BYTES)
            // hyper checks its buffer's size only between reads, and one read may take the
            // buffer past it; this checks a complete head too.
            .max_header_size(MAX_CONNECTION_BUFFER_BYTES)
            .serve_connection(socket, service);
        let mut connection = pin!(connection);
        let mut timers = Timers::default();
        // One timer for the connection's life, moved only when its deadline changes: a
        // fresh `sleep_until` on every wake-up would register with the timer wheel several
        // times per request.
        let mut alarm = pin!(sleep_until(Instant::now()));
        let mut alarm_at = None;
        loop {
            let due = timers.due(&activity, &self.limits);
            let at = due.map(|(at, _)| at);
            if at.is_some() && at != alarm_at {
                alarm.as_mut().reset(at.unwrap_or_else(Instant::now));
            }
            alarm_at = at;
            let close_because = tokio::select! {
                biased;
                () = self.force_close.cancelled() => {
                    tracing::debug!(%peer, "connection dropped: shutdown grace is over");
                    return;
                }
                ended = connection.as_mut() => {
                    if let Err(err) = ended {
                        tracing::debug!(%peer, error = %err, "connection ended with an error");
                    }
                    return;
                }
                () = self.stop.cancelled(), if timers.closing_since.is_none() => {
                    Some("shutting down")
                }
                () = activity.changed.notified() => None,
                () = alarm.as_mut(), if due.is_some() => {
                    // Spent: the next deadline, even an equal one, must set it again.
                    alarm_at = None;
                    match due.map(|(_, expiry)| expiry) {
                        Some(Expiry::Idle) => Some("idle for IDLE_TIMEOUT_SECS"),
                        Some(Expiry::Headers) => {
                            tracing::debug!(%peer, "connection dropped: headers not complete within HEADER_READ_TIMEOUT_SECS");
                            return;
                        }
                        Some(Expiry::WriteStall) => {
                            tracing::debug!(%peer, "connection dropped: its client read nothing for WRITE_STALL_TIMEOUT_SECS");
                            return;
                        }
                        Some(Expiry::Linger) | None => {
                            tracing::debug!(%peer, "connection dropped: still open after being asked to close");
                            return;
                        }
                    }
                }
            };
            if activity.evicted.load(Ordering::SeqCst) {
                // At once, whatever it was doing: a graceful close would wait for a client
                // that may never read or send, and the newcomer would wait with it.
                tracing::debug!(%peer, "connection dropped to make room for a new one");
                return;
            }
            timers.observe(&activity);
            if let (Some(reason), None) = (close_because, timers.closing_since) {
                if timers.headers_since.is_some() {
                    // Nothing is lost, and hyper's graceful shutdown would wait for headers
                    // that are the first on their connection to be complete.
                    tracing::debug!(%peer, reason, "connection dropped in the middle of headers");
                    return;
                }
                tracing::debug!(%peer, reason, "closing connection");
                // At once when no request is in flight, else after its response.
                connection.as_mut().graceful_shutdown();
                timers.closing_since = Some(Instant::now());
                // Now the first to be evicted; an accept waiting for room may take its slot.
                activity.closing.store(true, Ordering::SeqCst);
                activity.room.notify_one();
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
    async fn shut_down(&self, state: &AppState) {
        self.stop.cancel();
        self.connections.close();
        state.tasks.close();
        let settled = async {
            self.connections.wait().await;
            state.tasks.wait().await;
        };
        if timeout(self.limits.shutdown_grace, settled).await.is_ok() {
            return;
        }
        tracing::warn!(
            connections = self.registry.len(),
            chats = state.tasks.len(),
            "shutdown grace is over: refunding chats in progress and closing connections"
        );
        state.cancel_chats.cancel();
        if timeout(AFTER_GRACE, state.tasks.wait()).await.is_err() {
            tracing::warn!(
                chats = state.tasks.len(),
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
fn is_the_clients_doing(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
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
    fn record(&mut self, err: &io::Error) {
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

/// The open connections, for the caps and for choosing which one to evict.
struct Registry {
    epoch: Instant,
    next_id: AtomicU64,
    open: Mutex<OpenConnections>,
    /// Notified when a connection closes, starts closing or has no request left in flight:
    /// the accept loop, when it waits for room, looks again.
    room: Arc<Notify>,
}

#[derive(Default)]
struct OpenConnections {
    by_id: HashMap<u64, Arc<Activity>>,
    /// The same connections by client address, for the per-address cap; at most
    /// `MAX_CONNECTIONS_PER_ADDRESS` (and one on its way out) each.
    per_address: HashMap<IpAddr, Vec<Arc<Activity>>>,
}

impl Registry {
    fn new() -> Self {
        Self {
            epoch: Instant::now(),
            next_id: AtomicU64::new(0),
            open: Mutex::new(OpenConnections::default()),
            room: Arc::new(Notify::new()),
        }
    }

    fn open(&self) -> std::sync::MutexGuard<'_, OpenConnections> {
        // The map stays consistent whatever panicked while holding it.
        self.open.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn len(&self) -> usize {
        self.open().by_id.len()
    }

    /// Makes room for a new connection from `address`, which may hold `cap`: `true` when it
    /// holds fewer (not counting any evicted and on their way out), or once one of its
    /// connections, the first by [`Evictable`]'s order, has been evicted; `false` when none
    /// of them may be.
    fn make_room_from(&self, address: IpAddr, cap: usize) -> bool {
        let address = address.to_canonical();
        let open = self.open();
        let Some(connections) = open.per_address.get(&address) else {
            return true;
        };
        let staying = || {
            connections
                .iter()
                .filter(|activity| !activity.evicted.load(Ordering::SeqCst))
        };
        if staying().count() < cap {
            return true;
        }
        match first_to_evict(staying(), Instant::now()) {
            Some(activity) => {
                activity.evict();
                true
            }
            None => false,
        }
    }

    fn register(&self, address: IpAddr) -> Arc<Activity> {
        let address = address.to_canonical();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let activity = Arc::new(Activity {
            id,
            address,
            epoch: self.epoch,
            requests_in_flight: AtomicUsize::new(0),
            idle_since_micros: AtomicU64::new(0),
            headers_started: AtomicBool::new(false),
            body_wait_since_micros: AtomicU64::new(NOT_WAITING),
            write_stall_since_micros: AtomicU64::new(NOT_WAITING),
            closing: AtomicBool::new(false),
            evicted: AtomicBool::new(false),
            changed: Notify::new(),
            room: self.room.clone(),
        });
        activity.mark_idle_now();
        let mut open = self.open();
        open.by_id.insert(id, activity.clone());
        open.per_address
            .entry(address)
            .or_default()
            .push(activity.clone());
        activity
    }

    fn remove(&self, id: u64) {
        let mut open = self.open();
        let Some(activity) = open.by_id.remove(&id) else {
            return;
        };
        if let Some(connections) = open.per_address.get_mut(&activity.address) {
            connections.retain(|open| open.id != id);
            if connections.is_empty() {
                open.per_address.remove(&activity.address);
            }
        }
    }

    /// Evicts one connection, which drops at once, to make room: the first by
    /// [`Evictable`]'s order. `true` when one is on its way out, just evicted or evicted
    /// earlier and not gone yet; `false` when none may be evicted.
    fn evict_one(&self) -> bool {
        let open = self.open();
        // An evicted connection is gone as soon as its task runs; evicting another meanwhile
        // would close two for one newcomer.
        if open
            .by_id
            .values()
            .any(|activity| activity.evicted.load(Ordering::SeqCst))
        {
            return true;
        }
        match first_to_evict(open.by_id.values(), Instant::now()) {
            Some(activity) => {
                activity.evict();
                true
            }
            None => false,
        }
    }
}

/// Of `connections`, the first to evict `now` by [`Evictable`]'s order (the oldest first
/// among equals); `None` when none may be.
fn first_to_evict<'a>(
    connections: impl Iterator<Item = &'a Arc<Activity>>,
    now: Instant,
) -> Option<&'a Arc<Activity>> {
    connections
        .filter_map(|activity| Some((activity.evictable(now)?, activity.id, activity)))
        .min_by_key(|(evictable, id, _)| (*evictable, *id))
        .map(|(_, _, activity)| activity)
}

/// Why a connection may be evicted; the derived order is the order of eviction.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Evictable {
    /// Already asked to close (idle for too long, or shutdown): it would be gone soon anyway.
    Closing,
    /// No request in flight since this instant: nothing is lost but a keep-alive connection.
    Idle(Instant),
    /// A request in flight, but waiting on its client since this instant: for more of its
    /// body, or for it to take the response.
    WaitingOnClient(Instant),
}

/// Removes its connection from the registry when the connection's task ends, however it ends.
struct Registered<'a> {
    registry: &'a Registry,
    id: u64,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.registry.remove(self.id);
        self.registry.room.notify_one();
    }
}

/// What one connection is doing, as far as its timers and the caps care.
struct Activity {
    id: u64,
    /// The client's address, for the per-address cap.
    address: IpAddr,
    epoch: Instant,
    requests_in_flight: AtomicUsize,
    /// When the last request in flight ended (or the connection opened), in microseconds
    /// since `epoch`.
    idle_since_micros: AtomicU64,
    /// Bytes arrived while no request was in flight: a request's headers are being read.
    headers_started: AtomicBool,
    /// Since when the application has been waiting for more of a request's body, in
    /// microseconds since `epoch`; [`NOT_WAITING`] when it is not.
    body_wait_since_micros: AtomicU64,
    /// Since when the socket has refused output (the client's window is full), in
    /// microseconds since `epoch`; [`NOT_WAITING`] once a write goes through.
    write_stall_since_micros: AtomicU64,
    /// Asked to close gracefully.
    closing: AtomicBool,
    /// Evicted to make room for a new connection: drop at once.
    evicted: AtomicBool,
    /// Wakes the connection's task to look at the fields above again.
    changed: Notify,
    room: Arc<Notify>,
}

impl Activity {
    fn micros_now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(NOT_WAITING - 1)
    }

    fn instant_of(&self, micros: u64) -> Instant {
        self.epoch + Duration::from_micros(micros)
    }

    fn mark_idle_now(&self) {
        self.idle_since_micros
            .store(self.micros_now(), Ordering::SeqCst);
    }

    fn idle_since(&self) -> Instant {
        self.instant_of(self.idle_since_micros.load(Ordering::SeqCst))
    }

    fn is_busy(&self) -> bool {
        self.requests_in_flight.load(Ordering::SeqCst) > 0
    }

    fn note_bytes_read(&self) {
        if !self.is_busy() && !self.headers_started.load(Ordering::SeqCst) {
            self.headers_started.store(true, Ordering::SeqCst);
            self.changed.notify_one();
        }
    }

    /// Starts `clock` unless it is running; `true` when it was started.
    fn start_clock(&self, clock: &AtomicU64) -> bool {
        clock
            .compare_exchange(
                NOT_WAITING,
                self.micros_now(),
                Ordering::SeqCst,
                Ordering::SeqCst,
            )
            .is_ok()
    }

    /// Stops `clock`; `true` when it was running.
    fn stop_clock(clock: &AtomicU64) -> bool {
        clock.swap(NOT_WAITING, Ordering::SeqCst) != NOT_WAITING
    }

    fn since(&self, clock: &AtomicU64) -> Option<Instant> {
        match clock.load(Ordering::SeqCst) {
            NOT_WAITING => None,
            micros => Some(self.instant_of(micros)),
        }
    }

    fn note_write(&self, polled: &Poll<io::Result<usize>>) {
        match polled {
            Poll::Pending => self.note_write_stalled(),
            Poll::Ready(Ok(written)) if *written > 0 => self.note_write_progress(),
            Poll::Ready(_) => {}
        }
    }

    fn write_stalled_since(&self) -> Option<Instant> {
        self.since(&self.write_stall_since_micros)
    }

    fn note_write_stalled(&self) {
        // The connection's task arms its write-stall deadline.
        if self.start_clock(&self.write_stall_since_micros) {
            self.changed.notify_one();
        }
    }

    fn note_write_progress(&self) {
        if Self::stop_clock(&self.write_stall_since_micros) {
            self.changed.notify_one();
        }
    }

    /// Drops the connection at once (its task sees the flag when woken).
    fn evict(&self) {
        self.evicted.store(true, Ordering::SeqCst);
        self.changed.notify_one();
    }

    /// Whether this connection may be evicted `now`, and how early.
    fn evictable(&self, now: Instant) -> Option<Evictable> {
        if self.closing.load(Ordering::SeqCst) {
            return Some(Evictable::Closing);
        }
        if !self.is_busy() {
            return Some(Evictable::Idle(self.idle_since()));
        }
        let waiting_since = [
            self.since(&self.body_wait_since_micros),
            self.write_stalled_since(),
        ]
        .into_iter()
        .flatten()
        .min()?;
        (now.saturating_duration_since(waiting_since) >= WAITING_ON_CLIENT_EVICTABLE_AFTER)
            .then_some(Evictable::WaitingOnClient(waiting_since))
    }
}

/// A request counted as in flight on its connection, from the moment hyper hands over its
/// headers until hyper drops its response body: after writing the last byte, or when the
/// connection ends. A slow chat or a long response is never idle.
struct RequestInFlight(Arc<Activity>);

impl RequestInFlight {
    fn begin(activity: Arc<Activity>) -> Self {
        activity.requests_in_flight.fetch_add(1, Ordering::SeqCst);
        activity.headers_started.store(false, Ordering::SeqCst);
        activity.changed.notify_one();
        Self(activity)
    }
}

impl Drop for RequestInFlight {
    fn drop(&mut self) {
        let activity = &self.0;
        if activity.requests_in_flight.fetch_sub(1, Ordering::SeqCst) == 1 {
            activity.mark_idle_now();
            activity.changed.notify_one();
            activity.room.notify_one();
        }
    }
}

/// A response body that keeps its request in flight for as long as hyper holds it.
struct CountedBody {
    body: Body,
    _in_flight: RequestInFlight,
}

impl hyper::body::Body for CountedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// A request's body, noting when the application waits for more of it (a client that
/// promises a body and sends it slowly is waiting on itself, and may be evicted at the cap),
/// and counting the bytes it delivers against the budget of bodies in flight until it is
/// dropped.
struct WatchedBody {
    body: Incoming,
    activity: Arc<Activity>,
    budget: Arc<BodyBudget>,
    /// Bytes of this body counted against `budget`: all it has delivered. The frames are
    /// held by whoever reads the body until it is complete, and dropped with it or soon
    /// after (the extractor copies them into one buffer and parses that).
    held: usize,
}

impl hyper::body::Body for WatchedBody {
    type Data = Bytes;
    /// hyper's error, or [`OverBudget`], for the extractor to tell apart.
    type Error = axum::BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::BoxError>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        let activity = &this.activity;
        if polled.is_pending() {
            activity.start_clock(&activity.body_wait_since_micros);
        } else {
            Activity::stop_clock(&activity.body_wait_since_micros);
        }
        match polled {
            Poll::Ready(Some(Ok(frame))) => {
                let bytes = frame.data_ref().map_or(0, Bytes::len);
                if !this.budget.take(bytes) {
                    // The frame is dropped here, and the rest with the body.
                    return Poll::Ready(Some(Err(Box::new(OverBudget))));
                }
                this.held += bytes;
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(err))) => Poll::Ready(Some(Err(err.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for WatchedBody {
    fn drop(&mut self) {
        // The application gave up on the body (too large, too slow) or has it all: it waits
        // no more, and the bytes it was counted for are its reader's to free.
        Activity::stop_clock(&self.activity.body_wait_since_micros);
        if self.held > 0 {
            self.budget.release(self.held);
        }
    }
}

/// The client's socket, noting when the first bytes of a new request arrive, and when output
/// stalls because the client does not read.
struct WatchedStream {
    stream: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for WatchedStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let filled_before = buf.filled().len();
        let polled = Pin::new(&mut this.stream).poll_read(cx, buf);
        if buf.filled().len() > filled_before {
            this.activity.note_bytes_read();
        }
        polled
    }
}

impl AsyncWrite for WatchedStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.stream).poll_write(cx, buf);
        this.activity.note_write(&polled);
        polled
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.stream).poll_write_vectored(cx, bufs);
        this.activity.note_write(&polled);
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// What ends a connection when its deadline passes.
#[derive(Clone, Copy, Debug)]
enum Expiry {
    /// No request for `IDLE_TIMEOUT_SECS`: close gracefully.
    Idle,
    /// A request's headers took longer than `HEADER_READ_TIMEOUT_SECS`: drop.
    Headers,
    /// Asked to close [`CLOSE_LINGER`] ago and still open: drop.
    Linger,
    /// Output has made no progress for `WRITE_STALL_TIMEOUT_SECS`: drop.
    WriteStall,
}

/// A connection's own clocks, kept by its task.
#[derive(Default)]
struct Timers {
    /// When the first bytes of the request being read arrived.
    headers_since: Option<Instant>,
    /// When the connection was asked to close.
    closing_since: Option<Instant>,
}

impl Timers {
    /// The next deadline and what happens then. While a request is in flight only a stalled
    /// write has one: the request's own work may take long, a client that reads nothing may
    /// not.
    fn due(&self, activity: &Activity, limits: &ConnectionLimits) -> Option<(Instant, Expiry)> {
        let between_requests = (!activity.is_busy()).then(|| {
            if let Some(since) = self.closing_since {
                (since + CLOSE_LINGER, Expiry::Linger)
            } else if let Some(since) = self.headers_since {
                (since + limits.header_read_timeout, Expiry::Headers)
            } else {
                (activity.idle_since() + limits.idle_timeout, Expiry::Idle)
            }
        });
        let write_stall = activity
            .write_stalled_since()
            .map(|since| (since + limits.write_stall_timeout, Expiry::WriteStall));
        [between_requests, write_stall]
            .into_iter()
            .flatten()
            .min_by_key(|(at, _)| *at)
    }

    fn observe(&mut self, activity: &Activity) {
        let reading_headers =
            !activity.is_busy() && activity.headers_started.load(Ordering::SeqCst);
        self.headers_since = match (reading_headers, self.headers_since) {
            (true, Some(since)) => Some(since),
            (true, None) => Some(Instant::now()),
            (false, _) => None,
        };
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
        use axum::routing::get;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        let dir = tempfile::tempdir().unwrap();
        let database_url = format!("sqlite://{}", dir.path().join("db").display());
        let config = crate::Config::from_lookup(|name| {
            (name == "DATABASE_URL").then(|| database_url.clone())
        })
        .unwrap();
        let db = crate::db::connect(
            config.database_url.expose(),
            crate::db::Open::CreateIfMissing,
        )
        .await
        .unwrap();
        let state = AppState::new(config, db).unwrap();
        let peer_echo = Router::new().route(
            "/peer",
            get(|ConnectInfo(peer): ConnectInfo<SocketAddr>| async move { peer.to_string() }),
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(serve_router(
            listener,
            peer_echo,
            state,
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
