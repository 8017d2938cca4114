"""The ultralytics package as an engine (`framework: "ultralytics"`,
`config.engine: "package"`), end to end: the real backend on Postgres and
Garage, its subprocess trainer running `python -m vtp.ultralytics_engine`
with the venv's Python and the real `ultralytics` package from PyPI, models
built from the package's own configs (nothing downloaded).

Small on purpose (64 px scenes, 32 px shapes, a few epochs): these show that
the engine runs the package's tasks through the platform, not that they
learn well in seconds."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import vtp

REPO = Path(__file__).resolve().parents[3]
#: Small and fast; `nbs` = `batch`, so that every batch is an optimizer step.
SMALL = {"engine": "package", "batch": 8, "nbs": 8, "workers": 0, "seed": 0}


def digits_set(client: vtp.Client, out: Path, labels: str, train: int, name: str) -> tuple[Path, str]:
    """A set of 64 px scenes of scikit-learn's digits (8 for validation)
    with `labels` (examples/detect/make_digits_yolo.py) made in the empty
    folder `out`: its folder, and its URI once uploaded as `name`."""
    subprocess.run(
        [sys.executable, str(REPO / "examples/detect/make_digits_yolo.py"), str(out),
         "--train", str(train), "--val", "8", "--size", "64", "--labels", labels],
        check=True,
    )
    archive = next(out.glob("digits-yolo*.zip"))
    return archive.with_suffix(""), client.upload_dataset(archive, name=name)


@pytest.fixture(scope="module")
def outlines(alice: vtp.Client, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A segmentation set: each digit's outline (the convex hull of its
    ink) is its polygon label."""
    return digits_set(alice, tmp_path_factory.mktemp("outlines"), "polygons", 32, "outlines")


@pytest.fixture(scope="module")
def shapes_uri(alice: vtp.Client, shapes: Path) -> str:
    """The shapes ImageFolder (three classes, 24 px images), uploaded."""
    return alice.upload_dataset(shapes, name="package-shapes")


def package_job(client: vtp.Client, dataset: str, model: str, **config: object) -> vtp.Job:
    return client.create_job(
        dataset, model=model, framework="ultralytics", config={**SMALL, **config}
    ).start()


def test_a_segmentation_model_trains_and_its_best_weights_predict_masks(
    alice: vtp.Client, outlines: tuple[Path, str], tmp_path: Path
) -> None:
    folder, uri = outlines
    job = package_job(alice, uri, "yolo11n-seg", epochs=3, imgsz=64)
    job.wait(timeout=600)
    assert job.status == "completed", job.data
    rows = job.metrics()
    assert [row["epoch"] for row in rows] == [1, 2, 3]
    for row in rows:
        # Box and mask metrics and the package's losses, under VTP's names.
        for name in ("map", "map50", "mask_map", "mask_map50", "box_loss", "seg_loss", "loss", "val_loss"):
            assert name in row, (name, row)
    path = Path(job.download_checkpoint(tmp_path))
    assert path.name == "best.weights.pt"
    from ultralytics import YOLO  # type: ignore[attr-defined]

    model = YOLO(str(path))
    assert model.task == "segment"
    scene = sorted((folder / "images" / "val").iterdir())[0]
    result = model.predict(str(scene), imgsz=64, conf=0.001, verbose=False)[0]
    assert result.masks is not None and len(result.masks) == len(result.boxes) > 0


