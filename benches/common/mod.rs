//! Fixtures shared by the benchmarks.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use tch::nn::ModuleT;
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};
use vtp_trainer::data::{ImageFolder, Loader, LoaderConfig};
use vtp_trainer::engine::optim::Optimizer;
use vtp_trainer::engine::{ModelKind, OptimizerKind};

/// Threads on each side of every comparison.
pub const THREADS: usize = 2;

/// 2,000 96x96 JPEGs in 10 classes under `dir/jpegs` (made once).
pub fn jpeg_folder(dir: &Path) -> PathBuf {
    let root = dir.join("jpegs");
    if root.is_dir() {
        return root;
    }
    for class in 0..10u32 {
        std::fs::create_dir_all(root.join(class.to_string())).unwrap();
        for i in 0..200u32 {
            let img = image::RgbImage::from_fn(96, 96, |x, y| {
                let v = (x * (class + 1) + y * 3 + i * 7) % 256;
                image::Rgb([v as u8, ((x ^ y) * class) as u8, (255 - v) as u8])
            });
            img.save(root.join(class.to_string()).join(format!("{i}.jpg")))
                .unwrap();
        }
    }
    root
}

/// A loader over every image of `root` that decodes each image every pass.
pub fn uncached_loader(root: &Path, size: u32) -> Loader {
    let data = ImageFolder::open(root, 0.01, 0).unwrap();
    let mut samples = data.train;
    samples.extend(data.val);
    Loader::new(
        samples,
        LoaderConfig {
            image_size: size,
            batch_size: 64,
            workers: THREADS,
            cache_bytes: 0,
            ..LoaderConfig::default()
        },
    )
}

/// Seeded initial weights and 8 random batches for a training-step benchmark.
pub fn step_fixture(dir: &Path, kind: ModelKind, size: i64, batch: i64) -> (PathBuf, PathBuf) {
    tch::manual_seed(0);
    let vs = VarStore::new(Device::Cpu);
    let _model = kind.build(&vs.root(), 10);
    let weights = dir.join(format!("init_{kind}.safetensors"));
    vs.save(&weights).unwrap();
    let mut named = Vec::new();
    for i in 0..8 {
        named.push((
            format!("x{i}"),
            Tensor::randn([batch, 3, size, size], (Kind::Float, Device::Cpu)),
        ));
        named.push((
            format!("y{i}"),
            Tensor::randint(10, [batch], (Kind::Int64, Device::Cpu)),
        ));
    }
    let batches = dir.join(format!("batches_{kind}.safetensors"));
    Tensor::write_safetensors(&named, &batches).unwrap();
    (weights, batches)
}

/// The batches of a [`step_fixture`].
pub fn load_batches(path: &Path) -> Vec<(Tensor, Tensor)> {
    let data = Tensor::read_safetensors(path).unwrap();
    let get = |name: &str| {
        data.iter()
            .find(|(n, _)| n == name)
            .map(|(_, t)| t.shallow_clone())
            .unwrap()
    };
    (0..8)
        .map(|i| (get(&format!("x{i}")), get(&format!("y{i}"))))
        .collect()
}

/// A model of `kind` (with `weights`, when given) and the trainer's SGD
/// (lr 0.01, momentum 0.9, weight decay 5e-4) over its parameters.
pub fn model_and_sgd(
    kind: ModelKind,
    weights: Option<&Path>,
) -> (VarStore, Box<dyn ModuleT>, Optimizer) {
    let mut vs = VarStore::new(Device::Cpu);
    let model = kind.build(&vs.root(), 10);
    if let Some(weights) = weights {
        vs.load(weights).unwrap();
    }
    let params = vs
        .variables()
        .into_iter()
        .filter(|(_, t)| t.requires_grad())
        .collect();
    let opt = Optimizer::new(OptimizerKind::Sgd, 0.01, 0.9, 5e-4, params);
    (vs, model, opt)
}

/// The YOLO benchmark dataset: scikit-learn's digits pasted onto 96x96
/// canvases by `examples/detect/make_digits_yolo.py` (made once), the same
/// files for both sides. Returns its root (holding `data.yaml`).
pub fn digits_yolo(dir: &Path, train: usize, val: usize) -> PathBuf {
    let out = dir.join(format!("digits-yolo-{train}-{val}"));
    let root = out.join("digits-yolo");
    if root.join("data.yaml").is_file() {
        return root;
    }
    let python = std::env::var("VIRTUAL_ENV")
        .map_or_else(|_| "python3".to_owned(), |v| format!("{v}/bin/python"));
    let script =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/detect/make_digits_yolo.py");
    let status = std::process::Command::new(python)
        .arg(script)
        .arg(&out)
        .args([
            "--train",
            &train.to_string(),
            "--val",
            &val.to_string(),
            "--size",
            "96",
        ])
        .status()
        .expect("run make_digits_yolo.py");
    assert!(status.success(), "make_digits_yolo.py failed");
    root
}

/// Seeded initial YOLO weights and `count` letterboxed batches (images and
/// `(batch index, class, cx, cy, w, h)` targets) of the digits dataset at
/// `size` px, for a detection training-step benchmark.
pub fn detect_step_fixture(
    dir: &Path,
    variant: vtp_trainer::engine::detect::model::YoloVariant,
    size: u32,
    batch: usize,
    count: usize,
) -> (PathBuf, PathBuf, i64) {
    use vtp_trainer::data::detect_loader::{DetectLoader, DetectLoaderConfig};
    use vtp_trainer::data::yolo::YoloDataset;
    let root = digits_yolo(dir, 256, 64);
    let data = YoloDataset::open(&root).unwrap();
    let nc = data.names.len() as i64;
    tch::manual_seed(0);
    let vs = VarStore::new(Device::Cpu);
    let _model = vtp_trainer::engine::detect::model::DetectionModel::new(&vs.root(), variant, nc);
    let weights = dir.join(format!("init_{variant}.safetensors"));
    vs.save(&weights).unwrap();
    let loader = DetectLoader::new(
        data.train,
        DetectLoaderConfig {
            image_size: size,
            batch_size: batch,
            workers: THREADS,
            ..DetectLoaderConfig::default()
        },
    );
    let s = i64::from(size);
    let mut named = Vec::new();
    for (i, b) in loader.epoch(0, 1, false, false).take(count).enumerate() {
        let n = b.shapes.len() as i64;
        named.push((
            format!("x{i}"),
            Tensor::from_slice(&b.images).view([n, 3, s, s]),
        ));
        let flat: Vec<f32> = b.targets.iter().flatten().copied().collect();
        named.push((format!("t{i}"), Tensor::from_slice(&flat).view([-1, 6])));
    }
    let batches = dir.join(format!("detect_batches_{variant}_{size}.safetensors"));
    Tensor::write_safetensors(&named, &batches).unwrap();
    (weights, batches, nc)
}

/// A detection fixture's batches: `(images, targets)`.
pub fn load_detect_batches(path: &Path) -> Vec<(Tensor, Tensor)> {
    let named = Tensor::read_safetensors(path).unwrap();
    let get = |key: &str| {
        named
            .iter()
            .find(|(n, _)| n == key)
            .map(|(_, t)| t.shallow_clone())
    };
    (0..)
        .map_while(|i| Some((get(&format!("x{i}"))?, get(&format!("t{i}"))?)))
        .collect()
}
