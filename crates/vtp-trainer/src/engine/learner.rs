//! The one training loop every task shares.
//!
//! A task ([`Task`]: classify, detect, whatever comes next) says what a
//! step's loss is, how validation scores a model, and what its checkpoint
//! holds. [`fit`] owns everything else, once: epochs and steps, the
//! learning-rate schedule and its warm-up, gradient accumulation and
//! clipping, the NaN guard, `last`/`best` checkpoint sets, resume, cancel,
//! and step and epoch progress. Adding a task means implementing [`Task`]
//! (and a setup that builds it), with no edit here.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use tch::Tensor;
use tch::nn::VarStore;
use vtp_core::{EpochReport, Error, ProgressSink, Result, TrainConfig, TrainSpec, TrainSummary};

use super::amp::{Amp, GradScaler};
use super::checkpoint::{self, Checkpoint, CheckpointMeta, ClassReport, InitReport};
use super::optim::{Optimizer, ParamGroup};
use super::torch_err;

pub use vtp_core::StepProgress;

/// Called after every step (for progress bars).
pub(crate) type OnStep = Option<Box<dyn FnMut(StepProgress) + Send>>;

/// One task's part of a training run.
pub(crate) trait Task {
    /// One batch of training data.
    type Batch;

    /// What `vtp_core::Task` this is, as checkpoints record it.
    const TASK: vtp_core::Task;

    /// Images in `batch`.
    fn batch_len(batch: &Self::Batch) -> usize;

    /// The model's name as checkpoints record it, and its class names: a
    /// checkpoint of another model or class set is not resumed.
    fn identity(&self) -> (&str, &[String]);

    /// The training loss of `batch`: the tensor to back-propagate, and its
    /// named parts as numbers (their sum is the loss). The forward pass
    /// runs through `amp` ([`Amp::forward`]) and the loss is computed in
    /// float32 ([`Amp::full`]).
    ///
    /// # Errors
    /// libtorch failures.
    fn loss(&mut self, batch: &Self::Batch, amp: &Amp) -> Result<StepLoss>;

    /// After every optimizer step (a moving average of the weights).
    ///
    /// # Errors
    /// libtorch failures.
    fn stepped(&mut self) -> Result<()> {
        Ok(())
    }

    /// Validation after `epoch`: its metrics, and the fitness that decides
    /// `best` (higher is better).
    ///
    /// # Errors
    /// No readable validation image; libtorch failures.
    fn evaluate(&self, epoch: u32) -> Result<Evaluation>;

    /// Saves the checkpoint set `stem` for `record`.
    ///
    /// # Errors
    /// I/O and libtorch failures.
    fn save(&self, stem: &str, record: &Record<'_>) -> Result<CheckpointMeta>;

    /// Loads the weights (and any state of the task's own) of `checkpoint`,
    /// already known to be of this model and class set; the loop restores
    /// the optimizer, the history and the best fitness.
    ///
    /// # Errors
    /// A checkpoint that lacks what the task needs to go on.
    fn resume(&mut self, checkpoint: &Checkpoint, optimizer: &mut Optimizer) -> Result<()>;
}

/// The training batches of a task, epoch by epoch.
pub(crate) trait TrainData<B> {
    /// Batches per epoch.
    fn batches(&self) -> usize;

