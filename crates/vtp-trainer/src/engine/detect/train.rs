//! The detection training loop: the Ultralytics recipe (mosaic closed for
//! the last epochs, warm-up of learning rates, momentum and gradient
//! accumulation, linear learning-rate decay, gradient clipping, an EMA of
//! the weights that is what gets evaluated and saved), on VTP's engine.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use tch::nn::VarStore;
use tch::{Device, Tensor};
use vtp_core::{EpochReport, Error, ProgressSink, Result, Task, TrainSpec, TrainSummary};

use super::loss::{DetectionLoss, LossGains, LossParts};
use super::metrics::{DetectionMetrics, GroundTruth, MapEvaluator};
use super::model::{DetectionModel, YoloVariant};
use super::nms::{NmsConfig, non_max_suppression};
use crate::data::detect_loader::{DetectBatch, DetectLoader, DetectLoaderConfig};
use crate::data::yolo::YoloDataset;
use crate::engine::checkpoint::{self, Checkpoint, CheckpointMeta};
use crate::engine::optim::{Optimizer, ParamGroup};
use crate::engine::torch_err;
use crate::engine::trainer::{StepProgress, Waited, close_epoch, seeded_init, summary};
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

/// Copies every tensor of `named` whose name and shape match a variable of
/// `vs`; returns how many did. This is how pretrained weights with another
/// class count start a run: everything but the class head transfers.
fn load_matching(vs: &VarStore, named: &[(String, Tensor)]) -> Result<usize> {
    let vars = vs.variables();
    let mut loaded = 0;
    tch::no_grad(|| -> Result<()> {
        for (name, tensor) in named {
            if let Some(var) = vars.get(name)
                && var.size() == tensor.size()
            {
                var.shallow_clone()
                    .f_copy_(&tensor.to_kind(var.kind()).to_device(var.device()))
                    .map_err(torch_err)?;
                loaded += 1;
            }
        }
        Ok(())
    })?;
    Ok(loaded)
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

/// Linear decay from 1 to `lrf` over the run (Ultralytics' default `lf`).
fn lr_factor(epoch0: u32, epochs: u32, lrf: f64) -> f64 {
    (1.0 - f64::from(epoch0) / f64::from(epochs)).max(0.0) * (1.0 - lrf) + lrf
}

fn interp(x: f64, x1: f64, y0: f64, y1: f64) -> f64 {
    if x1 <= 0.0 {
        return y1;
    }
    y0 + (y1 - y0) * (x / x1).clamp(0.0, 1.0)
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

struct Run<'a> {
    config: TrainConfig,
    variant: YoloVariant,
    names: Vec<String>,
    output: &'a Path,
    device: Device,
    vs: VarStore,
    model: DetectionModel,
    ema: Ema,
    optimizer: Optimizer,
    loss: DetectionLoss,
    history: Vec<BTreeMap<String, f64>>,
    best_fitness: f64,
}

impl Run<'_> {
    fn meta(&self, epoch: u32) -> CheckpointMeta {
        CheckpointMeta {
            format: checkpoint::FORMAT.into(),
            task: Task::Detect,
            model: self.variant.name().to_owned(),
            class_names: self.names.clone(),
            image_size: self.config.image_size,
            // YOLO takes RGB scaled to 0..1, without per-channel normalisation.
            mean: [0.0; 3],
            std: [1.0; 3],
            stride: Some(32),
            config: self.config.clone(),
            epoch,
            metrics: self.history.last().cloned().unwrap_or_default(),
            history: self.history.clone(),
            best_val_accuracy: 0.0,
            best_fitness: Some(self.best_fitness.max(0.0)),
            ema_updates: Some(self.ema.updates),
            weights: String::new(),
            sha256: String::new(),
            optimizer: None,
            optimizer_sha256: None,
        }
    }

    /// Saves `stem`: the EMA weights (what users load), and beside them
    /// the optimizer state and the raw weights, for resume.
    fn save(&self, stem: &str, epoch: u32) -> Result<CheckpointMeta> {
        let raw: Vec<(String, Tensor)> = self
            .vs
            .variables()
            .into_iter()
            .map(|(name, t)| (format!("{TRAIN_WEIGHTS}{name}"), t.to_device(Device::Cpu)))
            .collect();
        checkpoint::save_with(
            self.output,
            stem,
            &self.ema.vs,
            Some(&self.optimizer),
            raw,
            self.meta(epoch),
        )
    }

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
    fn evaluate(&self, val: &DetectLoader, epoch: u32) -> Result<(LossParts, DetectionMetrics)> {
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
            for batch in val.epoch(self.config.seed, epoch, false, false) {
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

/// Trains the YOLO detector `config` names on the YOLO dataset of `spec`.
pub(crate) fn run(
    on_step: &mut Option<Box<dyn FnMut(StepProgress) + Send>>,
    spec: &TrainSpec,
    config: TrainConfig,
    progress: &mut dyn ProgressSink,
    cancelled: &(dyn Fn() -> bool + Sync),
) -> Result<TrainSummary> {
    let variant = config.model.parse::<YoloVariant>()?;
    let device = crate::engine::select_device(&config.device)?;
    tch::set_num_threads(i32::try_from(config.effective_threads()).unwrap_or(1));

    let data = YoloDataset::open(&spec.dataset_dir)?;
    let nc = data.names.len();
    let total = data.train.len() + data.val.len();
    // Policy: a few corrupt images (1%, at least one) are skipped and counted.
    let max_corrupt = (total / 100).max(1);
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
    let skipped = train.prepare()? + val.prepare()?;
    if skipped > max_corrupt {
        return Err(Error::invalid(
            "dataset",
            format!("{skipped} corrupt images of {total} (at most {max_corrupt} tolerated)"),
        ));
    }
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
    let init_weights = spec
        .init_weights
        .clone()
        .or_else(|| config.init_weights.as_ref().map(std::path::PathBuf::from));
    if let Some(path) = &init_weights {
        let named = Tensor::read_safetensors(path).map_err(|e| {
            Error::invalid(
                "config.init_weights",
                format!("cannot read {} as safetensors: {e}", path.display()),
            )
        })?;
        let loaded = load_matching(&vs, &named)?;
        if loaded == 0 {
            return Err(Error::invalid(
                "config.init_weights",
                format!(
                    "no tensor of {} fits {variant}: is it a {variant} state_dict?",
                    path.display()
                ),
            ));
        }
        tracing::info!(job_id = %spec.job_id, loaded, of = vs.variables().len(), "initial weights loaded");
    }
    ema.vs.copy(&vs).map_err(torch_err)?;
    let ema_copied = ema.vs.variables();
    for (_, t) in ema_copied {
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
    let mut run = Run {
        config,
        variant,
        names: data.names,
        output: &spec.output_dir,
        device,
        vs,
        model,
        ema,
        optimizer,
        loss,
        history: Vec::new(),
        best_fitness: f64::NEG_INFINITY,
    };

    let mut start = 1;
    let last = spec.output_dir.join("last.json");
    if run.config.resume && last.is_file() {
        let checkpoint = Checkpoint::open(&last)?;
        if checkpoint.meta.task != Task::Detect
            || checkpoint.meta.model != variant.name()
            || checkpoint.meta.class_names != run.names
        {
            return Err(Error::invalid(
                "checkpoint",
                "the last checkpoint in the output directory is of another model or class set",
            ));
        }
        checkpoint.load_weights(&mut run.ema.vs)?;
        let state = checkpoint.training_state()?;
        let raw: Vec<(String, Tensor)> = state
            .iter()
            .filter_map(|(n, t)| {
                n.strip_prefix(TRAIN_WEIGHTS)
                    .map(|n| (n.to_owned(), t.shallow_clone()))
            })
            .collect();
        let expected = run.vs.variables().len();
        if load_matching(&run.vs, &raw)? != expected {
            return Err(Error::invalid(
                "checkpoint",
                "the last checkpoint's training state lacks the raw weights; cannot resume",
            ));
        }
        run.optimizer.load_state(&state)?;
        run.ema.updates = checkpoint.meta.ema_updates.unwrap_or_default();
        run.history = checkpoint.meta.history.clone();
        run.best_fitness = checkpoint.meta.best_fitness.unwrap_or(f64::NEG_INFINITY);
        start = checkpoint.meta.epoch + 1;
        tracing::info!(job_id = %spec.job_id, epoch = start, "resuming from the last checkpoint");
    }

    let epochs = run.config.epochs;
    // Warm-up leaves at least the final epoch for regular training.
    let warmup_epochs = run
        .config
        .warmup_epochs
        .min(f64::from(epochs.saturating_sub(1)));
    let nw = (warmup_epochs * nb as f64).round() as usize;
    let groups = [ParamGroup::Bias, ParamGroup::Weights, ParamGroup::Norm];
    // Gradients accumulate across batches (and, as in Ultralytics, across
    // an epoch's end) until `step_accumulate` batches have passed. A resumed
    // run starts a fresh accumulation, as Ultralytics' resume does.
    let mut last_opt_step: i64 = -1;
    for epoch in start..=epochs {
        let e0 = epoch - 1;
        // The schedule steps at the start of each epoch, as Ultralytics'
        // LambdaLR does; warm-up overrides it inside its window.
        for group in groups {
            run.optimizer
                .set_group_lr(group, lr0 * lr_factor(e0, epochs, run.config.lrf));
        }
        let mosaic = run.config.mosaic > 0.0 && e0 + run.config.close_mosaic < epochs;
        let started = Instant::now();
        let (mut sums, mut seen, mut steps_done) = ([0.0f64; 3], 0usize, 0usize);
        let mut step_accumulate = accumulate;
        let mut data_wait = std::time::Duration::ZERO;
        let batches = Waited {
            inner: train.epoch(run.config.seed, epoch, true, mosaic),
            waited: &mut data_wait,
        };
        for (i, batch) in batches.enumerate() {
            if cancelled() {
                run.save("last", epoch - 1)?;
                return Err(Error::Cancelled {
                    reason: format!("cancelled at epoch {epoch}, step {i}"),
                });
            }
            let n = batch.shapes.len();
            // BatchNorm cannot train on one image whose last feature map is
            // 1x1; a lone leftover is dropped (batch_size is at least 2).
            if n < 2 {
                continue;
            }
            let ni = i + nb * e0 as usize;
            if nw > 0 && ni <= nw {
                let x = ni as f64;
                step_accumulate = interp(x, nw as f64, 1.0, accumulate as f64)
                    .round_ties_even()
                    .max(1.0) as usize;
                for group in groups {
                    let start = if group == ParamGroup::Bias {
                        warmup_bias_lr
                    } else {
                        0.0
                    };
                    let target = lr0 * lr_factor(e0, epochs, run.config.lrf);
                    run.optimizer
                        .set_group_lr(group, interp(x, nw as f64, start, target));
                }
                run.optimizer.set_momentum(interp(
                    x,
                    nw as f64,
                    run.config.warmup_momentum,
                    momentum,
                ));
            }
            let (xs, targets) = run.tensors(&batch)?;
            let raw = run.model.forward_t(&xs, true);
            let (loss, parts) = run.loss.compute(&raw, &targets);
            let total = parts.box_loss + parts.cls_loss + parts.dfl_loss;
            if !total.is_finite() {
                return Err(Error::invalid(
                    "config.lr",
                    format!(
                        "training diverged (loss {total}) at epoch {epoch}, step {i}; try a lower learning rate or other initial weights"
                    ),
                ));
            }
            run.optimizer.accumulate(&loss)?;
            if ni as i64 - last_opt_step >= step_accumulate as i64 {
                run.optimizer.step_accumulated(Some(MAX_GRAD_NORM))?;
                run.ema.update(&run.vs)?;
                last_opt_step = ni as i64;
            }
            sums[0] += parts.box_loss;
            sums[1] += parts.cls_loss;
            sums[2] += parts.dfl_loss;
            steps_done += 1;
            seen += n;
            let step_progress = StepProgress {
                epoch,
                epochs,
                step: i + 1,
                steps: nb,
                loss: (sums[0] + sums[1] + sums[2]) / steps_done as f64,
            };
            progress.step_finished(&step_progress);
            if let Some(on_step) = on_step.as_mut() {
                on_step(step_progress);
            }
        }
        let train_seconds = started.elapsed().as_secs_f64();
        let (val_parts, metrics) = run.evaluate(&val, epoch)?;
        let epoch_seconds = started.elapsed().as_secs_f64();
        let steps = steps_done.max(1) as f64;
        let fitness = metrics.fitness();
        let report = BTreeMap::from([
            ("epoch".to_owned(), f64::from(epoch)),
            ("loss".to_owned(), (sums[0] + sums[1] + sums[2]) / steps),
            ("box_loss".to_owned(), sums[0] / steps),
            ("cls_loss".to_owned(), sums[1] / steps),
            ("dfl_loss".to_owned(), sums[2] / steps),
            (
                "val_loss".to_owned(),
                val_parts.box_loss + val_parts.cls_loss + val_parts.dfl_loss,
            ),
            ("val_box_loss".to_owned(), val_parts.box_loss),
            ("val_cls_loss".to_owned(), val_parts.cls_loss),
            ("val_dfl_loss".to_owned(), val_parts.dfl_loss),
            ("precision".to_owned(), metrics.precision),
            ("recall".to_owned(), metrics.recall),
            ("map50".to_owned(), metrics.map50),
            ("map".to_owned(), metrics.map),
            ("fitness".to_owned(), fitness),
            ("lr".to_owned(), run.optimizer.group_lr(ParamGroup::Weights)),
            ("epoch_seconds".to_owned(), epoch_seconds),
            (
                "images_per_second".to_owned(),
                seen as f64 / train_seconds.max(1e-9),
            ),
            ("skipped_images".to_owned(), skipped as f64),
            ("data_wait_seconds".to_owned(), data_wait.as_secs_f64()),
        ]);
        run.history.push(report.clone());
        let improved = fitness > run.best_fitness;
        if improved {
            run.best_fitness = fitness;
        }
        let last = run.save("last", epoch)?;
        close_epoch(
            run.output,
            &last,
            improved,
            progress,
            &EpochReport {
                epoch,
                epochs,
                metrics: report,
            },
        )?;
    }
    Ok(summary(&spec.output_dir, epochs, &run.history))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    #[test]
    fn the_schedule_decays_linearly_to_lrf() {
        assert!((lr_factor(0, 10, 0.01) - 1.0).abs() < 1e-12);
        assert!((lr_factor(10, 10, 0.01) - 0.01).abs() < 1e-12);
        assert!((lr_factor(5, 10, 0.01) - 0.505).abs() < 1e-12);
    }

    #[test]
    fn auto_picks_adamw_with_a_fitted_rate_for_short_runs() {
        let config = TrainConfig::defaults_for(Task::Detect);
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
