//! End to end: the real `vtp-backend` binary against Postgres and Garage,
//! replaying the seed's flow with a trainer double.

mod support;

use std::time::Duration;

use bytes::Bytes;
use serde_json::json;
use support::{BackendProcess, json_of, signed};
use vtp_core::conformance::blob_store::pattern;
use vtp_core::{BlobKey, BlobStoreExt, JobId, JobStore};
use vtp_storage::PostgresJobStore;
use vtp_storage::testing::{TestDatabase, TestS3};
use vtp_trainer::testing::TrainerDouble;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_flow_against_postgres_and_garage() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let Some(s3) = TestS3::from_env() else { return };
    let blob_url = s3.fresh_url();
    let trainer = TrainerDouble::start().await;
    let mut env = s3.env_for(&blob_url);
    env.push(("VTP_DATABASE_URL", db.url().to_owned()));
    env.push(("VTP_LAUNCHER", "http".to_owned()));
    env.push(("VTP_TRAINER_URL", trainer.url()));
    let backend = BackendProcess::start(&env).await;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    // The same store the backend writes to, read directly.
    let blobs = s3.builder().with_url(blob_url.clone()).build().unwrap();

    let (status, health) = json_of(http.get(backend.at("/health")).send().await.unwrap()).await;
    assert_eq!(status, 200, "{health}");
    assert_eq!(health["blob_store"], blob_url.as_str());

    // A 20 MB dataset, the seed's field order (file first), lands byte-identical.
    let data = pattern(20 * 1024 * 1024, 42);
    let form = reqwest::multipart::Form::new()
        .part(
            "file",
            reqwest::multipart::Part::bytes(data.clone()).file_name("sample.zip"),
        )
        .text("user_id", "test")
        .text("dataset_name", "my-dataset");
    let (status, uploaded) = json_of(
        http.post(backend.at("/datasets/upload"))
            .multipart(form)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 201, "{uploaded}");
    let dataset_uri = uploaded["s3_uri"].as_str().unwrap().to_owned();
    assert_eq!(
        dataset_uri,
        format!("{blob_url}/users/test/datasets/my-dataset/sample.zip")
    );
    assert_eq!(uploaded["size"], data.len());
    let stored = blobs
        .get_bytes(&blobs.key_for(&dataset_uri).unwrap())
        .await
        .unwrap();
    assert!(stored == data, "the stored dataset differs from the upload");
    let keys: Vec<String> = blobs
        .list(None)
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.key.as_str().to_owned())
        .collect();
    assert_eq!(
        keys,
        ["users/test/datasets/my-dataset/sample.zip"],
        "no staging object is left"
    );

    // Create (the seed's body) and start.
    let body = json!({"user_id": "test", "model_name": "yolo11n", "framework": "ultralytics",
                      "dataset_s3_uri": dataset_uri, "config": {"epochs": 3}});
    let (status, job) = json_of(
        http.post(backend.at("/training/jobs"))
            .json(&body)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 201, "{job}");
    let id = job["id"].as_str().unwrap().to_owned();
    let (status, started) = json_of(
        http.post(backend.at(&format!("/training/jobs/{id}/start")))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 202, "{started}");
    let launched = trainer.wait_started(1).await;
    assert_eq!(launched.len(), 1);
    assert_eq!(launched[0].dataset_s3_uri, dataset_uri);
    let callback = launched[0].callback_url.clone();
    let secret = launched[0]
        .callback_secret
        .clone()
        .expect("the start request carries the job's callback secret");
    assert_eq!(
        callback,
        backend.at(&format!("/training/jobs/{id}/callback"))
    );

    // The trainer reports: running, epochs 1..3 with duplicates and reordering, completed.
    let checkpoint = BlobKey::parse(&format!("jobs/{id}/best.safetensors")).unwrap();
    let weights = pattern(300_000, 7);
    blobs
        .put_bytes(&checkpoint, Bytes::from(weights.clone()))
        .await
        .unwrap();
    let epoch = |seq: i64, e: u32| {
        json!({"job_id": id, "status": "running", "seq": seq, "progress": f64::from(e) / 3.0,
               "message": format!("epoch {e}/3"),
               "metrics": {"epoch": e, "loss": 1.0 / f64::from(e), "accuracy": 0.3 * f64::from(e), "val_loss": 1.1 / f64::from(e)}})
    };
    let reports = [
        json!({"job_id": id, "status": "running", "seq": 1, "progress": 0.0, "message": "started"}),
        epoch(2, 1),
        epoch(3, 2),
        epoch(2, 1),
        epoch(4, 3),
        epoch(3, 2),
        json!({"job_id": id, "status": "completed", "seq": 5, "progress": 1.0,
               "checkpoint_s3_uri": blobs.uri(&checkpoint)}),
        epoch(4, 3),
    ];
    for report in reports {
        let (status, answer) = json_of(
            signed(&http, &callback, &secret, &report)
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(status, 200, "{report} -> {answer}");
    }
    // A report after the end is refused.
    let late = json!({"job_id": id, "status": "running", "seq": 6});
    let (status, _) = json_of(
        signed(&http, &callback, &secret, &late)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 409);

    let (_, job) = json_of(
        http.get(backend.at(&format!("/training/jobs/{id}")))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(job["status"], "completed", "{job}");
    assert_eq!(job["progress"], 1.0);
    assert_eq!(job["checkpoint_s3_uri"], blobs.uri(&checkpoint).as_str());
    let (_, metrics) = json_of(
        http.get(backend.at(&format!("/training/jobs/{id}/metrics")))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(metrics.as_array().unwrap().len(), 3, "{metrics}");
    // Exactly three rows in Postgres itself.
    let store = PostgresJobStore::connect(db.url()).await.unwrap();
    let rows = store.metrics(id.parse::<JobId>().unwrap()).await.unwrap();
    assert_eq!(rows.iter().map(|m| m.epoch).collect::<Vec<_>>(), [1, 2, 3]);
    assert_eq!(rows[1].values["loss"], 0.5);

    // The checkpoint streams back byte-identical.
    let response = http
        .get(backend.at(&format!("/training/jobs/{id}/checkpoint")))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.bytes().await.unwrap() == weights);

    // Listing by user and status sees it.
    let (_, page) = json_of(
        http.get(backend.at("/training/jobs?user_id=test&status=completed"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(page["total"], 1);
}
