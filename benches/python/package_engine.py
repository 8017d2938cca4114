"""The package engine (`config.engine: "package"`) against running the
Ultralytics package by hand (`yolo train`) on the same data, settings and
threads: whole wall time from start to a trained model, interleaved round
by round (ours, then the peer).

Ours is a job on `vtp.local()` (the backend, the trainer service and the
store in this process), timed from `start()` to `completed`: the dataset
download and unpacking, the package's own training through
`python -m vtp.ultralytics_engine`, the per-epoch reports and checkpoint
sets, and the final upload. The peer is `yolo train` on the unpacked
folder, timed as a process. Both build yolo11n-seg from its config (no
weights downloaded), on the CPU with torch's default threads.

Run with: python benches/python/package_engine.py [ROUNDS] (default 3)
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import vtp

REPO = Path(__file__).resolve().parents[2]
SETTINGS = {"epochs": 5, "imgsz": 96, "batch": 16, "nbs": 16, "workers": 0, "seed": 0}


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    os.environ.setdefault("YOLO_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        subprocess.run(
            [sys.executable, str(REPO / "examples/detect/make_digits_yolo.py"), str(root),
             "--train", "128", "--val", "32", "--size", "96", "--polygons"],
            check=True, capture_output=True,
        )
        client = vtp.local(root / "platform")
        dataset = client.upload_dataset(root / "digits-yolo-seg.zip", name="outlines")
        ours, peer = [], []
        for n in range(rounds):
            started = time.perf_counter()
            job = client.create_job(
                dataset, model="yolo11n-seg", framework="ultralytics",
                config={"engine": "package", **SETTINGS},
            ).start()
            job.wait(timeout=3600)
            assert job.status == "completed", job.data
            ours.append(time.perf_counter() - started)
            started = time.perf_counter()
            args = [f"{k}={v}" for k, v in SETTINGS.items()]
            subprocess.run(
                [str(Path(sys.executable).parent / "yolo"), "train", "model=yolo11n-seg.yaml",
                 f"data={root / 'digits-yolo-seg' / 'data.yaml'}", *args, "device=cpu", "plots=False",
                 f"project={root / 'peer'}", f"name=r{n}", "exist_ok=True"],
                check=True, capture_output=True, cwd=root,
            )
            peer.append(time.perf_counter() - started)
            print(f"round {n + 1}: package engine {ours[-1]:.1f} s, yolo train {peer[-1]:.1f} s", flush=True)
        client.close()
    a, b = statistics.median(ours), statistics.median(peer)
    print(f"median: package engine {a:.1f} s, yolo train {b:.1f} s, ratio {b / a:.2f}x")


if __name__ == "__main__":
    main()
