//! Checkpoints: weights as safetensors (loadable with
//! `safetensors.torch.load_file`), optimizer state beside them, and a JSON
//! sidecar with class names, config, metrics and sha256 digests.
//!
//! ```text
//! last.safetensors        model weights (torchvision parameter names)
//! last.optim.safetensors  optimizer state, for resume
//! last.json               CheckpointMeta
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tch::nn::VarStore;
use vtp_core::{Error, Result};

use vtp_core::Task;

use super::optim::Optimizer;
use super::torch_err;
use vtp_core::TrainConfig;

/// The sidecar format tag.
pub const FORMAT: &str = "vtp-checkpoint/1";

/// What the JSON sidecar holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointMeta {
    /// [`FORMAT`].
    pub format: String,
    /// What the model does; `classify` in sidecars written before detection.
    #[serde(default = "classify")]
    pub task: Task,
    /// Architecture name.
    pub model: String,
    /// Class names; output `i` of the model is `class_names[i]`.
    pub class_names: Vec<String>,
    /// Input side.
    pub image_size: u32,
    /// Per-channel normalisation mean (RGB, 0..1 scale).
    pub mean: [f32; 3],
    /// Per-channel normalisation standard deviation.
    pub std: [f32; 3],
    /// Detection: the largest stride of the network (input sides are
    /// multiples of it; images are letterboxed to `image_size`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stride: Option<u32>,
    /// The run's config.
    pub config: TrainConfig,
    /// Last completed epoch.
    pub epoch: u32,
    /// Metrics of that epoch.
    pub metrics: BTreeMap<String, f64>,
    /// Metrics of every epoch so far.
    pub history: Vec<BTreeMap<String, f64>>,
    /// Best validation accuracy so far (classification).
    pub best_val_accuracy: f64,
    /// Detection: the best fitness so far (mAP50-95, as Ultralytics 8.4 weighs it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub best_fitness: Option<f64>,
    /// Validation per class at `epoch`: classify's accuracy per class and
    /// its confusion matrix, detect's mAP50-95 per class.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_class: Option<ClassReport>,
    /// What the run's initial weights (`config.init_weights`) loaded, when
    /// it had any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_weights: Option<InitReport>,
    /// The epoch that reached the best fitness so far (for `patience`
    /// across a resume); absent in sidecars written before it was kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub best_epoch: Option<u32>,
    /// Detection: updates of the weights' moving average, for resume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ema_updates: Option<i64>,
    /// Weights file name, next to the sidecar.
    pub weights: String,
    /// sha256 of the weights file, hex.
    pub sha256: String,
    /// Optimizer state file name, when saved.
    pub optimizer: Option<String>,
    /// sha256 of the optimizer file, hex.
    pub optimizer_sha256: Option<String>,
}

/// Validation per class (the sidecar's leaves `classes` empty: its
/// `class_names` name them).
pub use vtp_core::ClassReport;

/// How initial weights loaded: every tensor of the model whose name and
/// shape a tensor of the file matched was copied.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InitReport {
    /// The file, as the job named it.
    pub path: String,
    /// Tensors of the model loaded from the file.
    pub loaded: usize,
    /// Tensors of the model.
    pub of: usize,
    /// The model's tensors the file lacks (they keep their random start).
    pub missing: Vec<String>,
    /// Tensors of both whose shapes differ (a class head of another class
    /// count); they keep their random start.
    pub mismatched: Vec<String>,
    /// The file's tensors the model has no place for (PyTorch's
    /// `num_batches_tracked` counters, which libtorch models lack).
    pub unexpected: Vec<String>,
}

impl InitReport {
    /// Whether every tensor of the model loaded (PyTorch's `strict` load,
    /// but for tensors the model has no place for).
    pub fn strict(&self) -> bool {
        self.missing.is_empty() && self.mismatched.is_empty()
    }
}

fn classify() -> Task {
    Task::Classify
}

pub use crate::digest::sha256_file;

fn io(path: &Path, e: std::io::Error) -> Error {
    Error::internal(format!("{}: {e}", path.display()))
}

/// Moves a finished temporary file into place, so readers never see a torn one.
fn publish(tmp: &Path, path: &Path) -> Result<()> {
    std::fs::rename(tmp, path).map_err(|e| io(path, e))
}

/// Writes the sidecar `stem`.json for `meta`.
fn write_sidecar(dir: &Path, stem: &str, meta: &CheckpointMeta) -> Result<()> {
    let tmp = dir.join(format!(".{stem}.json.tmp"));
    let json = serde_json::to_vec_pretty(meta).map_err(|e| Error::internal(e.to_string()))?;
    std::fs::write(&tmp, json).map_err(|e| io(&tmp, e))?;
    publish(&tmp, &dir.join(format!("{stem}.json")))
}

