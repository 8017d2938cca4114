//! [`Checkpoint`]: a trained model loaded from its files, for prediction in
//! Python (`vtp.load_checkpoint`).

use std::path::PathBuf;
use std::sync::Mutex;

use pyo3::prelude::*;
use vtp_trainer::engine::Predictor;

use crate::client::to_python;
use crate::errors::{InvalidInput, VtpError, from_core};

/// A checkpoint opened for prediction, on the CPU.
#[pyclass(module = "vtp._vtp", frozen)]
#[derive(Debug)]
pub struct Checkpoint {
    predictor: Mutex<Predictor>,
    path: PathBuf,
    meta: serde_json::Value,
}

/// An image handed over from Python: a file, or packed RGB pixels.
#[derive(Debug, FromPyObject)]
pub(crate) enum ImageArg {
    /// `(bytes, width, height)`: `width * height * 3` RGB bytes, row-major.
    Rgb(pyo3::pybacked::PyBackedBytes, u32, u32),
    /// A file path.
    Path(PathBuf),
}

impl Checkpoint {
    fn with_predictor<T>(&self, f: impl FnOnce(&Predictor) -> T) -> PyResult<T> {
        let predictor = self
            .predictor
            .lock()
            .map_err(|_| VtpError::new_err("the checkpoint is poisoned by an earlier panic"))?;
        Ok(f(&predictor))
    }

    /// Decodes the images (files are read here, off the GIL by the caller).
    fn decode(&self, images: Vec<ImageArg>) -> PyResult<Vec<image::DynamicImage>> {
        images
            .into_iter()
            .enumerate()
            .map(|(i, image)| match image {
                ImageArg::Rgb(bytes, width, height) => {
                    let expected = width as usize * height as usize * 3;
                    if bytes.len() != expected {
                        return Err(InvalidInput::new_err(format!(
                            "image {i}: {} bytes, but {width}x{height} RGB needs {expected}",
                            bytes.len()
                        )));
                    }
                    image::RgbImage::from_raw(width, height, bytes.to_vec())
                        .map(image::DynamicImage::ImageRgb8)
                        .ok_or_else(|| InvalidInput::new_err(format!("image {i}: bad RGB buffer")))
                }
                ImageArg::Path(path) => image::ImageReader::open(&path)
                    .and_then(|r| r.with_guessed_format())
                    .map_err(|e| InvalidInput::new_err(format!("{}: {e}", path.display())))?
                    .decode()
                    .map_err(|e| InvalidInput::new_err(format!("{}: {e}", path.display()))),
            })
            .collect()
    }
}

#[pymethods]
impl Checkpoint {
    /// Opens the checkpoint at `path`: its weights (`best.safetensors`),
    /// its sidecar (`best.json`) or its directory. The weights' sha256 is
    /// checked against the sidecar.
    #[new]
    fn new(py: Python<'_>, path: PathBuf) -> PyResult<Self> {
        let opened = path.clone();
        let predictor = py
            .detach(move || Predictor::load(&opened))
            .map_err(from_core)?;
        let meta =
            serde_json::to_value(predictor.meta()).map_err(|e| VtpError::new_err(e.to_string()))?;
        Ok(Checkpoint {
            predictor: Mutex::new(predictor),
            path,
            meta,
        })
    }

    /// Where it was opened from.
    #[getter]
    fn path(&self) -> String {
        self.path.display().to_string()
    }

    /// The architecture, e.g. `small_cnn`.
    #[getter]
    fn model(&self) -> String {
        self.meta["model"].as_str().unwrap_or_default().to_owned()
    }

    /// Class names; output `i` of the model is `class_names[i]`.
    #[getter]
    fn class_names(&self) -> Vec<String> {
        self.meta["class_names"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| c.as_str().map(str::to_owned))
            .collect()
    }

    /// Input side in pixels.
    #[getter]
    fn image_size(&self) -> u32 {
        self.meta["image_size"].as_u64().unwrap_or_default() as u32
    }

    /// The training config (a dict).
    #[getter]
    fn config(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        to_python(py, &self.meta["config"])
    }

    /// The whole sidecar: epoch, metrics, history, digests (a dict).
    #[getter]
    fn meta(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        to_python(py, &self.meta)
    }

    /// Top-1 predictions: one dict `{"class", "index", "probability"}` per
    /// image. Each image is a path or `(rgb_bytes, width, height)`.
    fn predict(&self, py: Python<'_>, images: Vec<ImageArg>) -> PyResult<Py<PyAny>> {
        let predictions = py.detach(|| {
            let decoded = self.decode(images)?;
            self.with_predictor(|p| p.predict_images(&decoded))?
                .map_err(from_core)
        })?;
        let value =
            serde_json::to_value(predictions).map_err(|e| VtpError::new_err(e.to_string()))?;
        to_python(py, &value)
    }

