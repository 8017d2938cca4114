//! Trains a model for a few epochs on generated scenes, in float32 or with
//! `amp`, and prints one JSON line with its speed: the measuring half of
//! `scripts/gpu-check.sh`, which runs it once per precision and samples the
//! GPU memory each run holds.
//!
//! `cargo run --release --features torch,testing --example amp_check -- AMP [MODEL] [IMAGE_SIZE] [BATCH] [IMAGES] [DEVICE]`
//! (defaults: yolov8n, 320, 32, 512, cuda); AMP is 0 or 1.

use vtp_core::{EpochReport, JobId, ProgressSink, TrainSpec, Trainer};
use vtp_trainer::engine::TchTrainer;
use vtp_trainer::testing::{shapes_dataset, yolo_shapes_dataset};

#[derive(Default)]
struct Epochs(Vec<EpochReport>);

impl ProgressSink for Epochs {
    fn epoch_finished(&mut self, report: &EpochReport) {
        self.0.push(report.clone());
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize, default: &str| args.get(i).cloned().unwrap_or_else(|| default.to_owned());
    let amp = arg(0, "0") == "1";
    let model = arg(1, "yolov8n");
    let image_size: u32 = arg(2, "320").parse()?;
    let batch: usize = arg(3, "32").parse()?;
    let images: usize = arg(4, "512").parse()?;
    let device = arg(5, "cuda");
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get().min(4));
    let dir = tempfile::tempdir()?;
    let detector = model.starts_with("yolo");
    let data = if detector {
        yolo_shapes_dataset(&dir.path().join("scenes"), images, batch, image_size, 7)
    } else {
        let root = dir.path().join("shapes");
        shapes_dataset(&root, images / 3, 7);
        root
    };
    let config = serde_json::json!({
        "model": model, "epochs": 3, "image_size": image_size, "batch_size": batch,
        "device": device, "amp": amp, "seed": 1, "workers": workers,
    });
    let spec = TrainSpec {
        job_id: JobId::new(),
        config,
        dataset_dir: data,
        output_dir: dir.path().join("out"),
        init_weights: None,
    };
    let mut epochs = Epochs::default();
    TchTrainer::new().train(&spec, &mut epochs, &|| false)?;
    // The first epoch warms up (kernel selection, allocator); the rest are timed.
    let warm = &epochs.0[1..];
    let rate = warm
        .iter()
        .map(|e| e.metrics["images_per_second"])
        .sum::<f64>()
        / warm.len() as f64;
    let last = &epochs.0[epochs.0.len() - 1].metrics;
    let line = serde_json::json!({
        "amp": amp,
        "model": model,
        "image_size": image_size,
        "batch": batch,
        "images_per_second": rate,
        "step_ms": 1000.0 * batch as f64 / rate,
        "loss": last["loss"],
        "amp_scale": last.get("amp_scale"),
        "amp_skipped_steps": last.get("amp_skipped_steps"),
    });
    println!("{line}");
    Ok(())
}
