//! [`SqlJobStore`]: the job store on a SQL database, one body of code for
//! SQLite and Postgres.
//!
//! Every statement is built with sqlx's [`QueryBuilder`], each value bound
//! beside the column it belongs to (`row.rs`), and every row decoded by
//! column name, so no list of columns can drift from its values. What the
//! two databases do differently is a [`Dialect`]: Postgres serialises a
//! quota's count per owner with an advisory lock and writes compare-and-sets
//! through its group commit; SQLite, with one writer at a time, needs
//! neither.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;

use chrono::{DateTime, Utc};
use sqlx::{Pool, QueryBuilder, Transaction};
use vtp_core::{
    Error, Expected, Job, JobEvent, JobFilter, JobId, JobPage, Quota, Result, TrainingMetric,
};

pub(crate) mod credentials;
mod driver;
mod row;

pub(crate) use driver::BindExt;
use driver::{Decodes, Runs, Value};
use row::{
    Column, CountRow, EventRow, MetricRow, PlaceRow, changing_columns, fixed_columns,
    metric_columns,
};
pub(crate) use row::{JOB_COLUMNS, JobRow};

/// A [`vtp_core::JobStore`] (and [`vtp_core::CredentialStore`]) in a SQL
/// database: [`SqliteJobStore`](crate::SqliteJobStore) and
/// [`PostgresJobStore`](crate::PostgresJobStore) are this store on each.
pub struct SqlJobStore<DB: Dialect> {
    pub(super) pool: Pool<DB>,
    /// What the database's dialect keeps of its own (Postgres: its group
    /// commit and connect options).
    pub(super) own: DB::Own,
}

impl<DB: Dialect> Clone for SqlJobStore<DB> {
    fn clone(&self) -> Self {
        SqlJobStore {
            pool: self.pool.clone(),
            own: self.own.clone(),
        }
    }
}

impl<DB: Dialect> fmt::Debug for SqlJobStore<DB> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqlJobStore")
            .field("pool", &self.pool)
            .field("own", &self.own)
            .finish()
    }
}

mod sealed {
    pub trait Sealed {}
    #[cfg(feature = "sqlite")]
    impl Sealed for sqlx::Sqlite {}
    #[cfg(feature = "postgres")]
    impl Sealed for sqlx::Postgres {}
}

/// What one database does its own way; implemented for SQLite and Postgres.
pub trait Dialect: Runs + sealed::Sealed {
    /// State the store keeps for this database.
    type Own: fmt::Debug + Clone + Send + Sync + 'static;

    /// The statement that serialises a quota's count with its write for
    /// `owner`, inside the write's transaction: without it two concurrent
    /// transactions could each count the other's row as absent. `None`
    /// where one write at a time is the rule anyway.
    fn owner_lock(owner: &str) -> Option<QueryBuilder<Self>>;

    /// Writes `next`, with `metric` and the change's event, where the job
    /// is still as `expected`: the job as stored, or `None` when it was not
    /// (nothing written).
    fn write_change<'a>(
        store: &'a SqlJobStore<Self>,
        expected: Expected,
        next: &'a Job,
        metric: Option<&'a TrainingMetric>,
    ) -> impl Future<Output = Result<Option<Job>>> + Send + 'a;
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

