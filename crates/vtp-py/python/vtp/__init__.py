"""VTP, the Vision Training Platform, from Python.

The same Rust engine as the VTP services, two ways:

* ``vtp.Client(base_url)`` drives a VTP backend over HTTP: datasets, jobs,
  progress events, metrics and checkpoints.
* ``vtp.local()`` runs the platform in this process on embedded defaults
  (SQLite and local disk under ``./.vtp/local``) and returns a client of it:

      >>> import vtp
      >>> result = vtp.local().train(dataset="digits/", model="small_cnn", epochs=5)
      >>> result.accuracy, result.checkpoint

``vtp.run()`` is the SDK inside a user's own training script (a job with
``framework: "python"``): ``run.report(epoch, metrics)``,
``run.save_checkpoint(dir, epoch)``, ``run.restored()``,
``run.should_stop()`` (see ``vtp.run``'s module).

``vtp.load_checkpoint(path)`` opens a trained model for prediction. Errors
are ``vtp.VtpError`` subclasses: ``NotFound``, ``Conflict``,
``InvalidInput``, ``Unavailable``, ``AuthError`` and ``JobFailed``.
"""

from __future__ import annotations

try:
    from . import _vtp
except ImportError as error:  # pragma: no cover - depends on the install
    # The extension links libtorch from the torch wheel through an rpath; where
    # torch lives elsewhere, importing it first loads the same libraries.
    if "libtorch" not in str(error) and "libc10" not in str(error):
        raise
    import torch  # noqa: F401

    from . import _vtp

from ._vtp import (
    AuthError,
    Conflict,
    InvalidInput,
    JobFailed,
    LocalPlatform,
    NotFound,
    Unavailable,
    VtpError,
)
from .checkpoint import Checkpoint, load_checkpoint
from .client import Client, Event, Job, LocalClient, TrainResult, local
from .run import Restored, Run, run

__version__: str = _vtp.__version__

__all__ = [
    "AuthError",
    "Checkpoint",
    "Client",
    "Conflict",
    "Event",
    "InvalidInput",
    "Job",
    "JobFailed",
    "LocalClient",
    "LocalPlatform",
    "NotFound",
    "Restored",
    "Run",
    "TrainResult",
    "Unavailable",
    "VtpError",
    "load_checkpoint",
    "local",
    "run",
]
