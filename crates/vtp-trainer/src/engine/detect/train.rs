//! Detection as a [`Task`] of the one loop, with the Ultralytics recipe:
//! mosaic closed for the last epochs, warm-up of learning rates, momentum
//! and gradient accumulation, linear learning-rate decay, gradient
//! clipping, and an EMA of the weights that is what gets evaluated and
//! saved.

use std::collections::BTreeMap;
use std::path::PathBuf;

use tch::nn::VarStore;
use tch::{Device, Tensor};
use vtp_core::{Error, Result, TrainSpec};

use super::loss::{DetectionLoss, LossGains, LossParts};
use super::metrics::{DetectionMetrics, GroundTruth, MapEvaluator};
use super::model::{DetectionModel, YoloVariant};
use super::nms::{NmsConfig, non_max_suppression};
use crate::data::detect_loader::{DetectBatch, DetectLoader, DetectLoaderConfig};
use crate::data::yolo::YoloDataset;
use crate::engine::amp::Amp;
use crate::engine::checkpoint::{self, Checkpoint, CheckpointMeta, ClassReport};
use crate::engine::learner::{
    Decay, Evaluation, Recipe, Record, Setup, StepLoss, Task, TrainData, Warmup, init_weights,
    load_matching, seeded_init,
};
use crate::engine::optim::{Optimizer, ParamGroup};
use crate::engine::torch_err;
use vtp_core::{OptimizerKind, TrainConfig};

/// Ultralytics clips the gradient norm at 10 before every optimizer step.
const MAX_GRAD_NORM: f64 = 10.0;
/// Prefix of the raw (non-EMA) weights inside the `*.optim.safetensors`
/// training state; the weights file itself holds the EMA.
const TRAIN_WEIGHTS: &str = "train_weights/";

/// An exponential moving average of the weights and buffers (Ultralytics'
/// `ModelEMA`: decay `0.9999 * (1 - exp(-updates / 2000))`, so early steps
/// follow the model closely). Integer buffers are copied.
struct Ema {
    vs: VarStore,
    model: DetectionModel,
    updates: i64,
}

impl Ema {
    fn decay(&self) -> f64 {
        0.9999 * (1.0 - (-(self.updates as f64) / 2000.0).exp())
    }

    fn update(&mut self, from: &VarStore) -> Result<()> {
        self.updates += 1;
        let d = self.decay();
        let source = from.variables();
        tch::no_grad(|| -> Result<()> {
            for (name, mut target) in self.vs.variables() {
                let Some(value) = source.get(&name) else {
                    continue;
                };
                if target.is_floating_point() {
                    let _ = target.f_mul_scalar_(d).map_err(torch_err)?;
                    let _ = target
                        .f_add_(&value.f_mul_scalar(1.0 - d).map_err(torch_err)?)
                        .map_err(torch_err)?;
                } else {
                    target.f_copy_(value).map_err(torch_err)?;
                }
            }
            Ok(())
        })
    }
}

/// The parameter group of a YOLO parameter, as Ultralytics groups them:
/// biases, normalisation weights, and the decayed rest.
fn group_of(name: &str, _: &Tensor) -> ParamGroup {
    if name.ends_with(".bias") {
        ParamGroup::Bias
    } else if name.contains(".bn.") {
        ParamGroup::Norm
    } else {
        ParamGroup::Weights
    }
}

/// The optimizer, learning rate and momentum `auto` stands for: AdamW
/// with a learning rate fitted to the class count for short runs, SGD for
/// long ones (where Ultralytics now uses its MuSGD, which VTP does not
/// implement). Explicit choices pass through.
fn resolve_optimizer(
    config: &TrainConfig,
    train_images: usize,
    nc: usize,
) -> (OptimizerKind, f64, f64) {
    match config.optimizer {
        OptimizerKind::Auto => {
            let iterations = train_images.div_ceil(config.batch_size.max(config.nbs)) as u64
                * u64::from(config.epochs);
            if iterations > 10_000 {
                (OptimizerKind::Sgd, 0.01, 0.9)
            } else {
                let lr_fit = (0.002 * 5.0 / (4.0 + nc as f64) * 1e6).round() / 1e6;
                (OptimizerKind::Adamw, lr_fit, 0.9)
            }
        }
        kind => (kind, config.lr, config.momentum),
    }
}

