//! Training hyperparameters: the `config` object of a job.
//!
//! [`TrainConfig`] lives here, beside the model catalog and below every
//! crate, so the backend checks a job's `config` when the job is created
//! (a 422 naming the field) without building libtorch, and the trainer
//! reads the very same type.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::models::{Task, find_model};

/// Which optimizer updates the weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    /// Chosen from the run's length, as Ultralytics does (detection): SGD
    /// for long runs, AdamW with a learning rate fitted to the class count
    /// for short ones. SGD for classification.
    Auto,
    /// Stochastic gradient descent with momentum (and L2 weight decay).
    Sgd,
    /// Adam with decoupled weight decay.
    Adamw,
}

/// Where to train.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum DeviceChoice {
    /// CUDA when present, else the CPU.
    Auto,
    /// The CPU.
    Cpu,
    /// The first CUDA device.
    Cuda,
}

/// Settings only detectors read: a classifier's config that names one is
/// refused rather than silently ignored.
const DETECTION_ONLY: &[&str] = &[
    "mosaic",
    "close_mosaic",
    "translate",
    "scale",
    "fliplr",
    "hsv_h",
    "hsv_s",
    "hsv_v",
    "warmup_epochs",
    "warmup_momentum",
    "warmup_bias_lr",
    "lrf",
    "nbs",
    "box",
    "cls",
    "dfl",
    "conf",
    "iou",
    "max_det",
];

/// Settings only classifiers read (a YOLO dataset has its own splits and
/// its flip is `fliplr`).
const CLASSIFICATION_ONLY: &[&str] = &["val_split", "random_crop", "hflip"];

/// The hyperparameters of one training run. Unknown keys are refused, so a
/// typo is an error rather than a silently ignored setting.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
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
    pub resources: Option<crate::Resources>,
    /// How many times the platform launches the job in all before a lost
    /// runner fails it ([`crate::Job::max_attempts`]); read by the
    /// backend, not by training.
    pub max_attempts: Option<i32>,
    /// Weights to start from: a safetensors file with the model's parameter
    /// names (for YOLO, an Ultralytics `state_dict` converted by
    /// `scripts/ultralytics_to_safetensors.py`). The trainer service takes a
    /// blob URI and downloads it; the engine reads a local path.
    pub init_weights: Option<String>,
    /// Early stopping, with Ultralytics' semantics: the run ends
    /// (`completed`, with the reason) once this many epochs have passed
    /// since the validation fitness last rose; 0 or absent turns it off.
    #[schema(maximum = 10_000)]
    pub patience: Option<u32>,
    /// A wall-clock limit in hours: the attempt finishes the epoch in which
    /// it runs out (cut short there, then validated and saved) and ends
    /// `completed`, with the reason.
    #[schema(exclusive_minimum = 0.0, maximum = 8760.0)]
    pub time: Option<f64>,
    /// Mixed precision: the forward pass under autocast, in bfloat16 on CPU
    /// or float16 on CUDA (with gradient scaling); weights, optimizer state
    /// and losses stay float32. Off by default.
    pub amp: bool,
    /// Detection: probability of a four-image mosaic (0 turns it off).
    pub mosaic: f64,
    /// Detection: the last epochs trained without mosaic.
    pub close_mosaic: u32,
    /// Detection: random translation, as a fraction of the image side.
    pub translate: f64,
    /// Detection: random scale gain (`1 ± scale`).
    pub scale: f64,
    /// Detection: probability of a horizontal flip.
    pub fliplr: f64,
    /// Detection: hue jitter (fraction).
    pub hsv_h: f64,
    /// Detection: saturation jitter (fraction).
    pub hsv_s: f64,
    /// Detection: value jitter (fraction).
    pub hsv_v: f64,
    /// Detection: warm-up length in epochs (at most all but the last epoch).
    pub warmup_epochs: f64,
    /// Detection: momentum at the start of warm-up.
    pub warmup_momentum: f64,
    /// Detection: the biases' learning rate at the start of warm-up.
    pub warmup_bias_lr: f64,
    /// Detection: final learning rate as a fraction of `lr` (linear decay).
    pub lrf: f64,
    /// Detection: nominal batch size; gradients accumulate over
    /// `nbs / batch_size` batches and weight decay scales with it.
    pub nbs: usize,
    /// Detection: box (CIoU) loss gain.
    #[serde(rename = "box")]
    pub box_gain: f64,
    /// Detection: classification loss gain.
    pub cls: f64,
    /// Detection: distribution focal loss gain.
    pub dfl: f64,
    /// Detection: confidence threshold of validation NMS.
    pub conf: f64,
    /// Detection: IoU threshold of NMS.
    pub iou: f64,
    /// Detection: most detections kept per image.
    pub max_det: usize,
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
            max_attempts: None,
            init_weights: None,
            patience: None,
            time: None,
            amp: false,
            mosaic: 1.0,
            close_mosaic: 10,
            translate: 0.1,
            scale: 0.5,
            fliplr: 0.5,
            hsv_h: 0.015,
            hsv_s: 0.7,
            hsv_v: 0.4,
            warmup_epochs: 3.0,
            warmup_momentum: 0.8,
            warmup_bias_lr: 0.1,
            lrf: 0.01,
            nbs: 64,
            box_gain: 7.5,
            cls: 0.5,
            dfl: 1.5,
            conf: 0.001,
            iou: 0.7,
            max_det: 300,
        }
    }
}

