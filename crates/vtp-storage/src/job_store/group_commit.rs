//! Group commit of compare-and-sets on Postgres.
//!
//! Every report of every running job is one compare-and-set: the job's row,
//! its epoch's metric row and its event row. Written one statement each,
//! Postgres spends most of a report on the statement rather than on its
//! rows: the round trip, the executor's start, the commit and its WAL
//! flush. (A `pgbench` of the two shapes on a 2-core guest: 2,800 single
//! changes/s from 32 clients, against 9,700 changes/s as statements of 16
//! changes from 4.) So changes that arrive while others are being written
//! are gathered and written together, in one statement over arrays
//! (`unnest`): under load one commit carries many reports, and a change
//! that arrives alone waits for nobody.
//!
//! - At most [`GroupCommit::WRITERS`] statements run at once, each with at
//!   most [`GroupCommit::MAX_BATCH`] changes of distinct jobs. A job's
//!   second change waits for a later statement: its compare-and-set must
//!   see the first. Each statement takes its rows in job-id order, as every
//!   other statement does, so two statements cannot deadlock on them.
//! - A statement is all or nothing. When the database refuses one (a
//!   constraint, a deadlock), its changes are written again one by one, so
//!   a bad change fails alone; when the database is unreachable, every
//!   change of the statement is told so.
//! - The statements run on tasks of their own: a caller that goes away (its
//!   client hung up) does not take the other callers' changes with it.
//!   Each writer keeps one connection for all the batches it writes until
//!   none waits, rather than taking one from the pool per batch.
//! - The queue holds one change per caller waiting for it, so it is as
//!   bounded as the callers are (the backend's connection cap and its
//!   internal tasks).
//!
//! No library batches independent statements into one (sqlx runs one query
//! per call, and Postgres's `commit_delay` is a server setting that only
//! groups WAL flushes), hence this module.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use sqlx::{Encode, PgConnection, PgPool, Postgres, QueryBuilder, Type};
use tokio::sync::{Semaphore, oneshot};
use uuid::Uuid;
use vtp_core::{Error, Expected, Job, JobEvent, Result, TrainingMetric, error_chain};

use super::sql::{JOB_COLUMNS, JobRow, map_sqlx};

/// One compare-and-set, as the statement binds it: the expectation, the
/// job's new mutable fields, its metric and its event.
#[derive(Debug)]
struct Change {
    id: Uuid,
    expected_status: &'static str,
    expected_revision: i64,
    status: &'static str,
    progress: f64,
    message: Option<String>,
    error: Option<String>,
    checkpoint_s3_uri: Option<String>,
    attempt: i32,
    last_seq: i64,
    updated_at: DateTime<Utc>,
    started_at: Option<DateTime<Utc>>,
    finished_at: Option<DateTime<Utc>>,
    last_checkpoint_s3_uri: Option<String>,
    /// JSON.
    attempts: String,
    start_key: Option<String>,
    queued_at: Option<DateTime<Utc>>,
    launched_at: Option<DateTime<Utc>>,
    not_before: Option<DateTime<Utc>>,
    deleted_at: Option<DateTime<Utc>>,
    metric_epoch: Option<i64>,
    /// JSON.
    metric_values: Option<String>,
    recorded_at: Option<DateTime<Utc>>,
    /// JSON; none for a change that is only progress (not history).
    event: Option<String>,
    /// JSON.
    per_class: Option<String>,
}

impl Change {
    fn new(expected: Expected, next: &Job, metric: Option<&TrainingMetric>) -> Result<Self> {
        let json = |what: &str, e: serde_json::Error| Error::internal(format!("{what}: {e}"));
        // The change as the statement will store it: `next`'s fields at
        // the next revision.
        let mut after = next.clone();
        after.revision = expected.revision + 1;
        let event = JobEvent::of_change(Some(expected.status), &after, metric);
        Ok(Change {
            id: next.id.0,
            expected_status: expected.status.as_str(),
            expected_revision: expected.revision,
            status: next.status.as_str(),
            progress: next.progress,
            message: next.message.clone(),
            error: next.error.clone(),
            checkpoint_s3_uri: next.checkpoint_s3_uri.clone(),
            attempt: next.attempt,
            last_seq: next.last_seq,
            updated_at: next.updated_at,
            started_at: next.started_at,
            finished_at: next.finished_at,
            last_checkpoint_s3_uri: next.last_checkpoint_s3_uri.clone(),
            attempts: serde_json::to_string(&next.attempts).map_err(|e| json("attempts", e))?,
            start_key: next.idempotency.start.clone(),
            queued_at: next.queued_at,
            launched_at: next.launched_at,
            not_before: next.not_before,
            deleted_at: next.deleted_at,
            metric_epoch: metric.map(|m| i64::from(m.epoch)),
            metric_values: metric
                .map(|m| serde_json::to_string(&m.values))
                .transpose()
                .map_err(|e| json("metrics", e))?,
            recorded_at: metric.map(|m| m.recorded_at),
            event: event
                .kind
                .is_history()
                .then(|| serde_json::to_string(&event))
                .transpose()
                .map_err(|e| json("event", e))?,
            per_class: next
                .per_class
                .as_ref()
                .map(serde_json::to_string)
                .transpose()
                .map_err(|e| json("per_class", e))?,
        })
    }
}

