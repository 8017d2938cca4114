//! The JobStore conformance suite against every implementation:
//! in memory, SQLite on a temporary file, and Postgres on a fresh database.

use std::sync::Arc;

use vtp_core::JobStore;

mod memory {
    use super::*;
    use vtp_storage::InMemoryJobStore;

    async fn store() -> Option<(Arc<dyn JobStore>, ())> {
        Some((Arc::new(InMemoryJobStore::new()), ()))
    }
    vtp_core::job_store_conformance!(store);
}

mod sqlite {
    use super::*;
    use vtp_storage::SqliteJobStore;

    async fn store() -> Option<(Arc<dyn JobStore>, tempfile::TempDir)> {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteJobStore::open(&dir.path().join("nested/vtp.db"))
            .await
            .unwrap();
        Some((Arc::new(store), dir))
    }
    vtp_core::job_store_conformance!(store);
}

mod postgres {
    use super::*;
    use vtp_storage::PostgresJobStore;
    use vtp_storage::testing::TestDatabase;

    async fn store() -> Option<(Arc<dyn JobStore>, TestDatabase)> {
        let db = TestDatabase::create().await?;
        let store = PostgresJobStore::connect(db.url()).await.unwrap();
        Some((Arc::new(store), db))
    }
    vtp_core::job_store_conformance!(store);
}

/// `connect` picks the implementation from the URL and rejects the rest clearly.
#[tokio::test]
async fn connect_by_url() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("by-url.db").display());
    let store = vtp_storage::connect_job_store(&url).await.unwrap();
    store.ping().await.unwrap();
    vtp_storage::connect_job_store("memory://")
        .await
        .unwrap()
        .ping()
        .await
        .unwrap();

    let err = vtp_storage::connect_job_store("mysql://localhost/x")
        .await
        .unwrap_err();
    assert!(
        matches!(err, vtp_core::Error::InvalidInput { ref field, .. } if field == "database_url"),
        "{err:?}"
    );
}

/// A small job of user alice on the digits dataset.
fn digits_job() -> vtp_core::NewJob {
    vtp_core::NewJob {
        user_id: "alice".into(),
        model_name: "small_cnn".into(),
        framework: "tch".into(),
        dataset_s3_uri: "file:///data/digits".into(),
        config: serde_json::json!({"epochs": 100}),
        priority: 0,
    }
}

/// A SQLite file keeps its jobs across reopen (the embedded default is durable).
#[tokio::test]
async fn sqlite_persists_across_reopen() {
    use vtp_core::JobStoreExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vtp.db");
    let job = {
        let store = SqliteJobStore::open(&path).await.unwrap();
        store.create_job(digits_job()).await.unwrap()
    };
    let store = SqliteJobStore::open(&path).await.unwrap();
    assert_eq!(store.get(job.id).await.unwrap(), job);
}

use vtp_storage::SqliteJobStore;

/// Progress reports rewrite a Postgres row in place (heap-only updates: no
/// new index entries), which is what keeps callback ingestion cheap; an
/// index on a column that every report changes would silently undo it.
#[tokio::test]
async fn postgres_progress_reports_are_heap_only_updates() {
    use std::time::{Duration, Instant};
    use vtp_core::{JobStatus, JobStoreExt, TrainingReport};
    use vtp_storage::PostgresJobStore;
    use vtp_storage::testing::TestDatabase;

    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let store = PostgresJobStore::connect(db.url()).await.unwrap();
    let job = store.create_job(digits_job()).await.unwrap();
    store
        .transition(job.id, JobStatus::Pending, JobStatus::Queued)
        .await
        .unwrap();
    let reports = 40;
    for seq in 1..=reports {
        let update = TrainingReport::new(JobStatus::Running)
            .with_seq(seq)
            .with_progress(seq as f64 / 100.0)
            .with_message(format!("step {seq}"))
            .with_metric("epoch", seq as f64)
            .with_metric("loss", 1.0 / seq as f64);
        store.apply_report(job.id, &update).await.unwrap();
    }
    // A backend publishes its table statistics when it exits (or after 10 s idle).
    drop(store);
    let stats = sqlx::PgPool::connect(db.url()).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let (updates, hot) = loop {
        let (updates, hot): (i64, i64) = sqlx::query_as(
            "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables WHERE relname = 'jobs'",
        )
        .fetch_one(&stats)
        .await
        .unwrap();
        if updates > reports || Instant::now() > deadline {
            break (updates, hot);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        updates > reports,
        "statistics never arrived: {updates} updates"
    );
    // An update is heap-only only when the row's page has room, which
    // depends on when Postgres prunes old versions (other tests' snapshots
    // can delay it), so a few may not be; an indexed column that every
    // report changes makes none of them so.
    assert!(
        hot * 4 >= reports * 3,
        "{hot} of {updates} updates were heap-only"
    );
}

/// The CredentialStore conformance suite on the same three databases.
mod credentials {
    use std::sync::Arc;

    use vtp_core::{CredentialStore, JobStore};
    use vtp_storage::testing::TestDatabase;
    use vtp_storage::{InMemoryJobStore, PostgresJobStore, SqliteJobStore};

    type Both = (Arc<dyn JobStore>, Arc<dyn CredentialStore>);

    fn both<S: JobStore + CredentialStore>(store: S) -> Both {
        let store = Arc::new(store);
        (store.clone(), store)
    }

    mod memory {
        use super::*;
        async fn stores() -> Option<(Both, ())> {
            Some((both(InMemoryJobStore::new()), ()))
        }
        vtp_core::credential_store_conformance!(stores);
    }

    mod sqlite {
        use super::*;
        async fn stores() -> Option<(Both, tempfile::TempDir)> {
            let dir = tempfile::tempdir().unwrap();
            let store = SqliteJobStore::open(&dir.path().join("vtp.db"))
                .await
                .unwrap();
            Some((both(store), dir))
        }
        vtp_core::credential_store_conformance!(stores);
    }

    mod postgres {
        use super::*;
        async fn stores() -> Option<(Both, TestDatabase)> {
            let db = TestDatabase::create().await?;
            let store = PostgresJobStore::connect(db.url()).await.unwrap();
            Some((both(store), db))
        }
        vtp_core::credential_store_conformance!(stores);
    }
}

/// One leader at a time among the backends of one Postgres database; the
/// next takes over once the leader's connection is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_elects_one_leader_and_the_next_takes_over() {
    use std::time::{Duration, Instant};
    use vtp_core::LeaderElector;
    use vtp_storage::PostgresJobStore;
    use vtp_storage::testing::TestDatabase;

    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let a = PostgresJobStore::connect(db.url())
        .await
        .unwrap()
        .leader_elector();
    let b = PostgresJobStore::connect(db.url())
        .await
        .unwrap()
        .leader_elector();
    let term = a
        .try_acquire()
        .await
        .unwrap()
        .expect("the first to ask leads");
    assert!(
        b.try_acquire().await.unwrap().is_none(),
        "one leader at a time"
    );
    assert!(
        a.try_acquire().await.unwrap().is_none(),
        "even for the same process"
    );
    // The term holds while its connection lives.
    let mut held = term;
    assert!(
        tokio::time::timeout(Duration::from_secs(3), held.lost())
            .await
            .is_err(),
        "a live leader keeps its term"
    );
    drop(held);
    let started = Instant::now();
    let next = loop {
        if let Some(term) = b.try_acquire().await.unwrap() {
            break term;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no one took over"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    drop(next);
}
