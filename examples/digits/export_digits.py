"""Exports the UCI handwritten digits that scikit-learn ships (1,797 8x8
grey images, 10 classes) as an ImageFolder of PNG files, zipped.

Run with: python examples/digits/export_digits.py OUT_DIR
Writes OUT_DIR/digits/<class>/<index>.png and OUT_DIR/digits.zip.
"""
import struct
import sys
import zipfile
import zlib
from pathlib import Path

from sklearn.datasets import load_digits


def png(pixels: list[list[int]]) -> bytes:
    """A greyscale 8-bit PNG of `pixels` (rows of 0..255)."""
    height, width = len(pixels), len(pixels[0])
    raw = b"".join(b"\x00" + bytes(row) for row in pixels)

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else ".vtp/demo")
    root = out / "digits"
    digits = load_digits()
    for index, (image, label) in enumerate(zip(digits.images, digits.target)):
        folder = root / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        rows = [[min(255, int(v) * 16) for v in row] for row in image]
        (folder / f"{index:04d}.png").write_bytes(png(rows))
    archive = out / "digits.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as z:
        for path in sorted(root.rglob("*.png")):
            z.write(path, path.relative_to(out))
    print(f"{len(digits.images)} images in {len(set(digits.target))} classes -> {archive}")


if __name__ == "__main__":
    main()
