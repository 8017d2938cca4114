//! The stale-job sweeper: nothing stays `queued`, `running` or `cancelling`
//! forever.
//!
//! - A `running` job holds a lease that every report renews: its trainer
//!   reports at least every heartbeat period (`VTP_HEARTBEAT_SECS`), with
//!   step progress inside long epochs. A job silent for
//!   [`vtp_core::launcher::LEASE_HEARTBEATS`] periods has lost its runner
//!   (hung, frozen, cut off): its attempt ends
//!   ([`vtp_core::Job::end_attempt`]: relaunched from its last checkpoint
//!   set while attempts are left, else failed) and the runner is stopped
//!   through its launcher ([`TrainerLauncher::stop`]: the child killed, the
//!   Kubernetes Job deleted), so it can never report over its successor.
//! - A `queued` job whose trainer never started within `stale_after` fails.
//! - A `cancelling` job whose trainer never confirmed is marked cancelled.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use vtp_core::launcher::LEASE_HEARTBEATS;
use vtp_core::{Error, Expected, JobFilter, JobStatus, JobStore, Result, TrainerLauncher};

use crate::error::error_chain;

/// The longest the sweeper waits for a launcher to stop one runner.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);

/// How long each active state may go without a report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SweepPolicy {
    /// Limit for `queued` jobs: the launch and the trainer's start.
    pub stale_after: Duration,
    /// Limit for `running` jobs: their lease, a few heartbeat periods.
    pub lease: Duration,
    /// Limit for `cancelling` jobs (the trainer's grace period).
    pub cancel_grace: Duration,
    /// Time between sweeps.
    pub interval: Duration,
}

impl SweepPolicy {
    /// A policy failing jobs that never start within `stale_after`, taking
    /// running jobs silent for [`LEASE_HEARTBEATS`] × `heartbeat` for lost;
    /// cancels settle within two minutes (or `stale_after`, when shorter).
    pub fn new(stale_after: Duration, heartbeat: Duration) -> Self {
        let lease = heartbeat.max(Duration::from_millis(100)) * LEASE_HEARTBEATS;
        SweepPolicy {
            stale_after,
            lease,
            cancel_grace: stale_after.min(Duration::from_secs(120)),
            interval: (lease.min(stale_after) / 4)
                .clamp(Duration::from_millis(100), Duration::from_secs(30)),
        }
    }
}

/// Finalises every stale job as of `now`, stopping the runners of expired
/// leases through `launcher`; returns how many jobs it changed. Silence is
/// counted from `watching_since` at the earliest: when this backend began
/// watching, or when its store came back from an outage. Reports refused
/// meanwhile (no one listening, the database away) are being retried by the
/// trainers and must not cost them their lease.
///
/// # Errors
/// Store errors other than lost races.
pub async fn sweep_once(
    jobs: &dyn JobStore,
    launcher: &dyn TrainerLauncher,
    policy: &SweepPolicy,
    now: DateTime<Utc>,
    watching_since: DateTime<Utc>,
) -> Result<usize> {
    let rules = [
        (JobStatus::Queued, policy.stale_after),
        (JobStatus::Running, policy.lease),
        (JobStatus::Cancelling, policy.cancel_grace),
    ];
    let mut changed = 0;
    for (status, limit) in rules {
        let cutoff = now - chrono::Duration::from_std(limit).unwrap_or(chrono::Duration::MAX);
        if watching_since > cutoff {
            continue;
        }
        let filter = JobFilter::new()
            .with_status(status)
            .with_updated_before(cutoff)
            .with_page(JobFilter::MAX_LIMIT, 0);
        let page = jobs.list(&filter).await?;
        for job in page.jobs {
            let mut next = job.clone();
            let reason = match status {
                JobStatus::Running => {
                    let reason = format!(
                        "lease expired: no report from the trainer for over {}s",
                        limit.as_secs_f64().round()
                    );
                    next.end_attempt(&reason)?;
                    reason
                }
                JobStatus::Cancelling => {
                    let reason = format!(
                        "the trainer did not confirm the cancel within {}s",
                        limit.as_secs()
                    );
                    next.end_with_reason(JobStatus::Cancelled, &reason)?;
                    reason
                }
                _ => {
                    let reason = format!(
                        "no report from the trainer for over {}s while {status}",
                        limit.as_secs()
                    );
                    next.end_with_reason(JobStatus::Failed, &reason)?;
                    reason
                }
            };
            // A compare-and-set on the very version found stale: a report
            // that lands after the listing bumps the revision and wins.
            let result = jobs
                .compare_and_set(Expected::exactly(&job), &next, None)
                .await;
            match result {
                Ok(_) => {
                    tracing::warn!(job_id = %job.id, from = %status, to = %next.status, attempt = job.attempt, %reason, "stale job finalised");
                    changed += 1;
                }
                // A report arrived meanwhile: the job is alive after all.
                Err(Error::Conflict { .. }) => continue,
                Err(e) => return Err(e),
            }
            if status != JobStatus::Queued {
                metrics::counter!("vtp_leases_expired_total", "status" => status.as_str())
                    .increment(1);
                // Whatever still runs for it is stopped: a hung trainer must
                // not wake up and train beside the next attempt.
                // Bounded: one unreachable runner must not stall the sweep.
                match tokio::time::timeout(STOP_TIMEOUT, launcher.stop(job.id, job.attempt)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        tracing::warn!(job_id = %job.id, error = %error_chain(&e), "could not stop the runner of an expired lease");
                    }
                    Err(_) => {
                        tracing::warn!(job_id = %job.id, "stopping the runner of an expired lease timed out");
                    }
                }
            }
        }
    }
    Ok(changed)
}

