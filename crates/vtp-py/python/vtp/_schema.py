"""The backend's wire types, generated from its OpenAPI document: do not edit.

Regenerate with ``VTP_UPDATE_OPENAPI=1 cargo test -p vtp-server --all-features
--test openapi`` (see ``crates/vtp-server/tests/openapi.rs``).
"""

from __future__ import annotations

from typing import Any, Literal, TypedDict

#: Bytes of a file, streamed (`application/octet-stream`).
Binary = bytes

#: Where to train.
DeviceChoice = Literal["auto", "cpu", "cuda"]

#: One epoch of `GET /training/jobs/{id}/metrics`: `epoch`, `recorded_at` and every value the trainer reported for it (`loss`, `accuracy`, `val_loss`, `mAP50-95`, ...).
EpochMetrics = dict[str, Any]

#: What one change did.
EventKind = Literal["status", "metrics", "progress"]

#: The `framework` of a job: which family of models, dataset layout, loss and metrics it means.
Framework = Literal["tch", "ultralytics", "python"]

#: A job's identifier: a UUID (version 7, so ids sort by creation time).
JobId = str

#: Where a training job is in its life.
JobStatus = Literal["pending", "queued", "running", "completed", "failed", "cancelling", "cancelled"]

#: Which optimizer updates the weights.
OptimizerKind = Literal["auto", "sgd", "adamw"]


class AttemptEnded(TypedDict):
    """How one attempt at a job ended: its runner was lost (a killed trainer, an evicted pod, a backend that restarted without it) and the job was relaunched or failed."""

    #: The attempt's number (1 is the first).
    attempt: int
    #: When it was found ended.
    ended_at: str
    #: Why.
    reason: str


class CallbackAck(TypedDict):
    """The answer of `POST /training/jobs/{id}/callback`."""

    #: Whether the report changed the job; `false` for a replay or an older report (by `seq`).
    applied: bool
    #: The job's status after the report.
    job_status: JobStatus
    #: Always `ok`: the report was taken (applied or known already).
    status: str


class _ClassReportRequired(TypedDict):
    #: What `values` holds: `accuracy` (classify: the share of a class's validation images predicted as it) or `map` (detect: mAP50-95).
    metric: str
    #: Per class, in the model's order; `null` for a class without validation images (ground truth).
    values: list[float | None]


class ClassReport(_ClassReportRequired, total=False):
    """Validation per class."""

    #: The class names, in the model's order (empty in a checkpoint's sidecar, whose `class_names` hold them).
    classes: list[str]
    #: Classify: `confusion[true][predicted]`, validation images counted (up to [`ClassReport::MAX_CONFUSION`] classes).
    confusion: list[list[int]] | None


class _CodeUploadFormRequired(TypedDict):
    #: The code archive (zip, tar or tar.gz) holding the entrypoint.
    file: bytes


class CodeUploadForm(_CodeUploadFormRequired, total=False):
    """The multipart form of a code upload."""

    #: The code's name (letters, digits, `-`, `_`, `.`).
    code_name: str | None
    #: The owner (letters, digits, `-`, `_`, `.`).
    user_id: str | None


class ErrorBody(TypedDict):
    """Every failure: `{"error": {"code", "message", "field"?}}`."""

    #: What went wrong.
    error: ErrorDetail


class _ErrorDetailRequired(TypedDict):
    #: A stable, machine-readable category: `invalid_input`, `not_found`, `conflict`, `unauthenticated`, `forbidden`, `rate_limited`, `too_large`, `unavailable`, ...
    code: str
    #: What a person should read.
    message: str


class ErrorDetail(_ErrorDetailRequired, total=False):
    """The inside of an [`ErrorBody`]."""

    #: The offending field, dotted for nested ones (`config.epochs`), for `invalid_input`.
    field: str | None


class _HealthRequired(TypedDict):
    #: `ok`, or `degraded` when the job store does not answer (with 503).
    status: str


class Health(_HealthRequired, total=False):
    """The answer of `GET /health` (the backend's)."""

    #: Where datasets and checkpoints are stored (`file:///...`, `s3://...`).
    blob_store: str | None
    #: `ok` or `unavailable`.
    database: str | None
    #: Which launcher starts trainers: `subprocess`, `http`, `kubernetes`.
    launcher: str | None
    #: The backend's version.
    version: str | None


class _JobRequired(TypedDict):
    #: How many times the job has been handed to a launcher: the current attempt, counting from 1 once started.
    attempt: int
    #: Hyperparameters, a JSON object.
    config: Any
    #: When the job was created.
    created_at: str
    #: Where the dataset lives: `s3://bucket/key` or `file:///path`.
    dataset_s3_uri: str
    #: Training framework, e.g.
    framework: str
    #: Identifier.
    id: JobId
    #: Highest [`crate::TrainingReport::seq`] applied so far (0: none).
    last_seq: int
    #: Model architecture, e.g.
    model_name: str
    #: Fraction done, `0.0..=1.0`.
    progress: float
    #: Bumped on every stored change; the optimistic-lock token.
    revision: int
    #: Life-cycle state.
    status: JobStatus
    #: When the job last changed.
    updated_at: str
    #: Who owns the job.
    user_id: str


