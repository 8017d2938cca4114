//! The trainer service and its HTTP shell without libtorch: an [`Engine`]
//! whose trainer follows the [`Trainer`] contract on a real dataset archive
//! (it counts the images it was given, steps, checks for cancellation
//! between steps, writes its checkpoint files) stands in for the tch engine,
//! and a callback receiver on loopback verifies every report's signature.
//! What is checked is the service's side of the contract: admission, step
//! heartbeats, one report per epoch, checkpoint sets and the final upload,
//! cancellation, `/models` and `/health` from the engine.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use serde_json::{Value, json};
use vtp_core::api::ModelInfo;
use vtp_core::{
    BlobKey, BlobStore, BlobStoreExt, CallbackSecret, EpochReport, Error, JobId, JobStatus,
    ProgressSink, Result, StepProgress, Task, TrainSpec, TrainSummary, Trainer, TrainingReport,
};
use vtp_storage::ObjectStoreBlobStore;
use vtp_trainer::service::http::serve_trainer;
use vtp_trainer::service::{Engine, ServiceOptions, TrainerService};
use vtp_trainer::testing::{shapes_dataset, zip_dir};

const TOKEN: &str = "vtp_service-test-token";

/// Trains nothing, honestly: per epoch it takes `steps` steps of `step_time`
/// over the images it was given, reports a loss that falls and an accuracy
/// that rises with the epoch, and writes `last` (and `best`) files.
#[derive(Debug, Clone)]
struct CountingEngine {
    steps: usize,
    step_time: Duration,
}

impl Engine for CountingEngine {
    fn trainer(&self) -> Box<dyn Trainer> {
        Box::new(self.clone())
    }

    fn models(&self) -> Result<Vec<ModelInfo>> {
        Ok(vec![ModelInfo {
            name: "counting".into(),
            task: Task::Classify,
            description: "counts images".into(),
            min_image_size: 8,
            parameters: Some(0),
            engine: vtp_core::Engine::Native,
        }])
    }
}

fn images_under(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| {
                    let path = e.path();
                    if path.is_dir() {
                        images_under(&path)
                    } else {
                        usize::from(path.extension().is_some_and(|x| x == "png"))
                    }
                })
                .sum()
        })
        .unwrap_or(0)
}

impl Trainer for CountingEngine {
    fn train(
        &mut self,
        spec: &TrainSpec,
        progress: &mut dyn ProgressSink,
        cancelled: &(dyn Fn() -> bool + Sync),
    ) -> Result<TrainSummary> {
        let images = images_under(&spec.dataset_dir);
        if images == 0 {
            return Err(Error::invalid("dataset_s3_uri", "no images"));
        }
        let epochs = u32::try_from(spec.config["epochs"].as_u64().unwrap_or(1)).unwrap_or(1);
        std::fs::create_dir_all(&spec.output_dir).map_err(|e| Error::internal(e.to_string()))?;
        let mut metrics = BTreeMap::new();
        for epoch in 1..=epochs {
            for step in 1..=self.steps {
                if cancelled() {
                    return Err(Error::Cancelled {
                        reason: "cancelled".into(),
                    });
                }
                std::thread::sleep(self.step_time);
                progress.step_finished(&StepProgress {
                    epoch,
                    epochs,
                    step,
                    steps: self.steps,
                    loss: 1.0 / f64::from(epoch),
                });
            }
            let weights = format!("{images} images, epoch {epoch}");
            for name in ["last.safetensors", "best.safetensors"] {
                std::fs::write(spec.output_dir.join(name), &weights)
                    .map_err(|e| Error::internal(e.to_string()))?;
            }
            metrics = BTreeMap::from([
                ("epoch".to_owned(), f64::from(epoch)),
                ("loss".to_owned(), 1.0 / f64::from(epoch)),
                (
                    "val_accuracy".to_owned(),
                    f64::from(epoch) / f64::from(epochs),
                ),
            ]);
            progress.epoch_finished(&EpochReport {
                epoch,
                epochs,
                metrics: metrics.clone(),
            });
        }
        Ok(TrainSummary {
            epochs,
            checkpoint: spec.output_dir.join("best.safetensors"),
            metrics,
            stopped: None,
            per_class: None,
        })
    }
}

/// The backend's callback route, reduced to verifying and recording.
#[derive(Clone)]
struct Receiver {
    secret: CallbackSecret,
    reports: Arc<Mutex<Vec<TrainingReport>>>,
}

