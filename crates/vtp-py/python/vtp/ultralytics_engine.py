"""``python -m vtp.ultralytics_engine``: the Ultralytics package as a VTP
engine (``framework: "ultralytics"``, ``config.engine: "package"``).

An ordinary ``vtp.run()`` script that drives the real ``ultralytics``
package, installed in the trainer's Python (it is AGPL-3.0: it runs as a
separate program here, and none of its code is copied). It trains every task
the package has (detect, segment, classify, pose, obb) with the models it
builds from its own configs (``yolo11n-seg``, ``yolov8s-pose``, ...;
nothing is downloaded) and reports each epoch under VTP's names:

=====================  ==============================================
``loss``, ``box_loss``  the training losses (their sum, and each)
``val_loss``, ...       the validation losses
``precision``, ``recall``, ``map50``, ``map``
                        box metrics (mAP50-95 is ``map``)
``mask_*``, ``pose_*``  the same for masks (segment) and keypoints (pose)
``val_accuracy``, ``val_top5_accuracy``
                        classify (top-1 is also ``accuracy``)
``fitness``, ``lr``, ``epoch_seconds``
=====================  ==============================================

Each saved epoch's ``last.pt`` (with its optimizer) is stored as the job's
checkpoint set, ``weights.pt``, and as the best one when its fitness is the
best so far (for the detectors the native engine also builds, ``yolov8n``,
``yolov8s``, ``yolo11n`` and ``yolo11s``, the set holds the same weights as
VTP's own checkpoint too, ``weights.safetensors`` and ``weights.json``, which
``vtp.load_checkpoint`` opens); a relaunched attempt resumes the package's own way
(``resume=True``) from the restored file, with this attempt's dataset. A
cancel stops training between batches, after which the epoch is validated,
saved and reported.

The job's ``config``: ``epochs`` and the package's own training arguments
listed in :data:`TRAIN_ARGS` (``imgsz``, ``batch``, ``lr0``, ...). The
dataset: for detect, segment, pose and obb a ``data.yaml`` in the package's
layout at the archive's root or in its one folder; for classify an
ImageFolder (one folder per class, split here 4:1 into train and val) or
``train/`` and ``val/`` folders of classes.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

import vtp
from vtp._vtp import NATIVE_DETECTORS, PACKAGE_TRAIN_ARGS, adopt_detector

#: The package's training arguments a job may set in its ``config`` (the
#: backend refuses others at create: ``data``, ``project``, ``save_dir`` are
#: the platform's own).
TRAIN_ARGS = PACKAGE_TRAIN_ARGS

#: Steps between two progress messages to the trainer (and stop checks).
STEP_EVERY_SECONDS = 1.0


def metric_name(key: str) -> list[str]:
    """VTP's names for one of the package's metric keys."""
    suffixes = {"(B)": "", "(M)": "mask_", "(P)": "pose_"}
    if key.startswith("metrics/"):
        name = key.removeprefix("metrics/")
        if name == "accuracy_top1":
            return ["val_accuracy", "accuracy"]
        if name == "accuracy_top5":
            return ["val_top5_accuracy"]
        prefix = ""
        for suffix, kind in suffixes.items():
            if name.endswith(suffix):
                name, prefix = name.removesuffix(suffix), kind
        name = {"mAP50": "map50", "mAP50-95": "map"}.get(name, name)
        return [prefix + name]
    if key.startswith("train/"):
        return [key.removeprefix("train/")]
    if key.startswith("val/"):
        return ["val_" + key.removeprefix("val/")]
    if key == "lr/pg0":
        return ["lr"]
    if key == "fitness":
        return ["fitness"]
    return []


def epoch_metrics(trainer: Any) -> dict[str, float]:
    """The epoch's metrics, as the package has them after validation."""
    values: dict[str, float] = {}
    raw = {**trainer.label_loss_items(trainer.tloss, prefix="train"), **(trainer.metrics or {}), **trainer.lr}
    if trainer.fitness is not None:
        raw["fitness"] = trainer.fitness
    for key, value in raw.items():
        number = float(value)
        if not math.isfinite(number):
            continue
        for name in metric_name(key):
            values[name] = number
    train_losses = [v for k, v in raw.items() if k.startswith("train/")]
    val_losses = [v for k, v in raw.items() if k.startswith("val/")]
    if train_losses:
        values["loss"] = float(sum(train_losses))
    if val_losses:
        values["val_loss"] = float(sum(val_losses))
    values["epoch_seconds"] = float(getattr(trainer, "epoch_time", 0.0) or 0.0)
    return values


