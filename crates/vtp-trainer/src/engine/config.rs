//! Training hyperparameters: the `config` object of a job.

use serde::{Deserialize, Serialize};
use vtp_core::{Error, Result};

use super::model::ModelKind;

/// Which optimizer updates the weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    /// Stochastic gradient descent with momentum (and L2 weight decay).
    Sgd,
    /// Adam with decoupled weight decay.
    Adamw,
}

/// Where to train.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceChoice {
    /// CUDA when present, else the CPU.
    Auto,
    /// The CPU.
    Cpu,
    /// The first CUDA device.
    Cuda,
}

/// The hyperparameters of one training run. Unknown keys are refused, so a
/// typo is an error rather than a silently ignored setting.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// Architecture: `small_cnn`, `resnet18`, `resnet34`, `mobilenet_v2`.
    pub model: String,
    /// Passes over the training set.
    pub epochs: u32,
    /// Images per step.
    pub batch_size: usize,
    /// Learning rate.
    #[serde(alias = "learning_rate")]
    pub lr: f64,
    /// `sgd` (with momentum) or `adamw`.
    pub optimizer: OptimizerKind,
    /// SGD momentum.
    pub momentum: f64,
    /// Weight decay (L2 for SGD, decoupled for AdamW).
    pub weight_decay: f64,
    /// Side of the square images fed to the model.
    pub image_size: u32,
    /// Seed for initialisation, shuffling, splitting and augmentation.
    pub seed: u64,
    /// `auto`, `cpu` or `cuda`.
    pub device: DeviceChoice,
    /// libtorch threads; 0 means one per core.
    pub threads: usize,
    /// Input pipeline worker threads.
    pub workers: usize,
    /// Fraction held out for validation when the dataset has no `val/` split.
    pub val_split: f64,
    /// Random crop augmentation.
    pub random_crop: bool,
    /// Random horizontal flip augmentation (off for digits and text).
    pub hflip: bool,
    /// Continue from the `last` checkpoint in the output directory, if any.
    pub resume: bool,
    /// What the trainer asks of its machine (CPU, memory, GPUs); read by the
    /// Kubernetes launcher for the pod's requests and limits, not by training.
    pub resources: Option<vtp_core::Resources>,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            model: "small_cnn".into(),
            epochs: 5,
            batch_size: 32,
            lr: 0.05,
            optimizer: OptimizerKind::Sgd,
            momentum: 0.9,
            weight_decay: 5e-4,
            image_size: 32,
            seed: 42,
            device: DeviceChoice::Auto,
            threads: 0,
            workers: 2,
            val_split: 0.2,
            random_crop: true,
            hflip: true,
            resume: true,
            resources: None,
        }
    }
}

impl TrainConfig {
    /// Parses a job's `config`, naming the first bad field as `config.<field>`.
    ///
    /// # Errors
    /// [`Error::InvalidInput`].
    pub fn from_json(value: &serde_json::Value) -> Result<Self> {
        let config: TrainConfig = serde_path_to_error::deserialize(value).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner().to_string();
            let field = if path == "." {
                inner
                    .split('`')
                    .nth(1)
                    .map_or_else(|| "config".to_owned(), |f| format!("config.{f}"))
            } else {
                format!("config.{path}")
            };
            Error::invalid(field, inner)
        })?;
        config.validate()?;
        Ok(config)
    }

    /// The architecture.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for an unknown model.
    pub fn model_kind(&self) -> Result<ModelKind> {
        self.model.parse()
    }

    /// Checks ranges.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] naming the field.
    pub fn validate(&self) -> Result<()> {
        let kind = self.model_kind()?;
        let bad =
            |field: &str, message: String| Err(Error::invalid(format!("config.{field}"), message));
        if !(1..=10_000).contains(&self.epochs) {
            return bad("epochs", format!("{} is outside 1..=10000", self.epochs));
        }
        if !(1..=65_536).contains(&self.batch_size) {
            return bad(
                "batch_size",
                format!("{} is outside 1..=65536", self.batch_size),
            );
        }
        if !(self.lr.is_finite() && self.lr > 0.0 && self.lr <= 10.0) {
            return bad("lr", format!("{} must be in (0, 10]", self.lr));
        }
        if !(0.0..1.0).contains(&self.momentum) {
            return bad("momentum", format!("{} must be in [0, 1)", self.momentum));
        }
        if !(0.0..1.0).contains(&self.weight_decay) {
            return bad(
                "weight_decay",
                format!("{} must be in [0, 1)", self.weight_decay),
            );
        }
        let min = kind.min_image_size();
        if !(min..=1024).contains(&self.image_size) {
            return bad(
                "image_size",
                format!(
                    "{} is outside {min}..=1024 for {}",
                    self.image_size,
                    kind.name()
                ),
            );
        }
        if !(self.val_split > 0.0 && self.val_split < 1.0) {
            return bad("val_split", format!("{} must be in (0, 1)", self.val_split));
        }
        if self.threads > 1024 || self.workers > 64 {
            return bad("threads", "too many threads".into());
        }
        Ok(())
    }

    /// libtorch threads to use.
    pub fn effective_threads(&self) -> usize {
        if self.threads == 0 {
            std::thread::available_parallelism().map_or(1, std::num::NonZero::get)
        } else {
            self.threads
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn defaults_fill_in_and_aliases_work() {
        let config = TrainConfig::from_json(
            &json!({"model": "resnet18", "learning_rate": 0.1, "image_size": 64}),
        )
        .unwrap();
        assert_eq!(config.lr, 0.1);
        assert_eq!(config.epochs, 5);
        assert_eq!(config.model_kind().unwrap(), ModelKind::ResNet18);
    }

    #[test]
    fn bad_values_name_the_field() {
        let cases = [
            (json!({"model": "resnet9000"}), "config.model"),
            (json!({"epochs": 0}), "config.epochs"),
            (json!({"epochs": "ten"}), "config.epochs"),
            (json!({"lr": -1.0}), "config.lr"),
            (json!({"optimizer": "lbfgs"}), "config.optimizer"),
            (json!({"colour": "blue"}), "config.colour"),
            (
                json!({"model": "resnet18", "image_size": 16}),
                "config.image_size",
            ),
            (json!({"val_split": 1.0}), "config.val_split"),
        ];
        for (value, field) in cases {
            match TrainConfig::from_json(&value) {
                Err(Error::InvalidInput { field: got, .. }) => assert_eq!(got, field, "{value}"),
                other => panic!("{value}: expected InvalidInput, got {other:?}"),
            }
        }
    }
}
