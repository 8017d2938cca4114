//! The training engine on generated images: it learns, it is reproducible,
//! it resumes, it cancels, and its checkpoints load in PyTorch.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use vtp_core::{EpochReport, Error, JobId, ProgressSink, TrainSpec, Trainer};
use vtp_trainer::engine::{Checkpoint, ModelKind, Predictor, TchTrainer};
use vtp_trainer::testing::shapes_dataset;

/// libtorch's thread pool is process-wide: two trainings running at once in
/// one process split it differently and their float reductions (and so the
/// bits of their losses) differ. These tests train one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[derive(Default)]
struct Recorder(Vec<EpochReport>);

impl ProgressSink for Recorder {
    fn epoch_finished(&mut self, report: &EpochReport) {
        self.0.push(report.clone());
    }
}

fn spec(dataset: &Path, output: &Path, config: serde_json::Value) -> TrainSpec {
    TrainSpec {
        job_id: JobId::new(),
        config,
        dataset_dir: dataset.to_path_buf(),
        output_dir: output.to_path_buf(),
        init_weights: None,
    }
}

fn config(epochs: u32) -> serde_json::Value {
    serde_json::json!({"model": "small_cnn", "epochs": epochs, "batch_size": 16, "lr": 0.05, "image_size": 16,
                       "threads": 2, "workers": 2, "seed": 7, "hflip": false})
}

fn train(spec: &TrainSpec) -> (vtp_core::Result<vtp_core::TrainSummary>, Vec<EpochReport>) {
    let mut recorder = Recorder::default();
    let result = TchTrainer::new().train(spec, &mut recorder, &|| false);
    (result, recorder.0)
}

fn dataset() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("shapes");
    shapes_dataset(&data, 40, 3);
    (dir, data)
}

#[test]
fn it_learns_and_checkpoints_predict() {
    let _serial = serial();
    let (dir, data) = dataset();
    let out = dir.path().join("out");
    let (summary, reports) = train(&spec(&data, &out, config(4)));
    let summary = summary.unwrap();
    assert_eq!(reports.len(), 4);
    let first = &reports[0].metrics;
    let last = &reports[3].metrics;
    assert!(
        last["loss"] < first["loss"] * 0.7,
        "loss falls: {} -> {}",
        first["loss"],
        last["loss"]
    );
    assert!(
        last["val_accuracy"] >= 0.8,
        "well above chance (0.33): {last:?}"
    );
    for key in ["val_loss", "epoch_seconds", "images_per_second", "lr"] {
        assert!(last[key].is_finite() && last[key] > 0.0, "{key}: {last:?}");
    }

    // The checkpoint round trip: sidecar, digest, and predictions.
    assert!(summary.checkpoint.ends_with("best.safetensors"));
    let checkpoint = Checkpoint::open(&summary.checkpoint).unwrap();
    assert_eq!(checkpoint.meta.class_names, ["disc", "square", "stripes"]);
    assert!(checkpoint.meta.best_val_accuracy >= 0.8);
    // Per class: accuracy and the confusion matrix of the best epoch, which
    // agree with its accuracy; top-5 of 3 classes is every image.
    let per_class = checkpoint.meta.per_class.as_ref().unwrap();
    assert_eq!(per_class.metric, "accuracy");
    assert_eq!(per_class.values.len(), 3);
    let confusion = per_class.confusion.as_ref().unwrap();
    let seen: u64 = confusion.iter().flatten().sum();
    let correct: u64 = (0..3).map(|c| confusion[c][c]).sum();
    let accuracy = checkpoint.meta.metrics["val_accuracy"];
    assert!((correct as f64 / seen as f64 - accuracy).abs() < 1e-12);
    for (c, row) in confusion.iter().enumerate() {
        let class_accuracy = per_class.values[c].unwrap();
        assert!((row[c] as f64 / row.iter().sum::<u64>() as f64 - class_accuracy).abs() < 1e-12);
    }
    assert_eq!(checkpoint.meta.metrics["val_top5_accuracy"], 1.0);
    // The final report carries the same, its classes named.
    let reported = summary.per_class.as_ref().unwrap();
    assert_eq!(reported.classes, ["disc", "square", "stripes"]);
    assert_eq!(
        (&reported.values, &reported.confusion),
        (&per_class.values, &per_class.confusion)
    );
    let predictor = Predictor::load(&out).unwrap();
    let files: Vec<PathBuf> = ["disc/0.png", "square/0.png", "stripes/0.png"]
        .iter()
        .map(|f| data.join(f))
        .collect();
    let predictions = predictor.predict_paths(&files).unwrap();
    let correct = predictions
        .iter()
        .zip(["disc", "square", "stripes"])
        .filter(|(p, c)| p.class == *c)
        .count();
    assert!(correct >= 2, "{predictions:?}");
    assert!(
        predictions
            .iter()
            .all(|p| p.probability > 0.0 && p.probability <= 1.0)
    );

    // A tampered checkpoint is refused.
    std::fs::write(out.join("best.safetensors"), b"garbage").unwrap();
    assert!(matches!(
        Checkpoint::open(&out.join("best.safetensors")),
        Err(Error::InvalidInput { .. })
    ));
}

