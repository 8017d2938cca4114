# %% [markdown]
# # VTP in a notebook
#
# Trains a small CNN on the UCI handwritten digits with the Rust engine, in
# this process, then plots the curves and classifies a few images; then
# trains the seed's YOLO detector on the same digits pasted onto canvases
# and finds them with boxes.
#
# Run with: `python examples/notebook/notebook.py` from the repository root
# (after `pip install ./crates/vtp-py`), or open it in Jupyter / VS Code,
# where every `# %%` is a cell. It type-checks with `mypy --strict`.

# %%
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import vtp

data = Path(".vtp/demo")
if not (data / "digits").is_dir():
    # scikit-learn's copy of the UCI digits, exported as an ImageFolder.
    subprocess.run([sys.executable, "examples/digits/export_digits.py", str(data)], check=True)

# %% [markdown]
# ## Train in process (SQLite and local disk under `.vtp/local`)

# %%
platform = vtp.local()
result = platform.train(
    dataset=data / "digits",
    model="small_cnn",
    epochs=int(sys.argv[1]) if len(sys.argv) > 1 else 8,
    image_size=16,
    batch_size=32,
    lr=0.05,
    hflip=False,
)
print(f"best validation accuracy: {result.accuracy:.2%}")
print(f"checkpoint: {result.checkpoint}")

# %% [markdown]
# ## Metrics: plain rows, a DataFrame, a plot

# %%
for row in result.metrics:
    print(row["epoch"], round(row["loss"], 4), round(row["val_accuracy"], 4))
try:
    print(result.dataframe()[["loss", "val_loss", "val_accuracy"]])
    figure = result.plot()
    figure.savefig(data / "notebook-curves.png")
    print(f"curves: {data / 'notebook-curves.png'}")
except ImportError as missing:  # pandas / matplotlib are optional
    print(missing)

# %% [markdown]
# ## Predict with the checkpoint

# %%
checkpoint = vtp.load_checkpoint(result.checkpoint or "")
samples = sorted((data / "digits" / "7").glob("*.png"))[:3]
for sample, prediction in zip(samples, checkpoint.predict(samples)):
    print(sample.name, "->", prediction["class"], f"{prediction['probability']:.2f}")

# %% [markdown]
# ## The same job, as the platform sees it

# %%
job = platform.get_job(result.job.id)
print(job, job.data["finished_at"])

# %% [markdown]
# ## Detection: the seed's `yolo11n` on digits pasted onto canvases
#
# The same engine trains YOLO detectors on a YOLO dataset (`data.yaml`,
# `images/`, `labels/`); the result carries mAP, and the checkpoint's
# `predict` returns boxes in each image's own pixels. Its weights load
# into the Ultralytics package's `DetectionModel` as they are.

# %%
yolo = data / "digits-yolo"
if not (yolo / "data.yaml").is_file():
    subprocess.run(
        [sys.executable, "examples/detect/make_digits_yolo.py", str(data), "--train", "256", "--val", "64", "--size", "64"],
        check=True,
    )
detector = platform.train(
    dataset=yolo,
    model="yolo11n",
    epochs=int(sys.argv[2]) if len(sys.argv) > 2 else 12,
    image_size=64,
    batch_size=16,
    nbs=16,
    fliplr=0.0,
)
print(f"mAP50-95 {detector.map:.4f}, mAP50 {detector.map50:.4f}")
boxes = detector.load_checkpoint().predict(sorted((yolo / "images" / "val").glob("*.png"))[:2])
for found in boxes:
    print([(b["class"], round(b["score"], 2), [round(v) for v in b["box"]]) for b in found[:4]])
platform.close()
