"""A progress bar for waits: tqdm (notebook widgets via ``tqdm.auto``) when
installed, else one self-rewriting line on stderr."""

from __future__ import annotations

import sys
from typing import Any


class ProgressBar:
    """Shows a job's progress (0..1), status and latest epoch."""

    def __init__(self, name: str, enabled: bool = True) -> None:
        self._enabled = enabled
        self._name = name
        self._tqdm: Any = None
        self._last_line = ""
        self._suffix = ""
        if not enabled:
            return
        try:
            from tqdm.auto import tqdm
        except ImportError:
            return
        self._tqdm = tqdm(total=1000, desc=name, unit="‰", bar_format="{l_bar}{bar}| {elapsed}{postfix}")

    def epoch(self, row: dict[str, Any], epochs: int) -> None:
        """Notes a finished epoch's metrics."""
        parts = [f"epoch {row['epoch']}" + (f"/{epochs}" if epochs else "")]
        for name in ("loss", "val_loss"):
            if row.get(name) is not None:
                parts.append(f"{name} {row[name]:.4f}")
        if row.get("val_accuracy") is not None:
            parts.append(f"val_acc {row['val_accuracy']:.2%}")
        if row.get("map") is not None:
            parts.append(f"mAP50-95 {row['map']:.4f}")
        self._suffix = " ".join(parts)

    def update(self, progress: float, status: str) -> None:
        if not self._enabled:
            return
        text = f"{status} {self._suffix}".strip()
        if self._tqdm is not None:
            self._tqdm.n = int(round(progress * 1000))
            self._tqdm.set_postfix_str(text, refresh=False)
            self._tqdm.refresh()
            return
        width = 30
        filled = int(round(progress * width))
        line = f"{self._name} [{'#' * filled}{'.' * (width - filled)}] {progress:4.0%} {text}"
        if line != self._last_line:
            pad = max(0, len(self._last_line) - len(line))
            sys.stderr.write("\r" + line + " " * pad)
            sys.stderr.flush()
            self._last_line = line

    def close(self) -> None:
        if self._tqdm is not None:
            self._tqdm.close()
        elif self._enabled and self._last_line:
            sys.stderr.write("\n")
            sys.stderr.flush()
