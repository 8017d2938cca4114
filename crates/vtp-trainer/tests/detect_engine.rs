//! The detection engine on generated scenes: a YOLO detector learns (mAP50
//! well above chance, the loss falls), resumes where it stopped, refuses
//! bad datasets before any epoch, and stops on a NaN loss without saving a
//! broken checkpoint.

use std::path::{Path, PathBuf};

use vtp_core::{EpochReport, Error, JobId, ProgressSink, TrainSpec, Trainer};
use vtp_trainer::engine::{Checkpoint, DetectOptions, Predictor, TchTrainer};
use vtp_trainer::testing::yolo_shapes_dataset;

/// libtorch's thread pool is process-wide; these tests train one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[derive(Default)]
struct Recorder(Vec<EpochReport>);

impl ProgressSink for Recorder {
    fn epoch_finished(&mut self, report: &EpochReport) {
        self.0.push(report.clone());
    }
}

fn spec(dataset: &Path, output: &Path, config: serde_json::Value) -> TrainSpec {
    TrainSpec {
        job_id: JobId::new(),
        config,
        dataset_dir: dataset.to_path_buf(),
        output_dir: output.to_path_buf(),
        init_weights: None,
    }
}

/// Small and quick on two cores: 64 px scenes, an optimizer step every
/// batch, mosaic for all but the last two epochs.
fn config(epochs: u32) -> serde_json::Value {
    serde_json::json!({"model": "yolov8n", "epochs": epochs, "image_size": 64, "batch_size": 16,
                       "nbs": 16, "close_mosaic": 2, "threads": 2, "workers": 2, "seed": 3})
}

fn train(spec: &TrainSpec) -> (vtp_core::Result<vtp_core::TrainSummary>, Vec<EpochReport>) {
    let mut recorder = Recorder::default();
    let result = TchTrainer::new().train(spec, &mut recorder, &|| false);
    (result, recorder.0)
}

fn dataset(train: usize, val: usize) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let root = yolo_shapes_dataset(&dir.path().join("scenes"), train, val, 64, 11);
    (dir, root)
}

fn invalid_dataset_message(result: vtp_core::Result<vtp_core::TrainSummary>) -> String {
    match result {
        Err(Error::InvalidInput { field, message }) => {
            assert_eq!(field, "dataset", "{message}");
            message
        }
        other => panic!("expected an invalid dataset, got {other:?}"),
    }
}

