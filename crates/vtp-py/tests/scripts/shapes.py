"""The test scripts' data: the job's ImageFolder as 12x12 grey pixels."""

from __future__ import annotations

from pathlib import Path

import numpy
import torch
from PIL import Image


def load(dataset_dir: Path) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Every image of ``dataset_dir`` (one folder per class, in name order)
    flattened to 144 values in [0, 1], its class index, and the classes."""
    classes = sorted(p.name for p in dataset_dir.iterdir() if p.is_dir())
    images, labels = [], []
    for label, name in enumerate(classes):
        for path in sorted((dataset_dir / name).iterdir()):
            pixels = numpy.asarray(Image.open(path).convert("L").resize((12, 12)), dtype=numpy.float32)
            images.append(pixels.reshape(-1) / 255.0)
            labels.append(label)
    return torch.tensor(numpy.stack(images)), torch.tensor(labels), classes
