"""``python -m vtp.torchrun``: PyTorch's ``torchrun``, with a rank's death
by a signal handed on as the launcher's own.

The trainer runs a job with ``config.distributed`` as::

    python -m vtp.torchrun --standalone --nnodes=1 --nproc-per-node=N train.py ARGS...

which takes torchrun's own arguments and runs its own launcher
(``torch.distributed.run``: the c10d rendezvous, the agent that watches the
ranks and stops them all when one fails). Only its ending differs.
torchrun exits with status 1 whenever a rank fails, whether the rank raised
(a bug in the script: the job fails) or was killed from outside (the OOM
killer, ``kill -9``: the job is relaunched and resumes from its last
checkpoint). The trainer tells those apart by how its child ended, so when
a rank was killed by a signal, this dies of the same signal; otherwise the
first failed rank's exit status is passed on as this process's
(:func:`cause`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure
from torch.distributed.run import get_args_parser, run


def cause(failed: ChildFailedError) -> tuple[int, int]:
    """The rank whose failure ended the run, and its exit code (negative: a
    signal). In order: a rank killed by a signal other than SIGTERM (the
    OOM killer, ``kill -9``, a crash), then the first rank that exited with
    a status of its own, then a SIGTERM: torchrun stops the surviving ranks
    with SIGTERM once one has failed, so those are consequences."""

    def order(item: tuple[int, ProcessFailure]) -> tuple[int, int, int]:
        rank, failure = item
        code = failure.exitcode
        kind = 0 if code < 0 and code != -signal.SIGTERM else 1 if code > 0 else 2
        return kind, failure.timestamp, rank

    rank, failure = min(failed.failures.items(), key=order)
    return rank, failure.exitcode


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        run(args)  # type: ignore[no-untyped-call]
    except ChildFailedError as failed:
        rank, code = cause(failed)
        if code < 0:
            sys.stderr.write(f"vtp.torchrun: rank {rank} was killed by signal {-code}\n")
            sys.stderr.flush()
            with contextlib.suppress(OSError, ValueError):  # SIGKILL has no handler
                signal.signal(-code, signal.SIG_DFL)
            os.kill(os.getpid(), -code)
        sys.stderr.write(f"vtp.torchrun: rank {rank} exited with status {code}\n")
        return code if code > 0 else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
