//! Tier 1 end to end, on the real binaries, Postgres and Garage: a dataset
//! archive is uploaded, a job trains in the subprocess trainer, reports every
//! epoch and leaves a checkpoint that downloads and predicts; a dead trainer
//! fails its job; a backend outage mid-run loses no epoch and duplicates none.

mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::{ServiceProcess, children_of, free_port};
use vtp_storage::testing::{TestDatabase, TestS3};
use vtp_trainer::engine::Predictor;
use vtp_trainer::testing::shapes_dataset;

const TRAINER_BIN: &str = env!("CARGO_BIN_EXE_vtp-trainer-service");

struct Env {
    db: TestDatabase,
    s3: TestS3,
    blob_url: String,
    work: tempfile::TempDir,
    http: reqwest::Client,
}

impl Env {
    async fn new() -> Option<Env> {
        let db = TestDatabase::create().await?;
        let s3 = TestS3::from_env()?;
        let blob_url = s3.fresh_url();
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .unwrap();
        Some(Env {
            db,
            s3,
            blob_url,
            work: tempfile::tempdir().unwrap(),
            http,
        })
    }

    fn backend_env(&self, launcher: &str) -> Vec<(&'static str, String)> {
        let mut env = self.s3.env_for(&self.blob_url);
        env.push(("VTP_DATABASE_URL", self.db.url().to_owned()));
        env.push(("VTP_LAUNCHER", launcher.to_owned()));
        env.push(("VTP_TRAINER_BIN", TRAINER_BIN.to_owned()));
        env.push((
            "VTP_WORK_DIR",
            self.work.path().join("trainer").display().to_string(),
        ));
        env
    }

    async fn call(&self, request: reqwest::RequestBuilder) -> (u16, Value) {
        let (status, body) = support::json_of(request.send().await.unwrap()).await;
        (status.as_u16(), body)
    }

    /// Uploads a zip of generated shapes through the backend; returns its URI.
    async fn upload_shapes(&self, backend: &ServiceProcess, per_class: usize) -> String {
        support::upload_shapes(&self.http, backend, "e2e", per_class, 11).await
    }

    async fn create_and_start(
        &self,
        backend: &ServiceProcess,
        dataset: &str,
        config: Value,
    ) -> String {
        let body = json!({"user_id": "e2e", "model_name": "small_cnn", "framework": "tch", "dataset_s3_uri": dataset, "config": config});
        let (status, job) = self
            .call(self.http.post(backend.at("/training/jobs")).json(&body))
            .await;
        assert_eq!(status, 201, "{job}");
        let id = job["id"].as_str().unwrap().to_owned();
        let (status, body) = self
            .call(
                self.http
                    .post(backend.at(&format!("/training/jobs/{id}/start"))),
            )
            .await;
        assert_eq!(status, 202, "{body}");
        id
    }