class Job(_JobRequired, total=False):
    """A training job as the platform records it."""

    #: How each earlier attempt ended, oldest first.
    attempts: list[AttemptEnded]
    #: Where its trainer reports (the seed's `callback_url`, `{public URL}/training/jobs/{id}/callback`): filled in by the backend in its answers, not stored (it follows the backend's public URL).
    callback_url: str | None
    #: Where the final checkpoint was stored.
    checkpoint_s3_uri: str | None
    #: How many epochs it trains: `config.epochs` with the default of its model's task filled in.
    epochs: int
    #: Why the job failed, when it did.
    error: str | None
    #: When the job reached a terminal state.
    finished_at: str | None
    #: The weights of the newest complete checkpoint set stored during training (`jobs/{id}/epochs/{n}/last.safetensors`): what a relaunched attempt resumes from, and what a job that failed still offers.
    last_checkpoint_s3_uri: str | None
    #: When the current attempt was handed to a launcher.
    launched_at: str | None
    #: Last human-readable message from the trainer or the platform.
    message: str | None
    #: The earliest time the next attempt may be launched: a job that keeps losing its runner waits longer before each relaunch.
    not_before: str | None
    per_class: None | ClassReport
    #: Its place in the queue: higher runs first; then the user with the fewest jobs running, then the oldest start.
    priority: int
    #: For a job waiting for capacity: its place in the queue, 1 being next (filled in by the backend in its answers, not stored).
    queue_position: int | None
    #: When the job was started (moved to `queued`): its age in the queue.
    queued_at: str | None
    #: When the trainer first reported `running`.
    started_at: str | None


class _JobEventRequired(TypedDict):
    #: The job as the change left it, without its `config` (`null`: it never changes, and is the job's own; the event stream puts it back).
    job: Job
    #: What the change did.
    kind: EventKind
    #: The job's revision after the change: its creation's, then one more for every change.
    revision: int


class JobEvent(_JobEventRequired, total=False):
    """One change of a job, as stored beside it."""

    metrics: None | EpochMetrics


class JobPage(TypedDict):
    """One page of jobs, newest first."""

    #: The jobs on this page.
    jobs: list[Job]
    #: The page size used.
    limit: int
    #: The offset used.
    offset: int
    #: How many jobs match the filter in all.
    total: int


class _NewJobRequired(TypedDict):
    #: Dataset location, checked for form here and for existence at start.
    dataset_s3_uri: str
    #: Training framework: `tch` and `ultralytics` train a model of the catalog on VTP's engine (or the `ultralytics` package's), `python` runs the user's own code.
    framework: Framework
    #: Model architecture: a name of the catalog (the trainer service's `GET /models`), or for `python` the user's own name for it.
    model_name: str


class NewJob(_NewJobRequired, total=False):
    """What a user sends to create a job."""

    #: Hyperparameters; an object, `{}` when left out.
    config: TrainConfig
    #: Its place in the queue (default 0): higher runs first.
    priority: int
    #: Who owns the job; with authentication on, filled in from the token when left out.
    user_id: str


class Resources(TypedDict, total=False):
    """What a trainer asks of the machine it runs on, from `config.resources` of a job: `{"cpu": "2", "memory": "4Gi", "gpu": 1}`."""

    #: CPU as a Kubernetes quantity: `"2"`, `"500m"`.
    cpu: str | None
    #: Whole GPUs (`nvidia.com/gpu`).
    gpu: int | None
    #: Memory as a Kubernetes quantity: `"4Gi"`.
    memory: str | None


class Started(TypedDict):
    """The answer of `POST /training/jobs/{id}/start`."""

    #: The job, `queued` (or further along if its trainer reported already).
    job: Job
    #: Always `started`.
    status: str


