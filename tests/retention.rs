//! Deletion and retention on the real `vtp-backend` binary, Postgres and
//! Garage: a deleted job leaves no row and no object, also when the
//! backend is killed between the two phases of its deletion; a dataset a
//! job under way names cannot be deleted; the job event log keeps history,
//! not heartbeats; metric rows only for the job's own epochs; finished jobs
//! past the operator's retention are deleted by the leader.

mod support;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde_json::{Value, json};
use support::{ServiceProcess, json_of, signed};
use vtp_core::{BlobKey, BlobStore, BlobStoreExt, CallbackSecret};
use vtp_storage::testing::{TestDatabase, TestS3};
use vtp_trainer::testing::TrainerDouble;

struct Env {
    db: TestDatabase,
    blobs: Arc<dyn BlobStore>,
    trainer: TrainerDouble,
    env: Vec<(&'static str, String)>,
    http: reqwest::Client,
    _s3: TestS3,
}

impl Env {
    async fn new() -> Option<Env> {
        let db = TestDatabase::create().await?;
        let s3 = TestS3::from_env()?;
        let blob_url = s3.fresh_url();
        let trainer = TrainerDouble::start().await;
        let mut env = s3.env_for(&blob_url);
        env.push(("VTP_DATABASE_URL", db.url().to_owned()));
        env.push(("VTP_LAUNCHER", "http".to_owned()));
        env.push(("VTP_TRAINER_URL", trainer.url()));
        env.push(("VTP_RETENTION_INTERVAL_SECS", "1".to_owned()));
        let blobs = s3.builder().with_url(blob_url).build().unwrap();
        Some(Env {
            db,
            blobs,
            trainer,
            env,
            http: reqwest::Client::new(),
            _s3: s3,
        })
    }

    /// The backend on `listen`, with fail points `failpoints`.
    async fn backend(&self, listen: &str, failpoints: Option<&str>) -> ServiceProcess {
        let mut env = self.env.clone();
        env.extend(failpoints.map(|points| ("FAILPOINTS", points.to_owned())));
        ServiceProcess::spawn(
            env!("CARGO_BIN_EXE_vtp-backend"),
            &["--listen", listen],
            &env,
            "vtp-backend listening on ",
        )
        .await
    }