/// A detector in training: the model, its moving average, the loss, and the
/// validation data.
pub(crate) struct Detect {
    config: TrainConfig,
    variant: YoloVariant,
    names: Vec<String>,
    output: PathBuf,
    device: Device,
    vs: VarStore,
    model: DetectionModel,
    ema: Ema,
    loss: DetectionLoss,
    val: DetectLoader,
}

impl Detect {
    fn tensors(&self, batch: &DetectBatch) -> Result<(Tensor, Tensor)> {
        let s = i64::from(self.config.image_size);
        let n = batch.shapes.len() as i64;
        let xs = Tensor::from_slice(&batch.images)
            .f_view([n, 3, s, s])
            .map_err(torch_err)?
            .f_to_device(self.device)
            .map_err(torch_err)?;
        let flat: Vec<f32> = batch.targets.iter().flatten().copied().collect();
        let targets = Tensor::from_slice(&flat)
            .f_view([batch.targets.len() as i64, 6])
            .map_err(torch_err)?
            .f_to_device(self.device)
            .map_err(torch_err)?;
        Ok((xs, targets))
    }

    /// Validation with the EMA weights: the val losses and COCO metrics.
    fn validate(&self, epoch: u32) -> Result<(LossParts, DetectionMetrics)> {
        let size = self.config.image_size as f32;
        let nms = NmsConfig {
            conf: self.config.conf as f32,
            iou: self.config.iou as f32,
            max_det: self.config.max_det,
            multi_label: true,
            ..NmsConfig::default()
        };
        let mut evaluator = MapEvaluator::new(self.names.len());
        let mut sums = [0.0f64; 3];
        let mut batches = 0usize;
        tch::no_grad(|| -> Result<()> {
            for batch in self.val.epoch(self.config.seed, epoch, false, false) {
                let (xs, targets) = self.tensors(&batch)?;
                let raw = self.ema.model.forward_t(&xs, false);
                let (_, parts) = self.loss.compute(&raw, &targets);
                sums[0] += parts.box_loss;
                sums[1] += parts.cls_loss;
                sums[2] += parts.dfl_loss;
                batches += 1;
                let pred = self
                    .ema
                    .model
                    .decode(&raw)
                    .f_to_device(Device::Cpu)
                    .map_err(torch_err)?;
                let detections = non_max_suppression(&pred, &nms);
                for (i, dets) in detections.iter().enumerate() {
                    let gts: Vec<GroundTruth> = batch
                        .targets
                        .iter()
                        .filter(|t| t[0] as usize == i)
                        .map(|t| {
                            let (cx, cy, w, h) =
                                (t[2] * size, t[3] * size, t[4] * size, t[5] * size);
                            GroundTruth {
                                bbox: [cx - w / 2.0, cy - h / 2.0, cx + w / 2.0, cy + h / 2.0],
                                class: t[1] as usize,
                            }
                        })
                        .collect();
                    evaluator.add_image(&gts, dets);
                }
            }
            Ok(())
        })?;
        if batches == 0 {
            return Err(Error::invalid("dataset", "no readable validation images"));
        }
        let n = batches as f64;
        Ok((
            LossParts {
                box_loss: sums[0] / n,
                cls_loss: sums[1] / n,
                dfl_loss: sums[2] / n,
            },
            evaluator.finish(),
        ))
    }
}

impl Task for Detect {
    type Batch = DetectBatch;
    const TASK: vtp_core::Task = vtp_core::Task::Detect;

    fn batch_len(batch: &DetectBatch) -> usize {
        batch.shapes.len()
    }

    fn identity(&self) -> (&str, &[String]) {
        (self.variant.name(), &self.names)
    }

    fn loss(&mut self, batch: &DetectBatch, amp: &Amp) -> Result<StepLoss> {
        let (xs, targets) = self.tensors(batch)?;
        let raw = amp
            .forward(|| self.model.forward_t(&xs, true))?
            .iter()
            .map(Amp::full)
            .collect::<Result<Vec<_>>>()?;
        let (loss, parts) = self.loss.compute(&raw, &targets);
        Ok(StepLoss {
            loss,
            parts: vec![
                ("box_loss", parts.box_loss),
                ("cls_loss", parts.cls_loss),
                ("dfl_loss", parts.dfl_loss),
            ],
        })
    }

    fn stepped(&mut self) -> Result<()> {
        self.ema.update(&self.vs)
    }

