//! The trainer service's HTTP shell (the seed's tier-1 trainer contract)
//! over [`vtp_trainer::service::TrainerService`]:
//!
//! | method | path | |
//! |---|---|---|
//! | POST | `/training/start` | 202 accepted; 409 already here; 422 bad config |
//! | POST | `/training/{job_id}/cancel` | 202 stopping; 404 not here |
//! | GET | `/training/{job_id}` | `{"state": "queued" \| "running" \| "cancelling"}`; 404 |
//! | GET | `/models` | the architectures and their parameters |
//! | GET | `/health` | liveness, jobs held, reports pending |

use std::future::Future;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, response::IntoResponse};
use serde_json::json;
use vtp_core::{Error, JobId, StartTraining};
use vtp_trainer::engine::ModelKind;
use vtp_trainer::service::{StartOutcome, TrainerService};

use crate::error::{ApiError, ApiJson, ApiPath};

type Service = Arc<TrainerService>;

async fn start(
    State(service): State<Service>,
    ApiJson(request): ApiJson<StartTraining>,
) -> Result<impl IntoResponse, ApiError> {
    let job_id = request.job_id;
    match service.start(request)? {
        StartOutcome::Accepted => Ok((
            StatusCode::ACCEPTED,
            Json(json!({"status": "accepted", "job_id": job_id})),
        )),
        StartOutcome::AlreadyRunning => Err(ApiError::from(Error::conflict(format!(
            "job {job_id} is already here"
        )))),
    }
}

async fn cancel(
    State(service): State<Service>,
    ApiPath(job_id): ApiPath<JobId>,
) -> Result<impl IntoResponse, ApiError> {
    if service.cancel(job_id) {
        Ok((
            StatusCode::ACCEPTED,
            Json(json!({"status": "cancelling", "job_id": job_id})),
        ))
    } else {
        Err(Error::not_found("job", job_id).into())
    }
}

async fn status(
    State(service): State<Service>,
    ApiPath(job_id): ApiPath<JobId>,
) -> Result<impl IntoResponse, ApiError> {
    let state = service
        .state(job_id)
        .ok_or_else(|| Error::not_found("job", job_id))?;
    Ok(Json(json!({"job_id": job_id, "state": state})))
}

async fn models() -> impl IntoResponse {
    let models: Vec<_> = ModelKind::ALL.iter().map(|k| k.info()).collect();
    Json(json!({
        "models": models,
        "parameters": {
            "epochs": "passes over the training set (5)",
            "batch_size": "images per step (32)",
            "lr": "learning rate, cosine-annealed (0.05)",
            "optimizer": "sgd (momentum) or adamw (sgd)",
            "momentum": "SGD momentum (0.9)",
            "weight_decay": "(5e-4)",
            "image_size": "input side in pixels (32)",
            "seed": "(42)",
            "device": "auto, cpu or cuda (auto)",
            "threads": "libtorch threads, 0 = one per core (0)",
            "workers": "input pipeline threads (2)",
            "val_split": "held-out fraction when there is no val/ split (0.2)",
            "random_crop": "(true)",
            "hflip": "(true)",
            "resume": "continue from the last checkpoint (true)"
        }
    }))
}

async fn health(State(service): State<Service>) -> impl IntoResponse {
    Json(json!({
        "status": "ok",
        "jobs": service.jobs(),
        "pending_reports": service.outbox().pending().len(),
        "cuda": tch::Cuda::is_available(),
        "version": env!("CARGO_PKG_VERSION"),
    }))
}

/// The trainer service router.
pub fn trainer_app(service: Service) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/models", get(models))
        .route("/training/start", post(start))
        .route("/training/{job_id}", get(status))
        .route("/training/{job_id}/cancel", post(cancel))
        .layer(tower_http::trace::TraceLayer::new_for_http())
        .with_state(service)
}

/// Serves the trainer service and delivers its reports until `shutdown`.
///
/// # Errors
/// I/O errors of the listener.
pub async fn serve_trainer(
    listener: tokio::net::TcpListener,
    service: Service,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let outbox = service.outbox().clone();
    let delivery = tokio::spawn(async move { outbox.run().await });
    let result = axum::serve(listener, trainer_app(service))
        .with_graceful_shutdown(shutdown)
        .await;
    delivery.abort();
    result
}
