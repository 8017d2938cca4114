//! VTP's YOLO networks against the real Ultralytics package, both ways:
//! VTP's weights load strictly into Ultralytics' `DetectionModel` and give
//! VTP's outputs there, and Ultralytics' weights (saved directly, and
//! through `scripts/ultralytics_to_safetensors.py`) load into VTP and give
//! Ultralytics' outputs here. BatchNorm running statistics are perturbed on
//! both sides, so eval mode is really compared.
//!
//! The Python side is `tests/yolo_interchange.py`, run with `VTP_PYTHON` or
//! else `python3` from PATH. Without Python, torch, safetensors or
//! ultralytics the test is skipped, or fails under `VTP_REQUIRE_SERVICES=1`.

use std::path::Path;
use std::process::Command;

use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};
use vtp_trainer::engine::detect::model::{DetectionModel, YoloVariant};

/// Classes: few, so the test is cheap.
const NC: i64 = 3;
/// Largest allowed difference, relative for values above 1 (pixel boxes).
const TOLERANCE: f64 = 1e-4;

fn required() -> bool {
    std::env::var("VTP_REQUIRE_SERVICES").is_ok_and(|v| v == "1" || v == "true")
}

/// Random weights everywhere, BatchNorm statistics included. Plain random
/// statistics either starve or blow up a network this deep, hiding most
/// layers from the comparison, so the running statistics start as the batch
/// statistics of `x` and are then perturbed: eval mode really uses them, and
/// every layer still shapes the output.
fn randomise(vs: &VarStore, model: &DetectionModel, x: &Tensor) {
    let vars = vs.variables();
    tch::no_grad(|| {
        for (name, t) in &vars {
            let mut t = t.shallow_clone();
            if name.ends_with("running_mean") || name.ends_with("running_var") {
                let _ = t.zero_();
            } else if name.ends_with("bn.weight") {
                let _ = t.uniform_(0.8, 1.2);
            } else if name.ends_with("bn.bias") {
                let _ = t.uniform_(-0.1, 0.1);
            } else if name.ends_with(".bias") {
                let _ = t.uniform_(-1.0, 1.0);
            }
        }
        // Training mode normalises with batch statistics whatever the
        // running ones are, and moves each running one from zero to
        // `momentum * batch statistic` (Ultralytics' momentum is 0.03).
        let _ = model.forward_t(x, true);
        // Means first: their noise scales with the variance before it is
        // perturbed.
        for (name, t) in &vars {
            if let Some(bn) = name.strip_suffix("running_mean") {
                let spread = (&vars[&format!("{bn}running_var")] / 0.03).sqrt();
                let noise = Tensor::rand(t.size(), (Kind::Float, Device::Cpu)) * 0.2 - 0.1;
                let value = t / 0.03 + noise * spread;
                t.shallow_clone().copy_(&value);
            }
        }
        for (name, t) in &vars {
            if name.ends_with("running_var") {
                let noise = Tensor::rand(t.size(), (Kind::Float, Device::Cpu)) * 0.4 + 0.8;
                let value = t / 0.03 * noise;
                t.shallow_clone().copy_(&value);
            } else if name.ends_with("num_batches_tracked") {
                let _ = t.shallow_clone().fill_(5);
            }
        }
    });
}

fn build(variant: YoloVariant) -> (VarStore, DetectionModel) {
    let vs = VarStore::new(Device::Cpu);
    let model = DetectionModel::new(&vs.root(), variant, NC);
    (vs, model)
}

/// Per-level raw outputs and the decoded output, in eval mode.
fn outputs(model: &DetectionModel, x: &Tensor) -> Vec<(String, Tensor)> {
    tch::no_grad(|| {
        let raw = model.forward_t(x, false);
        let decoded = model.decode(&raw);
        raw.into_iter()
            .enumerate()
            .map(|(i, r)| (format!("raw{i}"), r))
            .chain([("decoded".to_string(), decoded)])
            .collect()
    })
}

fn worst(ours: &Tensor, theirs: &Tensor) -> f64 {
    assert_eq!(ours.size(), theirs.size());
    let scale = theirs.abs().clamp_min(1.0);
    f64::try_from(((ours - theirs).abs() / scale).max()).unwrap()
}