    /// Polls the job until `done`, collecting every status seen.
    async fn wait(
        &self,
        backend: &ServiceProcess,
        id: &str,
        done: impl Fn(&Value) -> bool,
    ) -> (Value, Vec<String>) {
        let mut seen: Vec<String> = Vec::new();
        for _ in 0..1800 {
            if let Ok(response) = self
                .http
                .get(backend.at(&format!("/training/jobs/{id}")))
                .send()
                .await
                && let Ok(job) = response.json::<Value>().await
            {
                let status = job["status"].as_str().unwrap_or_default().to_owned();
                if seen.last() != Some(&status) {
                    seen.push(status);
                }
                if done(&job) {
                    return (job, seen);
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("job {id} did not get there; saw {seen:?}");
    }
}

fn terminal(job: &Value) -> bool {
    matches!(
        job["status"].as_str(),
        Some("completed" | "failed" | "cancelled")
    )
}

fn config(epochs: u32) -> Value {
    json!({"epochs": epochs, "image_size": 16, "batch_size": 16, "threads": 1, "workers": 1, "hflip": false})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_trains_in_the_subprocess_trainer_and_its_checkpoint_predicts() {
    let Some(env) = Env::new().await else { return };
    let backend = ServiceProcess::start(&env.backend_env("subprocess")).await;
    let dataset = env.upload_shapes(&backend, 40).await;
    let id = env.create_and_start(&backend, &dataset, config(4)).await;
    let (job, seen) = env.wait(&backend, &id, terminal).await;
    assert_eq!(job["status"], "completed", "{job}");
    assert!(
        seen.iter().any(|s| s == "running") || job["started_at"].is_string(),
        "it ran: {seen:?}"
    );

    let (_, metrics) = env
        .call(
            env.http
                .get(backend.at(&format!("/training/jobs/{id}/metrics"))),
        )
        .await;
    let rows = metrics.as_array().unwrap();
    assert_eq!(
        rows.iter()
            .map(|m| m["epoch"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        [1, 2, 3, 4]
    );
    assert!(
        rows[3]["loss"].as_f64().unwrap() < rows[0]["loss"].as_f64().unwrap(),
        "{metrics}"
    );
    assert!(
        rows[3]["val_accuracy"].as_f64().unwrap() > 0.6,
        "well above chance: {metrics}"
    );

    // The checkpoint downloads through the API, so does its sidecar, and it predicts.
    let dir = tempfile::tempdir().unwrap();
    let response = env
        .http
        .get(backend.at(&format!("/training/jobs/{id}/checkpoint")))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    std::fs::write(
        dir.path().join("best.safetensors"),
        response.bytes().await.unwrap(),
    )
    .unwrap();
    let response = env
        .http
        .get(backend.at(&format!("/training/jobs/{id}/checkpoint/best.json")))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    std::fs::write(
        dir.path().join("best.json"),
        response.bytes().await.unwrap(),
    )
    .unwrap();
    let predictor = Predictor::load(&dir.path().join("best.safetensors")).unwrap();
    let images = tempfile::tempdir().unwrap();
    shapes_dataset(images.path(), 3, 99);
    let files: Vec<_> = ["disc", "square", "stripes"]
        .iter()
        .flat_map(|c| (0..3).map(move |i| (*c, i)))
        .collect();
    let paths: Vec<_> = files
        .iter()
        .map(|(c, i)| {
            images
                .path()
                .join(c)
                .join(format!("{i}.{}", if i % 2 == 0 { "png" } else { "jpg" }))
        })
        .collect();
    let predictions = predictor.predict_paths(&paths).unwrap();
    let correct = predictions
        .iter()
        .zip(&files)
        .filter(|(p, (c, _))| p.class == *c)
        .count();
    assert!(
        correct >= 6,
        "{correct}/9 fresh images right: {predictions:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trainer_that_dies_fails_its_job_with_the_exit_status() {
    let Some(env) = Env::new().await else { return };
    let backend = ServiceProcess::start(&env.backend_env("subprocess")).await;
    let dataset = env.upload_shapes(&backend, 20).await;
    let id = env.create_and_start(&backend, &dataset, config(2000)).await;
    env.wait(&backend, &id, |j| {
        j["progress"].as_f64().unwrap_or(0.0) > 0.0
    })
    .await;
    let trainers = children_of(backend.pid());
    assert_eq!(trainers.len(), 1, "one trainer child: {trainers:?}");
    std::process::Command::new("kill")
        .args(["-9", &trainers[0].to_string()])
        .status()
        .unwrap();
    let (job, _) = env.wait(&backend, &id, terminal).await;
    assert_eq!(job["status"], "failed", "{job}");
    let error = job["error"].as_str().unwrap();
    assert!(
        error.contains("trainer process exited") && error.contains("9"),
        "{error}"
    );

    // The next job gets a fresh trainer.
    let id = env.create_and_start(&backend, &dataset, config(1)).await;
    assert_eq!(
        env.wait(&backend, &id, terminal).await.0["status"],
        "completed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_outage_mid_run_loses_and_duplicates_no_epoch() {
    let Some(env) = Env::new().await else { return };
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    // Tier 2 shape: a trainer service of its own, reached over HTTP, that
    // reports only to this backend and answers only its token.
    let mut trainer_env = env.s3.env_for(&env.blob_url);
    trainer_env.push((
        "VTP_WORK_DIR",
        env.work.path().join("trainer").display().to_string(),
    ));
    trainer_env.push(("VTP_BACKEND_URL", format!("http://{listen}")));
    trainer_env.push(("VTP_TRAINER_TOKEN", "vtp_tier2-shared-token".to_owned()));
    let trainer = ServiceProcess::spawn(
        TRAINER_BIN,
        &["--listen", "127.0.0.1:0"],
        &trainer_env,
        "vtp-trainer-service listening on ",
    )
    .await;
    let mut backend_env = env.backend_env("http");
    backend_env.push(("VTP_TRAINER_URL", trainer.url.clone()));
    backend_env.push(("VTP_TRAINER_TOKEN", "vtp_tier2-shared-token".to_owned()));
    let start = |env: Vec<(&'static str, String)>, listen: String| async move {
        ServiceProcess::spawn(
            env!("CARGO_BIN_EXE_vtp-backend"),
            &["--listen", &listen],
            &env,
            "vtp-backend listening on ",
        )
        .await
    };
    let backend = start(backend_env.clone(), listen.clone()).await;
    let dataset = env.upload_shapes(&backend, 60).await;
    let epochs = 12;
    let id = env
        .create_and_start(&backend, &dataset, config(epochs))
        .await;
    env.wait(&backend, &id, |j| {
        j["progress"].as_f64().unwrap_or(0.0) > 0.0
    })
    .await;

    backend.kill().await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    let backend = start(backend_env, listen).await;
    let (job, _) = env.wait(&backend, &id, terminal).await;
    assert_eq!(
        job["status"], "completed",
        "the job was re-adopted, not failed: {job}"
    );
    let (_, metrics) = env
        .call(
            env.http
                .get(backend.at(&format!("/training/jobs/{id}/metrics"))),
        )
        .await;
    let got: Vec<u64> = metrics
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["epoch"].as_u64().unwrap())
        .collect();
    assert_eq!(
        got,
        (1..=u64::from(epochs)).collect::<Vec<_>>(),
        "every epoch exactly once"
    );
    let (_, health) = env
        .call(env.http.get(format!("{}/health", trainer.url)))
        .await;
    assert_eq!(health["pending_reports"], 0, "the outbox drained");
}
