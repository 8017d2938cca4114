//! Trainers reporting through outages, on real Postgres: every trainer's
//! reports go through its own persisted [`Outbox`] (the one the trainer
//! service uses) to a live backend, through a recorder that keeps every
//! answer. A 30 s database outage answers 503 and a 20 s backend outage
//! refuses connections; afterwards every report is stored exactly once
//! (each job's epochs, each job's last `seq`), and the backend, hit by two
//! hundred trainers coming back, answers none of them with a 5xx.

mod support;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::Response;
use serde_json::json;
use support::FaultProxy;
use vtp_core::{BlobStoreExt, JobId, JobStatus, JobStore, StartTraining, TrainingReport};
use vtp_launch::HttpLauncher;
use vtp_server::AppState;
use vtp_storage::PostgresJobStore;
use vtp_storage::testing::TestDatabase;
use vtp_trainer::service::Outbox;
use vtp_trainer::testing::TrainerDouble;

/// Forwards every request to the backend and records when it was answered
/// and with what status.
#[derive(Debug)]
struct Recorder {
    backend: String,
    client: reqwest::Client,
    answers: Mutex<Vec<(Instant, u16)>>,
}

impl Recorder {
    /// Serves a recorder in front of `backend`; returns it and its address.
    async fn start(backend: String) -> (Arc<Recorder>, SocketAddr) {
        let recorder = Arc::new(Recorder {
            backend,
            client: reqwest::Client::new(),
            answers: Mutex::new(Vec::new()),
        });
        let app = axum::Router::new()
            .fallback(forward)
            .with_state(recorder.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        (recorder, addr)
    }

    /// Statuses answered at or after `since`.
    fn statuses_since(&self, since: Instant) -> Vec<u16> {
        self.answers
            .lock()
            .unwrap()
            .iter()
            .filter(|(at, _)| *at >= since)
            .map(|(_, status)| *status)
            .collect()
    }
}

async fn forward(State(recorder): State<Arc<Recorder>>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let body = axum::body::to_bytes(body, 16 * 1024 * 1024).await.unwrap();
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let mut outgoing = recorder
        .client
        .request(parts.method.clone(), format!("{}{path}", recorder.backend))
        .body(body);
    for (name, value) in &parts.headers {
        if name != axum::http::header::HOST && name != axum::http::header::CONTENT_LENGTH {
            outgoing = outgoing.header(name, value);
        }
    }
    let answer = outgoing.send().await.unwrap();
    let status = answer.status();
    recorder
        .answers
        .lock()
        .unwrap()
        .push((Instant::now(), status.as_u16()));
    let mut response = Response::builder().status(status);
    for (name, value) in answer.headers() {
        if name != axum::http::header::CONTENT_LENGTH
            && name != axum::http::header::TRANSFER_ENCODING
        {
            response = response.header(name, value);
        }
    }
    response
        .body(Body::from(answer.bytes().await.unwrap()))
        .unwrap()
}

/// Where the backend tells trainers to report, until the test rewrites it.
const PLACEHOLDER: &str = "http://reports.invalid";

/// A backend on `database_url`.
async fn backend(database_url: &str) -> Platform {
    let stores = vtp_storage::Stores::new(PostgresJobStore::connect(database_url).await.unwrap());
    let jobs = stores.jobs.clone();
    let trainer = TrainerDouble::start().await;
    let launcher = Arc::new(HttpLauncher::new(&trainer.url()).unwrap());
    // A start checks that the dataset exists.
    let blobs = Arc::new(vtp_storage::ObjectStoreBlobStore::in_memory());
    let key = vtp_core::BlobKey::parse("datasets/shapes.zip").unwrap();
    blobs.put_bytes(&key, "zip".into()).await.unwrap();
    let dataset = blobs.uri(&key);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let state = AppState::new(stores, blobs, launcher, PLACEHOLDER);
    tokio::spawn(vtp_server::serve(listener, state, std::future::pending()));
    Platform {
        base,
        dataset,
        jobs,
        trainer,
        http: reqwest::Client::new(),
    }
}

struct Platform {
    base: String,
    dataset: String,
    jobs: Arc<dyn JobStore>,
    trainer: TrainerDouble,
    http: reqwest::Client,
}

impl Platform {
    /// Creates and starts `n` jobs, each of its own user; returns their
    /// start requests (callback URL and secret), as the trainers got them.
    async fn started_jobs(&self, n: usize) -> Vec<StartTraining> {
        for i in 0..n {
            let body = json!({"user_id": format!("user-{i}"), "model_name": "small_cnn",
                              "framework": "tch", "dataset_s3_uri": self.dataset, "config": {"epochs": 3}});
            let (status, job) = support::json_of(
                self.http
                    .post(format!("{}/training/jobs", self.base))
                    .json(&body)
                    .send()
                    .await
                    .unwrap(),
            )
            .await;
            assert_eq!(status, 201, "{job}");
            let id = job["id"].as_str().unwrap();
            let response = self
                .http
                .post(format!("{}/training/jobs/{id}/start", self.base))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 202);
        }
        let started = self.trainer.wait_started(n).await;
        assert_eq!(started.len(), n);
        started
    }

