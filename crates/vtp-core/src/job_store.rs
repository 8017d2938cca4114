//! Durable job state: the [`JobStore`] trait.

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::error::{Error, Result};
use crate::event::JobEvent;
use crate::job::{Job, JobCursor, JobFilter, JobId, JobPage, NewJob};
use crate::report::{ReportOutcome, ReportPlan, TrainingMetric, TrainingReport, plan_report};
use crate::status::JobStatus;

/// What a compare-and-set expects to find.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expected {
    /// The job must be in this status.
    pub status: JobStatus,
    /// And at this revision (no change since it was read).
    pub revision: i64,
}

impl Expected {
    /// Expect the job exactly as read.
    pub fn exactly(job: &Job) -> Self {
        Expected {
            status: job.status,
            revision: job.revision,
        }
    }

    /// Whether `job` is as expected: in the status, at the revision.
    pub fn matches(&self, job: &Job) -> bool {
        job.status == self.status && job.revision == self.revision
    }

    /// The conflict a compare-and-set of job `id` reports when it found
    /// `current` instead, naming both.
    pub fn lost_to(&self, id: JobId, current: &Job) -> Error {
        Error::conflict(format!(
            "job {id} changed concurrently: expected {} (revision {}), found {} (revision {})",
            self.status, self.revision, current.status, current.revision
        ))
    }
}

/// A cap on how many jobs one owner may have in some statuses, which a
/// store checks in the same atomic step as the write it guards
/// ([`JobStore::create_within`], [`JobStore::compare_and_set_within`]), so
/// concurrent requests cannot race past it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    /// The statuses counted.
    pub statuses: &'static [JobStatus],
    /// How many of the owner's jobs may be in them; the write that would
    /// make one more is refused.
    pub limit: u32,
}

impl Quota {
    /// The statuses of jobs under way: a runner holds them or they wait for one.
    pub const ACTIVE: &'static [JobStatus] =
        &[JobStatus::Queued, JobStatus::Running, JobStatus::Cancelling];
    /// The status of jobs created and never started.
    pub const PENDING: &'static [JobStatus] = &[JobStatus::Pending];

    /// At most `limit` of an owner's jobs under way.
    pub fn active(limit: u32) -> Self {
        Quota {
            statuses: Self::ACTIVE,
            limit,
        }
    }

    /// At most `limit` of an owner's jobs created and not started.
    pub fn pending(limit: u32) -> Self {
        Quota {
            statuses: Self::PENDING,
            limit,
        }
    }

    /// The statuses as their database names.
    pub fn status_names(&self) -> Vec<&'static str> {
        self.statuses.iter().map(|s| s.as_str()).collect()
    }

    /// The refusal of a write past the quota, by `user_id`.
    pub fn exceeded(&self, user_id: &str) -> Error {
        let what = if self.statuses == Self::PENDING {
            "jobs created and not started; start or delete one"
        } else {
            "jobs queued or running; wait for one to finish or cancel one"
        };
        Error::RateLimited {
            message: format!("{user_id} has {} {what}", self.limit),
            retry_after: Duration::from_secs(30),
        }
    }
}