/// What the statement does with the batch, after [`write_changes`] has
/// bound its columns as the rows of `change`: each job's row where it is
/// still as expected, then the metric and event rows of the jobs written.
/// Returns the rows written.
const WRITE_CHANGES: &str = "upd AS (UPDATE jobs SET status = c.status, progress = c.progress, \
     message = c.message, error = c.error, checkpoint_s3_uri = c.checkpoint_s3_uri, \
     attempt = c.attempt, last_seq = c.last_seq, updated_at = c.updated_at, \
     started_at = c.started_at, finished_at = c.finished_at, \
     last_checkpoint_s3_uri = c.last_checkpoint_s3_uri, attempts = c.attempts::jsonb, \
     start_key = c.start_key, queued_at = c.queued_at, launched_at = c.launched_at, \
     not_before = c.not_before, deleted_at = c.deleted_at, per_class = c.per_class::jsonb, \
     revision = jobs.revision + 1 \
     FROM change c \
     WHERE jobs.id = c.id AND jobs.status = c.expected_status \
     AND jobs.revision = c.expected_revision \
     RETURNING jobs.*), \
     ins AS (INSERT INTO training_metrics (job_id, epoch, metric_values, recorded_at) \
     SELECT c.id, c.metric_epoch, c.metric_values::jsonb, c.recorded_at \
     FROM upd JOIN change c ON c.id = upd.id WHERE c.metric_epoch IS NOT NULL \
     ON CONFLICT (job_id, epoch) DO UPDATE SET metric_values = excluded.metric_values, \
     recorded_at = excluded.recorded_at \
     WHERE training_metrics.metric_values <> excluded.metric_values), \
     ev AS (INSERT INTO job_events (job_id, revision, event) \
     SELECT upd.id, upd.revision, c.event::jsonb \
     FROM upd JOIN change c ON c.id = upd.id WHERE c.event IS NOT NULL) ";

/// A change waiting to be written, and who waits for it.
struct Pending {
    change: Change,
    /// The job as written, `None` when it was not as expected.
    reply: oneshot::Sender<Result<Option<Job>>>,
}

/// The changes waiting to be written, and the writers writing them.
pub(crate) struct GroupCommit {
    waiting: Mutex<VecDeque<Pending>>,
    writers: Arc<Semaphore>,
    /// Statements run so far.
    statements: AtomicU64,
}

impl std::fmt::Debug for GroupCommit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupCommit")
            .field("waiting", &self.waiting.lock().map_or(0, |w| w.len()))
            .field("writers_free", &self.writers.available_permits())
            .field("statements", &self.statements.load(Ordering::Relaxed))
            .finish()
    }
}

impl Default for GroupCommit {
    fn default() -> Self {
        GroupCommit {
            waiting: Mutex::new(VecDeque::new()),
            writers: Arc::new(Semaphore::new(Self::WRITERS)),
            statements: AtomicU64::new(0),
        }
    }
}

impl GroupCommit {
    /// Statements written at once, each by a writer on a pooled connection
    /// it holds while changes keep coming (the store's pool has a few more,
    /// for reads). At low load every change is written at once, as before
    /// grouping. On 2 cores the callback benchmark was fastest with 16
    /// (BENCHMARKS.md): with 12, 8 or 4 its rate fell and its p99 doubled
    /// or more, the batches bigger but fewer at once.
    pub(crate) const WRITERS: usize = 16;
    /// Most changes in one statement.
    pub(crate) const MAX_BATCH: usize = 64;

