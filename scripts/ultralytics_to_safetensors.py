#!/usr/bin/env python3
"""Convert an Ultralytics YOLO checkpoint (.pt) into VTP's safetensors form.

VTP's native YOLO models use the parameter names of an Ultralytics
``DetectionModel`` state_dict ("model.0.conv.weight", ...), so conversion is
a change of container: the checkpoint's ``ema`` model (or, failing that, its
``model``) is cast to float32 and its state_dict written as safetensors. A
bare state_dict saved with ``torch.save`` works too.

Beside the weights goes a JSON file with the class names and, when the
checkpoint says which architecture it is, the model name VTP uses:

    {"names": ["person", "bicycle", ...], "model": "yolo11n"}

Unpickling a full checkpoint needs the ``ultralytics`` package installed
(the pickle refers to its classes); a bare state_dict needs only torch.
Only load checkpoints you trust: unpickling runs code.

Usage:
    python scripts/ultralytics_to_safetensors.py best.pt
    python scripts/ultralytics_to_safetensors.py yolo11n.pt -o weights/yolo11n.safetensors
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

# The architectures VTP builds natively (engine::detect::model::YoloVariant).
SUPPORTED = ("yolov8n", "yolov8s", "yolo11n", "yolo11s")


class ConversionError(Exception):
    """A checkpoint that cannot be converted, with the reason."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Convert an Ultralytics YOLO .pt checkpoint (or a bare state_dict) "
        "into VTP's safetensors weights plus a JSON file of class names.",
    )
    parser.add_argument("checkpoint", type=Path, help="the .pt file (Ultralytics checkpoint or torch.save'd state_dict)")
    parser.add_argument(
        "-o",
        "--output",
        type=Path,
        help="the .safetensors file to write (default: the checkpoint's path with .safetensors)",
    )
    parser.add_argument(
        "--names-output",
        type=Path,
        help="the JSON file to write (default: the output's path with .json)",
    )
    parser.add_argument(
        "--names",
        help="comma-separated class names, for checkpoints that do not carry them (bare state_dicts)",
    )
    parser.add_argument(
        "--model",
        help=f"the architecture name to record ({', '.join(SUPPORTED)}) when the checkpoint does not say",
    )
    parser.add_argument("-f", "--force", action="store_true", help="overwrite existing output files")
    return parser.parse_args(argv)


def load_checkpoint(path: Path):
    import torch

    if not path.is_file():
        raise ConversionError(f"{path}: no such file")
    try:
        # Full checkpoints pickle the model object itself, so weights_only
        # loading cannot read them; the caller vouches for the file.
        return torch.load(path, map_location="cpu", weights_only=False)
    except ModuleNotFoundError as e:
        raise ConversionError(
            f"{path}: unpickling needs the module {e.name!r}; install the ultralytics package "
            "(pip install ultralytics) to convert full checkpoints"
        ) from e
    except Exception as e:  # torch raises many kinds for a file that is not a checkpoint
        raise ConversionError(f"{path}: not a readable torch checkpoint ({type(e).__name__}: {e})") from e


def is_state_dict(obj) -> bool:
    import torch

    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def pick_model(ckpt):
    """The module or state_dict to convert: EMA weights first, as Ultralytics itself does."""
    import torch

    if isinstance(ckpt, torch.nn.Module) or is_state_dict(ckpt):
        return ckpt
    if isinstance(ckpt, dict):
        for key in ("ema", "model"):
            candidate = ckpt.get(key)
            if candidate is not None:
                if isinstance(candidate, torch.nn.Module) or is_state_dict(candidate):
                    return candidate
                raise ConversionError(f"the checkpoint's {key!r} entry is a {type(candidate).__name__}, not a model")
        raise ConversionError(
            f"the checkpoint has neither an 'ema' nor a 'model' entry (keys: {', '.join(map(str, ckpt)) or 'none'})"
        )
    raise ConversionError(f"expected an Ultralytics checkpoint dict, a model or a state_dict, got {type(ckpt).__name__}")


