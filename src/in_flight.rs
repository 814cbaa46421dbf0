//! Work that outlives the request that began it (a chat settles even when its client has
//! gone): tracked, so that shutdown waits for it, and cut short when the grace is over.

use tokio_util::{sync::CancellationToken, task::TaskTracker};

/// The chats (and embeddings calls) in progress, and what shutdown does to them.
#[derive(Clone, Default)]
pub struct InFlight {
    /// Each call's task; shutdown closes the tracker and waits for them to settle.
    pub tasks: TaskTracker,
    /// Cancelled when shutdown's grace period is over: calls still waiting for the model
    /// give up and are refunded, so the process can exit with its accounts settled.
    pub cut_short: CancellationToken,
}
