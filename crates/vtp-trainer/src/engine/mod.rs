//! The libtorch training engine: [`TchTrainer`] trains an image classifier
//! on an ImageFolder dataset and leaves safetensors checkpoints;
//! [`Predictor`] classifies images with one.

pub mod checkpoint;
pub mod detect;
pub mod model;
pub mod optim;
pub mod predict;
pub mod trainer;

pub use checkpoint::{Checkpoint, CheckpointMeta};
pub use model::{ModelInfo, ModelKind};
pub use predict::{BoxPrediction, DetectOptions, Prediction, Predictor};
pub use trainer::{StepProgress, TchTrainer};
pub use vtp_core::{DeviceChoice, OptimizerKind, TrainConfig};

use vtp_core::Error;

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
