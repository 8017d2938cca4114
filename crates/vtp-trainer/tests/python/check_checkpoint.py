"""Loads a VTP small_cnn checkpoint in PyTorch and prints its logits.

Usage: python check_checkpoint.py WEIGHTS.safetensors INPUT.safetensors NUM_CLASSES
Prints a JSON list of logit rows for the tensor named "input" in INPUT.
"""
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

# The PyTorch twins of VTP's models live with the benchmark peers.
sys.path.insert(0, str(Path(__file__).resolve().parents[4] / "benches" / "peers"))
from vtp_models import SmallCnn, load_vtp_weights  # noqa: E402


def main() -> None:
    weights, inputs, classes = sys.argv[1], sys.argv[2], int(sys.argv[3])
    model = SmallCnn(classes)
    load_vtp_weights(model, load_file(weights))
    model.eval()
    with torch.no_grad():
        logits = model(load_file(inputs)["input"])
    print(json.dumps(logits.tolist()))


if __name__ == "__main__":
    main()
