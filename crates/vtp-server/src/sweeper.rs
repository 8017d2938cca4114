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
//! - A `queued` job waiting for capacity waits as long as it takes. One
//!   that was launched and whose trainer never started within `stale_after`
//!   has lost its runner the same way, unless a scheduler behind the
//!   launcher has not admitted it yet
//!   ([`TrainerLauncher::waiting_for_admission`]: it is waiting, not lost).
//! - A `cancelling` job whose trainer never confirmed is marked cancelled.
//!
//! Every listing is paged, so a sweep's memory is one page however many
//! jobs there are.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use vtp_core::launcher::LEASE_HEARTBEATS;
use vtp_core::{
    Error, Expected, JobFilter, JobPages, JobStatus, JobStore, Result, TrainerLauncher,
};

use crate::error::error_chain;

/// The longest the sweeper waits for a launcher to stop one runner.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);

/// How long each active state may go without a report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SweepPolicy {
    /// Limit for launched `queued` jobs: the launch and the trainer's start.
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
        let mut filter = JobFilter::new()
            .with_status(status)
            .with_updated_before(cutoff)
            .with_page(JobFilter::MAX_LIMIT, 0);
        if status == JobStatus::Queued {
            // Waiting for capacity is not being lost.
            filter = filter.with_launched(true);
        }
        let mut pages = JobPages::new(jobs, filter);
        while let Some(page) = pages.next().await? {
            for job in page {
                changed += sweep_job(jobs, launcher, job, status, limit).await?;
            }
        }
    }
    Ok(changed)
}

