//! The libtorch training engine: [`TchTrainer`] trains an image classifier
//! on an ImageFolder dataset, or a detector on a YOLO one, through one
//! training loop (`learner`) over a per-task trait, and leaves safetensors
//! checkpoints; [`Predictor`] predicts with one.

pub mod amp;
pub mod checkpoint;
mod classify;
pub mod detect;
mod learner;
pub mod model;
pub mod optim;
pub mod predict;
pub mod trainer;

pub use checkpoint::{Checkpoint, CheckpointMeta, ClassReport, InitReport};
pub use model::{ModelInfo, ModelKind};
pub use predict::{BoxPrediction, DetectOptions, Prediction, Predictor};
pub use trainer::{StepProgress, TchTrainer};
pub use vtp_core::{DeviceChoice, OptimizerKind, TrainConfig};

use vtp_core::Error;

/// The libtorch engine a trainer service trains with: a fresh [`TchTrainer`]
/// for every job, the models of [`model::catalog`], CUDA when libtorch
/// finds a device.
#[derive(Debug, Clone, Copy, Default)]
pub struct TchEngine;

#[cfg(feature = "service")]
impl crate::service::Engine for TchEngine {
    fn trainer(&self) -> Box<dyn vtp_core::Trainer> {
        Box::new(TchTrainer::new())
    }

    fn models(&self) -> vtp_core::Result<Vec<ModelInfo>> {
        Ok(model::catalog()?.to_vec())
    }

    fn cuda(&self) -> bool {
        tch::Cuda::is_available()
    }
}

/// A libtorch error as a VTP error.
pub(crate) fn torch_err(e: tch::TchError) -> Error {
    Error::backend("libtorch", e.to_string())
}

/// The device `choice` names.
///
/// # Errors
/// [`Error::InvalidInput`] when CUDA is asked for and absent.
pub fn select_device(choice: &DeviceChoice) -> vtp_core::Result<tch::Device> {
    match choice {
        DeviceChoice::Auto => Ok(tch::Device::cuda_if_available()),
        DeviceChoice::Cpu => Ok(tch::Device::Cpu),
        DeviceChoice::Cuda if tch::Cuda::is_available() => Ok(tch::Device::Cuda(0)),
        DeviceChoice::Cuda => Err(Error::invalid(
            "config.device",
            "cuda was asked for but no CUDA device is available",
        )),
    }
}