/// Sweeps every `policy.interval` until the task is dropped.
pub async fn run(jobs: Arc<dyn JobStore>, launcher: Arc<dyn TrainerLauncher>, policy: SweepPolicy) {
    let mut tick = tokio::time::interval(policy.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut watching_since = Utc::now();
    loop {
        tick.tick().await;
        let now = Utc::now();
        if let Err(e) = sweep_once(
            jobs.as_ref(),
            launcher.as_ref(),
            &policy,
            now,
            watching_since,
        )
        .await
        {
            tracing::warn!(error = %error_chain(&e), "stale-job sweep failed; will retry");
            // The store is away: so are the reports trainers are retrying.
            watching_since = now;
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use vtp_core::{JobStatus, JobStoreExt, NewJob, TrainingUpdate};
    use vtp_storage::InMemoryJobStore;

    use super::*;

    mockall::mock! {
        /// A launcher whose `stop` calls a test counts.
        #[derive(Debug)]
        pub Launcher {}
        #[async_trait::async_trait]
        impl TrainerLauncher for Launcher {
            fn name(&self) -> &'static str;
            async fn launch(&self, request: &vtp_core::StartTraining) -> Result<()>;
            async fn cancel(&self, job_id: vtp_core::JobId) -> Result<vtp_core::CancelOutcome>;
            async fn is_running(&self, job_id: vtp_core::JobId) -> Result<bool>;
            async fn stop(&self, job_id: vtp_core::JobId, attempt: i32) -> Result<()>;
        }
    }

    /// A sweeper watching since long before any of these jobs.
    const LONG_AGO: DateTime<Utc> = DateTime::<Utc>::MIN_UTC;

    /// A launcher that must not be asked to stop anything.
    fn no_stops() -> MockLauncher {
        let mut launcher = MockLauncher::new();
        launcher.expect_stop().never();
        launcher
    }

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
        running_job_with(store, new_job()).await
    }

    async fn running_job_with(store: &dyn JobStore, new: NewJob) -> vtp_core::Job {
        let job = store.create_job(new).await.unwrap();
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
    async fn jobs_that_never_start_fail_and_unconfirmed_cancels_end() {
        let store = InMemoryJobStore::new();
        let policy = SweepPolicy::new(Duration::from_secs(60), Duration::from_secs(30));
        let pending = store.create_job(new_job()).await.unwrap();
        let queued = store.create_job(new_job()).await.unwrap();
        store
            .transition(queued.id, JobStatus::Pending, JobStatus::Queued)
            .await
            .unwrap();
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
        let now = Utc::now();
        assert_eq!(
            sweep_once(&store, &no_stops(), &policy, now, LONG_AGO)
                .await
                .unwrap(),
            0
        );

        // The queued job never started; the cancel was never confirmed, so
        // whatever may still run for it is stopped.
        let mut launcher = MockLauncher::new();
        launcher
            .expect_stop()
            .withf(move |id, _| *id == cancelling.id)
            .times(1)
            .returning(|_, _| Ok(()));
        let later = now + chrono::Duration::seconds(61);
        assert_eq!(
            sweep_once(&store, &launcher, &policy, later, LONG_AGO)
                .await
                .unwrap(),
            2
        );
        let failed = store.get(queued.id).await.unwrap();
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

    #[tokio::test]
    async fn silence_counts_only_from_when_the_sweeper_began_watching() {
        let store = InMemoryJobStore::new();
        let policy = SweepPolicy::new(Duration::from_secs(3600), Duration::from_secs(30));
        let job = running_job(&store).await;
        // A backend that restarts (or a store back from an outage) long
        // after the job's last report gives its trainer one lease to get
        // its queued reports through.
        let restarted = Utc::now() + chrono::Duration::seconds(600);
        let soon = restarted + chrono::Duration::seconds(60);
        assert_eq!(
            sweep_once(&store, &no_stops(), &policy, soon, restarted)
                .await
                .unwrap(),
            0
        );
        let mut launcher = MockLauncher::new();
        launcher.expect_stop().times(1).returning(|_, _| Ok(()));
        let later = restarted + chrono::Duration::seconds(121);
        assert_eq!(
            sweep_once(&store, &launcher, &policy, later, restarted)
                .await
                .unwrap(),
            1
        );
        assert_eq!(store.get(job.id).await.unwrap().status, JobStatus::Queued);
    }

    #[tokio::test]
    async fn an_expired_lease_ends_the_attempt_and_stops_its_runner() {
        let store = InMemoryJobStore::new();
        // Heartbeats every 30 s: a lease of two minutes.
        let policy = SweepPolicy::new(Duration::from_secs(3600), Duration::from_secs(30));
        assert_eq!(policy.lease, Duration::from_secs(120));
        let job = running_job(&store).await;
        let now = Utc::now();
        // Within the lease: alive.
        let soon = now + chrono::Duration::seconds(100);
        assert_eq!(
            sweep_once(&store, &no_stops(), &policy, soon, LONG_AGO)
                .await
                .unwrap(),
            0
        );

        // Past it: the attempt ends (relaunched: attempts are left) and the
        // hung runner is stopped; a launcher that cannot stop it is logged,
        // not fatal.
        let mut launcher = MockLauncher::new();
        launcher
            .expect_stop()
            .withf(move |id, attempt| *id == job.id && *attempt == 1)
            .times(1)
            .returning(|_, _| Err(vtp_core::Error::unavailable("trainer", "unreachable")));
        let late = now + chrono::Duration::seconds(121);
        assert_eq!(
            sweep_once(&store, &launcher, &policy, late, LONG_AGO)
                .await
                .unwrap(),
            1
        );
        let requeued = store.get(job.id).await.unwrap();
        assert_eq!((requeued.status, requeued.attempt), (JobStatus::Queued, 2));
        assert!(requeued.attempts[0].reason.contains("lease expired"));

        // The last attempt's lease expiring fails the job.
        let job = running_job_with(
            &store,
            NewJob {
                config: serde_json::json!({"max_attempts": 1}),
                ..new_job()
            },
        )
        .await;
        let mut launcher = MockLauncher::new();
        launcher.expect_stop().times(1).returning(|_, _| Ok(()));
        let later = Utc::now() + chrono::Duration::seconds(121);
        // (The first job, queued again, is not yet past `stale_after`.)
        assert_eq!(
            sweep_once(&store, &launcher, &policy, later, LONG_AGO)
                .await
                .unwrap(),
            1
        );
        let failed = store.get(job.id).await.unwrap();
        assert_eq!(failed.status, JobStatus::Failed);
        assert!(failed.error.unwrap().contains("none left"));
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
        async fn find_created_with_key(
            &self,
            user_id: &str,
            key: &str,
        ) -> Result<Option<vtp_core::Job>> {
            self.0.find_created_with_key(user_id, key).await
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
        async fn events(
            &self,
            id: vtp_core::JobId,
            after: i64,
            limit: u32,
        ) -> Result<Vec<vtp_core::JobEvent>> {
            self.0.events(id, after, limit).await
        }
        async fn ping(&self) -> Result<()> {
            self.0.ping().await
        }
    }

    #[tokio::test]
    async fn a_report_after_the_listing_keeps_the_job_alive() {
        let store = ReportsAfterListing(InMemoryJobStore::new());
        let policy = SweepPolicy::new(Duration::from_secs(60), Duration::from_secs(10));
        let job = running_job(&store).await;
        let later = Utc::now() + chrono::Duration::seconds(61);
        assert_eq!(
            sweep_once(&store, &no_stops(), &policy, later, LONG_AGO)
                .await
                .unwrap(),
            0
        );
        let alive = store.get(job.id).await.unwrap();
        assert_eq!(alive.status, JobStatus::Running);
        assert_eq!((alive.last_seq, alive.progress), (2, 0.5));
    }
}