/// `file`'s tensors are exactly `vs`'s variables: same names, shapes and
/// kinds (VarStore::load alone would ignore extra tensors and cast kinds).
fn assert_same_layout(vs: &VarStore, file: &Path) {
    let theirs = Tensor::read_safetensors(file).unwrap();
    let ours = vs.variables();
    let mut missing: Vec<_> = ours
        .keys()
        .filter(|k| !theirs.iter().any(|(n, _)| n == *k))
        .collect();
    missing.sort();
    let extra: Vec<_> = theirs
        .iter()
        .filter(|(n, _)| !ours.contains_key(n))
        .map(|(n, _)| n)
        .collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "{}: missing {missing:?}, extra {extra:?}",
        file.display()
    );
    for (name, t) in &theirs {
        let v = &ours[name];
        assert_eq!(v.size(), t.size(), "{name}");
        assert_eq!(v.kind(), t.kind(), "{name}");
    }
}

/// Loads `weights` into a fresh model and compares its outputs on `x` with
/// `expected` (Ultralytics' own outputs for those weights).
fn check_theirs(variant: YoloVariant, weights: &Path, expected: &Path, x: &Tensor) {
    let (mut vs, model) = build(variant);
    assert_same_layout(&vs, weights);
    vs.load(weights).unwrap();
    let expected = Tensor::read_safetensors(expected).unwrap();
    let ours = outputs(&model, x);
    assert_eq!(ours.len(), expected.len());
    for (name, theirs) in &expected {
        let (_, mine) = ours.iter().find(|(n, _)| n == name).unwrap();
        let diff = worst(mine, theirs);
        eprintln!(
            "{variant}: Ultralytics -> VTP ({}), {name} max diff {diff:.2e}",
            weights.file_name().unwrap().to_string_lossy()
        );
        assert!(
            diff <= TOLERANCE,
            "{variant} {name}: VTP on {} differs from Ultralytics by {diff}",
            weights.display()
        );
    }
}

#[test]
fn yolo_weights_move_both_ways_between_vtp_and_ultralytics() {
    tch::manual_seed(17);
    let dir = tempfile::tempdir().unwrap();
    // Not square, so a transposed anchor grid would show.
    let x = Tensor::rand([2, 3, 64, 96], (Kind::Float, Device::Cpu));
    for variant in YoloVariant::ALL {
        let (vs, model) = build(variant);
        randomise(&vs, &model, &x);
        vs.save(dir.path().join(format!("ours_{variant}.safetensors")))
            .unwrap();
        let mut io = outputs(&model, &x);
        io.push(("input".into(), x.shallow_clone()));
        io.push(("nc".into(), Tensor::from(NC)));
        let named: Vec<(&str, &Tensor)> = io.iter().map(|(n, t)| (n.as_str(), t)).collect();
        Tensor::write_safetensors(
            &named,
            dir.path().join(format!("ours_{variant}_io.safetensors")),
        )
        .unwrap();
    }

    let python = std::env::var("VTP_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/yolo_interchange.py");
    let run = Command::new(&python)
        .arg(&script)
        .arg(dir.path())
        .args(YoloVariant::ALL.map(YoloVariant::name))
        .env("YOLO_OFFLINE", "1")
        .output();
    let output = match run {
        Ok(output) => output,
        Err(e) if !required() => {
            eprintln!(
                "SKIPPED: {python} not runnable ({e}); set VTP_PYTHON to a Python with ultralytics"
            );
            return;
        }
        Err(e) => panic!("{python} not runnable ({e}) and VTP_REQUIRE_SERVICES=1"),
    };
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    eprintln!("{stdout}");
    if output.status.code() == Some(3) {
        assert!(
            !required(),
            "{python} lacks what the test needs and VTP_REQUIRE_SERVICES=1: {stderr}"
        );
        eprintln!("SKIPPED: {}", stderr.trim());
        return;
    }
    assert!(
        output.status.success(),
        "the Ultralytics side failed:\n{stdout}\n{stderr}"
    );

    for variant in YoloVariant::ALL {
        let at = |file: String| dir.path().join(file);
        let expected = at(format!("theirs_{variant}_io.safetensors"));
        check_theirs(
            variant,
            &at(format!("theirs_{variant}.safetensors")),
            &expected,
            &x,
        );
        check_theirs(
            variant,
            &at(format!("converted_{variant}.safetensors")),
            &expected,
            &x,
        );
        let info: serde_json::Value = serde_json::from_slice(
            &std::fs::read(at(format!("converted_{variant}.json"))).unwrap(),
        )
        .unwrap();
        assert_eq!(
            info,
            serde_json::json!({"names": ["cat", "dog", "bird"], "model": variant.name()}),
        );
        assert_eq!(
            info["model"]
                .as_str()
                .unwrap()
                .parse::<YoloVariant>()
                .unwrap(),
            variant
        );
    }
}

