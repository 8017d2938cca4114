//! `/training/jobs`: the job's API along its data path. This file creates,
//! lists, reads, cancels and deletes jobs; `launch` starts them (the queue
//! hands them to a launcher), `reports` takes what their trainers report and
//! serves it back (metrics, the event stream), and `checkpoints` serves the
//! stored checkpoint sets.

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use vtp_core::{
    BlobStoreExt, CancelOutcome, Error, Job, JobFilter, JobId, JobPage, JobStatus, JobStoreExt,
    NewJob,
};

use crate::AppState;
use crate::auth::{AuthMode, Caller, check_owned_blob, owned_job};
use crate::error::{ApiError, ApiJson, ApiPath, ApiQuery, error_chain};
use crate::openapi::CommonErrors;

type ApiResult<T> = Result<T, ApiError>;

pub mod checkpoints;
pub mod launch;
pub mod reports;

/// The request header that makes a create or a start safe to retry.
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";
/// The answer header that marks a replayed answer (as Stripe's API does).
pub const IDEMPOTENT_REPLAYED: &str = "idempotent-replayed";

/// The request's `Idempotency-Key`, checked.
fn idempotency_key(headers: &HeaderMap) -> ApiResult<Option<String>> {
    let Some(value) = headers.get(IDEMPOTENCY_KEY) else {
        return Ok(None);
    };
    let key = value.to_str().map_err(|_| {
        Error::invalid(
            "Idempotency-Key",
            "must be visible ASCII characters (no spaces or control characters)",
        )
    })?;
    vtp_core::validate_idempotency_key(key)?;
    Ok(Some(key.to_owned()))
}