async fn receive(
    State(receiver): State<Receiver>,
    headers: HeaderMap,
    body: Bytes,
) -> &'static str {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    receiver
        .secret
        .verify(&headers, &body, i64::try_from(now).unwrap())
        .expect("every report is signed with the job's secret");
    let update: TrainingReport = serde_json::from_slice(&body).unwrap();
    receiver.reports.lock().unwrap().push(update);
    "{}"
}

struct Stack {
    trainer: String,
    callback_base: String,
    receiver: Receiver,
    blobs: Arc<dyn BlobStore>,
    dataset: String,
    http: reqwest::Client,
    work: tempfile::TempDir,
}

async fn stack(engine: CountingEngine) -> Stack {
    let work = tempfile::tempdir().unwrap();
    let blobs: Arc<dyn BlobStore> = Arc::new(ObjectStoreBlobStore::in_memory());
    shapes_dataset(&work.path().join("shapes"), 3, 7);
    let archive = work.path().join("shapes.zip");
    zip_dir(&work.path().join("shapes"), &archive);
    let key = BlobKey::parse("users/alice/datasets/shapes/shapes.zip").unwrap();
    blobs.put_file(&key, &archive).await.unwrap();

    let receiver = Receiver {
        secret: CallbackSecret::generate(),
        reports: Arc::default(),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let callback_base = format!("http://{}", listener.local_addr().unwrap());
    let app = axum::Router::new()
        .route("/training/jobs/{id}/callback", axum::routing::post(receive))
        .with_state(receiver.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });

    let service = TrainerService::with_options(
        Arc::new(engine),
        blobs.clone(),
        &work.path().join("trainer"),
        ServiceOptions {
            backend_url: callback_base.clone(),
            heartbeat: Duration::from_secs(1),
            ..ServiceOptions::default()
        },
    )
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let trainer = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(serve_trainer(
        listener,
        service,
        Some(TOKEN.into()),
        std::future::pending(),
    ));
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        format!("Bearer {TOKEN}").parse().unwrap(),
    );
    Stack {
        trainer,
        callback_base,
        receiver,
        dataset: blobs.uri(&key),
        blobs,
        http: reqwest::Client::builder()
            .default_headers(headers)
            .build()
            .unwrap(),
        work,
    }
}

impl Stack {
    fn start_body(&self, job_id: JobId, epochs: u32) -> Value {
        json!({
            "job_id": job_id,
            "config": {"model": "small_cnn", "epochs": epochs},
            "dataset_s3_uri": self.dataset,
            "callback_url": format!("{}/training/jobs/{job_id}/callback", self.callback_base),
            "callback_secret": self.receiver.secret.expose(),
            "attempt": 1,
            "heartbeat_secs": 1,
        })
    }

    async fn start(&self, job_id: JobId, epochs: u32) -> reqwest::Response {
        self.post_start(&self.start_body(job_id, epochs)).await
    }

    async fn post_start(&self, body: &Value) -> reqwest::Response {
        self.http
            .post(format!("{}/training/start", self.trainer))
            .json(body)
            .send()
            .await
            .unwrap()
    }

    fn reports(&self) -> Vec<TrainingReport> {
        self.receiver.reports.lock().unwrap().clone()
    }

