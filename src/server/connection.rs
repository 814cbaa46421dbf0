//! One connection's task: hyper's `http1` connection over the watched socket, the
//! application behind it, and the timers that close it when a deadline passes.

use std::{convert::Infallible, net::SocketAddr, pin::pin, sync::atomic::Ordering, sync::Arc};

use axum::extract::ConnectInfo;
use hyper::{
    body::{Body as _, Incoming},
    header::{self, HeaderValue},
    server::conn::http1,
    service::service_fn,
    Request,
};
use hyper_util::rt::TokioIo;
use tokio::{
    net::TcpStream,
    time::{sleep_until, Instant},
};
use tower::ServiceExt;

use super::{
    body_budget::HeldBody,
    io::{CountedBody, RequestInFlight, WatchedBody, WatchedStream},
    registry::{Activity, Registered},
    timers::{Expiry, Timers},
    Server, MAX_CONNECTION_BUFFER_BYTES,
};

impl Server {
    pub(super) fn spawn_connection(self: &Arc<Self>, stream: TcpStream, peer: SocketAddr) {
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
            let unread = !request.body().is_end_stream();
            requests.body_unread.store(unread, Ordering::Relaxed);
            let hold = HeldBody::new(budget.clone());
            let mut request = request.map(|body| WatchedBody {
                body,
                activity: requests.clone(),
                hold: hold.clone(),
            });
            request.extensions_mut().insert(ConnectInfo(peer));
            // A handler that keeps the body's bytes keeps them counted (see `HeldBody`).
            request.extensions_mut().insert(hold);
            let router = router.clone();
            async move {
                let mut response = router.oneshot(request).await?;
                // Answered before its body was read (refused by its credential, its rate,
                // its size or its type): hyper closes the connection after the answer
                // rather than read the rest, and the client is told so, or it sends its
                // next request on a connection about to close (a broken pipe).
                if in_flight.body_unread() {
                    let close = HeaderValue::from_static("close");
                    response.headers_mut().insert(header::CONNECTION, close);
                }
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
}
