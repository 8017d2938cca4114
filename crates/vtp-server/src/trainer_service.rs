//! The trainer service's HTTP shell (the seed's tier-1 trainer contract)
//! over [`vtp_trainer::service::TrainerService`]:
//!
//! | method | path | |
//! |---|---|---|
//! | POST | `/training/start` | 202 accepted; 409 already here; 422 bad config |
//! | POST | `/training/{job_id}/cancel` | 202 stopping; 404 not here; `?attempt=N`: only attempt N or an earlier one, as an interruption |
//! | GET | `/training/{job_id}` | `{"state": "queued" \| "running" \| "cancelling"}`; 404 |
//! | GET | `/models` | the architectures and their parameters |
//! | GET | `/health` | liveness, jobs held, reports pending |
//!
//! With a token (`VTP_TRAINER_TOKEN`, shared with the backend) every route
//! but `/health` needs `Authorization: Bearer <token>`; a full queue answers
//! 429 with `Retry-After`.

use std::future::Future;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, response::IntoResponse};
use serde_json::json;
use vtp_core::{Error, JobId, StartTraining};
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

/// `?attempt=N` on a cancel: the backend gave up on that attempt (its lease
/// expired), so only it or an earlier one is stopped, as an interruption.
#[derive(Debug, serde::Deserialize)]
struct CancelQuery {
    attempt: Option<i32>,
}

async fn cancel(
    State(service): State<Service>,
    ApiPath(job_id): ApiPath<JobId>,
    axum::extract::Query(query): axum::extract::Query<CancelQuery>,
) -> Result<impl IntoResponse, ApiError> {
    let stopped = match query.attempt {
        Some(attempt) => service.interrupt(job_id, attempt),
        None => service.cancel(job_id),
    };
    if stopped {
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

async fn models() -> Result<impl IntoResponse, ApiError> {
    let models = vtp_trainer::engine::model::catalog()?.to_vec();
    Ok(Json(json!({
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
            "resume": "continue from the last checkpoint (true)",
            "init_weights": "blob URI of safetensors weights to start from (none)",
        },
        "detection_parameters": {
            "epochs": "(5)", "batch_size": "(16)", "image_size": "a multiple of 32 (640)",
            "lr": "initial learning rate; ignored with optimizer auto (0.01)",
            "optimizer": "auto, sgd (Nesterov) or adamw (auto)",
            "momentum": "(0.937)", "weight_decay": "(5e-4)", "lrf": "final lr fraction (0.01)",
            "warmup_epochs": "(3)", "warmup_momentum": "(0.8)", "warmup_bias_lr": "(0.1)",
            "nbs": "nominal batch size for gradient accumulation (64)",
            "mosaic": "(1.0)", "close_mosaic": "epochs at the end without mosaic (10)",
            "translate": "(0.1)", "scale": "(0.5)", "fliplr": "(0.5)",
            "hsv_h": "(0.015)", "hsv_s": "(0.7)", "hsv_v": "(0.4)",
            "box": "(7.5)", "cls": "(0.5)", "dfl": "(1.5)",
            "conf": "validation NMS confidence (0.001)", "iou": "NMS IoU (0.7)", "max_det": "(300)",
            "init_weights": "blob URI of a converted Ultralytics state_dict (none)",
        }
    })))
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

/// Refuses requests without the shared token.
async fn require_token(
    token: Arc<str>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let given = request
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    if vtp_core::auth::tokens_match(given.trim(), &token) {
        next.run(request).await
    } else {
        ApiError::from(Error::unauthenticated(
            "send the trainer token (VTP_TRAINER_TOKEN) as Authorization: Bearer",
        ))
        .into_response()
    }
}

/// The trainer service router; with `token`, every route but `/health`
/// needs it.
pub fn trainer_app(service: Service, token: Option<String>) -> Router {
    let mut guarded = Router::new()
        .route("/models", get(models))
        .route("/training/start", post(start))
        .route("/training/{job_id}", get(status))
        .route("/training/{job_id}/cancel", post(cancel));
    if let Some(token) = token {
        let token: Arc<str> = token.into();
        guarded = guarded.route_layer(axum::middleware::from_fn(move |request, next| {
            require_token(token.clone(), request, next)
        }));
    }
    guarded
        .route("/health", get(health))
        .layer(tower_http::trace::TraceLayer::new_for_http())
        .with_state(service)
}

/// Serves the trainer service and delivers its reports until `shutdown`;
/// with `token`, requests must carry it.
///
/// # Errors
/// I/O errors of the listener.
pub async fn serve_trainer(
    listener: tokio::net::TcpListener,
    service: Service,
    token: Option<String>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let outbox = service.outbox().clone();
    let delivery = tokio::spawn(async move { outbox.run().await });
    let result = axum::serve(listener, trainer_app(service, token))
        .with_graceful_shutdown(shutdown)
        .await;
    delivery.abort();
    result
}
