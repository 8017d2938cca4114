//! `/training/jobs`: create, list, read, start, report, cancel, metrics, checkpoint.

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures::TryStreamExt;
use serde::{Deserialize, Serialize};
use serde_json::json;
use vtp_core::{
    BlobKey, BlobStoreExt, CancelOutcome, Error, Job, JobFilter, JobId, JobPage, JobStatus,
    JobStoreExt, NewJob, StartTraining, TrainingUpdate,
};

use crate::AppState;
use crate::error::{ApiError, ApiJson, ApiPath, ApiQuery, error_chain};

type ApiResult<T> = Result<T, ApiError>;

/// `POST /training/jobs`
pub async fn create(
    State(state): State<AppState>,
    ApiJson(new): ApiJson<NewJob>,
) -> ApiResult<(StatusCode, Json<Job>)> {
    let job = state.jobs.create_job(new).await?;
    metrics::counter!("vtp_jobs_created_total").increment(1);
    tracing::info!(job_id = %job.id, user_id = %job.user_id, model = %job.model_name, "job created");
    Ok((StatusCode::CREATED, Json(job)))
}

/// Query of `GET /training/jobs`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    user_id: Option<String>,
    status: Option<JobStatus>,
    limit: Option<u32>,
    offset: Option<u32>,
}

/// `GET /training/jobs`
pub async fn list(
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<ListQuery>,
) -> ApiResult<Json<JobPage>> {
    let filter = JobFilter {
        user_id: query.user_id,
        status: query.status,
        limit: query.limit.unwrap_or(JobFilter::DEFAULT_LIMIT),
        offset: query.offset.unwrap_or(0),
        ..JobFilter::default()
    };
    if filter.limit > JobFilter::MAX_LIMIT {
        return Err(
            Error::invalid("limit", format!("must be at most {}", JobFilter::MAX_LIMIT)).into(),
        );
    }
    Ok(Json(state.jobs.list(&filter).await?))
}

/// `GET /training/jobs/{id}`
pub async fn get(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<JobId>,
) -> ApiResult<Json<Job>> {
    Ok(Json(state.jobs.get(id).await?))
}

/// Answer of `POST /training/jobs/{id}/start`.
#[derive(Debug, Serialize)]
pub struct Started {
    status: &'static str,
    job: Job,
}

/// `POST /training/jobs/{id}/start`: checks that the dataset exists, moves
/// the job to `queued` and hands it to the launcher. A launch failure fails
/// the job with the reason.
pub async fn start(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<JobId>,
) -> ApiResult<(StatusCode, Json<Started>)> {
    let job = state.jobs.get(id).await?;
    if job.status != JobStatus::Pending {
        return Err(Error::conflict(format!(
            "job {id} is {}; only a pending job can be started",
            job.status
        ))
        .into());
    }
    check_dataset(&state, &job).await?;
    let job = state
        .jobs
        .transition(id, JobStatus::Pending, JobStatus::Queued)
        .await?;
    let request = StartTraining::for_job(&job, state.callback_url(id));
    if let Err(err) = state.launcher.launch(&request).await {
        let reason = format!("launch failed: {}", error_chain(&err));
        tracing::warn!(job_id = %id, %reason);
        // The trainer may have reported already; then its report stands.
        let failed = state
            .jobs
            .transition_with(id, JobStatus::Queued, JobStatus::Failed, |job| {
                job.error = Some(reason.clone());
            })
            .await;
        if let Err(e) = failed {
            tracing::warn!(job_id = %id, error = %error_chain(&e), "could not record the launch failure");
        }
        return Err(err.into());
    }
    tracing::info!(job_id = %id, launcher = state.launcher.name(), "job launched");
    let job = state.jobs.get(id).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(Started {
            status: "started",
            job,
        }),
    ))
}

/// The dataset must be in this backend's blob store and hold at least one object.
async fn check_dataset(state: &AppState, job: &Job) -> ApiResult<()> {
    let invalid = |message: String| ApiError::from(Error::invalid("dataset_s3_uri", message));
    let key = state
        .blobs
        .key_for(&job.dataset_s3_uri)
        .map_err(|e| invalid(error_chain(&e)))?;
    if !state.blobs.exists(&key).await? {
        return Err(invalid(format!("no dataset at {}", job.dataset_s3_uri)));
    }
    Ok(())
}

/// `POST /training/jobs/{id}/callback`: a trainer report. Replays and
/// out-of-order reports (by `seq`) change nothing; reports for a finished
/// job are refused with 409.
pub async fn callback(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<JobId>,
    ApiJson(update): ApiJson<TrainingUpdate>,
) -> ApiResult<Json<serde_json::Value>> {
    let known = state.known_jobs.get(id);
    let outcome = match state.jobs.apply_update_from(id, &update, known).await {
        Ok(outcome) => outcome,
        Err(e) => {
            state.known_jobs.forget(id);
            return Err(e.into());
        }
    };
    let applied = outcome.applied();
    let status = outcome.job().status;
    state.known_jobs.remember(outcome.into_job());
    metrics::counter!("vtp_reports_total", "applied" => if applied { "true" } else { "false" })
        .increment(1);
    if applied && status.is_terminal() {
        metrics::counter!("vtp_jobs_finished_total", "status" => status.to_string()).increment(1);
    }
    if applied {
        tracing::debug!(job_id = %id, %status, seq = ?update.seq, "report applied");
    } else {
        tracing::debug!(job_id = %id, seq = ?update.seq, "stale report ignored");
    }
    Ok(Json(json!({
        "status": "ok",
        "applied": applied,
        "job_status": status,
    })))
}

