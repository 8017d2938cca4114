"""Checks VTP's YOLO detection loss against Ultralytics' v8DetectionLoss.

Usage: python yolo_loss.py CASE.safetensors [CASE.safetensors ...]

Each CASE file, written by tests/yolo_loss.rs, holds the head's raw outputs
"raw0".."raw2" [N, 64 + nc, H, W], the targets "targets" [M, 6] (image,
class, cx, cy, w, h normalised), VTP's "parts" [3] (box, cls, dfl after
gains), "total" [] and the gradients "grad0".."grad2" of the total wrt the raw
outputs. The script computes Ultralytics' loss on the same tensors and prints
one JSON line per case with both sides and the largest differences.

Exit status: 0 all agree, 1 a mismatch, 3 Ultralytics is not importable.
"""
import json
import os
import sys

os.environ.setdefault("YOLO_OFFLINE", "1")

RTOL = 1e-4

try:
    import torch
    from safetensors.torch import load_file
    from ultralytics.cfg import get_cfg
    from ultralytics.nn.tasks import DetectionModel
    from ultralytics.utils import DEFAULT_CFG
    from ultralytics.utils.loss import v8DetectionLoss
    import ultralytics
except ImportError as e:  # the Rust side decides whether that is a skip
    print(f"ultralytics is not importable: {e}", file=sys.stderr)
    sys.exit(3)


def criterion(nc: int):
    """The loss exactly as the detection trainer builds it: a yolov8n model
    whose `args` are the default hyperparameters, asked for its criterion."""
    model = DetectionModel("yolov8n.yaml", nc=nc, verbose=False)
    model.args = get_cfg(DEFAULT_CFG)
    loss = model.init_criterion()
    assert isinstance(loss, v8DetectionLoss), type(loss)
    assert model.model[-1].stride.tolist() == [8.0, 16.0, 32.0]
    return loss


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def check(path: str, cache: dict) -> bool:
    t = load_file(path)
    raw = [t[f"raw{i}"].clone().requires_grad_(True) for i in range(3)]
    targets = t["targets"]
    bs, channels = raw[0].shape[:2]
    reg_max = 16
    nc = channels - 4 * reg_max
    if nc not in cache:
        cache[nc] = criterion(nc)
    loss = cache[nc]

    # What Detect returns in training mode for these per-level outputs.
    preds = {
        "boxes": torch.cat([r[:, : 4 * reg_max].reshape(bs, 4 * reg_max, -1) for r in raw], -1),
        "scores": torch.cat([r[:, 4 * reg_max :].reshape(bs, nc, -1) for r in raw], -1),
        "feats": raw,
    }
    batch = {"batch_idx": targets[:, 0], "cls": targets[:, 1:2], "bboxes": targets[:, 2:6]}
    scaled, items = loss(preds, batch)
    total = scaled.sum()  # what the trainer backpropagates
    total.backward()

    theirs = [float(items[k]) for k in ("box_loss", "cls_loss", "dfl_loss")]
    ours = t["parts"].tolist()
    report = {
        "case": os.path.basename(path),
        "targets": int(targets.shape[0]),
        "total": [float(t["total"]), float(total)],
        "box": [ours[0], theirs[0]],
        "cls": [ours[1], theirs[1]],
        "dfl": [ours[2], theirs[2]],
        "rel_total": rel(float(t["total"]), float(total)),
        "rel_parts": [rel(a, b) for a, b in zip(ours, theirs)],
    }
    ok = report["rel_total"] <= RTOL
    # An exactly-zero part (no boxes) must be zero on both sides.
    ok &= all(r <= RTOL or (a == b == 0.0) for r, a, b in zip(report["rel_parts"], ours, theirs))
    grad_rel = []
    for i, r in enumerate(raw):
        g_ours, g_theirs = t[f"grad{i}"], r.grad
        scale = float(g_theirs.abs().max())
        diff = float((g_ours - g_theirs).abs().max())
        grad_rel.append(diff / max(scale, 1e-12))
        ok &= diff <= RTOL * max(scale, 1e-12)
    report["grad_max_abs_diff_over_max"] = grad_rel
    report["ok"] = bool(ok)
    print(json.dumps(report))
    return ok


def main() -> None:
    print(json.dumps({"ultralytics": ultralytics.__version__, "torch": torch.__version__}))
    cache = {}
    ok = all([check(p, cache) for p in sys.argv[1:]])
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
