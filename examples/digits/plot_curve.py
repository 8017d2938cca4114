"""Draws a job's training curve (train loss, val loss, val accuracy) as SVG
from the backend's metrics, with no plotting library.

Run with: curl -s http://127.0.0.1:8000/training/jobs/$JOB/metrics | python examples/digits/plot_curve.py > curve.svg
"""
import json
import sys

W, H, PAD = 640, 320, 48


def main() -> None:
    rows = json.load(sys.stdin)
    epochs = [r["epoch"] for r in rows]
    series = [
        ("train loss", [r["loss"] for r in rows], "#d62728", max(r["loss"] for r in rows)),
        ("val loss", [r["val_loss"] for r in rows], "#ff7f0e", max(r["loss"] for r in rows)),
        ("val accuracy", [r["val_accuracy"] for r in rows], "#1f77b4", 1.0),
    ]
    x = lambda e: PAD + (e - epochs[0]) * (W - 2 * PAD) / max(1, epochs[-1] - epochs[0])
    y = lambda v, top: H - PAD - v / top * (H - 2 * PAD)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
           f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<line x1="{PAD}" y1="{H - PAD}" x2="{W - PAD}" y2="{H - PAD}" stroke="black"/>',
           f'<line x1="{PAD}" y1="{PAD}" x2="{PAD}" y2="{H - PAD}" stroke="black"/>',
           f'<text x="{W / 2}" y="{H - 12}" text-anchor="middle">epoch</text>']
    for e in epochs:
        out.append(f'<text x="{x(e):.1f}" y="{H - PAD + 16}" text-anchor="middle">{e}</text>')
    for i, (name, values, colour, top) in enumerate(series):
        points = " ".join(f"{x(e):.1f},{y(v, top):.1f}" for e, v in zip(epochs, values))
        out.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{points}"/>')
        out.append(f'<text x="{W - PAD - 110}" y="{PAD + 16 * i}" fill="{colour}">{name}</text>')
    best = max(r["val_accuracy"] for r in rows)
    out.append(f'<text x="{PAD + 8}" y="{PAD - 12}">UCI digits, small_cnn: best val accuracy {best * 100:.2f}%</text>')
    out.append("</svg>")
    print("\n".join(out))


if __name__ == "__main__":
    main()
