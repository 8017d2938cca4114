//! A model-based check of a [`JobStore`]: random histories of what the
//! platform does to jobs (start, trainer reports current and stale,
//! replays, heartbeats, cancels, runners lost and seen lost twice,
//! interrupted attempts, a backend restart) run against the store, and
//! after every step the invariants are checked on what it holds:
//!
//! - nothing leaves a final state, and nothing about a final job changes;
//! - every status change is one the status table allows;
//! - progress, `last_seq` and `attempt` never go backwards; a job never
//!   runs more attempts than it allows, and each ended attempt is recorded
//!   once;
//! - every epoch the store accepted a report of is recorded exactly once,
//!   and no other.
//!
//! Histories are generated and shrunk by `proptest`: a failure names the
//! shortest history that breaks an invariant.
#![allow(missing_docs, clippy::missing_panics_doc)]

use std::collections::BTreeSet;
use std::sync::Arc;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

use crate::job::{Job, JobId, NewJob};
use crate::job_store::{JobStore, JobStoreExt};
use crate::report::TrainingReport;
use crate::status::JobStatus;

/// Jobs per history.
const JOBS: usize = 3;

/// One thing that happens to job `job % JOBS`.
#[derive(Debug, Clone)]
pub enum Op {
    /// The user starts it (`pending` -> `queued`).
    Start { job: usize },
    /// Its trainer reports.
    Report {
        job: usize,
        /// 0: the current attempt; 1: the one before (a trainer given up on).
        attempts_back: i32,
        /// Added to the job's `last_seq`: 0 or less is a replay or an
        /// older report.
        seq_step: i64,
        status: JobStatus,
        progress: u8,
        epoch: Option<u32>,
    },
    /// A heartbeat of the current attempt: `running`, step progress.
    Heartbeat { job: usize, progress: u8 },
    /// The trainer says its host stopped it (a retryable failure).
    Interrupted { job: usize, epoch: Option<u32> },
    /// The user cancels it (`cancelling`).
    Cancel { job: usize },
    /// Its runner is found lost (a child exit, an expired lease), possibly
    /// by a second watcher naming an attempt already ended.
    RunnerLost { job: usize, attempts_back: i32 },
    /// The backend restarts and finds no runner for any active job.
    Restart,
}

fn op() -> impl Strategy<Value = Op> {
    let job = 0..JOBS;
    let status = prop_oneof![
        4 => Just(JobStatus::Running),
        1 => Just(JobStatus::Completed),
        1 => Just(JobStatus::Failed),
        1 => Just(JobStatus::Cancelled),
    ];
    prop_oneof![
        3 => job.clone().prop_map(|job| Op::Start { job }),
        8 => (job.clone(), 0..2i32, -2..4i64, status, 0..=100u8, proptest::option::of(1..6u32))
            .prop_map(|(job, attempts_back, seq_step, status, progress, epoch)| Op::Report {
                job, attempts_back, seq_step, status, progress, epoch,
            }),
        3 => (job.clone(), 0..=100u8).prop_map(|(job, progress)| Op::Heartbeat { job, progress }),
        2 => (job.clone(), proptest::option::of(1..6u32))
            .prop_map(|(job, epoch)| Op::Interrupted { job, epoch }),
        1 => job.clone().prop_map(|job| Op::Cancel { job }),
        2 => (job, 0..2i32).prop_map(|(job, attempts_back)| Op::RunnerLost { job, attempts_back }),
        1 => Just(Op::Restart),
    ]
}

/// What the store must hold for one job, beyond what its own fields say.
#[derive(Debug, Clone)]
struct Expected {
    job: Job,
    /// Epochs of reports the store accepted.
    epochs: BTreeSet<u32>,
}

/// Runs 48 random histories (shrinking any that fails) against `store`.
///
/// # Panics
/// With the shortest failing history and the invariant it broke.
pub async fn random_histories_keep_the_invariants(store: Arc<dyn JobStore>) {
    let handle = tokio::runtime::Handle::current();
    tokio::task::block_in_place(|| {
        let mut runner = TestRunner::new(Config {
            cases: 48,
            failure_persistence: None,
            ..Config::default()
        });
        let histories = (
            proptest::collection::vec(0..3i32, JOBS),
            proptest::collection::vec(op(), 1..40),
        );
        let result = runner.run(&histories, |(max_attempts, ops)| {
            handle
                .block_on(run_history(store.as_ref(), &max_attempts, &ops))
                .map_err(TestCaseError::fail)
        });
        if let Err(e) = result {
            panic!("{e}");
        }
    });
}