    /// Checks that `job_id` holds epochs 1..=`epochs` once each and the
    /// report numbered `last_seq` as its last.
    async fn stored_once(&self, job_id: JobId, epochs: u32, last_seq: i64) {
        let metrics = self.jobs.metrics(job_id).await.unwrap();
        assert_eq!(
            metrics.iter().map(|m| m.epoch).collect::<Vec<_>>(),
            (1..=epochs).collect::<Vec<_>>(),
            "job {job_id}"
        );
        let job = self.jobs.get(job_id).await.unwrap();
        assert_eq!(job.last_seq, last_seq, "job {job_id}");
        assert_eq!(job.status, JobStatus::Running);
    }
}

/// One trainer: its own outbox, delivering in the background.
struct Trainer {
    request: StartTraining,
    outbox: Arc<Outbox>,
    _dir: tempfile::TempDir,
}

impl Trainer {
    fn new(request: StartTraining) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Arc::new(Outbox::open(dir.path()).unwrap());
        let runner = outbox.clone();
        tokio::spawn(async move { runner.run().await });
        Trainer {
            request,
            outbox,
            _dir: dir,
        }
    }

    /// Queues the report of `epoch`; returns its `seq`.
    fn report_epoch(&self, epoch: u32) -> i64 {
        let update = TrainingReport::new(JobStatus::Running)
            .with_progress(f64::from(epoch) / 3.0)
            .with_metric("epoch", f64::from(epoch))
            .with_metric("loss", 1.0 / f64::from(epoch));
        self.outbox
            .enqueue(
                self.request.job_id,
                &self.request.callback_url,
                self.request.callback_secret.as_ref(),
                update,
                None,
            )
            .unwrap()
    }
}

async fn all_drained(trainers: &[Trainer], within: Duration) {
    for trainer in trainers {
        assert!(
            trainer.outbox.drained(within).await,
            "job {} still has reports pending",
            trainer.request.job_id
        );
    }
}

fn resolve(host_port: &str) -> SocketAddr {
    use std::net::ToSocketAddrs;
    host_port.to_socket_addrs().unwrap().next().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_through_a_30s_database_outage_are_each_stored_once() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let mut url = url::Url::parse(db.url()).unwrap();
    let proxy = FaultProxy::start(resolve(&format!(
        "{}:{}",
        url.host_str().unwrap(),
        url.port().unwrap_or(5432)
    )))
    .await;
    url.set_host(Some("127.0.0.1")).unwrap();
    url.set_port(Some(proxy.addr().port())).unwrap();
    // Trainers report through the recorder.
    let platform = backend(url.as_str()).await;
    let (recorder, at) = Recorder::start(platform.base.clone()).await;
    let trainers: Vec<Trainer> = platform
        .started_jobs(20)
        .await
        .into_iter()
        .map(|mut request| {
            request.callback_url = request
                .callback_url
                .replace(PLACEHOLDER, &format!("http://{at}"));
            Trainer::new(request)
        })
        .collect();
    for trainer in &trainers {
        trainer.report_epoch(1);
    }
    all_drained(&trainers, Duration::from_secs(60)).await;

    // The database goes away while every trainer reports two more epochs.
    proxy.set_down(true);
    let outage = Instant::now();
    let mut last = Vec::new();
    for trainer in &trainers {
        trainer.report_epoch(2);
        last.push(trainer.report_epoch(3));
    }
    tokio::time::sleep(Duration::from_secs(30)).await;
    proxy.set_down(false);
    let during = recorder.statuses_since(outage);
    assert!(
        during.contains(&503) && during.iter().all(|s| *s == 503 || *s < 300),
        "the outage is answered 503 (retry later), never refused: {during:?}"
    );
    all_drained(&trainers, Duration::from_secs(120)).await;
    for (trainer, last_seq) in trainers.iter().zip(last) {
        platform
            .stored_once(trainer.request.job_id, 3, last_seq)
            .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_trainers_retry_through_a_20s_backend_outage_and_lose_nothing() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    // Trainers -> a proxy that can take the backend away -> the recorder ->
    // the backend.
    let platform = backend(db.url()).await;
    let (recorder, at) = Recorder::start(platform.base.clone()).await;
    let proxy = FaultProxy::start(at).await;
    let reach = format!("http://{}", proxy.addr());
    let trainers: Vec<Trainer> = platform
        .started_jobs(200)
        .await
        .into_iter()
        .map(|mut request| {
            request.callback_url = request.callback_url.replace(PLACEHOLDER, &reach);
            Trainer::new(request)
        })
        .collect();
    for trainer in &trainers {
        trainer.report_epoch(1);
    }
    all_drained(&trainers, Duration::from_secs(120)).await;

    proxy.set_down(true);
    let mut last = Vec::new();
    for trainer in &trainers {
        trainer.report_epoch(2);
        last.push(trainer.report_epoch(3));
    }
    tokio::time::sleep(Duration::from_secs(20)).await;
    let recovered = Instant::now();
    proxy.set_down(false);
    all_drained(&trainers, Duration::from_secs(120)).await;

    // Nothing lost, nothing twice, and no storm of 5xx as they came back.
    for (trainer, last_seq) in trainers.iter().zip(last) {
        platform
            .stored_once(trainer.request.job_id, 3, last_seq)
            .await;
    }
    let after = recorder.statuses_since(recovered);
    assert!(
        after.len() >= 400,
        "every held report arrived: {}",
        after.len()
    );
    let errors = after.iter().filter(|s| **s >= 500).count();
    assert_eq!(errors, 0, "5xx after the outage: {after:?}");
}