/// Where jobs and their metrics live.
///
/// The core is small; [`JobStoreExt`] builds transitions and callback
/// handling on it, the same way for every backend.
///
/// # Contract
/// - `create` stores a new job; ids are unique.
/// - `compare_and_set` is atomic: it writes the mutable fields of `next`
///   (status, progress, message, error, checkpoint_s3_uri,
///   last_checkpoint_s3_uri, attempt, attempts, last_seq, updated_at,
///   started_at, finished_at, queued_at, launched_at, not_before,
///   deleted_at, per_class, the start's `Idempotency-Key`), bumps `revision` by one and upserts
///   `metric` (one row per job and epoch, the newest wins) only if the stored
///   job matches `expected`; otherwise it changes nothing.
/// - `create_within` and `compare_and_set_within` do the same only while
///   the owner has fewer than the quota's jobs in its statuses (other than
///   the one written), counted atomically with the write.
/// - `list` returns jobs newest first, with the total count of matches.
/// - `queue` returns the jobs waiting for capacity ([`Job::is_waiting`],
///   whose `not_before` has passed) in the order they are to run: the
///   highest `priority` first; then fair share, the owner with the fewest
///   jobs holding a slot ([`Job::holds_slot`]) plus those of the owner's
///   waiting jobs ahead of this one; then the oldest `queued_at`, then id.
///   `queue_positions` gives the place of each named waiting job in that
///   order over every waiting job (1 is next), whatever its `not_before`.
/// - `metrics` returns a job's epoch metrics ordered by epoch.
/// - `create` and every successful `compare_and_set` also store the change
///   as a [`JobEvent`] ([`JobEvent::of_change`] of the job before and after,
///   numbered by the new revision), atomically with the change itself,
///   unless the change is only progress ([`crate::EventKind::Progress`]: a
///   heartbeat, a step): those are the job's present state, not history, so
///   a running job's log grows by its epochs and status changes alone.
///   `events` returns them in revision order. A lost race stores none.
/// - `delete` removes the job with everything stored with it (events,
///   metrics, callback secret); deleting a missing job is no error.
///
/// # Errors
/// - [`Error::NotFound`] for an unknown job id.
/// - [`Error::AlreadyExists`] when `create` meets an existing id, or an
///   existing job of the same owner created under the same `Idempotency-Key`.
/// - [`Error::Conflict`] when `compare_and_set` finds the job changed (a lost race).
/// - [`Error::Unavailable`] when the database cannot be reached (retryable).
#[async_trait]
pub trait JobStore: Send + Sync + fmt::Debug + 'static {
    /// Stores a new job.
    async fn create(&self, job: &Job) -> Result<()>;

    /// Stores a new job unless its owner has `quota.limit` jobs in the
    /// quota's statuses already.
    ///
    /// # Errors
    /// As `create`; [`Quota::exceeded`] at the quota.
    async fn create_within(&self, job: &Job, quota: Quota) -> Result<()>;

    /// Reads one job.
    async fn get(&self, id: JobId) -> Result<Job>;

    /// The job `user_id` created under the `Idempotency-Key` `key`, if any.
    async fn find_created_with_key(&self, user_id: &str, key: &str) -> Result<Option<Job>>;

    /// Lists jobs matching `filter`, newest first.
    async fn list(&self, filter: &JobFilter) -> Result<JobPage>;

    /// Writes `next` if the stored job matches `expected`; returns the stored job.
    async fn compare_and_set(
        &self,
        expected: Expected,
        next: &Job,
        metric: Option<&TrainingMetric>,
    ) -> Result<Job>;

    /// [`JobStore::compare_and_set`], only while the owner of `next` has
    /// fewer than `quota.limit` other jobs in the quota's statuses.
    ///
    /// # Errors
    /// As `compare_and_set`; [`Quota::exceeded`] at the quota.
    async fn compare_and_set_within(
        &self,
        expected: Expected,
        next: &Job,
        quota: Quota,
    ) -> Result<Job>;

    /// The waiting jobs whose `not_before` is not after `now`, in the order
    /// they are to run, at most `limit`.
    async fn queue(&self, now: DateTime<Utc>, limit: u32) -> Result<Vec<Job>>;

    /// The places in the queue (1 is next) of the waiting jobs of
    /// `user_id` (of everyone, for `None`).
    async fn queue_positions(&self, user_id: Option<&str>) -> Result<HashMap<JobId, u64>>;

    /// Removes job `id` and everything stored with it; returns whether it
    /// was there.
    async fn delete(&self, id: JobId) -> Result<bool>;

    /// How many jobs take a launcher's slots ([`Job::holds_slot`]: running,
    /// being cancelled, or queued and launched), counted at one instant: a
    /// job that moves from launched to running meanwhile is counted once,
    /// never lost between two counts.
    async fn slots_taken(&self) -> Result<u64>;

    /// Records `metric` unless its job already has one for that epoch.
    /// Returns whether it was recorded.
    async fn insert_metric_if_absent(&self, metric: &TrainingMetric) -> Result<bool>;

    /// A job's epoch metrics, ordered by epoch.
    async fn metrics(&self, id: JobId) -> Result<Vec<TrainingMetric>>;

    /// A job's events with a revision above `after` (-1: all of them),
    /// oldest first, at most `limit`.
    async fn events(&self, id: JobId, after: i64, limit: u32) -> Result<Vec<JobEvent>>;

    /// Checks that the store can be reached.
    async fn ping(&self) -> Result<()>;
}