#[test]
fn the_same_seed_gives_the_same_first_epoch_loss() {
    let _serial = serial();
    let (dir, data) = dataset();
    let (_, a) = train(&spec(&data, &dir.path().join("a"), config(1)));
    let (_, b) = train(&spec(&data, &dir.path().join("b"), config(1)));
    let (la, lb) = (a[0].metrics["loss"], b[0].metrics["loss"]);
    assert!((la - lb).abs() < 1e-6, "{la} vs {lb}");
    let mut other = config(1);
    other["seed"] = 8.into();
    let (_, c) = train(&spec(&data, &dir.path().join("c"), other));
    assert_ne!(la, c[0].metrics["loss"], "another seed, another run");
}

#[test]
fn resume_continues_at_the_next_epoch_with_the_optimizer_state() {
    let _serial = serial();
    let (dir, data) = dataset();
    let out = dir.path().join("out");
    let (_, first) = train(&spec(&data, &out, config(2)));
    assert_eq!(first.iter().map(|r| r.epoch).collect::<Vec<_>>(), [1, 2]);
    let saved = Checkpoint::open(&out.join("last.json")).unwrap();
    assert!(saved.optimizer.is_some(), "optimizer state is saved");

    let (summary, resumed) = train(&spec(&data, &out, config(3)));
    summary.unwrap();
    assert_eq!(
        resumed.iter().map(|r| r.epoch).collect::<Vec<_>>(),
        [3],
        "only epoch 3 runs"
    );
    let last = Checkpoint::open(&out.join("last.json")).unwrap();
    assert_eq!(last.meta.epoch, 3);
    assert_eq!(last.meta.history.len(), 3);
    assert_eq!(last.meta.history[..2], saved.meta.history[..]);

    // Without the optimizer state the resumed epoch differs: the state matters and was used.
    let out2 = dir.path().join("out2");
    train(&spec(&data, &out2, config(2))).0.unwrap();
    std::fs::remove_file(out2.join("last.optim.safetensors")).unwrap();
    let mut sidecar: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out2.join("last.json")).unwrap()).unwrap();
    sidecar["optimizer"] = serde_json::Value::Null;
    std::fs::write(out2.join("last.json"), sidecar.to_string()).unwrap();
    let (_, cold) = train(&spec(&data, &out2, config(3)));
    assert_ne!(cold[0].metrics["loss"], resumed[0].metrics["loss"]);
}

#[test]
fn cancel_stops_at_the_next_step_and_saves_last() {
    let _serial = serial();
    let (dir, data) = dataset();
    let out = dir.path().join("out");
    let steps = AtomicUsize::new(0);
    let cancelled = || steps.fetch_add(1, Ordering::SeqCst) >= 9;
    let mut recorder = Recorder::default();
    let err = TchTrainer::new()
        .train(&spec(&data, &out, config(5)), &mut recorder, &cancelled)
        .unwrap_err();
    assert!(matches!(err, Error::Cancelled { .. }), "{err:?}");
    assert_eq!(
        recorder.0.len(),
        1,
        "epoch 1 (6 steps) finished, epoch 2 was cut"
    );
    let last = Checkpoint::open(&out.join("last.json")).unwrap();
    assert_eq!(last.meta.epoch, 1);
}

#[test]
fn every_architecture_trains() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("shapes");
    shapes_dataset(&data, 6, 1);
    for kind in ModelKind::ALL {
        let mut c = config(1);
        c["model"] = kind.name().into();
        c["image_size"] = kind.min_image_size().max(32).into();
        c["batch_size"] = 8.into();
        let (summary, reports) = train(&spec(&data, &dir.path().join(kind.name()), c));
        summary.unwrap_or_else(|e| panic!("{kind}: {e}"));
        assert!(reports[0].metrics["loss"].is_finite(), "{kind}");
        assert!(kind.info().parameters.unwrap() > 10_000, "{kind}");
    }
}