/// Writes `stem`.safetensors, `stem`.optim.safetensors and `stem`.json into
/// `dir`, each through a temporary file and a rename, so a crash never leaves
/// a torn checkpoint. Returns the sidecar as written.
///
/// # Errors
/// I/O and libtorch failures.
pub fn save(
    dir: &Path,
    stem: &str,
    vs: &VarStore,
    optimizer: Option<&Optimizer>,
    meta: CheckpointMeta,
) -> Result<CheckpointMeta> {
    save_with(dir, stem, vs, optimizer, Vec::new(), meta)
}

/// [`save`], with `extra` named tensors stored beside the optimizer state
/// in `stem`.optim.safetensors (a detector keeps its raw weights there,
/// while the weights file holds their moving average).
///
/// # Errors
/// I/O and libtorch failures.
pub fn save_with(
    dir: &Path,
    stem: &str,
    vs: &VarStore,
    optimizer: Option<&Optimizer>,
    extra: Vec<(String, tch::Tensor)>,
    mut meta: CheckpointMeta,
) -> Result<CheckpointMeta> {
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    let tmp = dir.join(format!(".{stem}.tmp.safetensors"));
    vs.save(&tmp).map_err(torch_err)?;
    meta.sha256 = sha256_file(&tmp)?;
    meta.weights = format!("{stem}.safetensors");
    publish(&tmp, &dir.join(&meta.weights))?;
    meta.optimizer = None;
    meta.optimizer_sha256 = None;
    if let Some(optimizer) = optimizer {
        let tmp = dir.join(format!(".{stem}.optim.tmp.safetensors"));
        let mut state = optimizer.state_tensors();
        state.extend(extra);
        tch::Tensor::write_safetensors(&state, &tmp).map_err(torch_err)?;
        meta.optimizer_sha256 = Some(sha256_file(&tmp)?);
        let name = format!("{stem}.optim.safetensors");
        publish(&tmp, &dir.join(&name))?;
        meta.optimizer = Some(name);
    }
    write_sidecar(dir, stem, &meta)?;
    Ok(meta)
}

/// Copies the checkpoint `saved` (as [`save`] returned it) in `dir` to
/// `stem`.*, without serialising or hashing the tensors again. Returns the
/// copy's sidecar.
///
/// # Errors
/// I/O failures.
pub fn copy_as(dir: &Path, saved: &CheckpointMeta, stem: &str) -> Result<CheckpointMeta> {
    let copy = |from: &str, to: &str| -> Result<()> {
        let tmp = dir.join(format!(".{to}.tmp"));
        std::fs::copy(dir.join(from), &tmp).map_err(|e| io(&tmp, e))?;
        publish(&tmp, &dir.join(to))
    };
    let mut meta = saved.clone();
    meta.weights = format!("{stem}.safetensors");
    copy(&saved.weights, &meta.weights)?;
    if let Some(optimizer) = &saved.optimizer {
        let name = format!("{stem}.optim.safetensors");
        copy(optimizer, &name)?;
        meta.optimizer = Some(name);
    }
    write_sidecar(dir, stem, &meta)?;
    Ok(meta)
}

/// A checkpoint on disk.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    /// The sidecar.
    pub meta: CheckpointMeta,
    /// The weights file.
    pub weights: PathBuf,
    /// The optimizer state file, when there is one.
    pub optimizer: Option<PathBuf>,
}

/// What [`adopt_detector`] is told about weights it did not train.
#[derive(Debug, Clone, PartialEq)]
pub struct ForeignDetector {
    /// A detector the native engine builds (`yolo11n`, `yolov8s`, ...).
    pub model: String,
    /// Class names; output `i` is `class_names[i]`.
    pub class_names: Vec<String>,
    /// The side the weights were trained at (a multiple of 32).
    pub image_size: u32,
    /// The epoch they are of, with its metrics and the best fitness so far.
    pub epoch: u32,
    /// That epoch's metrics.
    pub metrics: BTreeMap<String, f64>,
    /// The best fitness so far.
    pub best_fitness: Option<f64>,
}

