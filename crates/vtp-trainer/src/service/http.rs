//! The trainer service's HTTP shell (the seed's tier-1 trainer contract)
//! over [`TrainerService`]: `POST /training/start`,
//! `POST /training/{job_id}/cancel`, `GET /training/{job_id}`, `GET /models`
//! and `GET /health`, described by its own OpenAPI document
//! ([`trainer_document`], committed at `docs/trainer-openapi.json` and
//! served at `/openapi.json`).
//!
//! With a token (`VTP_TRAINER_TOKEN`, shared with the backend) every route
//! but `/health` and `/metrics` needs `Authorization: Bearer <token>`; a
//! full queue answers 429 with `Retry-After`.

use std::future::Future;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::{Json, response::IntoResponse};
use utoipa::OpenApi as _;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use vtp_core::api::{
    ErrorBody, ModelCatalog, ModelInfo, TrainerAccepted, TrainerHealth, TrainerJob,
};
use vtp_core::{Error, JobId, StartTraining, Task, TrainConfig};
use vtp_http::openapi::{BearerAuth, CommonErrors};
use vtp_http::{ApiError, ApiJson, ApiPath, ApiQuery};

use super::{StartOutcome, TrainerService};

type Service = Arc<TrainerService>;

/// The trainer service document's fixed part.
#[derive(Debug, utoipa::OpenApi)]
#[openapi(
    info(
        title = "VTP trainer service",
        description = "Trains the jobs a VTP backend hands it (the seed's trainer contract) and \
                       reports their progress, metrics and checkpoints back to the job's \
                       `callback_url`, signed with the job's callback secret. With \
                       `VTP_TRAINER_TOKEN` every route but `/health` needs \
                       `Authorization: Bearer <token>`.",
        license(name = "Apache-2.0"),
    ),
    components(schemas(ErrorBody)),
    modifiers(&BearerAuth),
)]
struct TrainerApi;

/// `POST /training/start`: takes a job; trains it when a slot is free.
#[utoipa::path(
    post,
    path = "/training/start",
    tag = "training",
    request_body = StartTraining,
    responses(
        (status = 202, description = "Accepted; reports follow on `callback_url`", body = TrainerAccepted),
        (status = 409, description = "The job is already here", body = ErrorBody),
        CommonErrors,
    ),
    security((), ("bearer" = [])),
)]
async fn start(
    State(service): State<Service>,
    ApiJson(request): ApiJson<StartTraining>,
) -> Result<impl IntoResponse, ApiError> {
    let job_id = request.job_id;
    match service.start(request)? {
        StartOutcome::Accepted => Ok((
            StatusCode::ACCEPTED,
            Json(TrainerAccepted {
                status: "accepted".to_owned(),
                job_id,
            }),
        )),
        StartOutcome::AlreadyRunning => Err(ApiError::from(Error::conflict(format!(
            "job {job_id} is already here"
        )))),
    }
}

/// `?attempt=N` on a cancel: the backend gave up on that attempt (its lease
/// expired), so only it or an earlier one is stopped, as an interruption.
#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct CancelQuery {
    /// Stop only this attempt (or an earlier one), as an interruption.
    attempt: Option<i32>,
}

/// `POST /training/{job_id}/cancel`: stops the job; it reports `cancelled`.
#[utoipa::path(
    post,
    path = "/training/{job_id}/cancel",
    tag = "training",
    params(("job_id" = JobId, Path, description = "The job"), CancelQuery),
    responses(
        (status = 202, description = "Stopping", body = TrainerAccepted),
        CommonErrors,
    ),
    security((), ("bearer" = [])),
)]
async fn cancel(
    State(service): State<Service>,
    ApiPath(job_id): ApiPath<JobId>,
    ApiQuery(query): ApiQuery<CancelQuery>,
) -> Result<impl IntoResponse, ApiError> {
    let stopped = match query.attempt {
        Some(attempt) => service.interrupt(job_id, attempt),
        None => service.cancel(job_id),
    };
    if stopped {
        Ok((
            StatusCode::ACCEPTED,
            Json(TrainerAccepted {
                status: "cancelling".to_owned(),
                job_id,
            }),
        ))
    } else {
        Err(Error::not_found("job", job_id).into())
    }
}

/// `GET /training/{job_id}`: what the trainer does with the job.
#[utoipa::path(
    get,
    path = "/training/{job_id}",
    tag = "training",
    params(("job_id" = JobId, Path, description = "The job")),
    responses(
        (status = 200, description = "The trainer holds the job", body = TrainerJob),
        CommonErrors,
    ),
    security((), ("bearer" = [])),
)]
async fn status(
    State(service): State<Service>,
    ApiPath(job_id): ApiPath<JobId>,
) -> Result<impl IntoResponse, ApiError> {
    let state = service
        .state(job_id)
        .ok_or_else(|| Error::not_found("job", job_id))?;
    Ok(Json(TrainerJob { job_id, state }))
}

