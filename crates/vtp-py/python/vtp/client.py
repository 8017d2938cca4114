"""Jobs over the backend API: ``Client``, ``Job``, ``Event``, ``local()``."""

from __future__ import annotations

import atexit
import os
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Union
from urllib.parse import unquote, urlparse

from . import _schema, _vtp
from ._progress import ProgressBar
from .checkpoint import Checkpoint, load_checkpoint

if TYPE_CHECKING:  # optional dependencies
    import pandas
    from matplotlib.figure import Figure

PathLike = Union[str, "os.PathLike[str]"]
#: A job as the backend's JSON has it (generated from its OpenAPI document).
JobData = _schema.Job
Metrics = list[dict[str, Any]]

#: Statuses a job never leaves.
TERMINAL: frozenset[str] = frozenset({"completed", "failed", "cancelled"})


def _default_user() -> str:
    return os.environ.get("VTP_USER", "default")


@dataclass(frozen=True)
class Event:
    """One thing that happened to a job, from :meth:`Job.events`.

    ``kind`` is ``"progress"`` when the status, progress or message changed
    (or the trainer reported in), ``"metrics"`` when an epoch finished
    (``metrics`` holds its row, as :meth:`Job.metrics` gives it), and
    ``"finished"`` once, last, when the job reached a terminal status.
    """

    kind: Literal["progress", "metrics", "finished"]
    status: str
    progress: float
    message: str | None = None
    metrics: dict[str, Any] | None = None