/// An Ultralytics `state_dict`, converted, starts a VTP training run as
/// `config.init_weights`: with a vanishing learning rate the saved model
/// still holds those very weights after an epoch, so they were loaded and
/// trained from, not ignored.
#[test]
fn an_ultralytics_state_dict_starts_a_vtp_run_as_init_weights() {
    use vtp_core::{EpochReport, JobId, ProgressSink, TrainSpec, Trainer};
    struct Count(usize);
    impl ProgressSink for Count {
        fn epoch_finished(&mut self, _: &EpochReport) {
            self.0 += 1;
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let python = std::env::var("VTP_PYTHON").unwrap_or_else(|_| "python3".into());
    let weights = dir.path().join("yolo11n-ultralytics.safetensors");
    let export = format!(
        "import os, sys\nos.environ['YOLO_OFFLINE'] = '1'\n\
         from ultralytics.nn.tasks import DetectionModel\n\
         from safetensors.torch import save_file\n\
         m = DetectionModel('yolo11n.yaml', nc={NC}, verbose=False)\n\
         save_file({{k: v.contiguous() for k, v in m.state_dict().items()}}, sys.argv[1])\n"
    );
    let ran = Command::new(&python)
        .args(["-c", &export])
        .arg(&weights)
        .output();
    match ran {
        Ok(out) if out.status.success() => {}
        Ok(out) if !required() => {
            eprintln!("SKIPPED: {}", String::from_utf8_lossy(&out.stderr).trim());
            return;
        }
        Err(e) if !required() => {
            eprintln!("SKIPPED: {python} not runnable ({e})");
            return;
        }
        other => panic!(
            "exporting an Ultralytics state_dict failed and VTP_REQUIRE_SERVICES=1: {other:?}"
        ),
    }
    let data = vtp_trainer::testing::yolo_shapes_dataset(&dir.path().join("scenes"), 8, 4, 64, 1);
    let out = dir.path().join("out");
    let spec = TrainSpec {
        job_id: JobId::new(),
        config: serde_json::json!({
            "model": "yolo11n", "epochs": 1, "image_size": 64, "batch_size": 4, "nbs": 4,
            "optimizer": "sgd", "lr": 1e-12, "warmup_epochs": 0.0, "threads": 2, "workers": 1,
            "init_weights": weights.display().to_string()
        }),
        dataset_dir: data,
        output_dir: out.clone(),
        init_weights: None,
    };
    let mut count = Count(0);
    vtp_trainer::TchTrainer::new()
        .train(&spec, &mut count, &|| false)
        .unwrap();
    assert_eq!(count.0, 1);
    let theirs = Tensor::read_safetensors(&weights).unwrap();
    let saved = Tensor::read_safetensors(out.join("last.safetensors")).unwrap();
    let mut compared = 0;
    for (name, t) in &theirs {
        if name.ends_with("conv.weight") {
            let (_, ours) = saved.iter().find(|(n, _)| n == name).unwrap();
            assert!(
                worst(ours, t) < 1e-5,
                "{name} moved away from the initial weights"
            );
            compared += 1;
        }
    }
    assert!(compared > 50, "{compared} convolutions compared");
}
