"""Builds a small YOLO detection dataset from the UCI handwritten digits that
scikit-learn ships (1,797 8x8 images; nothing is downloaded): each greyscale
canvas holds 1-4 upscaled digits that do not overlap, boxed tightly around
the digit's non-zero pixels, in the Ultralytics layout, zipped. Other
labels of the same digits, for the package's other tasks:

- ``--labels polygons`` (or ``--polygons``): the digit's outline (the convex
  hull of its non-zero pixels): a segmentation set.
- ``--labels keypoints``: its box and four keypoints, the outline's top,
  right, bottom and left extremes: a pose set (``kpt_shape: [4, 3]``).
- ``--labels obb``: the smallest rotated rectangle around the outline, as
  four corners: an oriented-box set.

Run with: python examples/detect/make_digits_yolo.py OUT [--train N] [--val N] [--size S] [--seed K] [--labels KIND]
Writes OUT/digits-yolo/{data.yaml,images/{train,val},labels/{train,val}} and
OUT/digits-yolo.zip (digits-yolo-seg, -pose or -obb for the other labels).
Training and validation scenes use disjoint digits, and the same arguments
always give the same files.
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


def outline(digit: np.ndarray) -> list[tuple[float, float]]:
    """The convex hull of `digit`'s non-zero pixels, counter-clockwise, in
    pixel-edge coordinates (a pixel at (x, y) covers [x, x+1] x [y, y+1])."""
    ys, xs = np.nonzero(digit)
    corners = {(float(x + dx), float(y + dy)) for x, y in zip(xs, ys) for dx in (0, 1) for dy in (0, 1)}
    points = sorted(corners)

    def cross(o, a, b):
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    # Andrew's monotone chain.
    lower: list[tuple[float, float]] = []
    for p in points:
        while len(lower) >= 2 and cross(lower[-2], lower[-1], p) <= 0:
            lower.pop()
        lower.append(p)
    upper: list[tuple[float, float]] = []
    for p in reversed(points):
        while len(upper) >= 2 and cross(upper[-2], upper[-1], p) <= 0:
            upper.pop()
        upper.append(p)
    return lower[:-1] + upper[:-1]


def extremes(hull: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The outline's top, right, bottom and left points (ties: the first
    along the other axis)."""
    return [
        min(hull, key=lambda p: (p[1], p[0])),
        max(hull, key=lambda p: (p[0], -p[1])),
        max(hull, key=lambda p: (p[1], -p[0])),
        min(hull, key=lambda p: (p[0], p[1])),
    ]


def min_area_rectangle(hull: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The four corners of the smallest rectangle around the convex
    `hull`: one of its sides lies on a side of the hull (rotating calipers)."""
    points = np.asarray(hull, dtype=np.float64)
    best = None
    for i in range(len(points)):
        edge = points[(i + 1) % len(points)] - points[i]
        length = float(np.hypot(*edge))
        if length == 0.0:
            continue
        u = edge / length
        v = np.array([-u[1], u[0]])
        a, b = points @ u, points @ v
        area = (a.max() - a.min()) * (b.max() - b.min())
        if best is None or area < best[0]:
            best = (area, u, v, a.min(), a.max(), b.min(), b.max())
    _, u, v, a0, a1, b0, b1 = best
    return [tuple(float(c) for c in a * u + b * v) for a, b in ((a0, b0), (a1, b0), (a1, b1), (a0, b1))]


def scene(rng: np.random.Generator, images: np.ndarray, labels: np.ndarray, size: int):
    """One canvas and its (class, x1, y1, x2, y2, outline) digits in pixels."""
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
                for _, bx1, by1, bx2, by2, _ in placed
            ):
                region = canvas[y : y + h, x : x + w]
                np.maximum(region, digit, out=region)
                hull = [(px + x, py + y) for px, py in outline(digit)]
                placed.append((int(labels[index]), x, y, x + w, y + h, hull))
                break
    return canvas, placed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--train", type=int, default=400, help="training scenes")
    parser.add_argument("--val", type=int, default=100, help="validation scenes")
    parser.add_argument("--size", type=int, default=96, help="canvas side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--labels", choices=("boxes", "polygons", "keypoints", "obb"), default="boxes",
        help="boxes (detect), outlines (segment), boxes with 4 keypoints (pose) or rotated boxes (obb)",
    )
    parser.add_argument("--polygons", action="store_true", help="the same as --labels polygons")
    args = parser.parse_args()
    if args.polygons:
        args.labels = "polygons"
    if args.size < 32:
        parser.error("--size must be at least 32")

    digits = load_digits()
    order = np.random.default_rng(args.seed).permutation(len(digits.images))
    cut = int(len(order) * 0.8)
    pools = {"train": order[:cut], "val": order[cut:]}
    stem = {"boxes": "digits-yolo", "polygons": "digits-yolo-seg", "keypoints": "digits-yolo-pose",
            "obb": "digits-yolo-obb"}[args.labels]
    root = args.out / stem
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

            def xy(points: list[tuple[float, float]], visible: bool = False) -> str:
                # Normalised and kept on the canvas (a rotated rectangle's
                # corner may stick out of it).
                return " ".join(
                    f"{min(max(px / s, 0.0), 1.0):.6f} {min(max(py / s, 0.0), 1.0):.6f}" + (" 2" if visible else "")
                    for px, py in points
                )

            def box(x1: int, y1: int, x2: int, y2: int) -> str:
                return f"{(x1 + x2) / 2 / s:.6f} {(y1 + y2) / 2 / s:.6f} {(x2 - x1) / s:.6f} {(y2 - y1) / s:.6f}"

            if args.labels == "polygons":
                rows = "".join(f"{c} {xy(hull)}\n" for c, *_, hull in boxes)
            elif args.labels == "keypoints":
                rows = "".join(
                    f"{c} {box(x1, y1, x2, y2)} {xy(extremes(hull), visible=True)}\n"
                    for c, x1, y1, x2, y2, hull in boxes
                )
            elif args.labels == "obb":
                rows = "".join(f"{c} {xy(min_area_rectangle(hull))}\n" for c, *_, hull in boxes)
            else:
                rows = "".join(f"{c} {box(x1, y1, x2, y2)}\n" for c, x1, y1, x2, y2, _ in boxes)
            (root / "labels" / split / f"{name}.txt").write_text(rows)
    names = "".join(f"  {i}: '{i}'\n" for i in range(10))
    # Pose: a horizontal flip swaps the right and left extremes.
    pose = "kpt_shape: [4, 3]\nflip_idx: [0, 3, 2, 1]\n" if args.labels == "keypoints" else ""
    (root / "data.yaml").write_text(f"train: images/train\nval: images/val\nnc: 10\n{pose}names:\n{names}")

    archive = args.out / f"{stem}.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as z:
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            # A fixed timestamp keeps the zip byte-identical across runs.
            info = zipfile.ZipInfo(str(path.relative_to(args.out)), date_time=(2020, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            z.writestr(info, path.read_bytes())
    print(f"{args.train} training and {args.val} validation scenes in {root}; archive {archive}")


if __name__ == "__main__":
    main()