    /// The batches of `epoch` (1-based) of `epochs`, shuffled by the run's seed.
    fn epoch(&self, epoch: u32, epochs: u32) -> Box<dyn Iterator<Item = B> + '_>;
}

/// A step's loss: the tensor to back-propagate and its parts.
pub(crate) struct StepLoss {
    pub(crate) loss: Tensor,
    /// Named parts (`loss` alone when the loss has no parts); reported per
    /// epoch as their mean over the steps.
    pub(crate) parts: Vec<(&'static str, f64)>,
}

/// What validation found.
pub(crate) struct Evaluation {
    pub(crate) metrics: BTreeMap<String, f64>,
    /// Higher is better; an epoch that raises it is saved as `best`.
    pub(crate) fitness: f64,
    /// The metric per class, for the sidecar.
    pub(crate) per_class: Option<ClassReport>,
}

/// What a checkpoint records of the run beside the task's own state.
pub(crate) struct Record<'a> {
    pub(crate) config: &'a TrainConfig,
    pub(crate) epoch: u32,
    pub(crate) history: &'a [BTreeMap<String, f64>],
    pub(crate) best: f64,
    /// The epoch that reached `best`.
    pub(crate) best_epoch: Option<u32>,
    pub(crate) init: Option<&'a InitReport>,
    /// The last validation's per-class report.
    pub(crate) per_class: Option<&'a ClassReport>,
    pub(crate) optimizer: &'a Optimizer,
}

impl Record<'_> {
    /// The sidecar fields every task fills alike; the task sets the rest.
    pub(crate) fn meta(
        &self,
        task: vtp_core::Task,
        model: &str,
        class_names: &[String],
    ) -> CheckpointMeta {
        CheckpointMeta {
            format: checkpoint::FORMAT.into(),
            task,
            model: model.to_owned(),
            class_names: class_names.to_vec(),
            image_size: self.config.image_size,
            mean: [0.0; 3],
            std: [1.0; 3],
            stride: None,
            config: self.config.clone(),
            epoch: self.epoch,
            metrics: self.history.last().cloned().unwrap_or_default(),
            history: self.history.to_vec(),
            best_val_accuracy: 0.0,
            best_fitness: None,
            best_epoch: self.best_epoch,
            init_weights: self.init.cloned(),
            per_class: self.per_class.cloned(),
            ema_updates: None,
            weights: String::new(),
            sha256: String::new(),
            optimizer: None,
            optimizer_sha256: None,
        }
    }
}

/// How the learning rate decays over the run, as a factor of the initial one
/// at the start of each epoch.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Decay {
    /// Half a cosine from 1 towards 0.
    Cosine,
    /// Linear from 1 to `lrf` (Ultralytics' default `lf`).
    Linear { lrf: f64 },
}

impl Decay {
    /// The factor for 0-based epoch `epoch0` of `epochs`.
    pub(crate) fn factor(self, epoch0: u32, epochs: u32) -> f64 {
        let progress = f64::from(epoch0) / f64::from(epochs);
        match self {
            Decay::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
            Decay::Linear { lrf } => (1.0 - progress).max(0.0) * (1.0 - lrf) + lrf,
        }
    }
}

/// A warm-up at the start of the run (Ultralytics'): over its steps the
/// learning rates rise linearly to the schedule's (biases fall from their
/// own), momentum rises to the optimizer's, and the gradient accumulation
/// grows to the recipe's.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Warmup {
    pub(crate) epochs: f64,
    pub(crate) bias_lr: f64,
    pub(crate) momentum: f64,
}

/// How the loop steps: the schedule, warm-up, accumulation and clipping.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Recipe {
    /// The initial learning rate.
    pub(crate) lr0: f64,
    /// The optimizer's momentum after any warm-up.
    pub(crate) momentum: f64,
    pub(crate) decay: Decay,
    pub(crate) warmup: Option<Warmup>,
    /// Batches whose gradients are summed before a step.
    pub(crate) accumulate: usize,
    /// The gradient norm each step is clipped to.
    pub(crate) max_grad_norm: Option<f64>,
}

impl Recipe {
    /// One step per batch, cosine decay from `lr0`, no warm-up or clipping.
    pub(crate) fn plain(lr0: f64, momentum: f64) -> Self {
        Recipe {
            lr0,
            momentum,
            decay: Decay::Cosine,
            warmup: None,
            accumulate: 1,
            max_grad_norm: None,
        }
    }
}

/// A task ready to train: its model, data, optimizer and recipe.
pub(crate) struct Setup<T: Task> {
    pub(crate) task: T,
    /// Where the model's weights live.
    pub(crate) device: tch::Device,
    pub(crate) config: TrainConfig,
    pub(crate) train: Box<dyn TrainData<T::Batch>>,
    pub(crate) optimizer: Optimizer,
    pub(crate) recipe: Recipe,
    /// Images the loaders skipped as corrupt.
    pub(crate) skipped: usize,
    /// How the initial weights loaded, if the job named any.
    pub(crate) init: Option<InitReport>,
}

/// Serialises seeding and weight initialisation across threads.
static INIT_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Runs `init` (which creates weights) with libtorch's process-wide
/// generator seeded by `seed`, under a lock, so trainers running side by
/// side (tests, a service with concurrency > 1) still get the initial
/// weights their seed names.
pub(crate) fn seeded_init<T>(seed: u64, init: impl FnOnce() -> T) -> T {
    let _guard = INIT_LOCK
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    // libtorch seeds are i64; the bits are reinterpreted.
    tch::manual_seed(i64::from_ne_bytes(seed.to_ne_bytes()));
    init()
}

