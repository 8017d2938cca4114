//! The side-by-side benchmark harness: each VTP component against its peer,
//! interleaved round by round in one run, with the same thread count (2).
//!
//! Run with: scripts/bench.sh [step|pipeline|epoch|detect_step|detect_epoch|callbacks|flood|s3]...
//! (it installs the Python peers and starts Postgres and Garage), which calls
//! `cargo bench -p vtp-server --features torch --bench side_by_side -- PAIRS`.
//! Prints a markdown table of medians and ratios and writes it to
//! `$CARGO_TARGET_DIR/bench/side_by_side.md`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tch::Tensor;
use vtp_core::{BlobKey, BlobStore, BlobStoreExt, JobStatus, JobStoreExt, NewJob};
use vtp_trainer::engine::detect::loss::{DetectionLoss, LossGains};
use vtp_trainer::engine::detect::model::{DetectionModel, YoloVariant};
use vtp_trainer::engine::optim::Optimizer;
use vtp_trainer::engine::{ModelKind, OptimizerKind, TchTrainer};

mod common;
use common::{
    THREADS, detect_step_fixture, digits_yolo, jpeg_folder, load_batches, load_detect_batches,
    model_and_sgd, step_fixture, uncached_loader,
};

/// One pair's samples, one per round.
struct Row {
    name: String,
    unit: &'static str,
    higher_is_better: bool,
    ours: Vec<f64>,
    peer: Vec<f64>,
    peer_name: &'static str,
}

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    if v.len() % 2 == 1 {
        v[v.len() / 2]
    } else {
        (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0
    }
}

impl Row {
    fn ratio(&self) -> f64 {
        let (ours, peer) = (median(&self.ours), median(&self.peer));
        if self.higher_is_better {
            ours / peer
        } else {
            peer / ours
        }
    }
}

fn python() -> String {
    std::env::var("VIRTUAL_ENV")
        .map_or_else(|_| "python3".to_owned(), |v| format!("{v}/bin/python"))
}

fn peers_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../benches/peers")
}