    fn evaluate(&self, epoch: u32) -> Result<Evaluation> {
        let (val, metrics) = self.validate(epoch)?;
        let fitness = metrics.fitness();
        Ok(Evaluation {
            metrics: BTreeMap::from([
                (
                    "val_loss".to_owned(),
                    val.box_loss + val.cls_loss + val.dfl_loss,
                ),
                ("val_box_loss".to_owned(), val.box_loss),
                ("val_cls_loss".to_owned(), val.cls_loss),
                ("val_dfl_loss".to_owned(), val.dfl_loss),
                ("precision".to_owned(), metrics.precision),
                ("recall".to_owned(), metrics.recall),
                ("map50".to_owned(), metrics.map50),
                ("map".to_owned(), metrics.map),
                ("fitness".to_owned(), fitness),
            ]),
            fitness,
            per_class: Some(ClassReport {
                classes: Vec::new(),
                metric: "map".to_owned(),
                values: metrics.per_class_map,
                confusion: None,
            }),
        })
    }

    /// Saves `stem`: the EMA weights (what users load), and beside them
    /// the optimizer state and the raw weights, for resume.
    fn save(&self, stem: &str, record: &Record<'_>) -> Result<CheckpointMeta> {
        let raw: Vec<(String, Tensor)> = self
            .vs
            .variables()
            .into_iter()
            .map(|(name, t)| (format!("{TRAIN_WEIGHTS}{name}"), t.to_device(Device::Cpu)))
            .collect();
        let meta = CheckpointMeta {
            // YOLO takes RGB scaled to 0..1, without per-channel normalisation.
            mean: [0.0; 3],
            std: [1.0; 3],
            stride: Some(32),
            best_fitness: Some(record.best.max(0.0)),
            ema_updates: Some(self.ema.updates),
            ..record.meta(Self::TASK, self.variant.name(), &self.names)
        };
        checkpoint::save_with(
            &self.output,
            stem,
            &self.ema.vs,
            Some(record.optimizer),
            raw,
            meta,
        )
    }

    fn resume(&mut self, checkpoint: &Checkpoint, optimizer: &mut Optimizer) -> Result<()> {
        checkpoint.load_weights(&mut self.ema.vs)?;
        let state = checkpoint.training_state()?;
        let raw: Vec<(String, Tensor)> = state
            .iter()
            .filter_map(|(n, t)| {
                n.strip_prefix(TRAIN_WEIGHTS)
                    .map(|n| (n.to_owned(), t.shallow_clone()))
            })
            .collect();
        let expected = self.vs.variables().len();
        if load_matching(&self.vs, &raw)?.loaded != expected {
            return Err(Error::invalid(
                "checkpoint",
                "the last checkpoint's training state lacks the raw weights; cannot resume",
            ));
        }
        optimizer.load_state(&state)?;
        self.ema.updates = checkpoint.meta.ema_updates.unwrap_or_default();
        Ok(())
    }
}

/// The training half of the detector's data: mosaics until the last
/// `close_mosaic` epochs.
struct Train {
    loader: DetectLoader,
    seed: u64,
    mosaic: f64,
    close_mosaic: u32,
}

impl TrainData<DetectBatch> for Train {
    fn batches(&self) -> usize {
        self.loader.batches()
    }

    fn epoch(&self, epoch: u32, epochs: u32) -> Box<dyn Iterator<Item = DetectBatch> + '_> {
        let mosaic = self.mosaic > 0.0 && epoch - 1 + self.close_mosaic < epochs;
        Box::new(self.loader.epoch(self.seed, epoch, true, mosaic))
    }
}

