"""Ultralytics peer of the detection epoch benchmark: `YOLO(model).train()` on
the same YOLO dataset with the same hyperparameters as VTP's side, on the
CPU with the same thread count, offline, no plots.

Prints {"images_per_second": ..., "map": ..., "map50": ..., "seconds": ...}:
training images times epochs over the time spent in epochs (each from its
start to the end of its validation, as VTP's `epoch_seconds` counts; model
set-up, dataset caching and the final re-validation of best.pt left out).
"""
import argparse
import json
import os
import tempfile
import time

os.environ.setdefault("YOLO_OFFLINE", "1")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True, help="the dataset's data.yaml")
    ap.add_argument("--train-images", type=int, required=True)
    ap.add_argument("--epochs", type=int, required=True)
    ap.add_argument("--imgsz", type=int, required=True)
    ap.add_argument("--batch", type=int, required=True)
    ap.add_argument("--close-mosaic", type=int, default=10)
    ap.add_argument("--nbs", type=int, default=64)
    ap.add_argument("--fliplr", type=float, default=0.5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import torch
    from ultralytics import YOLO

    torch.set_num_threads(args.threads)
    model = YOLO(f"{args.model}.yaml")
    spent = {"seconds": 0.0, "start": 0.0}

    def epoch_start(_trainer: object) -> None:
        spent["start"] = time.perf_counter()

    def epoch_end(_trainer: object) -> None:
        spent["seconds"] += time.perf_counter() - spent["start"]

    model.add_callback("on_train_epoch_start", epoch_start)
    model.add_callback("on_fit_epoch_end", epoch_end)
    with tempfile.TemporaryDirectory() as project:
        model.train(
            data=args.data,
            epochs=args.epochs,
            imgsz=args.imgsz,
            batch=args.batch,
            workers=args.threads,
            device="cpu",
            close_mosaic=args.close_mosaic,
            nbs=args.nbs,
            fliplr=args.fliplr,
            seed=0,
            plots=False,
            amp=False,
            project=project,
            name="run",
            exist_ok=True,
            verbose=False,
        )
        seconds = spent["seconds"]
    metrics = model.trainer.metrics
    print(
        json.dumps(
            {
                "images_per_second": args.train_images * args.epochs / seconds,
                "seconds": seconds,
                "map": float(metrics["metrics/mAP50-95(B)"]),
                "map50": float(metrics["metrics/mAP50(B)"]),
            }
        )
    )


if __name__ == "__main__":
    main()
