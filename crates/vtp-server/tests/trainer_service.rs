//! The trainer service in process, behind a real backend in process: jobs
//! train, report every epoch, upload checkpoints, cancel, and fail with the
//! reason on bad input, while the service keeps serving.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use vtp_core::{BlobKey, BlobStore, BlobStoreExt};
use vtp_launch::HttpLauncher;
use vtp_server::AppState;
use vtp_storage::{ObjectStoreBlobStore, Stores};
use vtp_trainer::TchEngine;
use vtp_trainer::service::{ServiceOptions, TrainerService};

/// The token the backend and the trainer service share here.
const TRAINER_TOKEN: &str = "vtp_test-trainer-token";

/// A client that sends the trainer token (the backend ignores it: auth is off).
fn client() -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        format!("Bearer {TRAINER_TOKEN}").parse().unwrap(),
    );
    reqwest::Client::builder()
        .default_headers(headers)
        .build()
        .unwrap()
}
use vtp_trainer::testing::{shapes_dataset, zip_dir};

struct Stack {
    backend: String,
    trainer: String,
    blobs: Arc<dyn BlobStore>,
    http: reqwest::Client,
    _work: tempfile::TempDir,
}

async fn stack() -> Stack {
    let work = tempfile::tempdir().unwrap();
    let blobs: Arc<dyn BlobStore> = Arc::new(ObjectStoreBlobStore::in_memory());
    let backend_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = format!("http://{}", backend_listener.local_addr().unwrap());
    let service = TrainerService::with_options(
        Arc::new(TchEngine),
        blobs.clone(),
        &work.path().join("trainer"),
        ServiceOptions {
            backend_url: backend.clone(),
            ..ServiceOptions::default()
        },
    )
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let trainer = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(vtp_trainer::service::http::serve_trainer(
        listener,
        service,
        Some(TRAINER_TOKEN.into()),
        std::future::pending(),
    ));

    let listener = backend_listener;
    let state = AppState::new(
        Stores::memory(),
        blobs.clone(),
        Arc::new(
            HttpLauncher::new(&trainer)
                .unwrap()
                .with_token(TRAINER_TOKEN),
        ),
        backend.clone(),
    );
    tokio::spawn(vtp_server::serve(listener, state, std::future::pending()));
    Stack {
        backend,
        trainer,
        blobs,
        http: client(),
        _work: work,
    }
}

impl Stack {
    /// Uploads a zip of generated shapes; returns its URI.
    async fn shapes(&self, per_class: usize) -> String {
        let dir = tempfile::tempdir().unwrap();
        shapes_dataset(&dir.path().join("shapes"), per_class, 5);
        let archive = dir.path().join("shapes.zip");
        zip_dir(&dir.path().join("shapes"), &archive);
        let key = BlobKey::parse("users/t/datasets/shapes/shapes.zip").unwrap();
        self.blobs.put_file(&key, &archive).await.unwrap();
        self.blobs.uri(&key)
    }