#[test]
fn bad_datasets_and_configs_fail_clearly() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let (result, _) = train(&spec(&empty, &dir.path().join("o"), config(1)));
    assert!(
        result
            .unwrap_err()
            .to_string()
            .contains("not an ImageFolder")
    );
    let (result, _) = train(&spec(
        &dir.path().join("missing"),
        &dir.path().join("o"),
        config(1),
    ));
    assert!(result.unwrap_err().to_string().contains("not a directory"));

    let mut bad = config(1);
    bad["model"] = "resnet9000".into();
    let (result, _) = train(&spec(&empty, &dir.path().join("o"), bad));
    assert!(
        matches!(result, Err(Error::InvalidInput { ref field, .. }) if field == "config.model")
    );

    // Every image of a class corrupt: refused before training, naming a file.
    let data = dir.path().join("corrupt");
    shapes_dataset(&data, 4, 2);
    for i in 0..4 {
        let ext = if i % 2 == 0 { "png" } else { "jpg" };
        std::fs::write(data.join(format!("disc/{i}.{ext}")), b"not an image").unwrap();
    }
    let (result, _) = train(&spec(&data, &dir.path().join("o2"), config(1)));
    let err = result.unwrap_err().to_string();
    assert!(err.contains("corrupt") && err.contains("disc"), "{err}");
}

/// Runs `tests/python/{script}` with `args` in the venv's Python (else
/// `python3`) and asserts that it succeeded. Outside the test command
/// (`VTP_REQUIRE_SERVICES` unset), a Python that cannot run or lacks
/// `needs` skips the test: `None`.
fn run_python(
    script: &str,
    args: &[&std::ffi::OsStr],
    needs: &str,
) -> Option<std::process::Output> {
    let python = std::env::var("VIRTUAL_ENV")
        .map(|v| format!("{v}/bin/python"))
        .unwrap_or_else(|_| "python3".into());
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/python")
        .join(script);
    let output = match std::process::Command::new(&python)
        .arg(&script)
        .args(args)
        .output()
    {
        Ok(output) => output,
        Err(e) if std::env::var("VTP_REQUIRE_SERVICES").is_err() => {
            eprintln!("SKIPPED: {python} not runnable ({e}); run scripts/test.sh");
            return None;
        }
        Err(e) => panic!("{python}: {e}"),
    };
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success()
        && stderr.contains("No module named")
        && std::env::var("VTP_REQUIRE_SERVICES").is_err()
    {
        eprintln!("SKIPPED: {needs} is not installed for {python}; run scripts/test.sh");
        return None;
    }
    assert!(output.status.success(), "{stderr}");
    Some(output)
}

/// The checkpoint loads in PyTorch with `safetensors.torch.load_file` and
/// gives the same logits.
#[test]
fn checkpoints_load_in_pytorch_with_the_same_logits() {
    let _serial = serial();
    let (dir, data) = dataset();
    let out = dir.path().join("out");
    train(&spec(&data, &out, config(1))).0.unwrap();
    let predictor = Predictor::load(&out.join("best.safetensors")).unwrap();
    let input: Vec<f32> = (0..2 * 3 * 16 * 16)
        .map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0)
        .collect();
    let ours = predictor.logits(&input).unwrap();
    let input_path = dir.path().join("input.safetensors");
    let tensor = tch::Tensor::from_slice(&input).view([2, 3, 16, 16]);
    tch::Tensor::write_safetensors(&[("input", &tensor)], &input_path).unwrap();

    let Some(output) = run_python(
        "check_checkpoint.py",
        &[
            out.join("best.safetensors").as_os_str(),
            input_path.as_os_str(),
            "3".as_ref(),
        ],
        "PyTorch",
    ) else {
        return;
    };
    let theirs: Vec<Vec<f32>> = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(theirs.len(), ours.len());
    for (a, b) in ours.iter().flatten().zip(theirs.iter().flatten()) {
        assert!((a - b).abs() < 1e-4, "ours {ours:?} vs PyTorch {theirs:?}");
    }
}

