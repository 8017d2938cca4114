//! Durable job state: the [`JobStore`] trait.

use std::fmt;

use async_trait::async_trait;

use crate::error::{Error, Result};
use crate::event::JobEvent;
use crate::job::{Job, JobFilter, JobId, JobPage, NewJob};
use crate::status::JobStatus;
use crate::update::{TrainingMetric, TrainingUpdate, UpdateOutcome, UpdatePlan, plan_update};

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
///   started_at, finished_at, the start's `Idempotency-Key`), bumps `revision` by one and upserts
///   `metric` (one row per job and epoch, the newest wins) only if the stored
///   job matches `expected`; otherwise it changes nothing.
/// - `list` returns jobs newest first, with the total count of matches.
/// - `metrics` returns a job's epoch metrics ordered by epoch.
/// - `create` and every successful `compare_and_set` also store the change
///   as a [`JobEvent`] ([`JobEvent::of_change`] of the job before and after,
///   numbered by the new revision), atomically with the change itself;
///   `events` returns them in revision order. A lost race stores none.
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

/// How often [`JobStoreExt::apply_update`] re-reads and retries after losing a race.
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

    /// The jobs a trainer holds or should hold: `queued`, `running` and
    /// `cancelling`, in that order (up to [`JobFilter::MAX_LIMIT`] of each).
    ///
    /// # Errors
    /// Store errors.
    async fn active_jobs(&self) -> Result<Vec<Job>> {
        let mut active = Vec::new();
        for status in [JobStatus::Queued, JobStatus::Running, JobStatus::Cancelling] {
            let filter = JobFilter::new()
                .with_status(status)
                .with_page(JobFilter::MAX_LIMIT, 0);
            active.extend(self.list(&filter).await?.jobs);
        }
        Ok(active)
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
    async fn apply_update(&self, id: JobId, update: &TrainingUpdate) -> Result<UpdateOutcome> {
        self.apply_update_from(id, update, None).await
    }

    /// [`JobStoreExt::apply_update`], planned against `known` (a version of
    /// the job this caller stored or read before) instead of a fresh read.
    ///
    /// This saves the read when `known` is current, and is as safe as a fresh
    /// read when it is not: an applied plan is written by a compare-and-set
    /// on `known`'s revision, so an outdated `known` loses the race and the
    /// job is re-read; any other outcome (a replay, a refused report) is
    /// decided again on a fresh read before it is returned.
    ///
    /// # Errors
    /// As [`JobStoreExt::apply_update`].
    async fn apply_update_from(
        &self,
        id: JobId,
        update: &TrainingUpdate,
        known: Option<Job>,
    ) -> Result<UpdateOutcome> {
        let mut known = known.filter(|job| job.id == id);
        for _ in 0..UPDATE_ATTEMPTS {
            let (job, fresh) = match known.take() {
                Some(job) => (job, false),
                None => (self.get(id).await?, true),
            };
            let plan = match plan_update(&job, update) {
                Ok(plan) => plan,
                // A refusal may come from the known version being outdated
                // (a finished job that is running in the store, say).
                Err(_) if !fresh => continue,
                Err(e) => return Err(e),
            };
            match plan {
                UpdatePlan::Stale { .. } if !fresh => continue,
                UpdatePlan::Stale { metric } => {
                    if let Some(metric) = metric {
                        self.insert_metric_if_absent(&metric).await?;
                    }
                    return Ok(UpdateOutcome::Duplicate(Box::new(job)));
                }
                UpdatePlan::Apply { job: next, metric } => {
                    match self
                        .compare_and_set(Expected::exactly(&job), &next, metric.as_ref())
                        .await
                    {
                        Ok(stored) => return Ok(UpdateOutcome::Applied(Box::new(stored))),
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

/// Reads job `id`, lets `plan` decide its next version (`None`: keep it as
/// it is), and writes that with a compare-and-set on the exact revision
/// read; a lost race reads again, up to [`UPDATE_ATTEMPTS`] times.
async fn rewrite<S, F>(store: &S, id: JobId, mut plan: F) -> Result<Job>
where
    S: JobStore + ?Sized,
    F: FnMut(&Job) -> Result<Option<Job>> + Send,
{
    for _ in 0..UPDATE_ATTEMPTS {
        let job = store.get(id).await?;
        let Some(next) = plan(&job)? else {
            return Ok(job);
        };
        match store
            .compare_and_set(Expected::exactly(&job), &next, None)
            .await
        {
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
        }
        .into_job()
        .unwrap();
        job.transition(JobStatus::Queued).unwrap();
        let report = TrainingUpdate::new(JobStatus::Running).with_seq(1);
        let store = always_losing(&job);
        let err = store.apply_update(job.id, &report).await.unwrap_err();
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
