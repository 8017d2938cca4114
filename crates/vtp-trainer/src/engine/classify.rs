//! Image classification as a [`Task`] of the one loop: cross-entropy on an
//! ImageFolder dataset, validation accuracy as the fitness, SGD with a
//! cosine schedule unless the config names another optimizer.

use std::collections::BTreeMap;
use std::path::PathBuf;

use tch::nn::{ModuleT, VarStore};
use tch::{Device, Kind, Tensor};
use vtp_core::{Error, OptimizerKind, Result, TrainConfig, TrainSpec};

use super::amp::Amp;
use super::checkpoint::{self, Checkpoint, CheckpointMeta, ClassReport};
use super::learner::{
    Evaluation, Recipe, Record, Setup, StepLoss, Task, TrainData, init_weights, seeded_init,
};
use super::model::ModelKind;
use super::optim::Optimizer;
use super::torch_err;
use crate::data::loader::{Batch, MEAN, STD};
use crate::data::{ImageFolder, Loader, LoaderConfig};

/// The most classes whose confusion matrix a sidecar carries (100 x 100
/// counts); larger class sets keep their per-class accuracy only.
const MAX_CONFUSION_CLASSES: usize = 100;

/// A classifier in training.
pub(crate) struct Classify {
    kind: ModelKind,
    classes: Vec<String>,
    image_size: u32,
    seed: u64,
    output: PathBuf,
    device: Device,
    vs: VarStore,
    model: Box<dyn ModuleT>,
    val: Loader,
}

impl Classify {
    fn tensors(&self, batch: &Batch) -> Result<(Tensor, Tensor)> {
        let s = i64::from(self.image_size);
        let n = batch.labels.len() as i64;
        let xs = Tensor::from_slice(&batch.images)
            .f_view([n, 3, s, s])
            .map_err(torch_err)?
            .f_to_device(self.device)
            .map_err(torch_err)?;
        let ys = Tensor::from_slice(&batch.labels)
            .f_to_device(self.device)
            .map_err(torch_err)?;
        Ok((xs, ys))
    }
}

impl Task for Classify {
    type Batch = Batch;
    const TASK: vtp_core::Task = vtp_core::Task::Classify;

    fn batch_len(batch: &Batch) -> usize {
        batch.len()
    }

    fn identity(&self) -> (&str, &[String]) {
        (self.kind.name(), &self.classes)
    }

    fn loss(&mut self, batch: &Batch, amp: &Amp) -> Result<StepLoss> {
        let (xs, ys) = self.tensors(batch)?;
        let logits = Amp::full(&amp.forward(|| self.model.forward_t(&xs, true))?)?;
        let loss = logits
            .f_cross_entropy_loss::<Tensor>(&ys, None, tch::Reduction::Mean, -100, 0.0)
            .map_err(torch_err)?;
        let value = loss.f_double_value(&[]).map_err(torch_err)?;
        Ok(StepLoss {
            loss,
            parts: vec![("loss", value)],
        })
    }

    /// Validation: the loss, accuracy, top-5 accuracy (top-k for fewer
    /// than 5 classes), and per class its accuracy and its row of the
    /// confusion matrix.
    fn evaluate(&self, epoch: u32) -> Result<Evaluation> {
        let nc = self.classes.len();
        let k = nc.min(5) as i64;
        let mut confusion = vec![vec![0u64; nc]; nc];
        let (mut loss, mut top_k, mut seen) = (0.0, 0i64, 0usize);
        tch::no_grad(|| -> Result<()> {
            for batch in self.val.epoch(self.seed, epoch, false) {
                let (xs, ys) = self.tensors(&batch)?;
                let logits = self.model.forward_t(&xs, false);
                let batch_loss = logits
                    .f_cross_entropy_loss::<Tensor>(&ys, None, tch::Reduction::Sum, -100, 0.0)
                    .map_err(torch_err)?;
                loss += batch_loss.f_double_value(&[]).map_err(torch_err)?;
                let (_, top) = logits.f_topk(k, -1, true, true).map_err(torch_err)?;
                top_k += top
                    .f_eq_tensor(&ys.f_unsqueeze(-1).map_err(torch_err)?)
                    .map_err(torch_err)?
                    .f_any_dim(-1, false)
                    .map_err(torch_err)?
                    .f_sum(Kind::Int64)
                    .map_err(torch_err)?
                    .f_int64_value(&[])
                    .map_err(torch_err)?;
                let predicted = top
                    .f_select(-1, 0)
                    .and_then(|t| t.f_to_device(Device::Cpu))
                    .map_err(torch_err)?;
                let predicted = Vec::<i64>::try_from(&predicted).map_err(torch_err)?;
                for (&truth, predicted) in batch.labels.iter().zip(predicted) {
                    if let (Ok(truth), Ok(predicted)) =
                        (usize::try_from(truth), usize::try_from(predicted))
                        && truth < nc
                        && predicted < nc
                    {
                        confusion[truth][predicted] += 1;
                    }
                }
                seen += batch.len();
            }
            Ok(())
        })?;
        if seen == 0 {
            return Err(Error::invalid("dataset", "no readable validation images"));
        }
        let correct: u64 = (0..nc).map(|c| confusion[c][c]).sum();
        let accuracy = correct as f64 / seen as f64;
        let per_class = confusion
            .iter()
            .enumerate()
            .map(|(c, row)| {
                let images: u64 = row.iter().sum();
                (images > 0).then(|| row[c] as f64 / images as f64)
            })
            .collect();
        Ok(Evaluation {
            metrics: BTreeMap::from([
                ("val_loss".to_owned(), loss / seen as f64),
                ("val_accuracy".to_owned(), accuracy),
                ("accuracy".to_owned(), accuracy),
                ("val_top5_accuracy".to_owned(), top_k as f64 / seen as f64),
            ]),
            fitness: accuracy,
            per_class: Some(ClassReport {
                classes: Vec::new(),
                metric: "accuracy".to_owned(),
                values: per_class,
                // Bounded: a sidecar per epoch carries it.
                confusion: (nc <= MAX_CONFUSION_CLASSES).then_some(confusion),
            }),
        })
    }

