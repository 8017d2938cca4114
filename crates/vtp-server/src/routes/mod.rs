//! Request handlers.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use vtp_core::api::Health;

use crate::AppState;
use crate::auth::Caller;

pub mod datasets;
pub mod jobs;

/// `GET /health`: 200 `{"status": "ok"}` when the job store answers, 503
/// `{"status": "degraded"}` when it does not, from the store's last reading
/// (taken every few seconds, so a flood of these reads no database). A
/// caller with a valid token (or any caller with authentication off) also
/// gets what the backend runs on; an anonymous one only up or down.
#[utoipa::path(
    get,
    path = "/health",
    tag = "operations",
    responses(
        (status = 200, description = "The job store answers", body = Health),
        (status = 503, description = "The job store does not answer (`status: degraded`)", body = Health),
    ),
    security((), ("bearer" = [])),
)]
pub async fn health(
    State(state): State<AppState>,
    caller: Option<Caller>,
) -> (StatusCode, Json<Health>) {
    let ok = state.probe.store_ok(&state).await;
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let mut body = Health {
        status: if ok { "ok" } else { "degraded" }.to_owned(),
        database: None,
        blob_store: None,
        launcher: None,
        version: None,
    };
    if caller.is_some() {
        body.database = Some(if ok { "ok" } else { "unavailable" }.to_owned());
        body.blob_store = Some(state.blobs.base_uri().to_owned());
        body.launcher = Some(state.launcher.name().to_owned());
        body.version = Some(env!("CARGO_PKG_VERSION").to_owned());
    }
    (status, Json(body))
}
