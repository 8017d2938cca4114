//! [`Predictor`]: classify images, or detect objects in them, with a
//! checkpoint.

use std::path::Path;

use serde::{Deserialize, Serialize};
use tch::nn::{ModuleT, VarStore};
use tch::{Device, Kind, Tensor};
use vtp_core::Result;

use vtp_core::{Error, Task};

use super::checkpoint::{Checkpoint, CheckpointMeta};
use super::detect::model::{DetectionModel, YoloVariant};
use super::detect::nms::{NmsConfig, non_max_suppression};
use super::model::ModelKind;
use super::torch_err;
use crate::data::detect_loader::letterbox_image;
use crate::data::loader::{decode, normalise, open_image, resize};

/// One image's top class.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Prediction {
    /// Class name.
    pub class: String,
    /// Class index.
    pub index: usize,
    /// Softmax probability of that class.
    pub probability: f64,
}

/// One object found in an image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BoxPrediction {
    /// Class name.
    pub class: String,
    /// Class index.
    pub index: usize,
    /// Confidence (the class score).
    pub score: f64,
    /// `[x1, y1, x2, y2]` in the original image's pixels.
    #[serde(rename = "box")]
    pub bbox: [f64; 4],
}

/// Thresholds of detection.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DetectOptions {
    /// Smallest score kept (Ultralytics' predict default 0.25).
    pub conf: f32,
    /// NMS IoU threshold (0.7).
    pub iou: f32,
    /// Most boxes per image (300).
    pub max_det: usize,
}

impl Default for DetectOptions {
    fn default() -> Self {
        DetectOptions {
            conf: 0.25,
            iou: 0.7,
            max_det: 300,
        }
    }
}

enum Network {
    Classifier(Box<dyn ModuleT>),
    Detector(DetectionModel),
}

/// A model loaded from a checkpoint, on the CPU.
pub struct Predictor {
    _vs: VarStore,
    network: Network,
    meta: CheckpointMeta,
}

impl std::fmt::Debug for Predictor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Predictor")
            .field("model", &self.meta.model)
            .field("classes", &self.meta.class_names)
            .finish()
    }
}

impl Predictor {
    /// Loads the checkpoint at `path` (weights, sidecar or directory).
    ///
    /// # Errors
    /// [`vtp_core::Error::InvalidInput`] for a bad checkpoint.
    pub fn load(path: &Path) -> Result<Self> {
        let checkpoint = Checkpoint::open(path)?;
        let mut vs = VarStore::new(Device::Cpu);
        let classes = checkpoint.meta.class_names.len() as i64;
        let network = match checkpoint.meta.task {
            Task::Classify => {
                let kind: ModelKind = checkpoint.meta.model.parse()?;
                Network::Classifier(kind.build(&vs.root(), classes))
            }
            Task::Detect => {
                let variant: YoloVariant = checkpoint.meta.model.parse()?;
                let size = checkpoint.meta.image_size;
                if size == 0 || !size.is_multiple_of(32) {
                    return Err(Error::invalid(
                        "checkpoint",
                        format!("a detector's image_size must be a multiple of 32, not {size}"),
                    ));
                }
                Network::Detector(DetectionModel::new(&vs.root(), variant, classes))
            }
            task @ (Task::Segment | Task::Pose | Task::Obb) => {
                return Err(Error::invalid(
                    "checkpoint",
                    format!(
                        "a {task} model is the ultralytics package's; load it with ultralytics.YOLO"
                    ),
                ));
            }
        };
        checkpoint.load_weights(&mut vs)?;
        Ok(Predictor {
            _vs: vs,
            network,
            meta: checkpoint.meta,
        })
    }

    /// What the model does.
    pub fn task(&self) -> Task {
        self.meta.task
    }

    fn classifier(&self) -> Result<&dyn ModuleT> {
        match &self.network {
            Network::Classifier(model) => Ok(model.as_ref()),
            Network::Detector(_) => Err(Error::invalid(
                "checkpoint",
                format!(
                    "{} is a detector: ask it for boxes, not classes",
                    self.meta.model
                ),
            )),
        }
    }

    fn detector(&self) -> Result<&DetectionModel> {
        match &self.network {
            Network::Detector(model) => Ok(model),
            Network::Classifier(_) => Err(Error::invalid(
                "checkpoint",
                format!(
                    "{} is a classifier: ask it for classes, not boxes",
                    self.meta.model
                ),
            )),
        }
    }

    /// The raw head outputs of a detector for already-letterboxed NCHW
    /// input (0..1 RGB), one `[N, 4 * 16 + classes, H, W]` tensor per level:
    /// what Ultralytics' `Detect` returns, for comparing the two.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for a classifier or a bad input size.
    pub fn detector_outputs(&self, input: &[f32], height: i64, width: i64) -> Result<Vec<Tensor>> {
        let model = self.detector()?;
        if height <= 0 || width <= 0 || height % 32 != 0 || width % 32 != 0 {
            return Err(Error::invalid(
                "input",
                format!(
                    "{height}x{width}: sides must be positive multiples of 32, the detector's stride"
                ),
            ));
        }
        let n = input.len() as i64 / (3 * height * width);
        let xs = Tensor::from_slice(input)
            .f_view([n, 3, height, width])
            .map_err(|_| Error::invalid("input", "not a whole number of 3-channel images"))?;
        Ok(tch::no_grad(|| model.forward_t(&xs, false)))
    }