def dataset_root(dataset_dir: Path) -> Path:
    """The dataset's root: the archive's, or the one folder that wraps it."""
    if (dataset_dir / "data.yaml").exists() or (dataset_dir / "train").is_dir():
        return dataset_dir
    folders = [p for p in dataset_dir.iterdir() if p.is_dir() and not p.name.startswith(".")]
    if len(folders) == 1 and ((folders[0] / "data.yaml").exists() or (folders[0] / "train").is_dir()):
        return folders[0]
    return dataset_dir


def data_for(task: str, dataset_dir: Path, work: Path) -> str:
    """The package's ``data`` argument for ``task``."""
    root = dataset_root(dataset_dir)
    if task != "classify":
        yaml = root / "data.yaml"
        if not yaml.is_file():
            raise SystemExit(f"a {task} dataset needs a data.yaml at its root; {dataset_dir} has none")
        return str(yaml)
    if (root / "train").is_dir():
        return str(root)
    # An ImageFolder: every fifth image of each class (in name order) to val.
    split = work / "classify-data"
    classes = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise SystemExit(f"a classify dataset holds one folder per class; {dataset_dir} has none")
    for folder in classes:
        images = sorted(p for p in folder.iterdir() if p.is_file())
        for i, image in enumerate(images):
            target = split / ("val" if i % 5 == 4 else "train") / folder.name / image.name
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.exists():
                target.symlink_to(image)
    return str(split)


