//! Tier 1 end to end, on the real binaries, Postgres and Garage: a dataset
//! archive is uploaded, a job trains in the subprocess trainer, reports every
//! epoch and leaves a checkpoint that downloads and predicts; a killed
//! trainer (or a backend killed with its child) is relaunched and resumes
//! from its stored checkpoint set, and fails the job on its last attempt; a
//! frozen trainer loses its lease, is killed and resumed; a SIGTERM is an
//! interruption the job resumes from; an S3 outage mid-run delays the job
//! and a backend outage mid-run loses no epoch and duplicates none.

mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::{ServiceProcess, children_of, free_port};
use vtp_storage::testing::{TestDatabase, TestS3};
use vtp_trainer::engine::Predictor;
use vtp_trainer::testing::shapes_dataset;

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
        env.push(("VTP_TRAINER_BIN", support::trainer_bin()));
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

impl Env {
    /// The job's metrics: epoch to `recorded_at`.
    async fn epochs(&self, backend: &ServiceProcess, id: &str) -> Vec<(u64, String)> {
        support::recorded_epochs(&self.http, backend, id).await
    }

    /// Waits until the job has stored a checkpoint set and at least
    /// `epochs` epochs; returns them.
    async fn wait_for_epochs(
        &self,
        backend: &ServiceProcess,
        id: &str,
        epochs: usize,
    ) -> Vec<(u64, String)> {
        for _ in 0..1800 {
            let (_, job) = self
                .call(self.http.get(backend.at(&format!("/training/jobs/{id}"))))
                .await;
            let done = self.epochs(backend, id).await;
            if job["last_checkpoint_s3_uri"].is_string() && done.len() >= epochs {
                return done;
            }
            assert!(!terminal(&job), "the job ended too early: {job}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("job {id} stored no checkpoint set");
    }

    /// Starts an `epochs`-epoch job on `backend` and waits until it has
    /// stored a checkpoint set and recorded two epochs: the job's id and
    /// the epochs recorded so far.
    async fn job_under_way(
        &self,
        backend: &ServiceProcess,
        epochs: u32,
    ) -> (String, Vec<(u64, String)>) {
        let dataset = self.upload_shapes(backend, 20).await;
        let id = self
            .create_and_start(backend, &dataset, config(epochs))
            .await;
        let before = self.wait_for_epochs(backend, &id, 2).await;
        (id, before)
    }

    fn kill_trainer(backend: &ServiceProcess) {
        Self::signal_trainer(backend, "KILL");
    }

    /// Sends `signal` to the backend's one trainer child; returns its pid.
    fn signal_trainer(backend: &ServiceProcess, signal: &str) -> u32 {
        let trainers = children_of(backend.pid());
        assert_eq!(trainers.len(), 1, "one trainer child: {trainers:?}");
        let status = std::process::Command::new("kill")
            .args([&format!("-{signal}"), &trainers[0].to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        trainers[0]
    }

    /// Waits for the job to end and checks what every resumed run must
    /// show: completed on its second attempt, the first ended for `why`,
    /// every epoch recorded once, and those recorded before the loss not
    /// trained again.
    async fn completes_on_the_second_attempt(
        &self,
        backend: &ServiceProcess,
        id: &str,
        epochs: u32,
        before: &[(u64, String)],
        why: &str,
    ) -> Value {
        let (job, _) = self.wait(backend, id, terminal).await;
        assert_eq!(job["status"], "completed", "{job}");
        assert_eq!(job["attempt"], 2, "{job}");
        let reason = job["attempts"][0]["reason"].as_str().unwrap();
        assert!(reason.contains(why), "{reason}");
        let after = self.epochs(backend, id).await;
        assert_eq!(
            after.iter().map(|(e, _)| *e).collect::<Vec<_>>(),
            (1..=u64::from(epochs)).collect::<Vec<_>>()
        );
        for (epoch, recorded_at) in before {
            let again = &after[usize::try_from(*epoch).unwrap() - 1];
            assert_eq!(&again.1, recorded_at, "epoch {epoch} was trained twice");
        }
        job
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_trainer_loses_its_lease_is_killed_and_the_job_resumes() {
    let Some(env) = Env::new().await else { return };
    // Heartbeats every two seconds: a lease of eight.
    let mut vars = env.backend_env("subprocess");
    vars.push(("VTP_HEARTBEAT_SECS", "2".to_owned()));
    let backend = ServiceProcess::start(&vars).await;
    let epochs = 24;
    let (id, before) = env.job_under_way(&backend, epochs).await;
    // Alive but silent: the process is stopped, its socket still open.
    let frozen = Env::signal_trainer(&backend, "STOP");
    let job = env
        .completes_on_the_second_attempt(&backend, &id, epochs, &before, "lease expired")
        .await;
    // The frozen trainer was killed, not left to wake up beside its successor.
    assert!(
        !std::path::Path::new(&format!("/proc/{frozen}")).exists(),
        "the frozen trainer {frozen} still exists"
    );
    assert_eq!(job["attempts"].as_array().unwrap().len(), 1, "{job}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_s3_outage_during_checkpoint_uploads_delays_the_job_and_loses_nothing() {
    use vtp_core::BlobStoreExt;
    let Some(env) = Env::new().await else { return };
    // The backend and its trainer reach Garage through a proxy that can
    // take it away.
    let endpoint = url::Url::parse(env.s3.settings.endpoint.as_deref().unwrap()).unwrap();
    let target = std::net::ToSocketAddrs::to_socket_addrs(&format!(
        "{}:{}",
        endpoint.host_str().unwrap(),
        endpoint.port_or_known_default().unwrap()
    ))
    .unwrap()
    .next()
    .unwrap();
    let proxy = support::FaultProxy::start(target).await;
    let mut vars = env.backend_env("subprocess");
    for (name, value) in &mut vars {
        if *name == "VTP_S3_ENDPOINT" {
            *value = format!("http://{}", proxy.addr());
        }
    }
    let backend = ServiceProcess::start(&vars).await;
    let epochs = 24;
    let (id, _) = env.job_under_way(&backend, epochs).await;
    // S3 goes away until the trainer has finished training and failed to
    // upload the model: the sets of the epochs trained meanwhile cannot be
    // stored, and the final upload waits for S3 to come back.
    proxy.set_down(true);
    let (job, _) = env
        .wait(&backend, &id, |job| {
            terminal(job)
                || job["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("uploading the trained model failed"))
        })
        .await;
    assert!(!terminal(&job), "the job waited for S3: {job}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    proxy.set_down(false);

    let (job, _) = env.wait(&backend, &id, terminal).await;
    assert_eq!(job["status"], "completed", "{job}");
    let after = env.epochs(&backend, &id).await;
    assert_eq!(
        after.iter().map(|(e, _)| *e).collect::<Vec<_>>(),
        (1..=u64::from(epochs)).collect::<Vec<_>>(),
        "every epoch once"
    );
    // The model the job points at is whole in the store (read directly,
    // not through the proxy): its size is the file's, and it loads.
    let store = env
        .s3
        .builder()
        .with_url(env.blob_url.clone())
        .build()
        .unwrap();
    let uri = job["checkpoint_s3_uri"].as_str().unwrap();
    let dir = env.work.path().join("downloaded");
    // The weights and the metadata beside them.
    for (from, to) in [
        (".safetensors", "best.safetensors"),
        (".safetensors", "best.json"),
    ] {
        let key = store
            .key_for(&uri.replace(from, &to[to.find('.').unwrap()..]))
            .unwrap();
        let local = dir.join(to);
        store.download_to(&key, &local).await.unwrap();
        assert_eq!(
            std::fs::metadata(&local).unwrap().len(),
            store.head(&key).await.unwrap().size
        );
    }
    Predictor::load(&dir.join("best.safetensors")).expect("the stored model loads");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trainer_stopped_by_sigterm_reports_the_interruption_and_the_job_resumes() {
    let Some(env) = Env::new().await else { return };
    let backend = ServiceProcess::start(&env.backend_env("subprocess")).await;
    let epochs = 24;
    let (id, before) = env.job_under_way(&backend, epochs).await;
    // What a drain or an eviction sends: the trainer stops at its next step
    // and says why, rather than leaving the backend to find it gone.
    Env::signal_trainer(&backend, "TERM");
    env.completes_on_the_second_attempt(&backend, &id, epochs, &before, "stopped by its host")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_trainer_is_relaunched_and_resumes_from_its_stored_checkpoint() {
    let Some(env) = Env::new().await else { return };
    let backend = ServiceProcess::start(&env.backend_env("subprocess")).await;
    let epochs = 24;
    let (id, before) = env.job_under_way(&backend, epochs).await;
    Env::kill_trainer(&backend);

    // Progress never goes backwards while the next attempt restores.
    let mut progress = 0.0;
    let job = loop {
        let (_, job) = env
            .call(env.http.get(backend.at(&format!("/training/jobs/{id}"))))
            .await;
        let now = job["progress"].as_f64().unwrap();
        assert!(now >= progress, "progress went from {progress} to {now}");
        progress = now;
        if terminal(&job) {
            break job;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(job["status"], "completed", "{job}");
    assert_eq!(job["attempt"], 2, "{job}");
    let ended = &job["attempts"][0];
    assert_eq!(ended["attempt"], 1, "{job}");
    let reason = ended["reason"].as_str().unwrap();
    assert!(
        reason.contains("trainer process exited") && reason.contains('9'),
        "{reason}"
    );

    // Every epoch exactly once; those finished before the kill were not
    // trained again (a restart from scratch would have re-reported them).
    let after = env.epochs(&backend, &id).await;
    assert_eq!(
        after.iter().map(|(e, _)| *e).collect::<Vec<_>>(),
        (1..=u64::from(epochs)).collect::<Vec<_>>()
    );
    for (epoch, recorded_at) in &before {
        let again = &after[usize::try_from(*epoch).unwrap() - 1];
        assert_eq!(&again.1, recorded_at, "epoch {epoch} was trained twice");
    }

    // The backend prunes the sets it no longer needs: once the job has its
    // final checkpoint, all of them, and the job points at none.
    assert!(job["last_checkpoint_s3_uri"].is_null(), "{job}");
    let store = env
        .s3
        .builder()
        .with_url(env.blob_url.clone())
        .build()
        .unwrap();
    let epochs_dir = vtp_core::BlobKey::parse(&format!("jobs/{id}/epochs")).unwrap();
    let mut left = Vec::new();
    for _ in 0..100 {
        left = store.list(Some(&epochs_dir)).await.unwrap();
        if left.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(left.is_empty(), "sets left behind: {left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trainer_that_dies_on_its_last_attempt_fails_the_job_with_the_exit_status() {
    let Some(env) = Env::new().await else { return };
    let backend = ServiceProcess::start(&env.backend_env("subprocess")).await;
    let dataset = env.upload_shapes(&backend, 20).await;
    let mut one_attempt = config(2000);
    one_attempt["max_attempts"] = 1.into();
    let id = env.create_and_start(&backend, &dataset, one_attempt).await;
    env.wait_for_epochs(&backend, &id, 1).await;
    Env::kill_trainer(&backend);
    let (job, _) = env.wait(&backend, &id, terminal).await;
    assert_eq!(job["status"], "failed", "{job}");
    let error = job["error"].as_str().unwrap();
    assert!(
        error.contains("trainer process exited")
            && error.contains('9')
            && error.contains("attempt 1 of 1"),
        "{error}"
    );
    // The failed job still offers the last checkpoint set it stored.
    let response = env
        .http
        .get(backend.at(&format!("/training/jobs/{id}/checkpoint")))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let weights = response.bytes().await.unwrap();
    assert!(weights.len() > 1000, "{} bytes", weights.len());

    // The next job gets a fresh trainer.
    let id = env.create_and_start(&backend, &dataset, config(1)).await;
    assert_eq!(
        env.wait(&backend, &id, terminal).await.0["status"],
        "completed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_killed_with_its_child_trainer_relaunches_the_job_after_restart() {
    let Some(env) = Env::new().await else { return };
    // The restarted backend listens where the first one did, as a
    // restarted service does: reports queued for it are delivered.
    let listen = format!("127.0.0.1:{}", free_port());
    let start = |listen: String| {
        let env = env.backend_env("subprocess");
        async move {
            ServiceProcess::spawn(
                env!("CARGO_BIN_EXE_vtp-backend"),
                &["--listen", &listen],
                &env,
                "vtp-backend listening on ",
            )
            .await
        }
    };
    let backend = start(listen.clone()).await;
    let epochs = 16;
    let (id, before) = env.job_under_way(&backend, epochs).await;
    let trainers = children_of(backend.pid());
    backend.kill().await;
    // The child trainer follows its parent (--exit-with-parent).
    for _ in 0..100 {
        if trainers
            .iter()
            .all(|pid| !std::path::Path::new(&format!("/proc/{pid}")).exists())
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let backend = start(listen).await;
    let (job, _) = env.wait(&backend, &id, terminal).await;
    assert_eq!(job["status"], "completed", "{job}");
    assert_eq!(job["attempt"], 2, "{job}");
    assert!(
        job["attempts"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("backend restarted"),
        "{job}"
    );
    let after = env.epochs(&backend, &id).await;
    assert_eq!(after.len(), usize::try_from(epochs).unwrap(), "{after:?}");
    for (epoch, recorded_at) in &before {
        let again = &after[usize::try_from(*epoch).unwrap() - 1];
        assert_eq!(&again.1, recorded_at, "epoch {epoch} was trained twice");
    }
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
        &support::trainer_bin(),
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

    // Both services export what the dashboards and alerts in deploy/
    // query: the trainer every one of its metrics (the outage made report
    // failures), the backend the seed's names.
    let page = |url: String| {
        let http = env.http.clone();
        async move { http.get(url).send().await.unwrap().text().await.unwrap() }
    };
    let trainer_page = page(format!("{}/metrics", trainer.url)).await;
    for name in vtp_trainer::service::http::EXPORTED {
        assert!(
            support::exports(&trainer_page, name),
            "the trainer does not export {name}:\n{trainer_page}"
        );
    }
    let backend_page = page(backend.at("/metrics")).await;
    for name in [
        "training_jobs_total",
        "training_duration_seconds",
        "active_training_jobs",
        "vtp_http_requests_total",
        "vtp_reports_total",
    ] {
        assert!(
            support::exports(&backend_page, name),
            "the backend does not export {name}:\n{backend_page}"
        );
    }
    assert!(
        backend_page.contains(r#"training_jobs_total{framework="tch",status="completed"} 1"#),
        "{backend_page}"
    );
}
