//! [`Predictor`]: classify images with a checkpoint.

use std::path::Path;

use serde::{Deserialize, Serialize};
use tch::nn::{ModuleT, VarStore};
use tch::{Device, Kind, Tensor};
use vtp_core::Result;

use super::checkpoint::{Checkpoint, CheckpointMeta};
use super::model::ModelKind;
use super::torch_err;
use crate::data::loader::{decode, normalise, resize};

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

/// A model loaded from a checkpoint, on the CPU.
pub struct Predictor {
    _vs: VarStore,
    model: Box<dyn ModuleT>,
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
        let kind: ModelKind = checkpoint.meta.model.parse()?;
        let mut vs = VarStore::new(Device::Cpu);
        let model = kind.build(&vs.root(), checkpoint.meta.class_names.len() as i64);
        checkpoint.load_weights(&mut vs)?;
        Ok(Predictor {
            _vs: vs,
            model,
            meta: checkpoint.meta,
        })
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
        let logits = tch::no_grad(|| self.model.forward_t(&xs, false));
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