/// Headers of an answer given again for a retried request.
fn replayed() -> [(&'static str, HeaderValue); 1] {
    [(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"))]
}

/// The answer to a create retried under `existing`'s `Idempotency-Key`:
/// the job as it is now if the request is the same, 422 if it is not.
async fn replay_create(state: &AppState, existing: Job, digest: &str) -> ApiResult<Response> {
    let same = existing
        .idempotency
        .create
        .as_ref()
        .is_some_and(|keyed| keyed.digest == digest);
    if !same {
        return Err(Error::invalid(
            "Idempotency-Key",
            format!(
                "was first sent with a different request (it created job {}); use a new key for a new job",
                existing.id
            ),
        )
        .into());
    }
    tracing::info!(job_id = %existing.id, "create retried under its Idempotency-Key; answered again");
    Ok((
        StatusCode::CREATED,
        replayed(),
        [location(&existing)],
        Json(state.present_one(existing).await),
    )
        .into_response())
}

/// `config.init_weights`, when given, must be a string naming an object
/// that is in this backend's store and the job owner's: under
/// `users/{owner}/`, or a checkpoint of one of the owner's jobs.
async fn check_init_weights(state: &AppState, new: &NewJob) -> ApiResult<()> {
    const FIELD: &str = "config.init_weights";
    let Some(value) = new.config.get("init_weights") else {
        return Ok(());
    };
    let Some(uri) = value.as_str() else {
        return Err(Error::invalid(FIELD, "must be the URI of a stored object").into());
    };
    check_owned_blob(state, FIELD, uri, &new.user_id, false).await?;
    let key = state.blobs.key_for(uri)?;
    if !state.blobs.exists(&key).await? {
        return Err(Error::invalid(FIELD, format!("no object at {uri}")).into());
    }
    Ok(())
}

/// A `python` job runs its owner's own code, and a package job the
/// `ultralytics` package's: only where the operator allows Python code in
/// the trainer's environment (`VTP_ALLOW_USER_CODE`), and a `python` job
/// only over code the owner uploaded (`users/{owner}/code/`, as
/// `POST /code/upload` stores it) that exists.
async fn check_user_code(state: &AppState, new: &NewJob) -> ApiResult<()> {
    const FIELD: &str = "config.code_s3_uri";
    if !new.runs_python() {
        return Ok(());
    }
    if !state.allow_user_code {
        let (field, what) = if new.runs_user_code() {
            ("framework", "python jobs run their owner's own code")
        } else {
            (
                "config.engine",
                "the package engine runs the ultralytics package in the trainer's Python",
            )
        };
        return Err(Error::invalid(
            field,
            format!(
                "{what}, which this backend does not allow \
                 (its operator enables it with VTP_ALLOW_USER_CODE=true)"
            ),
        )
        .into());
    }
    if !new.runs_user_code() {
        return Ok(());
    }
    let config = vtp_core::ScriptConfig::from_json(&new.config)?;
    let key = state
        .blobs
        .key_for(&config.code_s3_uri)
        .map_err(|e| Error::invalid(FIELD, vtp_core::error_chain(&e)))?;
    let own = vtp_core::layout::uploads_prefix(&new.user_id, vtp_core::layout::Upload::Code)?;
    if !vtp_core::layout::is_below(&key, &own) {
        return Err(Error::invalid(
            FIELD,
            format!(
                "{} must be one of {}'s code archives (a key under {own}, as POST /code/upload stores them)",
                config.code_s3_uri, new.user_id
            ),
        )
        .into());
    }
    if !state.blobs.exists(&key).await? {
        return Err(
            Error::invalid(FIELD, format!("no code archive at {}", config.code_s3_uri)).into(),
        );
    }
    Ok(())
}

/// The `Location` of a created job.
fn location(job: &Job) -> (header::HeaderName, String) {
    (header::LOCATION, format!("/training/jobs/{}", job.id))
}

/// `POST /training/jobs`: the owner is the caller; with tokens, a
/// `user_id` left out is filled in from the token, someone else's is 403,
/// and the dataset (and any `config.init_weights`) must be the owner's.
/// With an `Idempotency-Key`, the same request again (by the same owner)
/// answers with the job it created, and another request under that key is
/// 422.
#[utoipa::path(
    post,
    path = "/training/jobs",
    tag = "jobs",
    params(("Idempotency-Key" = Option<String>, Header, description = "Makes the request safe to retry: the same key with the same request answers again with the first answer (marked `Idempotent-Replayed: true`) and does nothing twice; with another request it is 422. Visible ASCII, at most 255 characters.")),
    request_body = NewJob,
    responses(
        (status = 201, description = "The job, `pending`", body = Job, headers(
            ("Location" = String, description = "The job's URL, `/training/jobs/{id}`"),
            ("Idempotent-Replayed" = String, description = "`true` when this is the first answer given again for a retried request"),
        ), links(
            ("GetJob" = (operation_id = "get", parameters(("id" = "$response.body#/id")), description = "The job")),
            ("StartJob" = (operation_id = "start", parameters(("id" = "$response.body#/id")), description = "Starts the job")),
            ("CancelJob" = (operation_id = "cancel", parameters(("id" = "$response.body#/id")), description = "Cancels the job, or with `purge` deletes it")),
            ("JobMetrics" = (operation_id = "metrics", parameters(("id" = "$response.body#/id")), description = "The job's metrics")),
        )),
        CommonErrors,
    ),
    security((), ("bearer" = [])),
)]
pub async fn create(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    ApiJson(mut new): ApiJson<NewJob>,
) -> ApiResult<Response> {
    let key = idempotency_key(&headers)?;
    state.limits.check_config(&new.config)?;
    state.launcher.check_config(&new.config)?;
    if state.auth == AuthMode::Tokens {
        if new.user_id.is_empty() {
            new.user_id.clone_from(&caller.principal().user_id);
        }
        caller.check_acts_for("user_id", &new.user_id)?;
    }
    // The owner names the key's scope below: checked before any lookup.
    vtp_core::job::validate_name("user_id", &new.user_id)?;
    let digest = new.digest();
    // A retry is answered before the limits: it creates nothing.
    if let Some(key) = &key
        && let Some(existing) = state.jobs.find_created_with_key(&new.user_id, key).await?
        && existing.deleted_at.is_none()
    {
        return replay_create(&state, existing, &digest).await;
    }
    state
        .limits
        .check_priority(new.priority, caller.principal().admin)?;
    if state.auth == AuthMode::Tokens {
        state.limits.check_create(&caller.principal().user_id)?;
        new.validate()?;
        check_owned_blob(
            &state,
            "dataset_s3_uri",
            &new.dataset_s3_uri,
            &new.user_id,
            true,
        )
        .await?;
    }
    check_init_weights(&state, &new).await?;
    new.validate()?;
    check_user_code(&state, &new).await?;
    let mut job = new.into_job()?;
    job.idempotency.create = key
        .clone()
        .map(|key| vtp_core::KeyedRequest { key, digest });
    let created = if state.auth == AuthMode::Tokens {
        state
            .jobs
            .create_within(&job, state.limits.pending_quota())
            .await
    } else {
        state.jobs.create(&job).await
    };
    if let Err(e) = created {
        // A concurrent retry under the same key stored its job first.
        if let (Error::AlreadyExists { .. }, Some(key)) = (&e, &key)
            && let Some(existing) = state.jobs.find_created_with_key(&job.user_id, key).await?
            && let Some(keyed) = &job.idempotency.create
        {
            return replay_create(&state, existing, &keyed.digest).await;
        }
        return Err(e.into());
    }
    metrics::counter!("vtp_jobs_created_total").increment(1);
    tracing::info!(job_id = %job.id, user_id = %job.user_id, model = %job.model_name, "job created");
    Ok((
        StatusCode::CREATED,
        [location(&job)],
        Json(state.present(job)),
    )
        .into_response())
}

/// Query of `GET /training/jobs`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Only this user's jobs (your own unless you are an admin).
    user_id: Option<String>,
    /// Only jobs in this status.
    status: Option<JobStatus>,
    /// Page size (default 50, at most 500).
    #[param(value_type = Option<i64>, minimum = 0, maximum = 500)]
    limit: Option<u32>,
    /// Jobs to skip.
    #[param(value_type = Option<i64>, minimum = 0, maximum = 4_294_967_295_i64)]
    offset: Option<u32>,
}

