//! The [`JobStore`] conformance cases.
#![allow(missing_docs, clippy::missing_panics_doc)]

use std::sync::Arc;

use crate::job::{JobFilter, JobId, NewJob};
use crate::job_store::{Expected, JobStore, JobStoreExt};
use crate::status::JobStatus;
use crate::update::TrainingUpdate;
use crate::{Error, Job};

type Store = Arc<dyn JobStore>;

fn new_job(user: &str) -> NewJob {
    NewJob {
        user_id: user.into(),
        model_name: "resnet18".into(),
        framework: "tch".into(),
        dataset_s3_uri: "s3://datasets/test/my-dataset/".into(),
        config: serde_json::json!({"epochs": 3, "lr": 0.01, "resources": {"cpu": "2", "memory": "4Gi"}}),
    }
}

async fn running_job(store: &Store) -> Job {
    let job = store.create_job(new_job("runner")).await.unwrap();
    store
        .transition(job.id, JobStatus::Pending, JobStatus::Queued)
        .await
        .unwrap();
    store
        .transition(job.id, JobStatus::Queued, JobStatus::Running)
        .await
        .unwrap()
}

fn epoch(seq: i64, epoch: u32, loss: f64) -> TrainingUpdate {
    TrainingUpdate::new(JobStatus::Running)
        .with_seq(seq)
        .with_progress(f64::from(epoch) / 10.0)
        .with_metric("epoch", f64::from(epoch))
        .with_metric("loss", loss)
}

pub async fn create_then_get(store: Store) {
    let job = store.create_job(new_job("alice")).await.unwrap();
    let read = store.get(job.id).await.unwrap();
    assert_eq!(read, job, "a stored job reads back unchanged");
    assert_eq!(read.status, JobStatus::Pending);
    assert_eq!(read.config["resources"]["memory"], "4Gi");
}

pub async fn get_unknown_is_not_found(store: Store) {
    let err = store.get(JobId::new()).await.unwrap_err();
    assert!(
        matches!(err, Error::NotFound { kind: "job", .. }),
        "{err:?}"
    );
}

pub async fn create_twice_is_already_exists(store: Store) {
    let job = store.create_job(new_job("alice")).await.unwrap();
    let err = store.create(&job).await.unwrap_err();
    assert!(matches!(err, Error::AlreadyExists { .. }), "{err:?}");
}

pub async fn idempotency_keys_are_stored_and_unique_per_owner(store: Store) {
    let keyed = |user: &str, key: &str| {
        let new = new_job(user);
        let digest = new.digest();
        let mut job = new.into_job().unwrap();
        job.idempotency.create = Some(crate::KeyedRequest {
            key: key.into(),
            digest,
        });
        job
    };
    let first = keyed("alice", "key-1");
    store.create(&first).await.unwrap();
    assert_eq!(store.get(first.id).await.unwrap(), first);
    let found = store.find_created_with_key("alice", "key-1").await.unwrap();
    assert_eq!(found.as_ref(), Some(&first), "found by owner and key");
    assert_eq!(
        store.find_created_with_key("bob", "key-1").await.unwrap(),
        None
    );
    assert_eq!(
        store.find_created_with_key("alice", "key-2").await.unwrap(),
        None
    );
    // The same owner and key again (a concurrent retry): refused, nothing stored.
    let again = keyed("alice", "key-1");
    let err = store.create(&again).await.unwrap_err();
    assert!(matches!(err, Error::AlreadyExists { .. }), "{err:?}");
    assert!(matches!(
        store.get(again.id).await,
        Err(Error::NotFound { .. })
    ));
    // Another owner's key space is their own; unkeyed jobs never collide.
    store.create(&keyed("bob", "key-1")).await.unwrap();
    store.create_job(new_job("alice")).await.unwrap();
    store.create_job(new_job("alice")).await.unwrap();
    // The start key is written with the transition that queues the job.
    let started = store
        .transition_with(first.id, JobStatus::Pending, JobStatus::Queued, |job| {
            job.idempotency.start = Some("start-1".into());
        })
        .await
        .unwrap();
    assert_eq!(started.idempotency.start.as_deref(), Some("start-1"));
    let read = store.get(first.id).await.unwrap();
    assert_eq!(read.idempotency, started.idempotency);
    assert_eq!(read.idempotency.create, first.idempotency.create);
}

