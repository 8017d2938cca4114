//! `POST /training/jobs/{id}/start`: a job joins the queue, from which the
//! backend hands it to a launcher when there is capacity.

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use vtp_core::api::Started;
use vtp_core::{BlobStoreExt, CallbackSecret, Error, Job, JobId, JobStatus, JobStoreExt};

use super::{ApiResult, idempotency_key, replayed};
use crate::AppState;
use crate::auth::{AuthMode, Caller, check_owned_blob, owned_job};
use crate::error::{ApiError, ApiPath, error_chain};
use crate::openapi::CommonErrors;

/// The answer to a start retried under the `Idempotency-Key` it was
/// started with: the job as it is now, launched once.
async fn replay_start(state: &AppState, job: Job) -> Response {
    tracing::info!(job_id = %job.id, "start retried under its Idempotency-Key; answered again");
    (
        StatusCode::ACCEPTED,
        replayed(),
        Json(Started::new(state.present_one(job).await)),
    )
        .into_response()
}

/// Whether `job` was started under the `Idempotency-Key` `key`.
fn started_with(job: &Job, key: Option<&String>) -> bool {
    key.is_some() && job.idempotency.start.as_ref() == key
}

/// `POST /training/jobs/{id}/start`: checks that the dataset exists, makes
/// the job's callback secret and moves the job to `queued`, where it waits
/// for capacity: the leader's dispatcher hands it to the launcher in the
/// queue's order (priority, fair share between users, age), for as long as
/// that takes. The answer carries its place in the queue. With tokens, a
/// user with `VTP_MAX_ACTIVE_JOBS_PER_USER` jobs queued or running gets
/// 429 (counted atomically with the start). With an `Idempotency-Key`, a
/// start retried under the key the job was started with answers 202 again
/// with the job as it is now, and queues nothing twice.
#[utoipa::path(
    post,
    path = "/training/jobs/{id}/start",
    tag = "jobs",
    params(("id" = JobId, Path, description = "The job's id (a UUID)"), ("Idempotency-Key" = Option<String>, Header, description = "Makes the request safe to retry: the same key with the same request answers again with the first answer (marked `Idempotent-Replayed: true`) and does nothing twice; with another request it is 422. Visible ASCII, at most 255 characters.")),
    responses(
        (status = 202, description = "Started: the job is `queued` (with its `queue_position` while it waits for capacity) or further along", body = Started, headers(("Idempotent-Replayed" = String, description = "`true` when this is the first answer given again for a retried request")), links(
            ("GetJob" = (operation_id = "get", parameters(("id" = "$request.path.id")), description = "The job")),
            ("CancelJob" = (operation_id = "cancel", parameters(("id" = "$request.path.id")), description = "Cancels the job")),
            ("JobMetrics" = (operation_id = "metrics", parameters(("id" = "$request.path.id")), description = "The job's metrics")),
        )),
        (status = 409, description = "The job is not `pending`", body = vtp_core::api::ErrorBody),
        CommonErrors,
    ),
    security((), ("bearer" = [])),
)]
pub async fn start(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<JobId>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let key = idempotency_key(&headers)?;
    let job = owned_job(state.jobs.as_ref(), &caller, id).await?;
    if started_with(&job, key.as_ref()) {
        return Ok(replay_start(&state, job).await);
    }
    if job.status != JobStatus::Pending {
        return Err(Error::conflict(format!(
            "job {id} is {}; only a pending job can be started",
            job.status
        ))
        .into());
    }
    if state.auth == AuthMode::Tokens {
        check_owned_blob(
            &state,
            "dataset_s3_uri",
            &job.dataset_s3_uri,
            &job.user_id,
            true,
        )
        .await?;
    }
    check_dataset(&state, &job).await?;
    // The secret is stored before the job can be launched, so the first
    // report verifies, and only if the job has none: whoever stores it
    // first (this start, or the dispatcher if this start stalled after
    // queueing) gives it to every launch.
    let secret = state
        .credentials
        .job_secret_or_insert(id, &CallbackSecret::generate())
        .await?;
    state.secrets.remember(id, secret);
    let remember_key = |job: &mut Job| job.idempotency.start.clone_from(&key);
    let queued = if state.auth == AuthMode::Tokens {
        state
            .jobs
            .transition_within(
                id,
                JobStatus::Pending,
                JobStatus::Queued,
                state.limits.active_quota(),
                remember_key,
            )
            .await
    } else {
        state
            .jobs
            .transition_with(id, JobStatus::Pending, JobStatus::Queued, remember_key)
            .await
    };
    let job = match queued {
        Ok(job) => job,
        Err(e @ Error::Conflict { .. }) => {
            // A concurrent retry under the same key queued it first.
            let now = state.jobs.get(id).await?;
            if started_with(&now, key.as_ref()) {
                return Ok(replay_start(&state, now).await);
            }
            return Err(e.into());
        }
        Err(e) => return Err(e.into()),
    };
    tracing::info!(job_id = %id, priority = job.priority, "job queued");
    state.start_traces.remember(id, &tracing::Span::current());
    // The crash tests kill the backend here: queued, not yet launched.
    crate::crash_point("start-after-queue").await;
    state.dispatch.notify_one();
    Ok((
        StatusCode::ACCEPTED,
        Json(Started::new(state.present_one(job).await)),
    )
        .into_response())
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