/// A panic inside the loop (libtorch reports C++ exceptions, out-of-memory
/// among them, by panicking through tch's infallible ops) fails the run with
/// the message instead of taking the process down.
#[test]
fn a_panic_in_the_loop_is_an_error_not_a_crash() {
    let _serial = serial();
    let (dir, data) = dataset();
    let mut trainer = TchTrainer::new().on_step(|step| {
        if step.step == 2 {
            panic!("simulated libtorch failure: DefaultCPUAllocator: not enough memory");
        }
    });
    let mut recorder = Recorder::default();
    let err = trainer
        .train(
            &spec(&data, &dir.path().join("out"), config(1)),
            &mut recorder,
            &|| false,
        )
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::Backend {
                service: "libtorch",
                ..
            }
        ),
        "{err:?}"
    );
    assert!(
        vtp_core::error_chain(&err).contains("not enough memory"),
        "{err}"
    );
    // The same thread trains again afterwards.
    let (again, _) = train(&spec(&data, &dir.path().join("again"), config(1)));
    again.unwrap();
}

/// `backward_step` (gradients handed back by autograd) makes exactly the
/// update that `zero_grad`, `backward` and `step` (gradients accumulated in
/// `.grad`) make, for both optimizers, and leaves `.grad` alone.
#[test]
fn backward_step_updates_as_backward_then_step() {
    use tch::nn::VarStore;
    use tch::{Device, Kind, Tensor};
    use vtp_trainer::engine::OptimizerKind;
    use vtp_trainer::engine::optim::Optimizer;

    let _serial = serial();
    for kind in [OptimizerKind::Sgd, OptimizerKind::Adamw] {
        let replica = || {
            tch::manual_seed(7);
            let vs = VarStore::new(Device::Cpu);
            let model = ModelKind::SmallCnn.build(&vs.root(), 3);
            let params = vs
                .variables()
                .into_iter()
                .filter(|(_, t)| t.requires_grad())
                .collect();
            let optimizer = Optimizer::new(kind, 0.05, 0.9, 5e-4, params);
            (vs, model, optimizer)
        };
        let (accumulated, model_a, mut opt_a) = replica();
        let (returned, model_b, mut opt_b) = replica();
        tch::manual_seed(8);
        let batches: Vec<_> = (0..3)
            .map(|_| {
                (
                    Tensor::randn([8, 3, 16, 16], (Kind::Float, Device::Cpu)),
                    Tensor::randint(3, [8], (Kind::Int64, Device::Cpu)),
                )
            })
            .collect();
        for (x, y) in &batches {
            opt_a.zero_grad();
            let loss = model_a.forward_t(x, true).cross_entropy_for_logits(y);
            loss.backward();
            opt_a.step().unwrap();
            let loss = model_b.forward_t(x, true).cross_entropy_for_logits(y);
            opt_b.backward_step(&loss).unwrap();
        }
        let (a, b) = (accumulated.variables(), returned.variables());
        assert_eq!(a.len(), b.len());
        for (name, value) in &a {
            let diff = f64::try_from((value - &b[name]).abs().max()).unwrap();
            assert!(diff < 1e-6, "{kind:?} {name}: differs by {diff}");
            if value.requires_grad() {
                assert!(!b[name].grad().defined(), "{name}: .grad was written");
            }
        }
        assert!(
            f64::try_from(
                (&a["conv1.weight"] - &replica().0.variables()["conv1.weight"])
                    .abs()
                    .max()
            )
            .unwrap()
                > 1e-4,
            "the parameters moved"
        );
    }
}

