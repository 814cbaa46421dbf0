//! The ledger audit behind `tokenchat audit`: every balance is the sum of its ledger, every
//! ledger row's running balance is right, and every chat's and embeddings call's rows
//! match its status.

use futures_util::TryStreamExt;

use crate::{db, domain::ChatStatus, services::ServiceResult};

/// What the audit found; `offence_count` is zero when everything holds.
#[derive(Debug)]
pub struct AuditReport {
    pub users: i64,
    pub chats: i64,
    pub ledger_rows: i64,
    pub offence_count: u64,
    /// The first [`OFFENCES_KEPT`] offences, described.
    pub offences: Vec<String>,
}

/// How many offences a report keeps. The audit's memory stays bounded however broken the
/// database is: every offence is handed to the caller as it is found, and only these kept.
pub const OFFENCES_KEPT: usize = 1000;

impl AuditReport {
    pub fn passed(&self) -> bool {
        self.offence_count == 0
    }
}

/// Runs the audit, keeping the first offences in the report.
pub async fn run(db: &db::Db) -> ServiceResult<AuditReport> {
    run_reporting(db, |_| ()).await
}

/// Runs the audit, handing every offence to `found` as the queries stream it.
#[tracing::instrument(level = "debug", skip_all)]
pub async fn run_reporting(db: &db::Db, mut found: impl FnMut(&str)) -> ServiceResult<AuditReport> {
    let mut offences = Vec::new();
    let mut offence_count = 0;
    let mut offend = |offence: String| {
        found(&offence);
        offence_count += 1;
        if offences.len() < OFFENCES_KEPT {
            offences.push(offence);
        }
    };
    let mut users = db::audit::balance_mismatches(db);
    while let Some(user) = users.try_next().await? {
        offend(format!(
            "user {} ({}): balance {} but ledger sums to {}",
            user.user_id, user.username, user.tokens, user.ledger_sum
        ));
    }
    drop(users);
    let mut rows = db::audit::running_mismatches(db);
    while let Some(row) = rows.try_next().await? {
        offend(format!(
            "ledger row {} (user {}): balance_after {} but the running sum is {}",
            row.entry_id, row.user_id, row.balance_after, row.running_sum
        ));
    }
    drop(rows);
    let mut chats = db::audit::chat_mismatches(db);
    while let Some(chat) = chats.try_next().await? {
        offend(format!(
            "chat {} ({}, cost {}): {} reservation(s), {} refund(s), {} stray row(s){}",
            chat.chat_id,
            chat.status,
            chat.cost,
            chat.reservations,
            chat.refunds,
            chat.strays,
            if chat.status == ChatStatus::Answered && !chat.has_response && !chat.erased {
                ", no stored response"
            } else {
                ""
            }
        ));
    }
    drop(chats);
    let mut embeddings = db::audit::embedding_mismatches(db);
    while let Some(call) = embeddings.try_next().await? {
        offend(format!(
            "embedding {} ({}, cost {}): {} reservation(s), {} refund(s), {} stray row(s)",
            call.embedding_id, call.status, call.cost, call.reservations, call.refunds, call.strays
        ));
    }
    drop(embeddings);
    let (users, chats, ledger_rows) = db::audit::totals(db).await?;
    Ok(AuditReport {
        users,
        chats,
        ledger_rows,
        offence_count,
        offences,
    })
}
