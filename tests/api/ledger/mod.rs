//! Money-grade accounting: the ledger, history, idempotent retries and recovery.

mod balance_moves;
mod history_pages;
mod idempotent_retries;
mod recovery_and_audit;