/// `GET /models`: the models and the `config` defaults of each task.
#[utoipa::path(
    get,
    path = "/models",
    tag = "training",
    responses(
        (status = 200, description = "Every model, with its size", body = ModelCatalog),
        CommonErrors,
    ),
    security((), ("bearer" = [])),
)]
async fn models(State(service): State<Service>) -> Result<Json<ModelCatalog>, ApiError> {
    // The engine's own models, then the ones the `ultralytics` package
    // trains (`config.engine: "package"`).
    let mut models = service.engine().models()?;
    models.extend(
        vtp_core::package_models()
            .into_iter()
            .map(|model| ModelInfo {
                description: model.description(),
                name: model.name,
                task: model.task,
                min_image_size: 32,
                parameters: None,
                engine: vtp_core::Engine::Package,
            }),
    );
    Ok(Json(ModelCatalog {
        models,
        classify_defaults: TrainConfig::defaults_for(Task::Classify),
        detect_defaults: TrainConfig::defaults_for(Task::Detect),
    }))
}

/// `GET /health`: liveness, jobs held, reports pending.
#[utoipa::path(
    get,
    path = "/health",
    tag = "operations",
    responses((status = 200, description = "The service answers", body = TrainerHealth)),
)]
async fn health(State(service): State<Service>) -> Json<TrainerHealth> {
    Json(TrainerHealth {
        status: "ok".to_owned(),
        jobs: service.jobs(),
        pending_reports: service.outbox().pending().len(),
        cuda: service.engine().cuda(),
        slots: u32::try_from(service.concurrency()).ok(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
    })
}

/// Every metric the trainer service exports (histograms also as
/// `_bucket`, `_sum` and `_count`); the dashboards and alerts in `deploy/`
/// may query only these.
pub const EXPORTED: [&str; 10] = [
    "vtp_trainer_step_seconds",
    "vtp_trainer_epoch_seconds",
    "vtp_trainer_images_per_second",
    "vtp_trainer_data_wait_seconds",
    "vtp_trainer_outbox_depth",
    "vtp_trainer_reports_sent_total",
    "vtp_trainer_report_failures_total",
    "vtp_trainer_last_heartbeat_timestamp_seconds",
    "vtp_trainer_jobs",
    "vtp_trainer_start_time_seconds",
];

/// `GET /metrics`: Prometheus text: step and epoch times, images per
/// second and the last epoch's wait for input, reports sent, failed and
/// waiting in the outbox, the last report's time, jobs held, and when the
/// process started (restarts show as changes).
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    responses((status = 200, description = "Prometheus text exposition format", body = String, content_type = "text/plain")),
)]
async fn metrics_page(State(service): State<Service>) -> impl IntoResponse {
    metrics::gauge!("vtp_trainer_outbox_depth").set(service.outbox().pending().len() as f64);
    metrics::gauge!("vtp_trainer_jobs").set(service.jobs().len() as f64);
    vtp_http::metrics::render()
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

/// Every route of the trainer service with its OpenAPI operation; those
/// in the first router need the token when there is one.
fn trainer_routes() -> (OpenApiRouter<Service>, OpenApiRouter<Service>) {
    let guarded = OpenApiRouter::with_openapi(TrainerApi::openapi())
        .routes(routes!(models))
        .routes(routes!(start))
        .routes(routes!(status))
        .routes(routes!(cancel));
    let open = OpenApiRouter::new()
        .routes(routes!(health))
        .routes(routes!(metrics_page));
    (guarded, open)
}

/// The trainer service's OpenAPI document, as [`trainer_app`] serves it.
pub fn trainer_document() -> utoipa::openapi::OpenApi {
    let (guarded, open) = trainer_routes();
    guarded.merge(open).split_for_parts().1
}

/// The trainer service router; with `token`, every route but `/health`
/// (and `/openapi.json`) needs it.
pub fn trainer_app(service: Service, token: Option<String>) -> Router {
    // Install the recorder before anything records.
    vtp_http::metrics::handle();
    static STARTED: std::sync::Once = std::sync::Once::new();
    STARTED.call_once(|| {
        metrics::gauge!("vtp_trainer_start_time_seconds").set(super::unix_now());
    });
    let (mut guarded, open) = trainer_routes();
    if let Some(token) = token {
        let token: Arc<str> = token.into();
        guarded = guarded.route_layer(axum::middleware::from_fn(move |request, next| {
            require_token(token.clone(), request, next)
        }));
    }
    let (router, document) = guarded.merge(open).split_for_parts();
    router
        .route(
            "/openapi.json",
            axum::routing::get(move || std::future::ready(Json(document.clone()))),
        )
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
