//! `/training/jobs`: create, list, read, start, report, cancel, metrics, checkpoint.

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures::TryStreamExt;
use serde::Deserialize;
use vtp_core::api::{CallbackAck, EpochMetrics, Started};
use vtp_core::{
    BlobKey, BlobStoreExt, CallbackSecret, CancelOutcome, Error, Job, JobFilter, JobId, JobPage,
    JobStatus, JobStoreExt, NewJob, TrainingUpdate,
};

use crate::AppState;
use crate::auth::{AuthMode, Caller, ConnectedFrom, check_owned_blob, job_secret, owned_job};
use crate::error::{ApiError, ApiJson, ApiPath, ApiQuery, error_chain, parse_json};
use crate::openapi::{Binary, CommonErrors};

type ApiResult<T> = Result<T, ApiError>;

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
    let own = format!("users/{}/code/", new.user_id);
    if !key.as_str().starts_with(&own) {
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
        (status = 202, description = "Started: the job is `queued` (with its `queue_position` while it waits for capacity) or further along", body = Started, headers(("Idempotent-Replayed" = String, description = "`true` when this is the first answer given again for a retried request"))),
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

/// The largest `seq` a report may carry: a day past now in microseconds.
/// Trainers count from 1, or (a retried one-shot trainer) from the current
/// time in microseconds; a `seq` beyond this could only make every later
/// real report look stale.
fn max_seq() -> i64 {
    (chrono::Utc::now().timestamp_millis() + 86_400_000).saturating_mul(1000)
}

/// `POST /training/jobs/{id}/callback`: a trainer report, signed with the
/// job's secret (401 otherwise). Replays and out-of-order reports (by
/// `seq`) change nothing; reports for a finished job are refused with 409;
/// a checkpoint outside the job's own `jobs/{id}/` is refused with 422.
#[utoipa::path(
    post,
    path = "/training/jobs/{id}/callback",
    tag = "trainers",
    params(
        ("id" = JobId, Path, description = "The job's id (a UUID)"),
        ("webhook-id" = String, Header, description = "The report's unique id (Standard Webhooks)"),
        ("webhook-timestamp" = i64, Header, description = "Unix seconds when signed; at most 5 minutes off"),
        ("webhook-signature" = String, Header, description = "`v1,<base64 HMAC-SHA256>` of `id.timestamp.body` with the job's callback secret"),
    ),
    request_body = TrainingUpdate,
    responses(
        (status = 200, description = "Taken: applied, or a replay or older report (by `seq`) that changed nothing", body = CallbackAck),
        (status = 409, description = "The job has finished", body = vtp_core::api::ErrorBody),
        CommonErrors,
    ),
)]
pub async fn callback(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<JobId>,
    ConnectedFrom(client): ConnectedFrom,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> ApiResult<Json<CallbackAck>> {
    let now = chrono::Utc::now().timestamp();
    // What can be checked without the job's secret is checked first: a
    // report that could never verify costs no database read.
    if let Err(e) = vtp_core::callback_signature::precheck(&headers, now) {
        metrics::counter!("vtp_callbacks_refused_total", "reason" => "signature").increment(1);
        return Err(e.into());
    }
    let secret = job_secret(&state, id, client).await?;
    if let Err(e) = secret.verify(&headers, &body, now) {
        // The cached secret may be an earlier launch's: check the stored one
        // (a forged signature costs its sender's budget).
        state.limits.check_lookup(client)?;
        let stored = state.credentials.job_secret(id).await?;
        match stored {
            Some(stored) if stored != secret && stored.verify(&headers, &body, now).is_ok() => {
                state.secrets.remember(id, stored);
            }
            _ => {
                state.limits.lookup_failed(client);
                metrics::counter!("vtp_callbacks_refused_total", "reason" => "signature")
                    .increment(1);
                tracing::warn!(job_id = %id, error = %e, "refused an unsigned or badly signed report");
                return Err(e.into());
            }
        }
    }
    if let Some(content_type) = headers.get(header::CONTENT_TYPE)
        && !content_type
            .to_str()
            .unwrap_or_default()
            .starts_with("application/json")
    {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "expected Content-Type: application/json",
        ));
    }
    let update: TrainingUpdate = parse_json(&body)?;
    check_report(&state, id, &update)?;
    // Planned on the version the job's previous report stored, if any.
    let _turn = state.known_jobs.turn(id).await;
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
    if applied {
        let job = outcome.job();
        if let Some(uri) = &update.last_checkpoint_s3_uri
            && job.last_checkpoint_s3_uri.as_deref() == Some(uri.as_str())
            && let Some(epoch) = set_epoch(&state, id, uri)
        {
            prune_checkpoint_sets(&state, id, epoch);
        } else if job.status == JobStatus::Completed && job.last_checkpoint_s3_uri.is_none() {
            prune_checkpoint_sets(&state, id, u32::MAX);
        }
    }
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
    Ok(Json(CallbackAck {
        status: "ok".to_owned(),
        applied,
        job_status: status,
    }))
}