/// Ends one job found stale in `status` (silent for over `limit`);
/// returns 1 if it changed it.
async fn sweep_job(
    jobs: &dyn JobStore,
    launcher: &dyn TrainerLauncher,
    job: vtp_core::Job,
    status: JobStatus,
    limit: Duration,
) -> Result<usize> {
    if status == JobStatus::Queued {
        match launcher.waiting_for_admission(job.id).await {
            Ok(true) => return Ok(0),
            Ok(false) => {}
            Err(e) => {
                tracing::debug!(job_id = %job.id, error = %error_chain(&e), "cannot ask the launcher whether the job is admitted; next sweep");
                return Ok(0);
            }
        }
    }
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
                "launched, but its trainer never started: no report for over {}s",
                limit.as_secs()
            );
            next.end_attempt(&reason)?;
            reason
        }
    };
    // A compare-and-set on the very version found stale: a report that
    // lands after the listing bumps the revision and wins.
    match jobs
        .compare_and_set(Expected::exactly(&job), &next, None)
        .await
    {
        Ok(_) => {
            tracing::warn!(job_id = %job.id, from = %status, to = %next.status, attempt = job.attempt, %reason, "stale job finalised");
        }
        // A report arrived meanwhile: the job is alive after all.
        Err(Error::Conflict { .. }) => return Ok(0),
        Err(e) => return Err(e),
    }
    metrics::counter!("vtp_leases_expired_total", "status" => status.as_str()).increment(1);
    // Whatever still runs for it is stopped: a hung trainer must not wake
    // up and train beside the next attempt. Bounded: one unreachable runner
    // must not stall the sweep.
    match tokio::time::timeout(STOP_TIMEOUT, launcher.stop(job.id, job.attempt)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::warn!(job_id = %job.id, error = %error_chain(&e), "could not stop the runner of an expired lease");
        }
        Err(_) => {
            tracing::warn!(job_id = %job.id, "stopping the runner of an expired lease timed out");
        }
    }
    Ok(1)
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
    use vtp_core::{JobStatus, JobStoreExt, NewJob, TrainingReport};
    use vtp_storage::InMemoryJobStore;

    use super::*;

    mockall::mock! {
        /// A launcher whose `stop` calls a test counts.
        #[derive(Debug)]
        pub Launcher {}
        #[async_trait::async_trait]
        impl TrainerLauncher for Launcher {
            fn name(&self) -> &'static str;
            async fn capacity(&self) -> Result<vtp_core::Capacity>;
            async fn launch(&self, request: &vtp_core::StartTraining) -> Result<()>;
            async fn waiting_for_admission(&self, job_id: vtp_core::JobId) -> Result<bool>;
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
            priority: 0,
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
            .apply_report(job.id, &TrainingReport::new(JobStatus::Running).with_seq(1))
            .await
            .unwrap();
        store.get(job.id).await.unwrap()
    }

    /// Moves a queued job to launched, as the dispatcher does.
    async fn launched(store: &dyn JobStore, id: vtp_core::JobId) -> vtp_core::Job {
        let job = store.get(id).await.unwrap();
        let mut next = job.clone();
        next.launched_at = Some(vtp_core::job::now());
        store
            .compare_and_set(Expected::exactly(&job), &next, None)
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn waiting_jobs_wait_launched_ones_that_never_start_are_lost_and_cancels_end() {
        let store = InMemoryJobStore::new();
        let policy = SweepPolicy::new(Duration::from_secs(60), Duration::from_secs(30));
        let pending = store.create_job(new_job()).await.unwrap();
        let queue = |new: NewJob| {
            let store = &store;
            async move {
                let job = store.create_job(new).await.unwrap();
                store
                    .transition(job.id, JobStatus::Pending, JobStatus::Queued)
                    .await
                    .unwrap()
            }
        };
        let waiting = queue(new_job()).await;
        let lost = queue(new_job()).await;
        launched(&store, lost.id).await;
        let last_try = queue(NewJob {
            config: serde_json::json!({"max_attempts": 1}),
            ..new_job()
        })
        .await;
        launched(&store, last_try.id).await;
        let admitting = queue(new_job()).await;
        launched(&store, admitting.id).await;
        let cancelling = queue(new_job()).await;
        launched(&store, cancelling.id).await;
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

        // An hour later: the waiting job still waits; the launched ones
        // whose trainer never started lost their runner (relaunched while
        // attempts are left), unless a scheduler has yet to admit them; the
        // cancel was never confirmed. Each runner given up on is stopped.
        let mut launcher = MockLauncher::new();
        launcher
            .expect_waiting_for_admission()
            .returning(move |id| Ok(id == admitting.id));
        let stopped = [lost.id, last_try.id, cancelling.id];
        launcher
            .expect_stop()
            .withf(move |id, _| stopped.contains(id))
            .times(3)
            .returning(|_, _| Ok(()));
        let later = now + chrono::Duration::seconds(3600);
        assert_eq!(
            sweep_once(&store, &launcher, &policy, later, LONG_AGO)
                .await
                .unwrap(),
            3
        );
        let requeued = store.get(lost.id).await.unwrap();
        assert_eq!(
            (requeued.status, requeued.attempt, requeued.launched_at),
            (JobStatus::Queued, 2, None),
            "back to wait for its next attempt"
        );
        assert!(requeued.attempts[0].reason.contains("never started"));
        let failed = store.get(last_try.id).await.unwrap();
        assert_eq!(failed.status, JobStatus::Failed);
        assert!(
            failed.error.unwrap().contains("never started"),
            "the reason is recorded"
        );
        assert!(store.get(waiting.id).await.unwrap().is_waiting());
        let admitting = store.get(admitting.id).await.unwrap();
        assert_eq!(
            (admitting.status, admitting.attempt),
            (JobStatus::Queued, 1),
            "not yet admitted is waiting, not lost"
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
        async fn create_within(&self, job: &vtp_core::Job, quota: vtp_core::Quota) -> Result<()> {
            self.0.create_within(job, quota).await
        }
        async fn compare_and_set_within(
            &self,
            expected: Expected,
            next: &vtp_core::Job,
            quota: vtp_core::Quota,
        ) -> Result<vtp_core::Job> {
            self.0.compare_and_set_within(expected, next, quota).await
        }
        async fn queue(&self, now: DateTime<Utc>, limit: u32) -> Result<Vec<vtp_core::Job>> {
            self.0.queue(now, limit).await
        }
        async fn queue_positions(
            &self,
            user_id: Option<&str>,
        ) -> Result<std::collections::HashMap<vtp_core::JobId, u64>> {
            self.0.queue_positions(user_id).await
        }
        async fn delete(&self, id: vtp_core::JobId) -> Result<bool> {
            self.0.delete(id).await
        }
        async fn slots_taken(&self) -> Result<u64> {
            self.0.slots_taken().await
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
                let report = TrainingReport::new(JobStatus::Running)
                    .with_seq(job.last_seq + 1)
                    .with_progress(0.5);
                self.0.apply_report(job.id, &report).await?;
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