@pytest.fixture(scope="module")
def scenes(alice: vtp.Client, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A detection set: each digit's box."""
    return digits_set(alice, tmp_path_factory.mktemp("scenes"), "boxes", 32, "scenes")


def test_a_detector_the_native_engine_builds_is_stored_as_a_vtp_checkpoint_too(
    alice: vtp.Client, scenes: tuple[Path, str], tmp_path: Path
) -> None:
    import torch
    from ultralytics import YOLO  # type: ignore[attr-defined]

    folder, uri = scenes
    job = package_job(alice, uri, "yolo11n", epochs=2, imgsz=64)
    job.wait(timeout=600)
    assert job.status == "completed", job.data
    assert [row["epoch"] for row in job.metrics()] == [1, 2]
    # The package's own file is still the set's main one.
    package_file = Path(job.download_checkpoint(tmp_path))
    assert package_file.name == "best.weights.pt"
    # Beside it, the same weights as VTP's checkpoint, with its sidecar.
    weights = Path(job.download_checkpoint(tmp_path, file="best.weights.safetensors"))
    assert (tmp_path / "best.weights.json").is_file()
    checkpoint = vtp.load_checkpoint(weights)
    assert (checkpoint.task, checkpoint.model) == ("detect", "yolo11n")
    assert checkpoint.class_names == [str(d) for d in range(10)]
    assert checkpoint.meta["epoch"] in (1, 2) and checkpoint.meta["image_size"] == 64
    # The same network: VTP's native model on the stored safetensors
    # computes what the package's model computes from best.pt.
    model = YOLO(str(package_file)).model.float().eval()
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _, raw = model(x)
    theirs = torch.cat([raw["boxes"], raw["scores"]], 1)
    ours = checkpoint._native.detector_outputs(x.flatten().tolist(), 64, 64)
    mine = torch.cat([torch.tensor(flat).view(shape).flatten(2) for shape, flat in ours], dim=2)
    assert mine.shape == theirs.shape
    assert torch.allclose(mine, theirs, atol=1e-4, rtol=1e-4), (mine - theirs).abs().max()
    scene = sorted((folder / "images" / "val").iterdir())[0]
    # Two short epochs teach little: ask for every box the model dares.
    assert checkpoint.predict(scene, conf=1e-6), "boxes from the stored weights"


@pytest.mark.parametrize(
    ("labels", "model", "metrics"),
    [
        ("keypoints", "yolo11n-pose", ("pose_map", "pose_map50", "map", "pose_loss", "kobj_loss")),
        ("obb", "yolo11n-obb", ("map", "map50", "precision", "recall", "angle_loss")),
    ],
)
def test_pose_and_oriented_box_models_train_on_their_own_labels(
    alice: vtp.Client, tmp_path: Path, labels: str, model: str, metrics: tuple[str, ...]
) -> None:
    _, uri = digits_set(alice, tmp_path / "data", labels, 16, f"digits-{labels}")
    job = package_job(alice, uri, model, epochs=2, imgsz=64)
    job.wait(timeout=600)
    assert job.status == "completed", job.data
    rows = job.metrics()
    assert [row["epoch"] for row in rows] == [1, 2]
    for row in rows:
        for name in (*metrics, "loss", "val_loss"):
            assert name in row, (name, row)
    path = Path(job.download_checkpoint(tmp_path))
    from ultralytics import YOLO  # type: ignore[attr-defined]

    trained = YOLO(str(path))
    assert trained.task == model.rsplit("-", 1)[1]
    if labels == "keypoints":
        assert list(trained.model.kpt_shape) == [4, 3]


def engine_pid(deadline: float) -> int:
    """The pid of the one package engine running on this machine."""
    while time.monotonic() < deadline:
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"vtp.ultralytics_engine" in cmdline:
                return int(proc.name)
        time.sleep(0.1)
    raise AssertionError("no package engine is running")


def test_a_classifier_reports_top1_and_a_killed_engine_resumes_from_its_last_pt(
    alice: vtp.Client, shapes_uri: str, tmp_path: Path
) -> None:
    job = package_job(alice, shapes_uri, "yolo11n-cls", epochs=5, imgsz=32)
    deadline = time.monotonic() + 300
    while len(job.metrics()) < 2 or job.refresh().data.get("last_checkpoint_s3_uri") is None:
        assert time.monotonic() < deadline and job.status in ("queued", "running"), job.data
        time.sleep(0.2)
    # Killed from outside (the OOM killer, a lost machine): relaunched.
    os.kill(engine_pid(deadline), signal.SIGKILL)
    job.wait(timeout=600)
    assert job.status == "completed", job.data
    rows = job.metrics()
    assert [row["epoch"] for row in rows] == [1, 2, 3, 4, 5], rows
    for row in rows:
        assert 0.0 <= row["val_accuracy"] <= 1.0 and "val_top5_accuracy" in row, row
    first = job.data["attempts"][0]
    assert "signal 9" in str(first["reason"]), job.data["attempts"]
    # The second attempt resumed with the package's own resume from the
    # stored last.pt: it started after the last stored epoch, not at 1.
    assert job.data["attempt"] == 2
    path = Path(job.download_checkpoint(tmp_path))
    from ultralytics import YOLO  # type: ignore[attr-defined]

    assert YOLO(str(path)).task == "classify"


def test_bad_package_jobs_are_refused_at_create_naming_the_field(
    alice: vtp.Client, shapes_uri: str, backend: str, make_token: Callable[[str], str], shapes: Path
) -> None:
    def field_of(client: vtp.Client, dataset: str, model: str, config: dict[str, object]) -> str:
        with pytest.raises(vtp.InvalidInput) as refused:
            client.create_job(dataset, model=model, framework="ultralytics", config=config)
        return str(refused.value)

    assert "model_name" in field_of(alice, shapes_uri, "yolo11n-depth", {"engine": "package"})
    # The platform's own arguments are not the job's.
    assert "config.save_dir" in field_of(
        alice, shapes_uri, "yolo11n-cls", {"engine": "package", "save_dir": "/"}
    )
    assert "config.device" in field_of(
        alice, shapes_uri, "yolo11n-cls", {"engine": "package", "device": "0,1"}
    )
    # A backend that does not allow Python code in its trainer.
    bob = vtp.Client(backend, token=make_token("bob"))
    dataset = bob.upload_dataset(shapes, name="shapes-b")
    refused = field_of(bob, dataset, "yolo11n-cls", {"engine": "package"})
    assert "config.engine" in refused and "VTP_ALLOW_USER_CODE" in refused
