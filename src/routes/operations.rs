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
use serde::Serialize;
use sha2::{Digest, Sha256};
use utoipa::ToSchema;

use super::error::{ApiError, Envelope};
use crate::{llm::ModelProbe, services::health::DatabaseReadiness, state::AppState};

#[derive(Serialize, ToSchema)]
pub struct Health {
    /// "ok"
    status: &'static str,
}

/// Liveness: answers without touching the database (also the benchmark's static route).
#[utoipa::path(
    get,
    path = "/health",
    tag = "operations",
    responses((status = 200, description = "The process is up", body = Health))
)]
pub async fn health() -> Json<Health> {
    Json(Health { status: "ok" })
}

#[derive(Serialize, ToSchema)]
pub struct Readiness<'a> {
    /// status (ok, not_migrated, unreachable), migrations_applied, migrations_known
    #[schema(value_type = Object)]
    database: DatabaseState,
    /// status (reachable, model_missing, unreachable, built_in), name, detail
    #[schema(value_type = Object)]
    model: ModelState<'a>,
    /// Each upstream: name, url, status (reachable, unreachable), detail, and its targets,
    /// each with model (the served name), upstream_model, listed (whether the upstream's
    /// model list has it), state (closed, open, half_open, cooling) and retry_in_secs.
    /// Empty for the built-in demo model.
    #[schema(value_type = Vec<Object>)]
    upstreams: Vec<UpstreamState<'a>>,
    /// "ready"; a 503 is the error envelope with `not_ready` and the same fields.
    status: &'static str,
}

/// The 503 of `/ready`: the envelope and the same fields as [`Readiness`].
#[derive(Serialize)]
struct NotReady<'a> {
    #[serde(flatten)]
    envelope: Envelope,
    database: DatabaseState,
    model: ModelState<'a>,
    upstreams: Vec<UpstreamState<'a>>,
}

#[derive(Serialize)]
struct UpstreamState<'a> {
    name: &'a str,
    url: &'a str,
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    detail: Option<&'a str>,
    targets: Vec<TargetState<'a>>,
}

#[derive(Serialize)]
struct TargetState<'a> {
    model: &'a str,
    upstream_model: &'a str,
    /// `None` when the upstream could not be asked.
    listed: Option<bool>,
    state: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    retry_in_secs: Option<u64>,
}

#[derive(Serialize)]
struct DatabaseState {
    #[serde(skip_serializing_if = "Option::is_none")]
    migrations_applied: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    migrations_known: Option<usize>,
    status: &'static str,
}

#[derive(Serialize)]
struct ModelState<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    detail: Option<&'a str>,
    name: &'a str,
    status: &'static str,
}

/// Readiness: 200 when the database answers with every migration applied, 503
/// `not_ready` otherwise; both say what the database and the model were found to be.
#[utoipa::path(
    get,
    path = "/ready",
    tag = "operations",
    responses(
        (status = 200, description = "The database answers and is migrated", body = Readiness),
        (
            status = 503,
            description = "not_ready, with the database and model fields",
            body = Envelope
        ),
    )
)]
pub async fn ready(State(state): State<AppState>) -> Response {
    let readiness = state.health.readiness().await;
    let (status, migrations) = match &readiness.database {
        DatabaseReadiness::Ready(migrations) => ("ok", Some(migrations)),
        DatabaseReadiness::NotMigrated(migrations) => ("not_migrated", Some(migrations)),
        DatabaseReadiness::Unreachable => ("unreachable", None),
    };
    let database = DatabaseState {
        migrations_applied: migrations.map(|migrations| migrations.applied),
        migrations_known: migrations.map(|migrations| migrations.known),
        status,
    };
    let model = ModelState {
        detail: match &readiness.model {
            ModelProbe::Unreachable(why) => Some(why),
            _ => None,
        },
        name: state.llm.model_name(),
        status: readiness.model.as_str(),
    };
    let targets = state.llm.targets();
    let upstreams = readiness
        .upstreams
        .iter()
        .map(|upstream| UpstreamState {
            name: &upstream.name,
            url: &upstream.url,
            status: match upstream.listed {
                Ok(_) => "reachable",
                Err(_) => "unreachable",
            },
            detail: upstream.listed.as_ref().err().map(String::as_str),
            targets: targets
                .iter()
                .filter(|target| target.upstream == upstream.name)
                .map(|target| TargetState {
                    model: &target.served,
                    upstream_model: &target.model,
                    listed: upstream
                        .listed
                        .as_ref()
                        .ok()
                        .map(|listed| listed.contains(&target.model)),
                    state: target.state.as_str(),
                    retry_in_secs: target.retry_in.map(|wait| wait.as_secs_f64().ceil() as u64),
                })
                .collect(),
        })
        .collect();
    if readiness.is_ready() {
        let body = Readiness {
            database,
            model,
            upstreams,
            status: "ready",
        };
        return Json(body).into_response();
    }
    let not_ready = ApiError::NotReady;
    let body = NotReady {
        envelope: not_ready.envelope(),
        database,
        model,
        upstreams,
    };
    (not_ready.status(), Json(body)).into_response()
}

/// The Prometheus text exposition. With `METRICS_TOKEN` set, only for a request that
/// presents it as `Authorization: Bearer <token>`.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    security((), ("metrics_token" = [])),
    responses(
        (
            status = 200,
            description = "Prometheus text format",
            content_type = "text/plain; version=0.0.4",
            body = String
        ),
        (
            status = 401,
            description = "METRICS_TOKEN is set and was not presented",
            body = Envelope
        ),
    )
)]
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
    // Each breaker as it is now: an open one turns half open by the clock alone.
    for target in state.llm.targets() {
        state
            .metrics
            .breaker(&target.upstream, &target.served, target.state.gauge());
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