    /// Writes the compare-and-set of `next` (with its `metric`) when the
    /// job is as `expected`: the job as written, or `None` when it was
    /// not as expected (nothing written).
    ///
    /// # Errors
    /// The database's, as [`map_sqlx`] maps them.
    pub(crate) async fn compare_and_set(
        self: &Arc<Self>,
        pool: &PgPool,
        expected: Expected,
        next: &Job,
        metric: Option<&TrainingMetric>,
    ) -> Result<Option<Job>> {
        let (reply, written) = oneshot::channel();
        self.waiting
            .lock()
            .expect("group commit lock")
            .push_back(Pending {
                change: Change::new(expected, next, metric)?,
                reply,
            });
        self.kick(pool);
        written.await.unwrap_or_else(|_| {
            Err(Error::unavailable(
                "database",
                "the change's writer stopped before it was written",
            ))
        })
    }

    /// Starts a writer if one is free: it writes batches until none waits.
    fn kick(self: &Arc<Self>, pool: &PgPool) {
        let Ok(permit) = self.writers.clone().try_acquire_owned() else {
            // Every writer is busy; the next to finish a batch takes this one.
            return;
        };
        let (this, pool) = (self.clone(), pool.clone());
        tokio::spawn(async move {
            // One connection for every batch this writer writes. A
            // connection handed back to sqlx's pool returns to it on a task
            // of its own, so taking one per batch often found none idle
            // under load and opened another (seen: 90 ms to acquire).
            let mut conn = None;
            loop {
                let batch = this.take_batch();
                if batch.is_empty() {
                    break;
                }
                let mut held = match conn.take() {
                    Some(held) => held,
                    None => match pool.acquire().await {
                        Ok(held) => held,
                        Err(e) => {
                            answer_all(batch, map_sqlx(e));
                            continue;
                        }
                    },
                };
                if write(&mut held, &this.statements, batch).await {
                    conn = Some(held);
                } else {
                    // Not a refusal but a failure of the connection: it is
                    // closed rather than handed to the next user.
                    held.close_on_drop();
                }
            }
            drop(conn);
            drop(permit);
            // A change queued after the last look, while this writer still
            // held its permit, found no writer free: look once more.
            if !this.waiting.lock().expect("group commit lock").is_empty() {
                this.kick(&pool);
            }
        });
    }

    /// The oldest waiting changes, at most one per job and
    /// [`Self::MAX_BATCH`] in all, in job-id order; the others keep their place.
    fn take_batch(&self) -> Vec<Pending> {
        let mut waiting = self.waiting.lock().expect("group commit lock");
        let mut batch = Vec::new();
        let mut jobs = HashSet::new();
        let mut later = VecDeque::new();
        while let Some(pending) = waiting.pop_front() {
            if batch.len() == Self::MAX_BATCH {
                later.push_back(pending);
                later.append(&mut waiting);
                break;
            }
            if jobs.insert(pending.change.id) {
                batch.push(pending);
            } else {
                later.push_back(pending);
            }
        }
        *waiting = later;
        batch.sort_by_key(|pending| pending.change.id);
        batch
    }
}

/// Tells every change of `batch` that it failed with `e`.
fn answer_all(batch: Vec<Pending>, e: Error) {
    let message = error_chain(&e);
    let mut e = Some(e);
    for pending in batch {
        let error = e
            .take()
            .unwrap_or_else(|| Error::unavailable("database", message.clone()));
        let _ = pending.reply.send(Err(error));
    }
}

/// Writes `batch` in one statement on `conn` and answers each change; when
/// the database refuses the statement, writes them one by one. Returns
/// whether `conn` is still sound (false after an I/O or protocol failure).
async fn write(conn: &mut PgConnection, statements: &AtomicU64, batch: Vec<Pending>) -> bool {
    let changes: Vec<&Change> = batch.iter().map(|pending| &pending.change).collect();
    statements.fetch_add(1, Ordering::Relaxed);
    match write_changes(conn, &changes).await {
        Ok(mut written) => {
            for pending in batch {
                let row = written
                    .iter()
                    .position(|row| row.id() == pending.change.id)
                    .map(|at| written.swap_remove(at));
                let _ = pending.reply.send(row.map(Job::try_from).transpose());
            }
            true
        }
        Err(e) => {
            let refused = matches!(e, sqlx::Error::Database(_));
            let e = map_sqlx(e);
            if !refused || batch.len() == 1 {
                // The statement failed other than by a refusal (the
                // connection; a row that does not decode), or the one change
                // was refused: each is told so.
                answer_all(batch, e);
                return refused;
            }
            tracing::debug!(error = %error_chain(&e), changes = batch.len(), "a batch was refused; writing its changes one by one");
            let mut sound = true;
            for pending in batch {
                statements.fetch_add(1, Ordering::Relaxed);
                let outcome = match write_changes(conn, &[&pending.change]).await {
                    Ok(mut written) => written.pop().map(Job::try_from).transpose(),
                    Err(e) => {
                        sound &= matches!(e, sqlx::Error::Database(_));
                        Err(map_sqlx(e))
                    }
                };
                let _ = pending.reply.send(outcome);
            }
            sound
        }
    }
}

