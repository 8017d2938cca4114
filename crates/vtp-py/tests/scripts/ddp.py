"""A distributed training script for the tests: DistributedDataParallel on
gloo over the job's ImageFolder, run by ``torchrun`` (``config.distributed``).

Each step takes the next ``config["batch"] * world_size`` images and gives
every rank its own ``batch`` of them; DDP averages the gradients, so N
processes at batch B take exactly the steps of one process at batch N*B
(fixed seeds, no shuffling). Every rank reports and saves, as a script
written for one process would; the platform keeps rank 0's.

``config["mode"] == "pause"``: after epoch ``pause_after`` of the first
attempt, rank ``pause_rank`` writes its pid to ``pid_file`` and waits to be
killed."""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

import shapes
import vtp

run = vtp.run()
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
assert run.rank == rank, (run.rank, rank)

x, y, classes = shapes.load(run.dataset_dir)
# One fixed order that mixes the classes, the same in every process.
order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
x, y = x[order], y[order]

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(144, 32), torch.nn.ReLU(), torch.nn.Linear(32, len(classes)))
ddp = torch.nn.parallel.DistributedDataParallel(model)
optimizer = torch.optim.SGD(ddp.parameters(), lr=float(run.config.get("lr", 0.5)))
start, resumed_from = 1, 0
if (state := run.restored()) is not None:
    saved = torch.load(state.dir / "model.pt")
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    start, resumed_from = state.epoch + 1, state.epoch

batch = int(run.config["batch"])
step_size = batch * world
out = Path("out")
out.mkdir(exist_ok=True)
for epoch in range(start, run.epochs + 1):
    for begin in range(0, len(y) - step_size + 1, step_size):
        mine = slice(begin + rank * batch, begin + (rank + 1) * batch)
        loss = torch.nn.functional.cross_entropy(ddp(x[mine]), y[mine])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits, y).item()
        accuracy = (logits.argmax(1) == y).float().mean().item()
    run.report(epoch, {"loss": loss, "accuracy": accuracy, "rank": rank, "world": world,
                       "resumed_from": resumed_from, "attempt": run.attempt})
    if rank == 0:
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, out / "model.pt")
    run.save_checkpoint(out, epoch)
    # Every rank goes on once rank 0's set is stored.
    dist.barrier()
    if (run.config.get("mode") == "pause" and run.attempt == 1 and epoch == int(run.config["pause_after"])
            and rank == int(run.config["pause_rank"])):
        Path(run.config["pid_file"]).write_text(str(os.getpid()))
        time.sleep(3600)
    if run.should_stop():
        break
dist.destroy_process_group()
