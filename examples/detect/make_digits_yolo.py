"""Builds a small YOLO detection dataset from the UCI handwritten digits that
scikit-learn ships (1,797 8x8 images; nothing is downloaded): each greyscale
canvas holds 1-4 upscaled digits that do not overlap, boxed tightly around
the digit's non-zero pixels, in the Ultralytics layout, zipped.

Run with: python examples/detect/make_digits_yolo.py OUT [--train N] [--val N] [--size S] [--seed K]
Writes OUT/digits-yolo/{data.yaml,images/{train,val},labels/{train,val}} and
OUT/digits-yolo.zip. Training and validation scenes use disjoint digits, and
the same arguments always give the same files.
"""
import argparse
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits


def png(pixels: np.ndarray) -> bytes:
    """A greyscale 8-bit PNG of `pixels` (a 2-D uint8 array)."""
    height, width = pixels.shape
    raw = b"".join(b"\x00" + pixels[y].tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


def scene(rng: np.random.Generator, images: np.ndarray, labels: np.ndarray, size: int):
    """One canvas and its (class, x1, y1, x2, y2) boxes in pixels."""
    canvas = np.zeros((size, size), dtype=np.uint8)
    if rng.random() < 0.5:  # half the scenes get a noisy background
        canvas = rng.integers(0, 40, (size, size), dtype=np.uint8)
    placed = []
    for _ in range(int(rng.integers(1, 5))):
        index = int(rng.integers(len(images)))
        factor = int(rng.integers(max(2, size // 32), max(3, size // 14) + 1))
        digit = np.minimum(images[index] * 16, 255).astype(np.uint8)
        # Nearest-neighbour upscaling keeps the box exact: a zero pixel stays zero.
        digit = np.repeat(np.repeat(digit, factor, axis=0), factor, axis=1)
        ys, xs = np.nonzero(digit)
        if len(xs) == 0:
            continue
        digit = digit[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
        h, w = digit.shape
        if h >= size or w >= size:
            continue
        for _ in range(30):  # a free place, or the digit is left out
            x, y = int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - h + 1))
            margin = 2
            if all(
                x + w + margin <= bx1 or bx2 + margin <= x or y + h + margin <= by1 or by2 + margin <= y
                for _, bx1, by1, bx2, by2 in placed
            ):
                region = canvas[y : y + h, x : x + w]
                np.maximum(region, digit, out=region)
                placed.append((int(labels[index]), x, y, x + w, y + h))
                break
    return canvas, placed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--train", type=int, default=400, help="training scenes")
    parser.add_argument("--val", type=int, default=100, help="validation scenes")
    parser.add_argument("--size", type=int, default=96, help="canvas side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.size < 32:
        parser.error("--size must be at least 32")

    digits = load_digits()
    order = np.random.default_rng(args.seed).permutation(len(digits.images))
    cut = int(len(order) * 0.8)
    pools = {"train": order[:cut], "val": order[cut:]}
    root = args.out / "digits-yolo"
    rng = np.random.default_rng(args.seed + 1)
    for split, count in (("train", args.train), ("val", args.val)):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        pool = pools[split]
        for n in range(count):
            canvas, boxes = scene(rng, digits.images[pool], digits.target[pool], args.size)
            name = f"{split}_{n:05d}"
            (root / "images" / split / f"{name}.png").write_bytes(png(canvas))
            s = float(args.size)
            rows = "".join(
                f"{c} {(x1 + x2) / 2 / s:.6f} {(y1 + y2) / 2 / s:.6f} {(x2 - x1) / s:.6f} {(y2 - y1) / s:.6f}\n"
                for c, x1, y1, x2, y2 in boxes
            )
            (root / "labels" / split / f"{name}.txt").write_text(rows)
    names = "".join(f"  {i}: '{i}'\n" for i in range(10))
    (root / "data.yaml").write_text(f"train: images/train\nval: images/val\nnc: 10\nnames:\n{names}")

    archive = args.out / "digits-yolo.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as z:
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            # A fixed timestamp keeps the zip byte-identical across runs.
            info = zipfile.ZipInfo(str(path.relative_to(args.out)), date_time=(2020, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            z.writestr(info, path.read_bytes())
    print(f"{args.train} training and {args.val} validation scenes in {root}; archive {archive}")


if __name__ == "__main__":
    main()
