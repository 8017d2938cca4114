//! [`TchTrainer`]: the training loop.

use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::time::Instant;

use tch::nn::{ModuleT, VarStore};
use tch::{Device, Kind, Tensor};
use vtp_core::{EpochReport, Error, ProgressSink, Result, TrainSpec, TrainSummary, Trainer};

use super::checkpoint::{self, Checkpoint, CheckpointMeta};
use super::model::ModelKind;
use super::optim::Optimizer;
use super::{select_device, torch_err};
use crate::data::loader::{MEAN, STD};
use crate::data::{ImageFolder, Loader, LoaderConfig};
use vtp_core::TrainConfig;

/// Serialises seeding and weight initialisation across threads.
static INIT_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// libtorch seeds are i64; reinterpret the bits.
fn run_seed(seed: u64) -> i64 {
    i64::from_ne_bytes(seed.to_ne_bytes())
}

/// Runs `init` (which creates weights) with libtorch's process-wide
/// generator seeded by `seed`, under a lock, so trainers running side by
/// side (tests, a service with concurrency > 1) still get the initial
/// weights their seed names.
pub(crate) fn seeded_init<T>(seed: u64, init: impl FnOnce() -> T) -> T {
    let _guard = INIT_LOCK
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    tch::manual_seed(run_seed(seed));
    init()
}

/// The end of an epoch, shared by the trainers: the `last` checkpoint just
/// saved becomes `best` too when the epoch improved on the best score, then
/// the epoch is reported.
pub(crate) fn close_epoch(
    output: &Path,
    last: &CheckpointMeta,
    improved: bool,
    progress: &mut dyn ProgressSink,
    report: &EpochReport,
) -> Result<()> {
    if improved {
        checkpoint::copy_as(output, last, "best")?;
    }
    progress.epoch_finished(report);
    Ok(())
}

/// What a finished run leaves: `best` if an epoch made one, else `last`,
/// with the final epoch's metrics.
pub(crate) fn summary(
    output: &Path,
    epochs: u32,
    history: &[BTreeMap<String, f64>],
) -> TrainSummary {
    let best = output.join("best.safetensors");
    TrainSummary {
        epochs,
        checkpoint: if best.is_file() {
            best
        } else {
            output.join("last.safetensors")
        },
        metrics: history.last().cloned().unwrap_or_default(),
    }
}

pub use vtp_core::StepProgress;

/// An iterator that adds the time its `next` takes, the training loop's
/// wait for the input pipeline, to `waited` (reported per epoch as
/// `data_wait_seconds`).
pub(crate) struct Waited<'a, I> {
    pub(crate) inner: I,
    pub(crate) waited: &'a mut std::time::Duration,
}

impl<I: Iterator> Iterator for Waited<'_, I> {
    type Item = I::Item;

    fn next(&mut self) -> Option<I::Item> {
        let asked = Instant::now();
        let item = self.inner.next();
        *self.waited += asked.elapsed();
        item
    }
}

/// Trains image classifiers with libtorch.
///
/// The learning rate follows a cosine schedule from `lr` over the epochs.
/// Every epoch leaves `last.*` in the output directory, and `best.*` when
/// validation accuracy improves; with `resume` (the default) a run finds
/// `last` and continues at the next epoch with the optimizer state.
#[derive(Default)]
pub struct TchTrainer {
    on_step: Option<Box<dyn FnMut(StepProgress) + Send>>,
}

impl std::fmt::Debug for TchTrainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TchTrainer")
            .field("on_step", &self.on_step.is_some())
            .finish()
    }
}

impl TchTrainer {
    /// A trainer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Calls `f` after every step (for progress bars).
    #[must_use]
    pub fn on_step(mut self, f: impl FnMut(StepProgress) + Send + 'static) -> Self {
        self.on_step = Some(Box::new(f));
        self
    }
}

impl Trainer for TchTrainer {
    fn train(
        &mut self,
        spec: &TrainSpec,
        progress: &mut dyn ProgressSink,
        cancelled: &(dyn Fn() -> bool + Sync),
    ) -> Result<TrainSummary> {
        // libtorch reports some failures (shape mismatches, OOM) by panicking
        // through tch; keep them inside this job.
        match std::panic::catch_unwind(AssertUnwindSafe(|| run(self, spec, progress, cancelled))) {
            Ok(result) => result,
            Err(panic) => {
                let message = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                    .unwrap_or_else(|| "unknown panic".to_owned());
                Err(Error::backend("libtorch", message))
            }
        }
    }
}

struct Run<'a> {
    config: TrainConfig,
    classes: Vec<String>,
    output: &'a Path,
    device: Device,
    vs: VarStore,
    model: Box<dyn ModuleT>,
    optimizer: Optimizer,
    history: Vec<BTreeMap<String, f64>>,
    best: f64,
}

