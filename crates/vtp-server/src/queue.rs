//! The queue's dispatcher: hands waiting jobs to the launcher as capacity
//! frees, in the queue's order.
//!
//! A started job waits in `queued` ([`vtp_core::Job::is_waiting`]) for as
//! long as it takes. The dispatcher (on the leader, [`crate::leader`]) asks
//! the launcher for its capacity ([`vtp_core::Capacity`]): with `n` slots it
//! launches as many waiting jobs as slots are free (jobs holding a slot:
//! running, being cancelled, or launched and not yet reporting); when a
//! scheduler behind the launcher admits jobs (Kueue), it hands every
//! waiting job over, a batch per pass. The order is the store's
//! ([`vtp_core::JobStore::queue`]): priority, then fair share between
//! users, then age.
//!
//! Each launch is first recorded (`launched_at`, a compare-and-set on the
//! job as read), then made: another backend that believes it leads loses
//! that race, so no attempt is launched twice. A launch the launcher
//! refuses as invalid fails the job; one it cannot make now puts the job
//! back to wait, a little later ([`Policy::retry`]). A job relaunched after
//! a lost runner waits [`Policy::backoff`] first, doubling with each loss.

use std::time::Duration;

use vtp_core::{Capacity, Error, Expected, Job, JobId, JobStatus, JobStoreExt, Result};

use crate::AppState;
use crate::error::error_chain;

/// The W3C `traceparent` of recent start requests, by job: the dispatcher
/// on this replica makes a job's first launch a child of its start
/// request, so one trace runs from the request through the launch to the
/// trainer's epochs. Bounded (the oldest are forgotten); a job launched by
/// another replica, or after a restart, starts a trace of its own.
#[derive(Debug)]
pub struct StartTraces(std::sync::Mutex<hashlink::LruCache<JobId, String>>);

impl Default for StartTraces {
    fn default() -> Self {
        StartTraces(std::sync::Mutex::new(hashlink::LruCache::new(4096)))
    }
}

impl StartTraces {
    /// Remembers the trace context of `span` (a start request's) for `id`;
    /// nothing when traces are not exported.
    pub fn remember(&self, id: JobId, span: &tracing::Span) {
        if let Some(traceparent) = vtp_http::telemetry::traceparent(span) {
            self.lock().insert(id, traceparent);
        }
    }

    /// The start request's trace context for `id`, if remembered here.
    pub fn get(&self, id: JobId) -> Option<String> {
        self.lock().get(&id).cloned()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, hashlink::LruCache<JobId, String>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// When and how the dispatcher acts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Time between passes when nothing wakes the dispatcher (jobs started
    /// on another replica, slots freed by reports there).
    pub interval: Duration,
    /// The most jobs handed over in one pass.
    pub batch: u32,
    /// The least time between a job's launch and its next (after a lost
    /// runner), doubled for each attempt lost before (up to 16 times), so
    /// an outage that outlasts one attempt does not use up the rest within
    /// a minute. The first relaunch is not delayed.
    pub backoff: Duration,
    /// How long a job whose launch failed (the trainer unreachable) waits
    /// before it is tried again.
    pub retry: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            interval: Duration::from_secs(1),
            batch: 64,
            backoff: Duration::from_secs(30),
            retry: Duration::from_secs(5),
        }
    }
}

impl Policy {
    /// When the attempt being launched may next be launched again.
    fn next_launch_after(&self, job: &Job) -> Option<chrono::DateTime<chrono::Utc>> {
        let lost = job.attempts.len();
        if lost == 0 {
            return None;
        }
        let wait = self.backoff.saturating_mul(1 << (lost - 1).min(4));
        Some(vtp_core::job::now() + chrono::Duration::from_std(wait).unwrap_or_default())
    }
}

/// One pass: launches waiting jobs up to the launcher's free capacity.
/// Returns how many it launched.
///
/// # Errors
/// Store errors, and the launcher's when it cannot say its capacity.
pub async fn dispatch_once(state: &AppState, policy: &Policy) -> Result<usize> {
    let free = match state.launcher.capacity().await? {
        Capacity::Slots(slots) => {
            let taken = state.jobs.slots_taken().await?;
            u64::from(slots)
                .saturating_sub(taken)
                .min(u64::from(policy.batch)) as u32
        }
        Capacity::Admitted => policy.batch,
    };
    if free == 0 {
        return Ok(0);
    }
    let waiting = state.jobs.queue(vtp_core::job::now(), free).await?;
    let mut launched = 0;
    for job in waiting {
        match launch(state, policy, job).await {
            Ok(true) => launched += 1,
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(error = %error_chain(&e), "dispatch: a launch could not be recorded; next pass");
            }
        }
    }
    Ok(launched)
}