class Job:
    """A training job as the backend last reported it.

    Attributes mirror the backend's JSON (``job.status``, ``job.progress``,
    ``job.data`` for everything); :meth:`refresh` reads it again.
    """

    def __init__(self, client: Client, data: JobData) -> None:
        self._client = client
        self.data: JobData = data

    # -- fields -----------------------------------------------------------
    @property
    def id(self) -> str:
        return str(self.data["id"])

    @property
    def status(self) -> str:
        return str(self.data["status"])

    @property
    def progress(self) -> float:
        return float(self.data.get("progress") or 0.0)

    @property
    def message(self) -> str | None:
        value = self.data.get("message")
        return None if value is None else str(value)

    @property
    def error(self) -> str | None:
        value = self.data.get("error")
        return None if value is None else str(value)

    @property
    def model_name(self) -> str:
        return str(self.data["model_name"])

    @property
    def config(self) -> dict[str, Any]:
        return dict(self.data.get("config") or {})

    @property
    def dataset_uri(self) -> str:
        return str(self.data["dataset_s3_uri"])

    @property
    def checkpoint_uri(self) -> str | None:
        value = self.data.get("checkpoint_s3_uri")
        return None if value is None else str(value)

    @property
    def checkpoint_path(self) -> Path | None:
        """The checkpoint's local path when the backend stores on this disk."""
        uri = self.checkpoint_uri
        if uri is None or not uri.startswith("file://"):
            return None
        return Path(unquote(urlparse(uri).path))

    @property
    def per_class(self) -> dict[str, Any] | None:
        """The final checkpoint's validation per class (``metric``,
        ``classes``, ``values``, and for a classifier ``confusion``), from
        the trainer's final report; ``None`` before it or without one."""
        value = self.data.get("per_class")
        return None if value is None else dict(value)

    @property
    def done(self) -> bool:
        return self.status in TERMINAL

    @property
    def priority(self) -> int:
        """Its place in the queue: higher runs first."""
        return int(self.data.get("priority") or 0)

    @property
    def queue_position(self) -> int | None:
        """While it waits for capacity, its place in the queue (1 is next);
        ``None`` once a trainer has it, or before it is started."""
        value = self.data.get("queue_position")
        return None if value is None else int(value)

    # -- actions ----------------------------------------------------------
    def refresh(self) -> Job:
        """Reads the job again; returns ``self``."""
        self.data = self._client._native.get_job(self.id)
        return self

    def start(self) -> Job:
        """Hands the job to a trainer (``pending`` -> ``queued``)."""
        self.data = self._client._native.start_job(self.id)
        return self

    def cancel(self) -> Job:
        """Asks the trainer to stop; the job becomes ``cancelling``, then
        ``cancelled`` (keeping its last checkpoint)."""
        self.data = self._client._native.cancel_job(self.id)
        return self

    def delete(self) -> None:
        """Deletes the finished job with its checkpoints, metrics and events
        (cancel it first if it is under way)."""
        self._client._native.delete_job(self.id)

    def metrics(self) -> Metrics:
        """One dict per finished epoch: ``epoch``, ``loss``, ``val_loss``,
        ``val_accuracy``, ``epoch_seconds``, ``images_per_second``, ..."""
        rows: Metrics = self._client._native.metrics(self.id)
        return rows

    def dataframe(self) -> pandas.DataFrame:
        """The metrics as a pandas DataFrame indexed by epoch (needs pandas)."""
        return metrics_frame(self.metrics())

    def plot(self) -> Figure:
        """Loss and accuracy curves as a matplotlib Figure (needs matplotlib)."""
        return plot_metrics(self.metrics(), title=f"{self.model_name} {self.id[:8]}")

    def events(
        self, poll_interval: float | None = None, timeout: float | None = None
    ) -> Iterator[Event]:
        """Progress and per-epoch metrics as they happen, ending with one
        ``finished`` event: the backend's event stream
        (``GET /training/jobs/{id}/events``), which resumes where it left
        off when the connection drops. Raises ``TimeoutError`` when the job
        has not finished after ``timeout`` seconds. Ctrl-C stops it.
        (``poll_interval`` is accepted for compatibility and unused: nothing
        polls.)"""
        del poll_interval
        deadline = None if timeout is None else time.monotonic() + timeout
        stream = self._client._native.events(self.id)
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                event = stream.next_event(left)
            except TimeoutError:
                raise TimeoutError(
                    f"job {self.id} is still {self.status} after {timeout} s"
                ) from None
            if event is None:
                break
            self.data = event["job"]
            if event["kind"] == "metrics" and event.get("metrics") is not None:
                yield Event("metrics", self.status, self.progress, self.message, event["metrics"])
            else:
                yield Event("progress", self.status, self.progress, self.message)
            if self.done:
                break
        if not self.done:
            self.refresh()
        yield Event("finished", self.status, self.progress, self.message)

    def wait(
        self,
        timeout: float | None = None,
        progress: bool = False,
        poll_interval: float = 0.5,
    ) -> Job:
        """Blocks until the job ends and returns it; raises ``JobFailed``
        with the job's error when it failed, ``TimeoutError`` after
        ``timeout`` seconds. ``progress=True`` draws a progress bar
        (tqdm in notebooks when installed, else a line on stderr)."""
        epochs = int(self.config.get("epochs", 0) or 0)
        bar = ProgressBar(self.id[:8], enabled=progress)
        try:
            for event in self.events(timeout=timeout):
                if event.kind == "metrics" and event.metrics is not None:
                    bar.epoch(event.metrics, epochs)
                bar.update(event.progress, event.status)
        finally:
            bar.close()
        if self.status == "failed":
            raise _vtp.JobFailed(f"job {self.id} failed: {self.error or self.message}")
        return self

    def download_checkpoint(self, dest: PathLike, file: str | None = None) -> Path:
        """Downloads the final checkpoint (weights and sidecar) into the
        directory ``dest``, or ``file``, another file of its set (the
        package engine's ``best.weights.safetensors``, with its sidecar);
        returns the weights' path."""
        return self._client.download_checkpoint(self.id, dest, file)

    def load_checkpoint(self, dest: PathLike | None = None) -> Checkpoint:
        """Opens the final checkpoint for prediction, downloading it into
        ``dest`` (default ``./vtp-checkpoints/<job id>``) unless the backend
        stores it on this disk."""
        local_path = self.checkpoint_path
        if local_path is not None and local_path.exists():
            return load_checkpoint(local_path)
        target = Path(dest) if dest is not None else Path("vtp-checkpoints") / self.id
        return load_checkpoint(self.download_checkpoint(target))

    def __repr__(self) -> str:
        return (
            f"Job(id={self.id!r}, model={self.model_name!r}, status={self.status!r}, "
            f"progress={self.progress:.0%})"
        )


@dataclass
class TrainResult:
    """What :meth:`Client.train` returns."""

    job: Job
    metrics: Metrics
    checkpoint: Path | None
    _loaded: Checkpoint | None = field(default=None, repr=False)

    @property
    def accuracy(self) -> float | None:
        """The best validation accuracy over the epochs."""
        values = [row["val_accuracy"] for row in self.metrics if row.get("val_accuracy") is not None]
        return max(values) if values else None

    @property
    def map(self) -> float | None:
        """A detector's best validation mAP@0.5:0.95 over the epochs."""
        values = [row["map"] for row in self.metrics if row.get("map") is not None]
        return max(values) if values else None

    @property
    def map50(self) -> float | None:
        """A detector's best validation mAP@0.5 over the epochs."""
        values = [row["map50"] for row in self.metrics if row.get("map50") is not None]
        return max(values) if values else None

    def load_checkpoint(self) -> Checkpoint:
        """The trained model, for prediction."""
        if self._loaded is None:
            if self.checkpoint is None:
                raise _vtp.NotFound(f"job {self.job.id} has no checkpoint")
            self._loaded = load_checkpoint(self.checkpoint)
        return self._loaded

    def dataframe(self) -> pandas.DataFrame:
        return metrics_frame(self.metrics)

    def plot(self) -> Figure:
        return plot_metrics(self.metrics, title=f"{self.job.model_name} {self.job.id[:8]}")


