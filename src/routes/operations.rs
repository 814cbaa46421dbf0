//! What load balancers and monitoring ask: `/health` (the process is up), `/ready` (the
//! database answers and is migrated; the model's reachability beside it) and `/metrics`
//! (Prometheus' text format, behind `METRICS_TOKEN` when that is set).

use axum::{
    extract::State,
    http::{header, HeaderMap, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    Json,
};
use secrecy::ExposeSecret;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::error::ApiError;
use crate::{llm::ModelProbe, services::health::DatabaseReadiness, AppState};

/// Liveness: answers without touching the database (also the benchmark's static route).
#[utoipa::path(get, path = "/health", tag = "operations", responses((status = 200, description = "The process is up", body = super::openapi::Health)))]
pub async fn health() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

/// Readiness: 200 when the database answers with every migration applied, 503
/// `not_ready` otherwise; both say what the database and the model were found to be.
#[utoipa::path(get, path = "/ready", tag = "operations", responses((status = 200, description = "The database answers and is migrated", body = super::openapi::Readiness), (status = 503, description = "not_ready, with the database and model fields", body = super::openapi::Error)))]
pub async fn ready(State(state): State<AppState>) -> Response {
    let readiness = state.health.readiness().await;
    let (database_status, migrations) = match &readiness.database {
        DatabaseReadiness::Ready(migrations) => ("ok", Some(migrations)),
        DatabaseReadiness::NotMigrated(migrations) => ("not_migrated", Some(migrations)),
        DatabaseReadiness::Unreachable => ("unreachable", None),
    };
    let mut database = json!({ "status": database_status });
    if let Some(migrations) = migrations {
        database["migrations_applied"] = json!(migrations.applied);
        database["migrations_known"] = json!(migrations.known);
    }
    let mut model = json!({
        "status": readiness.model.as_str(),
        "name": state.llm.model_name(),
    });
    if let ModelProbe::Unreachable(why) = &readiness.model {
        model["detail"] = json!(why);
    }
    let details = [("database", database), ("model", model)];
    if readiness.is_ready() {
        let mut body = json!({ "status": "ready" });
        for (name, value) in details {
            body[name] = value;
        }
        return Json(body).into_response();
    }
    let not_ready = ApiError::NotReady;
    let mut body = not_ready.envelope();
    for (name, value) in details {
        body[name] = value;
    }
    (not_ready.status(), Json(body)).into_response()
}

/// The Prometheus text exposition. With `METRICS_TOKEN` set, only for a request that
/// presents it as `Authorization: Bearer <token>`.
#[utoipa::path(get, path = "/metrics", tag = "operations", security((), ("metrics_token" = [])), responses((status = 200, description = "Prometheus text format", content_type = "text/plain; version=0.0.4", body = String), (status = 401, description = "METRICS_TOKEN is set and was not presented", body = super::openapi::Error)))]
pub async fn metrics(State(state): State<AppState>, headers: HeaderMap) -> Response {
    if let Some(expected) = &state.config.metrics_token {
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            // The same three forms as every other credential: `Bearer`, `Token` or bare.
            .and_then(super::middleware::credential_from_header);
        // Compared as digests: the time taken says nothing about how much of it matched.
        let matches = presented.is_some_and(|presented| {
            Sha256::digest(presented.as_bytes())
                == Sha256::digest(expected.expose_secret().as_bytes())
        });
        if !matches {
            return ApiError::Unauthorized.into_response();
        }
    }
    let body = state.metrics.render(&state.db.pool_use());
    (
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        body,
    )
        .into_response()
}