/// Copies every tensor of `named` whose name and shape match a variable of
/// `vs`, and says which did not. This is how initial weights with another
/// class count start a run: everything but the class head transfers.
///
/// # Errors
/// libtorch failures.
pub(crate) fn load_matching(vs: &VarStore, named: &[(String, Tensor)]) -> Result<InitReport> {
    let vars = vs.variables();
    let mut report = InitReport {
        of: vars.len(),
        ..InitReport::default()
    };
    let mut seen = std::collections::HashSet::new();
    tch::no_grad(|| -> Result<()> {
        for (name, tensor) in named {
            let Some(var) = vars.get(name) else {
                report.unexpected.push(name.clone());
                continue;
            };
            seen.insert(name.as_str());
            if var.size() != tensor.size() {
                report.mismatched.push(name.clone());
                continue;
            }
            var.shallow_clone()
                .f_copy_(&tensor.to_kind(var.kind()).to_device(var.device()))
                .map_err(torch_err)?;
            report.loaded += 1;
        }
        Ok(())
    })?;
    report.missing = vars
        .keys()
        .filter(|name| !seen.contains(name.as_str()))
        .cloned()
        .collect();
    for names in [
        &mut report.missing,
        &mut report.mismatched,
        &mut report.unexpected,
    ] {
        names.sort();
    }
    Ok(report)
}

/// Loads the initial weights the job names (`spec.init_weights`, else
/// `config.init_weights`) into `vs`, every tensor whose name and shape fit;
/// what loaded, for the sidecar.
///
/// # Errors
/// [`Error::InvalidInput`] for a file that is not safetensors or of which no
/// tensor fits `model`.
pub(crate) fn init_weights(
    spec: &TrainSpec,
    config: &TrainConfig,
    vs: &VarStore,
    model: &str,
) -> Result<Option<InitReport>> {
    let path = spec
        .init_weights
        .clone()
        .or_else(|| config.init_weights.as_ref().map(std::path::PathBuf::from));
    let Some(path) = path else {
        return Ok(None);
    };
    let named = Tensor::read_safetensors(&path).map_err(|e| {
        Error::invalid(
            "config.init_weights",
            format!("cannot read {} as safetensors: {e}", path.display()),
        )
    })?;
    let mut report = load_matching(vs, &named)?;
    if report.loaded == 0 {
        return Err(Error::invalid(
            "config.init_weights",
            format!(
                "no tensor of {} fits {model}: is it a {model} state_dict?",
                path.display()
            ),
        ));
    }
    tracing::info!(job_id = %spec.job_id, loaded = report.loaded, of = report.of, strict = report.strict(), "initial weights loaded");
    report.path = config
        .init_weights
        .clone()
        .unwrap_or_else(|| path.display().to_string());
    Ok(Some(report))
}

/// An iterator that adds the time its `next` takes, the training loop's
/// wait for the input pipeline, to `waited` (reported per epoch as
/// `data_wait_seconds`).
struct Waited<'a, I> {
    inner: I,
    waited: &'a mut Duration,
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

fn interp(x: f64, x1: f64, y0: f64, y1: f64) -> f64 {
    if x1 <= 0.0 {
        return y1;
    }
    y0 + (y1 - y0) * (x / x1).clamp(0.0, 1.0)
}

/// The loop's state beside the task: what checkpoints record.
struct Fit<T: Task> {
    task: T,
    config: TrainConfig,
    optimizer: Optimizer,
    history: Vec<BTreeMap<String, f64>>,
    best: f64,
    best_epoch: Option<u32>,
    init: Option<InitReport>,
    per_class: Option<ClassReport>,
}

impl<T: Task> Fit<T> {
    fn save(&self, stem: &str, epoch: u32) -> Result<CheckpointMeta> {
        self.task.save(
            stem,
            &Record {
                config: &self.config,
                epoch,
                history: &self.history,
                best: self.best,
                best_epoch: self.best_epoch,
                init: self.init.as_ref(),
                per_class: self.per_class.as_ref(),
                optimizer: &self.optimizer,
            },
        )
    }

