//! The relauncher: a job back in `queued` with nothing running it is handed
//! to its launcher again. That is a job whose runner was lost with attempts
//! left ([`vtp_core::JobStoreExt::end_attempt`]: a killed trainer, a backend
//! that restarted without its child), or one whose backend stopped between
//! moving it to `queued` and launching it.
//!
//! Launching is idempotent per job (a trainer that still holds the job
//! adopts it; a Kubernetes Job of that name is adopted), so a launch that is
//! merely slow costs a redundant call, never a second trainer. A launch the
//! launcher refuses as invalid fails the job; one it cannot make now is
//! tried again, until the sweeper fails the job as stale.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use chrono::Utc;
use vtp_core::{Error, JobFilter, JobId, JobStatus, JobStoreExt, Result};

use crate::AppState;
use crate::error::error_chain;

/// When and how often the relauncher acts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Time between passes.
    pub interval: Duration,
    /// How long a job must have been `queued` untouched before it is
    /// relaunched (the start request's own launch gets this long).
    pub settle: Duration,
    /// The least time between two relaunches of one job; doubled for each
    /// attempt the job has lost (up to 16 times), so an outage that
    /// outlasts one attempt does not use up the rest within a minute.
    pub backoff: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            interval: Duration::from_secs(1),
            settle: Duration::from_secs(2),
            backoff: Duration::from_secs(30),
        }
    }
}

/// One pass: relaunches every settled `queued` job its launcher does not
/// run, unless it was relaunched less than `policy.backoff` ago (per
/// `recent`). Returns how many it launched.
///
/// # Errors
/// Store errors while listing.
pub async fn relaunch_once(
    state: &AppState,
    policy: &Policy,
    recent: &mut HashMap<JobId, Instant>,
) -> Result<usize> {
    let cutoff = Utc::now() - chrono::Duration::from_std(policy.settle).unwrap_or_default();
    let page = state
        .jobs
        .list(
            &JobFilter::new()
                .with_status(JobStatus::Queued)
                .with_updated_before(cutoff)
                .with_page(JobFilter::MAX_LIMIT, 0),
        )
        .await?;
    let backoff_for = |lost: usize| policy.backoff.saturating_mul(1 << lost.min(4));
    recent.retain(|_, at| at.elapsed() < backoff_for(4));
    let mut launched = 0;
    for job in page.jobs {
        let wait = backoff_for(job.attempts.len().saturating_sub(1));
        if recent.get(&job.id).is_some_and(|at| at.elapsed() < wait) {
            continue;
        }
        match state.launcher.is_running(job.id).await {
            Ok(true) => continue,
            Ok(false) => {}
            Err(e) => {
                tracing::debug!(job_id = %job.id, error = %error_chain(&e), "relaunch: cannot ask the launcher; later");
                continue;
            }
        }
        let secret = match launch_secret(state, job.id).await {
            Ok(secret) => secret,
            Err(e) => {
                tracing::warn!(job_id = %job.id, error = %error_chain(&e), "relaunch: cannot read or store the callback secret; later");
                continue;
            }
        };
        // Launch from the job as it is now, not as listed: a cancel, the
        // sweeper or the start handler may have moved it meanwhile.
        let job = match state.jobs.get(job.id).await {
            Ok(now) if now.status == JobStatus::Queued && now.revision == job.revision => now,
            Ok(_) => continue,
            Err(e) => {
                tracing::debug!(job_id = %job.id, error = %error_chain(&e), "relaunch: cannot re-read the job; later");
                continue;
            }
        };
        recent.insert(job.id, Instant::now());
        match state.launch(&job, secret).await {
            Ok(()) => {
                tracing::info!(job_id = %job.id, attempt = job.attempt, resume_from = ?job.last_checkpoint_s3_uri, "relaunched");
                metrics::counter!("vtp_relaunches_total").increment(1);
                launched += 1;
                state.stop_if_ended_during_launch(job.id).await;
            }
            Err(e @ Error::InvalidInput { .. }) => {
                let reason = format!("relaunch refused: {}", error_chain(&e));
                tracing::warn!(job_id = %job.id, %reason);
                let failed = state
                    .jobs
                    .transition_with(job.id, JobStatus::Queued, JobStatus::Failed, |job| {
                        job.error = Some(reason.clone());
                    })
                    .await;
                if let Err(e) = failed {
                    tracing::debug!(job_id = %job.id, error = %error_chain(&e), "the job moved on meanwhile");
                }
            }
            Err(e) => {
                tracing::warn!(job_id = %job.id, error = %error_chain(&e), "relaunch failed; will retry");
            }
        }
    }
    Ok(launched)
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

/// Runs [`relaunch_once`] every `policy.interval` until the task is dropped.
pub async fn run(state: AppState, policy: Policy) {
    let mut tick = tokio::time::interval(policy.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut recent = HashMap::new();
    loop {
        tick.tick().await;
        if let Err(e) = relaunch_once(&state, &policy, &mut recent).await {
            tracing::warn!(error = %error_chain(&e), "relaunch pass failed; will retry");
        }
    }
}