pub async fn list_filters_pages_and_orders(store: Store) {
    let mut alice = Vec::new();
    for _ in 0..4 {
        alice.push(store.create_job(new_job("alice")).await.unwrap());
    }
    // A name no owner can have (a NUL) lists nobody's jobs; it is no error.
    let nobody = store
        .list(&JobFilter::new().with_user("alice\0"))
        .await
        .unwrap();
    assert!(nobody.jobs.is_empty() && nobody.total == 0, "{nobody:?}");
    let bob = store.create_job(new_job("bob")).await.unwrap();
    store
        .transition(alice[1].id, JobStatus::Pending, JobStatus::Queued)
        .await
        .unwrap();

    let all = store.list(&JobFilter::new()).await.unwrap();
    assert_eq!(all.total, 5);
    let ids: Vec<_> = all.jobs.iter().map(|j| j.id).collect();
    assert_eq!(ids[0], bob.id, "newest first");
    assert_eq!(ids[4], alice[0].id, "oldest last");

    let page = store
        .list(&JobFilter::new().with_user("alice").with_page(2, 1))
        .await
        .unwrap();
    assert_eq!(page.total, 4);
    assert_eq!(page.limit, 2);
    assert_eq!(page.offset, 1);
    let ids: Vec<_> = page.jobs.iter().map(|j| j.id).collect();
    assert_eq!(ids, vec![alice[2].id, alice[1].id]);

    let queued = store
        .list(&JobFilter::new().with_status(JobStatus::Queued))
        .await
        .unwrap();
    assert_eq!(queued.total, 1);
    assert_eq!(queued.jobs[0].id, alice[1].id);

    let nobody = store
        .list(&JobFilter::new().with_user("carol"))
        .await
        .unwrap();
    assert_eq!(nobody.total, 0);
    assert!(nobody.jobs.is_empty());

    let mut stale = JobFilter::new();
    stale.updated_before = Some(alice[1].created_at);
    let stale = store.list(&stale).await.unwrap();
    assert!(
        stale
            .jobs
            .iter()
            .all(|j| j.updated_at < alice[1].created_at)
    );
    assert!(stale.jobs.iter().any(|j| j.id == alice[0].id));
}

pub async fn transition_is_compare_and_set(store: Store) {
    let job = store.create_job(new_job("alice")).await.unwrap();
    let queued = store
        .transition(job.id, JobStatus::Pending, JobStatus::Queued)
        .await
        .unwrap();
    assert_eq!(queued.status, JobStatus::Queued);
    assert_eq!(queued.attempt, 1);
    assert_eq!(queued.revision, job.revision + 1);

    let err = store
        .transition(job.id, JobStatus::Pending, JobStatus::Queued)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Conflict { .. }), "{err:?}");

    let err = store
        .transition(job.id, JobStatus::Queued, JobStatus::Pending)
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Conflict { .. }),
        "illegal move: {err:?}"
    );

    store
        .transition_with(job.id, JobStatus::Queued, JobStatus::Failed, |j| {
            j.error = Some("launch failed".into());
        })
        .await
        .unwrap();
    let failed = store.get(job.id).await.unwrap();
    assert_eq!(failed.status, JobStatus::Failed);
    assert_eq!(failed.error.as_deref(), Some("launch failed"));
    assert!(failed.finished_at.is_some());
    for to in JobStatus::ALL {
        assert!(
            store
                .transition(job.id, JobStatus::Failed, to)
                .await
                .is_err(),
            "failed is final, even to {to}"
        );
    }
    let err = store
        .transition(JobId::new(), JobStatus::Pending, JobStatus::Queued)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::NotFound { .. }), "{err:?}");
}

pub async fn concurrent_transitions_have_one_winner(store: Store) {
    let job = store.create_job(new_job("alice")).await.unwrap();
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .transition(job.id, JobStatus::Pending, JobStatus::Queued)
                    .await
            })
        })
        .collect();
    let mut wins = 0;
    for task in tasks {
        match task.await.unwrap() {
            Ok(_) => wins += 1,
            Err(Error::Conflict { .. }) => {}
            Err(other) => panic!("a lost race is a conflict, got {other:?}"),
        }
    }
    assert_eq!(wins, 1, "exactly one start wins");
    assert_eq!(store.get(job.id).await.unwrap().attempt, 1);
}

pub async fn stale_revision_is_a_conflict(store: Store) {
    let job = store.create_job(new_job("alice")).await.unwrap();
    let mut first = job.clone();
    first.message = Some("first".into());
    store
        .compare_and_set(Expected::exactly(&job), &first, None)
        .await
        .unwrap();
    let mut second = job.clone();
    second.message = Some("second".into());
    let err = store
        .compare_and_set(Expected::exactly(&job), &second, None)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Conflict { .. }), "{err:?}");
    assert_eq!(
        store.get(job.id).await.unwrap().message.as_deref(),
        Some("first")
    );
}