/// The epoch of a checkpoint set's URI.
fn set_epoch(state: &AppState, id: JobId, uri: &str) -> Option<u32> {
    vtp_core::checkpoint_set_epoch(id, &state.blobs.key_for(uri).ok()?)
}

/// Deletes, in the background, the job's checkpoint sets of epochs below
/// `below` (`jobs/{id}/epochs/{n}/`): older than the set just recorded, or
/// all of them once the job completed with its final checkpoint. Only the
/// backend knows which set it records, so only it prunes; newer sets (of an
/// attempt whose reports were lost) are stored over by the next attempt.
fn prune_checkpoint_sets(state: &AppState, id: JobId, below: u32) {
    let blobs = state.blobs.clone();
    tokio::spawn(async move {
        let Ok(dir) = vtp_core::checkpoint_sets_prefix(id) else {
            return;
        };
        let objects = match blobs.list(Some(&dir)).await {
            Ok(objects) => objects,
            Err(e) => {
                tracing::debug!(job_id = %id, error = %error_chain(&e), "could not list old checkpoint sets");
                return;
            }
        };
        for object in objects {
            if vtp_core::checkpoint_set_epoch(id, &object.key).is_some_and(|epoch| epoch < below)
                && let Err(e) = blobs.delete(&object.key).await
            {
                tracing::debug!(job_id = %id, key = %object.key, error = %error_chain(&e), "could not delete an old checkpoint set");
            }
        }
    });
}

/// What a signed report may still not do: point its checkpoint outside
/// the job's own prefix, or claim a `seq` no trainer can reach.
fn check_report(state: &AppState, id: JobId, update: &TrainingUpdate) -> ApiResult<()> {
    for (field, uri) in [
        ("checkpoint_s3_uri", &update.checkpoint_s3_uri),
        ("last_checkpoint_s3_uri", &update.last_checkpoint_s3_uri),
    ] {
        let Some(uri) = uri else { continue };
        let prefix = format!("jobs/{id}/");
        let inside = state
            .blobs
            .key_for(uri)
            .is_ok_and(|key| key.as_str().starts_with(&prefix));
        if !inside {
            return Err(Error::invalid(
                field,
                format!("{uri} is not under this job's {prefix} in the backend's blob store"),
            )
            .into());
        }
    }
    if let Some(seq) = update.seq
        && seq > max_seq()
    {
        return Err(Error::invalid(
            "seq",
            format!(
                "{seq} is beyond any trainer's count (at most {})",
                max_seq()
            ),
        )
        .into());
    }
    Ok(())
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

/// Query of `GET /training/jobs/{id}/metrics`: a page of epochs.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct MetricsQuery {
    /// Epochs per page (default 1,000, at most 10,000).
    #[param(value_type = Option<i64>, minimum = 0, maximum = 10_000)]
    limit: Option<u32>,
    /// Epochs to skip.
    #[param(value_type = Option<i64>, minimum = 0, maximum = 4_294_967_295_i64)]
    offset: Option<u32>,
}

/// Epochs per metrics page by default, and at most.
const METRICS_PAGE: usize = 1000;
const METRICS_PAGE_MAX: usize = 10_000;