class Client:
    """A client of the VTP backend API.

    >>> client = vtp.Client("http://127.0.0.1:8000")  # token: token= or VTP_TOKEN
    >>> # https with a private CA: ca_cert="ca.pem" or VTP_CA_CERT
    >>> dataset = client.upload_dataset("digits/")
    >>> job = client.create_job(dataset, model="resnet18", epochs=5).start()
    >>> job.wait(progress=True).metrics()
    """

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        token: str | None = None,
        timeout: float = 30.0,
        user_id: str | None = None,
        ca_cert: PathLike | None = None,
    ) -> None:
        token = token or os.environ.get("VTP_TOKEN") or None
        # An https backend whose certificate a private CA signed: that CA's
        # PEM file, trusted besides the system's roots.
        ca = ca_cert if ca_cert is not None else os.environ.get("VTP_CA_CERT") or None
        self._native = _vtp.Client(
            base_url,
            token=token,
            timeout=timeout,
            ca_cert=os.fspath(ca) if ca is not None else None,
        )
        # With a token the backend knows the user; without one (a backend
        # with authentication off) jobs need an owner name.
        self.user_id: str | None = user_id or (None if token else _default_user())

    @property
    def base_url(self) -> str:
        return self._native.base_url

    def health(self) -> _schema.Health:
        """The backend's ``/health``."""
        return self._native.health()

    def upload_dataset(
        self, path: PathLike, name: str | None = None, user_id: str | None = None
    ) -> str:
        """Uploads an ImageFolder (a folder, or a zip / tar / tar.gz of one)
        and returns its dataset URI."""
        answer = self._native.upload_dataset(
            os.fspath(path), dataset_name=name, user_id=user_id or self.user_id
        )
        return str(answer["s3_uri"])

    def upload_code(
        self, path: PathLike, name: str | None = None, user_id: str | None = None
    ) -> str:
        """Uploads a training script's code (a folder, or a zip / tar /
        tar.gz of one) and returns its URI, a ``python`` job's
        ``config["code_s3_uri"]``."""
        answer = self._native.upload_code(
            os.fspath(path), code_name=name, user_id=user_id or self.user_id
        )
        return str(answer["s3_uri"])

    def create_job(
        self,
        dataset: str,
        model: str = "small_cnn",
        config: Mapping[str, Any] | None = None,
        user_id: str | None = None,
        priority: int = 0,
        framework: str = "tch",
        **params: Any,
    ) -> Job:
        """Creates a ``pending`` job over a dataset URI. Hyperparameters come
        as ``config`` and/or keyword arguments (``epochs=5, lr=0.01``);
        ``priority`` is its place in the queue (higher runs first). With
        ``framework="python"`` the job runs the user's own script: its config
        names ``code_s3_uri`` (from :meth:`upload_code`) and ``entrypoint``."""
        merged = {**(config or {}), **params}
        data = self._native.create_job(
            dataset,
            model,
            config=merged,
            user_id=user_id or self.user_id,
            framework=framework,
            priority=priority,
        )
        return Job(self, data)

    def get_job(self, job_id: str) -> Job:
        return Job(self, self._native.get_job(job_id))

    def jobs(
        self,
        status: str | None = None,
        user_id: str | None = None,
        limit: int | None = None,
        offset: int | None = None,
    ) -> list[Job]:
        """Jobs, newest first, optionally of one status or user."""
        page = self._native.list_jobs(user_id=user_id, status=status, limit=limit, offset=offset)
        return [Job(self, data) for data in page["jobs"]]

    def start_job(self, job_id: str) -> Job:
        return Job(self, self._native.start_job(job_id))

    def cancel_job(self, job_id: str) -> Job:
        return Job(self, self._native.cancel_job(job_id))

    def delete_job(self, job_id: str) -> None:
        """Deletes a finished job with everything stored for it."""
        self._native.delete_job(job_id)

    def delete_dataset(self, name: str, user_id: str | None = None) -> None:
        """Deletes a dataset (refused while a job under way uses it)."""
        self._native.delete_dataset(name, user_id=user_id or self.user_id)

    def download_checkpoint(self, job_id: str, dest: PathLike, file: str | None = None) -> Path:
        """Downloads a job's final checkpoint into the directory ``dest``
        (or ``file``, another file of its set)."""
        return Path(self._native.download_checkpoint(job_id, os.fspath(dest), file))

    def train(
        self,
        dataset: PathLike,
        model: str = "small_cnn",
        epochs: int = 5,
        progress: bool = True,
        timeout: float | None = None,
        checkpoint_dir: PathLike | None = None,
        **config: Any,
    ) -> TrainResult:
        """Trains ``model`` on ``dataset`` (a local folder or archive, uploaded
        first, or a dataset URI) and waits for it with a progress bar.
        Returns the job, its metrics and the checkpoint's local path
        (downloaded into ``checkpoint_dir`` when the backend is remote).
        Ctrl-C cancels the job."""
        text = os.fspath(dataset)
        uri = text if text.startswith(("s3://", "file://")) else self.upload_dataset(text)
        job = self.create_job(uri, model=model, epochs=epochs, **config).start()
        try:
            job.wait(timeout=timeout, progress=progress)
        except (KeyboardInterrupt, TimeoutError):
            job.cancel()
            raise
        checkpoint = job.checkpoint_path
        if checkpoint is None and job.checkpoint_uri is not None:
            target = Path(checkpoint_dir) if checkpoint_dir else Path("vtp-checkpoints") / job.id
            checkpoint = job.download_checkpoint(target)
        return TrainResult(job=job, metrics=job.metrics(), checkpoint=checkpoint)

    def __repr__(self) -> str:
        return f"Client({self.base_url!r})"


