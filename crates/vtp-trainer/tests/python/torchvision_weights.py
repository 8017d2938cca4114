"""Saves a torchvision classifier's state_dict, randomly initialised, as safetensors.

Usage: python torchvision_weights.py OUT.safetensors MODEL NUM_CLASSES
MODEL is a torchvision builder name (resnet18, resnet34, mobilenet_v2). No
weights are downloaded: the point is the names and shapes, which VTP's
models must share with torchvision's for a `state_dict` to load strict.
"""
import sys

import torch
import torchvision
from safetensors.torch import save_file


def main() -> None:
    out, model, classes = sys.argv[1], sys.argv[2], int(sys.argv[3])
    torch.manual_seed(0)
    net = getattr(torchvision.models, model)(weights=None, num_classes=classes)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, out)


if __name__ == "__main__":
    main()
