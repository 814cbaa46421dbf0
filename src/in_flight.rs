//! Work that outlives the request that began it (a chat settles even when its client has
//! gone): tracked, so that shutdown waits for it, and cut short when the grace is over.

use tokio_util::{sync::CancellationToken, task::TaskTracker};

/// The chats and embeddings calls in progress, and the model-token counts they write in
/// the background: what shutdown waits for, and cuts short after its grace.
#[derive(Clone, Default)]
pub struct WorkInFlight {
    /// Each call's task and each background count; shutdown closes the tracker and waits
    /// for them to end.
    pub tasks: TaskTracker,
    /// Cancelled when shutdown's grace period is over: calls still waiting for the model
    /// give up and are refunded, so the process can exit with its accounts settled.
    pub cut_short: CancellationToken,
}
