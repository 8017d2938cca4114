"""A user's training script for the tests: a small PyTorch classifier on an
ImageFolder, through ``vtp.run()``. ``config["mode"]`` picks a misbehaviour:
``train`` (default), ``fail`` (raises), ``hang`` (never reports), ``pause``
(after epoch ``pause_after``, on the first attempt, writes its pid to
``pid_file`` and waits to be killed), ``wait`` (the same, but waits for
``run.should_stop()`` and leaves)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

import shapes
import vtp

FORBIDDEN = ["DATABASE_URL", "VTP_DATABASE_URL", "VTP_S3_SECRET_ACCESS_KEY", "VTP_S3_ACCESS_KEY_ID",
             "AWS_SECRET_ACCESS_KEY", "VTP_TRAINER_TOKEN", "VTP_CALLBACK_SECRET", "VTP_START_TRAINING"]

run = vtp.run()
mode = run.config.get("mode", "train")
if mode == "fail":
    raise ValueError("boom: the script's own bug")
if mode == "hang":
    time.sleep(3600)

leaked = [name for name in FORBIDDEN if name in os.environ]
leaked += [name for name, value in os.environ.items() if value.startswith(("whsec_", "postgres://"))]
assert not leaked, f"the script can read {leaked}"

x, y, classes = shapes.load(run.dataset_dir)

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(144, 32), torch.nn.ReLU(), torch.nn.Linear(32, len(classes)))
optimizer = torch.optim.SGD(model.parameters(), lr=float(run.config.get("lr", 0.5)))
start, resumed_from = 1, 0
if (state := run.restored()) is not None:
    saved = torch.load(state.dir / "model.pt")
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    start, resumed_from = state.epoch + 1, state.epoch

out = Path("out")
out.mkdir(exist_ok=True)
best = 0.0
for epoch in range(start, run.epochs + 1):
    for step in range(0, len(y), 16):
        loss = torch.nn.functional.cross_entropy(model(x[step:step + 16]), y[step:step + 16])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits, y).item()
        accuracy = (logits.argmax(1) == y).float().mean().item()
    run.report(epoch, {"loss": loss, "accuracy": accuracy, "resumed_from": resumed_from,
                       "attempt": run.attempt, "leaked": len(leaked)})
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, out / "model.pt")
    run.save_checkpoint(out, epoch, best=accuracy >= best)
    best = max(best, accuracy)
    if mode in ("pause", "wait") and run.attempt == 1 and epoch == int(run.config["pause_after"]):
        Path(run.config["pid_file"]).write_text(str(os.getpid()))
        if mode == "pause":
            time.sleep(3600)
        while not run.should_stop():
            time.sleep(0.05)
    if run.should_stop():
        break
