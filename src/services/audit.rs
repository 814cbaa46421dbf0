//! The ledger audit behind `tokenchat audit`: every balance is the sum of its ledger, every
//! ledger row's running balance is right, every user's held tokens are what their held calls
//! in flight reserved, every chat's and embeddings call's rows match its
//! status, every priced charge is its usage at the prices recorded with it, capped at its
//! reservation, and every key's budget spending is what its calls of the period hold.

use futures_util::TryStreamExt;

use crate::{
    db,
    domain::ChatStatus,
    pricing::{Prices, TokenCounts},
    services::ServiceResult,
};

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
    let mut holds = db::audit::held_mismatches(db);
    while let Some(user) = holds.try_next().await? {
        offend(format!(
            "user {} ({}): {} tokens held but their held calls in flight reserved {}",
            user.user_id, user.username, user.held, user.pending_held
        ));
    }
    drop(holds);
    let mut chats = db::audit::chat_mismatches(db);
    while let Some(chat) = chats.try_next().await? {
        offend(format!(
            "chat {} ({}, cost {}{}{}): {}{}",
            chat.chat_id,
            chat.status,
            chat.cost,
            reserved_beside(chat.cost, chat.reserved),
            if chat.held { ", held" } else { "" },
            chat.rows,
            if chat.status == ChatStatus::Answered && !chat.has_response && !chat.erased {
                ", no stored response"
            } else {
                ""
            }
        ));
    }
    drop(chats);
    let mut priced = db::audit::priced_charges(db);
    while let Some(chat) = priced.try_next().await? {
        let prices = Prices {
            prompt: chat.price_prompt as u64,
            cached_prompt: chat.price_cached_prompt as u64,
            completion: chat.price_completion as u64,
            request: chat.price_request as u64,
            max_output_tokens: 0,
        };
        let used = [
            chat.prompt_tokens,
            chat.cached_tokens,
            chat.completion_tokens,
        ]
        .map(|tokens| tokens.and_then(|tokens| u64::try_from(tokens).ok()));
        let owed = match used {
            [Some(prompt), Some(cached), Some(completion)] => Some(charged_for(
                &prices,
                TokenCounts {
                    prompt,
                    cached,
                    completion,
                },
            )),
            _ => None,
        };
        match owed.map(|owed| owed.min(chat.reserved)) {
            Some(owed) if owed == chat.cost => {}
            Some(owed) => offend(format!(
                "chat {}: charged {} but its usage at its prices costs {owed} (reserved {})",
                chat.chat_id, chat.cost, chat.reserved
            )),
            None => offend(format!(
                "chat {}: priced, but its usage cannot be priced (prompt {:?}, cached {:?}, \
                 completion {:?})",
                chat.chat_id, chat.prompt_tokens, chat.cached_tokens, chat.completion_tokens
            )),
        }
    }
    drop(priced);
    let mut embeddings = db::audit::embedding_mismatches(db);
    while let Some(call) = embeddings.try_next().await? {
        offend(format!(
            "embedding {} ({}, cost {}{}{}): {}",
            call.embedding_id,
            call.status,
            call.cost,
            reserved_beside(call.cost, call.reserved),
            if call.held { ", held" } else { "" },
            call.rows
        ));
    }
    drop(embeddings);
    let mut priced = db::audit::priced_embeddings(db);
    while let Some(call) = priced.try_next().await? {
        let prices = Prices {
            prompt: call.price_prompt as u64,
            cached_prompt: call.price_prompt as u64,
            completion: 0,
            request: call.price_request as u64,
            max_output_tokens: 0,
        };
        let owed = call
            .prompt_tokens
            .and_then(|prompt| u64::try_from(prompt).ok())
            .map(|prompt| {
                let used = TokenCounts {
                    prompt,
                    ..TokenCounts::default()
                };
                charged_for(&prices, used)
            })
            .map(|owed| owed.min(call.reserved));
        if owed != Some(call.cost) {
            offend(format!(
                "embedding {}: charged {} but its usage at its prices costs {owed:?} \
                 (reserved {})",
                call.embedding_id, call.cost, call.reserved
            ));
        }
    }
    drop(priced);
    for (owner, mut budgets) in [
        ("API key", db::audit::budget_mismatches(db)),
        ("user", db::audit::user_budget_mismatches(db)),
    ] {
        while let Some(found) = budgets.try_next().await? {
            offend(format!(
                "{owner} {}: its budget has {} spent this period but its calls hold {}",
                found.id, found.budget_spent, found.calls_hold
            ));
        }
    }
    let (users, chats, ledger_rows) = db::audit::totals(db).await?;
    Ok(AuditReport {
        users,
        chats,
        ledger_rows,
        offence_count,
        offences,
    })
}

/// What `used` costs at `prices` before the reservation caps it. A usage too large to
/// count (a broken upstream's 10^18 tokens) costs more than any reservation, as the server
/// charged it: the reservation.
fn charged_for(prices: &Prices, used: TokenCounts) -> i64 {
    prices.charge(used).unwrap_or(i64::MAX)
}

/// `, reserved N` when a call reserved more than its cost (a priced one), else nothing.
fn reserved_beside(cost: i64, reserved: i64) -> String {
    if reserved == cost {
        String::new()
    } else {
        format!(", reserved {reserved}")
    }
}