/// How often [`JobStoreExt::apply_report`] re-reads and retries after losing a race.
pub const UPDATE_ATTEMPTS: usize = 16;

/// Transitions and callback handling, for every [`JobStore`].
#[async_trait]
pub trait JobStoreExt: JobStore {
    /// Validates `new` and stores it as a `pending` job.
    async fn create_job(&self, new: NewJob) -> Result<Job> {
        let job = new.into_job()?;
        self.create(&job).await?;
        Ok(job)
    }

    /// Moves job `id` from `from` to `to`, as a compare-and-set on the status.
    ///
    /// # Errors
    /// [`Error::Conflict`] if the job is not in `from` (someone else moved it)
    /// or the table forbids `from -> to`.
    async fn transition(&self, id: JobId, from: JobStatus, to: JobStatus) -> Result<Job> {
        self.transition_with(id, from, to, |_| {}).await
    }

    /// Like [`JobStoreExt::transition`], letting `edit` set other fields
    /// (a message, an error) in the same write.
    ///
    /// The write is a compare-and-set on the job exactly as read, so a report
    /// that lands in between (same status, newer progress and `last_seq`) is
    /// never overwritten: the job is re-read and the transition made again
    /// on top of it, as long as it is still in `from`.
    async fn transition_with<F>(
        &self,
        id: JobId,
        from: JobStatus,
        to: JobStatus,
        mut edit: F,
    ) -> Result<Job>
    where
        F: FnMut(&mut Job) + Send,
    {
        rewrite(self, id, |job| {
            if job.status != from {
                return Err(Error::conflict(format!(
                    "job {id} is {}, not {from}",
                    job.status
                )));
            }
            let mut next = job.clone();
            next.transition(to)?;
            edit(&mut next);
            Ok(Some(next))
        })
        .await
    }

    /// [`JobStoreExt::transition_with`] under `quota`: the write is refused
    /// while the owner has `quota.limit` other jobs in its statuses,
    /// counted atomically with it ([`JobStore::compare_and_set_within`]).
    ///
    /// # Errors
    /// As `transition_with`; [`Quota::exceeded`] at the quota.
    async fn transition_within<F>(
        &self,
        id: JobId,
        from: JobStatus,
        to: JobStatus,
        quota: Quota,
        mut edit: F,
    ) -> Result<Job>
    where
        F: FnMut(&mut Job) + Send,
    {
        rewrite_within(self, id, Some(quota), |job| {
            if job.status != from {
                return Err(Error::conflict(format!(
                    "job {id} is {}, not {from}",
                    job.status
                )));
            }
            let mut next = job.clone();
            next.transition(to)?;
            edit(&mut next);
            Ok(Some(next))
        })
        .await
    }

    /// Rewrites job `id` with `plan` (see [`JobStoreExt::transition_with`]):
    /// `plan` sees the job as stored and returns its next version, or
    /// `None` to leave it; lost races read again.
    ///
    /// # Errors
    /// `plan`'s; store errors.
    async fn update_with<F>(&self, id: JobId, plan: F) -> Result<Job>
    where
        F: FnMut(&Job) -> Result<Option<Job>> + Send,
    {
        rewrite(self, id, plan).await
    }