/// Runs a peer script and parses its last stdout line as JSON.
fn run_peer(script: &str, args: &[String], envs: &[(&str, String)]) -> Value {
    let output = Command::new(python())
        .arg(peers_dir().join(script))
        .args(args)
        .envs(envs.iter().map(|(k, v)| (*k, v.as_str())))
        .current_dir(peers_dir())
        .output()
        .unwrap_or_else(|e| panic!("running {script}: {e}"));
    assert!(
        output.status.success(),
        "{script} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    serde_json::from_str(stdout.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("{script} output {stdout:?}: {e}"))
}

fn rounds() -> usize {
    std::env::var("VTP_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3)
}

// ---------------------------------------------------------------- training step

/// Median milliseconds per step of our loop (the trainer's model and
/// optimizer), and the first three losses (to check both sides compute the same thing).
fn step_ours(
    kind: ModelKind,
    weights: &Path,
    batches: &Path,
    steps: usize,
    warmup: usize,
) -> (f64, Vec<f64>) {
    tch::set_num_threads(THREADS as i32);
    let (_vs, model, mut opt) = model_and_sgd(kind, Some(weights));
    let batches = load_batches(batches);
    let mut times = Vec::new();
    let mut losses = Vec::new();
    for step in 0..warmup + steps {
        let (x, y) = &batches[step % batches.len()];
        let start = Instant::now();
        let loss = model.forward_t(x, true).cross_entropy_for_logits(y);
        let t1 = Instant::now();
        opt.backward_step(&loss).unwrap();
        let t2 = Instant::now();
        let value = loss.double_value(&[]);
        if step < 3 {
            losses.push(value);
        }
        if step >= warmup {
            times.push(start.elapsed().as_secs_f64() * 1e3);
            if std::env::var("VTP_BENCH_PROFILE").is_ok() {
                eprintln!(
                    "fwd {:.2} bwd+opt {:.2}",
                    (t1 - start).as_secs_f64() * 1e3,
                    (t2 - t1).as_secs_f64() * 1e3
                );
            }
        }
    }
    (median(&times), losses)
}

fn bench_step(dir: &Path) -> Vec<Row> {
    let mut rows = Vec::new();
    for (kind, size, batch, steps) in [
        (ModelKind::SmallCnn, 28, 64, 60),
        (ModelKind::ResNet18, 64, 32, 20),
    ] {
        let (weights, batches) = step_fixture(dir, kind, size, batch);
        let mut row = Row {
            name: format!("training step, {kind} {size}x{size} batch {batch}"),
            unit: "ms/step",
            higher_is_better: false,
            ours: vec![],
            peer: vec![],
            peer_name: "PyTorch eager",
        };
        for _ in 0..rounds() {
            let (ours, our_losses) = step_ours(kind, &weights, &batches, steps, 10);
            row.ours.push(ours);
            let args = [
                "--model",
                kind.name(),
                "--weights",
                weights.to_str().unwrap(),
                "--batches",
                batches.to_str().unwrap(),
                "--steps",
                &steps.to_string(),
            ]
            .map(str::to_owned);
            let peer = run_peer("train_step.py", &args, &[]);
            row.peer.push(peer["median_ms"].as_f64().unwrap());
            eprintln!(
                "{kind}: first losses, ours {our_losses:.5?}, PyTorch {}",
                peer["losses"]
            );
        }
        rows.push(row);
    }
    rows
}

// ---------------------------------------------------------------- input pipeline and epoch

/// Images per second of one pass, decoding every image (no cache).
fn pipeline_ours(root: &Path, size: u32) -> f64 {
    let loader = uncached_loader(root, size);
    let start = Instant::now();
    let seen: usize = loader.epoch(1, 1, true).map(|b| b.len()).sum();
    seen as f64 / start.elapsed().as_secs_f64()
}

fn epoch_ours(root: &Path, size: u32) -> f64 {
    tch::set_num_threads(THREADS as i32);
    tch::manual_seed(0);
    let loader = uncached_loader(root, size);
    let (_vs, model, mut opt) = model_and_sgd(ModelKind::SmallCnn, None);
    let s = i64::from(size);
    let start = Instant::now();
    let mut seen = 0;
    for batch in loader.epoch(1, 1, true) {
        let x = Tensor::from_slice(&batch.images).view([batch.len() as i64, 3, s, s]);
        let y = Tensor::from_slice(&batch.labels);
        let loss = model.forward_t(&x, true).cross_entropy_for_logits(&y);
        opt.backward_step(&loss).unwrap();
        seen += batch.len();
    }
    seen as f64 / start.elapsed().as_secs_f64()
}

fn bench_pipeline(dir: &Path, with_step: bool) -> Vec<Row> {
    let root = jpeg_folder(dir);
    let size: u32 = if with_step { 32 } else { 64 };
    let mut row = Row {
        name: if with_step {
            "whole epoch, 2,000 JPEGs -> small_cnn 32x32, batch 64".into()
        } else {
            "input pipeline, 2,000 96x96 JPEGs -> 64x64 augmented batches of 64".into()
        },
        unit: "images/s",
        higher_is_better: true,
        ours: vec![],
        peer: vec![],
        peer_name: "DataLoader, 2 workers",
    };
    for _ in 0..rounds() {
        row.ours.push(if with_step {
            epoch_ours(&root, size)
        } else {
            pipeline_ours(&root, size)
        });
        let mut args = vec![
            "--data".into(),
            root.display().to_string(),
            "--size".into(),
            size.to_string(),
        ];
        if with_step {
            args.extend(["--train".into(), "small_cnn".into()]);
        }
        row.peer.push(
            run_peer("pipeline.py", &args, &[])["images_per_second"]
                .as_f64()
                .unwrap(),
        );
    }
    vec![row]
}

// ---------------------------------------------------------------- detection

/// Median milliseconds per detection step (forward, v8 loss, backward, SGD)
/// and the first three losses (box + cls + dfl).
fn detect_step_ours(
    variant: YoloVariant,
    nc: i64,
    weights: &Path,
    batches: &Path,
    steps: usize,
    warmup: usize,
) -> (f64, Vec<f64>) {
    tch::set_num_threads(THREADS as i32);
    let mut vs = tch::nn::VarStore::new(tch::Device::Cpu);
    let model = DetectionModel::new(&vs.root(), variant, nc);
    vs.load(weights).unwrap();
    let params: Vec<(String, Tensor)> = vs
        .variables()
        .into_iter()
        .filter(|(_, t)| t.requires_grad())
        .collect();
    let mut opt = Optimizer::new(OptimizerKind::Sgd, 0.01, 0.9, 0.0, params);
    let loss_fn = DetectionLoss::new(nc, 16, [8.0, 16.0, 32.0], LossGains::default());
    let batches = load_detect_batches(batches);
    let (mut times, mut losses) = (Vec::new(), Vec::new());
    for step in 0..warmup + steps {
        let (x, t) = &batches[step % batches.len()];
        let start = Instant::now();
        let raw = model.forward_t(x, true);
        let (loss, parts) = loss_fn.compute(&raw, t);
        opt.backward_step(&loss).unwrap();
        if step < 3 {
            losses.push(parts.box_loss + parts.cls_loss + parts.dfl_loss);
        }
        if step >= warmup {
            times.push(start.elapsed().as_secs_f64() * 1e3);
        }
    }
    (median(&times), losses)
}

fn bench_detect_step(dir: &Path) -> Vec<Row> {
    let (variant, size, batch, steps) = (YoloVariant::V11n, 128, 16, 10);
    let (weights, batches, nc) = detect_step_fixture(dir, variant, size, batch, 4);
    let mut row = Row {
        name: format!(
            "detection training step, {variant} {size}x{size} batch {batch}, v8 loss + SGD"
        ),
        unit: "ms/step",
        higher_is_better: false,
        ours: vec![],
        peer: vec![],
        peer_name: "Ultralytics (PyTorch eager)",
    };
    for _ in 0..rounds() {
        let (ours, our_losses) = detect_step_ours(variant, nc, &weights, &batches, steps, 3);
        row.ours.push(ours);
        let args = [
            "--model",
            variant.name(),
            "--classes",
            &nc.to_string(),
            "--weights",
            weights.to_str().unwrap(),
            "--batches",
            batches.to_str().unwrap(),
            "--steps",
            &steps.to_string(),
        ]
        .map(str::to_owned);
        let peer = run_peer("detect_step.py", &args, &[]);
        row.peer.push(peer["median_ms"].as_f64().unwrap());
        eprintln!(
            "{variant}: first losses, ours {our_losses:.5?}, Ultralytics {}",
            peer["losses"]
        );
    }
    vec![row]
}

/// Trains `variant` on the digits dataset with VTP's trainer: images per
/// second over the epochs' own time (train + validation), and the best mAPs.
fn detect_train_ours(root: &Path, config: &Value, train_images: usize) -> (f64, f64, f64) {
    struct Sink(Vec<std::collections::BTreeMap<String, f64>>);
    impl vtp_core::ProgressSink for Sink {
        fn epoch_finished(&mut self, report: &vtp_core::EpochReport) {
            self.0.push(report.metrics.clone());
        }
    }
    let out = tempfile::tempdir().unwrap();
    let spec = vtp_core::TrainSpec {
        job_id: vtp_core::JobId::new(),
        config: config.clone(),
        dataset_dir: root.to_path_buf(),
        output_dir: out.path().to_path_buf(),
        init_weights: None,
    };
    let mut sink = Sink(Vec::new());
    vtp_core::Trainer::train(&mut TchTrainer::new(), &spec, &mut sink, &|| false).unwrap();
    let seconds: f64 = sink.0.iter().map(|m| m["epoch_seconds"]).sum();
    let best = |k: &str| sink.0.iter().map(|m| m[k]).fold(0.0, f64::max);
    (
        (train_images * sink.0.len()) as f64 / seconds,
        best("map"),
        best("map50"),
    )
}

fn bench_detect_epoch(dir: &Path) -> Vec<Row> {
    let (train, val, epochs, size, batch) = (512usize, 128usize, 10u32, 96u32, 16usize);
    let root = digits_yolo(dir, train, val);
    let variant = YoloVariant::V11n;
    let config = json!({
        "model": variant.name(), "epochs": epochs, "image_size": size, "batch_size": batch,
        "nbs": batch, "fliplr": 0.0, "close_mosaic": 3, "workers": THREADS, "threads": THREADS,
        "seed": 0
    });
    let mut speed = Row {
        name: format!(
            "detection epochs, {variant} on {train} digit canvases {size}x{size}, batch {batch}, each side's own pipeline (mosaic), train + val"
        ),
        unit: "images/s",
        higher_is_better: true,
        ours: vec![],
        peer: vec![],
        peer_name: "Ultralytics `YOLO.train` (on a CPU it loads data in the main process: workers=0)",
    };
    let mut map = Row {
        name: format!(
            "detection mAP50-95 after {epochs} epochs (best epoch; same data and settings)"
        ),
        unit: "mAP50-95",
        higher_is_better: true,
        ours: vec![],
        peer: vec![],
        peer_name: "Ultralytics `YOLO.train`",
    };
    for _ in 0..rounds() {
        let (ips, our_map, our_map50) = detect_train_ours(&root, &config, train);
        speed.ours.push(ips);
        map.ours.push(our_map);
        let args = [
            "--model".to_owned(),
            variant.name().to_owned(),
            "--data".to_owned(),
            root.join("data.yaml").display().to_string(),
            "--train-images".to_owned(),
            train.to_string(),
            "--epochs".to_owned(),
            epochs.to_string(),
            "--imgsz".to_owned(),
            size.to_string(),
            "--batch".to_owned(),
            batch.to_string(),
            "--close-mosaic".to_owned(),
            "3".to_owned(),
            "--nbs".to_owned(),
            batch.to_string(),
            "--fliplr".to_owned(),
            "0".to_owned(),
        ];
        let peer = run_peer("detect_train.py", &args, &[]);
        speed.peer.push(peer["images_per_second"].as_f64().unwrap());
        map.peer.push(peer["map"].as_f64().unwrap());
        eprintln!(
            "{variant}: mAP50-95 / mAP50 ours {our_map:.4} / {our_map50:.4}, Ultralytics {} / {}",
            peer["map"], peer["map50"]
        );
    }
    vec![speed, map]
}

// ---------------------------------------------------------------- callback ingestion

struct Load {
    per_second: f64,
    p50_ms: f64,
    p99_ms: f64,
}

/// Posts `per_job` callbacks to each job from `concurrency` clients; the
/// first of each job warms up and is not timed.
/// Every report is signed with its job's secret (`secrets`; the peer ignores
/// the headers, so only our side verifies an HMAC per report).
async fn drive(
    base: &str,
    jobs: &[(String, vtp_core::CallbackSecret)],
    per_job: usize,
    concurrency: usize,
) -> Load {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(concurrency)
        .build()
        .unwrap();
    // Warm-up, untimed and the same for both sides: each job's first report,
    // from every client at once, so that connections (client to server,
    // server to Postgres) are open before timing, as on a running server.
    post_reports(&client, base, jobs, 1..=1, concurrency).await;
    let start = Instant::now();
    let mut all = post_reports(&client, base, jobs, 2..=per_job, concurrency).await;
    let seconds = start.elapsed().as_secs_f64();
    all.sort_by(f64::total_cmp);
    Load {
        per_second: all.len() as f64 / seconds,
        p50_ms: all[all.len() / 2],
        p99_ms: all[all.len() * 99 / 100],
    }
}

/// Posts report `seq` of every job for each `seq` in `seqs` (seq-major), from
/// `concurrency` clients; returns each request's latency in milliseconds.
async fn post_reports(
    client: &reqwest::Client,
    base: &str,
    jobs: &[(String, vtp_core::CallbackSecret)],
    seqs: std::ops::RangeInclusive<usize>,
    concurrency: usize,
) -> Vec<f64> {
    let work: Vec<((String, vtp_core::CallbackSecret), usize)> = seqs
        .flat_map(|seq| jobs.iter().map(move |j| (j.clone(), seq)))
        .collect();
    let work = Arc::new(std::sync::Mutex::new(work.into_iter()));
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (client, work, base) = (client.clone(), work.clone(), base.to_owned());
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            loop {
                let Some((job, seq)) = work.lock().unwrap().next() else {
                    break;
                };
                let ((job, secret), seq) = (job, seq);
                let body =
                    json!({"status": "running", "seq": seq, "progress": 0.5, "message": "epoch",
                                  "metrics": {"epoch": seq, "loss": 0.5, "accuracy": 0.9}})
                    .to_string();
                let t = Instant::now();
                let mut request = client
                    .post(format!("{base}/training/jobs/{job}/callback"))
                    .header("content-type", "application/json");
                for (name, value) in secret
                    .headers(&format!("{job}-{seq}"), body.as_bytes())
                    .unwrap()
                {
                    request = request.header(name, value);
                }
                let response = request.body(body).send().await.unwrap();
                assert!(response.status().is_success(), "{}", response.status());
                let _ = response.bytes().await;
                latencies.push(t.elapsed().as_secs_f64() * 1e3);
            }
            latencies
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.unwrap());
    }
    all
}

