"""`vtp.local()`: the whole platform in this process on SQLite and local
disk, training through the Rust engine."""

from __future__ import annotations

from pathlib import Path

import numpy
import pytest
from PIL import Image

import vtp
from conftest import CLASSES, CONFIG


def test_local_train_returns_metrics_and_a_checkpoint_that_predicts(
    tmp_path: Path,
    shapes: Path,
    fresh_shapes: list[tuple[Path, str]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    platform = vtp.local(tmp_path / "vtp")
    assert platform.platform.running and platform.health()["status"] == "ok"
    assert vtp.local(tmp_path / "vtp").base_url == platform.base_url, "one platform per root"

    result = platform.train(dataset=shapes, model="small_cnn", epochs=3, **CONFIG)
    assert result.job.status == "completed", result.job.data
    assert [row["epoch"] for row in result.metrics] == [1, 2, 3]
    assert result.accuracy is not None and result.accuracy > 0.6, result.metrics
    assert "small_cnn" in repr(result.job)
    # A progress bar was drawn (stderr without tqdm, tqdm's own otherwise).
    assert "%" in capsys.readouterr().err

    # The checkpoint sits in the platform's own blob store.
    assert result.checkpoint is not None and result.checkpoint.is_file()
    assert result.checkpoint.is_relative_to(platform.root / "blobs")
    checkpoint = result.load_checkpoint()
    assert checkpoint.class_names == CLASSES
    # Predict from paths, PIL images and arrays alike.
    paths = [path for path, _ in fresh_shapes]
    by_path = checkpoint.predict(paths)
    by_image = checkpoint.predict([Image.open(p) for p in paths])
    by_array = checkpoint.predict([numpy.asarray(Image.open(p).convert("RGB")) for p in paths])
    assert [p["class"] for p in by_path] == [p["class"] for p in by_image]
    assert [p["class"] for p in by_path] == [p["class"] for p in by_array]
    right = sum(p["class"] == kind for p, (_, kind) in zip(by_path, fresh_shapes))
    assert right / len(fresh_shapes) > 0.6
    assert result.dataframe()["val_accuracy"].max() == result.accuracy

    # The local platform keeps its jobs across clients, like a backend.
    assert result.job.id in {job.id for job in platform.jobs(status="completed")}
    with pytest.raises(vtp.InvalidInput, match="array"):
        checkpoint.predict(numpy.zeros((2, 2, 2, 2), dtype=numpy.uint8))


def test_local_errors_and_close(tmp_path: Path, shapes: Path) -> None:
    with vtp.local(tmp_path / "vtp") as platform:
        with pytest.raises(vtp.NotFound):
            platform.train(dataset=tmp_path / "nowhere", epochs=1)
        # An unknown model is refused when the job is created.
        with pytest.raises(vtp.InvalidInput, match="model"):
            platform.train(dataset=shapes, model="no_such_net", epochs=1, **CONFIG)
        with pytest.raises(vtp.InvalidInput, match="checkpoint"):
            vtp.load_checkpoint(tmp_path)
        kept = platform.create_job(platform.upload_dataset(shapes), model="small_cnn", epochs=1)
    assert not platform.platform.running
    platform.close()  # idempotent
    # A closed root starts afresh on the next call, with the old jobs kept.
    again = vtp.local(tmp_path / "vtp")
    assert again.platform.running and again.base_url != platform.base_url
    assert kept.id in {job.id for job in again.jobs()}
    again.close()