    /// What the model does: `"classify"` or `"detect"`.
    #[getter]
    fn task(&self) -> String {
        self.meta["task"].as_str().unwrap_or("classify").to_owned()
    }

    /// Boxes found in each image: per image a list of dicts `{"class",
    /// "index", "score", "box": [x1, y1, x2, y2]}` in the image's own
    /// pixels, best first.
    #[pyo3(signature = (images, conf=0.25, iou=0.7, max_det=300))]
    fn detect(
        &self,
        py: Python<'_>,
        images: Vec<ImageArg>,
        conf: f32,
        iou: f32,
        max_det: usize,
    ) -> PyResult<Py<PyAny>> {
        let options = vtp_trainer::engine::DetectOptions { conf, iou, max_det };
        let boxes = py.detach(|| {
            let decoded = self.decode(images)?;
            self.with_predictor(|p| p.detect_images(&decoded, &options))?
                .map_err(from_core)
        })?;
        let value = serde_json::to_value(boxes).map_err(|e| VtpError::new_err(e.to_string()))?;
        to_python(py, &value)
    }

    /// A detector's raw head outputs for letterboxed NCHW input (0..1 RGB,
    /// flattened), one flattened `[N, 64 + classes, H, W]` list per level
    /// with its shape: what Ultralytics' `Detect` returns, for comparing.
    fn detector_outputs(
        &self,
        py: Python<'_>,
        input: Vec<f32>,
        height: i64,
        width: i64,
    ) -> PyResult<Vec<(Vec<i64>, Vec<f32>)>> {
        py.detach(|| {
            let outputs = self
                .with_predictor(|p| p.detector_outputs(&input, height, width))?
                .map_err(from_core)?;
            outputs
                .into_iter()
                .map(|t| {
                    let shape = t.size();
                    let flat = Vec::<f32>::try_from(t.flatten(0, -1))
                        .map_err(|e| VtpError::new_err(e.to_string()))?;
                    Ok((shape, flat))
                })
                .collect()
        })
    }

    /// Raw logits, one list per image, as the model computes them after the
    /// checkpoint's resize and normalisation.
    fn logits(&self, py: Python<'_>, images: Vec<ImageArg>) -> PyResult<Vec<Vec<f32>>> {
        py.detach(|| {
            let decoded = self.decode(images)?;
            self.with_predictor(|p| p.logits_of_images(&decoded))?
                .map_err(from_core)
        })
    }

    /// The normalised input tensor the model sees, flattened NCHW, for
    /// comparing with another framework.
    fn preprocess(&self, py: Python<'_>, images: Vec<ImageArg>) -> PyResult<Vec<f32>> {
        py.detach(|| {
            let decoded = self.decode(images)?;
            self.with_predictor(|p| p.preprocess(&decoded))
        })
    }

    fn __repr__(&self) -> String {
        format!(
            "Checkpoint(model={:?}, classes={}, path={:?})",
            self.model(),
            self.class_names().len(),
            self.path.display().to_string()
        )
    }
}

/// Makes `dir/{stem}.safetensors`, a YOLO detector's weights under the
/// Ultralytics parameter names (the package engine's, converted), a VTP
/// checkpoint: writes its sidecar `{stem}.json` after checking that the
/// weights load into the native model. Returns the sidecar as a dict.
#[pyfunction]
#[pyo3(signature = (dir, stem, model, class_names, image_size, epoch, metrics, best_fitness = None))]
#[allow(clippy::too_many_arguments)] // Python's keyword arguments, one per sidecar field
pub(crate) fn adopt_detector(
    py: Python<'_>,
    dir: PathBuf,
    stem: String,
    model: String,
    class_names: Vec<String>,
    image_size: u32,
    epoch: u32,
    metrics: std::collections::BTreeMap<String, f64>,
    best_fitness: Option<f64>,
) -> PyResult<Py<PyAny>> {
    let detector = vtp_trainer::engine::checkpoint::ForeignDetector {
        model,
        class_names,
        image_size,
        epoch,
        metrics,
        best_fitness,
    };
    let meta = py
        .detach(|| vtp_trainer::engine::checkpoint::adopt_detector(&dir, &stem, detector))
        .map_err(from_core)?;
    let value = serde_json::to_value(&meta).map_err(|e| VtpError::new_err(e.to_string()))?;
    to_python(py, &value)
}
