"""What the `vtp.run()` SDK costs a training script: one `run.report` and
one `run.save_checkpoint`, timed inside a real job.

The platform is `vtp.local()` (the backend, the trainer service and the
store in this process, on local disk); the script runs in its own process
with the trainer's Python, as in any job, and times each call from its
side: a report is a request over the trainer's Unix socket, answered once
the trainer has persisted it in its outbox (signed delivery to the backend
follows asynchronously); a saved set is the copy into the job's output, a
SHA-256 of every file, the upload to the store and its report. The peer is
what a script does anyway: `torch.save` of the same weights.

Run with: python benches/python/sdk_cost.py [REPORTS] (default 500)
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import textwrap
from pathlib import Path

import vtp

SCRIPT = textwrap.dedent(
    """
    import json, time
    from pathlib import Path
    import torch
    import vtp

    run = vtp.run()
    sizes = {"small": 256 * 1024, "large": 64 * 1024 * 1024}
    times = {"report": [], "save_small": [], "save_large": [], "torch_save_small": [], "torch_save_large": []}
    out = Path("out")
    out.mkdir()
    for epoch in range(1, run.epochs + 1):
        started = time.perf_counter()
        run.report(epoch, {"loss": 1.0 / epoch, "accuracy": 0.5, "lr": 0.01})
        times["report"].append(time.perf_counter() - started)
        if epoch % 10 == 0 and epoch < run.epochs:
            kind = "small" if epoch % 20 else "large"
            weights = {"w": torch.zeros(sizes[kind] // 4)}
            started = time.perf_counter()
            torch.save(weights, out / "model.pt")
            times["torch_save_" + kind].append(time.perf_counter() - started)
            started = time.perf_counter()
            run.save_checkpoint(out, epoch)
            times["save_" + kind].append(time.perf_counter() - started)
    Path(run.config["result"]).write_text(json.dumps(times))
    """
)


def main() -> None:
    reports = int(sys.argv[1]) if len(sys.argv) > 1 else 500
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "code").mkdir()
        (root / "code" / "cost.py").write_text(SCRIPT)
        (root / "data" / "a").mkdir(parents=True)
        (root / "data" / "a" / "x.txt").write_text("x")
        client = vtp.local(root / "platform")
        dataset = client.upload_dataset(root / "data", name="empty")
        code = client.upload_code(root / "code", name="cost")
        result = root / "result.json"
        job = client.create_job(
            dataset,
            model="sdk-cost",
            framework="python",
            config={"code_s3_uri": code, "entrypoint": "cost.py", "epochs": reports, "result": str(result)},
        ).start()
        job.wait(timeout=1800)
        assert job.status == "completed", job.data
        times = json.loads(result.read_text())
        client.close()

    def row(name: str, values: list[float]) -> str:
        ms = sorted(v * 1000 for v in values)
        p99 = ms[min(len(ms) - 1, round(0.99 * (len(ms) - 1)))]
        return f"| {name} | {len(ms)} | {statistics.median(ms):.3f} | {p99:.3f} |"

    print("| call | n | median ms | p99 ms |\n|---|---|---|---|")
    print(row("run.report (3 metrics)", times["report"]))
    for kind, size in (("small", "256 KiB"), ("large", "64 MiB")):
        print(row(f"run.save_checkpoint, one {size} file", times["save_" + kind]))
        print(row(f"torch.save of the same {size}", times["torch_save_" + kind]))


if __name__ == "__main__":
    main()
