"""Ultralytics peer of the detection training-step benchmark: the same YOLO
model (built from the package's own YAML), the same initial weights (VTP's,
loaded with strict=True), the same batches and targets, Ultralytics' own
v8 detection loss, SGD with the same settings; timed step by step.

Prints {"median_ms": ..., "losses": [...first 3 (box + cls + dfl)...]}.
"""
import argparse
import json
import os
import statistics
import time

os.environ.setdefault("YOLO_OFFLINE", "1")

import torch
from safetensors.torch import load_file
from ultralytics.cfg import get_cfg
from ultralytics.nn.tasks import DetectionModel


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--classes", type=int, required=True)
    ap.add_argument("--weights", required=True)
    ap.add_argument("--batches", required=True)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = DetectionModel(f"{args.model}.yaml", nc=args.classes, verbose=False)
    model.load_state_dict(load_file(args.weights), strict=True)
    model.args = get_cfg()  # the default hyperparameters: box 7.5, cls 0.5, dfl 1.5
    model.train()
    data = load_file(args.batches)
    n = len([k for k in data if k.startswith("x")])
    batches = []
    for i in range(n):
        t = data[f"t{i}"]
        batches.append(
            (
                data[f"x{i}"],
                {"batch_idx": t[:, 0], "cls": t[:, 1:2], "bboxes": t[:, 2:6]},
            )
        )
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    times, losses = [], []
    for step in range(args.warmup + args.steps):
        x, batch = batches[step % n]
        start = time.perf_counter()
        opt.zero_grad()
        preds = model(x)
        loss, items = model.loss(batch, preds)
        loss.sum().backward()
        opt.step()
        value = float(sum(v.sum() for v in items.values()))
        elapsed = time.perf_counter() - start
        if step < 3:
            losses.append(value)
        if step >= args.warmup:
            times.append(elapsed)
    print(json.dumps({"median_ms": statistics.median(times) * 1e3, "losses": losses}))


if __name__ == "__main__":
    main()