/// The changes of a batch as the rows of a table `change`: one array
/// parameter per column, `unnest`ed together, each bound beside its name.
struct ChangeTable<'c> {
    changes: &'c [&'c Change],
    query: QueryBuilder<Postgres>,
    names: Vec<&'static str>,
}

impl<'c> ChangeTable<'c> {
    fn new(changes: &'c [&'c Change]) -> Self {
        ChangeTable {
            changes,
            query: QueryBuilder::new("WITH change AS (SELECT * FROM unnest("),
            names: Vec::new(),
        }
    }

    /// Adds the column `name` of SQL type `sql_type`: `field` of every change.
    fn column<T>(
        mut self,
        name: &'static str,
        sql_type: &str,
        field: impl Fn(&'c Change) -> T,
    ) -> Self
    where
        Vec<T>: Encode<'c, Postgres> + Type<Postgres>,
    {
        if !self.names.is_empty() {
            self.query.push(", ");
        }
        let values: Vec<T> = self.changes.iter().map(|change| field(change)).collect();
        self.query
            .push_bind(values)
            .push(format_args!("::{sql_type}[]"));
        self.names.push(name);
        self
    }

    /// The whole statement: the table, then [`WRITE_CHANGES`].
    fn finish(mut self) -> QueryBuilder<Postgres> {
        self.query
            .push(format_args!(") AS c({})), ", self.names.join(", ")))
            .push(WRITE_CHANGES)
            .push(format_args!("SELECT {JOB_COLUMNS} FROM upd"));
        self.query
    }
}

