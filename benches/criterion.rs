//! Criterion benchmarks of the hot paths: a training step, a detection
//! step (YOLO forward, v8 loss, backward, SGD), NMS with COCO mAP, the input
//! pipeline, callback ingestion through the backend into a store, and a
//! 50 MB checkpoint put and get against S3 (when `VTP_TEST_S3_*` is set).
//!
//! Run with: cargo bench -p vtp-server --features torch --bench criterion

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, header};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use tower::ServiceExt;
use vtp_core::{BlobKey, BlobStore, BlobStoreExt, JobStatus, JobStoreExt, NewJob};
use vtp_trainer::engine::ModelKind;

mod common;
use common::{THREADS, jpeg_folder, load_batches, model_and_sgd, step_fixture, uncached_loader};

fn training_step(c: &mut Criterion) {
    tch::set_num_threads(THREADS as i32);
    let dir = tempfile::tempdir().unwrap();
    let mut group = c.benchmark_group("training_step");
    group.sample_size(20);
    for (kind, size, batch) in [(ModelKind::SmallCnn, 28, 64), (ModelKind::ResNet18, 64, 32)] {
        let (weights, batches) = step_fixture(dir.path(), kind, size, batch);
        let (_vs, model, mut opt) = model_and_sgd(kind, Some(&weights));
        let batches = load_batches(&batches);
        let mut i = 0;
        group.throughput(Throughput::Elements(batch as u64));
        group.bench_function(
            BenchmarkId::new(kind.name(), format!("{size}x{size}/b{batch}")),
            |b| {
                b.iter(|| {
                    let (x, y) = &batches[i % batches.len()];
                    i += 1;
                    let loss = model.forward_t(x, true).cross_entropy_for_logits(y);
                    opt.backward_step(&loss).unwrap();
                    loss.double_value(&[])
                });
            },
        );
    }
    group.finish();
}

fn detection_step(c: &mut Criterion) {
    use vtp_trainer::engine::detect::loss::{DetectionLoss, LossGains};
    use vtp_trainer::engine::detect::model::{DetectionModel, YoloVariant};
    tch::set_num_threads(THREADS as i32);
    let dir = tempfile::tempdir().unwrap();
    let variant = YoloVariant::V11n;
    let (weights, batches, nc) = common::detect_step_fixture(dir.path(), variant, 128, 16, 2);
    let mut vs = tch::nn::VarStore::new(tch::Device::Cpu);
    let model = DetectionModel::new(&vs.root(), variant, nc);
    vs.load(&weights).unwrap();
    let params = vs
        .variables()
        .into_iter()
        .filter(|(_, t)| t.requires_grad())
        .collect();
    let mut opt = vtp_trainer::engine::optim::Optimizer::new(
        vtp_trainer::engine::OptimizerKind::Sgd,
        0.01,
        0.9,
        0.0,
        params,
    );
    let loss_fn = DetectionLoss::new(nc, 16, [8.0, 16.0, 32.0], LossGains::default());
    let batches = common::load_detect_batches(&batches);
    let mut i = 0;
    let mut group = c.benchmark_group("detection_step");
    group.sample_size(10);
    group.throughput(Throughput::Elements(16));
    group.bench_function("yolo11n/128x128/b16", |b| {
        b.iter(|| {
            let (x, t) = &batches[i % batches.len()];
            i += 1;
            let (loss, parts) = loss_fn.compute(&model.forward_t(x, true), t);
            opt.backward_step(&loss).unwrap();
            parts.box_loss
        });
    });
    group.finish();
}

fn nms_and_map(c: &mut Criterion) {
    use vtp_trainer::engine::detect::metrics::{GroundTruth, MapEvaluator};
    use vtp_trainer::engine::detect::nms::{NmsConfig, non_max_suppression};
    // A validation batch's decoded output: 16 images, 10 classes, the 1,344
    // anchors of a 128 px input, with a few confident boxes among noise.
    tch::manual_seed(0);
    let (n, nc, anchors) = (16i64, 10i64, 1344i64);
    let xy = tch::Tensor::rand([n, 2, anchors], (tch::Kind::Float, tch::Device::Cpu)) * 128.0;
    let wh = tch::Tensor::rand([n, 2, anchors], (tch::Kind::Float, tch::Device::Cpu)) * 40.0 + 4.0;
    let scores = tch::Tensor::rand([n, nc, anchors], (tch::Kind::Float, tch::Device::Cpu))
        .pow_tensor_scalar(8);
    let pred = tch::Tensor::cat(&[xy, wh, scores], 1);
    let config = NmsConfig {
        conf: 0.001,
        multi_label: true,
        ..NmsConfig::default()
    };
    let gts: Vec<GroundTruth> = (0..4)
        .map(|k| GroundTruth {
            bbox: [10.0 + 25.0 * k as f32, 20.0, 30.0 + 25.0 * k as f32, 50.0],
            class: k,
        })
        .collect();
    let mut group = c.benchmark_group("nms_and_map");
    group.sample_size(20);
    group.throughput(Throughput::Elements(n as u64));
    group.bench_function("val_batch/16x1344_anchors_10_classes", |b| {
        b.iter(|| {
            let detections = non_max_suppression(&pred, &config);
            let mut evaluator = MapEvaluator::new(nc as usize);
            for dets in &detections {
                evaluator.add_image(&gts, dets);
            }
            evaluator.finish().map
        });
    });
    group.finish();
}

