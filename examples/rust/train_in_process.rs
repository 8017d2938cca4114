//! Training in process with the SDK alone: no backend, no HTTP, no blob
//! store. A [`TchTrainer`] trains a small CNN on a generated ImageFolder
//! (three classes of noisy shapes) and reports every epoch to a
//! [`ProgressSink`] of our own; the checkpoint is safetensors plus a JSON
//! sidecar, which a [`Predictor`] then loads to classify an image.
//!
//! ```sh
//! eval "$(scripts/libtorch.sh)"
//! cargo run -p vtp-examples --features torch --example train_in_process
//! ```

use vtp_core::{EpochReport, JobId, ProgressSink, TrainSpec, Trainer};
use vtp_trainer::{Predictor, TchTrainer};

/// Prints each epoch as it ends.
struct PrintEpochs;

impl ProgressSink for PrintEpochs {
    fn epoch_finished(&mut self, report: &EpochReport) {
        let metric = |name: &str| report.metrics.get(name).copied().unwrap_or(f64::NAN);
        println!(
            "epoch {:>2}/{}  loss {:.4}  val_loss {:.4}  val_accuracy {:.1}%",
            report.epoch,
            report.epochs,
            metric("loss"),
            metric("val_loss"),
            100.0 * metric("accuracy"),
        );
    }
}

fn main() -> anyhow::Result<()> {
    let work = tempfile::tempdir()?;
    let dataset = work.path().join("shapes");
    // 40 images per class, 24x24: disc, square, stripes.
    vtp_trainer::testing::shapes_dataset(&dataset, 40, 7);

    let spec = TrainSpec {
        job_id: JobId::new(),
        // The same `config` a job takes over HTTP (vtp_core::TrainConfig).
        config: serde_json::json!({
            "model": "small_cnn",
            "epochs": 6,
            "image_size": 24,
            "batch_size": 16,
            "lr": 0.05,
            "threads": 2,
            "workers": 1,
        }),
        dataset_dir: dataset.clone(),
        output_dir: work.path().join("out"),
        init_weights: None,
    };
    let mut trainer = TchTrainer::new();
    let summary = trainer.train(&spec, &mut PrintEpochs, &|| false)?;
    let accuracy = summary.metrics.get("accuracy").copied().unwrap_or(0.0);
    println!(
        "trained {} epochs: validation accuracy {:.1}%, checkpoint {}",
        summary.epochs,
        100.0 * accuracy,
        summary.checkpoint.display()
    );

    let predictor = Predictor::load(&summary.checkpoint)?;
    let image = dataset.join("disc").join("0.png");
    let prediction = predictor.predict_paths(&[&image])?.remove(0);
    println!(
        "{} looks like a {} ({:.0}%)",
        image.display(),
        prediction.class,
        100.0 * prediction.probability
    );
    // Shapes this distinct are learned in a few epochs; anything near
    // chance (33%) means training did not work.
    anyhow::ensure!(accuracy > 0.6, "accuracy {accuracy} is near chance");
    Ok(())
}
