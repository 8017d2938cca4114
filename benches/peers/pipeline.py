"""torch.utils.data.DataLoader peer of the input-pipeline and epoch
benchmarks: decode (PIL), resize shorter side + centre crop, pad-and-crop,
horizontal flip, normalise, batch; optionally a training step per batch.

Prints {"images_per_second": ..., "seconds": ...}.
"""
import argparse
import json
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from vtp_models import build

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


class Folder(torch.utils.data.Dataset):
    def __init__(self, root: Path, size: int) -> None:
        classes = sorted(p.name for p in root.iterdir() if p.is_dir())
        self.items = [(f, i) for i, c in enumerate(classes) for f in sorted((root / c).iterdir())]
        self.size = size

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        path, label = self.items[i]
        img = ImageOps.fit(Image.open(path).convert("RGB"), (self.size, self.size), Image.BILINEAR)
        a = np.asarray(img, dtype=np.float32) / 255.0
        pad = self.size // 8
        a = np.pad(a, ((pad, pad), (pad, pad), (0, 0)))
        dy, dx = random.randint(0, 2 * pad), random.randint(0, 2 * pad)
        a = a[dy : dy + self.size, dx : dx + self.size]
        if random.random() < 0.5:
            a = a[:, ::-1]
        a = (a - MEAN) / STD
        return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1))), label


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--train", default="", help="a model name: also run a training step per batch")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    loader = torch.utils.data.DataLoader(
        Folder(Path(args.data), args.size), batch_size=args.batch, shuffle=True,
        num_workers=args.workers, persistent_workers=False,
    )
    model = opt = None
    if args.train:
        torch.manual_seed(0)
        model = build(args.train, 10)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    start = time.perf_counter()
    seen = 0
    for x, y in loader:
        if model is not None:
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
        seen += len(y)
    seconds = time.perf_counter() - start
    print(json.dumps({"images_per_second": seen / seconds, "seconds": seconds}))


if __name__ == "__main__":
    main()
