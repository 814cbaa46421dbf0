//! The state every handler shares: one `Arc` around the services and what the layers need,
//! so that a layer or extractor that takes it costs one reference count.

use std::{ops::Deref, sync::Arc};

use crate::{
    config::Config,
    db::Db,
    llm::LlmClient,
    services::{
        accounts::Accounts, alerts::Alerts, chat::Chats, health::Health, passwords::PasswordHasher,
        recovery::Recovery, throttle::Throttle,
    },
    telemetry::Metrics,
};

/// What every handler shares; cloning it is one reference count.
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

/// What [`AppState`] holds: the services, each built once, and the handles the layers and
/// the server use.
pub struct Shared {
    pub config: Arc<Config>,
    pub db: Db,
    pub llm: LlmClient,
    pub metrics: Metrics,
    pub throttle: Arc<Throttle>,
    pub passwords: Arc<PasswordHasher>,
    pub accounts: Accounts,
    pub chats: Arc<Chats>,
    pub health: Arc<Health>,
    pub recovery: Recovery,
    /// Alert events; its worker runs beside serving.
    pub alerts: Alerts,
}

impl AppState {
    pub fn new(config: Config, db: Db) -> Result<Self, reqwest::Error> {
        let config = Arc::new(config);
        // The encodings' tables load once, now, rather than in the first priced chat.
        for (_, model) in config.price_book.models() {
            model.tokenizer.load();
        }
        let metrics = Metrics::new();
        let llm = LlmClient::new(&config, metrics.clone())?;
        let throttle = Arc::new(Throttle::new(&config.abuse, &db));
        let passwords = Arc::new(PasswordHasher::new(config.abuse.password_hash_queue));
        let alerts = Alerts::new(config.alerts.as_ref(), db.clone(), metrics.clone())?;
        let chats = Arc::new(
            Chats::new(
                db.clone(),
                llm.clone(),
                metrics.clone(),
                throttle.clone(),
                config.clone(),
            )
            .with_alerts(alerts.clone()),
        );
        Ok(Self(Arc::new(Shared {
            accounts: Accounts::new(
                db.clone(),
                passwords.clone(),
                throttle.clone(),
                config.clone(),
            ),
            passwords,
            health: Arc::new(Health::new(db.clone(), llm.clone())),
            recovery: Recovery::new(db.clone(), config.clone(), metrics.clone()),
            chats,
            alerts,
            config,
            db,
            llm,
            metrics,
            throttle,
        })))
    }
}

impl Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}