    /// Ends attempt `attempt` of a job whose runner was lost (see
    /// [`Job::end_attempt`]): back to `queued` for a relaunch while attempts
    /// are left, else `failed`; `cancelling` becomes `cancelled`. A job with
    /// no attempt under way, or already past `attempt` (two watchers saw the
    /// same loss: a killed child and an expired lease), is left alone, so a
    /// loss is counted once. Returns the job as stored.
    ///
    /// # Errors
    /// Store errors; lost races are retried.
    async fn end_attempt(&self, id: JobId, attempt: i32, reason: &str) -> Result<Job> {
        rewrite(self, id, |job| {
            if job.attempt != attempt {
                return Ok(None);
            }
            let mut next = job.clone();
            Ok(next.end_attempt(reason)?.then_some(next))
        })
        .await
    }

    /// Ends a job whose trainer is gone: `cancelling` becomes `cancelled`,
    /// other active states `failed` with `reason`. A job already finished is
    /// left alone. Returns the job as stored.
    ///
    /// # Errors
    /// Store errors; lost races are retried.
    async fn finalize_lost(&self, id: JobId, reason: &str) -> Result<Job> {
        rewrite(self, id, |job| {
            if job.status.is_terminal() {
                return Ok(None);
            }
            let to = if job.status == JobStatus::Cancelling {
                JobStatus::Cancelled
            } else {
                JobStatus::Failed
            };
            let mut next = job.clone();
            next.end_with_reason(to, reason)?;
            Ok(Some(next))
        })
        .await
    }

    /// Applies a trainer report: idempotent by `seq`, guarded by the status
    /// table, retried on lost races.
    ///
    /// # Errors
    /// [`Error::NotFound`], [`Error::InvalidInput`] for a malformed update,
    /// [`Error::Conflict`] when the job is terminal or the report is illegal;
    /// [`Error::Unavailable`] (retryable) when every try lost its race.
    async fn apply_report(&self, id: JobId, update: &TrainingReport) -> Result<ReportOutcome> {
        self.apply_report_from(id, update, None).await
    }

    /// [`JobStoreExt::apply_report`], planned against `known` (a version of
    /// the job this caller stored or read before) instead of a fresh read.
    ///
    /// This saves the read when `known` is current, and is as safe as a fresh
    /// read when it is not: an applied plan is written by a compare-and-set
    /// on `known`'s revision, so an outdated `known` loses the race and the
    /// job is re-read; any other outcome (a replay, a refused report) is
    /// decided again on a fresh read before it is returned.
    ///
    /// # Errors
    /// As [`JobStoreExt::apply_report`].
    async fn apply_report_from(
        &self,
        id: JobId,
        update: &TrainingReport,
        known: Option<Job>,
    ) -> Result<ReportOutcome> {
        let mut known = known.filter(|job| job.id == id);
        for _ in 0..UPDATE_ATTEMPTS {
            let (job, fresh) = match known.take() {
                Some(job) => (job, false),
                None => (self.get(id).await?, true),
            };
            let plan = match plan_report(&job, update) {
                Ok(plan) => plan,
                // A refusal may come from the known version being outdated
                // (a finished job that is running in the store, say).
                Err(_) if !fresh => continue,
                Err(e) => return Err(e),
            };
            match plan {
                ReportPlan::Stale { .. } if !fresh => continue,
                ReportPlan::Stale { metric } => {
                    if let Some(metric) = metric {
                        self.insert_metric_if_absent(&metric).await?;
                    }
                    return Ok(ReportOutcome::Duplicate(Box::new(job)));
                }
                ReportPlan::Apply { job: next, metric } => {
                    match self
                        .compare_and_set(Expected::exactly(&job), &next, metric.as_ref())
                        .await
                    {
                        Ok(stored) => return Ok(ReportOutcome::Applied(Box::new(stored))),
                        Err(Error::Conflict { .. }) => continue,
                        Err(e) => return Err(e),
                    }
                }
            }
        }
        Err(kept_changing(id))
    }
}

