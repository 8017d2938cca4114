//! What `/health` and `/metrics` say about the store, read by one task
//! every few seconds rather than by every caller: an anonymous flood of
//! either costs no database work.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use vtp_core::JobStatus;

use crate::AppState;
use crate::error::error_chain;

/// How often the probe reads the store.
pub const EVERY: Duration = Duration::from_secs(5);
/// How long one reading may take before the store counts as down.
const TIMEOUT: Duration = Duration::from_secs(3);
/// A reading older than this is not trusted (no probe is running, as
/// when the router is used without [`crate::serve`]).
const STALE: Duration = Duration::from_secs(15);

/// The last reading of the store.
#[derive(Debug, Default)]
pub struct Probe {
    last: Mutex<Option<(bool, Instant)>>,
    reading: tokio::sync::Mutex<()>,
}

impl Probe {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<(bool, Instant)>> {
        self.last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Reads the store now: whether it answers, and (for the seed's
    /// `active_training_jobs`) how many jobs are queued, running or being
    /// cancelled. Returns whether it answered.
    pub async fn read(&self, state: &AppState) -> bool {
        let _reading = self.reading.lock().await;
        let answered = tokio::time::timeout(TIMEOUT, async {
            state.jobs.ping().await?;
            let mut active = 0;
            for status in [JobStatus::Queued, JobStatus::Running, JobStatus::Cancelling] {
                let filter = vtp_core::JobFilter::new()
                    .with_status(status)
                    .with_page(1, 0);
                active += state.jobs.list(&filter).await?.total;
            }
            metrics::gauge!("active_training_jobs").set(active as f64);
            Ok::<_, vtp_core::Error>(())
        })
        .await;
        let ok = match answered {
            Ok(Ok(())) => true,
            Ok(Err(e)) => {
                tracing::warn!(error = %error_chain(&e), "health: the job store does not answer");
                false
            }
            Err(_) => {
                tracing::warn!(timeout = ?TIMEOUT, "health: the job store did not answer in time");
                false
            }
        };
        *self.lock() = Some((ok, Instant::now()));
        ok
    }

    /// Whether the store answered at the last reading; a stale reading is
    /// renewed first, by one caller at a time (the others take the old).
    pub async fn store_ok(&self, state: &AppState) -> bool {
        let last = *self.lock();
        match last {
            Some((ok, at)) if at.elapsed() < STALE => ok,
            _ if self.reading.try_lock().is_err() => last.is_none_or(|(ok, _)| ok),
            _ => self.read(state).await,
        }
    }
}

/// Reads the store every [`EVERY`] until the task is dropped.
pub async fn run(state: AppState) {
    let mut tick = tokio::time::interval(EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        state.probe.read(&state).await;
    }
}
