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

/// A SQLite file keeps its jobs across reopen (the embedded default is durable).
#[tokio::test]
async fn sqlite_persists_across_reopen() {
    use vtp_core::{JobStoreExt, NewJob};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vtp.db");
    let job = {
        let store = SqliteJobStore::open(&path).await.unwrap();
        store
            .create_job(NewJob {
                user_id: "alice".into(),
                model_name: "small_cnn".into(),
                framework: "tch".into(),
                dataset_s3_uri: "file:///data/digits".into(),
                config: serde_json::json!({"epochs": 2}),
            })
            .await
            .unwrap()
    };
    let store = SqliteJobStore::open(&path).await.unwrap();
    assert_eq!(store.get(job.id).await.unwrap(), job);
}

use vtp_storage::SqliteJobStore;