impl Run<'_> {
    fn meta(&self, epoch: u32) -> CheckpointMeta {
        CheckpointMeta {
            format: checkpoint::FORMAT.into(),
            task: vtp_core::Task::Classify,
            stride: None,
            best_fitness: None,
            ema_updates: None,
            model: self
                .config
                .model
                .parse::<ModelKind>()
                .map(|k| k.name().to_owned())
                .unwrap_or_default(),
            class_names: self.classes.clone(),
            image_size: self.config.image_size,
            mean: MEAN,
            std: STD,
            config: self.config.clone(),
            epoch,
            metrics: self.history.last().cloned().unwrap_or_default(),
            history: self.history.clone(),
            best_val_accuracy: self.best,
            weights: String::new(),
            sha256: String::new(),
            optimizer: None,
            optimizer_sha256: None,
        }
    }

    fn save(&self, stem: &str, epoch: u32) -> Result<CheckpointMeta> {
        checkpoint::save(
            self.output,
            stem,
            &self.vs,
            Some(&self.optimizer),
            self.meta(epoch),
        )
    }

    fn batch_tensors(&self, images: &[f32], labels: &[i64]) -> Result<(Tensor, Tensor)> {
        let s = i64::from(self.config.image_size);
        let n = labels.len() as i64;
        let xs = Tensor::from_slice(images)
            .f_view([n, 3, s, s])
            .map_err(torch_err)?
            .f_to_device(self.device)
            .map_err(torch_err)?;
        let ys = Tensor::from_slice(labels)
            .f_to_device(self.device)
            .map_err(torch_err)?;
        Ok((xs, ys))
    }

    fn evaluate(&self, val: &Loader, epoch: u32) -> Result<(f64, f64)> {
        let (mut loss, mut correct, mut seen) = (0.0, 0i64, 0usize);
        tch::no_grad(|| -> Result<()> {
            for batch in val.epoch(self.config.seed, epoch, false) {
                let (xs, ys) = self.batch_tensors(&batch.images, &batch.labels)?;
                let logits = self.model.forward_t(&xs, false);
                let batch_loss = logits
                    .f_cross_entropy_loss::<Tensor>(&ys, None, tch::Reduction::Sum, -100, 0.0)
                    .map_err(torch_err)?;
                loss += batch_loss.f_double_value(&[]).map_err(torch_err)?;
                let hits = logits
                    .f_argmax(-1, false)
                    .map_err(torch_err)?
                    .f_eq_tensor(&ys)
                    .map_err(torch_err)?;
                correct += hits
                    .f_sum(Kind::Int64)
                    .map_err(torch_err)?
                    .f_int64_value(&[])
                    .map_err(torch_err)?;
                seen += batch.len();
            }
            Ok(())
        })?;
        if seen == 0 {
            return Err(Error::invalid("dataset", "no readable validation images"));
        }
        Ok((loss / seen as f64, correct as f64 / seen as f64))
    }
}