class TrainConfig(TypedDict, total=False):
    """The hyperparameters of one training run."""

    #: Mixed precision: the forward pass under autocast, in bfloat16 on CPU or float16 on CUDA (with gradient scaling); weights, optimizer state and losses stay float32.
    amp: bool
    #: Images per step.
    batch_size: int
    #: Detection: box (CIoU) loss gain.
    box: float
    #: Detection: the last epochs trained without mosaic.
    close_mosaic: int
    #: Detection: classification loss gain.
    cls: float
    #: Detection: confidence threshold of validation NMS.
    conf: float
    device: DeviceChoice
    #: Detection: distribution focal loss gain.
    dfl: float
    #: Passes over the training set.
    epochs: int
    #: Detection: probability of a horizontal flip.
    fliplr: float
    #: Random horizontal flip augmentation (off for digits and text).
    hflip: bool
    #: Detection: hue jitter (fraction).
    hsv_h: float
    #: Detection: saturation jitter (fraction).
    hsv_s: float
    #: Detection: value jitter (fraction).
    hsv_v: float
    #: Side of the square images fed to the model.
    image_size: int
    #: Weights to start from: a safetensors file with the model's parameter names (for YOLO, an Ultralytics `state_dict` converted by `scripts/ultralytics_to_safetensors.py`).
    init_weights: str | None
    #: Detection: IoU threshold of NMS.
    iou: float
    #: Learning rate.
    lr: float
    #: Detection: final learning rate as a fraction of `lr` (linear decay).
    lrf: float
    #: How many times the platform launches the job in all before a lost runner fails it ([`crate::Job::max_attempts`]); read by the backend, not by training.
    max_attempts: int | None
    #: Detection: most detections kept per image.
    max_det: int
    #: Architecture: `small_cnn`, `resnet18`, `resnet34`, `mobilenet_v2`.
    model: str
    #: SGD momentum.
    momentum: float
    #: Detection: probability of a four-image mosaic (0 turns it off).
    mosaic: float
    #: Detection: nominal batch size; gradients accumulate over `nbs / batch_size` batches and weight decay scales with it.
    nbs: int
    optimizer: OptimizerKind
    #: Early stopping, with Ultralytics' semantics: the run ends (`completed`, with the reason) once this many epochs have passed since the validation fitness last rose; 0 or absent turns it off.
    patience: int | None
    #: Random crop augmentation.
    random_crop: bool
    resources: None | Resources
    #: Continue from the `last` checkpoint in the output directory, if any.
    resume: bool
    #: Detection: random scale gain (`1 ± scale`).
    scale: float
    #: Seed for initialisation, shuffling, splitting and augmentation.
    seed: int
    #: libtorch threads; 0 means one per core.
    threads: int
    #: A wall-clock limit in hours: the attempt finishes the epoch in which it runs out (cut short there, then validated and saved) and ends `completed`, with the reason.
    time: float | None
    #: Detection: random translation, as a fraction of the image side.
    translate: float
    #: Fraction held out for validation when the dataset has no `val/` split.
    val_split: float
    #: Detection: the biases' learning rate at the start of warm-up.
    warmup_bias_lr: float
    #: Detection: warm-up length in epochs (at most all but the last epoch).
    warmup_epochs: float
    #: Detection: momentum at the start of warm-up.
    warmup_momentum: float
    #: Weight decay (L2 for SGD, decoupled for AdamW).
    weight_decay: float
    #: Input pipeline worker threads.
    workers: int


class _TrainingReportRequired(TypedDict):
    #: What the trainer says the job is doing.
    status: JobStatus


class TrainingReport(_TrainingReportRequired, total=False):
    """What a trainer posts to `POST /training/jobs/{id}/callback`."""

    #: The attempt reporting (from the start request).
    attempt: int | None
    #: Where the checkpoint was stored.
    checkpoint_s3_uri: str | None
    #: Why the job failed.
    error: str | None
    job_id: None | JobId
    #: The newest complete checkpoint set stored during training (its `last` weights), to resume from.
    last_checkpoint_s3_uri: str | None
    #: Human-readable progress message.
    message: str | None
    #: Named metrics of one epoch; must hold an integral `epoch`.
    metrics: dict[str, float] | None
    per_class: None | ClassReport
    #: Fraction done, `0.0..=1.0`.
    progress: float | None
    #: With `failed`: the attempt was interrupted by something that may not happen again (the trainer was told to stop by its machine, an outage outlasted its retries), not by the job itself.
    retryable: bool
    #: Per-job event number, starting at 1.
    seq: int | None


class _UploadFormRequired(TypedDict):
    #: The dataset archive (zip or tar.gz; an ImageFolder or a YOLO dataset) or any single file.
    file: bytes


class UploadForm(_UploadFormRequired, total=False):
    """The multipart form of an upload, as the seed's curl sends it."""

    #: The dataset's name (letters, digits, `-`, `_`, `.`).
    dataset_name: str | None
    #: The owner (letters, digits, `-`, `_`, `.`).
    user_id: str | None


class Uploaded(TypedDict):
    """The answer of `POST /datasets/upload`."""

    #: Dataset name.
    dataset_name: str
    #: The stored file name.
    filename: str
    #: Where the file landed: `s3://bucket/users/...` or `file:///...`; what a job's `dataset_s3_uri` names.
    s3_uri: str
    #: Bytes stored.
    size: int
    #: Owner.
    user_id: str


class UploadedCode(TypedDict):
    """The answer of `POST /code/upload`."""

    #: The code's name.
    code_name: str
    #: The stored file name.
    filename: str
    #: Where the archive landed; what a `python` job's `config.code_s3_uri` names.
    s3_uri: str
    #: Bytes stored.
    size: int
    #: Owner.
    user_id: str