fn new_job() -> NewJob {
    NewJob {
        user_id: "bench".into(),
        model_name: "small_cnn".into(),
        framework: "tch".into(),
        dataset_s3_uri: "s3://bench/data".into(),
        // Every report carries an epoch's metrics, up to epoch 61.
        config: json!({"epochs": 100}),
        priority: 0,
    }
}

async fn callbacks_ours(jobs_n: usize, per_job: usize) -> Load {
    let db = vtp_storage::testing::TestDatabase::create()
        .await
        .expect("Postgres");
    let stores = vtp_storage::Stores::new(
        vtp_storage::PostgresJobStore::connect(db.url())
            .await
            .unwrap(),
    );
    let store = stores.jobs.clone();
    let mut ids = Vec::new();
    for _ in 0..jobs_n {
        let job = store.create_job(new_job()).await.unwrap();
        store
            .transition(job.id, JobStatus::Pending, JobStatus::Queued)
            .await
            .unwrap();
        let secret = vtp_core::CallbackSecret::generate();
        stores
            .credentials
            .set_job_secret(job.id, &secret)
            .await
            .unwrap();
        ids.push((job.id.to_string(), secret));
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let blobs: Arc<dyn BlobStore> = Arc::new(vtp_storage::ObjectStoreBlobStore::in_memory());
    let launcher = Arc::new(vtp_launch::HttpLauncher::new("http://127.0.0.1:9").unwrap());
    let state = vtp_server::AppState::new(stores, blobs, launcher, base.clone());
    let server = tokio::spawn(axum::serve(listener, vtp_server::app(state)).into_future());
    let load = drive(&base, &ids, per_job, 32).await;
    server.abort();
    load
}

async fn callbacks_peer(jobs_n: usize, per_job: usize) -> Load {
    let db = vtp_storage::testing::TestDatabase::create()
        .await
        .expect("Postgres");
    let url = db.url().replacen("postgres://", "postgresql+asyncpg://", 1);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let status = std::process::Command::new(python())
        .arg("callback_app.py")
        .env("DATABASE_URL", &url)
        .current_dir(peers_dir())
        .status()
        .expect("creating the peer's tables");
    assert!(status.success(), "the peer could not create its tables");
    let uvicorn = format!(
        "{}/bin/uvicorn",
        std::env::var("VIRTUAL_ENV").unwrap_or_default()
    );
    let mut server = tokio::process::Command::new(uvicorn)
        .args([
            "callback_app:app",
            "--host",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--workers",
            &THREADS.to_string(),
            "--log-level",
            "warning",
        ])
        .env("DATABASE_URL", url)
        .current_dir(peers_dir())
        .kill_on_drop(true)
        .spawn()
        .expect("uvicorn");
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    let mut ids = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    for _ in 0..jobs_n {
        let job = loop {
            match client
                .post(format!("{base}/training/jobs"))
                .json(&new_job())
                .send()
                .await
            {
                Ok(r) if r.status().is_success() => break r.json::<Value>().await.unwrap(),
                _ if Instant::now() > deadline => panic!("the FastAPI peer did not come up"),
                _ => {
                    assert!(server.try_wait().unwrap().is_none(), "uvicorn exited");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        };
        ids.push((
            job["id"].as_str().unwrap().to_owned(),
            vtp_core::CallbackSecret::generate(),
        ));
    }
    let load = drive(&base, &ids, per_job, 32).await;
    // SIGTERM first: uvicorn's master stops its workers on the way out.
    // Killed outright, the workers lingered and loaded every later round.
    if let Some(pid) = server.id() {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
    }
    let _ = tokio::time::timeout(Duration::from_secs(10), server.wait()).await;
    let _ = server.kill().await;
    load
}

fn bench_callbacks(rt: &tokio::runtime::Runtime) -> Vec<Row> {
    // 50 warm-up reports, then 3,000 timed.
    let (jobs, per_job) = (50, 61);
    let mut rate = Row {
        name: format!(
            "callback ingestion, {} POSTs from 32 clients into Postgres",
            jobs * (per_job - 1)
        ),
        unit: "callbacks/s",
        higher_is_better: true,
        ours: vec![],
        peer: vec![],
        peer_name: "FastAPI + SQLAlchemy (uvicorn, 2 workers)",
    };
    let mut p99 = Row {
        name: "callback latency p99".into(),
        unit: "ms",
        higher_is_better: false,
        ours: vec![],
        peer: vec![],
        peer_name: "FastAPI + SQLAlchemy (uvicorn, 2 workers)",
    };
    let mut p50 = Row {
        name: "callback latency p50".into(),
        unit: "ms",
        higher_is_better: false,
        ours: vec![],
        peer: vec![],
        peer_name: "FastAPI + SQLAlchemy (uvicorn, 2 workers)",
    };
    for _ in 0..rounds() {
        let ours = rt.block_on(callbacks_ours(jobs, per_job));
        let peer = rt.block_on(callbacks_peer(jobs, per_job));
        rate.ours.push(ours.per_second);
        rate.peer.push(peer.per_second);
        p99.ours.push(ours.p99_ms);
        p99.peer.push(peer.p99_ms);
        p50.ours.push(ours.p50_ms);
        p50.peer.push(peer.p50_ms);
    }
    vec![rate, p50, p99]
}

// ---------------------------------------------------------------- stream flood

/// Another user's request latency while one user floods the backend with
/// event streams (`flood`), or while nobody does: the backend with tokens
/// on Postgres, served through its own accept loop. The flood opens 1,000
/// streams on one of its jobs, 64 at a time, and starts over as long as
/// the victim is measured: the first 16 stay open, the rest get 429.
async fn victim_latency(flood: bool) -> Load {
    use vtp_core::CredentialStoreExt as _;
    let db = vtp_storage::testing::TestDatabase::create()
        .await
        .expect("Postgres");
    let stores = vtp_storage::connect_stores(db.url()).await.unwrap();
    let mallory = stores
        .credentials
        .create_token("mallory", false)
        .await
        .unwrap();
    let alice = stores
        .credentials
        .create_token("alice", false)
        .await
        .unwrap();
    let job_of = |user: &str| NewJob {
        user_id: user.into(),
        ..new_job()
    };
    let target = stores.jobs.create_job(job_of("mallory")).await.unwrap();
    let own = stores.jobs.create_job(job_of("alice")).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let blobs: Arc<dyn BlobStore> = Arc::new(vtp_storage::ObjectStoreBlobStore::in_memory());
    let launcher = Arc::new(vtp_launch::HttpLauncher::new("http://127.0.0.1:9").unwrap());
    let state = vtp_server::AppState::new(stores, blobs, launcher, base.clone())
        .with_auth(vtp_server::AuthMode::Tokens);
    let stop = tokio_util::sync::CancellationToken::new();
    let server = tokio::spawn(vtp_server::serve(
        listener,
        state,
        stop.clone().cancelled_owned(),
    ));
    let client = |token: &str| {
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert(
            reqwest::header::AUTHORIZATION,
            format!("Bearer {token}").parse().unwrap(),
        );
        reqwest::Client::builder()
            .default_headers(headers)
            .build()
            .unwrap()
    };
    let (attacker, victim) = (client(&mallory.token), client(&alice.token));
    let attack = flood.then(|| {
        let url = format!("{base}/training/jobs/{}/events", target.id);
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut held = Vec::new();
            let (mut refused, mut sent) = (0u64, 0u64);
            while !stop.is_cancelled() {
                for _ in 0..1000 / 64 + 1 {
                    let batch =
                        futures::future::join_all((0..64).map(|_| attacker.get(&url).send())).await;
                    for response in batch.into_iter().flatten() {
                        sent += 1;
                        if response.status() == 429 {
                            refused += 1;
                        } else if held.len() < 16 {
                            held.push(response);
                        }
                    }
                }
            }
            (sent, refused)
        })
    });
    // The victim reads her job, one request after another.
    let url = format!("{base}/training/jobs/{}", own.id);
    for _ in 0..20 {
        victim.get(&url).send().await.unwrap();
    }
    let mut latencies = Vec::new();
    let start = Instant::now();
    for _ in 0..500 {
        let t = Instant::now();
        let response = victim.get(&url).send().await.unwrap();
        assert!(response.status().is_success(), "{}", response.status());
        let _ = response.bytes().await;
        latencies.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let seconds = start.elapsed().as_secs_f64();
    stop.cancel();
    if let Some(attack) = attack {
        let (sent, refused) = attack.await.unwrap();
        eprintln!("flood: {sent} stream requests, {refused} refused with 429");
        // Streams past the held ones are served only as held ones end (at
        // their lifetime): nearly all are refused. (tests/bounds.rs checks
        // the cap exactly.)
        assert!(
            refused * 100 >= sent * 99,
            "the flood was refused past the cap"
        );
    }
    let _ = server.await;
    latencies.sort_by(f64::total_cmp);
    Load {
        per_second: latencies.len() as f64 / seconds,
        p50_ms: latencies[latencies.len() / 2],
        p99_ms: latencies[latencies.len() * 99 / 100],
    }
}

fn bench_flood(rt: &tokio::runtime::Runtime) -> Vec<Row> {
    let peer_name = "the same backend, no flood";
    let mut p99 = Row {
        name: "another user's GET p99 while one user opens 1,000 event streams".into(),
        unit: "ms",
        higher_is_better: false,
        ours: vec![],
        peer: vec![],
        peer_name,
    };
    let mut p50 = Row {
        name: "another user's GET p50 while one user opens 1,000 event streams".into(),
        unit: "ms",
        higher_is_better: false,
        ours: vec![],
        peer: vec![],
        peer_name,
    };
    for _ in 0..rounds() {
        let flooded = rt.block_on(victim_latency(true));
        let quiet = rt.block_on(victim_latency(false));
        p99.ours.push(flooded.p99_ms);
        p99.peer.push(quiet.p99_ms);
        p50.ours.push(flooded.p50_ms);
        p50.peer.push(quiet.p50_ms);
    }
    vec![p50, p99]
}

// ---------------------------------------------------------------- S3 download

fn bench_s3(rt: &tokio::runtime::Runtime, dir: &Path) -> Vec<Row> {
    let s3 = vtp_storage::testing::TestS3::from_env().expect("S3 settings (run scripts/bench.sh)");
    let root = s3.fresh_url();
    let store = s3.builder().with_url(root.clone()).build().unwrap();
    let prefix = BlobKey::parse("dataset").unwrap();
    rt.block_on(async {
        let small = bytes::Bytes::from(vec![7u8; 4096]);
        let puts = (0..1000).map(|i| {
            let (store, small) = (store.clone(), small.clone());
            async move {
                store
                    .put_bytes(
                        &BlobKey::parse(&format!("dataset/small/{i:04}.bin")).unwrap(),
                        small,
                    )
                    .await
                    .unwrap()
            }
        });
        futures::future::join_all(puts).await;
        let large: Vec<u8> = (0..64 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
        store
            .put_bytes(&BlobKey::parse("dataset/large.bin").unwrap(), large.into())
            .await
            .unwrap();
    });
    let bucket_prefix = root
        .strip_prefix(&format!("s3://{}/", s3.bucket))
        .unwrap()
        .to_owned()
        + "/dataset";
    let mut row = Row {
        name: "dataset download from Garage: 1,000 x 4 KiB + 1 x 64 MiB".into(),
        unit: "s",
        higher_is_better: false,
        ours: vec![],
        peer: vec![],
        peer_name: "boto3, 16 threads",
    };
    for round in 0..rounds() {
        let out = dir.join(format!("s3-ours-{round}"));
        let start = Instant::now();
        let files = rt.block_on(store.download_prefix(&prefix, &out)).unwrap();
        row.ours.push(start.elapsed().as_secs_f64());
        assert_eq!(files.len(), 1001);
        let _ = std::fs::remove_dir_all(&out);
        let out = dir.join(format!("s3-peer-{round}"));
        let env = [
            (
                "VTP_TEST_S3_ENDPOINT",
                s3.settings.endpoint.clone().unwrap(),
            ),
            ("VTP_TEST_S3_REGION", s3.settings.region.clone().unwrap()),
            (
                "VTP_TEST_S3_ACCESS_KEY_ID",
                s3.settings.access_key_id.clone().unwrap(),
            ),
            (
                "VTP_TEST_S3_SECRET_ACCESS_KEY",
                s3.settings.secret_access_key.clone().unwrap(),
            ),
        ];
        let args = [
            "--bucket",
            &s3.bucket,
            "--prefix",
            &bucket_prefix,
            "--out",
            out.to_str().unwrap(),
        ]
        .map(str::to_owned);
        let peer = run_peer("s3_download.py", &args, &env);
        assert_eq!(peer["objects"], 1001);
        row.peer.push(peer["seconds"].as_f64().unwrap());
        let _ = std::fs::remove_dir_all(&out);
    }
    vec![row]
}

// ---------------------------------------------------------------- main

fn main() {
    let pairs: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let all = [
        "step",
        "pipeline",
        "epoch",
        "detect_step",
        "detect_epoch",
        "callbacks",
        "flood",
        "s3",
    ];
    let pairs: Vec<&str> = if pairs.is_empty() {
        all.to_vec()
    } else {
        pairs.iter().map(String::as_str).collect()
    };
    let target = std::env::var("CARGO_TARGET_DIR")
        .map_or_else(|_| PathBuf::from("target"), PathBuf::from)
        .join("bench");
    std::fs::create_dir_all(&target).unwrap();
    let work = tempfile::tempdir_in(&target).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(THREADS)
        .enable_all()
        .build()
        .unwrap();
    let mut rows = Vec::new();
    for pair in pairs {
        eprintln!("== {pair}");
        rows.extend(match pair {
            "step" => bench_step(work.path()),
            "pipeline" => bench_pipeline(work.path(), false),
            "epoch" => bench_pipeline(work.path(), true),
            "detect_step" => bench_detect_step(work.path()),
            "detect_epoch" => bench_detect_epoch(work.path()),
            "callbacks" => bench_callbacks(&rt),
            "flood" => bench_flood(&rt),
            "s3" => bench_s3(&rt, work.path()),
            other => panic!("unknown pair {other:?}; known: {all:?}"),
        });
    }
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_default();
    let mut table = format!(
        "Machine: {cpu}, {} cores; {THREADS} threads each side; {} interleaved rounds; medians.\n\n| benchmark | unit | VTP | peer | peer value | ratio (VTP vs peer) |\n|---|---|---|---|---|---|\n",
        std::thread::available_parallelism().map_or(0, std::num::NonZero::get),
        rounds()
    );
    for row in &rows {
        table.push_str(&format!(
            "| {} | {} | {:.2} | {} | {:.2} | {:.2}x |\n",
            row.name,
            row.unit,
            median(&row.ours),
            row.peer_name,
            median(&row.peer),
            row.ratio()
        ));
    }
    println!("{table}");
    std::fs::write(target.join("side_by_side.md"), &table).unwrap();
}