pub async fn updates_are_idempotent_by_seq(store: Store) {
    let job = running_job(&store).await;
    let update = epoch(1, 1, 0.9);
    assert!(store.apply_update(job.id, &update).await.unwrap().applied());
    let after_first = store.get(job.id).await.unwrap();
    let again = store.apply_update(job.id, &update).await.unwrap();
    assert!(!again.applied());
    assert_eq!(
        store.get(job.id).await.unwrap(),
        after_first,
        "a replay changes nothing"
    );
    assert_eq!(store.metrics(job.id).await.unwrap().len(), 1);
}

pub async fn older_update_after_newer_changes_nothing(store: Store) {
    let job = running_job(&store).await;
    store
        .apply_update(job.id, &epoch(3, 3, 0.5).with_message("epoch 3"))
        .await
        .unwrap();
    let newer = store.get(job.id).await.unwrap();
    let outcome = store
        .apply_update(
            job.id,
            &TrainingUpdate::new(JobStatus::Running)
                .with_seq(2)
                .with_progress(0.2)
                .with_message("old"),
        )
        .await
        .unwrap();
    assert!(!outcome.applied());
    assert_eq!(store.get(job.id).await.unwrap(), newer);
    let late_failure = TrainingUpdate::new(JobStatus::Failed)
        .with_seq(1)
        .with_error("stale");
    assert!(
        !store
            .apply_update(job.id, &late_failure)
            .await
            .unwrap()
            .applied()
    );
    assert_eq!(store.get(job.id).await.unwrap().status, JobStatus::Running);
}

pub async fn reordered_epochs_are_all_recorded(store: Store) {
    let job = running_job(&store).await;
    for update in [
        epoch(2, 1, 0.9),
        epoch(4, 3, 0.5),
        epoch(3, 2, 0.7),
        epoch(2, 1, 0.9),
    ] {
        store.apply_update(job.id, &update).await.unwrap();
    }
    let metrics = store.metrics(job.id).await.unwrap();
    let epochs: Vec<_> = metrics.iter().map(|m| m.epoch).collect();
    assert_eq!(
        epochs,
        vec![1, 2, 3],
        "a late epoch is still recorded, once"
    );
    assert_eq!(metrics[1].values["loss"], 0.7);
    let job = store.get(job.id).await.unwrap();
    assert_eq!(job.last_seq, 4);
    assert!(
        (job.progress - 0.3).abs() < 1e-12,
        "progress is the newest event's"
    );
}

pub async fn terminal_job_refuses_updates(store: Store) {
    let job = running_job(&store).await;
    let done = TrainingUpdate::new(JobStatus::Completed)
        .with_seq(1)
        .with_checkpoint("s3://bucket/jobs/x/best.safetensors");
    let completed = store.apply_update(job.id, &done).await.unwrap();
    assert_eq!(completed.job().status, JobStatus::Completed);
    assert_eq!(completed.job().progress, 1.0);
    let before = store.get(job.id).await.unwrap();
    for status in [JobStatus::Running, JobStatus::Failed, JobStatus::Completed] {
        let err = store
            .apply_update(job.id, &TrainingUpdate::new(status).with_seq(2))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Conflict { .. }), "{status}: {err:?}");
    }
    assert_eq!(store.get(job.id).await.unwrap(), before);
}

pub async fn metrics_are_ordered_and_upserted(store: Store) {
    let job = running_job(&store).await;
    for (e, loss) in [(3, 0.3), (1, 0.9), (2, 0.6)] {
        let update = TrainingUpdate::new(JobStatus::Running)
            .with_metric("epoch", f64::from(e))
            .with_metric("loss", loss)
            .with_metric("accuracy", 1.0 - loss);
        store.apply_update(job.id, &update).await.unwrap();
    }
    // The same values again (a resumed attempt re-reporting its set's
    // epoch) keep the row as it was recorded.
    let kept = store.metrics(job.id).await.unwrap();
    let again = TrainingUpdate::new(JobStatus::Running)
        .with_metric("epoch", 1.0)
        .with_metric("loss", 0.9)
        .with_metric("accuracy", 1.0 - 0.9);
    store.apply_update(job.id, &again).await.unwrap();
    assert_eq!(store.metrics(job.id).await.unwrap(), kept);
    let rerun = TrainingUpdate::new(JobStatus::Running)
        .with_metric("epoch", 2.0)
        .with_metric("loss", 0.55);
    store.apply_update(job.id, &rerun).await.unwrap();
    let metrics = store.metrics(job.id).await.unwrap();
    let epochs: Vec<_> = metrics.iter().map(|m| m.epoch).collect();
    assert_eq!(epochs, vec![1, 2, 3]);
    assert_eq!(
        metrics[1].values["loss"], 0.55,
        "a newer report of an epoch replaces it"
    );
    assert_eq!(metrics[0].values["accuracy"], 1.0 - 0.9);
    assert!(metrics.iter().all(|m| m.job_id == job.id));
}

