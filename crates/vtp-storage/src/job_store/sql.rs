//! What the SQLite and Postgres job stores share: the row type, the error
//! mapping and the store body (one macro, so both run the same SQL).

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use sqlx::types::Json;
use uuid::Uuid;
use vtp_core::{Error, Job, JobId, TrainingMetric};

/// One `jobs` row as both databases decode it.
#[derive(Debug, sqlx::FromRow)]
pub(crate) struct JobRow {
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
    pub(crate) fn id(&self) -> Uuid {
        self.id
    }
}

/// One `training_metrics` row.
#[derive(Debug, sqlx::FromRow)]
pub(crate) struct MetricRow {
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

/// Maps a database error to its category (SQLSTATE for Postgres, result codes for SQLite).
pub(crate) fn map_sqlx(err: sqlx::Error) -> Error {
    use sqlx::Error as E;
    match &err {
        E::RowNotFound => Error::not_found("row", "?"),
        // A connection cut mid-exchange can surface as a protocol error (an
        // unexpected end of the stream, a TLS negotiation that got no answer)
        // rather than as I/O: it is the same outage.
        E::PoolTimedOut
        | E::PoolClosed
        | E::Io(_)
        | E::Tls(_)
        | E::Protocol(_)
        | E::WorkerCrashed => Error::unavailable("database", err),
        E::Database(db) => match db.code().as_deref() {
            // unique_violation (Postgres), SQLITE_CONSTRAINT_PRIMARYKEY / _UNIQUE.
            Some("23505" | "1555" | "2067") => Error::AlreadyExists {
                kind: "row",
                id: db.message().to_owned(),
            },
            // Connection exceptions, shutdown, too many connections, serialization
            // failures, deadlocks; SQLITE_BUSY and SQLITE_LOCKED.
            Some(code)
                if code.starts_with("08")
                    || code.starts_with("57P")
                    || matches!(code, "53300" | "40001" | "40P01" | "5" | "6" | "517") =>
            {
                Error::unavailable("database", err)
            }
            _ => Error::backend("database", err),
        },
        _ => Error::backend("database", err),
    }
}

/// The columns of a [`JobRow`], in one place for every `SELECT` and `RETURNING`.
macro_rules! job_columns {
    () => {
        "id, user_id, model_name, framework, dataset_s3_uri, config, epochs, status, priority, progress, \
         message, error, checkpoint_s3_uri, last_checkpoint_s3_uri, attempts, attempt, last_seq, \
         revision, created_at, updated_at, started_at, finished_at, queued_at, launched_at, not_before, \
         deleted_at, create_key, create_digest, start_key, per_class"
    };
}
pub(crate) use job_columns;

/// The compare-and-set `UPDATE` of a job, as a literal (so `concat!` can
/// wrap it in a CTE or add a condition), without its `RETURNING`.
/// Parameters `$1..$21`: see [`bind_update`].
macro_rules! update_job_sql {
    () => {
        "UPDATE jobs SET status = $3, progress = $4, message = $5, error = $6, checkpoint_s3_uri = $7, \
         attempt = $8, last_seq = $9, updated_at = $10, started_at = $11, finished_at = $12, \
         last_checkpoint_s3_uri = $14, attempts = $15, start_key = $16, queued_at = $17, \
         launched_at = $18, not_before = $19, deleted_at = $20, per_class = $21, revision = revision + 1 \
         WHERE id = $1 AND status = $2 AND revision = $13"
    };
}
pub(crate) use update_job_sql;

/// Binds `$1..$21` of [`update_job_sql`]: the next job's fields and the expectation.
macro_rules! bind_update {
    ($query:expr, $next:expr, $expected:expr) => {
        $query
            .bind($next.id.0)
            .bind($expected.status.as_str())
            .bind($next.status.as_str())
            .bind($next.progress)
            .bind(&$next.message)
            .bind(&$next.error)
            .bind(&$next.checkpoint_s3_uri)
            .bind($next.attempt)
            .bind($next.last_seq)
            .bind($next.updated_at)
            .bind($next.started_at)
            .bind($next.finished_at)
            .bind($expected.revision)
            .bind(&$next.last_checkpoint_s3_uri)
            .bind(sqlx::types::Json(&$next.attempts))
            .bind(&$next.idempotency.start)
            .bind($next.queued_at)
            .bind($next.launched_at)
            .bind($next.not_before)
            .bind($next.deleted_at)
            .bind($next.per_class.as_ref().map(sqlx::types::Json))
    };
}
pub(crate) use bind_update;

/// The jobs of one owner in a quota's statuses, other than `$id_param`'s,
/// as a condition on a `jobs` row (`$owner`'s): the quota's statuses are
/// the three parameters from `$first` (a shorter list repeats its last).
macro_rules! quota_count_sql {
    ($owner:literal, $id:literal, $first:literal, $second:literal, $third:literal) => {
        concat!(
            "(SELECT COUNT(*) FROM jobs q WHERE q.user_id = ",
            $owner,
            " AND q.id <> ",
            $id,
            " AND q.deleted_at IS NULL AND q.status IN (",
            $first,
            ", ",
            $second,
            ", ",
            $third,
            "))"
        )
    };
}
pub(crate) use quota_count_sql;

/// The quota's statuses as three bind values (a shorter list repeats its last).
pub(crate) fn quota_statuses(quota: &vtp_core::Quota) -> [&'static str; 3] {
    let names = quota.status_names();
    let at = |i: usize| names.get(i).or(names.last()).copied().unwrap_or("pending");
    [at(0), at(1), at(2)]
}

/// The waiting jobs in queue order, with their rank among their owner's
/// (`rn`) and their fair-share key (`share`): see [`vtp_core::queue`].
/// Shared by `queue` and `queue_positions`, so both rank alike.
macro_rules! ranked_queue_sql {
    () => {
        "WITH held AS (\
           SELECT user_id, COUNT(*) AS n FROM jobs \
           WHERE deleted_at IS NULL AND (status IN ('running', 'cancelling') \
             OR (status = 'queued' AND launched_at IS NOT NULL)) \
           GROUP BY user_id), \
         waiting AS (\
           SELECT jobs.*, ROW_NUMBER() OVER (PARTITION BY user_id ORDER BY priority DESC, queued_at, id) AS rn \
           FROM jobs WHERE status = 'queued' AND launched_at IS NULL AND deleted_at IS NULL), \
         ranked AS (\
           SELECT waiting.*, COALESCE(held.n, 0) + waiting.rn AS share \
           FROM waiting LEFT JOIN held ON held.user_id = waiting.user_id) "
    };
}
pub(crate) use ranked_queue_sql;

/// The SQL of the `INSERT` of a new job: parameters `$1..$30` (see
/// `bind_insert`), the values as one `SELECT` so a condition can follow.
macro_rules! insert_job_sql {
    () => {
        "INSERT INTO jobs (id, user_id, model_name, framework, dataset_s3_uri, config, status, progress, \
         message, error, checkpoint_s3_uri, last_checkpoint_s3_uri, attempts, attempt, last_seq, revision, \
         created_at, updated_at, started_at, finished_at, create_key, create_digest, start_key, \
         epochs, priority, queued_at, launched_at, not_before, deleted_at, per_class) \
         SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20, \
         $21, $22, $23, $24, $25, $26, $27, $28, $29, $30"
    };
}
pub(crate) use insert_job_sql;

/// Binds `$1..$30` of [`insert_job_sql`].
macro_rules! bind_insert {
    ($query:expr, $job:expr) => {
        $query
            .bind($job.id.0)
            .bind(&$job.user_id)
            .bind(&$job.model_name)
            .bind(&$job.framework)
            .bind(&$job.dataset_s3_uri)
            .bind(sqlx::types::Json(&$job.config))
            .bind($job.status.as_str())
            .bind($job.progress)
            .bind(&$job.message)
            .bind(&$job.error)
            .bind(&$job.checkpoint_s3_uri)
            .bind(&$job.last_checkpoint_s3_uri)
            .bind(sqlx::types::Json(&$job.attempts))
            .bind($job.attempt)
            .bind($job.last_seq)
            .bind($job.revision)
            .bind($job.created_at)
            .bind($job.updated_at)
            .bind($job.started_at)
            .bind($job.finished_at)
            .bind($job.idempotency.create.as_ref().map(|keyed| &keyed.key))
            .bind($job.idempotency.create.as_ref().map(|keyed| &keyed.digest))
            .bind(&$job.idempotency.start)
            .bind(i32::try_from($job.epochs).unwrap_or(i32::MAX))
            .bind($job.priority)
            .bind($job.queued_at)
            .bind($job.launched_at)
            .bind($job.not_before)
            .bind($job.deleted_at)
            .bind($job.per_class.as_ref().map(sqlx::types::Json))
    };
}
pub(crate) use bind_insert;

/// A create's unique violation, named: the owner's `Idempotency-Key` (its
/// unique index) or the id.
pub(crate) fn create_conflict(job: &Job, err: sqlx::Error) -> Error {
    match map_sqlx(err) {
        Error::AlreadyExists { id, .. } if id.contains("create_key") => Error::AlreadyExists {
            kind: "idempotency key",
            id: job
                .idempotency
                .create
                .as_ref()
                .map(|keyed| keyed.key.clone())
                .unwrap_or_default(),
        },
        Error::AlreadyExists { .. } => Error::AlreadyExists {
            kind: "job",
            id: job.id.to_string(),
        },
        other => other,
    }
}

/// The conflict a failed compare-and-set reports, naming what was expected and what was found.
pub(crate) fn lost_race(next: &Job, expected: &vtp_core::Expected, current: &Job) -> Error {
    Error::conflict(format!(
        "job {} changed concurrently: expected {} (revision {}), found {} (revision {})",
        next.id, expected.status, expected.revision, current.status, current.revision
    ))
}

/// How a store writes one compare-and-set: the job's row where it is still
/// as expected, with the change's metric row and event row, all or nothing.
pub(crate) trait WriteChange {
    /// Writes `next` (and `metric`, and the change's event) if the job is
    /// as `expected`: the job as stored, or `None` when it was not (nothing
    /// written).
    async fn write_change(
        &self,
        expected: vtp_core::Expected,
        next: &Job,
        metric: Option<&TrainingMetric>,
    ) -> Result<Option<Job>, Error>;
}

/// Implements `JobStore` for `$store`, a struct with a `pool: sqlx::Pool<$db>`
/// field that implements [`WriteChange`] (how the database writes a
/// compare-and-set).
///
/// `owner_lock` is the statement that serialises a quota's count with its
/// write, per owner, inside the write's transaction (Postgres: a
/// transaction-scoped advisory lock on the owner, without which two
/// concurrent transactions would each count the other's row as absent);
/// `None` where a single write statement is serialised anyway (SQLite
/// allows one writer at a time).
macro_rules! impl_sql_job_store {
    ($store:ty, owner_lock = $lock:expr) => {
        impl $store {
            /// Takes the owner's quota lock in `tx`, where the database needs one.
            async fn lock_owner(
                tx: &mut sqlx::Transaction<'_, <$store as $crate::job_store::sql::HasDb>::Db>,
                user_id: &str,
            ) -> vtp_core::Result<()> {
                let lock: Option<&'static str> = $lock;
                if let Some(lock) = lock {
                    sqlx::query(lock)
                        .bind(user_id)
                        .execute(&mut **tx)
                        .await
                        .map_err($crate::job_store::sql::map_sqlx)?;
                }
                Ok(())
            }

            /// Stores `event` as the change to its job, unless it is only progress.
            async fn insert_event(
                tx: &mut sqlx::Transaction<'_, <$store as $crate::job_store::sql::HasDb>::Db>,
                event: &vtp_core::JobEvent,
            ) -> vtp_core::Result<()> {
                if !event.kind.is_history() {
                    return Ok(());
                }
                sqlx::query("INSERT INTO job_events (job_id, revision, event) VALUES ($1, $2, $3)")
                    .bind(event.job.id.0)
                    .bind(event.revision)
                    .bind(sqlx::types::Json(event))
                    .execute(&mut **tx)
                    .await
                    .map_err($crate::job_store::sql::map_sqlx)?;
                Ok(())
            }
        }

        #[async_trait::async_trait]
        impl vtp_core::JobStore for $store {
            async fn create(&self, job: &vtp_core::Job) -> vtp_core::Result<()> {
                use $crate::job_store::sql::map_sqlx;
                // The job and its first event, together or not at all.
                let mut tx = self.pool.begin().await.map_err(map_sqlx)?;
                $crate::job_store::sql::bind_insert!(
                    sqlx::query($crate::job_store::sql::insert_job_sql!()),
                    job
                )
                .execute(&mut *tx)
                .await
                .map_err(|e| $crate::job_store::sql::create_conflict(job, e))?;
                Self::insert_event(&mut tx, &vtp_core::JobEvent::of_change(None, job, None)).await?;
                tx.commit().await.map_err(map_sqlx)
            }

            async fn create_within(
                &self,
                job: &vtp_core::Job,
                quota: vtp_core::Quota,
            ) -> vtp_core::Result<()> {
                use $crate::job_store::sql::map_sqlx;
                let mut tx = self.pool.begin().await.map_err(map_sqlx)?;
                Self::lock_owner(&mut tx, &job.user_id).await?;
                let [first, second, third] = $crate::job_store::sql::quota_statuses(&quota);
                let done = $crate::job_store::sql::bind_insert!(
                    sqlx::query(concat!(
                        $crate::job_store::sql::insert_job_sql!(),
                        " WHERE ",
                        $crate::job_store::sql::quota_count_sql!("$2", "$1", "$31", "$32", "$33"),
                        " < $34"
                    )),
                    job
                )
                .bind(first)
                .bind(second)
                .bind(third)
                .bind(i64::from(quota.limit))
                .execute(&mut *tx)
                .await
                .map_err(|e| $crate::job_store::sql::create_conflict(job, e))?;
                if done.rows_affected() == 0 {
                    return Err(quota.exceeded(&job.user_id));
                }
                Self::insert_event(&mut tx, &vtp_core::JobEvent::of_change(None, job, None)).await?;
                tx.commit().await.map_err(map_sqlx)
            }

            async fn get(&self, id: vtp_core::JobId) -> vtp_core::Result<vtp_core::Job> {
                let row: Option<$crate::job_store::sql::JobRow> = sqlx::query_as(
                    concat!("SELECT ", $crate::job_store::sql::job_columns!(), " FROM jobs WHERE id = $1"),
                )
                .bind(id.0)
                .fetch_optional(&self.pool)
                .await
                .map_err($crate::job_store::sql::map_sqlx)?;
                row.ok_or_else(|| vtp_core::Error::not_found("job", id))?.try_into()
            }

            async fn find_created_with_key(
                &self,
                user_id: &str,
                key: &str,
            ) -> vtp_core::Result<Option<vtp_core::Job>> {
                let row: Option<$crate::job_store::sql::JobRow> = sqlx::query_as(concat!(
                    "SELECT ",
                    $crate::job_store::sql::job_columns!(),
                    " FROM jobs WHERE user_id = $1 AND create_key = $2"
                ))
                .bind(user_id)
                .bind(key)
                .fetch_optional(&self.pool)
                .await
                .map_err($crate::job_store::sql::map_sqlx)?;
                row.map(TryInto::try_into).transpose()
            }

            async fn list(&self, filter: &vtp_core::JobFilter) -> vtp_core::Result<vtp_core::JobPage> {
                let limit = filter.effective_limit();
                // No owner's name holds a NUL (`validate_name` refuses it),
                // and Postgres cannot even compare text holding one (found
                // by schemathesis): nobody's jobs, not a database error.
                if filter.user_id.as_deref().is_some_and(|user| user.contains('\0')) {
                    return Ok(vtp_core::JobPage {
                        jobs: Vec::new(),
                        total: 0,
                        limit,
                        offset: filter.offset,
                        next_cursor: None,
                    });
                }
                let status = filter.status.map(vtp_core::JobStatus::as_str);
                let deleted = filter.deleted.unwrap_or(false);
                let (after_time, after_id) = match filter.after {
                    Some(cursor) => (Some(cursor.created_at), Some(cursor.id.0)),
                    None => (None, None),
                };
                macro_rules! conditions {
                    () => {
                        " WHERE ($1 IS NULL OR user_id = $1) AND ($2 IS NULL OR status = $2) \
                          AND ($3 IS NULL OR updated_at < $3) AND ($4 IS NULL OR finished_at < $4) \
                          AND ($5 IS NULL OR $5 = (launched_at IS NOT NULL)) \
                          AND $6 = (deleted_at IS NOT NULL) \
                          AND ($7 IS NULL OR created_at < $7 OR (created_at = $7 AND id < $8))"
                    };
                }
                let rows: Vec<$crate::job_store::sql::JobRow> = sqlx::query_as(concat!(
                    "SELECT ",
                    $crate::job_store::sql::job_columns!(),
                    " FROM jobs",
                    conditions!(),
                    " ORDER BY created_at DESC, id DESC LIMIT $9 OFFSET $10"
                ))
                .bind(&filter.user_id)
                .bind(status)
                .bind(filter.updated_before)
                .bind(filter.finished_before)
                .bind(filter.launched)
                .bind(deleted)
                .bind(after_time)
                .bind(after_id)
                .bind(i64::from(limit))
                .bind(i64::from(filter.offset))
                .fetch_all(&self.pool)
                .await
                .map_err($crate::job_store::sql::map_sqlx)?;
                let total: i64 = sqlx::query_scalar(concat!("SELECT COUNT(*) FROM jobs", conditions!()))
                    .bind(&filter.user_id)
                    .bind(status)
                    .bind(filter.updated_before)
                    .bind(filter.finished_before)
                    .bind(filter.launched)
                    .bind(deleted)
                    .bind(after_time)
                    .bind(after_id)
                    .fetch_one(&self.pool)
                    .await
                    .map_err($crate::job_store::sql::map_sqlx)?;
                let jobs: Vec<vtp_core::Job> =
                    rows.into_iter().map(TryInto::try_into).collect::<vtp_core::Result<_>>()?;
                Ok(vtp_core::JobPage {
                    next_cursor: vtp_core::next_cursor(&jobs, limit),
                    jobs,
                    total: u64::try_from(total).unwrap_or(0),
                    limit,
                    offset: filter.offset,
                })
            }

            async fn compare_and_set(
                &self,
                expected: vtp_core::Expected,
                next: &vtp_core::Job,
                metric: Option<&vtp_core::TrainingMetric>,
            ) -> vtp_core::Result<vtp_core::Job> {
                use $crate::job_store::sql::{WriteChange, lost_race};
                match self.write_change(expected, next, metric).await? {
                    Some(stored) => Ok(stored),
                    None => Err(lost_race(next, &expected, &self.get(next.id).await?)),
                }
            }

            async fn compare_and_set_within(
                &self,
                expected: vtp_core::Expected,
                next: &vtp_core::Job,
                quota: vtp_core::Quota,
            ) -> vtp_core::Result<vtp_core::Job> {
                use $crate::job_store::sql::{lost_race, map_sqlx};
                let mut tx = self.pool.begin().await.map_err(map_sqlx)?;
                Self::lock_owner(&mut tx, &next.user_id).await?;
                let [first, second, third] = $crate::job_store::sql::quota_statuses(&quota);
                let row: Option<$crate::job_store::sql::JobRow> = $crate::job_store::sql::bind_update!(
                    sqlx::query_as(concat!(
                        $crate::job_store::sql::update_job_sql!(),
                        " AND ",
                        $crate::job_store::sql::quota_count_sql!("jobs.user_id", "jobs.id", "$22", "$23", "$24"),
                        " < $25 RETURNING ",
                        $crate::job_store::sql::job_columns!()
                    )),
                    next,
                    expected
                )
                .bind(first)
                .bind(second)
                .bind(third)
                .bind(i64::from(quota.limit))
                .fetch_optional(&mut *tx)
                .await
                .map_err(map_sqlx)?;
                let Some(row) = row else {
                    drop(tx);
                    let current = self.get(next.id).await?;
                    return Err(if current.status == expected.status && current.revision == expected.revision {
                        quota.exceeded(&next.user_id)
                    } else {
                        lost_race(next, &expected, &current)
                    });
                };
                let stored: vtp_core::Job = row.try_into()?;
                let event = vtp_core::JobEvent::of_change(Some(expected.status), &stored, None);
                Self::insert_event(&mut tx, &event).await?;
                tx.commit().await.map_err(map_sqlx)?;
                Ok(stored)
            }

            async fn queue(
                &self,
                now: chrono::DateTime<chrono::Utc>,
                limit: u32,
            ) -> vtp_core::Result<Vec<vtp_core::Job>> {
                let rows: Vec<$crate::job_store::sql::JobRow> = sqlx::query_as(concat!(
                    $crate::job_store::sql::ranked_queue_sql!(),
                    "SELECT ",
                    $crate::job_store::sql::job_columns!(),
                    " FROM ranked WHERE not_before IS NULL OR not_before <= $1 \
                     ORDER BY priority DESC, share, queued_at, id LIMIT $2"
                ))
                .bind(now)
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await
                .map_err($crate::job_store::sql::map_sqlx)?;
                rows.into_iter().map(TryInto::try_into).collect()
            }

            async fn queue_positions(
                &self,
                user_id: Option<&str>,
            ) -> vtp_core::Result<std::collections::HashMap<vtp_core::JobId, u64>> {
                let rows: Vec<(uuid::Uuid, i64)> = sqlx::query_as(concat!(
                    $crate::job_store::sql::ranked_queue_sql!(),
                    ", placed AS (SELECT id, user_id, ROW_NUMBER() OVER \
                     (ORDER BY priority DESC, share, queued_at, id) AS place FROM ranked) \
                     SELECT id, place FROM placed WHERE $1 IS NULL OR user_id = $1"
                ))
                .bind(user_id)
                .fetch_all(&self.pool)
                .await
                .map_err($crate::job_store::sql::map_sqlx)?;
                Ok(rows
                    .into_iter()
                    .map(|(id, place)| (vtp_core::JobId(id), u64::try_from(place).unwrap_or(0)))
                    .collect())
            }

            async fn slots_taken(&self) -> vtp_core::Result<u64> {
                let taken: i64 = sqlx::query_scalar(
                    "SELECT COUNT(*) FROM jobs WHERE deleted_at IS NULL AND (status IN ('running', 'cancelling') \
                     OR (status = 'queued' AND launched_at IS NOT NULL))",
                )
                .fetch_one(&self.pool)
                .await
                .map_err($crate::job_store::sql::map_sqlx)?;
                Ok(u64::try_from(taken).unwrap_or(0))
            }

            async fn delete(&self, id: vtp_core::JobId) -> vtp_core::Result<bool> {
                // Its events, metrics and callback secret go with it (ON DELETE CASCADE).
                let done = sqlx::query("DELETE FROM jobs WHERE id = $1")
                    .bind(id.0)
                    .execute(&self.pool)
                    .await
                    .map_err($crate::job_store::sql::map_sqlx)?;
                Ok(done.rows_affected() > 0)
            }

            async fn insert_metric_if_absent(&self, metric: &vtp_core::TrainingMetric) -> vtp_core::Result<bool> {
                let done = sqlx::query(
                    "INSERT INTO training_metrics (job_id, epoch, metric_values, recorded_at) VALUES ($1, $2, $3, $4) \
                     ON CONFLICT (job_id, epoch) DO NOTHING",
                )
                .bind(metric.job_id.0)
                .bind(i64::from(metric.epoch))
                .bind(sqlx::types::Json(&metric.values))
                .bind(metric.recorded_at)
                .execute(&self.pool)
                .await
                .map_err($crate::job_store::sql::map_sqlx)?;
                Ok(done.rows_affected() == 1)
            }

            async fn metrics(&self, id: vtp_core::JobId) -> vtp_core::Result<Vec<vtp_core::TrainingMetric>> {
                let rows: Vec<$crate::job_store::sql::MetricRow> = sqlx::query_as(
                    "SELECT job_id, epoch, metric_values, recorded_at FROM training_metrics \
                     WHERE job_id = $1 ORDER BY epoch",
                )
                .bind(id.0)
                .fetch_all(&self.pool)
                .await
                .map_err($crate::job_store::sql::map_sqlx)?;
                if rows.is_empty() {
                    // Distinguish "no metrics yet" from "no such job".
                    self.get(id).await?;
                }
                rows.into_iter().map(TryInto::try_into).collect()
            }

            async fn events(
                &self,
                id: vtp_core::JobId,
                after: i64,
                limit: u32,
            ) -> vtp_core::Result<Vec<vtp_core::JobEvent>> {
                let rows: Vec<(sqlx::types::Json<vtp_core::JobEvent>,)> = sqlx::query_as(
                    "SELECT event FROM job_events WHERE job_id = $1 AND revision > $2 \
                     ORDER BY revision LIMIT $3",
                )
                .bind(id.0)
                .bind(after)
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await
                .map_err($crate::job_store::sql::map_sqlx)?;
                if rows.is_empty() {
                    // Distinguish "nothing new" from "no such job".
                    self.get(id).await?;
                }
                Ok(rows.into_iter().map(|(event,)| event.0).collect())
            }

            async fn ping(&self) -> vtp_core::Result<()> {
                sqlx::query("SELECT 1")
                    .execute(&self.pool)
                    .await
                    .map_err($crate::job_store::sql::map_sqlx)?;
                Ok(())
            }
        }
    };
}

pub(crate) use impl_sql_job_store;

/// The database of a store, for the helpers the macro adds.
pub(crate) trait HasDb {
    /// sqlx's database type.
    type Db: sqlx::Database;
}
