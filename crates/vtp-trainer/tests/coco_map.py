"""Scores detections with pycocotools' COCOeval (bbox), the reference that
VTP's Rust mAP (engine::detect::metrics) is checked against.

Usage: python coco_map.py GT.json DETECTIONS.json
Prints one JSON object: {"map": stats[0], "map50": stats[1], "per_class": [...]}
with per_class the mAP50-95 of each category id in order (null without gt).
Exits 3 when pycocotools is not installed, so the caller can skip.
"""
import contextlib
import json
import sys


def main() -> None:
    try:
        import numpy as np
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError as e:
        print(f"pycocotools is not installed: {e}", file=sys.stderr)
        sys.exit(3)
    gt_path, dt_path = sys.argv[1], sys.argv[2]
    # COCO's progress lines go to stderr: stdout carries only the result.
    with contextlib.redirect_stdout(sys.stderr):
        gt = COCO(gt_path)
        dt = gt.loadRes(dt_path)
        ev = COCOeval(gt, dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    # precision: [T, R, K, A, M]; area "all" is 0, maxDets=100 is the last.
    precision = ev.eval["precision"][:, :, :, 0, -1]
    per_class = []
    for k in range(precision.shape[2]):
        s = precision[:, :, k]
        per_class.append(float(np.mean(s[s > -1])) if (s > -1).any() else None)
    print(json.dumps({"map": float(ev.stats[0]), "map50": float(ev.stats[1]), "per_class": per_class}))


if __name__ == "__main__":
    main()