impl<T: JobStore + ?Sized> JobStoreExt for T {}

/// Every job matching a filter, a page at a time, newest first, by keyset
/// ([`JobFilter::after`]): memory stays one page whatever the number of
/// matches, and jobs added or removed meanwhile shift nothing.
#[derive(Debug)]
pub struct JobPages<'a> {
    store: &'a dyn JobStore,
    filter: JobFilter,
    done: bool,
}

impl<'a> JobPages<'a> {
    /// The pages of the jobs matching `filter` (its `limit` is the page
    /// size; its `offset` is ignored).
    pub fn new(store: &'a dyn JobStore, filter: JobFilter) -> Self {
        JobPages {
            store,
            filter: JobFilter {
                offset: 0,
                ..filter
            },
            done: false,
        }
    }

    /// The jobs a launcher's runners hold or should hold
    /// ([`Job::holds_slot`]: queued and launched, running, cancelling),
    /// `page` at a time: what recovery and the Kubernetes reconciler walk.
    pub fn launched(store: &'a dyn JobStore, page: u32) -> [JobPages<'a>; 3] {
        [
            JobFilter::new()
                .with_status(JobStatus::Queued)
                .with_launched(true),
            JobFilter::new().with_status(JobStatus::Running),
            JobFilter::new().with_status(JobStatus::Cancelling),
        ]
        .map(|filter| JobPages::new(store, filter.with_page(page, 0)))
    }

    /// The next page; `None` after the last.
    ///
    /// # Errors
    /// Store errors (the same page is asked for again on the next call).
    pub async fn next(&mut self) -> Result<Option<Vec<Job>>> {
        if self.done {
            return Ok(None);
        }
        let page = self.store.list(&self.filter).await?;
        match page.next_cursor {
            Some(cursor) => self.filter.after = Some(cursor),
            None => self.done = true,
        }
        Ok((!page.jobs.is_empty()).then_some(page.jobs))
    }
}

/// The cursor of the page after `jobs`, a full page of `limit`: `None`
/// when it is the last.
pub fn next_cursor(jobs: &[Job], limit: u32) -> Option<JobCursor> {
    if jobs.len() < limit as usize {
        return None;
    }
    jobs.last().map(JobCursor::of)
}

/// Reads job `id`, lets `plan` decide its next version (`None`: keep it as
/// it is), and writes that with a compare-and-set on the exact revision
/// read; a lost race reads again, up to [`UPDATE_ATTEMPTS`] times.
async fn rewrite<S, F>(store: &S, id: JobId, plan: F) -> Result<Job>
where
    S: JobStore + ?Sized,
    F: FnMut(&Job) -> Result<Option<Job>> + Send,
{
    rewrite_within(store, id, None, plan).await
}