/// Launches one waiting job: records the launch, makes it, and undoes the
/// record when the launch could not be made. `false` when another writer
/// moved the job first.
async fn launch(state: &AppState, policy: &Policy, job: Job) -> Result<bool> {
    let id = job.id;
    let secret = launch_secret(state, id).await?;
    let mut next = job.clone();
    next.launched_at = Some(vtp_core::job::now());
    next.updated_at = next.launched_at.unwrap_or(next.updated_at);
    next.not_before = policy.next_launch_after(&job);
    let job = match state
        .jobs
        .compare_and_set(Expected::exactly(&job), &next, None)
        .await
    {
        Ok(job) => job,
        // A cancel, a delete or another dispatcher got there first.
        Err(Error::Conflict { .. }) => return Ok(false),
        Err(e) => return Err(e),
    };
    // The crash tests kill the backend here: recorded, not launched.
    crate::crash_point("dispatch-after-record").await;
    if let Some(queued_at) = job.queued_at {
        let waited = (vtp_core::job::now() - queued_at).num_milliseconds().max(0) as f64 / 1000.0;
        metrics::histogram!("vtp_queue_wait_seconds").record(waited);
    }
    match state.launch(&job, secret).await {
        Ok(()) => {
            tracing::info!(job_id = %id, attempt = job.attempt, launcher = state.launcher.name(), resume_from = ?job.last_checkpoint_s3_uri, "job launched");
            // The crash tests kill the backend here: launched, before
            // anything else happens.
            crate::crash_point("dispatch-after-launch").await;
            metrics::counter!("vtp_launches_total").increment(1);
            if job.attempt > 1 {
                metrics::counter!("vtp_relaunches_total").increment(1);
            }
            state.stop_if_ended_during_launch(id).await;
            Ok(true)
        }
        Err(e @ Error::InvalidInput { .. }) => {
            let reason = format!("launch refused: {}", error_chain(&e));
            tracing::warn!(job_id = %id, %reason);
            let failed = state
                .jobs
                .transition_with(id, JobStatus::Queued, JobStatus::Failed, |job| {
                    job.error = Some(reason.clone());
                })
                .await;
            if let Err(e) = failed {
                tracing::debug!(job_id = %id, error = %error_chain(&e), "the job moved on meanwhile");
            }
            Ok(false)
        }
        Err(e) => {
            tracing::warn!(job_id = %id, error = %error_chain(&e), retry_in = ?policy.retry, "launch failed; the job waits and is tried again");
            unlaunch(state, id, job.attempt, policy.retry).await;
            Ok(false)
        }
    }
}

/// Puts attempt `attempt` of job `id`, recorded as launched, back to wait
/// (for at least `wait`): its launch was not made, or no runner holds it.
pub(crate) async fn unlaunch(state: &AppState, id: JobId, attempt: i32, wait: Duration) {
    let back = state
        .jobs
        .update_with(id, |job| {
            if job.status != JobStatus::Queued
                || job.attempt != attempt
                || job.launched_at.is_none()
            {
                return Ok(None);
            }
            let mut next = job.clone();
            next.launched_at = None;
            next.not_before =
                Some(vtp_core::job::now() + chrono::Duration::from_std(wait).unwrap_or_default());
            next.updated_at = vtp_core::job::now();
            Ok(Some(next))
        })
        .await;
    if let Err(e) = back {
        tracing::warn!(job_id = %id, error = %error_chain(&e), "could not put the job back to wait");
    }
}

/// The job's callback secret; a queued job that has none (its start
/// stopped between queueing it and storing the secret, by a crash or a
/// database outage) gets one now, before any trainer was given another.
async fn launch_secret(state: &AppState, id: JobId) -> Result<vtp_core::CallbackSecret> {
    if let Some(secret) = state.secrets.get(id) {
        return Ok(secret);
    }
    // Stored only if still absent: a start that stalled after queueing the
    // job and stores one meanwhile gets this one, and launches with it.
    let secret = state
        .credentials
        .job_secret_or_insert(id, &vtp_core::CallbackSecret::generate())
        .await?;
    state.secrets.remember(id, secret.clone());
    Ok(secret)
}

/// Runs [`dispatch_once`] whenever a job is started or a slot may have
/// freed in this process ([`AppState::dispatch`]), and every
/// `policy.interval`, until the task is dropped.
pub async fn run(state: AppState, policy: Policy) {
    // The same failure every second (a trainer that is down) is said once.
    let mut failing: Option<String> = None;
    loop {
        // Waiting jobs: while one pass launches, more may be launchable.
        match dispatch_once(&state, &policy).await {
            Ok(n) => {
                if failing.take().is_some() {
                    tracing::info!("dispatch passes succeed again");
                }
                if n > 0 {
                    continue;
                }
            }
            Err(e) => {
                let error = error_chain(&e);
                if failing.as_deref() == Some(error.as_str()) {
                    tracing::debug!(%error, "dispatch pass failed again");
                } else {
                    tracing::warn!(%error, "dispatch pass failed; will retry");
                    failing = Some(error);
                }
            }
        }
        let waiting = vtp_core::JobFilter::new()
            .with_status(JobStatus::Queued)
            .with_launched(false)
            .with_page(1, 0);
        match state.jobs.list(&waiting).await {
            Ok(page) => metrics::gauge!("vtp_queue_waiting").set(page.total as f64),
            Err(e) => tracing::debug!(error = %error_chain(&e), "cannot count the waiting jobs"),
        }
        let _ = tokio::time::timeout(policy.interval, state.dispatch.notified()).await;
    }
}