fn input_pipeline(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let root = jpeg_folder(dir.path());
    let loader = uncached_loader(&root, 64);
    let mut group = c.benchmark_group("input_pipeline");
    group.sample_size(10);
    group.throughput(Throughput::Elements(loader.len() as u64));
    group.bench_function("decode_augment_batch/2000x96px_to_64px", |b| {
        b.iter(|| {
            loader
                .epoch(1, 1, true)
                .map(|batch| batch.len())
                .sum::<usize>()
        });
    });
    group.finish();
}

fn callback_ingestion(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(THREADS)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (app, job_id) = rt.block_on(async {
        let stores = vtp_storage::Stores::new(
            vtp_storage::SqliteJobStore::open(&dir.path().join("bench.db"))
                .await
                .unwrap(),
        );
        let store = stores.jobs.clone();
        let job = store
            .create_job(NewJob {
                user_id: "bench".into(),
                model_name: "small_cnn".into(),
                framework: "tch".into(),
                dataset_s3_uri: "s3://b/d".into(),
                config: serde_json::json!({}),
                priority: 0,
            })
            .await
            .unwrap();
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
        let blobs: Arc<dyn BlobStore> = Arc::new(vtp_storage::ObjectStoreBlobStore::in_memory());
        let launcher = Arc::new(vtp_launch::HttpLauncher::new("http://127.0.0.1:9").unwrap());
        (
            vtp_server::app(vtp_server::AppState::new(
                stores,
                blobs,
                launcher,
                "http://127.0.0.1:8000",
            )),
            (job.id, secret),
        )
    });
    let (job_id, secret) = job_id;
    let mut seq = 0i64;
    let mut group = c.benchmark_group("callback_ingestion");
    group.throughput(Throughput::Elements(1));
    group.bench_function("post_callback_into_sqlite", |b| {
        b.iter(|| {
            seq += 1;
            let body = serde_json::json!({"status": "running", "seq": seq, "metrics": {"epoch": seq, "loss": 0.5}})
                .to_string();
            let mut request = Request::post(format!("/training/jobs/{job_id}/callback"))
                .header(header::CONTENT_TYPE, "application/json");
            for (name, value) in secret.headers(&format!("{job_id}-{seq}"), body.as_bytes()).unwrap() {
                request = request.header(name, value);
            }
            let request = request.body(Body::from(body)).unwrap();
            let response = rt.block_on(app.clone().oneshot(request)).unwrap();
            assert!(response.status().is_success());
        });
    });
    group.finish();
}

fn checkpoint_s3(c: &mut Criterion) {
    let Some(s3) = vtp_storage::testing::TestS3::from_env() else {
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(THREADS)
        .enable_all()
        .build()
        .unwrap();
    let store = s3.fresh_store();
    let data = bytes::Bytes::from(
        (0..50 * 1024 * 1024u32)
            .map(|i| (i % 253) as u8)
            .collect::<Vec<u8>>(),
    );
    let key = BlobKey::parse("checkpoints/bench.safetensors").unwrap();
    let mut group = c.benchmark_group("checkpoint_s3");
    group.sample_size(10);
    group.throughput(Throughput::Bytes(data.len() as u64));
    group.bench_function("put_50MB", |b| {
        b.iter(|| rt.block_on(store.put_bytes(&key, data.clone())).unwrap())
    });
    group.bench_function("get_50MB", |b| {
        b.iter(|| rt.block_on(store.get_bytes(&key)).unwrap().len())
    });
    group.finish();
}

criterion_group!(
    benches,
    training_step,
    detection_step,
    nms_and_map,
    input_pipeline,
    callback_ingestion,
    checkpoint_s3
);
criterion_main!(benches);
