"""PyTorch eager peer of the training-step benchmark: the same model, initial
weights, batches and optimizer as VTP's side, timed step by step.

Prints {"median_ms": ..., "losses": [...first 3...]}.
"""
import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from vtp_models import build, load_vtp_weights


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--weights", required=True)
    ap.add_argument("--batches", required=True)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = build(args.model, 10)
    load_vtp_weights(model, load_file(args.weights))
    model.train()
    data = load_file(args.batches)
    n = len([k for k in data if k.startswith("x")])
    batches = [(data[f"x{i}"], data[f"y{i}"]) for i in range(n)]
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    times, losses = [], []
    for step in range(args.warmup + args.steps):
        x, y = batches[step % n]
        start = time.perf_counter()
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        value = loss.item()
        elapsed = time.perf_counter() - start
        if step < 3:
            losses.append(value)
        if step >= args.warmup:
            times.append(elapsed)
    print(json.dumps({"median_ms": statistics.median(times) * 1e3, "losses": losses}))


if __name__ == "__main__":
    main()