/// `DELETE /training/jobs/{id}`: cancels. A job that never reached a trainer
/// is cancelled at once; a launched one goes to `cancelling` until the
/// trainer reports `cancelled` (or says it is not running it).
pub async fn cancel(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<JobId>,
) -> ApiResult<Json<Job>> {
    let job = state.jobs.get(id).await?;
    match job.status {
        JobStatus::Pending => {
            let job = state
                .jobs
                .transition_with(id, JobStatus::Pending, JobStatus::Cancelled, |job| {
                    job.message = Some("cancelled before start".into());
                })
                .await?;
            Ok(Json(job))
        }
        JobStatus::Queued | JobStatus::Running => {
            state
                .jobs
                .transition(id, job.status, JobStatus::Cancelling)
                .await?;
            signal_trainer(&state, id).await
        }
        JobStatus::Cancelling => signal_trainer(&state, id).await,
        status => Err(Error::conflict(format!("job {id} is already {status}")).into()),
    }
}

/// Asks the launcher to stop the job; finalises at once when nothing runs it.
async fn signal_trainer(state: &AppState, id: JobId) -> ApiResult<Json<Job>> {
    match state.launcher.cancel(id).await {
        Ok(CancelOutcome::Signalled) => {}
        Ok(CancelOutcome::NotRunning) => {
            let done = state
                .jobs
                .transition_with(id, JobStatus::Cancelling, JobStatus::Cancelled, |job| {
                    job.message = Some("cancelled; no trainer was running it".into());
                })
                .await;
            match done {
                // The trainer may have finished the job meanwhile; its report stands.
                Ok(_) | Err(Error::Conflict { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        // The job stays `cancelling`; the sweeper finalises it if the trainer never answers.
        Err(e) => tracing::warn!(job_id = %id, error = %error_chain(&e), "cancel signal failed"),
    }
    Ok(Json(state.jobs.get(id).await?))
}

/// `GET /training/jobs/{id}/metrics`: one object per epoch,
/// `{"epoch": 1, "loss": ..., "accuracy": ..., "recorded_at": ...}`.
pub async fn metrics(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<JobId>,
) -> ApiResult<Json<Vec<serde_json::Value>>> {
    let rows = state.jobs.metrics(id).await?;
    let rows = rows
        .into_iter()
        .map(|metric| {
            let mut row = serde_json::Map::new();
            row.insert("epoch".into(), metric.epoch.into());
            for (name, value) in metric.values {
                row.insert(name, value.into());
            }
            row.insert("recorded_at".into(), json!(metric.recorded_at));
            serde_json::Value::Object(row)
        })
        .collect();
    Ok(Json(rows))
}

/// `GET /training/jobs/{id}/checkpoint`: streams the job's checkpoint.
pub async fn checkpoint(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<JobId>,
) -> ApiResult<Response> {
    let key = checkpoint_key(&state, id).await?;
    stream_blob(&state, &key).await
}

/// The files a checkpoint consists of, servable next to it.
const CHECKPOINT_FILES: [&str; 6] = [
    "best.safetensors",
    "best.json",
    "best.optim.safetensors",
    "last.safetensors",
    "last.json",
    "last.optim.safetensors",
];

/// `GET /training/jobs/{id}/checkpoint/{file}`: one file of the job's
/// checkpoint directory, such as `best.json` (the sidecar with class names
/// and config that `Checkpoint::open` needs) or `last.safetensors`.
pub async fn checkpoint_file(
    State(state): State<AppState>,
    ApiPath((id, file)): ApiPath<(JobId, String)>,
) -> ApiResult<Response> {
    if !CHECKPOINT_FILES.contains(&file.as_str()) {
        return Err(Error::invalid(
            "file",
            format!("{file:?} is not a checkpoint file; expected one of {CHECKPOINT_FILES:?}"),
        )
        .into());
    }
    let weights = checkpoint_key(&state, id).await?;
    let dir = weights.as_str().rsplit_once('/').map_or("", |(dir, _)| dir);
    let key = BlobKey::parse(&format!("{dir}/{file}"))?;
    stream_blob(&state, &key).await
}

/// The key of the job's final checkpoint; 404 until there is one.
async fn checkpoint_key(state: &AppState, id: JobId) -> ApiResult<BlobKey> {
    let job = state.jobs.get(id).await?;
    let uri = job
        .checkpoint_s3_uri
        .ok_or_else(|| Error::not_found("checkpoint of job", id))?;
    Ok(state.blobs.key_for(&uri)?)
}

/// Streams a blob as a download.
async fn stream_blob(state: &AppState, key: &BlobKey) -> ApiResult<Response> {
    let (meta, stream) = state.blobs.get_stream(key).await?;
    let body = Body::from_stream(stream.map_err(|e| std::io::Error::other(error_chain(&e))));
    let mut response = body.into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(meta.size));
    let disposition = format!(
        "attachment; filename=\"{}\"",
        key.file_name().replace('"', "")
    );
    if let Ok(value) = HeaderValue::from_str(&disposition) {
        headers.insert(header::CONTENT_DISPOSITION, value);
    }
    Ok(response)
}
