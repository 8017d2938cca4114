//! The [`JobStore`] conformance cases.
#![allow(missing_docs, clippy::missing_panics_doc)]

use std::sync::Arc;

use crate::job::{JobFilter, JobId, NewJob};
use crate::job_store::{Expected, JobStore, JobStoreExt};
use crate::report::TrainingReport;
use crate::status::JobStatus;
use crate::{Error, Job};

type Store = Arc<dyn JobStore>;

fn new_job(user: &str) -> NewJob {
    NewJob {
        user_id: user.into(),
        model_name: "resnet18".into(),
        framework: "tch".into(),
        dataset_s3_uri: "s3://datasets/test/my-dataset/".into(),
        config: serde_json::json!({"epochs": 20, "lr": 0.01, "resources": {"cpu": "2", "memory": "4Gi"}}),
        priority: 0,
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

fn epoch(seq: i64, epoch: u32, loss: f64) -> TrainingReport {
    TrainingReport::new(JobStatus::Running)
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
    assert!(store.apply_report(job.id, &update).await.unwrap().applied());
    let after_first = store.get(job.id).await.unwrap();
    let again = store.apply_report(job.id, &update).await.unwrap();
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
        .apply_report(job.id, &epoch(3, 3, 0.5).with_message("epoch 3"))
        .await
        .unwrap();
    let newer = store.get(job.id).await.unwrap();
    let outcome = store
        .apply_report(
            job.id,
            &TrainingReport::new(JobStatus::Running)
                .with_seq(2)
                .with_progress(0.2)
                .with_message("old"),
        )
        .await
        .unwrap();
    assert!(!outcome.applied());
    assert_eq!(store.get(job.id).await.unwrap(), newer);
    let late_failure = TrainingReport::new(JobStatus::Failed)
        .with_seq(1)
        .with_error("stale");
    assert!(
        !store
            .apply_report(job.id, &late_failure)
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
        store.apply_report(job.id, &update).await.unwrap();
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
    // The final report's validation per class is stored with the job.
    let per_class = crate::ClassReport {
        metric: "accuracy".into(),
        classes: vec!["cat".into(), "dog".into()],
        values: vec![Some(0.75), None],
        confusion: Some(vec![vec![3, 1], vec![0, 0]]),
    };
    let done = TrainingReport::new(JobStatus::Completed)
        .with_seq(1)
        .with_checkpoint("s3://bucket/jobs/x/best.safetensors")
        .with_per_class(Some(per_class.clone()));
    let completed = store.apply_report(job.id, &done).await.unwrap();
    assert_eq!(completed.job().status, JobStatus::Completed);
    assert_eq!(completed.job().progress, 1.0);
    let before = store.get(job.id).await.unwrap();
    assert_eq!(before.per_class.as_ref(), Some(&per_class));
    for status in [JobStatus::Running, JobStatus::Failed, JobStatus::Completed] {
        let err = store
            .apply_report(job.id, &TrainingReport::new(status).with_seq(2))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Conflict { .. }), "{status}: {err:?}");
    }
    assert_eq!(store.get(job.id).await.unwrap(), before);
}

pub async fn metrics_are_ordered_and_upserted(store: Store) {
    let job = running_job(&store).await;
    for (e, loss) in [(3, 0.3), (1, 0.9), (2, 0.6)] {
        let update = TrainingReport::new(JobStatus::Running)
            .with_metric("epoch", f64::from(e))
            .with_metric("loss", loss)
            .with_metric("accuracy", 1.0 - loss);
        store.apply_report(job.id, &update).await.unwrap();
    }
    // The same values again (a resumed attempt re-reporting its set's
    // epoch) keep the row as it was recorded.
    let kept = store.metrics(job.id).await.unwrap();
    let again = TrainingReport::new(JobStatus::Running)
        .with_metric("epoch", 1.0)
        .with_metric("loss", 0.9)
        .with_metric("accuracy", 1.0 - 0.9);
    store.apply_report(job.id, &again).await.unwrap();
    assert_eq!(store.metrics(job.id).await.unwrap(), kept);
    let rerun = TrainingReport::new(JobStatus::Running)
        .with_metric("epoch", 2.0)
        .with_metric("loss", 0.55);
    store.apply_report(job.id, &rerun).await.unwrap();
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
                    .apply_report(job.id, &epoch(seq, seq as u32, 1.0 / seq as f64))
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

/// Many jobs reporting at once, each report sent twice and from a version
/// that may be outdated (as a backend that remembers versions sends them):
/// every report lands at most once, every epoch's metrics are kept, and
/// every change has its event, in order.
pub async fn concurrent_reports_of_many_jobs_apply_once_each(store: Store) {
    let mut jobs = Vec::new();
    for _ in 0..12 {
        jobs.push(running_job(&store).await);
    }
    let tasks: Vec<_> = (1..=6)
        .flat_map(|seq| {
            jobs.iter()
                .flat_map(move |job| [(job.clone(), seq), (job.clone(), seq)])
        })
        .map(|(job, seq)| {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .apply_report_from(job.id, &epoch(seq, seq as u32, 1.0 / seq as f64), Some(job))
                    .await
            })
        })
        .collect();
    let mut applied = 0;
    for task in tasks {
        applied += i64::from(task.await.unwrap().unwrap().applied());
    }
    let mut revisions = 0;
    for job in &jobs {
        let stored = store.get(job.id).await.unwrap();
        assert_eq!(stored.last_seq, 6);
        // A report overtaken by a newer one changes nothing but its
        // epoch's metrics; each applied one is one revision and one event.
        let changes = stored.revision - job.revision;
        assert!((1..=6).contains(&changes), "{changes}");
        revisions += changes;
        let metrics = store.metrics(job.id).await.unwrap();
        assert_eq!(
            metrics.iter().map(|m| m.epoch).collect::<Vec<_>>(),
            (1..=6).collect::<Vec<_>>()
        );
        let events = store.events(job.id, job.revision, 100).await.unwrap();
        assert_eq!(
            events.iter().map(|e| e.revision).collect::<Vec<_>>(),
            (job.revision + 1..=stored.revision).collect::<Vec<_>>(),
            "one event per applied report, numbered by revision"
        );
    }
    assert_eq!(applied, revisions, "each applied report is one change");
}

