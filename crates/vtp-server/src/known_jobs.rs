//! [`KnownJobs`]: the version of each active job this backend last stored,
//! so a trainer report is planned without reading the job first.

use std::fmt;
use std::sync::Mutex;

use hashlink::LruCache;
use vtp_core::{Job, JobId};

/// The last stored version of recently reported jobs, least recently used
/// out first.
///
/// It is a hint, never the truth: [`vtp_core::JobStoreExt::apply_update_from`]
/// writes with a compare-and-set on the hinted revision, so a version that
/// another writer (a cancel, another replica, the reconciler) has since
/// changed costs one lost race and a re-read, not a wrong answer.
pub struct KnownJobs {
    jobs: Mutex<LruCache<JobId, Job>>,
}

impl KnownJobs {
    /// How many jobs are remembered (one entry per job being trained is plenty).
    pub const CAPACITY: usize = 4096;

    /// An empty cache.
    pub fn new() -> Self {
        KnownJobs {
            jobs: Mutex::new(LruCache::new(Self::CAPACITY)),
        }
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
}