    /// Restores the run from `output`'s `last` set, when resume is on and
    /// one is there: the epoch to start at.
    fn resume(&mut self, spec: &TrainSpec) -> Result<u32> {
        let last = spec.output_dir.join("last.json");
        if !self.config.resume || !last.is_file() {
            return Ok(1);
        }
        let checkpoint = Checkpoint::open(&last)?;
        let (model, classes) = self.task.identity();
        if checkpoint.meta.task != T::TASK
            || checkpoint.meta.model != model
            || checkpoint.meta.class_names != classes
        {
            return Err(Error::invalid(
                "checkpoint",
                "the last checkpoint in the output directory is of another model or class set",
            ));
        }
        self.task.resume(&checkpoint, &mut self.optimizer)?;
        self.history = checkpoint.meta.history.clone();
        self.best = checkpoint
            .meta
            .best_fitness
            .unwrap_or(checkpoint.meta.best_val_accuracy);
        // A sidecar from before `best_epoch` was kept: patience counts from
        // the resumed epoch.
        self.best_epoch = checkpoint.meta.best_epoch.or(Some(checkpoint.meta.epoch));
        let start = checkpoint.meta.epoch + 1;
        tracing::info!(job_id = %spec.job_id, epoch = start, "resuming from the last checkpoint");
        Ok(start)
    }
}