/// `GET /training/jobs/{id}/metrics`: one object per epoch,
/// `{"epoch": 1, "loss": ..., "accuracy": ..., "recorded_at": ...}`, the
/// first 1,000 epochs unless `?limit=` (at most 10,000) and `&offset=` say
/// otherwise. (Create caps `epochs` at 10,000, so one job's rows stay few
/// enough to read whole and page here.)
#[utoipa::path(
    get,
    path = "/training/jobs/{id}/metrics",
    tag = "jobs",
    params(("id" = JobId, Path, description = "The job's id (a UUID)"), MetricsQuery),
    responses((status = 200, description = "One object per epoch, in order", body = Vec<EpochMetrics>), CommonErrors),
    security((), ("bearer" = [])),
)]
pub async fn metrics(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<JobId>,
    ApiQuery(page): ApiQuery<MetricsQuery>,
) -> ApiResult<Json<Vec<EpochMetrics>>> {
    let limit = page.limit.map_or(METRICS_PAGE, |n| n as usize);
    if limit > METRICS_PAGE_MAX {
        return Err(Error::invalid("limit", format!("must be at most {METRICS_PAGE_MAX}")).into());
    }
    owned_job(state.jobs.as_ref(), &caller, id).await?;
    let rows = state.jobs.metrics(id).await?;
    let rows = rows
        .into_iter()
        .skip(page.offset.map_or(0, |n| n as usize))
        .take(limit)
        .map(EpochMetrics::from)
        .collect();
    Ok(Json(rows))
}

/// `GET /training/jobs/{id}/checkpoint`: streams the job's checkpoint.
#[utoipa::path(
    get,
    path = "/training/jobs/{id}/checkpoint",
    tag = "jobs",
    params(("id" = JobId, Path, description = "The job's id (a UUID)")),
    responses(
        (status = 200, description = "The weights (safetensors); for a job that ended without a final checkpoint, those of its last checkpoint set", body = Binary, content_type = "application/octet-stream"),
        CommonErrors,
    ),
    security((), ("bearer" = [])),
)]
pub async fn checkpoint(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<JobId>,
) -> ApiResult<Response> {
    let key = checkpoint_key(&state, &caller, id).await?;
    stream_blob(&state, &key).await
}

/// Whether `file` can be one of a checkpoint set's files, servable next to
/// its main file: the engine's (`best.safetensors`, `best.json`,
/// `best.optim.safetensors` and their `last.*`), or a script's, which the
/// trainer stores as `best.{name}` and `last.{name}` (the package engine's
/// `best.weights.pt` beside `best.weights.safetensors` and its sidecar).
fn is_set_file(file: &str) -> bool {
    let name = file
        .strip_prefix("best.")
        .or_else(|| file.strip_prefix("last."));
    name.is_some_and(|name| !name.is_empty()) && vtp_core::validate_name("file", file).is_ok()
}

/// `GET /training/jobs/{id}/checkpoint/{file}`: one file of the job's
/// checkpoint directory, such as `best.json` (the sidecar with class names
/// and config that `Checkpoint::open` needs) or `last.safetensors`.
#[utoipa::path(
    get,
    path = "/training/jobs/{id}/checkpoint/{file}",
    tag = "jobs",
    params(
        ("id" = JobId, Path, description = "The job's id (a UUID)"),
        ("file" = String, Path, description = "A file of the set: `best.safetensors`, `best.json`, `best.optim.safetensors` and their `last.*` for the engine's; `best.{name}` and `last.{name}` for a script's (`best.weights.pt`)", pattern = r"^(best|last)\.[A-Za-z0-9_.-]{1,123}$"),
    ),
    responses(
        (status = 200, description = "The file", body = Binary, content_type = "application/octet-stream"),
        CommonErrors,
    ),
    security((), ("bearer" = [])),
)]
pub async fn checkpoint_file(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath((id, file)): ApiPath<(JobId, String)>,
) -> ApiResult<Response> {
    if !is_set_file(&file) {
        return Err(Error::invalid(
            "file",
            format!(
                "{file:?} is not a checkpoint file; expected best.* or last.* \
                 (best.safetensors, best.json, last.optim.safetensors, best.weights.pt, ...)"
            ),
        )
        .into());
    }
    let weights = checkpoint_key(&state, &caller, id).await?;
    let dir = weights.as_str().rsplit_once('/').map_or("", |(dir, _)| dir);
    let key = BlobKey::parse(&format!("{dir}/{file}"))?;
    stream_blob(&state, &key).await
}

