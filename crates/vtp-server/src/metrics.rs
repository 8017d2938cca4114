//! Prometheus metrics at `GET /metrics` (the `metrics` facade with the
//! Prometheus exporter): requests by method, route and status, request
//! latency by route, jobs created, trainer reports applied or ignored, and
//! jobs finished by status; and the seed's own names:
//! `training_jobs_total{framework,status}` (a job entering a status),
//! `training_duration_seconds{framework}` (start to end of the jobs that
//! finished) and `active_training_jobs` (queued, running or cancelling, read
//! from the job store when scraped). [`EXPORTED`] lists every name; the
//! dashboards and alerts in `deploy/` may query only those.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{MatchedPath, Request};

use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use vtp_core::{
    Expected, Job, JobEvent, JobFilter, JobId, JobPage, JobStatus, JobStore, TrainingMetric,
};

/// Every metric the backend exports (histograms also as `_bucket`, `_sum`
/// and `_count`).
pub const EXPORTED: [&str; 17] = [
    "vtp_http_requests_total",
    "vtp_http_request_duration_seconds",
    "vtp_jobs_created_total",
    "vtp_reports_total",
    "vtp_jobs_finished_total",
    "vtp_callbacks_refused_total",
    "vtp_relaunches_total",
    "vtp_leases_expired_total",
    "training_jobs_total",
    "training_duration_seconds",
    "active_training_jobs",
    "vtp_event_streams",
    "vtp_launches_total",
    "vtp_queue_waiting",
    "vtp_queue_wait_seconds",
    "vtp_leader",
    "vtp_jobs_purged_total",
];

/// The process's Prometheus recorder (shared with a trainer service in the
/// same process, as the Python package runs them).
pub use vtp_http::metrics::handle;

/// Middleware: counts and times every routed request.
pub async fn track(request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let method = request.method().as_str().to_owned();
    let started = Instant::now();
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    metrics::histogram!("vtp_http_request_duration_seconds", "method" => method.clone(), "route" => route.clone())
        .record(started.elapsed().as_secs_f64());
    metrics::counter!("vtp_http_requests_total", "method" => method, "route" => route, "status" => status)
        .increment(1);
    response
}

/// `GET /metrics`: the Prometheus text format.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    responses((status = 200, description = "Prometheus text exposition format", body = String, content_type = "text/plain")),
)]
pub async fn render() -> impl IntoResponse {
    // `active_training_jobs` is kept by the store probe ([`crate::probe`]):
    // a scrape reads no database.
    vtp_http::metrics::render()
}

/// A [`JobStore`] that observes every change, whoever makes it (a report,
/// a start, a cancel, the sweeper, the relauncher), since every change
/// passes through `create` and `compare_and_set`: it counts every status a
/// job enters (`training_jobs_total{framework,status}`), times the jobs
/// that end (`training_duration_seconds{framework}`, from start to end),
/// and announces the job on `changes`, which wakes its event streams.
#[derive(Debug)]
pub struct ObservedJobStore {
    /// The store written to.
    pub inner: Arc<dyn JobStore>,
    /// Where changed jobs are announced ([`crate::AppState::changes`]).
    pub changes: tokio::sync::broadcast::Sender<JobId>,
    /// Wakes the queue's dispatcher ([`crate::AppState::dispatch`]).
    pub dispatch: Arc<tokio::sync::Notify>,
}

impl ObservedJobStore {
    fn announce(&self, job_id: JobId) {
        // No stream listening is no error.
        let _ = self.changes.send(job_id);
    }

    /// After a stored change: counts a status entered, wakes the job's
    /// streams, and wakes the dispatcher when the change may let a waiting
    /// job run (a job started, or one that held a slot no longer does).
    fn changed(&self, expected: Expected, stored: &Job) {
        if stored.status != expected.status {
            entered(stored);
            if stored.status == JobStatus::Queued || !stored.holds_slot() {
                self.dispatch.notify_one();
            }
        } else if stored.is_waiting() {
            // Back to wait (a lost attempt), or its launch undone.
            self.dispatch.notify_one();
        }
        self.announce(stored.id);
    }
}

fn entered(job: &Job) {
    metrics::counter!("training_jobs_total", "framework" => job.framework.clone(), "status" => job.status.as_str())
        .increment(1);
    if job.status.is_terminal()
        && let (Some(started), Some(finished)) = (job.started_at, job.finished_at)
    {
        let seconds = (finished - started).num_milliseconds().max(0) as f64 / 1000.0;
        metrics::histogram!("training_duration_seconds", "framework" => job.framework.clone())
            .record(seconds);
    }
}

#[async_trait::async_trait]
impl JobStore for ObservedJobStore {
    async fn create(&self, job: &Job) -> vtp_core::Result<()> {
        self.inner.create(job).await?;
        entered(job);
        self.announce(job.id);
        Ok(())
    }
    async fn create_within(&self, job: &Job, quota: vtp_core::Quota) -> vtp_core::Result<()> {
        self.inner.create_within(job, quota).await?;
        entered(job);
        self.announce(job.id);
        Ok(())
    }
    async fn compare_and_set_within(
        &self,
        expected: Expected,
        next: &Job,
        quota: vtp_core::Quota,
    ) -> vtp_core::Result<Job> {
        let stored = self
            .inner
            .compare_and_set_within(expected, next, quota)
            .await?;
        self.changed(expected, &stored);
        Ok(stored)
    }
    async fn queue(
        &self,
        now: chrono::DateTime<chrono::Utc>,
        limit: u32,
    ) -> vtp_core::Result<Vec<Job>> {
        self.inner.queue(now, limit).await
    }
    async fn queue_positions(
        &self,
        user_id: Option<&str>,
    ) -> vtp_core::Result<std::collections::HashMap<JobId, u64>> {
        self.inner.queue_positions(user_id).await
    }
    async fn slots_taken(&self) -> vtp_core::Result<u64> {
        self.inner.slots_taken().await
    }
    async fn delete(&self, id: JobId) -> vtp_core::Result<bool> {
        let deleted = self.inner.delete(id).await?;
        self.announce(id);
        Ok(deleted)
    }
    async fn get(&self, id: JobId) -> vtp_core::Result<Job> {
        self.inner.get(id).await
    }
    async fn find_created_with_key(
        &self,
        user_id: &str,
        key: &str,
    ) -> vtp_core::Result<Option<Job>> {
        self.inner.find_created_with_key(user_id, key).await
    }
    async fn list(&self, filter: &JobFilter) -> vtp_core::Result<JobPage> {
        self.inner.list(filter).await
    }
    async fn compare_and_set(
        &self,
        expected: Expected,
        next: &Job,
        metric: Option<&TrainingMetric>,
    ) -> vtp_core::Result<Job> {
        let stored = self.inner.compare_and_set(expected, next, metric).await?;
        self.changed(expected, &stored);
        Ok(stored)
    }
    async fn insert_metric_if_absent(&self, metric: &TrainingMetric) -> vtp_core::Result<bool> {
        self.inner.insert_metric_if_absent(metric).await
    }
    async fn metrics(&self, id: JobId) -> vtp_core::Result<Vec<TrainingMetric>> {
        self.inner.metrics(id).await
    }
    async fn events(&self, id: JobId, after: i64, limit: u32) -> vtp_core::Result<Vec<JobEvent>> {
        self.inner.events(id, after, limit).await
    }
    async fn ping(&self) -> vtp_core::Result<()> {
        self.inner.ping().await
    }
}