async fn run_history(store: &dyn JobStore, max_attempts: &[i32], ops: &[Op]) -> Result<(), String> {
    let mut expected = Vec::new();
    for max in max_attempts {
        let job = store
            .create_job(NewJob {
                user_id: "model".into(),
                model_name: "resnet18".into(),
                framework: "tch".into(),
                dataset_s3_uri: "s3://datasets/d/".into(),
                config: serde_json::json!({"epochs": 5, "max_attempts": max + 1}),
                priority: 0,
            })
            .await
            .map_err(|e| e.to_string())?;
        expected.push(Expected {
            job,
            epochs: BTreeSet::new(),
        });
    }
    for (step, op) in ops.iter().enumerate() {
        let before: Vec<Job> = expected.iter().map(|e| e.job.clone()).collect();
        let outcome = apply(store, &mut expected, op).await;
        for (e, before) in expected.iter_mut().zip(&before) {
            let now = store.get(before.id).await.map_err(|e| e.to_string())?;
            check(before, &now).map_err(|why| {
                format!("after step {step} ({op:?}): {why}\nbefore: {before:?}\nnow: {now:?}")
            })?;
            match outcome {
                Some(Outcome::Untouched(id)) if id == before.id && now != *before => {
                    return Err(format!(
                        "after step {step} ({op:?}): a replay, a superseded attempt's report or a loss seen twice changed the job\nbefore: {before:?}\nnow: {now:?}"
                    ));
                }
                Some(Outcome::Becomes(id, status, attempt))
                    if id == before.id && (now.status, now.attempt) != (status, attempt) =>
                {
                    return Err(format!(
                        "after step {step} ({op:?}): expected {status} on attempt {attempt}\nbefore: {before:?}\nnow: {now:?}"
                    ));
                }
                _ => {}
            }
            let metrics = store.metrics(now.id).await.map_err(|e| e.to_string())?;
            let recorded: BTreeSet<u32> = metrics.iter().map(|m| m.epoch).collect();
            let rows = metrics.len();
            if recorded != e.epochs || rows != recorded.len() {
                return Err(format!(
                    "after step {step} ({op:?}): epochs recorded {recorded:?} ({rows} rows), accepted {:?}",
                    e.epochs
                ));
            }
            e.job = now;
        }
    }
    Ok(())
}

/// What a step must do to one job, beyond the invariants.
#[derive(Debug, Clone, Copy)]
enum Outcome {
    /// Leave it exactly as it was: it was sent a replay, a report of an
    /// attempt it has moved past, or told again of the loss of an attempt
    /// already ended.
    Untouched(JobId),
    /// Move it to this status and attempt.
    Becomes(JobId, JobStatus, i32),
}