    /// Waits for a report in a terminal state; returns every report so far.
    async fn until_final(&self) -> Vec<TrainingReport> {
        for _ in 0..600 {
            let reports = self.reports();
            if reports.iter().any(|r| r.status.is_terminal()) {
                return reports;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("no final report: {:?}", self.reports());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_reports_steps_and_epochs_and_its_checkpoint_is_uploaded() {
    let s = stack(CountingEngine {
        steps: 6,
        step_time: Duration::from_millis(250),
    })
    .await;
    let job_id = JobId::new();
    let response = s.start(job_id, 2).await;
    assert_eq!(response.status(), 202, "{:?}", response.text().await);
    // The same job again is no second run.
    assert_eq!(s.start(job_id, 2).await.status(), 409);

    let reports = s.until_final().await;
    let last = reports.last().unwrap();
    assert_eq!(last.status, JobStatus::Completed, "{reports:?}");
    assert!(
        last.message
            .as_deref()
            .unwrap()
            .contains("val accuracy 100.00%"),
        "{last:?}"
    );
    // Seqs rise; every report names its attempt.
    let seqs: Vec<i64> = reports.iter().map(|r| r.seq.unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    assert!(reports.iter().all(|r| r.attempt == Some(1)));
    // One metrics report per epoch, in order.
    let epochs: Vec<f64> = reports
        .iter()
        .filter_map(|r| r.metrics.as_ref()?.get("epoch").copied())
        .collect();
    assert_eq!(epochs, [1.0, 2.0]);
    // Heartbeats carried the trainer's steps (1.5 s per epoch, a beat a second).
    assert!(
        reports.iter().any(|r| r
            .message
            .as_deref()
            .is_some_and(|m| m.starts_with("epoch ") && m.contains(": step "))),
        "{reports:?}"
    );
    // After the first epoch a checkpoint set was stored to resume from.
    assert!(reports.iter().any(|r| r.last_checkpoint_s3_uri.is_some()));
    // The final checkpoint is the trainer's file, uploaded under the job.
    let uri = last.checkpoint_s3_uri.clone().unwrap();
    let key = s.blobs.key_for(&uri).unwrap();
    assert_eq!(key.as_str(), format!("jobs/{job_id}/best.safetensors"));
    let bytes = s.blobs.get_bytes(&key).await.unwrap();
    let images = images_under(&s.work.path().join("shapes"));
    assert!(images > 0);
    assert_eq!(
        std::str::from_utf8(&bytes).unwrap(),
        format!("{images} images, epoch 2"),
        "the trainer saw every image of the archive"
    );

    // The job is over: once its last report is delivered, the service
    // holds it no longer.
    let mut status = 0;
    for _ in 0..100 {
        status = s
            .http
            .get(format!("{}/training/{job_id}", s.trainer))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16();
        if status == 404 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_stops_the_trainer_between_steps() {
    let s = stack(CountingEngine {
        steps: 1000,
        step_time: Duration::from_millis(20),
    })
    .await;
    let job_id = JobId::new();
    assert_eq!(s.start(job_id, 50).await.status(), 202);
    for _ in 0..200 {
        let state = s
            .http
            .get(format!("{}/training/{job_id}", s.trainer))
            .send()
            .await
            .unwrap();
        let body: Value = state.json().await.unwrap();
        if body["state"] == "running" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let cancel = s
        .http
        .post(format!("{}/training/{job_id}/cancel", s.trainer))
        .send()
        .await
        .unwrap();
    assert_eq!(cancel.status(), 202);
    let reports = s.until_final().await;
    assert_eq!(
        reports.last().unwrap().status,
        JobStatus::Cancelled,
        "{reports:?}"
    );
    // Cancelled inside the first epoch: no epoch was reported.
    assert!(reports.iter().all(|r| r.metrics.is_none()), "{reports:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_models_and_health_come_from_the_service_and_its_engine() {
    let s = stack(CountingEngine {
        steps: 1,
        step_time: Duration::ZERO,
    })
    .await;
    // No token: 401, whatever the route.
    let anonymous = reqwest::Client::new()
        .get(format!("{}/models", s.trainer))
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), 401);

    let models: Value = s
        .http
        .get(format!("{}/models", s.trainer))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models["models"][0]["name"], "counting", "{models}");
    assert_eq!(
        models["classify_defaults"]["model"], "small_cnn",
        "{models}"
    );
    assert_eq!(models["detect_defaults"]["model"], "yolo11n", "{models}");

    let health: Value = reqwest::get(format!("{}/health", s.trainer))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["status"], "ok");
    assert_eq!(health["cuda"], false);

    // A config the trainer would refuse is refused before any work,
    // naming the field; so is a dataset outside the store.
    let job_id = JobId::new();
    let mut body = s.start_body(job_id, 1);
    body["config"]["epocs"] = json!(3);
    let refused = s.post_start(&body).await;
    assert_eq!(refused.status(), 422);
    let error: Value = refused.json().await.unwrap();
    assert_eq!(error["error"]["field"], "config.epocs", "{error}");

    let mut body = s.start_body(job_id, 1);
    body["dataset_s3_uri"] = json!("s3://elsewhere/datasets/x.zip");
    let refused = s.post_start(&body).await;
    assert_eq!(refused.status(), 422);
    let error: Value = refused.json().await.unwrap();
    assert_eq!(error["error"]["field"], "dataset_s3_uri", "{error}");
    assert!(s.reports().is_empty(), "a refused start reports nothing");
}
