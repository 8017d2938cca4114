//! The rows the SQL store reads, decoded by column name, and the columns
//! it writes, each name beside its value.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use sqlx::types::Json;
use uuid::Uuid;
use vtp_core::{Error, Job, JobId, TrainingMetric};

use super::driver::Value;

/// One `jobs` row as both databases decode it.
#[derive(Debug, sqlx::FromRow)]
pub struct JobRow {
    id: Uuid,
    user_id: String,
    model_name: String,
    framework: String,
    dataset_s3_uri: String,
    config: Json<serde_json::Value>,
    epochs: i32,
    status: String,
    priority: i32,
    queued_at: Option<DateTime<Utc>>,
    launched_at: Option<DateTime<Utc>>,
    not_before: Option<DateTime<Utc>>,
    deleted_at: Option<DateTime<Utc>>,
    progress: f64,
    message: Option<String>,
    error: Option<String>,
    checkpoint_s3_uri: Option<String>,
    last_checkpoint_s3_uri: Option<String>,
    attempts: Json<Vec<vtp_core::AttemptEnded>>,
    per_class: Option<Json<vtp_core::ClassReport>>,
    attempt: i32,
    last_seq: i64,
    revision: i64,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    started_at: Option<DateTime<Utc>>,
    finished_at: Option<DateTime<Utc>>,
    create_key: Option<String>,
    create_digest: Option<String>,
    start_key: Option<String>,
}

impl TryFrom<JobRow> for Job {
    type Error = Error;

    fn try_from(row: JobRow) -> Result<Self, Error> {
        Ok(Job {
            id: JobId(row.id),
            user_id: row.user_id,
            model_name: row.model_name,
            framework: row.framework,
            dataset_s3_uri: row.dataset_s3_uri,
            config: row.config.0,
            epochs: u32::try_from(row.epochs).unwrap_or(0),
            priority: row.priority,
            queued_at: row.queued_at,
            launched_at: row.launched_at,
            not_before: row.not_before,
            queue_position: None,
            deleted_at: row.deleted_at,
            status: row.status.parse().map_err(|_| {
                Error::internal(format!(
                    "job {} has unknown status {:?}",
                    row.id, row.status
                ))
            })?,
            progress: row.progress,
            message: row.message,
            error: row.error,
            checkpoint_s3_uri: row.checkpoint_s3_uri,
            last_checkpoint_s3_uri: row.last_checkpoint_s3_uri,
            attempts: row.attempts.0,
            per_class: row.per_class.map(|json| json.0),
            attempt: row.attempt,
            last_seq: row.last_seq,
            revision: row.revision,
            created_at: row.created_at,
            updated_at: row.updated_at,
            started_at: row.started_at,
            finished_at: row.finished_at,
            callback_url: None,
            idempotency: vtp_core::IdempotencyKeys {
                create: row.create_key.map(|key| vtp_core::KeyedRequest {
                    key,
                    digest: row.create_digest.unwrap_or_default(),
                }),
                start: row.start_key,
            },
        })
    }
}

impl JobRow {
    /// The job's id.
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    pub fn id(&self) -> Uuid {
        self.id
    }
}

/// One `training_metrics` row.
#[derive(Debug, sqlx::FromRow)]
pub struct MetricRow {
    job_id: Uuid,
    epoch: i64,
    metric_values: Json<BTreeMap<String, f64>>,
    recorded_at: DateTime<Utc>,
}

impl TryFrom<MetricRow> for TrainingMetric {
    type Error = Error;

    fn try_from(row: MetricRow) -> Result<Self, Error> {
        Ok(TrainingMetric {
            job_id: JobId(row.job_id),
            epoch: u32::try_from(row.epoch)
                .map_err(|_| Error::internal(format!("metric epoch {} out of range", row.epoch)))?,
            values: row.metric_values.0,
            recorded_at: row.recorded_at,
        })
    }
}

/// A `job_events` row's document.
pub type EventRow = (Json<vtp_core::JobEvent>,);

/// A waiting job and its place in the queue.
pub type PlaceRow = (Uuid, i64);

/// A count.
pub type CountRow = (i64,);

/// The columns of a [`JobRow`], as every `SELECT` and `RETURNING` names them.
pub const JOB_COLUMNS: &str = "id, user_id, model_name, framework, dataset_s3_uri, config, epochs, \
     status, priority, progress, message, error, checkpoint_s3_uri, last_checkpoint_s3_uri, \
     attempts, attempt, last_seq, revision, created_at, updated_at, started_at, finished_at, \
     queued_at, launched_at, not_before, deleted_at, create_key, create_digest, start_key, per_class";

/// A column's name beside the value written to it.
pub type Column<'a> = (&'static str, Value<'a>);

/// The columns a job is created with and never changes afterwards.
pub fn fixed_columns(job: &Job) -> Result<Vec<Column<'_>>, Error> {
    let create = job.idempotency.create.as_ref();
    Ok(vec![
        ("id", job.id.0.into()),
        ("user_id", job.user_id.as_str().into()),
        ("model_name", job.model_name.as_str().into()),
        ("framework", job.framework.as_str().into()),
        ("dataset_s3_uri", job.dataset_s3_uri.as_str().into()),
        ("config", Value::json(&job.config)?),
        (
            "epochs",
            i32::try_from(job.epochs).unwrap_or(i32::MAX).into(),
        ),
        ("priority", job.priority.into()),
        ("revision", job.revision.into()),
        ("created_at", job.created_at.into()),
        ("create_key", create.map(|keyed| keyed.key.as_str()).into()),
        (
            "create_digest",
            create.map(|keyed| keyed.digest.as_str()).into(),
        ),
    ])
}

/// The columns a compare-and-set writes: everything about a job that
/// changes after it was created, but its revision (which the statement
/// counts up itself).
pub fn changing_columns(job: &Job) -> Result<Vec<Column<'_>>, Error> {
    Ok(vec![
        ("status", job.status.as_str().into()),
        ("progress", job.progress.into()),
        ("message", job.message.as_deref().into()),
        ("error", job.error.as_deref().into()),
        ("checkpoint_s3_uri", job.checkpoint_s3_uri.as_deref().into()),
        (
            "last_checkpoint_s3_uri",
            job.last_checkpoint_s3_uri.as_deref().into(),
        ),
        ("attempts", Value::json(&job.attempts)?),
        ("attempt", job.attempt.into()),
        ("last_seq", job.last_seq.into()),
        ("updated_at", job.updated_at.into()),
        ("started_at", job.started_at.into()),
        ("finished_at", job.finished_at.into()),
        ("start_key", job.idempotency.start.as_deref().into()),
        ("queued_at", job.queued_at.into()),
        ("launched_at", job.launched_at.into()),
        ("not_before", job.not_before.into()),
        ("deleted_at", job.deleted_at.into()),
        (
            "per_class",
            match &job.per_class {
                Some(report) => Value::json(report)?,
                None => Value::Json(None),
            },
        ),
    ])
}

/// The columns of a metric row.
pub fn metric_columns(metric: &TrainingMetric) -> Result<Vec<Column<'_>>, Error> {
    Ok(vec![
        ("job_id", metric.job_id.0.into()),
        ("epoch", i64::from(metric.epoch).into()),
        ("metric_values", Value::json(&metric.values)?),
        ("recorded_at", metric.recorded_at.into()),
    ])
}
