//! The work only one backend does at a time, on the elected leader
//! ([`vtp_core::LeaderElector`]: a Postgres advisory lock when the backends
//! share Postgres; the one process, on SQLite or in memory).
//!
//! Every backend serves every route. The leader also runs, until its term
//! ends:
//!
//! 1. [`crate::recover`], once, when it becomes leader: jobs a runner held
//!    under the previous leader are adopted, relaunched or put back to wait;
//! 2. the queue's dispatcher ([`crate::queue`]);
//! 3. the stale-job sweeper ([`crate::sweeper`]);
//! 4. the launcher's reconciler ([`vtp_core::TrainerLauncher::reconcile`]);
//! 5. retention ([`crate::retention`]): deletions, expired jobs, stale
//!    uploads.
//!
//! A follower asks to lead every [`ELECTION_RETRY`]; when the leader dies
//! (its database connection closes, and with it the lock) one takes over
//! within about that.

use std::time::Duration;

use crate::AppState;
use crate::error::error_chain;

/// How often a follower asks to lead.
pub const ELECTION_RETRY: Duration = Duration::from_secs(1);

/// How the leader's duties run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Duties {
    /// The sweeper's limits.
    pub sweep: crate::sweeper::SweepPolicy,
    /// The dispatcher's.
    pub queue: crate::queue::Policy,
    /// Time between the launcher's reconcile passes.
    pub reconcile_every: Duration,
    /// Retention's.
    pub retention: crate::retention::Policy,
}

/// Runs for leadership, and the leader's duties while this backend leads,
/// until the task is dropped.
pub async fn run(state: AppState, duties: Duties) {
    loop {
        let term = match state.leader.try_acquire().await {
            Ok(Some(term)) => term,
            Ok(None) => {
                tokio::time::sleep(ELECTION_RETRY).await;
                continue;
            }
            Err(e) => {
                tracing::warn!(error = %error_chain(&e), "cannot run for leader; trying again");
                tokio::time::sleep(ELECTION_RETRY).await;
                continue;
            }
        };
        lead(&state, &duties, term).await;
    }
}

/// One term: recovers, then runs the duties until the term ends.
async fn lead(state: &AppState, duties: &Duties, mut term: Box<dyn vtp_core::LeaderTerm>) {
    tracing::info!("this backend leads: it dispatches, sweeps, reconciles and keeps retention");
    metrics::gauge!("vtp_leader").set(1.0);
    match crate::recover(state).await {
        Ok((adopted, ended)) if adopted + ended > 0 => {
            tracing::info!(adopted, ended, "recovered the jobs of the previous leader")
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %error_chain(&e), "could not recover earlier jobs"),
    }
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(crate::queue::run(state.clone(), duties.queue));
    tasks.spawn(crate::sweeper::run(
        state.jobs.clone(),
        state.launcher.clone(),
        duties.sweep,
    ));
    tasks.spawn(reconcile(state.clone(), duties.reconcile_every));
    tasks.spawn(crate::retention::run(state.clone(), duties.retention));
    term.lost().await;
    tasks.abort_all();
    metrics::gauge!("vtp_leader").set(0.0);
    tracing::warn!("this backend no longer leads");
}

/// The launcher's upkeep every `every`.
async fn reconcile(state: AppState, every: Duration) {
    let mut tick = tokio::time::interval(every.max(Duration::from_millis(100)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Err(e) = state.launcher.reconcile().await {
            tracing::warn!(error = %error_chain(&e), "reconcile failed; trying again");
        }
    }
}