pub async fn concurrent_updates_apply_once_each(store: Store) {
    let job = running_job(&store).await;
    let tasks: Vec<_> = (1..=10)
        .flat_map(|seq| [seq, seq])
        .map(|seq| {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .apply_update(job.id, &epoch(seq, seq as u32, 1.0 / seq as f64))
                    .await
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    let job = store.get(job.id).await.unwrap();
    assert_eq!(job.last_seq, 10);
    assert_eq!(store.metrics(job.id).await.unwrap().len(), 10);
}

pub async fn updates_from_a_known_version_are_checked(store: Store) {
    let job = running_job(&store).await;
    // Current: the read is skipped and the write lands. The known version
    // may leave out the config (a report never writes it).
    let mut slim = job.clone();
    slim.config = serde_json::Value::Null;
    let first = store
        .apply_update_from(job.id, &epoch(1, 1, 0.9), Some(slim))
        .await
        .unwrap();
    assert!(first.applied());
    assert_eq!(first.job(), &store.get(job.id).await.unwrap());
    assert_eq!(first.job().config, job.config);
    assert_eq!(first.job().revision, job.revision + 1);
    // Outdated: the compare-and-set loses, the job is re-read, the write lands once.
    let second = store
        .apply_update_from(job.id, &epoch(2, 2, 0.5), Some(job.clone()))
        .await
        .unwrap();
    assert!(second.applied());
    assert_eq!(second.job().last_seq, 2);
    assert_eq!(second.job().revision, job.revision + 2);
    // A replay that the outdated version would apply is a duplicate of the stored job.
    let replay = store
        .apply_update_from(job.id, &epoch(1, 1, 0.9), Some(job.clone()))
        .await
        .unwrap();
    assert!(!replay.applied());
    assert_eq!(replay.job(), second.job());
    // A version that would refuse the report (a finished job) is checked against the store.
    let mut finished = second.job().clone();
    finished.set_status(JobStatus::Completed);
    let third = store
        .apply_update_from(job.id, &epoch(3, 3, 0.3), Some(finished))
        .await
        .unwrap();
    assert!(third.applied(), "the stored job is still running");
    // Another job's version is ignored.
    let other = running_job(&store).await;
    let fourth = store
        .apply_update_from(job.id, &epoch(4, 4, 0.2), Some(other))
        .await
        .unwrap();
    assert_eq!(fourth.job().id, job.id);
    assert_eq!(fourth.job().last_seq, 4);
    let epochs: Vec<_> = store
        .metrics(job.id)
        .await
        .unwrap()
        .iter()
        .map(|m| m.epoch)
        .collect();
    assert_eq!(epochs, vec![1, 2, 3, 4]);
}

pub async fn metrics_of_unknown_job_is_not_found(store: Store) {
    let err = store.metrics(JobId::new()).await.unwrap_err();
    assert!(matches!(err, Error::NotFound { .. }), "{err:?}");
}

pub async fn lost_attempts_are_recorded_and_relaunched_then_fail(store: Store) {
    let mut new = new_job("runner");
    new.config = serde_json::json!({"epochs": 5, "max_attempts": 2});
    let job = store.create_job(new).await.unwrap();
    store
        .transition(job.id, JobStatus::Pending, JobStatus::Queued)
        .await
        .unwrap();
    let set = "s3://datasets/jobs/x/epochs/000002/last.safetensors";
    let report = TrainingUpdate::new(JobStatus::Running)
        .with_seq(1)
        .with_attempt(1)
        .with_progress(0.4)
        .with_last_checkpoint(set)
        .with_metric("epoch", 2.0)
        .with_metric("loss", 0.5);
    store.apply_update(job.id, &report).await.unwrap();

    let requeued = store.end_attempt(job.id, 1, "killed").await.unwrap();
    assert_eq!((requeued.status, requeued.attempt), (JobStatus::Queued, 2));
    // A second watcher of the same loss (the lease and the child's exit)
    // does not count it twice.
    let twice = store
        .end_attempt(job.id, 1, "killed, seen again")
        .await
        .unwrap();
    assert_eq!(twice.revision, requeued.revision, "an attempt ends once");
    let stored = store.get(job.id).await.unwrap();
    assert_eq!(stored, requeued, "the store keeps what it returned");
    assert_eq!(stored.last_checkpoint_s3_uri.as_deref(), Some(set));
    assert_eq!(stored.attempts.len(), 1);
    assert_eq!(
        (
            stored.attempts[0].attempt,
            stored.attempts[0].reason.as_str()
        ),
        (1, "killed")
    );
    // The lost attempt reporting late changes nothing; the new one applies
    // without moving progress back.
    let late = TrainingUpdate::new(JobStatus::Failed)
        .with_seq(2)
        .with_attempt(1)
        .with_error("late");
    assert!(!store.apply_update(job.id, &late).await.unwrap().applied());
    let resumed = TrainingUpdate::new(JobStatus::Running)
        .with_seq(3)
        .with_attempt(2)
        .with_progress(0.0);
    let job_now = store
        .apply_update(job.id, &resumed)
        .await
        .unwrap()
        .into_job();
    assert_eq!(
        (job_now.status, job_now.progress),
        (JobStatus::Running, 0.4)
    );

    let failed = store.end_attempt(job.id, 2, "killed again").await.unwrap();
    assert_eq!(failed.status, JobStatus::Failed);
    let stored = store.get(job.id).await.unwrap();
    assert_eq!(stored.attempts.len(), 2);
    assert!(stored.error.unwrap().contains("none left"));
    assert_eq!(stored.last_checkpoint_s3_uri.as_deref(), Some(set));
    // A final job is left alone.
    let again = store.end_attempt(job.id, 2, "late").await.unwrap();
    assert_eq!(again.revision, failed.revision);
}

pub async fn ping_succeeds(store: Store) {
    store.ping().await.unwrap();
}

/// Every change is an event numbered by the revision it gave the job, with
/// the job as it left it: none for a lost race or a replay, no gaps, and
/// `after` resumes exactly where a reader stopped.
pub async fn every_change_is_an_event_numbered_by_revision(store: Store) {
    use crate::event::EventKind;
    let job = running_job(&store).await;
    store.apply_update(job.id, &epoch(1, 1, 0.9)).await.unwrap();
    // A replay and a lost race change nothing, so they are no events.
    assert!(
        !store
            .apply_update(job.id, &epoch(1, 1, 0.9))
            .await
            .unwrap()
            .applied()
    );
    let mut lost = job.clone();
    lost.message = Some("lost".into());
    store
        .compare_and_set(Expected::exactly(&job), &lost, None)
        .await
        .unwrap_err();
    let progress = TrainingUpdate::new(JobStatus::Running)
        .with_seq(2)
        .with_progress(0.5)
        .with_message("half way");
    store.apply_update(job.id, &progress).await.unwrap();
    let done = TrainingUpdate::new(JobStatus::Completed)
        .with_seq(3)
        .with_checkpoint("s3://bucket/jobs/x/best.safetensors");
    store.apply_update(job.id, &done).await.unwrap();
    let finished = store.get(job.id).await.unwrap();

    let events = store.events(job.id, -1, 100).await.unwrap();
    let kinds: Vec<EventKind> = events.iter().map(|e| e.kind).collect();
    assert_eq!(
        kinds,
        [
            EventKind::Status,   // created, pending
            EventKind::Status,   // queued
            EventKind::Status,   // running
            EventKind::Metrics,  // epoch 1
            EventKind::Progress, // half way
            EventKind::Status,   // completed
        ]
    );
    let revisions: Vec<i64> = events.iter().map(|e| e.revision).collect();
    let first = revisions[0];
    assert_eq!(
        revisions,
        (first..first + 6).collect::<Vec<_>>(),
        "one event per revision, no gaps"
    );
    assert_eq!(events[0].job.status, JobStatus::Pending);
    assert_eq!(events[3].metrics.as_ref().unwrap().values["loss"], 0.9);
    assert_eq!(events[4].job.message.as_deref(), Some("half way"));
    assert_eq!(
        events.last().unwrap().job,
        finished,
        "the last event is the stored job"
    );

    // Resuming after any revision gives exactly the rest; limits page.
    let rest = store.events(job.id, revisions[2], 100).await.unwrap();
    assert_eq!(rest, events[3..]);
    let page = store.events(job.id, revisions[2], 2).await.unwrap();
    assert_eq!(page, events[3..5]);
    assert!(
        store
            .events(job.id, finished.revision, 100)
            .await
            .unwrap()
            .is_empty()
    );
    let err = store.events(JobId::new(), -1, 10).await.unwrap_err();
    assert!(
        matches!(err, Error::NotFound { kind: "job", .. }),
        "{err:?}"
    );
}