impl TrainConfig {
    /// The defaults of a task: classification as above; detection with the
    /// Ultralytics recipe (640 px, batch 16, `lr` 0.01, optimizer `auto`,
    /// momentum 0.937).
    pub fn defaults_for(task: Task) -> Self {
        match task {
            Task::Classify => TrainConfig::default(),
            // Only the package engine has these; its config is its own.
            Task::Detect | Task::Segment | Task::Pose | Task::Obb => TrainConfig {
                model: "yolo11n".into(),
                batch_size: 16,
                lr: 0.01,
                optimizer: OptimizerKind::Auto,
                momentum: 0.937,
                image_size: 640,
                ..TrainConfig::default()
            },
        }
    }

    /// Parses a job's `config`, naming the first bad field as `config.<field>`.
    /// Keys left out take the defaults of the model's task.
    ///
    /// # Errors
    /// [`Error::InvalidInput`].
    pub fn from_json(value: &serde_json::Value) -> Result<Self> {
        let task = match value.get("model").and_then(serde_json::Value::as_str) {
            Some(model) => find_model("config.model", model)?.task,
            None => Task::Classify,
        };
        if let Some(given) = value.as_object() {
            let (unread, reader) = match task {
                Task::Classify => (DETECTION_ONLY, "detectors"),
                _ => (CLASSIFICATION_ONLY, "classifiers"),
            };
            if let Some(key) = given.keys().find(|key| unread.contains(&key.as_str())) {
                let model = value.get("model").and_then(serde_json::Value::as_str);
                return Err(Error::invalid(
                    format!("config.{key}"),
                    format!(
                        "only {reader} read `{key}`; {} is a {task} model and would ignore it",
                        model.unwrap_or("the default model")
                    ),
                ));
            }
        }
        let mut merged = serde_json::to_value(TrainConfig::defaults_for(task))
            .map_err(|e| Error::internal(e.to_string()))?;
        if let (Some(base), Some(given)) = (merged.as_object_mut(), value.as_object()) {
            // `learning_rate` is an alias of `lr`: the default must not
            // stand beside it as a duplicate.
            if given.contains_key("learning_rate") {
                base.remove("lr");
            }
            for (key, v) in given {
                base.insert(key.clone(), v.clone());
            }
        } else {
            merged = value.clone();
        }
        let config: TrainConfig = serde_path_to_error::deserialize(&merged).map_err(|e| {
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

    /// What the model does.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for an unknown model.
    pub fn task(&self) -> Result<Task> {
        Ok(find_model("config.model", &self.model)?.task)
    }

    /// Checks ranges.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] naming the field.
    pub fn validate(&self) -> Result<()> {
        let bad =
            |field: &str, message: String| Err(Error::invalid(format!("config.{field}"), message));
        let spec = find_model("config.model", &self.model)?;
        if spec.task == Task::Detect {
            self.validate_detection()?;
        }
        let (min, max, multiple) = (
            spec.min_image_size,
            spec.max_image_size,
            spec.image_size_multiple,
        );
        if !self.image_size.is_multiple_of(multiple) {
            return bad(
                "image_size",
                format!(
                    "{} is not a multiple of {multiple}, the stride of {}",
                    self.image_size, spec.name
                ),
            );
        }
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
        if !(min..=max).contains(&self.image_size) {
            return bad(
                "image_size",
                format!(
                    "{} is outside {min}..={max} for {}",
                    self.image_size, spec.name
                ),
            );
        }
        if !(self.val_split > 0.0 && self.val_split < 1.0) {
            return bad("val_split", format!("{} must be in (0, 1)", self.val_split));
        }
        if self.threads > 1024 || self.workers > 64 {
            return bad("threads", "too many threads".into());
        }
        if let Some(patience) = self.patience
            && patience > 10_000
        {
            return bad("patience", format!("{patience} is outside 0..=10000"));
        }
        if let Some(hours) = self.time
            && !(hours.is_finite() && hours > 0.0 && hours <= 8760.0)
        {
            return bad("time", format!("{hours} hours must be in (0, 8760]"));
        }
        Ok(())
    }

    /// Ranges of the detection settings.
    fn validate_detection(&self) -> Result<()> {
        let fractions = [
            ("mosaic", self.mosaic),
            ("translate", self.translate),
            ("scale", self.scale),
            ("fliplr", self.fliplr),
            ("hsv_h", self.hsv_h),
            ("hsv_s", self.hsv_s),
            ("hsv_v", self.hsv_v),
            ("warmup_momentum", self.warmup_momentum),
            ("lrf", self.lrf),
            ("conf", self.conf),
            ("iou", self.iou),
        ];
        for (field, value) in fractions {
            if !(0.0..=1.0).contains(&value) {
                return Err(Error::invalid(
                    format!("config.{field}"),
                    format!("{value} must be in [0, 1]"),
                ));
            }
        }
        let gains = [
            ("warmup_epochs", self.warmup_epochs, 100.0),
            ("warmup_bias_lr", self.warmup_bias_lr, 10.0),
            ("box", self.box_gain, 100.0),
            ("cls", self.cls, 100.0),
            ("dfl", self.dfl, 100.0),
        ];
        for (field, value, max) in gains {
            if !(0.0..=max).contains(&value) {
                return Err(Error::invalid(
                    format!("config.{field}"),
                    format!("{value} must be in [0, {max}]"),
                ));
            }
        }
        if self.batch_size < 2 {
            return Err(Error::invalid(
                "config.batch_size",
                "a detector trains on batches of at least 2 images (BatchNorm)",
            ));
        }
        if !(1..=4096).contains(&self.nbs) {
            return Err(Error::invalid(
                "config.nbs",
                format!("{} is outside 1..=4096", self.nbs),
            ));
        }
        if !(1..=10_000).contains(&self.max_det) {
            return Err(Error::invalid(
                "config.max_det",
                format!("{} is outside 1..=10000", self.max_det),
            ));
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
        assert_eq!(config.model, "resnet18");
        assert_eq!((config.patience, config.time), (None, None));
        let stopping = TrainConfig::from_json(&json!({"patience": 3, "time": 0.5})).unwrap();
        assert_eq!((stopping.patience, stopping.time), (Some(3), Some(0.5)));
        assert!(!config.amp);
        assert!(TrainConfig::from_json(&json!({"amp": true})).unwrap().amp);
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
            (
                json!({"model": "yolo11n", "image_size": 100}),
                "config.image_size",
            ),
            (
                json!({"model": "yolo11n", "batch_size": 1}),
                "config.batch_size",
            ),
            (json!({"model": "yolo11n", "mosaic": 2.0}), "config.mosaic"),
            (json!({"patience": 10_001}), "config.patience"),
            (json!({"patience": -1}), "config.patience"),
            (json!({"time": 0.0}), "config.time"),
            (json!({"time": 9000.0}), "config.time"),
            // A key the model's task does not read.
            (json!({"model": "resnet18", "mosaic": 0.5}), "config.mosaic"),
            (json!({"lrf": 0.1}), "config.lrf"),
            (json!({"model": "yolo11n", "hflip": true}), "config.hflip"),
        ];
        for (value, field) in cases {
            match TrainConfig::from_json(&value) {
                Err(Error::InvalidInput { field: got, .. }) => assert_eq!(got, field, "{value}"),
                other => panic!("{value}: expected InvalidInput, got {other:?}"),
            }
        }
    }
}
