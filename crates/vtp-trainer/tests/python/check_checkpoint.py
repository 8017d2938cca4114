"""Loads a VTP small_cnn checkpoint in PyTorch and prints its logits.

Usage: python check_checkpoint.py WEIGHTS.safetensors INPUT.safetensors NUM_CLASSES
Prints a JSON list of logit rows for the tensor named "input" in INPUT.
"""
import json
import sys

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn


class SmallCnn(nn.Module):
    """The small_cnn of vtp_trainer::engine::model, parameter for parameter."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(64)
        self.conv3 = nn.Conv2d(64, 128, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(128)
        self.fc = nn.Linear(128, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        x = F.adaptive_avg_pool2d(F.relu(self.bn3(self.conv3(x))), 1)
        return self.fc(torch.flatten(x, 1))


def main() -> None:
    weights, inputs, classes = sys.argv[1], sys.argv[2], int(sys.argv[3])
    model = SmallCnn(classes)
    state = load_file(weights)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # tch does not track BatchNorm's num_batches_tracked; nothing else may differ.
    assert all(k.endswith("num_batches_tracked") for k in missing), missing
    assert not unexpected, unexpected
    model.eval()
    with torch.no_grad():
        logits = model(load_file(inputs)["input"])
    print(json.dumps(logits.tolist()))


if __name__ == "__main__":
    main()