    async fn call(&self, request: reqwest::RequestBuilder) -> (u16, Value) {
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    async fn create_and_start(&self, dataset: &str, config: Value) -> (String, u16, Value) {
        let body = json!({"user_id": "t", "model_name": "small_cnn", "framework": "tch", "dataset_s3_uri": dataset, "config": config});
        let (status, job) = self
            .call(
                self.http
                    .post(format!("{}/training/jobs", self.backend))
                    .json(&body),
            )
            .await;
        assert_eq!(status, 201, "{job}");
        let id = job["id"].as_str().unwrap().to_owned();
        let (status, started) = self
            .call(
                self.http
                    .post(format!("{}/training/jobs/{id}/start", self.backend)),
            )
            .await;
        (id, status, started)
    }

    async fn job(&self, id: &str) -> Value {
        self.call(
            self.http
                .get(format!("{}/training/jobs/{id}", self.backend)),
        )
        .await
        .1
    }

    async fn wait(&self, id: &str, done: impl Fn(&Value) -> bool) -> Value {
        for _ in 0..1200 {
            let job = self.job(id).await;
            if done(&job) {
                return job;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("job {id} never got there: {}", self.job(id).await);
    }

    async fn finished(&self, id: &str) -> Value {
        self.wait(id, |j| {
            matches!(
                j["status"].as_str(),
                Some("completed" | "failed" | "cancelled")
            )
        })
        .await
    }
}

fn small(epochs: u32) -> Value {
    json!({"epochs": epochs, "image_size": 16, "batch_size": 16, "threads": 1, "workers": 1, "hflip": false})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_trains_reports_every_epoch_and_uploads_checkpoints() {
    let s = stack().await;
    let dataset = s.shapes(30).await;
    let (id, status, body) = s.create_and_start(&dataset, small(3)).await;
    assert_eq!(status, 202, "{body}");
    let job = s.finished(&id).await;
    assert_eq!(job["status"], "completed", "{job}");
    assert!(job["started_at"].is_string() && job["finished_at"].is_string());
    assert!(
        job["message"].as_str().unwrap().contains("val accuracy"),
        "{job}"
    );
    // The final report's validation per class, stored with the job.
    let per_class = &job["per_class"];
    assert_eq!(per_class["metric"], "accuracy", "{job}");
    assert_eq!(
        per_class["classes"],
        serde_json::json!(["disc", "square", "stripes"])
    );
    assert_eq!(per_class["values"].as_array().unwrap().len(), 3);
    assert_eq!(per_class["confusion"].as_array().unwrap().len(), 3);
    let (_, metrics) = s
        .call(
            s.http
                .get(format!("{}/training/jobs/{id}/metrics", s.backend)),
        )
        .await;
    let epochs: Vec<u64> = metrics
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["epoch"].as_u64().unwrap())
        .collect();
    assert_eq!(epochs, [1, 2, 3]);
    for key in [
        "loss",
        "val_loss",
        "val_accuracy",
        "epoch_seconds",
        "images_per_second",
    ] {
        assert!(metrics[2][key].is_number(), "{key} in {}", metrics[2]);
    }
    let uri = job["checkpoint_s3_uri"].as_str().unwrap();
    assert!(
        uri.ends_with(&format!("jobs/{id}/best.safetensors")),
        "{uri}"
    );
    let listed: Vec<String> = s
        .blobs
        .list(Some(&BlobKey::parse(&format!("jobs/{id}")).unwrap()))
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.key.file_name().to_owned())
        .collect();
    for name in [
        "best.safetensors",
        "best.json",
        "last.safetensors",
        "last.json",
        "last.optim.safetensors",
    ] {
        assert!(listed.iter().any(|l| l == name), "{name} in {listed:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_configs_are_refused_before_any_work() {
    let s = stack().await;
    let start = json!({"job_id": vtp_core::JobId::new(), "config": {"model": "resnet9000"},
                       "dataset_s3_uri": "s3://vtp-memory/x.zip", "callback_url": format!("{}/cb", s.backend)});
    let (status, body) = s
        .call(
            s.http
                .post(format!("{}/training/start", s.trainer))
                .json(&start),
        )
        .await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["field"], "config.model");
    let (_, health) = s.call(s.http.get(format!("{}/health", s.trainer))).await;
    assert_eq!(health["jobs"], json!([]), "nothing was started");

    // Through the backend, a bad hyperparameter is refused at create: the
    // backend reads `config` as the trainer's own TrainConfig.
    let dataset = s.shapes(4).await;
    let body = json!({"user_id": "t", "model_name": "small_cnn", "framework": "tch",
                      "dataset_s3_uri": dataset, "config": {"epochs": 0}});
    let (status, answer) = s
        .call(
            s.http
                .post(format!("{}/training/jobs", s.backend))
                .json(&body),
        )
        .await;
    assert_eq!(status, 422, "{answer}");
    assert_eq!(answer["error"]["field"], "config.epochs", "{answer}");

    // Initial weights outside the store are refused at create too, naming
    // the field, before anything is launched.
    let body = json!({"user_id": "t", "model_name": "small_cnn", "framework": "tch",
                      "dataset_s3_uri": dataset,
                      "config": {"init_weights": "s3://elsewhere/w.safetensors"}});
    let (status, answer) = s
        .call(
            s.http
                .post(format!("{}/training/jobs", s.backend))
                .json(&body),
        )
        .await;
    assert_eq!(status, 422, "{answer}");
    assert_eq!(answer["error"]["field"], "config.init_weights", "{answer}");
    let (_, health) = s.call(s.http.get(format!("{}/health", s.trainer))).await;
    assert_eq!(health["jobs"], json!([]), "nothing was started");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_are_listed() {
    let s = stack().await;
    let (status, body) = s.call(s.http.get(format!("{}/models", s.trainer))).await;
    assert_eq!(status, 200);
    let (native, package): (Vec<_>, Vec<_>) = body["models"]
        .as_array()
        .unwrap()
        .iter()
        .partition(|m| m["engine"] == "native");
    let names: Vec<&str> = native.iter().map(|m| m["name"].as_str().unwrap()).collect();
    // Then every model the ultralytics package engine builds, for each of
    // its tasks; it counts no parameters (the package does).
    assert_eq!(package.len(), 50);
    assert!(
        package
            .iter()
            .all(|m| m["engine"] == "package" && m["parameters"].is_null())
    );
    let seg = package.iter().find(|m| m["name"] == "yolo11n-seg").unwrap();
    assert_eq!(seg["task"], "segment", "{seg}");
    for task in ["detect", "segment", "classify", "pose", "obb"] {
        assert!(package.iter().any(|m| m["task"] == task), "{task}");
    }
    assert_eq!(
        names,
        [
            "small_cnn",
            "resnet18",
            "resnet34",
            "mobilenet_v2",
            "yolov8n",
            "yolov8s",
            "yolo11n",
            "yolo11s"
        ]
    );
    assert!(
        body["models"][1]["parameters"].as_i64().unwrap() > 11_000_000,
        "{}",
        body["models"][1]
    );
    assert_eq!(body["models"][1]["task"], "classify");
    // yolo11n with 80 classes: Ultralytics' summary says 2,624,080
    // parameters, 2,624,064 of which take gradients (the 16 DFL bins are fixed).
    assert_eq!(body["models"][6]["task"], "detect");
    assert_eq!(
        body["models"][6]["parameters"], 2_624_064,
        "{}",
        body["models"][6]
    );
    // The config defaults of each task, as the typed catalog answers them.
    let catalog: vtp_core::api::ModelCatalog = serde_json::from_value(body.clone()).unwrap();
    assert_eq!(catalog.classify_defaults.lr, 0.05);
    assert_eq!(catalog.detect_defaults.model, "yolo11n");
    assert_eq!(catalog.detect_defaults.close_mosaic, 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_stops_the_job_and_keeps_its_last_checkpoint() {
    let s = stack().await;
    let dataset = s.shapes(30).await;
    let (id, status, _) = s.create_and_start(&dataset, small(500)).await;
    assert_eq!(status, 202);
    // Wait for the first epoch's report, then cancel.
    s.wait(&id, |j| j["progress"].as_f64().unwrap_or(0.0) > 0.0)
        .await;
    let (status, body) = s
        .call(s.http.delete(format!("{}/training/jobs/{id}", s.backend)))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "cancelling");
    let job = s.finished(&id).await;
    assert_eq!(job["status"], "cancelled", "{job}");
    let uri = job["checkpoint_s3_uri"]
        .as_str()
        .expect("the last checkpoint is kept");
    assert!(uri.ends_with("last.safetensors"), "{uri}");
    assert!(
        s.blobs
            .exists(&s.blobs.key_for(uri).unwrap())
            .await
            .unwrap()
    );
    let (_, health) = s.call(s.http.get(format!("{}/health", s.trainer))).await;
    assert_eq!(health["jobs"], json!([]), "the slot is free again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attempt_given_up_on_is_stopped_as_an_interruption_and_the_job_resumes() {
    let s = stack().await;
    let dataset = s.shapes(30).await;
    let (id, status, _) = s.create_and_start(&dataset, small(40)).await;
    assert_eq!(status, 202);
    s.wait(&id, |j| j["last_checkpoint_s3_uri"].is_string())
        .await;
    let stop = |attempt: i32| {
        s.http
            .post(format!(
                "{}/training/{id}/cancel?attempt={attempt}",
                s.trainer
            ))
            .bearer_auth(TRAINER_TOKEN)
    };
    // The backend gave up on attempt 0 (there is none): nothing here is it.
    let (status, _) = s.call(stop(0)).await;
    assert_eq!(status, 404, "a later attempt is left alone");
    // Attempt 1 is stopped as an interruption: it reports a retryable
    // failure, the backend relaunches the job, and it resumes.
    let (status, body) = s.call(stop(1)).await;
    assert_eq!(status, 202, "{body}");
    let job = s.finished(&id).await;
    assert_eq!(job["status"], "completed", "{job}");
    assert_eq!(job["attempt"], 2, "{job}");
    let reason = job["attempts"][0]["reason"].as_str().unwrap();
    assert!(reason.contains("stopped by its host"), "{reason}");
}

async fn upload_zip(s: &Stack, name: &str, entries: &[(&str, &[u8])]) -> String {
    use std::io::Write;
    let mut buf = std::io::Cursor::new(Vec::new());
    {
        let mut writer = zip::ZipWriter::new(&mut buf);
        for (path, data) in entries {
            writer
                .start_file(*path, zip::write::SimpleFileOptions::default())
                .unwrap();
            writer.write_all(data).unwrap();
        }
        writer.finish().unwrap();
    }
    let key = BlobKey::parse(&format!("users/t/datasets/{name}/{name}.zip")).unwrap();
    s.blobs
        .put_bytes(&key, buf.into_inner().into())
        .await
        .unwrap();
    s.blobs.uri(&key)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_datasets_fail_the_job_with_the_reason_and_the_service_keeps_serving() {
    let s = stack().await;
    let png = {
        let mut bytes = std::io::Cursor::new(Vec::new());
        image::RgbImage::new(4, 4)
            .write_to(&mut bytes, image::ImageFormat::Png)
            .unwrap();
        bytes.into_inner()
    };
    let hostile = upload_zip(
        &s,
        "hostile",
        &[("a/1.png", &png), ("../../escape.png", &png)],
    )
    .await;
    let one_class = upload_zip(
        &s,
        "oneclass",
        &[("cats/1.png", &png), ("cats/2.png", &png)],
    )
    .await;
    let corrupt = upload_zip(
        &s,
        "corrupt",
        &[
            ("a/1.png", b"not a png"),
            ("a/2.png", b"nope"),
            ("b/1.png", &png),
            ("b/2.png", &png),
        ],
    )
    .await;
    let text = {
        let key = BlobKey::parse("users/t/datasets/text/notes.txt").unwrap();
        s.blobs
            .put_bytes(&key, bytes::Bytes::from_static(b"hello"))
            .await
            .unwrap();
        s.blobs.uri(&key)
    };
    for (dataset, reason) in [
        (hostile, "escapes"),
        (one_class, "single class"),
        (corrupt, "corrupt"),
        (text, "not a .zip"),
    ] {
        let (id, status, body) = s.create_and_start(&dataset, small(2)).await;
        assert_eq!(status, 202, "{body}");
        let job = s.finished(&id).await;
        assert_eq!(job["status"], "failed", "{job}");
        assert!(
            job["error"].as_str().unwrap().contains(reason),
            "{reason}: {job}"
        );
    }
    // A CUDA request without CUDA fails the job, not the service.
    let good = s.shapes(10).await;
    let mut cuda = small(1);
    cuda["device"] = "cuda".into();
    let (id, _, _) = s.create_and_start(&good, cuda).await;
    let job = s.finished(&id).await;
    if !tch::Cuda::is_available() {
        assert_eq!(job["status"], "failed");
        assert!(job["error"].as_str().unwrap().contains("cuda"), "{job}");
    }
    let (id, _, _) = s.create_and_start(&good, small(1)).await;
    assert_eq!(
        s.finished(&id).await["status"],
        "completed",
        "the service still trains"
    );
}

/// Counts the connections made to it: nothing may reach it.
struct Canary {
    url: String,
    hits: Arc<std::sync::atomic::AtomicUsize>,
}

impl Canary {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let hits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = hits.clone();
        tokio::spawn(async move {
            while let Ok((_socket, _)) = listener.accept().await {
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        });
        Canary { url, hits }
    }

    fn hits(&self) -> usize {
        self.hits.load(std::sync::atomic::Ordering::SeqCst)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_trainer_answers_only_its_backend_and_reports_only_to_it() {
    let s = stack().await;
    let canary = Canary::start().await;
    let start = |callback_url: &str| {
        json!({"job_id": vtp_core::JobId::new(), "config": {"model": "small_cnn", "epochs": 1},
               "dataset_s3_uri": "s3://vtp-memory/x.zip", "callback_url": callback_url})
    };
    // Without the shared token: refused before anything is read.
    let (status, _) = s
        .call(
            reqwest::Client::new()
                .post(format!("{}/training/start", s.trainer))
                .json(&start(&format!("{}/cb", s.backend))),
        )
        .await;
    assert_eq!(status, 401);
    let backend = url::Url::parse(&s.backend).unwrap();
    let port = backend.port().unwrap();
    // Every address that could be a loopback alias names a port something
    // listens on (the canary's), so a validation slip would show as a hit.
    let canary_port = url::Url::parse(&canary.url).unwrap().port().unwrap();
    let elsewhere = [
        "http://169.254.169.254/latest/meta-data/".to_owned(),
        "http://127.0.0.1:5432/".to_owned(),
        format!("http://[::1]:{port}/cb"),
        format!("http://0x7f000001:{canary_port}/cb"),
        format!("http://2130706433:{canary_port}/cb"),
        format!("http://127.1:{canary_port}/cb"),
        "file:///etc/passwd".to_owned(),
        "http://[example.com]/cb".to_owned(),
        format!("{}/training/jobs/x/callback", canary.url),
        format!("http://user:pw@127.0.0.1:{port}/cb"),
        format!("https://127.0.0.1:{port}/cb"),
    ];
    for url in &elsewhere {
        let (status, body) = s
            .call(
                s.http
                    .post(format!("{}/training/start", s.trainer))
                    .json(&start(url)),
            )
            .await;
        assert_eq!(status, 422, "{url}: {body}");
        assert_eq!(body["error"]["field"], "callback_url", "{url}: {body}");
    }
    let (_, health) = s.call(s.http.get(format!("{}/health", s.trainer))).await;
    assert_eq!(health["jobs"], json!([]), "nothing was started");

    // On the backend's origin but redirected elsewhere: the report is not
    // followed there. The "backend" here answers every report with a 307.
    let redirects = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = redirects.clone();
    let target = format!("{}/stolen", canary.url);
    let redirector = axum::Router::new().fallback(move || {
        seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let target = target.clone();
        async move { axum::response::Redirect::temporary(&target) }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let origin = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, redirector).await });
    let work = tempfile::tempdir().unwrap();
    let service = TrainerService::with_options(
        Arc::new(TchEngine),
        s.blobs.clone(),
        work.path(),
        ServiceOptions {
            backend_url: origin.clone(),
            ..ServiceOptions::default()
        },
    )
    .unwrap();
    let outbox = service.outbox().clone();
    tokio::spawn(async move { outbox.run().await });
    let job_id = vtp_core::JobId::new();
    let request: vtp_core::StartTraining = serde_json::from_value(json!({
        "job_id": job_id, "config": {"model": "small_cnn", "epochs": 1},
        "dataset_s3_uri": "s3://vtp-memory/missing.zip",
        "callback_url": format!("{origin}/training/jobs/{job_id}/callback"),
    }))
    .unwrap();
    service.start(request).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while redirects.load(std::sync::atomic::Ordering::SeqCst) == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the failure was never reported"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(service.outbox().drained(Duration::from_secs(10)).await);
    assert_eq!(
        canary.hits(),
        0,
        "no request reached anything off the backend's origin"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_answers_429_with_retry_after() {
    let work = tempfile::tempdir().unwrap();
    let blobs: Arc<dyn BlobStore> = Arc::new(ObjectStoreBlobStore::in_memory());
    let service = TrainerService::with_options(
        Arc::new(TchEngine),
        blobs,
        work.path(),
        ServiceOptions {
            max_waiting: 0,
            ..ServiceOptions::default()
        },
    )
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(vtp_trainer::service::http::serve_trainer(
        listener,
        service,
        Some(TRAINER_TOKEN.into()),
        std::future::pending(),
    ));
    let start = json!({"job_id": vtp_core::JobId::new(), "config": {"model": "small_cnn"},
                       "dataset_s3_uri": "s3://vtp-memory/x.zip",
                       "callback_url": "http://127.0.0.1:8000/training/jobs/x/callback"});
    let response = client()
        .post(format!("{url}/training/start"))
        .json(&start)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 429);
    assert_eq!(response.headers()["retry-after"], "30");
}

#[tokio::test]
async fn a_stored_checkpoint_set_restores_only_when_every_file_matches_its_manifest() {
    use vtp_trainer::service::checkpoints::{restore_set, store_set};
    let blobs: Arc<dyn BlobStore> = Arc::new(ObjectStoreBlobStore::in_memory());
    let job = vtp_core::JobId::new();
    let work = tempfile::tempdir().unwrap();
    let output = work.path().join("output");
    std::fs::create_dir_all(&output).unwrap();
    for (name, bytes) in [
        ("last.safetensors", &b"weights of epoch 3"[..]),
        ("last.optim.safetensors", b"optimizer state"),
        ("last.json", b"{\"epoch\": 3}"),
        ("best.safetensors", b"best weights"),
    ] {
        std::fs::write(output.join(name), bytes).unwrap();
    }
    let metrics =
        std::collections::BTreeMap::from([("epoch".to_owned(), 3.0), ("loss".to_owned(), 0.5)]);
    let uri = store_set(blobs.as_ref(), job, 3, &metrics, &output)
        .await
        .unwrap();
    assert!(
        uri.ends_with(&format!("jobs/{job}/epochs/000003/last.safetensors")),
        "{uri}"
    );

    let restored = work.path().join("restored");
    std::fs::create_dir_all(&restored).unwrap();
    std::fs::write(restored.join("last.json"), "left by a killed attempt").unwrap();
    let manifest = restore_set(blobs.as_ref(), job, &uri, &restored)
        .await
        .unwrap();
    assert_eq!(manifest.epoch, 3);
    assert_eq!(
        manifest.metrics, metrics,
        "the epoch's metrics travel with its set"
    );
    for name in [
        "last.safetensors",
        "last.optim.safetensors",
        "last.json",
        "best.safetensors",
    ] {
        assert_eq!(
            std::fs::read(restored.join(name)).unwrap(),
            std::fs::read(output.join(name)).unwrap(),
            "{name}"
        );
    }

    // Another job's set, or something that is no set: refused.
    let other = vtp_core::JobId::new();
    for wrong in [
        uri.clone(),
        uri.replace("last.safetensors", "best.safetensors"),
    ] {
        let who = if wrong == uri { other } else { job };
        match restore_set(blobs.as_ref(), who, &wrong, &restored).await {
            Err(vtp_core::Error::InvalidInput { field, .. }) => assert_eq!(field, "resume_from"),
            got => panic!("{wrong}: {got:?}"),
        }
    }
    // A file changed after the manifest was written: refused, nothing left.
    let key = |name: &str| BlobKey::parse(&format!("jobs/{job}/epochs/000003/{name}")).unwrap();
    blobs
        .put_bytes(
            &key("last.optim.safetensors"),
            bytes::Bytes::from_static(b"optimizer statf"),
        )
        .await
        .unwrap();
    match restore_set(blobs.as_ref(), job, &uri, &restored).await {
        Err(vtp_core::Error::InvalidInput { message, .. }) => {
            assert!(message.contains("last.optim.safetensors"), "{message}");
        }
        got => panic!("{got:?}"),
    }
    assert!(
        !restored.exists(),
        "a set that fails its check is not left to resume from"
    );
    // A set without its manifest was never complete.
    blobs.delete(&key("manifest.json")).await.unwrap();
    assert!(matches!(
        restore_set(blobs.as_ref(), job, &uri, &restored).await,
        Err(vtp_core::Error::NotFound { .. })
    ));
}