pub async fn updates_from_a_known_version_are_checked(store: Store) {
    let job = running_job(&store).await;
    // Current: the read is skipped and the write lands. The known version
    // may leave out the config (a report never writes it).
    let mut slim = job.clone();
    slim.config = serde_json::Value::Null;
    let first = store
        .apply_report_from(job.id, &epoch(1, 1, 0.9), Some(slim))
        .await
        .unwrap();
    assert!(first.applied());
    assert_eq!(first.job(), &store.get(job.id).await.unwrap());
    assert_eq!(first.job().config, job.config);
    assert_eq!(first.job().revision, job.revision + 1);
    // Outdated: the compare-and-set loses, the job is re-read, the write lands once.
    let second = store
        .apply_report_from(job.id, &epoch(2, 2, 0.5), Some(job.clone()))
        .await
        .unwrap();
    assert!(second.applied());
    assert_eq!(second.job().last_seq, 2);
    assert_eq!(second.job().revision, job.revision + 2);
    // A replay that the outdated version would apply is a duplicate of the stored job.
    let replay = store
        .apply_report_from(job.id, &epoch(1, 1, 0.9), Some(job.clone()))
        .await
        .unwrap();
    assert!(!replay.applied());
    assert_eq!(replay.job(), second.job());
    // A version that would refuse the report (a finished job) is checked against the store.
    let mut finished = second.job().clone();
    finished.set_status(JobStatus::Completed);
    let third = store
        .apply_report_from(job.id, &epoch(3, 3, 0.3), Some(finished))
        .await
        .unwrap();
    assert!(third.applied(), "the stored job is still running");
    // Another job's version is ignored.
    let other = running_job(&store).await;
    let fourth = store
        .apply_report_from(job.id, &epoch(4, 4, 0.2), Some(other))
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
    let report = TrainingReport::new(JobStatus::Running)
        .with_seq(1)
        .with_attempt(1)
        .with_progress(0.4)
        .with_last_checkpoint(set)
        .with_metric("epoch", 2.0)
        .with_metric("loss", 0.5);
    store.apply_report(job.id, &report).await.unwrap();

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
    let late = TrainingReport::new(JobStatus::Failed)
        .with_seq(2)
        .with_attempt(1)
        .with_error("late");
    assert!(!store.apply_report(job.id, &late).await.unwrap().applied());
    let resumed = TrainingReport::new(JobStatus::Running)
        .with_seq(3)
        .with_attempt(2)
        .with_progress(0.0);
    let job_now = store
        .apply_report(job.id, &resumed)
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

/// Every change that is history (a status, an epoch) is an event numbered
/// by the revision it gave the job, with the job as it left it (its config
/// left out): none for a lost race or a replay, none for progress alone,
/// and `after` resumes exactly where a reader stopped.
pub async fn every_change_is_an_event_numbered_by_revision(store: Store) {
    use crate::event::EventKind;
    let job = running_job(&store).await;
    store.apply_report(job.id, &epoch(1, 1, 0.9)).await.unwrap();
    // A replay and a lost race change nothing, so they are no events.
    assert!(
        !store
            .apply_report(job.id, &epoch(1, 1, 0.9))
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
    // Heartbeats and progress change the job, not its history: a job that
    // runs for days keeps one event per epoch and status.
    for seq in 2..12 {
        let progress = TrainingReport::new(JobStatus::Running)
            .with_seq(seq)
            .with_progress(0.1 + seq as f64 / 100.0)
            .with_message("half way");
        store.apply_report(job.id, &progress).await.unwrap();
    }
    let done = TrainingReport::new(JobStatus::Completed)
        .with_seq(12)
        .with_checkpoint("s3://bucket/jobs/x/best.safetensors");
    store.apply_report(job.id, &done).await.unwrap();
    let finished = store.get(job.id).await.unwrap();

    let events = store.events(job.id, -1, 100).await.unwrap();
    let kinds: Vec<EventKind> = events.iter().map(|e| e.kind).collect();
    assert_eq!(
        kinds,
        [
            EventKind::Status,  // created, pending
            EventKind::Status,  // queued
            EventKind::Status,  // running
            EventKind::Metrics, // epoch 1
            EventKind::Status,  // completed
        ]
    );
    let revisions: Vec<i64> = events.iter().map(|e| e.revision).collect();
    let first = revisions[0];
    assert_eq!(
        revisions,
        [first, first + 1, first + 2, first + 3, first + 14],
        "numbered by revision; the ten progress changes between are not kept"
    );
    assert_eq!(events[0].job.status, JobStatus::Pending);
    assert_eq!(events[3].metrics.as_ref().unwrap().values["loss"], 0.9);
    assert!(
        events.iter().all(|e| e.job.config.is_null()),
        "no event repeats the config"
    );
    let mut last = events.last().unwrap().job.clone();
    last.config = finished.config.clone();
    assert_eq!(last, finished, "the last event is the stored job");
    assert_eq!(last.message.as_deref(), Some("half way"));

    // Resuming after any revision gives exactly the rest; limits page.
    let rest = store.events(job.id, revisions[2], 100).await.unwrap();
    assert_eq!(rest, events[3..]);
    let page = store.events(job.id, revisions[2], 1).await.unwrap();
    assert_eq!(page, events[3..4]);
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

/// A queued job of `user` with `priority`, started at second `second`.
async fn queued_job(store: &Store, user: &str, priority: i32, second: i64) -> Job {
    let job = store
        .create_job(NewJob {
            priority,
            ..new_job(user)
        })
        .await
        .unwrap();
    store
        .transition_with(job.id, JobStatus::Pending, JobStatus::Queued, |job| {
            job.queued_at = chrono::DateTime::from_timestamp(1_800_000_000 + second, 0);
        })
        .await
        .unwrap()
}

/// Hands `job` to a launcher (what the backend's dispatcher writes).
async fn launch(store: &Store, job: &Job) -> Job {
    let mut next = store.get(job.id).await.unwrap();
    let expected = Expected::exactly(&next);
    next.launched_at = Some(crate::job::now());
    store.compare_and_set(expected, &next, None).await.unwrap()
}

/// The queue is in priority, fair-share, age order, as
/// [`crate::queue_order`] computes it; launched jobs count toward their
/// owner's share; a job whose `not_before` is ahead waits; positions
/// number the same order.
pub async fn the_queue_runs_by_priority_then_fair_share_then_age(store: Store) {
    // Alice has one job running and three waiting; Bob two waiting; Carol
    // one of high priority and one of low.
    let running = queued_job(&store, "alice", 0, 0).await;
    launch(&store, &running).await;
    let mut waiting = Vec::new();
    for (user, priority, second) in [
        ("alice", 0, 1),
        ("alice", 0, 2),
        ("bob", 0, 3),
        ("alice", 0, 4),
        ("bob", 0, 5),
        ("carol", 5, 6),
        ("carol", -3, 7),
    ] {
        waiting.push(queued_job(&store, user, priority, second).await);
    }
    // A pending job and a finished one are not in the queue.
    store.create_job(new_job("dave")).await.unwrap();
    let now = crate::job::now();
    let order = |jobs: &[Job]| {
        jobs.iter()
            .map(|job| {
                format!(
                    "{}{}",
                    job.user_id,
                    job.queued_at.unwrap().timestamp() - 1_800_000_000
                )
            })
            .collect::<Vec<_>>()
    };
    let queue = store.queue(now, 100).await.unwrap();
    assert_eq!(
        order(&queue),
        [
            "carol6", "bob3", "alice1", "bob5", "alice2", "alice4", "carol7"
        ],
        "priority first; then Bob, who runs nothing, alternates with Alice, who runs one; then age"
    );
    let held = std::collections::HashMap::from([("alice".to_owned(), 1)]);
    let fresh: Vec<Job> = reread(&store, &waiting).await;
    assert_eq!(
        order(&crate::queue_order(fresh, &held)),
        order(&queue),
        "the store's order is the reference's"
    );
    assert_eq!(
        order(&store.queue(now, 2).await.unwrap()),
        ["carol6", "bob3"]
    );
    let positions = store.queue_positions(None).await.unwrap();
    for (place, job) in (1..).zip(&queue) {
        assert_eq!(positions.get(&job.id), Some(&place), "{}", job.user_id);
    }
    assert_eq!(
        positions.len(),
        queue.len(),
        "only waiting jobs have a place"
    );
    let bobs = store.queue_positions(Some("bob")).await.unwrap();
    assert_eq!(bobs.len(), 2);
    assert_eq!(bobs[&queue[1].id], 2);

    // Launching Carol's first makes her hold a slot: her low-priority job
    // stays behind the others of priority 0.
    launch(&store, &queue[0]).await;
    // A relaunch in backoff waits, whatever its place.
    let mut backoff = store.get(queue[1].id).await.unwrap();
    let expected = Expected::exactly(&backoff);
    backoff.not_before = Some(now + chrono::Duration::seconds(60));
    store
        .compare_and_set(expected, &backoff, None)
        .await
        .unwrap();
    let queue = store.queue(crate::job::now(), 100).await.unwrap();
    assert_eq!(
        order(&queue),
        ["alice1", "bob5", "alice2", "alice4", "carol7"],
        "Bob's first waits out its backoff"
    );
    let later = now + chrono::Duration::seconds(61);
    assert_eq!(order(&store.queue(later, 1).await.unwrap()), ["bob3"]);
}

async fn reread(store: &Store, jobs: &[Job]) -> Vec<Job> {
    let mut fresh = Vec::new();
    for job in jobs {
        fresh.push(store.get(job.id).await.unwrap());
    }
    fresh
}

/// Quotas are counted with the write they guard: concurrent starts leave
/// at most the quota's jobs active, and creates stop at the pending quota.
pub async fn quotas_hold_under_concurrent_writes(store: Store) {
    use crate::job_store::Quota;
    let pending = Quota::pending(3);
    for _ in 0..3 {
        let job = new_job("alice").into_job().unwrap();
        store.create_within(&job, pending).await.unwrap();
    }
    let refused = new_job("alice").into_job().unwrap();
    let err = store.create_within(&refused, pending).await.unwrap_err();
    assert!(matches!(err, Error::RateLimited { .. }), "{err:?}");
    assert!(matches!(
        store.get(refused.id).await,
        Err(Error::NotFound { .. })
    ));
    // Another owner has a quota of their own.
    store
        .create_within(&new_job("bob").into_job().unwrap(), pending)
        .await
        .unwrap();

    // Twenty starts at once, a quota of 4 active jobs: four win.
    let mut jobs = Vec::new();
    for _ in 0..20 {
        jobs.push(store.create_job(new_job("carol")).await.unwrap());
    }
    let starts = jobs.iter().map(|job| {
        let store = store.clone();
        let job = job.clone();
        tokio::spawn(async move {
            let mut next = job.clone();
            next.transition(JobStatus::Queued).unwrap();
            store
                .compare_and_set_within(Expected::exactly(&job), &next, Quota::active(4))
                .await
        })
    });
    let mut started = Vec::new();
    for start in starts.collect::<Vec<_>>() {
        match start.await.unwrap() {
            Ok(job) => {
                assert_eq!(job.status, JobStatus::Queued);
                started.push(job.id);
            }
            Err(Error::RateLimited { .. }) => {}
            Err(other) => panic!("a start past the quota is rate limited, got {other:?}"),
        }
    }
    assert_eq!(started.len(), 4, "exactly the quota's jobs started");
    let active = store
        .list(
            &JobFilter::new()
                .with_user("carol")
                .with_status(JobStatus::Queued),
        )
        .await
        .unwrap();
    assert_eq!(active.total, 4);
    // A stale expectation is still a lost race, not the quota.
    let stale = jobs.iter().find(|job| job.id == started[0]).unwrap();
    let mut next = stale.clone();
    next.message = Some("late".into());
    let err = store
        .compare_and_set_within(Expected::exactly(stale), &next, Quota::active(1))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Conflict { .. }), "{err:?}");
}

/// Paging by cursor visits every match once, newest first, whatever the
/// page size; the launched and deleted filters select what they say.
pub async fn pages_visit_every_job_once(store: Store) {
    use crate::job_store::JobPages;
    let mut made = Vec::new();
    for second in 0..7 {
        made.push(queued_job(&store, "erin", 0, second).await);
    }
    launch(&store, &made[2]).await;
    launch(&store, &made[5]).await;
    let mut pages = JobPages::new(
        store.as_ref(),
        JobFilter::new().with_user("erin").with_page(3, 99),
    );
    let mut seen = Vec::new();
    let mut count = 0;
    while let Some(page) = pages.next().await.unwrap() {
        assert!(page.len() <= 3);
        count += 1;
        seen.extend(page.into_iter().map(|job| job.id));
    }
    let mut newest_first: Vec<JobId> = made.iter().map(|job| job.id).collect();
    newest_first.reverse();
    assert_eq!(seen, newest_first, "each once, newest first");
    assert_eq!(count, 3);
    let launched = store
        .list(&JobFilter::new().with_user("erin").with_launched(true))
        .await
        .unwrap();
    assert_eq!(launched.total, 2);
    let [mut queued, _, _] = JobPages::launched(store.as_ref(), 1);
    let mut ids = Vec::new();
    while let Some(page) = queued.next().await.unwrap() {
        ids.extend(page.into_iter().map(|job| job.id));
    }
    assert_eq!(ids, [made[5].id, made[2].id]);
    assert_eq!(store.slots_taken().await.unwrap(), 2);

    // A tombstoned job leaves every listing but the deleted one.
    let mut gone = store.get(made[0].id).await.unwrap();
    let expected = Expected::exactly(&gone);
    gone.deleted_at = Some(crate::job::now());
    store.compare_and_set(expected, &gone, None).await.unwrap();
    let all = store
        .list(&JobFilter::new().with_user("erin"))
        .await
        .unwrap();
    assert_eq!(all.total, 6);
    let deleted = store.list(&JobFilter::new().deleted_only()).await.unwrap();
    assert_eq!(deleted.jobs.len(), 1);
    assert_eq!(deleted.jobs[0].id, made[0].id);
    assert!(
        !store
            .queue_positions(None)
            .await
            .unwrap()
            .contains_key(&made[0].id)
    );
}

/// Deleting a job removes it with its metrics and events; a second delete
/// finds nothing and is no error.
pub async fn delete_removes_the_job_and_everything_with_it(store: Store) {
    let job = running_job(&store).await;
    store.apply_report(job.id, &epoch(2, 1, 0.5)).await.unwrap();
    let other = running_job(&store).await;
    store
        .apply_report(other.id, &epoch(2, 1, 0.5))
        .await
        .unwrap();
    assert!(store.delete(job.id).await.unwrap());
    assert!(matches!(
        store.get(job.id).await,
        Err(Error::NotFound { .. })
    ));
    assert!(matches!(
        store.metrics(job.id).await,
        Err(Error::NotFound { .. })
    ));
    assert!(matches!(
        store.events(job.id, -1, 10).await,
        Err(Error::NotFound { .. })
    ));
    assert!(!store.delete(job.id).await.unwrap());
    assert_eq!(
        store.metrics(other.id).await.unwrap().len(),
        1,
        "others stay"
    );
}

/// Finished jobs are found by when they finished (retention).
pub async fn finished_jobs_are_found_by_when_they_finished(store: Store) {
    let job = running_job(&store).await;
    let done = store
        .transition(job.id, JobStatus::Running, JobStatus::Completed)
        .await
        .unwrap();
    let finished = done.finished_at.unwrap();
    let before = store
        .list(&JobFilter::new().with_finished_before(finished))
        .await
        .unwrap();
    assert_eq!(before.total, 0);
    let after = store
        .list(&JobFilter::new().with_finished_before(finished + chrono::Duration::seconds(1)))
        .await
        .unwrap();
    assert_eq!(after.jobs.len(), 1);
    assert_eq!(after.jobs[0].id, job.id);
}
