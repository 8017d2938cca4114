//! The seed's own job, end to end on the real binaries, Postgres and Garage:
//! a YOLO dataset zip goes up through `/datasets/upload`, the seed's create
//! body (`yolo11n`, framework `ultralytics`) trains to `completed` in the
//! subprocess trainer with per-epoch mAP, and the downloaded checkpoint
//! predicts boxes.

mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::ServiceProcess;
use vtp_storage::testing::{TestDatabase, TestS3};
use vtp_trainer::engine::{DetectOptions, Predictor};

async fn call(request: reqwest::RequestBuilder) -> (u16, Value) {
    let (status, body) = support::json_of(request.send().await.unwrap()).await;
    (status.as_u16(), body)
}

/// Polls the job until it ends; returns it.
async fn finished(backend: &ServiceProcess, id: &str) -> Value {
    let http = reqwest::Client::new();
    let mut job = Value::Null;
    for _ in 0..3000 {
        let (_, current) = call(http.get(backend.at(&format!("/training/jobs/{id}")))).await;
        job = current;
        if matches!(
            job["status"].as_str(),
            Some("completed" | "failed" | "cancelled")
        ) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    job
}

async fn download(http: &reqwest::Client, url: String, to: &std::path::Path) {
    let response = http.get(url).send().await.unwrap();
    assert_eq!(response.status(), 200, "{}", to.display());
    std::fs::write(to, response.bytes().await.unwrap()).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seeds_yolo_job_trains_reports_map_and_its_checkpoint_finds_boxes() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let Some(s3) = TestS3::from_env() else { return };
    let blob_url = s3.fresh_url();
    let work = tempfile::tempdir().unwrap();
    let mut env = s3.env_for(&blob_url);
    env.push(("VTP_DATABASE_URL", db.url().to_owned()));
    env.push(("VTP_LAUNCHER", "subprocess".to_owned()));
    env.push(("VTP_TRAINER_BIN", support::trainer_bin()));
    env.push((
        "VTP_WORK_DIR",
        work.path().join("trainer").display().to_string(),
    ));
    let backend = ServiceProcess::start(&env).await;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();

    // A YOLO dataset (data.yaml, images/, labels/) as a zip, uploaded as the seed does.
    let data = tempfile::tempdir().unwrap();
    let root = vtp_trainer::testing::yolo_shapes_dataset(&data.path().join("shapes"), 24, 8, 64, 5);
    let archive = data.path().join("shapes-yolo.zip");
    vtp_trainer::testing::zip_dir(&root, &archive);
    let form = reqwest::multipart::Form::new()
        .part(
            "file",
            reqwest::multipart::Part::bytes(std::fs::read(&archive).unwrap())
                .file_name("sample.zip"),
        )
        .text("user_id", "test")
        .text("dataset_name", "my-dataset");
    let (status, uploaded) = call(http.post(backend.at("/datasets/upload")).multipart(form)).await;
    assert_eq!(status, 201, "{uploaded}");
    let dataset = uploaded["s3_uri"].as_str().unwrap();

    // The seed's create body, verbatim but for the dataset URI, plus a
    // config small enough for a CPU test.
    let body = json!({
        "user_id": "test",
        "model_name": "yolo11n",
        "framework": "ultralytics",
        "dataset_s3_uri": dataset,
        "config": {"epochs": 2, "image_size": 64, "batch_size": 8, "nbs": 8, "workers": 1, "threads": 1}
    });
    let (status, job) = call(http.post(backend.at("/training/jobs")).json(&body)).await;
    assert_eq!(status, 201, "{job}");
    let id = job["id"].as_str().unwrap().to_owned();
    let (status, started) =
        call(http.post(backend.at(&format!("/training/jobs/{id}/start")))).await;
    assert_eq!(status, 202, "{started}");

    let job = finished(&backend, &id).await;
    assert_eq!(job["status"], "completed", "{job}");
    assert!(
        job["message"].as_str().unwrap().contains("mAP50-95"),
        "{job}"
    );

    let (_, metrics) = call(http.get(backend.at(&format!("/training/jobs/{id}/metrics")))).await;
    let rows = metrics.as_array().unwrap();
    assert_eq!(rows.len(), 2, "{metrics}");
    for (epoch, row) in rows.iter().enumerate() {
        assert_eq!(row["epoch"], epoch as u64 + 1);
        for key in [
            "box_loss",
            "cls_loss",
            "dfl_loss",
            "val_box_loss",
            "val_cls_loss",
            "val_dfl_loss",
            "precision",
            "recall",
            "map50",
            "map",
            "epoch_seconds",
            "images_per_second",
        ] {
            assert!(row[key].is_number(), "{key} missing in {row}");
        }
        let map = row["map"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&map), "{row}");
    }

    // The checkpoint and its sidecar download and find boxes, in the
    // image's own pixels.
    let model = tempfile::tempdir().unwrap();
    download(
        &http,
        backend.at(&format!("/training/jobs/{id}/checkpoint")),
        &model.path().join("best.safetensors"),
    )
    .await;
    download(
        &http,
        backend.at(&format!("/training/jobs/{id}/checkpoint/best.json")),
        &model.path().join("best.json"),
    )
    .await;
    // The CLI does the same: `vtp download` fetches weights and sidecar,
    // `vtp predict` prints boxes and draws them.
    let cli = tempfile::tempdir().unwrap();
    let vtp = |args: &[&str]| {
        let out = std::process::Command::new(support::vtp_cli())
            .args(args)
            .env("VTP_URL", backend.at(""))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "vtp {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let dir = cli.path().display().to_string();
    vtp(&["download", &id, "-o", &dir]);
    assert!(cli.path().join("best.json").is_file());
    let weights = cli.path().join("best.safetensors");
    assert_eq!(
        std::fs::read(&weights).unwrap(),
        std::fs::read(model.path().join("best.safetensors")).unwrap()
    );

    let predictor = Predictor::load(&model.path().join("best.safetensors")).unwrap();
    assert_eq!(predictor.task(), vtp_core::Task::Detect);
    let image = std::fs::read_dir(root.join("images").join("val"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .min()
        .unwrap();
    let (width, height) = image::image_dimensions(&image).unwrap();
    // Two epochs teach little: ask for every box the model dares.
    let options = DetectOptions {
        conf: 0.001,
        ..DetectOptions::default()
    };
    let found = predictor.detect_paths(&[&image], &options).unwrap();
    let drawn = cli.path().join("boxes.png");
    let printed = vtp(&[
        "predict",
        weights.to_str().unwrap(),
        image.to_str().unwrap(),
        "--conf",
        "0.001",
        "--draw",
        drawn.to_str().unwrap(),
    ]);
    // One line per box (path, class, score, x1, y1, x2, y2), then where the picture went.
    let rows: Vec<&str> = printed
        .lines()
        .filter(|l| l.split('\t').count() == 7)
        .collect();
    assert_eq!(rows.len(), found[0].len(), "{printed}");
    assert!(image::open(&drawn).unwrap().width() > 0);
    assert_eq!(found.len(), 1);
    assert!(!found[0].is_empty(), "no box at all");
    for b in &found[0] {
        assert!(
            b.bbox[0] >= -1.0 && b.bbox[2] <= f64::from(width) + 1.0,
            "{b:?}"
        );
        assert!(
            b.bbox[1] >= -1.0 && b.bbox[3] <= f64::from(height) + 1.0,
            "{b:?}"
        );
        assert!(b.bbox[0] <= b.bbox[2] && b.bbox[1] <= b.bbox[3], "{b:?}");
        assert!(predictor.classes().contains(&b.class));
    }

    // Fine-tuning: a second job starts from the first one's checkpoint, by
    // its blob URI; the trainer fetches it, and the new checkpoint records
    // the URI it was given (not where the trainer kept its copy).
    let weights_uri = job["checkpoint_s3_uri"].as_str().unwrap().to_owned();
    let mut tuned = body.clone();
    tuned["config"]["epochs"] = json!(1);
    tuned["config"]["init_weights"] = json!(weights_uri);
    let (status, second) = call(http.post(backend.at("/training/jobs")).json(&tuned)).await;
    assert_eq!(status, 201, "{second}");
    let second_id = second["id"].as_str().unwrap().to_owned();
    let (status, started) =
        call(http.post(backend.at(&format!("/training/jobs/{second_id}/start")))).await;
    assert_eq!(status, 202, "{started}");
    let second = finished(&backend, &second_id).await;
    assert_eq!(second["status"], "completed", "{second}");
    let (_, sidecar) =
        call(http.get(backend.at(&format!("/training/jobs/{second_id}/checkpoint/best.json"))))
            .await;
    assert_eq!(
        sidecar["config"]["init_weights"],
        json!(weights_uri),
        "{sidecar}"
    );
}
