//! Request handlers.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde_json::json;

use crate::AppState;
use crate::error::error_chain;

pub mod datasets;
pub mod jobs;

/// `GET /health`: 200 when the job store answers, 503 otherwise.
pub async fn health(State(state): State<AppState>) -> (StatusCode, Json<serde_json::Value>) {
    let (status, database) = match state.jobs.ping().await {
        Ok(()) => (StatusCode::OK, "ok".to_owned()),
        Err(e) => {
            // The cause (hosts, ports) goes to the log, not to anonymous callers.
            tracing::warn!(error = %error_chain(&e), "health: the job store does not answer");
            (StatusCode::SERVICE_UNAVAILABLE, "unavailable".to_owned())
        }
    };
    let body = json!({
        "status": if status == StatusCode::OK { "ok" } else { "degraded" },
        "database": database,
        "blob_store": state.blobs.base_uri(),
        "launcher": state.launcher.name(),
        "version": env!("CARGO_PKG_VERSION"),
    });
    (status, Json(body))
}