/// Makes `dir/{stem}.safetensors`, a YOLO detector's weights under the
/// Ultralytics `state_dict` names that the native models share (the
/// ultralytics package engine's EMA weights, converted), a VTP checkpoint:
/// writes its sidecar `{stem}.json`, then opens it as a [`Predictor`]
/// would, so weights that do not fit the architecture are an error here
/// and no sidecar is left for them.
///
/// [`Predictor`]: super::Predictor
///
/// # Errors
/// [`Error::InvalidInput`] for a model the native engine does not build, a
/// bad image size, or weights that do not fit; I/O failures.
pub fn adopt_detector(dir: &Path, stem: &str, detector: ForeignDetector) -> Result<CheckpointMeta> {
    // The image size is checked with the weights, by the load below.
    let variant: super::detect::model::YoloVariant = detector.model.parse()?;
    let weights = format!("{stem}.safetensors");
    let config = TrainConfig {
        model: variant.name().to_owned(),
        epochs: detector.epoch.max(1),
        image_size: detector.image_size,
        ..TrainConfig::default()
    };
    let meta = CheckpointMeta {
        format: FORMAT.into(),
        task: Task::Detect,
        model: variant.name().to_owned(),
        class_names: detector.class_names,
        image_size: detector.image_size,
        // YOLO takes RGB scaled to 0..1, without per-channel normalisation.
        mean: [0.0; 3],
        std: [1.0; 3],
        stride: Some(32),
        config,
        epoch: detector.epoch,
        history: vec![detector.metrics.clone()],
        metrics: detector.metrics,
        best_val_accuracy: 0.0,
        best_fitness: detector.best_fitness,
        best_epoch: None,
        init_weights: None,
        per_class: None,
        ema_updates: None,
        sha256: sha256_file(&dir.join(&weights))?,
        weights,
        optimizer: None,
        optimizer_sha256: None,
    };
    write_sidecar(dir, stem, &meta)?;
    let sidecar = dir.join(format!("{stem}.json"));
    if let Err(e) = super::Predictor::load(&sidecar) {
        let _ = std::fs::remove_file(&sidecar);
        return Err(e);
    }
    Ok(meta)
}

/// The weights a sidecar describes: `weights` beside it, as written; or,
/// when a checkpoint set stored the pair under a role (`weights.json` and
/// `weights.safetensors` as `best.weights.json` and
/// `best.weights.safetensors`), the `.safetensors` of the sidecar's own
/// stem. Either way the sidecar's sha256 must match.
fn weights_beside(sidecar: &Path, weights: &str) -> PathBuf {
    let dir = sidecar.parent().unwrap_or(Path::new("."));
    let written = dir.join(weights);
    if written.is_file() {
        return written;
    }
    let renamed = sidecar.with_extension("safetensors");
    if renamed.is_file() { renamed } else { written }
}

impl CheckpointMeta {
    /// Reads a sidecar (`best.json`) and checks its format, without
    /// touching the weights it describes.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for a missing or malformed sidecar.
    pub fn read(sidecar: &Path) -> Result<Self> {
        let text = std::fs::read(sidecar).map_err(|e| {
            Error::invalid(
                "checkpoint",
                format!("cannot read {}: {e}", sidecar.display()),
            )
        })?;
        let meta: CheckpointMeta = serde_json::from_slice(&text).map_err(|e| {
            Error::invalid(
                "checkpoint",
                format!("{} is not a VTP checkpoint sidecar: {e}", sidecar.display()),
            )
        })?;
        if meta.format != FORMAT {
            return Err(Error::invalid(
                "checkpoint",
                format!("unknown format {:?}", meta.format),
            ));
        }
        Ok(meta)
    }
}

impl Checkpoint {
    /// Opens a checkpoint from its weights file (`best.safetensors`), its
    /// sidecar (`best.json`) or its directory (then `best`, else `last`),
    /// verifying the weights' sha256.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for a missing, malformed or tampered checkpoint.
    pub fn open(path: &Path) -> Result<Self> {
        let sidecar = if path.is_dir() {
            ["best.json", "last.json"]
                .iter()
                .map(|n| path.join(n))
                .find(|p| p.is_file())
                .ok_or_else(|| {
                    Error::invalid(
                        "checkpoint",
                        format!("{} holds no best.json or last.json", path.display()),
                    )
                })?
        } else if path.extension().is_some_and(|e| e == "json") {
            path.to_path_buf()
        } else {
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default();
            let stem = name.strip_suffix(".safetensors").unwrap_or(name);
            path.with_file_name(format!("{stem}.json"))
        };
        let meta = CheckpointMeta::read(&sidecar)?;
        let dir = sidecar.parent().unwrap_or(Path::new("."));
        let weights = weights_beside(&sidecar, &meta.weights);
        let digest = sha256_file(&weights)?;
        if digest != meta.sha256 {
            return Err(Error::invalid(
                "checkpoint",
                format!("{} does not match its sha256", weights.display()),
            ));
        }
        let optimizer = meta
            .optimizer
            .as_ref()
            .map(|o| dir.join(o))
            .filter(|p| p.is_file());
        Ok(Checkpoint {
            meta,
            weights,
            optimizer,
        })
    }