/// Trains `setup` for `spec`: every epoch leaves `last` in the output
/// directory, and `best` when it raised the fitness; with `resume` (the
/// default) a run that finds `last` goes on at the next epoch with its
/// optimizer state.
///
/// # Errors
/// [`Error::Cancelled`] (after saving `last`) when `cancelled` turns true;
/// [`Error::InvalidInput`] when the loss diverges; the task's failures.
pub(crate) fn fit<T: Task>(
    setup: Setup<T>,
    spec: &TrainSpec,
    on_step: &mut OnStep,
    progress: &mut dyn ProgressSink,
    cancelled: &(dyn Fn() -> bool + Sync),
) -> Result<TrainSummary> {
    let Setup {
        task,
        device,
        config,
        train,
        mut optimizer,
        recipe,
        skipped,
        init,
    } = setup;
    let amp = Amp::new(config.amp, device);
    if amp.needs_scaler() {
        optimizer.set_grad_scaler(GradScaler::new(device));
    }
    let mut run = Fit {
        task,
        config,
        optimizer,
        history: Vec::new(),
        best: f64::NEG_INFINITY,
        best_epoch: None,
        init,
        per_class: None,
    };
    let start = run.resume(spec)?;
    let deadline = run
        .config
        .time
        .map(|hours| Instant::now() + Duration::from_secs_f64(hours * 3600.0));
    let time_up = || deadline.is_some_and(|deadline| Instant::now() >= deadline);
    let epochs = run.config.epochs;
    let nb = train.batches();
    // Warm-up leaves at least the final epoch for regular training.
    let nw = recipe.warmup.map_or(0, |w| {
        (w.epochs.min(f64::from(epochs.saturating_sub(1))) * nb as f64).round() as usize
    });
    let groups = [ParamGroup::Bias, ParamGroup::Weights, ParamGroup::Norm];
    // Gradients accumulate across batches (and, as in Ultralytics, across an
    // epoch's end) until `step_accumulate` batches have passed. A resumed run
    // starts a fresh accumulation, as Ultralytics' resume does.
    let mut last_opt_step: i64 = -1;
    for epoch in start..=epochs {
        let e0 = epoch - 1;
        let scheduled = recipe.lr0 * recipe.decay.factor(e0, epochs);
        // The schedule steps at the start of each epoch, as PyTorch's
        // LambdaLR does; warm-up overrides it inside its window.
        run.optimizer.set_lr(scheduled);
        let started = Instant::now();
        let mut sums: Vec<(&'static str, f64)> = Vec::new();
        let (mut total, mut seen, mut steps_done) = (0.0, 0usize, 0usize);
        let mut step_accumulate = recipe.accumulate;
        let mut data_wait = Duration::ZERO;
        let batches = Waited {
            inner: train.epoch(epoch, epochs),
            waited: &mut data_wait,
        };
        for (i, batch) in batches.enumerate() {
            if cancelled() {
                run.save("last", epoch - 1)?;
                return Err(Error::Cancelled {
                    reason: format!("cancelled at epoch {epoch}, step {i}"),
                });
            }
            let n = T::batch_len(&batch);
            // BatchNorm cannot train on one image (nor a detector on one
            // whose last feature map is 1x1); a lone leftover is dropped.
            if n < 2 {
                continue;
            }
            let ni = i + nb * e0 as usize;
            if let Some(warmup) = recipe.warmup
                && nw > 0
                && ni <= nw
            {
                let x = ni as f64;
                step_accumulate = interp(x, nw as f64, 1.0, recipe.accumulate as f64)
                    .round_ties_even()
                    .max(1.0) as usize;
                for group in groups {
                    let from = if group == ParamGroup::Bias {
                        warmup.bias_lr
                    } else {
                        0.0
                    };
                    run.optimizer
                        .set_group_lr(group, interp(x, nw as f64, from, scheduled));
                }
                run.optimizer
                    .set_momentum(interp(x, nw as f64, warmup.momentum, recipe.momentum));
            }
            let step = run.task.loss(&batch, &amp)?;
            let step_total: f64 = step.parts.iter().map(|(_, v)| v).sum();
            if !step_total.is_finite() {
                return Err(Error::invalid(
                    "config.lr",
                    format!(
                        "training diverged (loss {step_total}) at epoch {epoch}, step {i}; try a lower learning rate or other initial weights"
                    ),
                ));
            }
            run.optimizer.accumulate(&step.loss)?;
            if ni as i64 - last_opt_step >= step_accumulate as i64 {
                run.optimizer.step_accumulated(recipe.max_grad_norm)?;
                run.task.stepped()?;
                last_opt_step = ni as i64;
            }
            if sums.is_empty() {
                sums = step.parts.iter().map(|&(name, _)| (name, 0.0)).collect();
            }
            for ((_, sum), (_, value)) in sums.iter_mut().zip(&step.parts) {
                *sum += value;
            }
            total += step_total;
            steps_done += 1;
            seen += n;
            let step_progress = StepProgress {
                epoch,
                epochs,
                step: i + 1,
                steps: nb,
                loss: total / steps_done as f64,
            };
            progress.step_finished(&step_progress);
            if let Some(on_step) = on_step.as_mut() {
                on_step(step_progress);
            }
            // Out of time: the epoch ends here, is validated and saved.
            if time_up() {
                break;
            }
        }
        let train_seconds = started.elapsed().as_secs_f64();
        let evaluation = run.task.evaluate(epoch)?;
        let epoch_seconds = started.elapsed().as_secs_f64();
        let steps = steps_done.max(1) as f64;
        let mut metrics = evaluation.metrics;
        run.per_class = evaluation.per_class;
        for (name, sum) in sums {
            metrics.insert(name.to_owned(), sum / steps);
        }
        metrics.extend([
            ("epoch".to_owned(), f64::from(epoch)),
            ("loss".to_owned(), total / steps),
            ("lr".to_owned(), run.optimizer.group_lr(ParamGroup::Weights)),
            ("epoch_seconds".to_owned(), epoch_seconds),
            (
                "images_per_second".to_owned(),
                seen as f64 / train_seconds.max(1e-9),
            ),
            ("skipped_images".to_owned(), skipped as f64),
            ("data_wait_seconds".to_owned(), data_wait.as_secs_f64()),
        ]);
        if let Some(scaler) = run.optimizer.grad_scaler() {
            metrics.insert("amp_scale".to_owned(), scaler.scale_value()?);
            metrics.insert("amp_skipped_steps".to_owned(), scaler.skipped() as f64);
        }
        run.history.push(metrics.clone());
        let improved = evaluation.fitness > run.best;
        // Ultralytics' early stopping also moves the best epoch while the
        // fitness is still zero (the first epochs of a detector).
        if improved || run.best <= 0.0 {
            run.best_epoch = Some(epoch);
        }
        if improved {
            run.best = evaluation.fitness;
        }
        let last = run.save("last", epoch)?;
        if improved {
            checkpoint::copy_as(&spec.output_dir, &last, "best")?;
        }
        progress.epoch_finished(&EpochReport {
            epoch,
            epochs,
            metrics,
        });
        // A limit reached in the last epoch cuts nothing short.
        if epoch < epochs
            && let Some(reason) = stop_reason(&run.config, epoch, run.best_epoch, time_up())
        {
            tracing::info!(job_id = %spec.job_id, epoch, %reason, "stopping early");
            return Ok(summary(&spec.output_dir, epoch, &run.history, Some(reason)));
        }
    }
    Ok(summary(&spec.output_dir, epochs, &run.history, None))
}

/// Why the run stops after `epoch`, if it does: `patience` epochs without a
/// better fitness than at `best_epoch` (Ultralytics' `EarlyStopping`), or
/// the `time` limit reached.
fn stop_reason(
    config: &TrainConfig,
    epoch: u32,
    best_epoch: Option<u32>,
    time_up: bool,
) -> Option<String> {
    if let (Some(patience @ 1..), Some(best_epoch)) = (config.patience, best_epoch)
        && epoch - best_epoch.min(epoch) >= patience
    {
        return Some(format!(
            "stopped early after epoch {epoch}: no better validation fitness than epoch {best_epoch}'s in {patience} epochs (patience {patience})"
        ));
    }
    if time_up {
        let hours = config.time.unwrap_or_default();
        return Some(format!(
            "stopped after epoch {epoch} of {}: the time limit of {hours} h ran out",
            config.epochs
        ));
    }
    None
}

/// What a finished run leaves: `best` if an epoch made one, else `last`,
/// with the final epoch's metrics and that checkpoint's validation per
/// class, its classes named (from the set's sidecar).
fn summary(
    output: &Path,
    epochs: u32,
    history: &[BTreeMap<String, f64>],
    stopped: Option<String>,
) -> TrainSummary {
    let best = output.join("best.safetensors");
    let stem = if best.is_file() { "best" } else { "last" };
    let per_class = match CheckpointMeta::read(&output.join(format!("{stem}.json"))) {
        Ok(meta) => meta
            .per_class
            .and_then(|report| report.named(&meta.class_names)),
        Err(e) => {
            tracing::warn!(error = %e, "the final report goes without validation per class");
            None
        }
    };
    TrainSummary {
        epochs,
        checkpoint: output.join(format!("{stem}.safetensors")),
        metrics: history.last().cloned().unwrap_or_default(),
        stopped,
        per_class,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_decay_falls_from_one_to_lrf() {
        let decay = Decay::Linear { lrf: 0.01 };
        assert!((decay.factor(0, 10) - 1.0).abs() < 1e-12);
        assert!((decay.factor(10, 10) - 0.01).abs() < 1e-12);
        assert!((decay.factor(5, 10) - 0.505).abs() < 1e-12);
    }

    #[test]
    fn cosine_decay_is_half_a_cosine() {
        assert!((Decay::Cosine.factor(0, 4) - 1.0).abs() < 1e-12);
        assert!((Decay::Cosine.factor(2, 4) - 0.5).abs() < 1e-12);
        assert!(Decay::Cosine.factor(4, 4).abs() < 1e-12);
    }

    #[test]
    fn patience_counts_epochs_since_the_best_and_time_stops_at_once() {
        let config = |patience, time| TrainConfig {
            patience,
            time,
            ..TrainConfig::default()
        };
        let patient = config(Some(3), None);
        assert_eq!(stop_reason(&patient, 5, Some(3), false), None);
        let reason = stop_reason(&patient, 6, Some(3), false).unwrap();
        assert!(
            reason.contains("epoch 3") && reason.contains("patience 3"),
            "{reason}"
        );
        // 0 turns it off, as in Ultralytics.
        assert_eq!(
            stop_reason(&config(Some(0), None), 50, Some(1), false),
            None
        );
        assert_eq!(stop_reason(&config(None, None), 50, Some(1), false), None);
        let timed = config(None, Some(0.25));
        assert_eq!(stop_reason(&timed, 2, Some(2), false), None);
        let reason = stop_reason(&timed, 2, Some(2), true).unwrap();
        assert!(reason.contains("0.25 h"), "{reason}");
    }

    #[test]
    fn warm_up_interpolates_and_clamps() {
        assert_eq!(interp(0.0, 10.0, 0.1, 0.9), 0.1);
        assert!((interp(5.0, 10.0, 0.1, 0.9) - 0.5).abs() < 1e-12);
        assert_eq!(interp(20.0, 10.0, 0.1, 0.9), 0.9);
        assert_eq!(interp(3.0, 0.0, 0.1, 0.9), 0.9);
    }
}