    /// Finds objects in decoded images: boxes in each image's own pixels.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for a classifier.
    pub fn detect_images(
        &self,
        images: &[image::DynamicImage],
        options: &DetectOptions,
    ) -> Result<Vec<Vec<BoxPrediction>>> {
        let model = self.detector()?;
        if images.is_empty() {
            return Ok(Vec::new());
        }
        let size = self.meta.image_size;
        let s = i64::from(size);
        let mut input = Vec::with_capacity(images.len() * 3 * (size * size) as usize);
        let mut shapes = Vec::with_capacity(images.len());
        for image in images {
            let (pixels, shape) = letterbox_image(image, size);
            input.extend(pixels);
            shapes.push(shape);
        }
        let xs = Tensor::from_slice(&input)
            .f_view([images.len() as i64, 3, s, s])
            .map_err(torch_err)?;
        let pred = tch::no_grad(|| model.decode(&model.forward_t(&xs, false)));
        let nms = NmsConfig {
            conf: options.conf,
            iou: options.iou,
            max_det: options.max_det,
            ..NmsConfig::default()
        };
        let detections = non_max_suppression(&pred, &nms);
        Ok(detections
            .into_iter()
            .zip(&shapes)
            .map(|(dets, shape)| {
                dets.into_iter()
                    .map(|d| BoxPrediction {
                        class: self.meta.class_names[d.class].clone(),
                        index: d.class,
                        score: f64::from(d.score),
                        bbox: shape.to_original(d.bbox).map(f64::from),
                    })
                    .collect()
            })
            .collect())
    }

    /// Finds objects in image files.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] naming an unreadable file, or for a classifier.
    pub fn detect_paths<P: AsRef<Path>>(
        &self,
        paths: &[P],
        options: &DetectOptions,
    ) -> Result<Vec<Vec<BoxPrediction>>> {
        let images = paths
            .iter()
            .map(|p| open_image(p.as_ref()))
            .collect::<Result<Vec<_>>>()?;
        self.detect_images(&images, options)
    }

    /// The checkpoint's sidecar.
    pub fn meta(&self) -> &CheckpointMeta {
        &self.meta
    }

    /// Class names, in output order.
    pub fn classes(&self) -> &[String] {
        &self.meta.class_names
    }

    /// Logits of already-normalised NCHW input.
    ///
    /// # Errors
    /// libtorch failures.
    pub fn logits(&self, input: &[f32]) -> Result<Vec<Vec<f32>>> {
        let s = i64::from(self.meta.image_size);
        let n = input.len() as i64 / (3 * s * s);
        let xs = Tensor::from_slice(input)
            .f_view([n, 3, s, s])
            .map_err(torch_err)?;
        let model = self.classifier()?;
        let logits = tch::no_grad(|| model.forward_t(&xs, false));
        let rows: Vec<Vec<f32>> =
            Vec::<Vec<f32>>::try_from(logits.to_kind(Kind::Float)).map_err(torch_err)?;
        Ok(rows)
    }

    /// Classifies decoded images.
    ///
    /// # Errors
    /// libtorch failures.
    pub fn predict_images(&self, images: &[image::DynamicImage]) -> Result<Vec<Prediction>> {
        self.top1(&self.preprocess(images))
    }

    /// Logits of decoded images, after the checkpoint's resize and
    /// normalisation.
    ///
    /// # Errors
    /// libtorch failures.
    pub fn logits_of_images(&self, images: &[image::DynamicImage]) -> Result<Vec<Vec<f32>>> {
        if images.is_empty() {
            return Ok(Vec::new());
        }
        self.logits(&self.preprocess(images))
    }

    /// The model's input for `images`: resized to the checkpoint's side and
    /// normalised, flattened NCHW.
    pub fn preprocess(&self, images: &[image::DynamicImage]) -> Vec<f32> {
        images
            .iter()
            .flat_map(|img| normalise(&resize(img, self.meta.image_size), self.meta.image_size))
            .collect()
    }

    /// Classifies image files.
    ///
    /// # Errors
    /// [`vtp_core::Error::InvalidInput`] naming an unreadable file.
    pub fn predict_paths<P: AsRef<Path>>(&self, paths: &[P]) -> Result<Vec<Prediction>> {
        let mut input = Vec::new();
        for path in paths {
            input.extend(normalise(
                &decode(path.as_ref(), self.meta.image_size)?,
                self.meta.image_size,
            ));
        }
        self.top1(&input)
    }

    fn top1(&self, input: &[f32]) -> Result<Vec<Prediction>> {
        if input.is_empty() {
            return Ok(Vec::new());
        }
        Ok(self
            .logits(input)?
            .into_iter()
            .map(|row| {
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let exp: Vec<f64> = row.iter().map(|v| f64::from(v - max).exp()).collect();
                let total: f64 = exp.iter().sum();
                let (index, best) =
                    exp.iter().enumerate().fold(
                        (0, 0.0),
                        |acc, (i, &p)| if p > acc.1 { (i, p) } else { acc },
                    );
                Prediction {
                    class: self.meta.class_names[index].clone(),
                    index,
                    probability: best / total,
                }
            })
            .collect())
    }
}