#[test]
fn a_detector_learns_and_its_checkpoint_finds_the_objects() {
    let _serial = serial();
    let (dir, data) = dataset(160, 40);
    let out = dir.path().join("out");
    let epochs = 12;
    let (summary, reports) = train(&spec(&data, &out, config(epochs)));
    let summary = summary.unwrap();
    assert_eq!(reports.len(), epochs as usize);
    let losses: Vec<f64> = reports.iter().map(|r| r.metrics["loss"]).collect();
    let last = &reports.last().unwrap().metrics;
    // A YOLO loss first rises: while the predicted boxes are noise the
    // task-aligned assigner gives few anchors any target score, so the box
    // and DFL terms (weighted by those scores) start small. From its peak
    // it must fall.
    let peak = losses.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    assert!(last["loss"] < peak * 0.5, "loss falls: {losses:.3?}");
    let best_map50 = reports
        .iter()
        .map(|r| r.metrics["map50"])
        .fold(0.0, f64::max);
    assert!(
        best_map50 > 0.3,
        "mAP50 well above chance: {:?}",
        reports
            .iter()
            .map(|r| r.metrics["map50"])
            .collect::<Vec<_>>()
    );
    for key in [
        "box_loss",
        "cls_loss",
        "dfl_loss",
        "val_box_loss",
        "val_cls_loss",
        "val_dfl_loss",
        "precision",
        "recall",
        "map",
        "fitness",
        "epoch_seconds",
        "images_per_second",
    ] {
        assert!(last[key].is_finite(), "{key}: {last:?}");
    }
    assert!(last["map"] <= last["map50"], "{last:?}");

    // best is the epoch of the highest fitness, and what its sidecar says.
    let checkpoint = Checkpoint::open(&summary.checkpoint).unwrap();
    let best_fitness = reports
        .iter()
        .map(|r| r.metrics["fitness"])
        .fold(f64::NEG_INFINITY, f64::max);
    assert_eq!(checkpoint.meta.task, vtp_core::Task::Detect);
    assert_eq!(checkpoint.meta.best_fitness, Some(best_fitness));
    assert_eq!(checkpoint.meta.metrics["fitness"], best_fitness);
    assert_eq!(
        checkpoint.meta.class_names,
        vtp_trainer::testing::YOLO_SHAPES_CLASSES.map(String::from)
    );
    // Per class its mAP50-95; their mean over the classes with ground truth
    // is the map.
    let per_class = checkpoint.meta.per_class.as_ref().unwrap();
    assert_eq!(per_class.metric, "map");
    assert_eq!(per_class.values.len(), checkpoint.meta.class_names.len());
    let present: Vec<f64> = per_class.values.iter().flatten().copied().collect();
    assert!(!present.is_empty());
    let mean = present.iter().sum::<f64>() / present.len() as f64;
    assert!(
        (mean - checkpoint.meta.metrics["map"]).abs() < 1e-9,
        "{per_class:?}"
    );

    // The checkpoint finds objects on fresh scenes, near where they are.
    let fresh = tempfile::tempdir().unwrap();
    let fresh_root = yolo_shapes_dataset(&fresh.path().join("fresh"), 1, 8, 64, 99);
    let predictor = Predictor::load(&summary.checkpoint).unwrap();
    let images: Vec<PathBuf> = {
        let mut v: Vec<_> = std::fs::read_dir(fresh_root.join("images").join("val"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        v.sort();
        v
    };
    let found = predictor
        .detect_paths(&images, &DetectOptions::default())
        .unwrap();
    let with_boxes = found.iter().filter(|f| !f.is_empty()).count();
    assert!(
        with_boxes >= images.len() / 2,
        "boxes on most fresh scenes: {found:?}"
    );
}

#[test]
fn training_resumes_at_the_next_epoch_from_the_last_checkpoint() {
    let _serial = serial();
    let (dir, data) = dataset(32, 8);
    let out = dir.path().join("out");
    let (first, reports) = train(&spec(&data, &out, config(2)));
    first.unwrap();
    assert_eq!(reports.len(), 2);
    let (second, more) = train(&spec(&data, &out, config(3)));
    second.unwrap();
    assert_eq!(
        more.iter().map(|r| r.epoch).collect::<Vec<_>>(),
        [3],
        "only the missing epoch runs"
    );
    let last = Checkpoint::open(&out.join("last.json")).unwrap();
    assert_eq!(last.meta.epoch, 3);
    assert_eq!(last.meta.history.len(), 3);
    assert!(last.meta.ema_updates.unwrap() > 0);
}

/// `amp` on CPU: the detector's forward pass in bfloat16, its loss in
/// float32; both epochs finish with finite losses and a float32 checkpoint.
#[test]
fn a_detector_trains_under_amp() {
    let _serial = serial();
    let (dir, data) = dataset(32, 8);
    let out = dir.path().join("amp");
    let mut mixed = config(2);
    mixed["amp"] = true.into();
    mixed["device"] = "cpu".into();
    let (result, reports) = train(&spec(&data, &out, mixed));
    result.unwrap();
    assert_eq!(reports.len(), 2);
    for report in &reports {
        for key in ["box_loss", "cls_loss", "dfl_loss", "val_loss"] {
            assert!(
                report.metrics[key].is_finite(),
                "{key}: {:?}",
                report.metrics
            );
        }
    }
    let last = Checkpoint::open(&out.join("last.json")).unwrap();
    assert!(last.meta.config.amp);
}

#[test]
fn bad_datasets_fail_before_any_epoch_naming_the_file_and_line() {
    let _serial = serial();
    let (dir, data) = dataset(8, 4);
    let out = dir.path().join("out");

    // A class outside data.yaml's names.
    let label = std::fs::read_dir(data.join("labels").join("train"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| std::fs::metadata(p).unwrap().len() > 0)
        .unwrap();
    let good = std::fs::read_to_string(&label).unwrap();
    std::fs::write(&label, format!("{good}7 0.5 0.5 0.2 0.2\n")).unwrap();
    let (result, reports) = train(&spec(&data, &out, config(1)));
    let message = invalid_dataset_message(result);
    let name = label.file_name().unwrap().to_str().unwrap();
    let line = good.lines().count() + 1;
    assert!(
        message.contains(name) && message.contains(&format!("line {line}")),
        "{message}"
    );
    assert!(reports.is_empty());
    std::fs::write(&label, good).unwrap();

    // No data.yaml at all.
    std::fs::rename(data.join("data.yaml"), data.join("moved.txt")).unwrap();
    let (result, reports) = train(&spec(&data, &out, config(1)));
    assert!(invalid_dataset_message(result).contains("data.yaml"));
    assert!(reports.is_empty());
    assert!(!out.join("last.safetensors").exists());
}

#[test]
fn a_nan_loss_stops_the_job_without_a_broken_checkpoint() {
    let _serial = serial();
    let (dir, data) = dataset(16, 4);
    let out = dir.path().join("out");
    // Weights that make every output NaN: the first convolution's kernel.
    let weights = dir.path().join("nan.safetensors");
    let nan = tch::Tensor::full(
        [16, 3, 3, 3],
        f64::NAN,
        (tch::Kind::Float, tch::Device::Cpu),
    );
    tch::Tensor::write_safetensors(&[("model.0.conv.weight", nan)], &weights).unwrap();
    let mut cfg = config(2);
    cfg["init_weights"] = weights.display().to_string().into();
    let (result, reports) = train(&spec(&data, &out, cfg));
    match result {
        Err(Error::InvalidInput { field, message }) => {
            assert_eq!(field, "config.lr");
            assert!(message.contains("diverged"), "{message}");
        }
        other => panic!("expected a divergence error, got {other:?}"),
    }
    assert!(reports.is_empty());
    assert!(!out.join("best.safetensors").exists());
    assert!(!out.join("last.safetensors").exists());
}