/// Writes `changes` in one statement: the rows written.
async fn write_changes(conn: &mut PgConnection, changes: &[&Change]) -> sqlx::Result<Vec<JobRow>> {
    let mut query = ChangeTable::new(changes)
        .column("id", "uuid", |c| c.id)
        .column("expected_status", "text", |c| c.expected_status)
        .column("expected_revision", "int8", |c| c.expected_revision)
        .column("status", "text", |c| c.status)
        .column("progress", "float8", |c| c.progress)
        .column("message", "text", |c| c.message.as_deref())
        .column("error", "text", |c| c.error.as_deref())
        .column("checkpoint_s3_uri", "text", |c| {
            c.checkpoint_s3_uri.as_deref()
        })
        .column("attempt", "int4", |c| c.attempt)
        .column("last_seq", "int8", |c| c.last_seq)
        .column("updated_at", "timestamptz", |c| c.updated_at)
        .column("started_at", "timestamptz", |c| c.started_at)
        .column("finished_at", "timestamptz", |c| c.finished_at)
        .column("last_checkpoint_s3_uri", "text", |c| {
            c.last_checkpoint_s3_uri.as_deref()
        })
        .column("attempts", "text", |c| c.attempts.as_str())
        .column("start_key", "text", |c| c.start_key.as_deref())
        .column("queued_at", "timestamptz", |c| c.queued_at)
        .column("launched_at", "timestamptz", |c| c.launched_at)
        .column("not_before", "timestamptz", |c| c.not_before)
        .column("deleted_at", "timestamptz", |c| c.deleted_at)
        .column("metric_epoch", "int8", |c| c.metric_epoch)
        .column("metric_values", "text", |c| c.metric_values.as_deref())
        .column("recorded_at", "timestamptz", |c| c.recorded_at)
        .column("event", "text", |c| c.event.as_deref())
        .column("per_class", "text", |c| c.per_class.as_deref())
        .finish();
    query.build_query_as().fetch_all(conn).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PostgresJobStore;
    use crate::testing::TestDatabase;
    use vtp_core::{JobStatus, JobStore, JobStoreExt, NewJob};

    fn new_job() -> NewJob {
        NewJob {
            user_id: "alice".into(),
            model_name: "small_cnn".into(),
            framework: "tch".into(),
            dataset_s3_uri: "s3://b/d.zip".into(),
            config: serde_json::json!({"epochs": 10}),
            priority: 0,
        }
    }

    /// `job` reporting `epoch`: its next version and the epoch's metric.
    fn report(job: &Job, epoch: u32) -> (Expected, Job, TrainingMetric) {
        let mut next = job.clone();
        next.progress = f64::from(epoch) / 10.0;
        next.last_seq = i64::from(epoch);
        next.updated_at = Utc::now();
        let metric = TrainingMetric {
            job_id: job.id,
            epoch,
            values: [("loss".to_owned(), 1.0 / f64::from(epoch))].into(),
            recorded_at: Utc::now(),
        };
        (Expected::exactly(job), next, metric)
    }

    fn pending(expected: Expected, next: &Job, metric: Option<&TrainingMetric>) -> Pending {
        Pending {
            change: Change::new(expected, next, metric).unwrap(),
            reply: oneshot::channel().0,
        }
    }

    fn job(id: u128) -> Job {
        let mut job = new_job().into_job().unwrap();
        job.id = vtp_core::JobId(Uuid::from_u128(id));
        job
    }

    #[test]
    fn a_batch_takes_one_change_per_job_oldest_first_and_the_rest_keep_their_place() {
        let group = GroupCommit::default();
        let (a, b, c) = (job(3), job(1), job(2));
        {
            let mut waiting = group.waiting.lock().unwrap();
            for (job, seq) in [(&a, 1), (&b, 1), (&a, 2), (&c, 1), (&a, 3), (&b, 2)] {
                let mut next = job.clone();
                next.last_seq = seq;
                waiting.push_back(pending(Expected::exactly(job), &next, None));
            }
        }
        let taken = |batch: Vec<Pending>| -> Vec<(Uuid, i64)> {
            batch
                .iter()
                .map(|p| (p.change.id, p.change.last_seq))
                .collect()
        };
        // In job-id order (every statement locks rows in the same order).
        assert_eq!(
            taken(group.take_batch()),
            vec![(b.id.0, 1), (c.id.0, 1), (a.id.0, 1)]
        );
        assert_eq!(taken(group.take_batch()), vec![(b.id.0, 2), (a.id.0, 2)]);
        assert_eq!(taken(group.take_batch()), vec![(a.id.0, 3)]);
        assert!(group.take_batch().is_empty());

        // At most MAX_BATCH, the oldest; the next batch takes the rest.
        {
            let mut waiting = group.waiting.lock().unwrap();
            for id in 0..GroupCommit::MAX_BATCH as u128 + 5 {
                let job = job(1000 - id);
                waiting.push_back(pending(Expected::exactly(&job), &job, None));
            }
        }
        let first = group.take_batch();
        assert_eq!(first.len(), GroupCommit::MAX_BATCH);
        assert!(first.iter().all(|p| p.change.id.as_u128() > 1000 - 64 - 1));
        assert_eq!(group.take_batch().len(), 5);
    }

    /// Changes queued while every writer is busy, written once one is free.
    async fn written_together(
        group: &Arc<GroupCommit>,
        pool: &PgPool,
        changes: Vec<(Expected, Job, Option<TrainingMetric>)>,
    ) -> Vec<Result<Option<Job>>> {
        let busy = group
            .writers
            .clone()
            .acquire_many_owned(GroupCommit::WRITERS as u32)
            .await
            .unwrap();
        let mut calls = Vec::new();
        for (expected, next, metric) in changes {
            let (writer, on) = (group.clone(), pool.clone());
            calls.push(tokio::spawn(async move {
                writer
                    .compare_and_set(&on, expected, &next, metric.as_ref())
                    .await
            }));
            // Queued in this order.
            let queued = calls.len();
            while group.waiting.lock().unwrap().len() < queued {
                tokio::task::yield_now().await;
            }
        }
        drop(busy);
        group.kick(pool);
        let mut outcomes = Vec::new();
        for call in calls {
            outcomes.push(call.await.unwrap());
        }
        outcomes
    }

    #[tokio::test]
    async fn changes_that_wait_together_are_one_statement_and_each_gets_its_own_outcome() {
        let Some(db) = TestDatabase::create().await else {
            return;
        };
        let store = PostgresJobStore::connect(db.url()).await.unwrap();
        let pool = PgPool::connect(db.url()).await.unwrap();
        let mut jobs = Vec::new();
        for _ in 0..3 {
            let job = store.create_job(new_job()).await.unwrap();
            jobs.push(
                store
                    .transition(job.id, JobStatus::Pending, JobStatus::Queued)
                    .await
                    .unwrap(),
            );
        }
        let [a, b, c] = [&jobs[0], &jobs[1], &jobs[2]];
        let (a_expected, a1, a_metric) = report(a, 1);
        let (b_expected, b1, b_metric) = report(b, 1);
        let (_, c1, c_metric) = report(c, 1);
        // c's expectation is out of date.
        let c_outdated = Expected {
            revision: c.revision - 1,
            ..Expected::exactly(c)
        };
        let group = Arc::new(GroupCommit::default());
        let outcomes = written_together(
            &group,
            &pool,
            vec![
                (a_expected, a1.clone(), Some(a_metric.clone())),
                (b_expected, b1, Some(b_metric)),
                // a again from the same version: a later statement, which
                // finds a changed.
                (a_expected, a1, Some(a_metric)),
                (c_outdated, c1, Some(c_metric)),
            ],
        )
        .await;
        let outcomes: Vec<Option<Job>> = outcomes.into_iter().map(Result::unwrap).collect();
        let written = outcomes[0].as_ref().expect("a's first change is written");
        assert_eq!((written.revision, written.last_seq), (a.revision + 1, 1));
        assert_eq!(outcomes[1].as_ref().unwrap().revision, b.revision + 1);
        assert!(outcomes[2].is_none(), "a changed before its second change");
        assert!(outcomes[3].is_none(), "c is not at the expected revision");
        assert_eq!(group.statements.load(Ordering::Relaxed), 2, "{group:?}");

        // What the statement wrote beside the rows: the metrics and events.
        for (job, metrics) in [(a, 1), (b, 1), (c, 0)] {
            assert_eq!(store.metrics(job.id).await.unwrap().len(), metrics);
            let events = store.events(job.id, job.revision, 100).await.unwrap();
            assert_eq!(events.len(), metrics, "{events:?}");
        }
        let stored = store.get(a.id).await.unwrap();
        assert_eq!((stored.revision, stored.last_seq), (a.revision + 1, 1));
    }

    #[tokio::test]
    async fn a_change_the_database_refuses_fails_alone() {
        let Some(db) = TestDatabase::create().await else {
            return;
        };
        let store = PostgresJobStore::connect(db.url()).await.unwrap();
        let pool = PgPool::connect(db.url()).await.unwrap();
        let mut jobs = Vec::new();
        for _ in 0..3 {
            jobs.push(store.create_job(new_job()).await.unwrap());
        }
        let mut changes: Vec<_> = jobs
            .iter()
            .map(|job| {
                let (expected, next, metric) = report(job, 1);
                (expected, next, Some(metric))
            })
            .collect();
        // Progress beyond 1: the table's CHECK refuses the whole statement.
        changes[1].1.progress = 2.0;
        let group = Arc::new(GroupCommit::default());
        let outcomes = written_together(&group, &pool, changes).await;
        assert!(outcomes[0].as_ref().unwrap().is_some());
        assert!(
            matches!(outcomes[1], Err(Error::Backend { .. })),
            "{:?}",
            outcomes[1]
        );
        assert!(outcomes[2].as_ref().unwrap().is_some());
        // The batch, then each change alone.
        assert_eq!(group.statements.load(Ordering::Relaxed), 4, "{group:?}");
        assert_eq!(
            store.get(jobs[1].id).await.unwrap().revision,
            jobs[1].revision
        );
        assert_eq!(store.metrics(jobs[1].id).await.unwrap().len(), 0);
    }

    #[tokio::test]
    async fn when_the_database_is_unreachable_every_waiting_change_is_told_so() {
        let Some(db) = TestDatabase::create().await else {
            return;
        };
        let store = PostgresJobStore::connect(db.url()).await.unwrap();
        let mut jobs = Vec::new();
        for _ in 0..2 {
            jobs.push(store.create_job(new_job()).await.unwrap());
        }
        let pool = sqlx::postgres::PgPoolOptions::new()
            .acquire_timeout(std::time::Duration::from_millis(200))
            .connect(db.url())
            .await
            .unwrap();
        pool.close().await;
        let changes = jobs
            .iter()
            .map(|job| {
                let (expected, next, metric) = report(job, 1);
                (expected, next, Some(metric))
            })
            .collect();
        let group = Arc::new(GroupCommit::default());
        let outcomes = written_together(&group, &pool, changes).await;
        for outcome in &outcomes {
            assert!(
                matches!(outcome, Err(Error::Unavailable { .. })),
                "{outcome:?}"
            );
        }
        // No connection, so no statement was tried.
        assert_eq!(group.statements.load(Ordering::Relaxed), 0, "{group:?}");
    }
}
