//! The open connections, for the caps and for choosing which one to evict, and each one's
//! `Activity`: what its socket, its request body and its requests in flight say about it.

use std::{
    collections::HashMap,
    io,
    net::IpAddr,
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex, PoisonError,
    },
    task::Poll,
    time::Duration,
};

use tokio::{sync::Notify, time::Instant};

use super::{NOT_WAITING, WAITING_ON_CLIENT_EVICTABLE_AFTER};

/// The open connections, for the caps and for choosing which one to evict.
pub(super) struct Registry {
    pub(super) epoch: Instant,
    pub(super) next_id: AtomicU64,
    pub(super) open: Mutex<OpenConnections>,
    /// Notified when a connection closes, starts closing or has no request left in flight:
    /// the accept loop, when it waits for room, looks again.
    pub(super) room: Arc<Notify>,
}

#[derive(Default)]
pub(super) struct OpenConnections {
    pub(super) by_id: HashMap<u64, Arc<Activity>>,
    /// The same connections by client address, for the per-address cap; at most
    /// `MAX_CONNECTIONS_PER_ADDRESS` (and one on its way out) each.
    pub(super) per_address: HashMap<IpAddr, Vec<Arc<Activity>>>,
}

impl Registry {
    pub(super) fn new() -> Self {
        Self {
            epoch: Instant::now(),
            next_id: AtomicU64::new(0),
            open: Mutex::new(OpenConnections::default()),
            room: Arc::new(Notify::new()),
        }
    }

    pub(super) fn open(&self) -> std::sync::MutexGuard<'_, OpenConnections> {
        // The map stays consistent whatever panicked while holding it.
        self.open.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn len(&self) -> usize {
        self.open().by_id.len()
    }

    /// Makes room for a new connection from `address`, which may hold `cap`: `true` when it
    /// holds fewer (not counting any evicted and on their way out), or once one of its
    /// connections, the first by [`Evictable`]'s order, has been evicted; `false` when none
    /// of them may be.
    pub(super) fn make_room_from(&self, address: IpAddr, cap: usize) -> bool {
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

    pub(super) fn register(&self, address: IpAddr) -> Arc<Activity> {
        let address = address.to_canonical();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let activity = Arc::new(Activity {
            id,
            address,
            epoch: self.epoch,
            requests_in_flight: AtomicUsize::new(0),
            idle_since_micros: AtomicU64::new(0),
            headers_started: AtomicBool::new(false),
            body_unread: AtomicBool::new(false),
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

    pub(super) fn remove(&self, id: u64) {
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
    pub(super) fn evict_one(&self) -> bool {
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
pub(super) fn first_to_evict<'a>(
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
pub(super) enum Evictable {
    /// Already asked to close (idle for too long, or shutdown): it would be gone soon anyway.
    Closing,
    /// No request in flight since this instant: nothing is lost but a keep-alive connection.
    Idle(Instant),
    /// A request in flight, but waiting on its client since this instant: for more of its
    /// body, or for it to take the response.
    WaitingOnClient(Instant),
}

/// Removes its connection from the registry when the connection's task ends, however it ends.
pub(super) struct Registered<'a> {
    pub(super) registry: &'a Registry,
    pub(super) id: u64,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.registry.remove(self.id);
        self.registry.room.notify_one();
    }
}

/// What one connection is doing, as far as its timers and the caps care.
pub(super) struct Activity {
    pub(super) id: u64,
    /// The client's address, for the per-address cap.
    pub(super) address: IpAddr,
    pub(super) epoch: Instant,
    pub(super) requests_in_flight: AtomicUsize,
    /// When the last request in flight ended (or the connection opened), in microseconds
    /// since `epoch`.
    pub(super) idle_since_micros: AtomicU64,
    /// Bytes arrived while no request was in flight: a request's headers are being read.
    pub(super) headers_started: AtomicBool,
    /// The request in flight has a body the application has not read to its end (yet).
    pub(super) body_unread: AtomicBool,
    /// Since when the application has been waiting for more of a request's body, in
    /// microseconds since `epoch`; [`NOT_WAITING`] when it is not.
    pub(super) body_wait_since_micros: AtomicU64,
    /// Since when the socket has refused output (the client's window is full), in
    /// microseconds since `epoch`; [`NOT_WAITING`] once a write goes through.
    pub(super) write_stall_since_micros: AtomicU64,
    /// Asked to close gracefully.
    pub(super) closing: AtomicBool,
    /// Evicted to make room for a new connection: drop at once.
    pub(super) evicted: AtomicBool,
    /// Wakes the connection's task to look at the fields above again.
    pub(super) changed: Notify,
    pub(super) room: Arc<Notify>,
}

impl Activity {
    pub(super) fn micros_now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(NOT_WAITING - 1)
    }

    pub(super) fn instant_of(&self, micros: u64) -> Instant {
        self.epoch + Duration::from_micros(micros)
    }

    pub(super) fn mark_idle_now(&self) {
        self.idle_since_micros
            .store(self.micros_now(), Ordering::SeqCst);
    }

    pub(super) fn idle_since(&self) -> Instant {
        self.instant_of(self.idle_since_micros.load(Ordering::SeqCst))
    }

    pub(super) fn is_busy(&self) -> bool {
        self.requests_in_flight.load(Ordering::SeqCst) > 0
    }

    pub(super) fn note_bytes_read(&self) {
        if !self.is_busy() && !self.headers_started.load(Ordering::SeqCst) {
            self.headers_started.store(true, Ordering::SeqCst);
            self.changed.notify_one();
        }
    }

    /// Starts `clock` unless it is running; `true` when it was started.
    pub(super) fn start_clock(&self, clock: &AtomicU64) -> bool {
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
    pub(super) fn stop_clock(clock: &AtomicU64) -> bool {
        clock.swap(NOT_WAITING, Ordering::SeqCst) != NOT_WAITING
    }

    pub(super) fn since(&self, clock: &AtomicU64) -> Option<Instant> {
        match clock.load(Ordering::SeqCst) {
            NOT_WAITING => None,
            micros => Some(self.instant_of(micros)),
        }
    }

    pub(super) fn note_write(&self, polled: &Poll<io::Result<usize>>) {
        match polled {
            Poll::Pending => self.note_write_stalled(),
            Poll::Ready(Ok(written)) if *written > 0 => self.note_write_progress(),
            Poll::Ready(_) => {}
        }
    }

    pub(super) fn write_stalled_since(&self) -> Option<Instant> {
        self.since(&self.write_stall_since_micros)
    }

    pub(super) fn note_write_stalled(&self) {
        // The connection's task arms its write-stall deadline.
        if self.start_clock(&self.write_stall_since_micros) {
            self.changed.notify_one();
        }
    }

    pub(super) fn note_write_progress(&self) {
        if Self::stop_clock(&self.write_stall_since_micros) {
            self.changed.notify_one();
        }
    }

    /// Drops the connection at once (its task sees the flag when woken).
    pub(super) fn evict(&self) {
        self.evicted.store(true, Ordering::SeqCst);
        self.changed.notify_one();
    }

    /// Whether this connection may be evicted `now`, and how early.
    pub(super) fn evictable(&self, now: Instant) -> Option<Evictable> {
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