class LocalClient(Client):
    """A :class:`Client` of the platform running in this process
    (:func:`local`). ``close()`` stops it; so does interpreter exit."""

    def __init__(self, platform: _vtp.LocalPlatform, user_id: str | None = None) -> None:
        super().__init__(platform.base_url, user_id=user_id)
        self.platform = platform

    @property
    def root(self) -> Path:
        return Path(self.platform.root)

    def close(self) -> None:
        """Cancels running jobs and stops the in-process servers."""
        self.platform.close()

    def __enter__(self) -> LocalClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"LocalClient(root={str(self.root)!r}, base_url={self.base_url!r})"


_platforms: dict[Path, _vtp.LocalPlatform] = {}
_platforms_lock = threading.Lock()


def local(root: PathLike = ".vtp/local", concurrency: int = 1) -> LocalClient:
    """The platform in this process: SQLite and local disk under ``root``,
    the libtorch trainer on this machine. One platform per ``root`` is
    shared by every call; it stops at interpreter exit."""
    key = Path(root).expanduser().resolve()
    with _platforms_lock:
        platform = _platforms.get(key)
        if platform is None or not platform.running:
            platform = _vtp.LocalPlatform(str(key), concurrency=concurrency)
            _platforms[key] = platform
    return LocalClient(platform)


@atexit.register
def _close_platforms() -> None:
    for platform in list(_platforms.values()):
        try:
            platform.close()
        except BaseException:  # noqa: BLE001 - best effort at exit
            print("vtp: could not stop a local platform cleanly", file=sys.stderr)


def metrics_frame(rows: Metrics) -> pandas.DataFrame:
    """Metric rows as a DataFrame indexed by epoch."""
    try:
        import pandas
    except ImportError as error:  # pragma: no cover - optional dependency
        raise ImportError("metrics as a DataFrame need pandas: pip install pandas") from error
    frame = pandas.DataFrame(rows)
    if "epoch" in frame.columns:
        frame = frame.set_index("epoch")
    if "recorded_at" in frame.columns:
        frame["recorded_at"] = pandas.to_datetime(frame["recorded_at"])
    return frame


def plot_metrics(rows: Metrics, title: str = "") -> Figure:
    """Loss (left) and accuracy (right) per epoch, as a matplotlib Figure."""
    try:
        from matplotlib.figure import Figure
    except ImportError as error:  # pragma: no cover - optional dependency
        raise ImportError("plots need matplotlib: pip install matplotlib") from error
    figure = Figure(figsize=(10, 4), layout="constrained")
    loss_axes, accuracy_axes = figure.subplots(1, 2)
    epochs = [row["epoch"] for row in rows]
    for axes, names, label in (
        (loss_axes, ("loss", "val_loss"), "loss"),
        (accuracy_axes, ("accuracy", "val_accuracy"), "accuracy"),
    ):
        for name in names:
            values = [row.get(name) for row in rows]
            if any(v is not None for v in values):
                axes.plot(epochs, values, marker="o", label=name)
        axes.set_xlabel("epoch")
        axes.set_ylabel(label)
        axes.grid(alpha=0.3)
        if axes.has_data():
            axes.legend()
    if title:
        figure.suptitle(title)
    return figure
