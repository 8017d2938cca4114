"""Detection from Python: `vtp.local()` trains the seed's YOLO model on a
YOLO dataset made from scikit-learn's digits, the result carries mAP, the
checkpoint predicts boxes, and its weights load into the Ultralytics
package's own `DetectionModel` and compute the same head outputs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy
import pytest
from PIL import Image

import vtp
from conftest import REPO, unavailable

#: Small: 64 px canvases, 2 epochs, an optimizer step every batch.
DETECT = {
    "image_size": 64,
    "batch_size": 8,
    "nbs": 8,
    "threads": 1,
    "workers": 1,
    "fliplr": 0.0,
}


@pytest.fixture(scope="module")
def digits_yolo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A YOLO dataset of UCI digits on canvases, made by the example script."""
    out = tmp_path_factory.mktemp("yolo")
    subprocess.run(
        [
            sys.executable,
            str(REPO / "examples" / "detect" / "make_digits_yolo.py"),
            str(out),
            "--train", "48",
            "--val", "16",
            "--size", "64",
        ],
        check=True,
    )
    assert (out / "digits-yolo" / "data.yaml").is_file()
    assert (out / "digits-yolo.zip").is_file()
    return out / "digits-yolo"


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, digits_yolo: Path) -> Any:
    with vtp.local(tmp_path_factory.mktemp("vtp-detect")) as platform:
        return platform.train(dataset=digits_yolo, model="yolo11n", epochs=2, **DETECT)


def test_local_trains_a_detector_and_its_checkpoint_finds_boxes(
    trained: Any, digits_yolo: Path
) -> None:
    assert trained.job.status == "completed", trained.job.data
    assert [row["epoch"] for row in trained.metrics] == [1, 2]
    for row in trained.metrics:
        for key in ("box_loss", "cls_loss", "dfl_loss", "precision", "recall", "map50", "map"):
            assert key in row, row
    assert trained.map is not None and 0.0 <= trained.map <= 1.0
    assert trained.map50 is not None and trained.map50 >= trained.map
    assert trained.accuracy is None  # a detector has no accuracy

    checkpoint = trained.load_checkpoint()
    assert checkpoint.task == "detect"
    assert checkpoint.class_names == [str(d) for d in range(10)]
    image_path = sorted((digits_yolo / "images" / "val").glob("*.png"))[0]
    width, height = Image.open(image_path).size
    # Two epochs teach little: ask for every box the model dares.
    by_path = checkpoint.predict(image_path, conf=0.001)
    by_array = checkpoint.predict(numpy.asarray(Image.open(image_path).convert("RGB")), conf=0.001)
    assert by_path and by_path == by_array
    for found in by_path:
        assert set(found) == {"class", "index", "score", "box"}
        x1, y1, x2, y2 = found["box"]
        assert -1 <= x1 <= x2 <= width + 1 and -1 <= y1 <= y2 <= height + 1, found
        assert found["class"] == checkpoint.class_names[found["index"]]
    # Several images give one list each.
    assert len(checkpoint.predict([image_path, image_path], conf=0.001)) == 2


def test_the_checkpoint_loads_into_ultralytics_and_computes_the_same_outputs(
    trained: Any,
) -> None:
    os.environ.setdefault("YOLO_OFFLINE", "1")
    try:
        import torch
        from safetensors.torch import load_file
        from ultralytics.nn.tasks import DetectionModel
    except ImportError as e:
        unavailable(f"the ultralytics package is not installed: {e}")
        return
    checkpoint = trained.load_checkpoint()
    model = DetectionModel(f"{checkpoint.model}.yaml", nc=len(checkpoint.class_names), verbose=False)
    model.load_state_dict(load_file(str(checkpoint.weights)), strict=True)
    model.eval()
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 64, 96, generator=generator)
    with torch.no_grad():
        decoded, raw = model(x)
    # Ultralytics hands back the levels flattened and split into box
    # distributions and class logits; ours are per level, both together.
    theirs = torch.cat([raw["boxes"], raw["scores"]], 1)
    ours = checkpoint._native.detector_outputs(x.flatten().tolist(), 64, 96)
    assert [shape[2:] for shape, _ in ours] == [[8, 12], [4, 6], [2, 3]]
    mine = torch.cat(
        [torch.tensor(flat).view(shape).flatten(2) for shape, flat in ours], dim=2
    )
    assert mine.shape == theirs.shape
    assert torch.allclose(mine, theirs, atol=1e-4, rtol=1e-4), (mine - theirs).abs().max()