/// [`rewrite`], the write under `quota` when one is given.
async fn rewrite_within<S, F>(
    store: &S,
    id: JobId,
    quota: Option<Quota>,
    mut plan: F,
) -> Result<Job>
where
    S: JobStore + ?Sized,
    F: FnMut(&Job) -> Result<Option<Job>> + Send,
{
    for _ in 0..UPDATE_ATTEMPTS {
        let job = store.get(id).await?;
        let Some(next) = plan(&job)? else {
            return Ok(job);
        };
        let expected = Expected::exactly(&job);
        let written = match quota {
            Some(quota) => store.compare_and_set_within(expected, &next, quota).await,
            None => store.compare_and_set(expected, &next, None).await,
        };
        match written {
            Ok(stored) => return Ok(stored),
            Err(Error::Conflict { .. }) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(kept_changing(id))
}

/// Losing every race is contention, not a verdict on the request: a
/// retryable outage (503), never a final 409 that would make a trainer drop
/// its report.
fn kept_changing(id: JobId) -> Error {
    Error::unavailable(
        "job store",
        format!("job {id} kept changing; gave up after {UPDATE_ATTEMPTS} attempts"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A store where another writer wins every race: reads answer `job`,
    /// every compare-and-set is a conflict. Written by hand: mockall cannot
    /// mock `compare_and_set`'s `Option<&TrainingMetric>` through
    /// async_trait's lifetimes (E0623 inside its expansion).
    #[derive(Debug)]
    struct AlwaysLosing {
        job: Job,
        attempts: std::sync::atomic::AtomicUsize,
    }

    #[async_trait]
    impl JobStore for AlwaysLosing {
        async fn create(&self, _job: &Job) -> Result<()> {
            unreachable!("not used")
        }
        async fn create_within(&self, _job: &Job, _quota: Quota) -> Result<()> {
            unreachable!("not used")
        }
        async fn compare_and_set_within(
            &self,
            _expected: Expected,
            _next: &Job,
            _quota: Quota,
        ) -> Result<Job> {
            unreachable!("not used")
        }
        async fn queue(&self, _now: DateTime<Utc>, _limit: u32) -> Result<Vec<Job>> {
            unreachable!("not used")
        }
        async fn queue_positions(&self, _user_id: Option<&str>) -> Result<HashMap<JobId, u64>> {
            unreachable!("not used")
        }
        async fn delete(&self, _id: JobId) -> Result<bool> {
            unreachable!("not used")
        }
        async fn slots_taken(&self) -> Result<u64> {
            unreachable!("not used")
        }
        async fn get(&self, _id: JobId) -> Result<Job> {
            Ok(self.job.clone())
        }
        async fn find_created_with_key(&self, _user_id: &str, _key: &str) -> Result<Option<Job>> {
            unreachable!("not used")
        }
        async fn list(&self, _filter: &JobFilter) -> Result<JobPage> {
            unreachable!("not used")
        }
        async fn compare_and_set(
            &self,
            _expected: Expected,
            _next: &Job,
            _metric: Option<&TrainingMetric>,
        ) -> Result<Job> {
            self.attempts
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Err(Error::conflict("another writer won"))
        }
        async fn insert_metric_if_absent(&self, _metric: &TrainingMetric) -> Result<bool> {
            Ok(false)
        }
        async fn metrics(&self, _id: JobId) -> Result<Vec<TrainingMetric>> {
            Ok(Vec::new())
        }
        async fn events(&self, _id: JobId, _after: i64, _limit: u32) -> Result<Vec<JobEvent>> {
            unreachable!("not used")
        }
        async fn ping(&self) -> Result<()> {
            Ok(())
        }
    }

    fn always_losing(job: &Job) -> AlwaysLosing {
        AlwaysLosing {
            job: job.clone(),
            attempts: 0.into(),
        }
    }

    #[tokio::test]
    async fn losing_every_race_is_a_retryable_outage_not_a_final_conflict() {
        let mut job = NewJob {
            user_id: "u".into(),
            model_name: "small_cnn".into(),
            framework: "tch".into(),
            dataset_s3_uri: "s3://b/d".into(),
            config: serde_json::json!({}),
            priority: 0,
        }
        .into_job()
        .unwrap();
        job.transition(JobStatus::Queued).unwrap();
        let report = TrainingReport::new(JobStatus::Running).with_seq(1);
        let store = always_losing(&job);
        let err = store.apply_report(job.id, &report).await.unwrap_err();
        assert!(
            matches!(err, Error::Unavailable { .. }) && err.is_retryable(),
            "{err:?}"
        );
        assert_eq!(
            store.attempts.load(std::sync::atomic::Ordering::SeqCst),
            UPDATE_ATTEMPTS
        );
        let store = always_losing(&job);
        let err = store
            .end_attempt(job.id, job.attempt, "lost")
            .await
            .unwrap_err();
        assert!(err.is_retryable(), "{err:?}");
    }
}
