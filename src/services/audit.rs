//! The ledger audit behind `tokenchat audit`: every balance is the sum of its ledger, every
//! ledger row's running balance is right, and every chat's rows match its status.

use crate::{db, domain::ChatStatus, services::ServiceResult};

/// What the audit found; `offences` is empty when everything holds.
#[derive(Debug)]
pub struct AuditReport {
    pub users: i64,
    pub chats: i64,
    pub ledger_rows: i64,
    pub offences: Vec<String>,
}

impl AuditReport {
    pub fn passed(&self) -> bool {
        self.offences.is_empty()
    }
}

#[tracing::instrument(level = "debug", skip_all)]
pub async fn run(db: &db::Db) -> ServiceResult<AuditReport> {
    let mut offences = Vec::new();
    for user in db::audit::balance_mismatches(db).await? {
        offences.push(format!(
            "user {} ({}): balance {} but ledger sums to {}",
            user.user_id, user.username, user.tokens, user.ledger_sum
        ));
    }
    for row in db::audit::running_mismatches(db).await? {
        offences.push(format!(
            "ledger row {} (user {}): balance_after {} but the running sum is {}",
            row.entry_id, row.user_id, row.balance_after, row.running_sum
        ));
    }
    for chat in db::audit::chat_mismatches(db).await? {
        offences.push(format!(
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
    let (users, chats, ledger_rows) = db::audit::totals(db).await?;
    Ok(AuditReport {
        users,
        chats,
        ledger_rows,
        offences,
    })
}
