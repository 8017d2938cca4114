//! [`KnownJobs`]: the version of each active job this backend last stored,
//! so a trainer report is planned without reading the job first; and each
//! job's turn ([`ReportTurn`]), so that its reports are applied one after
//! the other.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};

use hashlink::LruCache;
use vtp_core::{Job, JobId};

/// The last stored version of recently reported jobs, least recently used
/// out first.
///
/// It is a hint, never the truth: [`vtp_core::JobStoreExt::apply_report_from`]
/// writes with a compare-and-set on the hinted revision, so a version that
/// another writer (a cancel, another replica, the reconciler) has since
/// changed costs one lost race and a re-read, not a wrong answer.
///
/// Reports of one job that arrive together (a trainer's outbox resending
/// while the first delivery is still being written, or several ranks) take
/// turns: planned on the version the one before stored, each wins its
/// compare-and-set, where planned together all but one would lose it, and
/// re-read the job, and wait in the database on the row the first holds.
pub struct KnownJobs {
    jobs: Mutex<LruCache<JobId, Job>>,
    /// Each job with a report being applied or waiting: its turn's lock.
    /// An entry lives while someone holds or waits for it, so there are at
    /// most as many as requests in flight.
    turns: Mutex<HashMap<JobId, Arc<tokio::sync::Mutex<()>>>>,
}

/// A job's turn to have a report applied (from [`KnownJobs::turn`]): the
/// next report of the job waits until this is dropped.
#[must_use = "the turn ends when this is dropped"]
pub struct ReportTurn {
    known: Arc<KnownJobs>,
    id: JobId,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl Drop for ReportTurn {
    fn drop(&mut self) {
        drop(self.guard.take());
        let mut turns = self.known.turns();
        // Nobody else holds or waits for it (they would hold a clone): the
        // entry goes, so the map holds only jobs being reported on.
        if turns
            .get(&self.id)
            .is_some_and(|lock| Arc::strong_count(lock) == 1)
        {
            turns.remove(&self.id);
        }
    }
}

impl fmt::Debug for ReportTurn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReportTurn").field("id", &self.id).finish()
    }
}

impl KnownJobs {
    /// How many jobs are remembered (one entry per job being trained is plenty).
    pub const CAPACITY: usize = 4096;

    /// An empty cache.
    pub fn new() -> Self {
        KnownJobs {
            jobs: Mutex::new(LruCache::new(Self::CAPACITY)),
            turns: Mutex::new(HashMap::new()),
        }
    }

    /// Waits for `id`'s turn: until the reports of the job that came
    /// before have been applied (or given up).
    pub async fn turn(self: &Arc<Self>, id: JobId) -> ReportTurn {
        let lock = self.turns().entry(id).or_default().clone();
        let guard = lock.lock_owned().await;
        ReportTurn {
            known: self.clone(),
            id,
            guard: Some(guard),
        }
    }

    fn turns(&self) -> std::sync::MutexGuard<'_, HashMap<JobId, Arc<tokio::sync::Mutex<()>>>> {
        // The map stays whole whatever panicked while holding it.
        self.turns
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The version of `id` last remembered, if any.
    pub fn get(&self, id: JobId) -> Option<Job> {
        self.lock().get(&id).cloned()
    }

    /// Remembers `job` as stored; a finished job is forgotten (nothing will
    /// change it again through a report).
    ///
    /// Its `config` is not kept: a report never changes it, the
    /// compare-and-set writes only the mutable fields, and answers carry the
    /// job as the store returns it; so an entry stays small whatever the
    /// config's size.
    pub fn remember(&self, mut job: Job) {
        if job.status.is_terminal() {
            self.forget(job.id);
            return;
        }
        job.config = serde_json::Value::Null;
        self.lock().insert(job.id, job);
    }

    /// Forgets `id` (after an error, when its version is unknown).
    pub fn forget(&self, id: JobId) {
        self.lock().remove(&id);
    }

    /// How many jobs are remembered.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LruCache<JobId, Job>> {
        // A panic while holding the lock cannot leave the map half-written
        // in a way that matters for a hint.
        self.jobs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Default for KnownJobs {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for KnownJobs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KnownJobs")
            .field("len", &self.len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use vtp_core::JobStatus;

    use super::*;
    use crate::sweeper::tests::new_job;

    fn job() -> Job {
        new_job().into_job().unwrap()
    }

    #[test]
    fn remembers_active_jobs_and_forgets_finished_ones() {
        let known = KnownJobs::new();
        let mut job = job();
        known.remember(job.clone());
        let remembered = known.get(job.id).unwrap();
        assert_eq!(
            remembered.config,
            serde_json::Value::Null,
            "configs are not kept"
        );
        assert_eq!(remembered.revision, job.revision);
        job.transition(JobStatus::Cancelled).unwrap();
        known.remember(job.clone());
        assert_eq!(known.get(job.id), None);
        assert!(known.is_empty());
    }

    #[test]
    fn keeps_at_most_capacity_jobs_evicting_the_least_recent() {
        let known = KnownJobs::new();
        let first = job();
        known.remember(first.clone());
        for _ in 0..KnownJobs::CAPACITY {
            known.remember(job());
        }
        assert_eq!(known.len(), KnownJobs::CAPACITY);
        assert_eq!(known.get(first.id), None);
        let last = job();
        known.remember(last.clone());
        known.forget(last.id);
        assert_eq!(known.get(last.id), None);
    }

    #[tokio::test]
    async fn a_jobs_reports_take_turns_and_other_jobs_do_not_wait() {
        let known = Arc::new(KnownJobs::new());
        let (a, b) = (job().id, job().id);
        let first = known.turn(a).await;
        // Another job's turn is not held up.
        let other = tokio::time::timeout(std::time::Duration::from_secs(5), known.turn(b))
            .await
            .expect("another job's turn");
        // The same job's next report waits for the first to end.
        let next = tokio::spawn({
            let known = known.clone();
            async move { known.turn(a).await }
        });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!next.is_finished(), "a second turn while the first is held");
        drop(first);
        let second = tokio::time::timeout(std::time::Duration::from_secs(5), next)
            .await
            .expect("the turn after the first ended")
            .unwrap();
        assert_eq!(known.turns().len(), 2);
        drop((second, other));
        assert!(known.turns().is_empty(), "no entry outlives its turns");
    }
}