    /// Loads the weights into `vs` (built for the same architecture).
    ///
    /// # Errors
    /// [`Error::InvalidInput`] when the weights do not fit the model.
    pub fn load_weights(&self, vs: &mut VarStore) -> Result<()> {
        vs.load(&self.weights).map_err(|e| {
            Error::invalid(
                "checkpoint",
                format!("{} does not fit the model: {e}", self.weights.display()),
            )
        })
    }

    /// Every tensor of the training state file (optimizer state and what
    /// [`save_with`] stored beside it); empty when there is none.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] when the file is unreadable or tampered with.
    pub fn training_state(&self) -> Result<Vec<(String, tch::Tensor)>> {
        let Some(path) = &self.optimizer else {
            return Ok(Vec::new());
        };
        if let Some(expected) = &self.meta.optimizer_sha256
            && &sha256_file(path)? != expected
        {
            return Err(Error::invalid(
                "checkpoint",
                format!("{} does not match its sha256", path.display()),
            ));
        }
        tch::Tensor::read_safetensors(path).map_err(|e| {
            Error::invalid("checkpoint", format!("cannot read {}: {e}", path.display()))
        })
    }

    /// Restores the optimizer state, when saved.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] when it does not fit.
    pub fn load_optimizer(&self, optimizer: &mut Optimizer) -> Result<bool> {
        let Some(path) = &self.optimizer else {
            return Ok(false);
        };
        let named = tch::Tensor::read_safetensors(path).map_err(torch_err)?;
        optimizer.load_state(&named)?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Predictor;
    use crate::engine::detect::model::{DetectionModel, YoloVariant};
    use tch::Device;

    fn detector_weights(dir: &Path, stem: &str, variant: YoloVariant, classes: i64) {
        let vs = VarStore::new(Device::Cpu);
        let _model = DetectionModel::new(&vs.root(), variant, classes);
        vs.save(dir.join(format!("{stem}.safetensors"))).unwrap();
    }

    fn told(model: &str, classes: usize) -> ForeignDetector {
        ForeignDetector {
            model: model.to_owned(),
            class_names: (0..classes).map(|c| format!("c{c}")).collect(),
            image_size: 64,
            epoch: 3,
            metrics: BTreeMap::from([("map".to_owned(), 0.25)]),
            best_fitness: Some(0.3),
        }
    }

    #[test]
    fn foreign_detector_weights_become_a_checkpoint_that_opens_under_a_role_too() {
        let dir = tempfile::tempdir().unwrap();
        detector_weights(dir.path(), "weights", YoloVariant::V11n, 3);
        let meta = adopt_detector(dir.path(), "weights", told("yolov11n", 3)).unwrap();
        assert_eq!((meta.task, meta.model.as_str()), (Task::Detect, "yolo11n"));
        assert_eq!(
            (meta.epoch, meta.stride, meta.image_size),
            (3, Some(32), 64)
        );
        let predictor = Predictor::load(&dir.path().join("weights.safetensors")).unwrap();
        assert_eq!(predictor.classes(), ["c0", "c1", "c2"]);
        // A checkpoint set stores the pair as `best.weights.*`; the sidecar
        // still names `weights.safetensors`, and the renamed weights open.
        let stored = tempfile::tempdir().unwrap();
        for name in ["weights.safetensors", "weights.json"] {
            std::fs::copy(
                dir.path().join(name),
                stored.path().join(format!("best.{name}")),
            )
            .unwrap();
        }
        let opened = Checkpoint::open(&stored.path().join("best.weights.safetensors")).unwrap();
        assert_eq!(opened.meta, meta);
        // Tampered weights still do not match the sidecar's digest.
        std::fs::write(stored.path().join("best.weights.safetensors"), b"x").unwrap();
        let err = Checkpoint::open(&stored.path().join("best.weights.json")).unwrap_err();
        assert!(err.to_string().contains("sha256"), "{err}");
    }

    #[test]
    fn weights_of_another_architecture_or_an_unknown_model_leave_no_sidecar() {
        let dir = tempfile::tempdir().unwrap();
        detector_weights(dir.path(), "weights", YoloVariant::V8n, 3);
        let err = adopt_detector(dir.path(), "weights", told("yolo11n", 3)).unwrap_err();
        assert!(matches!(err, Error::InvalidInput { .. }), "{err}");
        assert!(!dir.path().join("weights.json").exists());
        let err = adopt_detector(dir.path(), "weights", told("yolo11n-seg", 3)).unwrap_err();
        assert!(err.to_string().contains("yolo11n-seg"), "{err}");
        let mut odd = told("yolov8n", 3);
        odd.image_size = 70;
        let err = adopt_detector(dir.path(), "weights", odd).unwrap_err();
        assert!(err.to_string().contains("multiple of 32"), "{err}");
        assert!(!dir.path().join("weights.json").exists());
        adopt_detector(dir.path(), "weights", told("yolov8n", 3)).unwrap();
    }
}