    fn save(&self, stem: &str, record: &Record<'_>) -> Result<CheckpointMeta> {
        let meta = CheckpointMeta {
            mean: MEAN,
            std: STD,
            best_val_accuracy: record.best,
            ..record.meta(Self::TASK, self.kind.name(), &self.classes)
        };
        checkpoint::save(&self.output, stem, &self.vs, Some(record.optimizer), meta)
    }

    fn resume(&mut self, checkpoint: &Checkpoint, optimizer: &mut Optimizer) -> Result<()> {
        checkpoint.load_weights(&mut self.vs)?;
        checkpoint.load_optimizer(optimizer)?;
        Ok(())
    }
}

/// The training half of the classifier's data.
struct Train {
    loader: Loader,
    seed: u64,
}

impl TrainData<Batch> for Train {
    fn batches(&self) -> usize {
        self.loader.batches()
    }

    fn epoch(&self, epoch: u32, _: u32) -> Box<dyn Iterator<Item = Batch> + '_> {
        Box::new(self.loader.epoch(self.seed, epoch, true))
    }
}

/// The classifier `config` names, on the ImageFolder dataset of `spec`,
/// ready to train.
///
/// # Errors
/// An unknown model; CUDA asked for and absent; a dataset that cannot be
/// read or has too many corrupt images; initial weights that do not fit.
pub(crate) fn setup(spec: &TrainSpec, config: TrainConfig) -> Result<Setup<Classify>> {
    let kind = config.model.parse::<ModelKind>()?;
    let device = super::select_device(&config.device)?;
    tch::set_num_threads(i32::try_from(config.effective_threads()).unwrap_or(1));

    let data = ImageFolder::open(&spec.dataset_dir, config.val_split, config.seed)?;
    let max_corrupt = crate::data::max_corrupt(data.train.len() + data.val.len());
    let loader_config = LoaderConfig {
        max_corrupt,
        image_size: config.image_size,
        batch_size: config.batch_size,
        workers: config.workers.max(1),
        random_crop: config.random_crop,
        hflip: config.hflip,
        ..LoaderConfig::default()
    };
    let train = Loader::new(data.train, loader_config.clone());
    let val = Loader::new(
        data.val,
        LoaderConfig {
            batch_size: config.batch_size.max(64),
            ..loader_config
        },
    );
    let skipped = crate::data::prepare_split(&train, &val)?;
    tracing::info!(job_id = %spec.job_id, model = %kind, classes = data.classes.len(), train = train.len(), val = val.len(), skipped, ?device, "training");

    let (vs, model) = seeded_init(config.seed, || {
        let vs = VarStore::new(device);
        let model = kind.build(&vs.root(), data.classes.len() as i64);
        (vs, model)
    });
    let init = init_weights(spec, &config, &vs, kind.name())?;
    let params: Vec<(String, Tensor)> = vs
        .variables()
        .into_iter()
        .filter(|(_, t)| t.requires_grad())
        .collect();
    // `auto` is SGD for classification.
    let optimizer_kind = match config.optimizer {
        OptimizerKind::Auto => OptimizerKind::Sgd,
        kind => kind,
    };
    let optimizer = Optimizer::new(
        optimizer_kind,
        config.lr,
        config.momentum,
        config.weight_decay,
        params,
    );
    Ok(Setup {
        device,
        recipe: Recipe::plain(config.lr, config.momentum),
        train: Box::new(Train {
            loader: train,
            seed: config.seed,
        }),
        task: Classify {
            kind,
            classes: data.classes,
            image_size: config.image_size,
            seed: config.seed,
            output: spec.output_dir.clone(),
            device,
            vs,
            model,
            val,
        },
        config,
        optimizer,
        skipped,
        init,
    })
}
