//! The queue's order, as one pure function: which waiting job runs next.
//!
//! A job the backend has started waits in `queued` for capacity (a slot of
//! its launcher) for as long as that takes. When a slot frees, the job that
//! runs next is decided by, in turn:
//!
//! 1. **priority**, highest first ([`Job::priority`]);
//! 2. **fair share**: the owner with the fewest jobs holding a slot
//!    ([`Job::holds_slot`]), counting the owner's own waiting jobs ahead of
//!    this one as if they held one too; so two users who each start ten
//!    jobs alternate, and a user with three jobs running waits behind one
//!    with none;
//! 3. **age**: the oldest start ([`Job::queued_at`]), then the id.
//!
//! Stores compute the same order in SQL ([`crate::JobStore::queue`]); this
//! function is the in-memory store's and the reference the conformance
//! suite holds every store to.

use std::collections::HashMap;

use chrono::{DateTime, Utc};

use crate::job::{Job, JobId};

/// A waiting job's place in the order: smaller runs first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct QueueKey {
    /// The negated priority (highest first).
    neg_priority: i64,
    /// Slots its owner holds plus its rank among the owner's waiting jobs.
    share: u64,
    /// When it was started.
    queued_at: Option<DateTime<Utc>>,
    /// Ties.
    id: JobId,
}

/// The waiting jobs in the order they are to run, given how many slots
/// each owner's jobs hold now (`held`; owners not named hold none).
pub fn queue_order(mut waiting: Vec<Job>, held: &HashMap<String, u64>) -> Vec<Job> {
    // Each owner's jobs in their own order: priority, then age.
    waiting.sort_by_key(|job| {
        (
            job.user_id.clone(),
            -i64::from(job.priority),
            job.queued_at,
            job.id,
        )
    });
    let mut rank: HashMap<String, u64> = HashMap::new();
    let mut keyed: Vec<(QueueKey, Job)> = waiting
        .into_iter()
        .map(|job| {
            let rank = rank.entry(job.user_id.clone()).or_default();
            *rank += 1;
            let key = QueueKey {
                neg_priority: -i64::from(job.priority),
                share: held.get(&job.user_id).copied().unwrap_or(0) + *rank,
                queued_at: job.queued_at,
                id: job.id,
            };
            (key, job)
        })
        .collect();
    keyed.sort_by_key(|(key, _)| *key);
    keyed.into_iter().map(|(_, job)| job).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::NewJob;
    use crate::status::JobStatus;

    fn waiting(user: &str, priority: i32, second: i64) -> Job {
        let mut job = NewJob {
            user_id: user.into(),
            model_name: "small_cnn".into(),
            framework: "tch".into(),
            dataset_s3_uri: "s3://b/d.zip".into(),
            config: serde_json::json!({}),
            priority,
        }
        .into_job()
        .unwrap();
        job.transition(JobStatus::Queued).unwrap();
        job.queued_at = DateTime::from_timestamp(1_800_000_000 + second, 0);
        job
    }

    fn order(jobs: Vec<Job>, held: &[(&str, u64)]) -> Vec<(String, i64)> {
        let held = held.iter().map(|(u, n)| ((*u).to_owned(), *n)).collect();
        queue_order(jobs, &held)
            .into_iter()
            .map(|job| {
                (
                    job.user_id.clone(),
                    job.queued_at.unwrap().timestamp() - 1_800_000_000,
                )
            })
            .collect()
    }

    #[test]
    fn owners_alternate_and_the_oldest_goes_first_among_equals() {
        let jobs = vec![
            waiting("alice", 0, 0),
            waiting("alice", 0, 1),
            waiting("alice", 0, 2),
            waiting("bob", 0, 3),
            waiting("bob", 0, 4),
        ];
        let names = |o: Vec<(String, i64)>| {
            o.into_iter()
                .map(|(u, s)| format!("{u}{s}"))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            names(order(jobs.clone(), &[])),
            ["alice0", "bob3", "alice1", "bob4", "alice2"]
        );
        // Alice holds two slots already: Bob's jobs go first.
        assert_eq!(
            names(order(jobs, &[("alice", 2)])),
            ["bob3", "bob4", "alice0", "alice1", "alice2"]
        );
    }

    #[test]
    fn priority_comes_before_fair_share() {
        let jobs = vec![
            waiting("alice", 0, 0),
            waiting("bob", 0, 1),
            waiting("alice", 5, 2),
            waiting("carol", -1, 3),
        ];
        let got = order(jobs, &[("alice", 3)]);
        assert_eq!(
            got,
            [
                ("alice".into(), 2),
                ("bob".into(), 1),
                ("alice".into(), 0),
                ("carol".into(), 3)
            ]
        );
    }
}
