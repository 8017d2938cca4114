//! What trainers report and what the backend serves back of it: the signed
//! callback (`POST /training/jobs/{id}/callback`), the metrics and the event
//! stream.

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use vtp_core::api::{CallbackAck, EpochMetrics};
use vtp_core::{BlobStoreExt, Error, JobId, JobStatus, JobStoreExt, TrainingReport};

use super::ApiResult;
use crate::AppState;
use crate::auth::{Caller, ConnectedFrom, job_secret, owned_job};
use crate::error::{ApiError, ApiPath, ApiQuery, error_chain, parse_json};
use crate::openapi::CommonErrors;

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
    request_body = TrainingReport,
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
    let update: TrainingReport = parse_json(&body)?;
    check_report(&state, id, &update)?;
    // Planned on the version the job's previous report stored, if any.
    let _turn = state.known_jobs.turn(id).await;
    let known = state.known_jobs.get(id);
    let outcome = match state.jobs.apply_report_from(id, &update, known).await {
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
fn check_report(state: &AppState, id: JobId, update: &TrainingReport) -> ApiResult<()> {
    for (field, uri) in [
        ("checkpoint_s3_uri", &update.checkpoint_s3_uri),
        ("last_checkpoint_s3_uri", &update.last_checkpoint_s3_uri),
    ] {
        let Some(uri) = uri else { continue };
        let prefix = vtp_core::layout::job_prefix(id);
        let inside = state
            .blobs
            .key_for(uri)
            .is_ok_and(|key| vtp_core::layout::is_below(&key, &prefix));
        if !inside {
            return Err(Error::invalid(
                field,
                format!("{uri} is not under this job's {prefix}/ in the backend's blob store"),
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