/// Autograd may hand two parameters one gradient buffer (`p1 + p2`), and a
/// parameter may be frozen: `backward_step` still updates each parameter
/// with its own gradient and weight decay, as backward-then-step does.
#[test]
fn backward_step_with_shared_gradients_and_frozen_parameters() {
    use tch::{Kind, Tensor};
    use vtp_trainer::engine::OptimizerKind;
    use vtp_trainer::engine::optim::Optimizer;

    let _serial = serial();
    for kind in [OptimizerKind::Sgd, OptimizerKind::Adamw] {
        let params = || {
            let p1 = Tensor::from_slice(&[1.0f32, -2.0, 3.0]).set_requires_grad(true);
            let p2 = Tensor::from_slice(&[0.5f32, 0.25, -1.0]).set_requires_grad(true);
            let frozen = Tensor::from_slice(&[7.0f32, 7.0, 7.0]);
            (p1, p2, frozen)
        };
        let loss_of = |p1: &Tensor, p2: &Tensor, frozen: &Tensor| {
            (p1 + p2 + frozen).pow_tensor_scalar(2).sum(Kind::Float)
        };
        let named = |p1: &Tensor, p2: &Tensor, frozen: &Tensor| {
            vec![
                ("a".to_owned(), p1.shallow_clone()),
                ("b".to_owned(), p2.shallow_clone()),
                ("c".to_owned(), frozen.shallow_clone()),
            ]
        };
        let (a1, a2, af) = params();
        let (b1, b2, bf) = params();
        let mut accumulated = Optimizer::new(kind, 0.01, 0.9, 0.1, named(&a1, &a2, &af));
        let mut returned = Optimizer::new(kind, 0.01, 0.9, 0.1, named(&b1, &b2, &bf));
        for _ in 0..3 {
            accumulated.zero_grad();
            loss_of(&a1, &a2, &af).backward();
            accumulated.step().unwrap();
            returned.backward_step(&loss_of(&b1, &b2, &bf)).unwrap();
        }
        for (a, b) in [(&a1, &b1), (&a2, &b2), (&af, &bf)] {
            let diff = f64::try_from((a - b).abs().max()).unwrap();
            assert!(diff < 1e-6, "{kind:?}: {a:?} vs {b:?}");
        }
        assert_eq!(
            Vec::<f32>::try_from(&bf).unwrap(),
            vec![7.0; 3],
            "frozen stays"
        );
    }
}

#[test]
fn a_classifier_starts_from_its_init_weights() {
    let _serial = serial();
    let (dir, data) = dataset();
    let (parent, _) = train(&spec(&data, &dir.path().join("parent"), config(4)));
    let weights = parent.unwrap().checkpoint;
    // A learning rate too small to learn anything in one epoch: what the
    // first validation sees is where the run started.
    let still = |init: Option<&Path>| {
        let mut config = config(1);
        config["lr"] = 1e-6.into();
        if let Some(init) = init {
            config["init_weights"] = init.to_str().unwrap().into();
        }
        config
    };
    let (_, cold) = train(&spec(&data, &dir.path().join("cold"), still(None)));
    let (_, warm) = train(&spec(
        &data,
        &dir.path().join("warm"),
        still(Some(&weights)),
    ));
    let (cold, warm) = (
        cold[0].metrics["val_accuracy"],
        warm[0].metrics["val_accuracy"],
    );
    assert!(warm >= 0.8, "started from the parent's weights: {warm}");
    assert!(
        warm > cold + 0.3,
        "far above a random start: {warm} vs {cold}"
    );

    // Weights that are not safetensors, or of which nothing fits, are refused.
    let text = dir.path().join("notes.safetensors");
    std::fs::write(&text, b"not weights").unwrap();
    let (refused, _) = train(&spec(&data, &dir.path().join("bad"), still(Some(&text))));
    assert!(
        matches!(&refused, Err(Error::InvalidInput { field, .. }) if field == "config.init_weights"),
        "{refused:?}"
    );
}

#[test]
fn patience_stops_a_plateaued_run_and_says_why() {
    let _serial = serial();
    let (dir, data) = dataset();
    // Too small a learning rate to move: validation accuracy plateaus at once.
    let mut plateau = config(8);
    plateau["lr"] = 1e-9.into();
    plateau["patience"] = 2.into();
    let (summary, reports) = train(&spec(&data, &dir.path().join("p"), plateau));
    let summary = summary.unwrap();
    let reason = summary.stopped.expect("stopped early");
    assert!(reports.len() < 8, "{} epochs", reports.len());
    assert_eq!(summary.epochs as usize, reports.len());
    assert!(reason.contains("patience 2"), "{reason}");
    // The last epoch trained is two past the best one, which the sidecar keeps.
    let last = Checkpoint::open(&dir.path().join("p/last.json")).unwrap();
    let best_epoch = last.meta.best_epoch.unwrap();
    assert_eq!(last.meta.epoch, best_epoch + 2);
    let accuracies: Vec<f64> = reports.iter().map(|r| r.metrics["val_accuracy"]).collect();
    let best = accuracies[best_epoch as usize - 1];
    assert!(
        accuracies[best_epoch as usize..].iter().all(|&a| a <= best),
        "no better epoch after the best: {accuracies:?}"
    );
}