def state_dict_of(model) -> dict:
    import torch

    if isinstance(model, torch.nn.Module):
        state = model.float().state_dict()
    else:
        # Float tensors to float32 (checkpoints are saved in half); integer
        # buffers such as num_batches_tracked keep their type.
        state = {k: v.float() if v.is_floating_point() else v for k, v in model.items()}
    if not state:
        raise ConversionError("the model has no parameters")
    odd = [k for k in state if not k.startswith("model.")]
    if odd:
        raise ConversionError(
            f"not a YOLO DetectionModel state_dict: {len(odd)} keys outside 'model.' (e.g. {odd[0]!r})"
        )
    # safetensors wants contiguous tensors that share no storage.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def names_of(model, ckpt) -> list[str] | None:
    names = getattr(model, "names", None)
    if names is None and isinstance(ckpt, dict):
        names = ckpt.get("names")
    if names is None:
        return None
    if isinstance(names, dict):
        return [str(names[i]) for i in sorted(names)]
    return [str(n) for n in names]


def model_name_of(model, ckpt) -> str | None:
    """The architecture name ("yolo11n") from the model's YAML record, when it has one."""
    yaml = getattr(model, "yaml", None)
    candidates = []
    if isinstance(yaml, dict):
        stem = Path(str(yaml.get("yaml_file", ""))).stem
        scale = yaml.get("scale") or ""
        candidates += [stem, stem + scale]
    if isinstance(ckpt, dict) and isinstance(ckpt.get("train_args"), dict):
        candidates.append(Path(str(ckpt["train_args"].get("model", ""))).stem)
    for c in candidates:
        m = re.fullmatch(r"yolo(v8|v?11)([nsmlx])", c.lower())
        if m:
            family = "yolov8" if m.group(1) == "v8" else "yolo11"
            return family + m.group(2)
    return None


def classes_in(state: dict) -> int | None:
    """The class count from the detection head's last class conv (cv3.0.2 / cv3.0.2.bias)."""
    heads = [k for k in state if re.fullmatch(r"model\.\d+\.cv3\.0\.2\.bias", k)]
    return int(state[heads[0]].shape[0]) if heads else None


def convert(args: argparse.Namespace) -> tuple[Path, Path, dict]:
    from safetensors.torch import save_file

    output = args.output or args.checkpoint.with_suffix(".safetensors")
    if output.suffix != ".safetensors":
        raise ConversionError(f"{output}: the output must end in .safetensors")
    names_output = args.names_output or output.with_suffix(".json")
    for p in (output, names_output):
        if p.exists() and not args.force:
            raise ConversionError(f"{p} exists; pass --force to overwrite")

    ckpt = load_checkpoint(args.checkpoint)
    model = pick_model(ckpt)
    state = state_dict_of(model)

    names = [n.strip() for n in args.names.split(",")] if args.names else names_of(model, ckpt)
    nc = classes_in(state)
    if names is not None and nc is not None and len(names) != nc:
        raise ConversionError(f"{len(names)} class names for a head with {nc} classes")
    if names is None and nc is not None:
        names = [str(i) for i in range(nc)]

    info: dict = {"names": names if names is not None else []}
    model_name = args.model or model_name_of(model, ckpt)
    if model_name:
        model_name = model_name.lower().replace("yolov11", "yolo11")
        if model_name not in SUPPORTED:
            print(f"warning: {model_name} is not one of VTP's models ({', '.join(SUPPORTED)})", file=sys.stderr)
        info["model"] = model_name

    output.parent.mkdir(parents=True, exist_ok=True)
    names_output.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(output), metadata={"format": "pt", "source": args.checkpoint.name})
    names_output.write_text(json.dumps(info, indent=2) + "\n")
    return output, names_output, info


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        output, names_output, info = convert(args)
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except ImportError as e:
        print(f"error: {e}; this script needs torch and safetensors", file=sys.stderr)
        return 1
    model = info.get("model", "unknown model")
    print(f"wrote {output} ({model}, {len(info['names'])} classes) and {names_output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
