"""Python side of tests/yolo_interchange.rs: VTP's YOLO networks against the
real Ultralytics package.

    python yolo_interchange.py DIR VARIANT...

For each VARIANT (yolov8n, yolo11n, ...), with nc classes as the Rust side
chose them:

1. VTP -> Ultralytics: loads DIR/ours_VARIANT.safetensors into
   ``DetectionModel("VARIANT.yaml")`` with ``strict=True``, runs it in eval
   mode on the input from DIR/ours_VARIANT_io.safetensors and checks its
   per-level head outputs and decoded output against VTP's.
2. Ultralytics -> VTP: builds a random model (perturbed BatchNorm
   statistics too), writes its state_dict as DIR/theirs_VARIANT.safetensors and its
   outputs on the same input as DIR/theirs_VARIANT_io.safetensors, for the
   Rust side to compare.
3. The converter: saves that model as a tiny checkpoint DIR/theirs_VARIANT.pt
   and runs scripts/ultralytics_to_safetensors.py on it, giving
   DIR/converted_VARIANT.safetensors and .json.

Exits 3 (with the reason on stderr) when torch, safetensors or ultralytics is
missing, 1 on a mismatch.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")  # never reach the network for assets

try:
    import torch
    from safetensors.torch import load_file, save_file
    from ultralytics.nn.tasks import DetectionModel
except ImportError as e:
    print(f"missing Python package: {e}", file=sys.stderr)
    sys.exit(3)

TOLERANCE = 1e-4
CONVERTER = Path(__file__).resolve().parents[3] / "scripts" / "ultralytics_to_safetensors.py"
NAMES = ["cat", "dog", "bird", "fish", "frog"]


def fail(message: str) -> None:
    print(f"MISMATCH: {message}", file=sys.stderr)
    sys.exit(1)


def worst(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    """Largest difference, relative where values exceed 1 (boxes are in pixels)."""
    if ours.shape != theirs.shape:
        fail(f"shapes {list(ours.shape)} vs {list(theirs.shape)}")
    scale = theirs.abs().clamp(min=1.0)
    return float(((ours - theirs).abs() / scale).max())


def levels(preds: dict, nc: int) -> list[torch.Tensor]:
    """Detect's flattened training outputs back to VTP's per-level form
    [N, 4*reg_max + nc, H, W] (box logits, then class logits)."""
    feats = preds["feats"]
    sizes = [f.shape[2] * f.shape[3] for f in feats]
    boxes = preds["boxes"].split(sizes, dim=-1)
    scores = preds["scores"].split(sizes, dim=-1)
    out = []
    for f, b, s in zip(feats, boxes, scores):
        n, _, h, w = f.shape
        out.append(torch.cat([b, s], 1).view(n, -1, h, w))
    return out


def build(variant: str, nc: int) -> DetectionModel:
    return DetectionModel(f"{variant}.yaml", nc=nc, verbose=False)


def run(model: DetectionModel, x: torch.Tensor, nc: int) -> dict[str, torch.Tensor]:
    model.eval()
    with torch.no_grad():
        decoded, preds = model(x)
    out = {f"raw{i}": r.contiguous() for i, r in enumerate(levels(preds, nc))}
    out["decoded"] = decoded.contiguous()
    return out


def randomise(model: DetectionModel, x: torch.Tensor, seed: int) -> None:
    """Random BatchNorm parameters and head biases, and running statistics
    that are x's batch statistics perturbed: plain random statistics starve or
    blow up a network this deep (hiding most layers from the comparison),
    while perturbed ones make eval mode really use them. Training mode
    normalises with batch statistics whatever the running ones are, so from
    zero one pass leaves momentum (0.03) times the batch statistic."""
    g = torch.Generator().manual_seed(seed)
    state = model.state_dict()
    with torch.no_grad():
        for name, t in state.items():
            if name.endswith("running_mean") or name.endswith("running_var"):
                t.zero_()
            elif name.endswith("bn.weight"):
                t.copy_(torch.rand(t.shape, generator=g) * 0.4 + 0.8)
            elif name.endswith("bn.bias"):
                t.copy_((torch.rand(t.shape, generator=g) - 0.5) * 0.2)
            elif name.endswith(".bias"):
                t.copy_(torch.rand(t.shape, generator=g) * 2 - 1)
        model.train()
        model(x)
        model.eval()
        # Means first: their noise scales with the variance before it is
        # perturbed.
        for name, t in state.items():
            if name.endswith("running_mean"):
                spread = (state[name.replace("running_mean", "running_var")] / 0.03).sqrt()
                t.div_(0.03).add_((torch.rand(t.shape, generator=g) - 0.5) * 0.2 * spread)
        for name, t in state.items():
            if name.endswith("running_var"):
                t.div_(0.03).mul_(torch.rand(t.shape, generator=g) * 0.4 + 0.8)
            elif name.endswith("num_batches_tracked"):
                t.fill_(11)


def check_ours(directory: Path, variant: str) -> tuple[torch.Tensor, int]:
    state = load_file(directory / f"ours_{variant}.safetensors")
    io = load_file(directory / f"ours_{variant}_io.safetensors")
    nc = int(io["nc"])
    model = build(variant, nc)
    expected = model.state_dict()
    # strict=True checks names; shapes are checked by load_state_dict too,
    # but dtypes are cast silently, so compare those here.
    for k, v in state.items():
        if k in expected and v.dtype != expected[k].dtype:
            fail(f"{variant}: {k} is {v.dtype} in VTP's file, {expected[k].dtype} in Ultralytics")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        fail(f"{variant}: VTP's state_dict does not load strictly: {e}")
    nbt = [k for k in state if k.endswith("num_batches_tracked")]
    if not nbt or int(model.state_dict()[nbt[0]]) != int(state[nbt[0]]):
        fail(f"{variant}: num_batches_tracked did not carry over")

    x = io["input"]
    theirs = run(model, x, nc)
    diffs = {k: worst(io[k], theirs[k]) for k in theirs}
    spread = float(theirs["raw0"].std())
    print(f"{variant}: VTP -> Ultralytics, {len(state)} tensors, max diff " + ", ".join(f"{k} {d:.2e}" for k, d in diffs.items()) + f"; raw0 std {spread:.3f}")
    bad = {k: d for k, d in diffs.items() if not d <= TOLERANCE}
    if bad:
        fail(f"{variant}: Ultralytics on VTP's weights differs from VTP: {bad}")
    return x, nc


def export_theirs(directory: Path, variant: str, x: torch.Tensor, nc: int, seed: int) -> None:
    torch.manual_seed(seed)
    model = build(variant, nc)
    randomise(model, x, seed)
    model.names = {i: NAMES[i % len(NAMES)] + ("" if i < len(NAMES) else str(i)) for i in range(nc)}
    out = run(model, x, nc)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(directory / f"theirs_{variant}.safetensors"))
    save_file(out, str(directory / f"theirs_{variant}_io.safetensors"))

    # A checkpoint shaped like Ultralytics' own (the model object under
    # "model"), through the converter's command line.
    pt = directory / f"theirs_{variant}.pt"
    torch.save({"model": model, "epoch": 0}, pt)
    converted = directory / f"converted_{variant}.safetensors"
    proc = subprocess.run(
        [sys.executable, str(CONVERTER), str(pt), "-o", str(converted)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        fail(f"{variant}: the converter failed: {proc.stderr.strip()}")
    print(f"{variant}: {proc.stdout.strip()}")


def main() -> None:
    directory = Path(sys.argv[1])
    for i, variant in enumerate(sys.argv[2:]):
        x, nc = check_ours(directory, variant)
        export_theirs(directory, variant, x, nc, seed=1000 + i)


if __name__ == "__main__":
    main()
