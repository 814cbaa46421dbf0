//! The global budget of request-body bytes held in memory across all connections
//! (`MAX_INFLIGHT_BODY_BYTES`), and the trimming of the allocator that gives their memory
//! back to the system once the bodies are gone.
//!
//! A body is read frame by frame into memory until it is complete; a client that sends all
//! of a large body but its last byte makes the server hold the rest for as long as
//! `BODY_READ_TIMEOUT_SECS`. Each frame is counted against the budget as it arrives and the
//! whole body's count given back when its last holder lets it go ([`HeldBody`]): the body as
//! it is read, and a handler that keeps the bytes it read until it is done with them (the
//! `/v1` routes, until the body has been sent to the model). A frame that would pass the
//! budget fails the body with [`OverBudget`], which the extractor answers 503 `busy`.

use std::{
    error::Error,
    fmt,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// How long after freed body bytes pass the trim threshold the allocator is trimmed: the
/// other bodies of a burst of closing connections are freed meanwhile, so one trim returns
/// them all, and trims come at most this often.
const TRIM_DELAY: Duration = Duration::from_secs(1);
/// The most body bytes freed and not yet given back to the system, whatever the budget.
const MAX_TRIM_THRESHOLD: usize = 16 * 1024 * 1024;

/// Body bytes held by requests in flight, and the most there may be.
pub(crate) struct BodyBudget {
    limit: usize,
    held: AtomicUsize,
    /// Body bytes released since the allocator was last trimmed.
    released: AtomicUsize,
    /// Freed bytes past which the allocator is trimmed.
    trim_threshold: usize,
    /// Wakes [`BodyBudget::trim_freed_memory`] when `released` passes `trim_threshold`.
    freed_enough: Notify,
}

/// The bytes of one request's body counted against the budget, given back when the last
/// clone is dropped: the body being read holds one, and the request's extensions another,
/// which a handler may keep for as long as it keeps the bytes.
#[derive(Clone)]
pub struct HeldBody(Arc<Hold>);

struct Hold {
    budget: Arc<BodyBudget>,
    held: AtomicUsize,
}

impl HeldBody {
    pub(crate) fn new(budget: Arc<BodyBudget>) -> Self {
        Self(Arc::new(Hold {
            budget,
            held: AtomicUsize::new(0),
        }))
    }

    /// Counts `bytes` more of the body; `false`, counting nothing, when they do not fit.
    pub(crate) fn take(&self, bytes: usize) -> bool {
        if !self.0.budget.take(bytes) {
            return false;
        }
        self.0.held.fetch_add(bytes, Ordering::Relaxed);
        true
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        let held = *self.held.get_mut();
        if held > 0 {
            self.budget.release(held);
        }
    }
}

/// A body frame would have taken the bytes of bodies in flight past `MAX_INFLIGHT_BODY_BYTES`.
#[derive(Debug)]
pub(crate) struct OverBudget;

impl fmt::Display for OverBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("request bodies in flight hold MAX_INFLIGHT_BODY_BYTES")
    }
}

impl Error for OverBudget {}

impl OverBudget {
    /// Whether `err`, or any error beneath it, is an [`OverBudget`]: axum wraps a body's
    /// error in its own once or twice before an extractor sees it.
    pub(crate) fn caused(err: &(dyn Error + 'static)) -> bool {
        let mut cause = Some(err);
        while let Some(err) = cause {
            if err.is::<Self>() {
                return true;
            }
            cause = err.source();
        }
        false
    }
}

impl BodyBudget {
    pub(crate) fn new(limit: usize) -> Self {
        keep_big_buffers_out_of_the_arenas();
        Self {
            limit,
            held: AtomicUsize::new(0),
            released: AtomicUsize::new(0),
            // A quarter of the budget: freed body memory kept by the allocator stays a small
            // part of what the budget lets bodies hold at once.
            trim_threshold: (limit / 4).clamp(1, MAX_TRIM_THRESHOLD),
            freed_enough: Notify::new(),
        }
    }

    /// Counts `bytes` more against the budget; `false`, counting nothing, when they do not
    /// fit. One atomic add on the way in: the undo when they do not fit may make a
    /// concurrent frame see the budget full for that instant, which errs on the safe side.
    pub(crate) fn take(&self, bytes: usize) -> bool {
        let before = self.held.fetch_add(bytes, Ordering::Relaxed);
        if before.saturating_add(bytes) <= self.limit {
            return true;
        }
        self.held.fetch_sub(bytes, Ordering::Relaxed);
        false
    }

    /// Gives back `bytes` taken by one body, which has been dropped.
    pub(crate) fn release(&self, bytes: usize) {
        self.held.fetch_sub(bytes, Ordering::Relaxed);
        let before = self.released.fetch_add(bytes, Ordering::Relaxed);
        if before < self.trim_threshold && before + bytes >= self.trim_threshold {
            self.freed_enough.notify_one();
        }
    }

