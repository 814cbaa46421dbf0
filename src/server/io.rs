//! The watched socket and bodies: wrappers that tell a connection's `Activity` when bytes
//! arrive, when writes stall, when the application waits for a body and how long a request
//! stays in flight.

use std::{
    io,
    pin::Pin,
    sync::{atomic::Ordering, Arc},
    task::{Context, Poll},
};

use axum::body::{Body, Bytes};
use hyper::body::{Frame, Incoming, SizeHint};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};

use super::{
    body_budget::{HeldBody, OverBudget},
    registry::Activity,
};

/// A request counted as in flight on its connection, from the moment hyper hands over its
/// headers until hyper drops its response body: after writing the last byte, or when the
/// connection ends. A slow chat or a long response is never idle.
pub(super) struct RequestInFlight(Arc<Activity>);

impl RequestInFlight {
    pub(super) fn begin(activity: Arc<Activity>) -> Self {
        activity.requests_in_flight.fetch_add(1, Ordering::SeqCst);
        activity.headers_started.store(false, Ordering::SeqCst);
        activity.changed.notify_one();
        Self(activity)
    }

    /// Whether the request has a body the application has not read to its end.
    pub(super) fn body_unread(&self) -> bool {
        self.0.body_unread.load(Ordering::Relaxed)
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
pub(super) struct CountedBody {
    pub(super) body: Body,
    pub(super) _in_flight: RequestInFlight,
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
/// and counting the bytes it delivers against the budget of bodies in flight until it and
/// the request's [`HeldBody`] are dropped.
pub(super) struct WatchedBody {
    pub(super) body: Incoming,
    pub(super) activity: Arc<Activity>,
    /// Every byte this body delivered, counted against the budget. The frames are held by
    /// whoever reads the body until it is complete, and dropped with it or soon after (the
    /// extractor copies them into one buffer); a handler that keeps that buffer keeps the
    /// request's clone of this hold with it.
    pub(super) hold: HeldBody,
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
                if this.body.is_end_stream() {
                    activity.body_unread.store(false, Ordering::Relaxed);
                }
                let bytes = frame.data_ref().map_or(0, Bytes::len);
                if !this.hold.take(bytes) {
                    // The frame is dropped here, and the rest with the body.
                    return Poll::Ready(Some(Err(Box::new(OverBudget))));
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(err))) => Poll::Ready(Some(Err(err.into()))),
            Poll::Ready(None) => {
                activity.body_unread.store(false, Ordering::Relaxed);
                Poll::Ready(None)
            }
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
    }
}

/// The client's socket, noting when the first bytes of a new request arrive, and when output
/// stalls because the client does not read.
pub(super) struct WatchedStream {
    pub(super) stream: TcpStream,
    pub(super) activity: Arc<Activity>,
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