/// `GET /training/jobs`: your own jobs; an admin sees everyone's.
#[utoipa::path(
    get,
    path = "/training/jobs",
    tag = "jobs",
    params(ListQuery),
    responses((status = 200, description = "A page of jobs, newest first", body = JobPage), CommonErrors),
    security((), ("bearer" = [])),
)]
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    ApiQuery(query): ApiQuery<ListQuery>,
) -> ApiResult<Json<JobPage>> {
    let principal = caller.principal();
    let user_id = match query.user_id {
        Some(user) => {
            vtp_core::validate_name("user_id", &user)?;
            caller.check_acts_for("user_id", &user)?;
            Some(user)
        }
        None if principal.admin => None,
        None => Some(principal.user_id.clone()),
    };
    let filter = JobFilter {
        user_id,
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
    let mut page = state.jobs.list(&filter).await?;
    page.jobs = state.present_all(page.jobs).await;
    Ok(Json(page))
}

/// `GET /training/jobs/{id}`
#[utoipa::path(
    get,
    path = "/training/jobs/{id}",
    tag = "jobs",
    params(("id" = JobId, Path, description = "The job's id (a UUID)")),
    responses((status = 200, description = "The job", body = Job), CommonErrors),
    security((), ("bearer" = [])),
)]
pub async fn get(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<JobId>,
) -> ApiResult<Json<Job>> {
    let job = owned_job(state.jobs.as_ref(), &caller, id).await?;
    Ok(Json(state.present_one(job).await))
}

/// Query of `DELETE /training/jobs/{id}`.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct DeleteQuery {
    /// `true`: delete the finished job with everything stored for it
    /// (checkpoints, metrics, events) instead of cancelling it.
    #[serde(default)]
    purge: bool,
}