    /// Returns memory freed by bodies to the system until `stop` is cancelled: a second
    /// after the body bytes released since the last time pass a quarter of the budget (at
    /// most 16 MiB).
    ///
    /// Why: glibc's malloc keeps freed memory in its arenas for reuse and gives back by
    /// itself only what is free at the top of a heap. A body arrives as frames of up to
    /// 64 KiB (hyper's read buffer), each carved from the arena of the worker thread that
    /// read it, between the connections' longer-lived allocations; once the bodies are
    /// freed their memory is mostly holes. Measured on the test
    /// `bodies_held_one_byte_short_stay_within_the_budget_and_their_memory_is_given_back`
    /// (200 connections, a 4 MiB budget, debug build): RSS 38 MiB before, 49 MiB with the
    /// bodies held, still 48-49 MiB five seconds after the connections closed without
    /// this, 40-41 MiB a second after with it. `malloc_trim(0)` gives back the free pages
    /// of every arena, holes included (`MADV_DONTNEED`); it took about a millisecond there,
    /// on a blocking thread so no request waits for it. Fixing `M_MMAP_THRESHOLD` with
    /// `mallopt` (glibc raises it after freeing a large mapped block, so later large
    /// allocations come from the arenas too) was tried instead and changed nothing
    /// measurable, the frames being below it anyway, so it is left alone. Nor is
    /// `M_ARENA_MAX` set: fewer arenas would only gather the same holes in fewer places,
    /// and the trim empties every arena.
    pub(crate) async fn trim_freed_memory(self: std::sync::Arc<Self>, stop: CancellationToken) {
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = self.freed_enough.notified() => {}
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(TRIM_DELAY) => {}
            }
            let released = self.released.swap(0, Ordering::Relaxed);
            let started = std::time::Instant::now();
            if tokio::task::spawn_blocking(trim_allocator).await.is_ok() {
                tracing::debug!(
                    released,
                    took_us = started.elapsed().as_micros() as u64,
                    "memory freed by request bodies given back to the system"
                );
            }
        }
    }
}

/// The size from which glibc's malloc maps each allocation on its own and unmaps it when it
/// is freed: its default starting point, held there.
const MMAP_THRESHOLD_BYTES: i32 = 128 * 1024;

/// Fixes glibc's mmap threshold at 128 KiB, so that every buffer at least that big (a whole
/// request body, up to `V1_MAX_BODY_BYTES`, issue 24) is mapped on its own and given back to
/// the system the moment it is freed, as the budget assumes.
///
/// Why: glibc raises the threshold by itself, up to 32 MiB, each time it unmaps a block, so
/// after the first 20 MiB body the next ones came from the arenas, where a freed body stays
/// resident until a trim and a growing one is copied on every doubling. Measured on the test
/// `a_hundred_bodies_of_20_mib_at_once_or_slowly_stay_within_the_budget_and_a_constant`
/// (debug build, a 64 MiB budget): at most 225 MiB resident from 38 MiB with bodies sent
/// slowly, three times the budget; with the threshold held, within the budget and the
/// test's 24 MiB allowance. (Frames of 64 KiB at most stay below it, in the arenas, which
/// `trim_freed_memory` empties.)
#[allow(unsafe_code)]
fn keep_big_buffers_out_of_the_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets a parameter of the allocator, under its own lock.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES);
    }
}

// glibc's `malloc_trim` has no safe wrapper in any maintained crate.
#[allow(unsafe_code)]
fn trim_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim takes the arenas' own locks; it is safe to call at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_past_the_limit_are_refused_and_released_bytes_make_room_again() {
        let budget = BodyBudget::new(100);
        assert!(budget.take(60));
        assert!(budget.take(40));
        assert!(!budget.take(1));
        budget.release(40);
        assert!(!budget.take(41));
        assert!(budget.take(40));
        budget.release(100);
        assert!(budget.take(100));
    }

    #[test]
    fn a_bodys_bytes_are_given_back_when_its_last_holder_lets_go() {
        let budget = Arc::new(BodyBudget::new(100));
        let body = HeldBody::new(budget.clone());
        assert!(body.take(60));
        assert!(!body.take(41));
        let handler = body.clone();
        drop(body);
        assert!(!budget.take(41), "the handler still holds the body");
        drop(handler);
        assert!(budget.take(100));
    }

    #[test]
    fn an_over_budget_error_is_found_beneath_the_errors_wrapping_it() {
        let wrapped = axum::Error::new(axum::Error::new(OverBudget));
        assert!(OverBudget::caused(&wrapped));
        let other = axum::Error::new(std::io::Error::other("reset"));
        assert!(!OverBudget::caused(&other));
    }
}
