"""``vtp.run()``: the SDK inside a user's training script.

A job with ``framework: "python"`` runs the user's entrypoint with the
trainer's Python. Inside it::

    import vtp

    run = vtp.run()
    start = 1
    if (state := run.restored()) is not None:   # a relaunched attempt
        model.load_state_dict(torch.load(state.dir / "model.pt"))
        start = state.epoch + 1
    for epoch in range(start, run.epochs + 1):
        ...
        run.report(epoch, {"loss": loss, "val_loss": val_loss, "accuracy": acc})
        torch.save(model.state_dict(), "out/model.pt")
        run.save_checkpoint("out/", epoch, best=acc > best)
        if run.should_stop():
            break

Every call goes to the trainer service that started the script (the same
Rust code as for VTP's own models): reports are signed, persisted and
delivered exactly once, heartbeats keep the job's lease while the script
computes, and each saved checkpoint becomes a verified set that a relaunched
attempt restores. A cancel, or SIGTERM to the trainer, makes
``should_stop()`` true (a second SIGTERM ends the script).

Under ``config.distributed`` the entrypoint runs under ``torchrun``, one
process per rank, each with its own ``vtp.run()``: every rank may call
``report`` and ``save_checkpoint`` (as the loop above does), and only rank
0's are kept, so a script written for one process needs no ``if rank == 0``.

Outside a job, ``vtp.run()`` is a local run that only prints.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from ._vtp import RunConnection

__all__ = ["Restored", "Run", "run"]


@dataclass(frozen=True)
class Restored:
    """The checkpoint a relaunched attempt resumes from."""

    #: A directory holding the files as ``save_checkpoint`` was given them.
    dir: Path
    #: The epoch they were saved after: resume at ``epoch + 1``.
    epoch: int


class Run:
    """One attempt at a job, as its script sees it (see :func:`run`)."""

    def __init__(
        self,
        connection: RunConnection | None,
        *,
        epochs: int,
        dataset_dir: Path,
        config: dict[str, Any],
    ) -> None:
        self._connection = connection
        self._signalled = False
        if connection is not None:
            self.job_id: str | None = connection.job_id
            self.attempt: int = connection.attempt
            #: This process's rank under ``torchrun`` (0 in a plain run).
            self.rank: int = connection.rank
            self.epochs: int = connection.epochs
            self.dataset_dir: Path = Path(connection.dataset_dir)
            self.config: dict[str, Any] = connection.config
        else:
            self.job_id = None
            self.attempt = 1
            self.rank = int(os.environ.get("RANK", "0"))
            self.epochs = epochs
            self.dataset_dir = dataset_dir
            self.config = config

    @property
    def local(self) -> bool:
        """Whether this is a local run (not inside a VTP job)."""
        return self._connection is None

    def restored(self) -> Restored | None:
        """The checkpoint this attempt resumes from, or None."""
        if self._connection is None:
            return None
        state = self._connection.restored
        if state is None:
            return None
        return Restored(dir=Path(state[0]), epoch=state[1])

    def report(self, epoch: int, metrics: Mapping[str, float]) -> None:
        """Reports ``epoch``'s metrics (1-based): ``loss``, ``val_loss``,
        ``accuracy`` and any others, by name."""
        values = {str(name): float(value) for name, value in metrics.items()}
        if self._connection is None:
            if self.rank != 0:
                return
            shown = ", ".join(f"{name} {value:.4g}" for name, value in values.items())
            print(f"epoch {epoch}/{self.epochs}: {shown}", flush=True)
            return
        self._connection.report(epoch, values)

    def step(self, epoch: int, step: int, steps: int, loss: float) -> None:
        """Progress inside an epoch (optional): the job's progress bar and
        heartbeats carry it, and it counts as a sign of life."""
        if self._connection is not None:
            self._connection.step(epoch, step, steps, float(loss))

    def save_checkpoint(
        self, path: str | os.PathLike[str], epoch: int, best: bool = False
    ) -> str | None:
        """Stores ``path`` (a file, or a directory of files) as the checkpoint
        of ``epoch``, and as the best so far with ``best``. Returns the stored
        set's URI (None for the final epoch: the trainer uploads it when the
        script ends, and in a local run)."""
        if self._connection is None:
            if self.rank != 0:
                return None
            print(f"epoch {epoch}: checkpoint {os.fspath(path)}{' (best)' if best else ''}", flush=True)
            return None
        return self._connection.save_checkpoint(os.fspath(path), epoch, best)

    def should_stop(self) -> bool:
        """Whether the run should save and end: the job was cancelled, or
        its trainer is stopping."""
        if self._signalled:
            return True
        if self._connection is None:
            return False
        return self._connection.should_stop()

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        if self._signalled:
            # The second: end now.
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        self._signalled = True


def run(
    *,
    epochs: int | None = None,
    dataset_dir: str | os.PathLike[str] | None = None,
    config: Mapping[str, Any] | None = None,
) -> Run:
    """The run of this script: inside a VTP job, its context; outside one, a
    local run that only prints, with the ``epochs``, ``dataset_dir`` and
    ``config`` given here (defaults: ``config["epochs"]`` or 1, the working
    directory, ``{}``)."""
    connection = RunConnection.from_env()
    settings = dict(config or {})
    this = Run(
        connection,
        epochs=epochs if epochs is not None else int(settings.get("epochs", 1)),
        dataset_dir=Path(dataset_dir) if dataset_dir is not None else Path.cwd(),
        config=settings,
    )
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, this._on_sigterm)
    return this