/// The key of the job's final checkpoint, or, for a job that ended without
/// one (failed, cancelled), of the last checkpoint set it stored; 404 until
/// there is one.
async fn checkpoint_key(state: &AppState, caller: &Caller, id: JobId) -> ApiResult<BlobKey> {
    let job = owned_job(state.jobs.as_ref(), caller, id).await?;
    let last = job
        .status
        .is_terminal()
        .then_some(job.last_checkpoint_s3_uri)
        .flatten();
    let uri = job
        .checkpoint_s3_uri
        .or(last)
        .ok_or_else(|| Error::not_found("checkpoint of job", id))?;
    let key = state.blobs.key_for(&uri)?;
    // Reports are refused when they point elsewhere; a row written before
    // that check existed is not served either.
    if !key.as_str().starts_with(&format!("jobs/{id}/")) {
        return Err(Error::not_found("checkpoint of job", id).into());
    }
    Ok(key)
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

/// Query of `GET /training/jobs/{id}/events`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct EventsQuery {
    /// Only the events after this revision, for a client that cannot send
    /// `Last-Event-ID` (which wins when both are given).
    #[param(minimum = -1)]
    after: Option<i64>,
}

/// The header a reconnecting event-stream client sends.
pub const LAST_EVENT_ID: &str = "last-event-id";

/// `GET /training/jobs/{id}/events`: the job's changes as server-sent
/// events, from its creation (or after `Last-Event-ID`) on, as they happen.
///
/// Each event is named by its kind (`status`, `progress`, `metrics`: one
/// per epoch) and numbered by the revision the change gave the job, so a
/// client that reconnects with `Last-Event-ID` gets every change it missed
/// and none twice. Its data is a `JobEvent`: the job as the change left it,
/// and an epoch's metrics. A finished job's stream replays its history and
/// ends; clients stop when they see a final status (`completed`, `failed`,
/// `cancelled`). Progress alone (heartbeats) is not kept as history: a
/// stream shows the latest as one `progress` event. Comments keep the
/// connection alive every 15 s. A user may hold a few streams open at once
/// (429 beyond); a stream ends after an hour, or when the server shuts
/// down, and the client reconnects with `Last-Event-ID`.
#[utoipa::path(
    get,
    path = "/training/jobs/{id}/events",
    tag = "jobs",
    params(
        ("id" = JobId, Path, description = "The job's id (a UUID)"),
        EventsQuery,
        ("Last-Event-ID" = Option<i64>, Header, description = "The id (a revision) of the last event the client saw"),
    ),
    responses(
        (status = 200, description = "A stream of `text/event-stream` events whose data are JobEvents", content_type = "text/event-stream", body = vtp_core::JobEvent),
        CommonErrors,
    ),
    security((), ("bearer" = [])),
)]
pub async fn events(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<JobId>,
    ApiQuery(query): ApiQuery<EventsQuery>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let job = owned_job(state.jobs.as_ref(), &caller, id).await?;
    let last_event_id = match headers.get(LAST_EVENT_ID) {
        None => None,
        Some(value) => Some(
            value
                .to_str()
                .ok()
                .and_then(|v| v.trim().parse::<i64>().ok())
                .filter(|v| *v >= -1)
                .ok_or_else(|| {
                    Error::invalid(
                        "Last-Event-ID",
                        "must be an event id (a revision) from this stream",
                    )
                })?,
        ),
    };
    if query.after.is_some_and(|after| after < -1) {
        return Err(Error::invalid("after", "must be -1 or more").into());
    }
    let after = last_event_id.or(query.after).unwrap_or(-1);
    let held = state.limits.open_stream(&caller.principal().user_id)?;
    let stream = crate::events::stream(state, job, after, held);
    Ok(axum::response::sse::Sse::new(stream)
        .keep_alive(
            axum::response::sse::KeepAlive::new().interval(std::time::Duration::from_secs(15)),
        )
        .into_response())
}
