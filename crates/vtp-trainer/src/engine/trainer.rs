//! [`TchTrainer`]: the libtorch [`Trainer`]. It reads the job's config and
//! hands the task it names to the one training loop (`engine::learner`).

use std::panic::AssertUnwindSafe;

use vtp_core::{Error, ProgressSink, Result, Task, TrainConfig, TrainSpec, TrainSummary, Trainer};

use super::learner::{self, OnStep};
use super::{classify, detect};

pub use vtp_core::StepProgress;

/// Trains image classifiers and detectors with libtorch.
///
/// Every epoch leaves `last.*` in the output directory, and `best.*` when
/// the task's fitness (validation accuracy, a detector's mAP) improves;
/// with `resume` (the default) a run finds `last` and continues at the next
/// epoch with the optimizer state.
#[derive(Default)]
pub struct TchTrainer {
    on_step: OnStep,
}

impl std::fmt::Debug for TchTrainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TchTrainer")
            .field("on_step", &self.on_step.is_some())
            .finish()
    }
}

impl TchTrainer {
    /// A trainer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Calls `f` after every step (for progress bars).
    #[must_use]
    pub fn on_step(mut self, f: impl FnMut(StepProgress) + Send + 'static) -> Self {
        self.on_step = Some(Box::new(f));
        self
    }
}

impl Trainer for TchTrainer {
    fn train(
        &mut self,
        spec: &TrainSpec,
        progress: &mut dyn ProgressSink,
        cancelled: &(dyn Fn() -> bool + Sync),
    ) -> Result<TrainSummary> {
        // libtorch reports some failures (shape mismatches, OOM) by panicking
        // through tch; keep them inside this job.
        match std::panic::catch_unwind(AssertUnwindSafe(|| run(self, spec, progress, cancelled))) {
            Ok(result) => result,
            Err(panic) => {
                let message = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                    .unwrap_or_else(|| "unknown panic".to_owned());
                Err(Error::backend("libtorch", message))
            }
        }
    }
}

fn run(
    trainer: &mut TchTrainer,
    spec: &TrainSpec,
    progress: &mut dyn ProgressSink,
    cancelled: &(dyn Fn() -> bool + Sync),
) -> Result<TrainSummary> {
    let config = TrainConfig::from_json(&spec.config)?;
    let on_step = &mut trainer.on_step;
    match config.task()? {
        Task::Classify => {
            let setup = classify::setup(spec, config)?;
            learner::fit(setup, spec, on_step, progress, cancelled)
        }
        Task::Detect => {
            let setup = detect::train::setup(spec, config)?;
            learner::fit(setup, spec, on_step, progress, cancelled)
        }
        task => Err(Error::invalid(
            "config.model",
            format!(
                "VTP's own engine trains classify and detect models, not {task}; the package engine (`\"engine\": \"package\"`) trains them"
            ),
        )),
    }
}
