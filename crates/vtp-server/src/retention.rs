//! Deleting jobs, and keeping finished ones only as long as the operator
//! says.
//!
//! A job is deleted in two phases, so a crash between them loses nothing
//! and leaves nothing behind:
//!
//! 1. **Tombstone**: `deleted_at` is set (a compare-and-set; only a
//!    finished job may be deleted). From then on the job answers 404
//!    everywhere and is in no listing.
//! 2. **Purge**: its objects under `jobs/{id}/` (checkpoints, checkpoint
//!    sets) are deleted, an object already gone being no error, then its
//!    rows (the job, its events, metrics and callback secret).
//!
//! The delete request does both at once; a purge cut short (an outage, a
//! crash) is finished by the leader's pass here, which looks for tombstones
//! every [`Policy::interval`]. The same pass tombstones jobs that finished
//! longer ago than [`Policy::keep_finished`] (`VTP_RETENTION_DAYS`, when
//! set) and removes staged uploads a crash left behind.

use std::time::Duration;

use chrono::{DateTime, Utc};
use vtp_core::{Error, Job, JobFilter, JobId, JobPages, JobStoreExt, Result};

use crate::AppState;
use crate::error::error_chain;

/// What retention does and how often.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Time between passes.
    pub interval: Duration,
    /// How long a finished job (with its checkpoints) is kept after it
    /// finished; `None` keeps it until its owner deletes it.
    pub keep_finished: Option<Duration>,
    /// How long a staged upload (`uploads/tmp/`) may stay: only a crash
    /// mid-upload leaves one.
    pub keep_staged: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            interval: Duration::from_secs(60),
            keep_finished: None,
            keep_staged: Duration::from_secs(24 * 3600),
        }
    }
}

/// Phase 1: marks finished job `id` deleted.
///
/// # Errors
/// [`Error::Conflict`] for a job not finished (cancel it first); store errors.
pub async fn tombstone(state: &AppState, id: JobId) -> Result<Job> {
    state
        .jobs
        .update_with(id, |job| {
            if !job.status.is_terminal() {
                return Err(Error::conflict(format!(
                    "job {id} is {}; only a finished job can be deleted (cancel it first)",
                    job.status
                )));
            }
            if job.deleted_at.is_some() {
                return Ok(None);
            }
            let mut next = job.clone();
            next.deleted_at = Some(vtp_core::job::now());
            next.updated_at = vtp_core::job::now();
            Ok(Some(next))
        })
        .await
}

/// Phase 2: deletes the tombstoned job's objects, then its rows.
/// Idempotent: objects or rows already gone are no error.
///
/// # Errors
/// Blob or store errors (the leader's pass tries again).
pub async fn purge(state: &AppState, id: JobId) -> Result<()> {
    let prefix = vtp_core::layout::job_prefix(id);
    for object in state.blobs.list(Some(&prefix)).await? {
        match state.blobs.delete(&object.key).await {
            Ok(()) | Err(Error::NotFound { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    crate::crash_point("purge-after-objects").await;
    state.jobs.delete(id).await?;
    state.known_jobs.forget(id);
    metrics::counter!("vtp_jobs_purged_total").increment(1);
    tracing::info!(job_id = %id, "job deleted with its objects and rows");
    Ok(())
}

/// What one pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Retained {
    /// Jobs whose deletion was finished.
    pub purged: usize,
    /// Finished jobs past the retention, deleted.
    pub expired: usize,
    /// Staged uploads removed.
    pub staged: usize,
}

/// One pass as of `now`.
///
/// # Errors
/// Store errors while listing; a job or object that cannot be removed now
/// is logged and left to the next pass.
pub async fn retain_once(
    state: &AppState,
    policy: &Policy,
    now: DateTime<Utc>,
) -> Result<Retained> {
    let mut done = Retained::default();
    if let Some(keep) = policy.keep_finished {
        let cutoff = now - chrono::Duration::from_std(keep).unwrap_or(chrono::Duration::MAX);
        let filter = JobFilter::new()
            .with_finished_before(cutoff)
            .with_page(JobFilter::MAX_LIMIT, 0);
        let mut pages = JobPages::new(state.jobs.as_ref(), filter);
        while let Some(page) = pages.next().await? {
            for job in page {
                match tombstone(state, job.id).await {
                    Ok(_) => done.expired += 1,
                    Err(e) => {
                        tracing::warn!(job_id = %job.id, error = %error_chain(&e), "retention: cannot delete an expired job")
                    }
                }
            }
        }
    }
    let mut pages = JobPages::new(
        state.jobs.as_ref(),
        JobFilter::new()
            .deleted_only()
            .with_page(JobFilter::MAX_LIMIT, 0),
    );
    while let Some(page) = pages.next().await? {
        for job in page {
            match purge(state, job.id).await {
                Ok(()) => done.purged += 1,
                Err(e) => {
                    tracing::warn!(job_id = %job.id, error = %error_chain(&e), "retention: cannot finish a deletion; next pass")
                }
            }
        }
    }
    let staging = vtp_core::layout::staging_prefix();
    let cutoff =
        now - chrono::Duration::from_std(policy.keep_staged).unwrap_or(chrono::Duration::MAX);
    match state.blobs.list(Some(&staging)).await {
        Ok(objects) => {
            for object in objects.into_iter().filter(|o| o.last_modified < cutoff) {
                match state.blobs.delete(&object.key).await {
                    Ok(()) | Err(Error::NotFound { .. }) => done.staged += 1,
                    Err(e) => {
                        tracing::debug!(key = %object.key, error = %error_chain(&e), "retention: cannot remove a staged upload")
                    }
                }
            }
        }
        Err(e) => {
            tracing::debug!(error = %error_chain(&e), "retention: cannot list staged uploads")
        }
    }
    Ok(done)
}

/// Runs [`retain_once`] every `policy.interval` until the task is dropped.
pub async fn run(state: AppState, policy: Policy) {
    let mut tick = tokio::time::interval(policy.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match retain_once(&state, &policy, Utc::now()).await {
            Ok(done) if done != Retained::default() => tracing::info!(?done, "retention pass"),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %error_chain(&e), "retention pass failed; will retry"),
        }
    }
}