#[test]
fn the_time_limit_cuts_the_epoch_short_and_saves_it() {
    let _serial = serial();
    let (dir, data) = dataset();
    let mut timed = config(5);
    // A millisecond: out of time after the first step.
    timed["time"] = (0.001 / 3600.0).into();
    let out = dir.path().join("t");
    let (summary, reports) = train(&spec(&data, &out, timed));
    let summary = summary.unwrap();
    let reason = summary.stopped.expect("stopped by the time limit");
    assert!(reason.contains("time limit"), "{reason}");
    assert_eq!(reports.len(), 1);
    assert_eq!(summary.epochs, 1);
    // The cut epoch is validated and saved like any other.
    assert!(reports[0].metrics["val_accuracy"].is_finite());
    assert_eq!(
        Checkpoint::open(&out.join("last.json")).unwrap().meta.epoch,
        1
    );
}

/// A torchvision `state_dict` (random weights, from torchvision on PyPI)
/// saved as safetensors starts a VTP ResNet or MobileNetV2 strict: every
/// tensor of ours loads, and the sidecar says so.
#[test]
fn a_torchvision_state_dict_loads_strict() {
    let _serial = serial();
    let (dir, data) = dataset();
    for (model, first) in [
        ("resnet18", "conv1.weight"),
        ("mobilenet_v2", "features.0.0.weight"),
    ] {
        let weights = dir.path().join(format!("{model}.safetensors"));
        let args = [weights.as_os_str(), model.as_ref(), "3".as_ref()];
        if run_python("torchvision_weights.py", &args, "torchvision").is_none() {
            return;
        }

        let out = dir.path().join(model);
        let config = serde_json::json!({"model": model, "epochs": 1, "batch_size": 16, "lr": 1e-9,
            "image_size": 32, "threads": 2, "workers": 1, "seed": 7,
            "init_weights": weights.to_str().unwrap()});
        let (summary, _) = train(&spec(&data, &out, config));
        summary.unwrap();
        let meta = Checkpoint::open(&out.join("last.json")).unwrap().meta;
        let report = meta.init_weights.expect("the sidecar reports the load");
        assert!(report.strict(), "{model}: {report:?}");
        assert_eq!(report.loaded, report.of, "{model}: {report:?}");
        assert!(
            report
                .unexpected
                .iter()
                .all(|name| name.ends_with("num_batches_tracked")),
            "{model}: only PyTorch's counters have no place: {report:?}"
        );
        // The weights trained from are torchvision's (a learning rate of
        // 1e-9 moves nothing).
        let theirs = tch::Tensor::read_safetensors(&weights).unwrap();
        let ours = tch::Tensor::read_safetensors(out.join("last.safetensors")).unwrap();
        let find = |named: &[(String, tch::Tensor)]| {
            named
                .iter()
                .find(|(name, _)| name == first)
                .map(|(_, t)| t.shallow_clone())
                .unwrap()
        };
        let gap = (find(&theirs) - find(&ours)).abs().max().double_value(&[]);
        assert!(gap < 1e-5, "{model}: {first} moved by {gap}");
    }
}

/// `amp` on CPU: the forward pass runs in bfloat16 under autocast (the
/// losses differ from a float32 run's), the classifier still learns, and
/// its checkpoint keeps float32 weights that predict.
#[test]
fn amp_trains_in_bfloat16_on_cpu_and_still_learns() {
    let _serial = serial();
    let (dir, data) = dataset();
    let mut mixed = config(4);
    mixed["amp"] = true.into();
    mixed["device"] = "cpu".into();
    let out = dir.path().join("amp");
    let (summary, reports) = train(&spec(&data, &out, mixed));
    summary.unwrap();
    let (first, last) = (&reports[0].metrics, &reports[3].metrics);
    assert!(last["loss"] < first["loss"] * 0.7, "{first:?} -> {last:?}");
    assert!(last["val_accuracy"] >= 0.8, "{last:?}");
    // bfloat16 needs no gradient scaler.
    assert!(!last.contains_key("amp_scale"), "{last:?}");
    let mut full = config(1);
    full["device"] = "cpu".into();
    let (_, fp32) = train(&spec(&data, &dir.path().join("fp32"), full));
    assert_ne!(
        fp32[0].metrics["loss"], first["loss"],
        "autocast changed the arithmetic"
    );
    assert!((fp32[0].metrics["loss"] - first["loss"]).abs() < 0.1 * fp32[0].metrics["loss"]);
    let checkpoint = Checkpoint::open(&out.join("best.json")).unwrap();
    assert!(checkpoint.meta.config.amp);
    let predictor = Predictor::load(&out).unwrap();
    let predictions = predictor.predict_paths(&[data.join("disc/0.png")]).unwrap();
    assert!(predictions[0].probability > 0.0);
}