/// The YOLO detector `config` names, on the YOLO dataset of `spec`, ready
/// to train.
///
/// # Errors
/// An unknown model; CUDA asked for and absent; a dataset that cannot be
/// read or has too many corrupt images; initial weights that do not fit.
pub(crate) fn setup(spec: &TrainSpec, config: TrainConfig) -> Result<Setup<Detect>> {
    let variant = config.model.parse::<YoloVariant>()?;
    let device = crate::engine::select_device(&config.device)?;
    tch::set_num_threads(i32::try_from(config.effective_threads()).unwrap_or(1));

    let data = YoloDataset::open(&spec.dataset_dir)?;
    let nc = data.names.len();
    let max_corrupt = crate::data::max_corrupt(data.train.len() + data.val.len());
    let loader_config = DetectLoaderConfig {
        image_size: config.image_size,
        batch_size: config.batch_size,
        workers: config.workers.max(1),
        mosaic: config.mosaic,
        translate: config.translate,
        scale: config.scale,
        fliplr: config.fliplr,
        hsv_h: config.hsv_h,
        hsv_s: config.hsv_s,
        hsv_v: config.hsv_v,
        max_corrupt,
        ..DetectLoaderConfig::default()
    };
    let train = DetectLoader::new(data.train, loader_config.clone());
    // Validation batches are twice as large, as Ultralytics makes them.
    let val = DetectLoader::new(
        data.val,
        DetectLoaderConfig {
            batch_size: config.batch_size * 2,
            ..loader_config
        },
    );
    let skipped = crate::data::prepare_split(&train, &val)?;
    tracing::info!(job_id = %spec.job_id, model = %variant, classes = nc, train = train.len(), val = val.len(), skipped, ?device, "training a detector");

    let (vs, model, ema) = seeded_init(config.seed, || {
        let vs = VarStore::new(device);
        let model = DetectionModel::new(&vs.root(), variant, nc as i64);
        let ema_vs = VarStore::new(device);
        let ema_model = DetectionModel::new(&ema_vs.root(), variant, nc as i64);
        (vs, model, (ema_vs, ema_model))
    });
    let mut ema = Ema {
        vs: ema.0,
        model: ema.1,
        updates: 0,
    };
    let init = init_weights(spec, &config, &vs, variant.name())?;
    ema.vs.copy(&vs).map_err(torch_err)?;
    for (_, t) in ema.vs.variables() {
        let _ = t.set_requires_grad(false);
    }

    let nb = train.batches();
    // Python's round (and numpy's) break ties to even; so must we.
    let accumulate =
        ((config.nbs as f64 / config.batch_size as f64).round_ties_even() as usize).max(1);
    let weight_decay =
        config.weight_decay * config.batch_size as f64 * accumulate as f64 / config.nbs as f64;
    let accumulate = accumulate.min(nb * config.epochs as usize).max(1);
    let (kind, lr0, momentum) = resolve_optimizer(&config, train.len(), nc);
    let warmup_bias_lr = if config.optimizer == OptimizerKind::Auto {
        0.0
    } else {
        config.warmup_bias_lr
    };
    let params: Vec<(String, Tensor)> = vs
        .variables()
        .into_iter()
        .filter(|(_, t)| t.requires_grad())
        .collect();
    let optimizer = Optimizer::grouped(kind, lr0, momentum, weight_decay, params, group_of);
    let loss = DetectionLoss::new(
        nc as i64,
        16,
        [8.0, 16.0, 32.0],
        LossGains {
            box_gain: config.box_gain,
            cls: config.cls,
            dfl: config.dfl,
        },
    );
    Ok(Setup {
        device,
        recipe: Recipe {
            lr0,
            momentum,
            decay: Decay::Linear { lrf: config.lrf },
            warmup: Some(Warmup {
                epochs: config.warmup_epochs,
                bias_lr: warmup_bias_lr,
                momentum: config.warmup_momentum,
            }),
            accumulate,
            max_grad_norm: Some(MAX_GRAD_NORM),
        },
        train: Box::new(Train {
            loader: train,
            seed: config.seed,
            mosaic: config.mosaic,
            close_mosaic: config.close_mosaic,
        }),
        task: Detect {
            variant,
            names: data.names,
            output: spec.output_dir.clone(),
            device,
            vs,
            model,
            ema,
            loss,
            val,
            config: config.clone(),
        },
        config,
        optimizer,
        skipped,
        init,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    #[test]
    fn auto_picks_adamw_with_a_fitted_rate_for_short_runs() {
        let config = TrainConfig::defaults_for(vtp_core::Task::Detect);
        let (kind, lr, momentum) = resolve_optimizer(&config, 1000, 10);
        assert_eq!(kind, OptimizerKind::Adamw);
        assert!((lr - 0.000714).abs() < 1e-12, "{lr}");
        assert_eq!(momentum, 0.9);
        let long = TrainConfig {
            epochs: 10_000,
            ..config
        };
        assert_eq!(resolve_optimizer(&long, 100_000, 10).0, OptimizerKind::Sgd);
    }

    #[test]
    fn parameters_are_grouped_as_ultralytics_groups_them() {
        let t = Tensor::zeros([1], (Kind::Float, Device::Cpu));
        assert_eq!(group_of("model.0.conv.weight", &t), ParamGroup::Weights);
        assert_eq!(group_of("model.0.bn.weight", &t), ParamGroup::Norm);
        assert_eq!(group_of("model.0.bn.bias", &t), ParamGroup::Bias);
        assert_eq!(group_of("model.23.cv2.0.2.bias", &t), ParamGroup::Bias);
    }
}
