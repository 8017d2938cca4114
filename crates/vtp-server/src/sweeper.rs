//! The stale-job sweeper: nothing stays `queued`, `running` or `cancelling`
//! forever. A job with no report for longer than the policy allows is failed
//! (or, when it was being cancelled, marked cancelled) with the reason.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use vtp_core::{Error, Expected, JobFilter, JobStatus, JobStore, Result};

use crate::error::error_chain;

/// How long each active state may go without a report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SweepPolicy {
    /// Limit for `queued` and `running` jobs.
    pub stale_after: Duration,
    /// Limit for `cancelling` jobs (the trainer's grace period).
    pub cancel_grace: Duration,
    /// Time between sweeps.
    pub interval: Duration,
}

impl SweepPolicy {
    /// A policy failing jobs silent for `stale_after`; cancels settle within
    /// two minutes (or `stale_after`, when shorter).
    pub fn new(stale_after: Duration) -> Self {
        SweepPolicy {
            stale_after,
            cancel_grace: stale_after.min(Duration::from_secs(120)),
            interval: (stale_after / 4).clamp(Duration::from_millis(100), Duration::from_secs(30)),
        }
    }
}

/// Finalises every stale job as of `now`; returns how many it changed.
///
/// # Errors
/// Store errors other than lost races.
pub async fn sweep_once(
    jobs: &dyn JobStore,
    policy: &SweepPolicy,
    now: DateTime<Utc>,
) -> Result<usize> {
    let rules = [
        (JobStatus::Queued, policy.stale_after, JobStatus::Failed),
        (JobStatus::Running, policy.stale_after, JobStatus::Failed),
        (
            JobStatus::Cancelling,
            policy.cancel_grace,
            JobStatus::Cancelled,
        ),
    ];
    let mut changed = 0;
    for (status, limit, to) in rules {
        let cutoff = now - chrono::Duration::from_std(limit).unwrap_or(chrono::Duration::MAX);
        let filter = JobFilter::new()
            .with_status(status)
            .with_updated_before(cutoff)
            .with_page(JobFilter::MAX_LIMIT, 0);
        let page = jobs.list(&filter).await?;
        for job in page.jobs {
            let reason = format!(
                "no report from the trainer for over {}s while {status}",
                limit.as_secs()
            );
            // A compare-and-set on the very version found stale: a report
            // that lands after the listing bumps the revision and wins.
            let mut next = job.clone();
            next.end_with_reason(to, &reason)?;
            let result = jobs
                .compare_and_set(Expected::exactly(&job), &next, None)
                .await;
            match result {
                Ok(_) => {
                    tracing::warn!(job_id = %job.id, from = %status, to = %to, %reason, "stale job finalised");
                    changed += 1;
                }
                // A report arrived meanwhile: the job is alive after all.
                Err(Error::Conflict { .. }) => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(changed)
}

/// Sweeps every `policy.interval` until the task is dropped.
pub async fn run(jobs: Arc<dyn JobStore>, policy: SweepPolicy) {
    let mut tick = tokio::time::interval(policy.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Err(e) = sweep_once(jobs.as_ref(), &policy, Utc::now()).await {
            tracing::warn!(error = %error_chain(&e), "stale-job sweep failed; will retry");
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use vtp_core::{JobStatus, JobStoreExt, NewJob, TrainingUpdate};
    use vtp_storage::InMemoryJobStore;

    use super::*;

    pub(crate) fn new_job() -> NewJob {
        NewJob {
            user_id: "u".into(),
            model_name: "small_cnn".into(),
            framework: "tch".into(),
            dataset_s3_uri: "s3://b/d".into(),
            config: serde_json::json!({}),
        }
    }

    /// A job that has reached `running` through a first report.
    async fn running_job(store: &dyn JobStore) -> vtp_core::Job {
        let job = store.create_job(new_job()).await.unwrap();
        store
            .transition(job.id, JobStatus::Pending, JobStatus::Queued)
            .await
            .unwrap();
        store
            .apply_update(job.id, &TrainingUpdate::new(JobStatus::Running).with_seq(1))
            .await
            .unwrap();
        store.get(job.id).await.unwrap()
    }

    #[tokio::test]
    async fn silent_jobs_are_finalised_and_live_ones_kept() {
        let store = InMemoryJobStore::new();
        let policy = SweepPolicy::new(Duration::from_secs(60));
        let pending = store.create_job(new_job()).await.unwrap();
        let running = running_job(&store).await;
        let cancelling = store.create_job(new_job()).await.unwrap();
        store
            .transition(cancelling.id, JobStatus::Pending, JobStatus::Queued)
            .await
            .unwrap();
        store
            .transition(cancelling.id, JobStatus::Queued, JobStatus::Cancelling)
            .await
            .unwrap();

        // Nothing is stale yet.
        assert_eq!(sweep_once(&store, &policy, Utc::now()).await.unwrap(), 0);

        let later = Utc::now() + chrono::Duration::seconds(61);
        assert_eq!(sweep_once(&store, &policy, later).await.unwrap(), 2);
        let failed = store.get(running.id).await.unwrap();
        assert_eq!(failed.status, JobStatus::Failed);
        assert!(
            failed.error.unwrap().contains("no report"),
            "the reason is recorded"
        );
        assert_eq!(
            store.get(cancelling.id).await.unwrap().status,
            JobStatus::Cancelled
        );
        assert_eq!(
            store.get(pending.id).await.unwrap().status,
            JobStatus::Pending,
            "pending jobs wait for a start"
        );
    }

    /// A store where a trainer reports on every job right after it is listed.
    #[derive(Debug)]
    struct ReportsAfterListing(InMemoryJobStore);

    #[async_trait::async_trait]
    impl JobStore for ReportsAfterListing {
        async fn create(&self, job: &vtp_core::Job) -> Result<()> {
            self.0.create(job).await
        }
        async fn get(&self, id: vtp_core::JobId) -> Result<vtp_core::Job> {
            self.0.get(id).await
        }
        async fn list(&self, filter: &JobFilter) -> Result<vtp_core::JobPage> {
            let page = self.0.list(filter).await?;
            for job in &page.jobs {
                let report = TrainingUpdate::new(JobStatus::Running)
                    .with_seq(job.last_seq + 1)
                    .with_progress(0.5);
                self.0.apply_update(job.id, &report).await?;
            }
            Ok(page)
        }
        async fn compare_and_set(
            &self,
            expected: Expected,
            next: &vtp_core::Job,
            metric: Option<&vtp_core::TrainingMetric>,
        ) -> Result<vtp_core::Job> {
            self.0.compare_and_set(expected, next, metric).await
        }
        async fn insert_metric_if_absent(&self, metric: &vtp_core::TrainingMetric) -> Result<bool> {
            self.0.insert_metric_if_absent(metric).await
        }
        async fn metrics(&self, id: vtp_core::JobId) -> Result<Vec<vtp_core::TrainingMetric>> {
            self.0.metrics(id).await
        }
        async fn ping(&self) -> Result<()> {
            self.0.ping().await
        }
    }

    #[tokio::test]
    async fn a_report_after_the_listing_keeps_the_job_alive() {
        let store = ReportsAfterListing(InMemoryJobStore::new());
        let policy = SweepPolicy::new(Duration::from_secs(60));
        let job = running_job(&store).await;
        let later = Utc::now() + chrono::Duration::seconds(61);
        assert_eq!(sweep_once(&store, &policy, later).await.unwrap(), 0);
        let alive = store.get(job.id).await.unwrap();
        assert_eq!(alive.status, JobStatus::Running);
        assert_eq!((alive.last_seq, alive.progress), (2, 0.5));
    }
}