/// A create's unique violation, named: the owner's `Idempotency-Key` (its
/// unique index) or the id.
fn create_conflict(job: &Job, err: sqlx::Error) -> Error {
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

/// `INSERT INTO table (names) VALUES (values)`, each column's value bound
/// in its place.
fn insert_values<'a, DB: Runs>(
    table: &str,
    columns: impl IntoIterator<Item = Column<'a>>,
) -> QueryBuilder<DB> {
    let (names, values): (Vec<&str>, Vec<Value<'a>>) = columns.into_iter().unzip();
    let mut query = QueryBuilder::new(format!(
        "INSERT INTO {table} ({}) VALUES (",
        names.join(", ")
    ));
    query.bind_list(values).push(")");
    query
}

/// `SELECT <job columns> FROM jobs`, for a condition to follow.
fn select_jobs<DB: Runs>() -> QueryBuilder<DB> {
    QueryBuilder::new(format!("SELECT {JOB_COLUMNS} FROM jobs"))
}

/// ` AND (the owner's other jobs in the quota's statuses) < its limit`:
/// the condition under which `job` may take one more place in `quota`.
fn push_within_quota<DB: Runs>(query: &mut QueryBuilder<DB>, job: &Job, quota: &Quota) {
    let statuses = quota.status_names();
    query
        .push(" (SELECT COUNT(*) FROM jobs q WHERE q.user_id = ")
        .bind_value(job.user_id.as_str())
        .push(" AND q.id <> ")
        .bind_value(job.id.0)
        .push(" AND q.deleted_at IS NULL AND q.status IN (");
    if statuses.is_empty() {
        query.push("NULL");
    }
    query
        .bind_list(statuses.into_iter().map(Value::from))
        .push(")) < ")
        .bind_value(i64::from(quota.limit));
}

/// `UPDATE jobs SET <changing columns>, revision = revision + 1 WHERE` the
/// job is still as `expected`, for more conditions or a `RETURNING` to follow.
fn update_job<DB: Runs>(expected: Expected, next: &Job) -> Result<QueryBuilder<DB>> {
    let mut query = QueryBuilder::new("UPDATE jobs SET ");
    for (name, value) in changing_columns(next)? {
        query.push(name).push(" = ").bind_value(value).push(", ");
    }
    query
        .push("revision = revision + 1 WHERE id = ")
        .bind_value(next.id.0)
        .push(" AND status = ")
        .bind_value(expected.status.as_str())
        .push(" AND revision = ")
        .bind_value(expected.revision);
    Ok(query)
}

/// The waiting jobs in queue order, with their rank among their owner's
/// (`rn`) and their fair-share key (`share`): see [`vtp_core::queue`].
/// Shared by `queue` and `queue_positions`, so both rank alike.
const RANKED_QUEUE: &str = "WITH held AS (\
       SELECT user_id, COUNT(*) AS n FROM jobs \
       WHERE deleted_at IS NULL AND (status IN ('running', 'cancelling') \
         OR (status = 'queued' AND launched_at IS NOT NULL)) \
       GROUP BY user_id), \
     waiting AS (\
       SELECT jobs.*, ROW_NUMBER() OVER (PARTITION BY user_id ORDER BY priority DESC, queued_at, id) AS rn \
       FROM jobs WHERE status = 'queued' AND launched_at IS NULL AND deleted_at IS NULL), \
     ranked AS (\
       SELECT waiting.*, COALESCE(held.n, 0) + waiting.rn AS share \
       FROM waiting LEFT JOIN held ON held.user_id = waiting.user_id) ";

/// Decodes `row` as an `R`, converted to a `T` (a `JobRow` to a `Job`).
fn decode<DB, R, T>(row: &DB::Row) -> Result<T>
where
    DB: Decodes<R>,
    T: TryFrom<R, Error = Error>,
{
    T::try_from(DB::decode(row).map_err(map_sqlx)?)
}

/// Decodes every row as in [`decode`].
fn decode_all<DB, R, T>(rows: Vec<DB::Row>) -> Result<Vec<T>>
where
    DB: Decodes<R>,
    T: TryFrom<R, Error = Error>,
{
    rows.iter().map(decode::<DB, R, T>).collect()
}

impl<DB: Dialect> SqlJobStore<DB> {
    /// Runs `query` on a pooled connection: every row.
    async fn fetch_all(&self, mut query: QueryBuilder<DB>) -> Result<Vec<DB::Row>> {
        let mut conn = self.pool.acquire().await.map_err(map_sqlx)?;
        DB::fetch_all(&mut *conn, &mut query)
            .await
            .map_err(map_sqlx)
    }

    /// Runs `query` on a pooled connection: its first row, if any.
    async fn fetch_optional(&self, mut query: QueryBuilder<DB>) -> Result<Option<DB::Row>> {
        let mut conn = self.pool.acquire().await.map_err(map_sqlx)?;
        DB::fetch_optional(&mut *conn, &mut query)
            .await
            .map_err(map_sqlx)
    }

    /// Runs `query` on a pooled connection.
    async fn execute(&self, mut query: QueryBuilder<DB>) -> Result<()> {
        let mut conn = self.pool.acquire().await.map_err(map_sqlx)?;
        DB::execute(&mut *conn, &mut query)
            .await
            .map_err(map_sqlx)?;
        Ok(())
    }

    /// Runs `query`, a `SELECT COUNT(*)`: the count.
    async fn count(&self, query: QueryBuilder<DB>) -> Result<u64> {
        let count = match self.fetch_optional(query).await? {
            Some(row) => <DB as Decodes<CountRow>>::decode(&row).map_err(map_sqlx)?.0,
            None => 0,
        };
        Ok(u64::try_from(count).unwrap_or(0))
    }

    /// Takes the owner's quota lock in `tx`, where the database needs one.
    async fn lock_owner(tx: &mut Transaction<'static, DB>, user_id: &str) -> Result<()> {
        if let Some(mut lock) = DB::owner_lock(user_id) {
            DB::execute(&mut **tx, &mut lock).await.map_err(map_sqlx)?;
        }
        Ok(())
    }

    /// Stores `event` as the change to its job, unless it is only progress.
    async fn insert_event(tx: &mut Transaction<'static, DB>, event: &JobEvent) -> Result<()> {
        if !event.kind.is_history() {
            return Ok(());
        }
        let mut query = insert_values(
            "job_events",
            [
                ("job_id", event.job.id.0.into()),
                ("revision", event.revision.into()),
                ("event", Value::json(event)?),
            ],
        );
        DB::execute(&mut **tx, &mut query).await.map_err(map_sqlx)?;
        Ok(())
    }

    /// Inserts `job` and its first event in one transaction, under `quota`
    /// when one is given.
    async fn insert_job(&self, job: &Job, quota: Option<Quota>) -> Result<()> {
        let mut tx = self.pool.begin().await.map_err(map_sqlx)?;
        let (names, values): (Vec<&str>, Vec<Value<'_>>) = fixed_columns(job)?
            .into_iter()
            .chain(changing_columns(job)?)
            .unzip();
        // `SELECT` rather than `VALUES`, so that the quota's condition can follow.
        let mut query =
            QueryBuilder::new(format!("INSERT INTO jobs ({}) SELECT ", names.join(", ")));
        query.bind_list(values);
        if let Some(quota) = &quota {
            Self::lock_owner(&mut tx, &job.user_id).await?;
            query.push(" WHERE");
            push_within_quota(&mut query, job, quota);
        }
        query.push(" RETURNING id");
        let inserted = DB::fetch_optional(&mut *tx, &mut query)
            .await
            .map_err(|e| create_conflict(job, e))?;
        if inserted.is_none() {
            let quota = quota.ok_or_else(|| Error::internal("an insert wrote no row"))?;
            return Err(quota.exceeded(&job.user_id));
        }
        Self::insert_event(&mut tx, &JobEvent::of_change(None, job, None)).await?;
        tx.commit().await.map_err(map_sqlx)
    }

    /// Writes a compare-and-set as one transaction: the job's row where it
    /// is still as `expected`, the metric row (replacing one with other
    /// values for the same epoch) and the event row. How SQLite writes
    /// every change; valid on any database.
    #[cfg_attr(not(feature = "sqlite"), allow(dead_code))]
    pub(super) async fn write_change_in_transaction(
        &self,
        expected: Expected,
        next: &Job,
        metric: Option<&TrainingMetric>,
    ) -> Result<Option<Job>> {
        let mut tx = self.pool.begin().await.map_err(map_sqlx)?;
        let mut update = update_job::<DB>(expected, next)?;
        update.push(" RETURNING ").push(JOB_COLUMNS);
        let Some(row) = DB::fetch_optional(&mut *tx, &mut update)
            .await
            .map_err(map_sqlx)?
        else {
            return Ok(None);
        };
        if let Some(metric) = metric {
            let mut upsert = insert_values("training_metrics", metric_columns(metric)?);
            upsert.push(
                " ON CONFLICT (job_id, epoch) DO UPDATE SET metric_values = excluded.metric_values, \
                 recorded_at = excluded.recorded_at \
                 WHERE training_metrics.metric_values <> excluded.metric_values",
            );
            DB::execute(&mut *tx, &mut upsert).await.map_err(map_sqlx)?;
        }
        let stored = decode::<DB, JobRow, Job>(&row)?;
        let event = JobEvent::of_change(Some(expected.status), &stored, metric);
        Self::insert_event(&mut tx, &event).await?;
        tx.commit().await.map_err(map_sqlx)?;
        Ok(Some(stored))
    }

    /// One page of jobs, newest first, and how many match in all.
    async fn list_page(&self, filter: &JobFilter) -> Result<JobPage> {
        let limit = filter.effective_limit();
        // No owner's name holds a NUL (`validate_name` refuses it), and
        // Postgres cannot even compare text holding one (found by
        // schemathesis): nobody's jobs, not a database error.
        if filter
            .user_id
            .as_deref()
            .is_some_and(|user| user.contains('\0'))
        {
            return Ok(JobPage {
                jobs: Vec::new(),
                total: 0,
                limit,
                offset: filter.offset,
                next_cursor: None,
            });
        }
        let mut page = select_jobs::<DB>();
        push_filter(&mut page, filter);
        page.push(" ORDER BY created_at DESC, id DESC LIMIT ")
            .bind_value(i64::from(limit))
            .push(" OFFSET ")
            .bind_value(i64::from(filter.offset));
        let jobs: Vec<Job> = decode_all::<DB, JobRow, _>(self.fetch_all(page).await?)?;
        let mut count = QueryBuilder::new("SELECT COUNT(*) FROM jobs");
        push_filter(&mut count, filter);
        Ok(JobPage {
            next_cursor: vtp_core::next_cursor(&jobs, limit),
            jobs,
            total: self.count(count).await?,
            limit,
            offset: filter.offset,
        })
    }
}

/// ` WHERE` and the conditions of `filter`, each only when it is set.
fn push_filter<DB: Runs>(query: &mut QueryBuilder<DB>, filter: &JobFilter) {
    query.push(if filter.deleted.unwrap_or(false) {
        " WHERE deleted_at IS NOT NULL"
    } else {
        " WHERE deleted_at IS NULL"
    });
    if let Some(user) = &filter.user_id {
        query.push(" AND user_id = ").bind_value(user.as_str());
    }
    if let Some(status) = filter.status {
        query.push(" AND status = ").bind_value(status.as_str());
    }
    if let Some(before) = filter.updated_before {
        query.push(" AND updated_at < ").bind_value(before);
    }
    if let Some(before) = filter.finished_before {
        query.push(" AND finished_at < ").bind_value(before);
    }
    match filter.launched {
        Some(true) => query.push(" AND launched_at IS NOT NULL"),
        Some(false) => query.push(" AND launched_at IS NULL"),
        None => query,
    };
    if let Some(cursor) = filter.after {
        query
            .push(" AND (created_at < ")
            .bind_value(cursor.created_at)
            .push(" OR (created_at = ")
            .bind_value(cursor.created_at)
            .push(" AND id < ")
            .bind_value(cursor.id.0)
            .push("))");
    }
}

#[async_trait::async_trait]
impl<DB: Dialect> vtp_core::JobStore for SqlJobStore<DB> {
    async fn create(&self, job: &Job) -> Result<()> {
        self.insert_job(job, None).await
    }

    async fn create_within(&self, job: &Job, quota: Quota) -> Result<()> {
        self.insert_job(job, Some(quota)).await
    }

    async fn get(&self, id: JobId) -> Result<Job> {
        let mut query = select_jobs::<DB>();
        query.push(" WHERE id = ").bind_value(id.0);
        let row = self
            .fetch_optional(query)
            .await?
            .ok_or_else(|| Error::not_found("job", id))?;
        decode::<DB, JobRow, Job>(&row)
    }

    async fn find_created_with_key(&self, user_id: &str, key: &str) -> Result<Option<Job>> {
        let mut query = select_jobs::<DB>();
        query
            .push(" WHERE user_id = ")
            .bind_value(user_id)
            .push(" AND create_key = ")
            .bind_value(key);
        self.fetch_optional(query)
            .await?
            .map(|row| decode::<DB, JobRow, Job>(&row))
            .transpose()
    }

    async fn list(&self, filter: &JobFilter) -> Result<JobPage> {
        self.list_page(filter).await
    }

    async fn compare_and_set(
        &self,
        expected: Expected,
        next: &Job,
        metric: Option<&TrainingMetric>,
    ) -> Result<Job> {
        match DB::write_change(self, expected, next, metric).await? {
            Some(stored) => Ok(stored),
            None => Err(expected.lost_to(next.id, &self.get(next.id).await?)),
        }
    }

    async fn compare_and_set_within(
        &self,
        expected: Expected,
        next: &Job,
        quota: Quota,
    ) -> Result<Job> {
        let mut tx = self.pool.begin().await.map_err(map_sqlx)?;
        Self::lock_owner(&mut tx, &next.user_id).await?;
        let mut update = update_job::<DB>(expected, next)?;
        update.push(" AND");
        push_within_quota(&mut update, next, &quota);
        update.push(" RETURNING ").push(JOB_COLUMNS);
        let row = DB::fetch_optional(&mut *tx, &mut update)
            .await
            .map_err(map_sqlx)?;
        let Some(row) = row else {
            drop(tx);
            let current = self.get(next.id).await?;
            return Err(if expected.matches(&current) {
                quota.exceeded(&next.user_id)
            } else {
                expected.lost_to(next.id, &current)
            });
        };
        let stored = decode::<DB, JobRow, Job>(&row)?;
        let event = JobEvent::of_change(Some(expected.status), &stored, None);
        Self::insert_event(&mut tx, &event).await?;
        tx.commit().await.map_err(map_sqlx)?;
        Ok(stored)
    }

    async fn queue(&self, now: DateTime<Utc>, limit: u32) -> Result<Vec<Job>> {
        let mut query = QueryBuilder::new(RANKED_QUEUE);
        query
            .push(format_args!(
                "SELECT {JOB_COLUMNS} FROM ranked WHERE not_before IS NULL OR not_before <= "
            ))
            .bind_value(now)
            .push(" ORDER BY priority DESC, share, queued_at, id LIMIT ")
            .bind_value(i64::from(limit));
        decode_all::<DB, JobRow, _>(self.fetch_all(query).await?)
    }

    async fn queue_positions(&self, user_id: Option<&str>) -> Result<HashMap<JobId, u64>> {
        let mut query = QueryBuilder::new(RANKED_QUEUE);
        query.push(
            ", placed AS (SELECT id, user_id, ROW_NUMBER() OVER \
             (ORDER BY priority DESC, share, queued_at, id) AS place FROM ranked) \
             SELECT id, place FROM placed",
        );
        if let Some(user) = user_id {
            query.push(" WHERE user_id = ").bind_value(user);
        }
        self.fetch_all(query)
            .await?
            .iter()
            .map(|row| {
                let (id, place) = <DB as Decodes<PlaceRow>>::decode(row).map_err(map_sqlx)?;
                Ok((JobId(id), u64::try_from(place).unwrap_or(0)))
            })
            .collect()
    }

    async fn slots_taken(&self) -> Result<u64> {
        let query = QueryBuilder::new(
            "SELECT COUNT(*) FROM jobs WHERE deleted_at IS NULL AND (status IN ('running', 'cancelling') \
             OR (status = 'queued' AND launched_at IS NOT NULL))",
        );
        self.count(query).await
    }

    async fn delete(&self, id: JobId) -> Result<bool> {
        // Its events, metrics and callback secret go with it (ON DELETE CASCADE).
        let mut query = QueryBuilder::new("DELETE FROM jobs WHERE id = ");
        query.bind_value(id.0).push(" RETURNING id");
        Ok(self.fetch_optional(query).await?.is_some())
    }

    async fn insert_metric_if_absent(&self, metric: &TrainingMetric) -> Result<bool> {
        let mut query = insert_values("training_metrics", metric_columns(metric)?);
        query.push(" ON CONFLICT (job_id, epoch) DO NOTHING RETURNING job_id");
        Ok(self.fetch_optional(query).await?.is_some())
    }

    async fn metrics(&self, id: JobId) -> Result<Vec<TrainingMetric>> {
        let mut query = QueryBuilder::new(
            "SELECT job_id, epoch, metric_values, recorded_at FROM training_metrics WHERE job_id = ",
        );
        query.bind_value(id.0).push(" ORDER BY epoch");
        let rows = self.fetch_all(query).await?;
        if rows.is_empty() {
            // Distinguish "no metrics yet" from "no such job".
            self.get(id).await?;
        }
        decode_all::<DB, MetricRow, _>(rows)
    }

    async fn events(&self, id: JobId, after: i64, limit: u32) -> Result<Vec<JobEvent>> {
        let mut query = QueryBuilder::new("SELECT event FROM job_events WHERE job_id = ");
        query
            .bind_value(id.0)
            .push(" AND revision > ")
            .bind_value(after)
            .push(" ORDER BY revision LIMIT ")
            .bind_value(i64::from(limit));
        let rows = self.fetch_all(query).await?;
        if rows.is_empty() {
            // Distinguish "nothing new" from "no such job".
            self.get(id).await?;
        }
        rows.iter()
            .map(|row| {
                let (event,) = <DB as Decodes<EventRow>>::decode(row).map_err(map_sqlx)?;
                Ok(event.0)
            })
            .collect()
    }

    async fn ping(&self) -> Result<()> {
        self.execute(QueryBuilder::new("SELECT 1")).await
    }
}