def main() -> None:
    run = vtp.run()
    config = run.config
    # As the backend reads it: case-insensitive, `yolov11` for `yolo11`.
    model_name = str(config.get("model", "")).lower().replace("yolov11", "yolo11")
    if not model_name:
        raise SystemExit("config.model names the package's model (yolo11n-seg, yolov8s-cls, ...)")
    unknown = sorted(set(config) - TRAIN_ARGS - {"engine", "model", "epochs", "max_attempts", "report_timeout_secs"})
    if unknown:
        raise SystemExit(f"config keys the package engine does not take: {', '.join(unknown)}")

    # Nothing is downloaded at run time (no fonts, no pretrained weights,
    # no update checks), whatever the trainer's environment says.
    os.environ.setdefault("YOLO_OFFLINE", "1")
    from ultralytics import YOLO  # type: ignore[attr-defined]  # its own public name

    work = Path.cwd()
    save_dir = work / "ultralytics"
    staged = work / "checkpoint"
    staged.mkdir(exist_ok=True)
    args = {key: config[key] for key in TRAIN_ARGS if key in config}
    args.setdefault("device", "cpu" if not _cuda() else "0")

    restored = run.restored()
    if restored is not None:
        weights = restored.dir / "weights.pt"
        model = YOLO(str(weights))
        task = str(model.task)
        # The package's own resume: model, optimizer, EMA and epoch from the
        # file; this attempt's dataset and directories.
        train: dict[str, Any] = {"resume": str(weights), "data": data_for(task, run.dataset_dir, work)}
        train.update({k: v for k, v in args.items() if k in {"imgsz", "batch", "device", "workers", "patience"}})
    else:
        model = YOLO(f"{model_name}.yaml")
        task = str(model.task)
        train = {**args, "data": data_for(task, run.dataset_dir, work), "epochs": run.epochs}

    state: dict[str, Any] = {"in_epoch": False, "saved": False, "step_at": 0.0, "batch": 0}

    def on_train_epoch_start(trainer: Any) -> None:
        state.update(in_epoch=True, saved=False, batch=0, step_at=time.monotonic())

    def on_train_batch_end(trainer: Any) -> None:
        state["batch"] += 1
        now = time.monotonic()
        if now - state["step_at"] < STEP_EVERY_SECONDS:
            return
        state["step_at"] = now
        losses = trainer.tloss
        if isinstance(losses, dict):  # name -> running mean (8.4); a tensor before
            losses = list(losses.values())
        loss = float(sum(float(v) for v in losses)) if losses is not None else 0.0
        run.step(trainer.epoch + 1, state["batch"], len(trainer.train_loader), loss)
        if run.should_stop():
            trainer.stop = True  # the package stops between batches, then validates and saves

    def on_model_save(trainer: Any) -> None:
        state["saved"] = True

    def on_fit_epoch_end(trainer: Any) -> None:
        # The package calls this once more after training, for its final
        # validation of best.pt: not an epoch.
        if not state["in_epoch"]:
            return
        state["in_epoch"] = False
        epoch = trainer.epoch + 1
        metrics = epoch_metrics(trainer)
        run.report(epoch, metrics)
        if state["saved"] and Path(trainer.last).is_file():
            target = staged / "weights.pt"
            target.unlink(missing_ok=True)
            try:
                os.link(trainer.last, target)
            except OSError:
                import shutil

                shutil.copyfile(trainer.last, target)
            if task == "detect" and model_name in NATIVE_DETECTORS:
                native_weights(trainer, model_name, target, staged, epoch, metrics)
            best = trainer.fitness is not None and trainer.best_fitness == trainer.fitness
            run.save_checkpoint(staged, epoch, best=bool(best))

    for event, callback in (
        ("on_train_epoch_start", on_train_epoch_start),
        ("on_train_batch_end", on_train_batch_end),
        ("on_model_save", on_model_save),
        ("on_fit_epoch_end", on_fit_epoch_end),
    ):
        model.add_callback(event, callback)
    # The platform's settings: one fixed directory per attempt, no plots
    # (they would fetch a font), no hub.
    model.train(**train, save_dir=str(save_dir), exist_ok=True, plots=False, verbose=False)


def native_weights(
    trainer: Any, model_name: str, saved: Path, staged: Path, epoch: int, metrics: dict[str, float]
) -> None:
    """Stores the detector's weights of ``saved`` (the package's ``last.pt``)
    beside it as VTP's own checkpoint, ``weights.safetensors`` with its
    sidecar ``weights.json``, for a model the native engine builds: the set
    stored as best then opens with ``vtp.load_checkpoint``. The same weights
    (the package's EMA, as it saved them), under the same parameter names."""
    import torch
    from safetensors.torch import save_file

    weights, sidecar = staged / "weights.safetensors", staged / "weights.json"
    for stale in (weights, sidecar):
        stale.unlink(missing_ok=True)
    # The file the package wrote a moment ago, in this attempt's directory.
    ckpt = torch.load(saved, map_location="cpu", weights_only=False)
    model = ckpt["ema"] if ckpt.get("ema") is not None else ckpt["model"]
    state = {
        name: (tensor.float() if tensor.is_floating_point() else tensor).detach().contiguous().clone()
        for name, tensor in model.state_dict().items()
    }
    save_file(state, str(weights))
    names = trainer.data["names"]
    class_names = [str(names[i]) for i in sorted(names)] if isinstance(names, dict) else [str(n) for n in names]
    try:
        adopt_detector(
            staged, "weights", model_name, class_names,
            int(trainer.args.imgsz), epoch, metrics, float(trainer.best_fitness or 0.0),
        )
    except vtp.VtpError:
        weights.unlink(missing_ok=True)
        raise


def _cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


if __name__ == "__main__":
    main()
