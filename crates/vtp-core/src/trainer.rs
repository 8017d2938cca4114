//! Training itself: the [`Trainer`] trait, run by a trainer service.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::job::JobId;

/// Everything a trainer needs for one job, with the dataset already local.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainSpec {
    /// The job.
    pub job_id: JobId,
    /// Hyperparameters, including `model`.
    pub config: serde_json::Value,
    /// The dataset, downloaded and unpacked.
    pub dataset_dir: PathBuf,
    /// Where checkpoints go.
    pub output_dir: PathBuf,
    /// `config.init_weights`, fetched to a local file by whoever fetched
    /// the dataset; the config keeps the URI the user gave (and the
    /// checkpoint records it), the trainer reads this file. `None`: the
    /// trainer reads `config.init_weights` as a local path, if set.
    #[serde(default)]
    pub init_weights: Option<PathBuf>,
}

/// The result of one epoch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochReport {
    /// 1-based epoch number.
    pub epoch: u32,
    /// Total epochs planned.
    pub epochs: u32,
    /// Named metrics: `loss`, `val_loss`, `accuracy`, ...
    pub metrics: BTreeMap<String, f64>,
}

/// What a finished run leaves behind.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainSummary {
    /// Epochs completed.
    pub epochs: u32,
    /// The checkpoint to publish.
    pub checkpoint: PathBuf,
    /// The final epoch's metrics.
    pub metrics: BTreeMap<String, f64>,
    /// Why the run ended before its last epoch (`patience`, the `time`
    /// limit), if it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stopped: Option<String>,
    /// The checkpoint's validation per class, its classes named (none past
    /// [`crate::ClassReport::MAX_CLASSES`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_class: Option<crate::ClassReport>,
}

/// Progress inside an epoch, after one training step (for progress bars
/// and heartbeats).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct StepProgress {
    /// 1-based epoch.
    pub epoch: u32,
    /// Epochs planned.
    pub epochs: u32,
    /// Steps done in this epoch.
    pub step: usize,
    /// Steps in this epoch.
    pub steps: usize,
    /// Running mean training loss of this epoch.
    pub loss: f64,
}

/// Receives progress from a running [`Trainer`].
pub trait ProgressSink: Send {
    /// Called after every epoch.
    fn epoch_finished(&mut self, report: &EpochReport);

    /// Called after every training step; by default ignored. Keep it cheap:
    /// it runs on the training thread between steps.
    fn step_finished(&mut self, step: &StepProgress) {
        let _ = step;
    }
}

/// A synchronous training loop. Run it on a dedicated thread (or
/// `spawn_blocking`), never on an async worker.
///
/// # Contract
/// Checks `cancelled` between steps and returns
/// [`crate::Error::Cancelled`] soon after it turns true, having saved its
/// last checkpoint.
///
/// # Errors
/// [`crate::Error::InvalidInput`] for a bad config or dataset, anything else for failures while training.
pub trait Trainer: Send {
    /// Trains `spec` to completion or cancellation.
    fn train(
        &mut self,
        spec: &TrainSpec,
        progress: &mut dyn ProgressSink,
        cancelled: &(dyn Fn() -> bool + Sync),
    ) -> Result<TrainSummary>;
}
