"""A timm backbone for train.py (``config["backbone"] = "timm/resnet18"``):
built from timm's own config of the architecture, randomly initialised
(``pretrained=False``: nothing is downloaded), for one grey channel."""

import timm
import torch


def build(name: str, classes: int) -> torch.nn.Module:
    return timm.create_model(name, pretrained=False, num_classes=classes, in_chans=1)
