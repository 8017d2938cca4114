"""Your own PyTorch training loop on VTP: a classifier on an ImageFolder
(the digits of examples/digits/export_digits.py), reporting through
``vtp.run()``. Upload this folder with ``vtp.Client.upload_code`` and start a
job with ``framework="python"``, ``config={"code_s3_uri": ..., "entrypoint":
"train.py", "epochs": 5}`` (README, "Train your own code"). Run it by hand
with ``python train.py`` and it trains locally, printing its reports.

``config["backbone"]`` picks the model: ``cnn`` (a small CNN, the default),
``timm/<name>`` (timm_model.py: any timm architecture, e.g.
``timm/resnet10t``) or ``hf/vit`` (hf_model.py: a transformers ViT), all
built from their configs; ``config["size"]`` the side images are resized to,
``config["optimizer"]`` ``sgd`` (default) or ``adamw``."""

from pathlib import Path

import numpy
import torch
from PIL import Image

import vtp

run = vtp.run(epochs=3, dataset_dir=".vtp/demo/digits")
lr = float(run.config.get("lr", 0.05))
classes = sorted(p.name for p in run.dataset_dir.iterdir() if p.is_dir())
paths = [(path, label) for label, name in enumerate(classes) for path in sorted((run.dataset_dir / name).iterdir())]
size = int(run.config.get("size", 8))
x = torch.tensor(numpy.stack([numpy.asarray(Image.open(p).convert("L").resize((size, size)), numpy.float32) / 255 for p, _ in paths]))[:, None]
y = torch.tensor([label for _, label in paths])
generator = torch.Generator().manual_seed(0)
order = torch.randperm(len(y), generator=generator)
train, val = order[: len(y) * 4 // 5], order[len(y) * 4 // 5 :]

torch.manual_seed(0)
backbone = str(run.config.get("backbone", "cnn"))
if backbone.startswith("timm/"):
    from timm_model import build

    model = build(backbone.removeprefix("timm/"), len(classes))
elif backbone == "hf/vit":
    from hf_model import build

    model = build(size, len(classes))
else:
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveMaxPool2d(4),
        torch.nn.Flatten(), torch.nn.Linear(16 * 4 * 4, len(classes)),
    )
parameters = sum(p.numel() for p in model.parameters())
if run.config.get("optimizer") == "adamw":  # what transformers train best with
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
else:
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
start, best = 1, 0.0
if (state := run.restored()) is not None:  # a relaunched attempt resumes
    saved = torch.load(state.dir / "state.pt")
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    start, best = state.epoch + 1, saved["best"]

Path("out").mkdir(exist_ok=True)
for epoch in range(start, run.epochs + 1):
    model.train()
    batches = train[torch.randperm(len(train), generator=generator)].split(32)
    for step, batch in enumerate(batches, 1):
        loss = torch.nn.functional.cross_entropy(model(x[batch]), y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        run.step(epoch, step, len(batches), loss.item())
    model.eval()
    with torch.no_grad():
        logits = model(x[val])
        val_loss = torch.nn.functional.cross_entropy(logits, y[val]).item()
        accuracy = (logits.argmax(1) == y[val]).float().mean().item()
    run.report(epoch, {"loss": loss.item(), "val_loss": val_loss, "val_accuracy": accuracy, "parameters": parameters})
    best = max(best, accuracy)
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "best": best}, "out/state.pt")
    run.save_checkpoint("out/state.pt", epoch, best=accuracy >= best)
    if run.should_stop():
        break
