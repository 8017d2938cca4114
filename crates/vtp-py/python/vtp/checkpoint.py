"""Trained models: ``load_checkpoint(path)`` and :class:`Checkpoint`."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Union

from . import _vtp

#: What ``predict`` takes per image: a file path, a PIL image, or an array
#: of shape (H, W, 3) or (H, W) with values 0..255 (numpy or anything with
#: ``__array__``).
Image = Union[str, "os.PathLike[str]", Any]


def _is_path(image: object) -> bool:
    return isinstance(image, (str, os.PathLike))


def _to_native(image: Image) -> str | tuple[bytes, int, int]:
    """A path, or packed RGB bytes with width and height."""
    if _is_path(image):
        return os.fspath(image)
    if hasattr(image, "convert") and hasattr(image, "tobytes"):  # PIL.Image.Image
        rgb = image.convert("RGB")
        width, height = rgb.size
        return rgb.tobytes(), int(width), int(height)
    if hasattr(image, "__array__"):
        import numpy

        array = numpy.asarray(image)
        if array.ndim == 2:
            array = numpy.stack([array] * 3, axis=-1)
        if array.ndim != 3 or array.shape[2] not in (3, 4):
            raise _vtp.InvalidInput(
                f"an image array must be (H, W), (H, W, 3) or (H, W, 4), not {array.shape}"
            )
        if array.dtype != numpy.uint8:
            if array.size and float(array.max()) <= 1.0:
                array = array * 255.0
            array = numpy.clip(array, 0, 255).astype(numpy.uint8)
        array = numpy.ascontiguousarray(array[:, :, :3])
        return array.tobytes(), int(array.shape[1]), int(array.shape[0])
    raise _vtp.InvalidInput(
        f"cannot read an image from {type(image).__name__}: "
        "pass a path, a PIL image or an (H, W, 3) array"
    )


def _batch(images: Image | Sequence[Image]) -> tuple[list[str | tuple[bytes, int, int]], bool]:
    """The native batch, and whether a single image was given."""
    if _is_path(images) or not isinstance(images, (list, tuple)):
        return [_to_native(images)], True
    return [_to_native(image) for image in images], False


class Checkpoint:
    """A trained model: class names, config and ``predict``.

    The weights file is plain safetensors with torchvision parameter names,
    so ``safetensors.torch.load_file(checkpoint.weights)`` loads it in PyTorch.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._native = _vtp.Checkpoint(os.fspath(path))

    @property
    def path(self) -> Path:
        return Path(self._native.path)

    @property
    def weights(self) -> Path:
        """The safetensors weights file."""
        meta = self._native.meta
        path = self.path
        directory = path if path.is_dir() else path.parent
        return directory / str(meta["weights"])

    @property
    def model(self) -> str:
        return self._native.model

    @property
    def class_names(self) -> list[str]:
        return self._native.class_names

    @property
    def image_size(self) -> int:
        return self._native.image_size

    @property
    def config(self) -> dict[str, Any]:
        return self._native.config

    @property
    def meta(self) -> dict[str, Any]:
        """The sidecar: epoch, metrics, history, sha256 digests."""
        return self._native.meta

    @property
    def task(self) -> str:
        """``"classify"`` or ``"detect"``."""
        return self._native.task

    def predict(
        self,
        images: Image | Sequence[Image],
        conf: float = 0.25,
        iou: float = 0.7,
        max_det: int = 300,
    ) -> Any:
        """A classifier's top-1 class of each image: a dict ``{"class",
        "index", "probability"}``. A detector's boxes in each image: a list
        of dicts ``{"class", "index", "score", "box": [x1, y1, x2, y2]}`` in
        the image's own pixels, best first (``conf``, ``iou`` and
        ``max_det`` are the detector's thresholds). One result for one
        image, a list of them for a list."""
        batch, single = _batch(images)
        predictions: list[Any]
        if self.task == "detect":
            predictions = self._native.detect(batch, conf=conf, iou=iou, max_det=max_det)
        else:
            predictions = self._native.predict(batch)
        return predictions[0] if single else predictions

    __call__ = predict

    def logits(self, images: Image | Sequence[Image]) -> list[list[float]]:
        """Raw model outputs, one row per image."""
        batch, _ = _batch(images)
        return self._native.logits(batch)

    def preprocess(self, images: Image | Sequence[Image]) -> list[float]:
        """The normalised NCHW input the model sees, flattened."""
        batch, _ = _batch(images)
        return self._native.preprocess(batch)

    def __repr__(self) -> str:
        return (
            f"Checkpoint(model={self.model!r}, classes={self.class_names!r}, "
            f"path={str(self.path)!r})"
        )


def load_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Opens a checkpoint from its weights (``best.safetensors``), its
    sidecar (``best.json``) or its directory, checking the weights' sha256."""
    return Checkpoint(path)