/// Does `op` through the store's public operations, noting the epochs of
/// the reports it accepts; returns what it must have done to one job.
async fn apply(store: &dyn JobStore, expected: &mut [Expected], op: &Op) -> Option<Outcome> {
    let at = |job: usize| job % JOBS;
    match op {
        Op::Start { job } => {
            let id = expected[at(*job)].job.id;
            let _ = store
                .transition(id, JobStatus::Pending, JobStatus::Queued)
                .await;
            None
        }
        Op::Report {
            job,
            attempts_back,
            seq_step,
            status,
            progress,
            epoch,
        } => {
            let e = &mut expected[at(*job)];
            let seq = (e.job.last_seq + seq_step).max(1);
            let attempt = (e.job.attempt - attempts_back).max(1);
            let stale = seq <= e.job.last_seq || attempt < e.job.attempt;
            let mut update = TrainingReport::new(*status)
                .with_seq(seq)
                .with_attempt(attempt)
                .with_progress(f64::from(*progress) / 100.0);
            if *status == JobStatus::Failed {
                update = update.with_error("boom");
            }
            if let Some(epoch) = epoch {
                update = update
                    .with_metric("epoch", f64::from(*epoch))
                    .with_metric("loss", 1.0 / f64::from(*epoch));
            }
            if store.apply_report(e.job.id, &update).await.is_ok()
                && let Some(epoch) = epoch
            {
                e.epochs.insert(*epoch);
            }
            stale.then_some(Outcome::Untouched(e.job.id))
        }
        Op::Heartbeat { job, progress } => {
            let e = &expected[at(*job)];
            let update = TrainingReport::new(JobStatus::Running)
                .with_seq(e.job.last_seq + 1)
                .with_attempt(e.job.attempt.max(1))
                .with_progress(f64::from(*progress) / 100.0);
            let _ = store.apply_report(e.job.id, &update).await;
            None
        }
        Op::Interrupted { job, epoch } => {
            let e = &mut expected[at(*job)];
            let mut update = TrainingReport::new(JobStatus::Failed)
                .with_seq(e.job.last_seq + 1)
                .with_attempt(e.job.attempt.max(1))
                .with_error("stopped by its host")
                .as_retryable();
            if let Some(epoch) = epoch {
                update = update.with_metric("epoch", f64::from(*epoch));
            }
            if store.apply_report(e.job.id, &update).await.is_ok()
                && let Some(epoch) = epoch
            {
                e.epochs.insert(*epoch);
            }
            // An interruption relaunches a job under way while attempts are
            // left, fails it on its last, and cancels one being cancelled.
            let job = &e.job;
            match job.status {
                JobStatus::Queued | JobStatus::Running if job.attempt < job.max_attempts() => {
                    Some(Outcome::Becomes(job.id, JobStatus::Queued, job.attempt + 1))
                }
                JobStatus::Queued | JobStatus::Running => {
                    Some(Outcome::Becomes(job.id, JobStatus::Failed, job.attempt))
                }
                JobStatus::Cancelling => {
                    Some(Outcome::Becomes(job.id, JobStatus::Cancelled, job.attempt))
                }
                status if status.is_terminal() => Some(Outcome::Untouched(job.id)),
                _ => None,
            }
        }
        Op::Cancel { job } => {
            let job = &expected[at(*job)].job;
            let to = if job.status == JobStatus::Pending {
                JobStatus::Cancelled
            } else {
                JobStatus::Cancelling
            };
            let _ = store.transition(job.id, job.status, to).await;
            None
        }
        Op::RunnerLost { job, attempts_back } => {
            let job = &expected[at(*job)].job;
            let _ = store
                .end_attempt(job.id, job.attempt - attempts_back, "lost")
                .await;
            (*attempts_back > 0).then_some(Outcome::Untouched(job.id))
        }
        // As `recover` does: a queued job lost no runner.
        Op::Restart => {
            for e in expected.iter() {
                if matches!(e.job.status, JobStatus::Running | JobStatus::Cancelling) {
                    let _ = store
                        .end_attempt(e.job.id, e.job.attempt, "the backend restarted")
                        .await;
                }
            }
            None
        }
    }
}

/// The invariants between two readings of one job.
fn check(before: &Job, now: &Job) -> Result<(), String> {
    if before.status.is_terminal() {
        if now != before {
            return Err("a final job changed".into());
        }
        return Ok(());
    }
    if now.status != before.status && !before.status.can_transition_to(now.status) {
        return Err(format!(
            "illegal transition {} -> {}",
            before.status, now.status
        ));
    }
    if now.progress < before.progress {
        return Err("progress went backwards".into());
    }
    if now.last_seq < before.last_seq {
        return Err("last_seq went backwards".into());
    }
    if now.attempt < before.attempt {
        return Err("the attempt number went backwards".into());
    }
    if now.attempt > now.max_attempts() {
        return Err(format!(
            "attempt {} of at most {}",
            now.attempt,
            now.max_attempts()
        ));
    }
    // One record per ended attempt: each one after the first started
    // because the one before ended; the last may have ended the job.
    let started = usize::try_from(now.attempt.max(0)).unwrap_or_default();
    let recorded = now.attempts.len();
    let fits = |n: usize| recorded == n.min(Job::ATTEMPT_HISTORY);
    if !(fits(started.saturating_sub(1)) || (now.status == JobStatus::Failed && fits(started))) {
        return Err(format!(
            "{recorded} ended attempts recorded on attempt {}",
            now.attempt
        ));
    }
    Ok(())
}