fn run(
    trainer: &mut TchTrainer,
    spec: &TrainSpec,
    progress: &mut dyn ProgressSink,
    cancelled: &(dyn Fn() -> bool + Sync),
) -> Result<TrainSummary> {
    let config = TrainConfig::from_json(&spec.config)?;
    if config.task()? == vtp_core::Task::Detect {
        return super::detect::train::run(&mut trainer.on_step, spec, config, progress, cancelled);
    }
    let kind = config.model.parse::<ModelKind>()?;
    let device = select_device(&config.device)?;
    tch::set_num_threads(i32::try_from(config.effective_threads()).unwrap_or(1));

    let data = ImageFolder::open(&spec.dataset_dir, config.val_split, config.seed)?;
    // Policy: a few corrupt images (1%, at least one) are skipped and counted.
    let total = data.train.len() + data.val.len();
    let max_corrupt = (total / 100).max(1);
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
    let skipped = train.prepare()? + val.prepare()?;
    if skipped > max_corrupt {
        let mut corrupt = train.corrupt_paths();
        corrupt.extend(val.corrupt_paths());
        let first = corrupt
            .first()
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        return Err(Error::invalid(
            "dataset",
            format!(
                "{skipped} corrupt images of {total} (at most {max_corrupt} tolerated); first: {first}"
            ),
        ));
    }
    tracing::info!(job_id = %spec.job_id, model = %kind, classes = data.classes.len(), train = train.len(), val = val.len(), skipped, ?device, "training");

    let (vs, model) = seeded_init(config.seed, || {
        let vs = VarStore::new(device);
        let model = kind.build(&vs.root(), data.classes.len() as i64);
        (vs, model)
    });
    let params: Vec<(String, Tensor)> = vs
        .variables()
        .into_iter()
        .filter(|(_, t)| t.requires_grad())
        .collect();
    // `auto` is SGD for classification.
    let optimizer_kind = match config.optimizer {
        vtp_core::OptimizerKind::Auto => vtp_core::OptimizerKind::Sgd,
        kind => kind,
    };
    let optimizer = Optimizer::new(
        optimizer_kind,
        config.lr,
        config.momentum,
        config.weight_decay,
        params,
    );
    let mut run = Run {
        config,
        classes: data.classes,
        output: &spec.output_dir,
        device,
        vs,
        model,
        optimizer,
        history: Vec::new(),
        best: f64::NEG_INFINITY,
    };

    let mut start = 1;
    let last = spec.output_dir.join("last.json");
    if run.config.resume && last.is_file() {
        let checkpoint = Checkpoint::open(&last)?;
        if checkpoint.meta.model != kind.name() || checkpoint.meta.class_names != run.classes {
            return Err(Error::invalid(
                "checkpoint",
                "the last checkpoint in the output directory is of another model or class set",
            ));
        }
        checkpoint.load_weights(&mut run.vs)?;
        checkpoint.load_optimizer(&mut run.optimizer)?;
        run.history = checkpoint.meta.history.clone();
        run.best = checkpoint.meta.best_val_accuracy;
        start = checkpoint.meta.epoch + 1;
        tracing::info!(job_id = %spec.job_id, epoch = start, "resuming from the last checkpoint");
    }

    let epochs = run.config.epochs;
    for epoch in start..=epochs {
        let lr = run.config.lr
            * 0.5
            * (1.0 + (std::f64::consts::PI * f64::from(epoch - 1) / f64::from(epochs)).cos());
        run.optimizer.set_lr(lr);
        let started = Instant::now();
        let steps = train.batches();
        let (mut loss_sum, mut seen) = (0.0, 0usize);
        let mut data_wait = std::time::Duration::ZERO;
        let batches = Waited {
            inner: train.epoch(run.config.seed, epoch, true),
            waited: &mut data_wait,
        };
        for (step, batch) in batches.enumerate() {
            if cancelled() {
                run.save("last", epoch - 1)?;
                return Err(Error::Cancelled {
                    reason: format!("cancelled at epoch {epoch}, step {step}"),
                });
            }
            // BatchNorm cannot train on one image; a lone leftover is dropped.
            if batch.len() < 2 {
                continue;
            }
            let (xs, ys) = run.batch_tensors(&batch.images, &batch.labels)?;
            let logits = run.model.forward_t(&xs, true);
            let loss = logits
                .f_cross_entropy_loss::<Tensor>(&ys, None, tch::Reduction::Mean, -100, 0.0)
                .map_err(torch_err)?;
            run.optimizer.backward_step(&loss)?;
            let value = loss.f_double_value(&[]).map_err(torch_err)?;
            if !value.is_finite() {
                return Err(Error::invalid(
                    "config.lr",
                    format!(
                        "training diverged (loss {value}) at epoch {epoch}, step {step}; try a lower learning rate"
                    ),
                ));
            }
            loss_sum += value * batch.len() as f64;
            seen += batch.len();
            let step_progress = StepProgress {
                epoch,
                epochs,
                step: step + 1,
                steps,
                loss: loss_sum / seen as f64,
            };
            progress.step_finished(&step_progress);
            if let Some(on_step) = trainer.on_step.as_mut() {
                on_step(step_progress);
            }
        }
        let train_seconds = started.elapsed().as_secs_f64();
        let (val_loss, val_accuracy) = run.evaluate(&val, epoch)?;
        let epoch_seconds = started.elapsed().as_secs_f64();
        let metrics = BTreeMap::from([
            ("epoch".to_owned(), f64::from(epoch)),
            ("loss".to_owned(), loss_sum / seen.max(1) as f64),
            ("val_loss".to_owned(), val_loss),
            ("val_accuracy".to_owned(), val_accuracy),
            ("accuracy".to_owned(), val_accuracy),
            ("lr".to_owned(), lr),
            ("epoch_seconds".to_owned(), epoch_seconds),
            (
                "images_per_second".to_owned(),
                seen as f64 / train_seconds.max(1e-9),
            ),
            ("skipped_images".to_owned(), skipped as f64),
            ("data_wait_seconds".to_owned(), data_wait.as_secs_f64()),
        ]);
        run.history.push(metrics.clone());
        let improved = val_accuracy > run.best;
        if improved {
            run.best = val_accuracy;
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
                metrics,
            },
        )?;
    }
    Ok(summary(&spec.output_dir, epochs, &run.history))
}
