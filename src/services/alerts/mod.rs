//! Alerts (issue 27): when a key's budget or a user's balance crosses a configured fraction
//! spent, one signed JSON event to `ALERT_WEBHOOK_URL`, once per crossing across instances.
//!
//! A settled charge only hands `(user, key)` to a bounded queue ([`Alerts::charged`]): no
//! database work and no waiting on the request's path, and nothing at all when alerts are
//! off. One background task ([`Alerts::worker`], run by `serve` beside the other periodic
//! work) reads what the subjects stand at ([`detect`]), claims each crossing in the database
//! (the instance whose insert made the row sends it) and posts it ([`sender`]).
//!
//! A full queue drops the check, counted and logged: the check reads the subject's state
//! rather than one charge's share, so the subject's next charge still finds the crossing.

mod detect;
pub mod sender;

use std::{
    collections::HashSet,
    future::Future,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
};

use tokio::{
    sync::mpsc::{self, error::TrySendError},
    task::JoinSet,
};

pub use detect::Event;
pub use sender::{sign, SIGNATURE_HEADER};

use crate::{config::AlertsConfig, db::Db, telemetry::Metrics};

/// Settled charges waiting to be checked, at most.
const QUEUE: usize = 4096;
/// Events being delivered at once, at most; beyond, checking waits (and the queue fills).
const MAX_DELIVERIES: usize = 16;
/// Checks taken from the queue at a time: each subject in them is read once.
const BATCH: usize = 512;

/// The alerts of this process; cloning it is one reference count. Off (`None` inside) when
/// `ALERT_WEBHOOK_URL` is unset.
#[derive(Clone, Default)]
pub struct Alerts(Option<Arc<Inner>>);

struct Inner {
    checks: mpsc::Sender<Check>,
    /// The queue's receiving end, until the worker takes it.
    waiting: Mutex<Option<mpsc::Receiver<Check>>>,
    db: Db,
    config: AlertsConfig,
    metrics: Metrics,
    webhook: sender::Webhook,
    dropped: AtomicU64,
}

/// A settled charge to look at: its payer, and its key when that key has a budget.
#[derive(Debug, Clone, Copy)]
struct Check {
    user_id: i64,
    key_id: Option<i64>,
}

impl Alerts {
    /// Alerts as `config` sets them; off for `None`.
    pub fn new(
        config: Option<&AlertsConfig>,
        db: Db,
        metrics: Metrics,
    ) -> Result<Self, reqwest::Error> {
        let Some(config) = config else {
            return Ok(Self(None));
        };
        let webhook =
            sender::Webhook::new(config.url.clone(), config.secret.clone(), metrics.clone())?;
        let (checks, waiting) = mpsc::channel(QUEUE);
        Ok(Self(Some(Arc::new(Inner {
            checks,
            waiting: Mutex::new(Some(waiting)),
            db,
            config: config.clone(),
            metrics,
            webhook,
            dropped: AtomicU64::new(0),
        }))))
    }

    /// A charge of `user_id` (through the key `key_id` with a budget, if any) is final:
    /// queue a look at both. Never waits; with alerts off, does nothing.
    pub fn charged(&self, user_id: i64, key_id: Option<i64>) {
        let Some(inner) = &self.0 else {
            return;
        };
        let check = Check { user_id, key_id };
        match inner.checks.try_send(check) {
            Ok(()) | Err(TrySendError::Closed(_)) => {}
            Err(TrySendError::Full(_)) => {
                inner.metrics.alert("dropped");
                // One line for the first drop and each thousandth, not one a chat.
                let dropped = inner.dropped.fetch_add(1, Ordering::Relaxed);
                if dropped % 1000 == 0 {
                    tracing::warn!(
                        dropped = dropped + 1,
                        "the alert queue is full: a settled charge was not checked for alerts"
                    );
                }
            }
        }
    }

    /// The task that checks queued charges and sends their alerts, until it is dropped (at
    /// shutdown, with what it was still delivering); `None` when alerts are off or the task
    /// was already taken.
    pub fn worker(&self) -> Option<impl Future<Output = ()> + Send + 'static> {
        let inner = self.0.clone()?;
        let checks = inner.waiting.lock().ok()?.take()?;
        Some(work(inner, checks))
    }
}

async fn work(inner: Arc<Inner>, mut checks: mpsc::Receiver<Check>) {
    let mut claimed = detect::Claimed::default();
    let mut deliveries = JoinSet::new();
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        tokio::select! {
            Some(_) = deliveries.join_next(), if !deliveries.is_empty() => {}
            taken = checks.recv_many(&mut batch, BATCH), if deliveries.len() < MAX_DELIVERIES => {
                if taken == 0 {
                    break;
                }
                for event in inner.detect(&batch, &mut claimed).await {
                    let inner = inner.clone();
                    deliveries.spawn(async move { inner.deliver(event).await });
                }
                batch.clear();
            }
        }
    }
    while deliveries.join_next().await.is_some() {}
}

impl Inner {
    /// The new events of the subjects of `batch`, each subject read once.
    async fn detect(&self, batch: &[Check], claimed: &mut detect::Claimed) -> Vec<detect::Event> {
        let users: HashSet<i64> = batch.iter().map(|check| check.user_id).collect();
        let keys: HashSet<i64> = batch.iter().filter_map(|check| check.key_id).collect();
        let thresholds = &self.config.thresholds;
        let mut events = Vec::new();
        for key_id in keys {
            match detect::key_budget(&self.db, thresholds, claimed, key_id).await {
                Ok(found) => events.extend(found),
                Err(err) => {
                    tracing::warn!(key_id, error = %err, "could not check a key's budget for alerts")
                }
            }
        }
        for user_id in users {
            match detect::balance(&self.db, thresholds, claimed, user_id).await {
                Ok(found) => events.extend(found),
                Err(err) => {
                    tracing::warn!(user_id, error = %err, "could not check a balance for alerts")
                }
            }
        }
        events
    }

    async fn deliver(&self, event: detect::Event) {
        let id = event.id();
        match serde_json::to_vec(&event) {
            Ok(body) => self.webhook.deliver(id, body).await,
            Err(err) => tracing::error!(alert_id = id, error = %err, "could not encode an alert"),
        }
    }
}