    async fn dataset(&self, backend: &ServiceProcess, name: &str) -> String {
        let form = reqwest::multipart::Form::new()
            .part(
                "file",
                reqwest::multipart::Part::bytes(b"PK data".to_vec()).file_name("d.zip"),
            )
            .text("user_id", "u")
            .text("dataset_name", name.to_owned());
        let (status, body) = json_of(
            self.http
                .post(backend.at("/datasets/upload"))
                .multipart(form)
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(status, 201, "{body}");
        body["s3_uri"].as_str().unwrap().to_owned()
    }

    /// A job on `dataset`, started and launched; its id and secret.
    async fn launched(&self, backend: &ServiceProcess, dataset: &str) -> (String, CallbackSecret) {
        let body = json!({"user_id": "u", "model_name": "small_cnn", "framework": "tch",
                          "dataset_s3_uri": dataset, "config": {"epochs": 3}});
        let (status, job) = json_of(
            self.http
                .post(backend.at("/training/jobs"))
                .json(&body)
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(status, 201, "{job}");
        let id = job["id"].as_str().unwrap().to_owned();
        let before = self.trainer.started().len();
        let response = self
            .http
            .post(backend.at(&format!("/training/jobs/{id}/start")))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 202);
        let request = self
            .trainer
            .wait_started(before + 1)
            .await
            .into_iter()
            .find(|r| r.job_id.to_string() == id)
            .unwrap();
        (id, request.callback_secret.unwrap())
    }

    async fn report(
        &self,
        backend: &ServiceProcess,
        id: &str,
        secret: &CallbackSecret,
        body: Value,
    ) -> (u16, Value) {
        let url = backend.at(&format!("/training/jobs/{id}/callback"));
        let (status, answer) = json_of(
            signed(&self.http, &url, secret, &body)
                .send()
                .await
                .unwrap(),
        )
        .await;
        (status.as_u16(), answer)
    }

    /// A job that trained: three epochs, a checkpoint set and the final
    /// checkpoint in the store, completed.
    async fn finished(&self, backend: &ServiceProcess, dataset: &str) -> String {
        let (id, secret) = self.launched(backend, dataset).await;
        for (seq, epoch) in [(1, 1), (2, 2), (3, 3)] {
            let set =
                BlobKey::parse(&format!("jobs/{id}/epochs/{epoch:06}/last.safetensors")).unwrap();
            self.blobs
                .put_bytes(&set, Bytes::from_static(b"weights"))
                .await
                .unwrap();
            let (status, body) = self
                .report(
                    backend,
                    &id,
                    &secret,
                    json!({"status": "running", "seq": seq, "progress": f64::from(epoch) / 3.0,
                           "metrics": {"epoch": epoch, "loss": 1.0 / f64::from(epoch)},
                           "last_checkpoint_s3_uri": self.blobs.uri(&set)}),
                )
                .await;
            assert_eq!(status, 200, "{body}");
        }
        let best = BlobKey::parse(&format!("jobs/{id}/best.safetensors")).unwrap();
        self.blobs
            .put_bytes(&best, Bytes::from_static(b"best"))
            .await
            .unwrap();
        let json = BlobKey::parse(&format!("jobs/{id}/best.json")).unwrap();
        self.blobs
            .put_bytes(&json, Bytes::from_static(b"{}"))
            .await
            .unwrap();
        let (status, body) = self
            .report(
                backend,
                &id,
                &secret,
                json!({"status": "completed", "seq": 9, "checkpoint_s3_uri": self.blobs.uri(&best)}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        id
    }

    /// Rows of job `id` in every table of the job store.
    async fn rows(&self, id: &str) -> Vec<(&'static str, i64)> {
        let pool = sqlx::PgPool::connect(self.db.url()).await.unwrap();
        let id: uuid::Uuid = id.parse().unwrap();
        let mut counts = Vec::new();
        for (table, sql) in [
            ("jobs", "SELECT COUNT(*) FROM jobs WHERE id = $1"),
            (
                "job_events",
                "SELECT COUNT(*) FROM job_events WHERE job_id = $1",
            ),
            (
                "training_metrics",
                "SELECT COUNT(*) FROM training_metrics WHERE job_id = $1",
            ),
            (
                "job_secrets",
                "SELECT COUNT(*) FROM job_secrets WHERE job_id = $1",
            ),
        ] {
            let n: i64 = sqlx::query_scalar(sql)
                .bind(id)
                .fetch_one(&pool)
                .await
                .unwrap();
            counts.push((table, n));
        }
        pool.close().await;
        counts
    }

    async fn objects(&self, id: &str) -> usize {
        let prefix = BlobKey::parse(&format!("jobs/{id}")).unwrap();
        self.blobs.list(Some(&prefix)).await.unwrap().len()
    }

    /// Waits until job `id` has no row and no object left.
    async fn gone(&self, id: &str) {
        for _ in 0..100 {
            if self.rows(id).await.iter().all(|(_, n)| *n == 0) && self.objects(id).await == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        panic!(
            "job {id} left rows {:?} and {} objects",
            self.rows(id).await,
            self.objects(id).await
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_job_leaves_no_row_and_no_object() {
    let Some(env) = Env::new().await else { return };
    let listen = format!("127.0.0.1:{}", support::free_port());
    let backend = env.backend(&listen, None).await;
    let dataset = env.dataset(&backend, "d").await;
    let id = env.finished(&backend, &dataset).await;
    let rows = env.rows(&id).await;
    assert!(rows.iter().all(|(_, n)| *n > 0), "{rows:?}");
    // Heartbeats and progress are no history: the log holds the job's
    // statuses and its three epochs, not its twenty heartbeats.
    let (other, secret) = env.launched(&backend, &dataset).await;
    for seq in 1..=20 {
        let (status, _) = env
            .report(
                &backend,
                &other,
                &secret,
                json!({"status": "running", "seq": seq, "progress": f64::from(seq) / 100.0}),
            )
            .await;
        assert_eq!(status, 200);
    }
    let events = env.rows(&other).await[1].1;
    assert_eq!(events, 3, "created, queued, running: no heartbeat is kept");
    // A metric row only for the job's own epochs.
    let (status, body) = env
        .report(
            &backend,
            &other,
            &secret,
            json!({"status": "running", "seq": 21, "metrics": {"epoch": 4, "loss": 0.1}}),
        )
        .await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["field"], "metrics.epoch");

    // A job under way cannot be deleted; a finished one can.
    let purge = |id: &str| {
        env.http
            .delete(backend.at(&format!("/training/jobs/{id}?purge=true")))
            .send()
    };
    assert_eq!(purge(&other).await.unwrap().status(), 409);
    let response = purge(&id).await.unwrap();
    assert_eq!(response.status(), 204);
    env.gone(&id).await;
    let (status, _) = json_of(
        env.http
            .get(backend.at(&format!("/training/jobs/{id}")))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 404);
    assert_eq!(purge(&id).await.unwrap().status(), 404, "gone is gone");
}

/// The backend is SIGKILLed inside a deletion, at `point`; the next
/// backend finishes it by itself.
async fn deletion_killed_at(point: &str) {
    let Some(env) = Env::new().await else { return };
    let listen = format!("127.0.0.1:{}", support::free_port());
    let backend = env.backend(&listen, Some(&format!("{point}=return"))).await;
    let dataset = env.dataset(&backend, "d").await;
    let id = env.finished(&backend, &dataset).await;
    let held = tokio::spawn(
        env.http
            .delete(backend.at(&format!("/training/jobs/{id}?purge=true")))
            .send(),
    );
    // Tombstoned: the job answers 404 already.
    for _ in 0..100 {
        let response = env
            .http
            .get(backend.at(&format!("/training/jobs/{id}")))
            .send()
            .await
            .unwrap();
        if response.status() == 404 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if point == "purge-after-objects" {
        // The objects went before the crash, the rows not.
        for _ in 0..100 {
            if env.objects(&id).await == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(env.objects(&id).await, 0);
    }
    backend.kill().await;
    assert!(held.await.unwrap().is_err(), "the delete got no answer");
    let rows = env.rows(&id).await;
    assert_eq!(rows[0], ("jobs", 1), "the job's row is still there");
    let backend = env.backend(&listen, None).await;
    env.gone(&id).await;
    let (status, _) = json_of(
        env.http
            .get(backend.at(&format!("/training/jobs/{id}")))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 404);
}

#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deletion_cut_after_its_tombstone_is_finished_by_the_next_backend() {
    deletion_killed_at("purge-after-tombstone").await;
}

#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deletion_cut_after_its_objects_is_finished_by_the_next_backend() {
    deletion_killed_at("purge-after-objects").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dataset_in_use_cannot_be_deleted_and_finished_jobs_expire() {
    let Some(env) = Env::new().await else { return };
    let backend = env
        .backend(&format!("127.0.0.1:{}", support::free_port()), None)
        .await;
    let dataset = env.dataset(&backend, "digits").await;
    let (id, secret) = env.launched(&backend, &dataset).await;
    let delete = || {
        env.http
            .delete(backend.at("/datasets/digits?user_id=u"))
            .send()
    };
    let (status, body) = json_of(delete().await.unwrap()).await;
    assert_eq!(status, 409, "{body}");
    assert!(
        body["error"]["message"].as_str().unwrap().contains(&id),
        "{body}"
    );
    // Being cancelled, the job still names it: the trainer may still read
    // it. Cancelled (the trainer reports so), the dataset can go.
    let response = env
        .http
        .delete(backend.at(&format!("/training/jobs/{id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let (status, body) = json_of(delete().await.unwrap()).await;
    assert_eq!(status, 409, "{body}");
    let (status, answer) = json_of(
        signed(
            &env.http,
            &backend.at(&format!("/training/jobs/{id}/callback")),
            &secret,
            &json!({"status": "cancelled", "seq": 1}),
        )
        .send()
        .await
        .unwrap(),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    let mut status = 0;
    for _ in 0..100 {
        status = delete().await.unwrap().status().as_u16();
        if status == 204 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(status, 204);
    let prefix = BlobKey::parse("users/u/datasets/digits").unwrap();
    assert!(env.blobs.list(Some(&prefix)).await.unwrap().is_empty());
    assert_eq!(delete().await.unwrap().status(), 404);

    // Retention: the leader deletes finished jobs past the operator's
    // limit (a second, here, instead of days).
    let stores = vtp_storage::connect_stores(env.db.url()).await.unwrap();
    let dataset = env.dataset(&backend, "d").await;
    let old = env.finished(&backend, &dataset).await;
    let state = vtp_server::AppState::new(
        stores,
        env.blobs.clone(),
        Arc::new(vtp_launch::HttpLauncher::new(&env.trainer.url()).unwrap()),
        "http://127.0.0.1:1",
    );
    let policy = vtp_server::retention::Policy {
        keep_finished: Some(Duration::from_secs(1)),
        ..vtp_server::retention::Policy::default()
    };
    let now = chrono::Utc::now();
    let done = vtp_server::retention::retain_once(&state, &policy, now)
        .await
        .unwrap();
    assert_eq!(done.expired, 0, "finished less than a second ago");
    let later = now + chrono::Duration::seconds(5);
    let done = vtp_server::retention::retain_once(&state, &policy, later)
        .await
        .unwrap();
    // (The job cancelled above has finished too.)
    assert!(done.expired >= 1, "{done:?}");
    env.gone(&old).await;
    env.gone(&id).await;
}