/// `DELETE /training/jobs/{id}`: cancels. A job that never reached a trainer
/// (pending, or queued and waiting for capacity) is cancelled at once; a
/// launched one goes to `cancelling` until the trainer reports `cancelled`
/// (or says it is not running it).
///
/// With `?purge=true` it deletes a finished job instead (409 for one not
/// finished: cancel it first): the job answers 404 from then on, and its
/// checkpoints, metrics and events are removed. 204 when all is gone; 202
/// when the removal of its objects has to be finished later (the store was
/// unavailable), which the backend does by itself.
#[utoipa::path(
    delete,
    path = "/training/jobs/{id}",
    tag = "jobs",
    params(("id" = JobId, Path, description = "The job's id (a UUID)"), DeleteQuery),
    responses(
        (status = 200, description = "Cancelled: the job, `cancelled` or `cancelling`", body = Job),
        (status = 202, description = "Purge: deleted; the removal of its objects finishes later"),
        (status = 204, description = "Purge: deleted with everything stored for it"),
        (status = 409, description = "Cancel: the job has finished; purge: it has not", body = vtp_core::api::ErrorBody),
        CommonErrors,
    ),
    security((), ("bearer" = [])),
)]
pub async fn cancel(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<JobId>,
    ApiQuery(query): ApiQuery<DeleteQuery>,
) -> ApiResult<Response> {
    let job = owned_job(state.jobs.as_ref(), &caller, id).await?;
    if query.purge {
        return purge(&state, job).await;
    }
    let job = match job.status {
        JobStatus::Pending => {
            state
                .jobs
                .transition_with(id, JobStatus::Pending, JobStatus::Cancelled, |job| {
                    job.message = Some("cancelled before start".into());
                })
                .await?
        }
        JobStatus::Queued if job.launched_at.is_none() => {
            let cancelled = state
                .jobs
                .update_with(id, |job| {
                    if !job.is_waiting() {
                        return Ok(None);
                    }
                    let mut next = job.clone();
                    next.end_with_reason(
                        JobStatus::Cancelled,
                        "cancelled while waiting in the queue",
                    )?;
                    Ok(Some(next))
                })
                .await?;
            if cancelled.status == JobStatus::Cancelled {
                cancelled
            } else {
                // Launched meanwhile: stop its runner.
                return cancel_launched(&state, cancelled).await;
            }
        }
        JobStatus::Queued | JobStatus::Running | JobStatus::Cancelling => {
            return cancel_launched(&state, job).await;
        }
        status => return Err(Error::conflict(format!("job {id} is already {status}")).into()),
    };
    Ok(Json(state.present(job)).into_response())
}

/// Cancels a job a runner holds: `cancelling`, then the launcher is asked
/// to stop it.
async fn cancel_launched(state: &AppState, job: Job) -> ApiResult<Response> {
    if job.status != JobStatus::Cancelling {
        state
            .jobs
            .transition(job.id, job.status, JobStatus::Cancelling)
            .await?;
    }
    Ok(signal_trainer(state, job.id).await?.into_response())
}

/// `DELETE ...?purge=true`: both phases of [`crate::retention`], the second
/// bounded in time (a purge cut short is finished by the leader).
async fn purge(state: &AppState, job: Job) -> ApiResult<Response> {
    crate::retention::tombstone(state, job.id).await?;
    tracing::info!(job_id = %job.id, "job deletion asked for");
    // The crash tests kill the backend here: tombstoned, nothing removed.
    crate::crash_point("purge-after-tombstone").await;
    let removed = tokio::time::timeout(
        crate::REQUEST_TIMEOUT / 2,
        crate::retention::purge(state, job.id),
    )
    .await;
    match removed {
        Ok(Ok(())) => Ok(StatusCode::NO_CONTENT.into_response()),
        Ok(Err(e)) => {
            tracing::warn!(job_id = %job.id, error = %error_chain(&e), "deletion to be finished by the leader");
            Ok(StatusCode::ACCEPTED.into_response())
        }
        Err(_) => Ok(StatusCode::ACCEPTED.into_response()),
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
    Ok(Json(state.present(state.jobs.get(id).await?)))
}
