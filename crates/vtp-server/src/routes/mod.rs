//! Request handlers.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use vtp_core::api::Health;

use crate::AppState;
use crate::error::error_chain;

pub mod datasets;
pub mod jobs;

/// `GET /health`: 200 when the job store answers, 503 otherwise.
#[utoipa::path(
    get,
    path = "/health",
    tag = "operations",
    responses(
        (status = 200, description = "The job store answers", body = Health),
        (status = 503, description = "The job store does not answer (`status: degraded`)", body = Health),
    ),
)]
pub async fn health(State(state): State<AppState>) -> (StatusCode, Json<Health>) {
    let (status, database) = match state.jobs.ping().await {
        Ok(()) => (StatusCode::OK, "ok".to_owned()),
        Err(e) => {
            // The cause (hosts, ports) goes to the log, not to anonymous callers.
            tracing::warn!(error = %error_chain(&e), "health: the job store does not answer");
            (StatusCode::SERVICE_UNAVAILABLE, "unavailable".to_owned())
        }
    };
    let body = Health {
        status: if status == StatusCode::OK {
            "ok"
        } else {
            "degraded"
        }
        .to_owned(),
        database,
        blob_store: state.blobs.base_uri().to_owned(),
        launcher: state.launcher.name().to_owned(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
    };
    (status, Json(body))
}
