//! The limits a call passes before anything is reserved: its API key's and its user's
//! allowed models, model tokens a minute and the user's requests a minute, in that order
//! (a call refused for tokens uses none of the user's requests; a key's requests are
//! counted earlier, with the key's look-up, for every request it makes). What it passes
//! with: where the rates stand for OpenAI's headers, the budgets its reservation counts
//! against, and the token rates its model tokens are counted in once it is over.

use tokio_util::task::TaskTracker;

use crate::{
    db::Db,
    domain::{Budgets, Limits},
    services::{
        rates::{self, KeyRate, RateState},
        ServiceResult,
    },
};

/// A call that passed its limits.
#[derive(Debug, Clone, Default)]
pub struct Admitted {
    /// The requests a minute closest to its end (the key's or the user's), if one applies.
    pub requests: Option<RateState>,
    /// The model tokens a minute closest to its end, if one applies.
    pub tokens: Option<RateState>,
    pub budgets: Budgets,
    pub token_meters: TokenMeters,
}

/// Why a call was refused before anything was reserved.
#[derive(Debug, Clone)]
pub enum Refused {
    /// The key or the user may not ask for this model.
    ModelNotAllowed,
    /// A rate is spent; where the rates stand for the headers.
    Rate {
        retry_after_secs: u64,
        requests: Option<RateState>,
        tokens: Option<RateState>,
    },
}

/// The token rates (`key-tokens:<id>`, `user-tokens:<id>`, with their tokens a minute) a
/// call's model tokens are counted in once it is over.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenMeters(Vec<(String, i64)>);

impl TokenMeters {
    /// Counts a call's `tokens` in each rate, at `now_ms`; a failure is logged, since the
    /// call it counts is over and settled.
    pub async fn count(&self, db: &Db, tokens: i64, now_ms: i64) {
        for (name, tpm) in &self.0 {
            if let Err(err) = rates::count_tokens(db, name, *tpm, tokens, now_ms).await {
                tracing::warn!(error = %err, "a call's model tokens were not counted in its rate");
            }
        }
    }

    /// Counts `tokens` as [`Self::count`] does, in a tracked task of its own, so that the
    /// answer does not wait for it.
    pub fn count_in_background(&self, tasks: &TaskTracker, db: &Db, tokens: i64, now_ms: i64) {
        if self.0.is_empty() {
            return;
        }
        let (db, meters) = (db.clone(), self.clone());
        tasks.spawn(async move { meters.count(&db, tokens, now_ms).await });
    }
}

/// Who makes a call, and what limits them: the user (`user_id`, limited by `user`) and the
/// API key it came with, if any, with where the key's requests a minute stood once its
/// request was counted (at authentication).
pub struct Caller<'a> {
    pub user_id: i64,
    pub user: &'a Limits,
    pub key: Option<(i64, &'a Limits)>,
    pub key_requests: Option<RateState>,
}

/// Checks a call of `caller` to `model` at `now_ms`, and counts it in the user's requests.
#[tracing::instrument(level = "debug", skip_all)]
pub async fn admit(
    db: &Db,
    caller: Caller<'_>,
    model: &str,
    now_ms: i64,
) -> ServiceResult<Result<Admitted, Refused>> {
    let Caller {
        user_id,
        user,
        key,
        key_requests,
    } = caller;
    // The common case, a user and a key with no limits, costs nothing more.
    if user.is_none() && key.is_none_or(|(_, limits)| limits.is_none()) {
        return Ok(Ok(Admitted::default()));
    }
    let key_limits = key.map(|(_, limits)| limits);
    if !user.allows_model(model) || key_limits.is_some_and(|key| !key.allows_model(model)) {
        return Ok(Err(Refused::ModelNotAllowed));
    }
    let mut admitted = Admitted {
        requests: key_requests,
        ..Admitted::default()
    };
    let token_rates = [
        key.and_then(|(key_id, limits)| Some((rates::key_tokens(key_id), limits.tpm?))),
        user.tpm.map(|tpm| (rates::user_tokens(user_id), tpm)),
    ];
    for (name, tpm) in token_rates.into_iter().flatten() {
        let found = rates::tokens_left(db, &name, tpm, now_ms).await?;
        if let Err(refused) = admitted.stand(Per::Tokens, found) {
            return Ok(Err(refused));
        }
        admitted.token_meters.0.push((name, tpm));
    }
    // The user's own: the key's were counted with its look-up.
    if let Some(rpm) = user.rpm {
        let found = rates::request(db, &rates::user_requests(user_id), rpm, now_ms).await?;
        if let Err(refused) = admitted.stand(Per::Requests, found) {
            return Ok(Err(refused));
        }
    }
    let now = now_ms.div_euclid(1000);
    admitted.budgets = Budgets {
        key: key.and_then(|(key_id, limits)| Some((key_id, limits.budget?.use_at(now)))),
        user: user.budget.map(|budget| budget.use_at(now)),
    };
    Ok(Ok(admitted))
}

/// What a rate counts: requests or model tokens (a minute).
#[derive(Debug, Clone, Copy)]
enum Per {
    Requests,
    Tokens,
}

impl Admitted {
    /// Takes in where one of the call's rates of `per` stands: kept when it leaves less
    /// than the rate already shown, or, when the rate is spent, the refusal with it shown.
    fn stand(&mut self, per: Per, found: KeyRate) -> Result<(), Refused> {
        let shown = match per {
            Per::Requests => &mut self.requests,
            Per::Tokens => &mut self.tokens,
        };
        match found {
            KeyRate::Admitted(state) => {
                *shown = tighter(*shown, state);
                Ok(())
            }
            KeyRate::Refused {
                retry_after_secs,
                state,
            } => {
                *shown = Some(state);
                Err(Refused::Rate {
                    retry_after_secs,
                    requests: self.requests,
                    tokens: self.tokens,
                })
            }
        }
    }
}

/// Of two rates, the one with less left.
fn tighter(known: Option<RateState>, other: RateState) -> Option<RateState> {
    Some(match known {
        Some(known) if known.remaining <= other.remaining => known,
        _ => other,
    })
}
