"""Fixtures: a generated image dataset, and the real `vtp-backend` binary on
Postgres and Garage (the services `scripts/services.sh` starts).

Under ``VTP_REQUIRE_SERVICES=1`` (the README's test command) a missing
service or binary fails the tests that need it instead of skipping them.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy
import pytest
from PIL import Image

import vtp

REPO = Path(__file__).resolve().parents[3]
TARGET = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target")) / "debug"
REQUIRE = os.environ.get("VTP_REQUIRE_SERVICES") == "1"

#: Small and fast: 16 px inputs, one libtorch thread, one loader thread.
CONFIG = {"image_size": 16, "batch_size": 16, "threads": 1, "workers": 1, "hflip": False}
CLASSES = ["disc", "square", "stripes"]


def unavailable(reason: str) -> None:
    if REQUIRE:
        pytest.fail(f"{reason} (VTP_REQUIRE_SERVICES=1)")
    pytest.skip(reason)


def shape_image(kind: str, rng: random.Random) -> Image.Image:
    """A 24x24 noisy disc, square outline or stripes, like vtp-trainer's
    `shapes_dataset`."""
    cx, cy = rng.randrange(9, 15), rng.randrange(9, 15)
    colour = numpy.array([rng.randrange(150, 255) for _ in range(3)], dtype=numpy.int16)
    ys, xs = numpy.mgrid[0:24, 0:24]
    dx, dy = xs - cx, ys - cy
    if kind == "disc":
        on = dx * dx + dy * dy <= 25
    elif kind == "square":
        ring = numpy.maximum(abs(dx), abs(dy))
        on = (ring == 5) | (ring == 6)
    else:
        on = ys % 6 < 3
    noise = numpy.array(
        [[rng.randrange(0, 40) for _ in range(24)] for _ in range(24)], dtype=numpy.int16
    )
    pixels = numpy.where(on[..., None], colour - noise[..., None], noise[..., None])
    return Image.fromarray(numpy.clip(pixels, 0, 255).astype(numpy.uint8), "RGB")


def write_shapes(root: Path, per_class: int, seed: int) -> Path:
    rng = random.Random(seed)
    for kind in CLASSES:
        (root / kind).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            ext = "png" if i % 2 == 0 else "jpg"
            shape_image(kind, rng).save(root / kind / f"{i}.{ext}")
    return root


@pytest.fixture(scope="session")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An ImageFolder of three classes, 40 images each."""
    return write_shapes(tmp_path_factory.mktemp("data") / "shapes", 40, seed=11)


@pytest.fixture(scope="session")
def fresh_shapes(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[Path, str]]:
    """Images the model never saw, with their classes."""
    root = write_shapes(tmp_path_factory.mktemp("fresh") / "shapes", 6, seed=99)
    return [(path, kind) for kind in CLASSES for path in sorted((root / kind).iterdir())]


def binary(name: str) -> Path:
    path = TARGET / name
    if not path.is_file():
        unavailable(f"{path} is not built: cargo build -p vtp-server -p vtp-trainer --features vtp-server/torch --bins")
    return path


def fresh_database() -> Iterator[str]:
    """A fresh database on the test Postgres, dropped at the end: each
    backend its own (backends sharing one database are replicas of one
    platform, and its leader launches every job)."""
    admin = os.environ.get("VTP_TEST_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/postgres")
    if shutil.which("psql") is None:
        unavailable("psql is not installed")
    name = f"vtp_py_{uuid.uuid4().hex[:12]}"
    created = subprocess.run(
        ["psql", admin, "-v", "ON_ERROR_STOP=1", "-qc", f"CREATE DATABASE {name}"],
        capture_output=True,
        text=True,
    )
    if created.returncode != 0:
        unavailable(f"Postgres at {admin} is unavailable: {created.stderr.strip()}")
    base, _, _ = admin.rpartition("/")
    yield f"{base}/{name}"
    subprocess.run(
        ["psql", admin, "-qc", f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"],
        capture_output=True,
    )


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A fresh database on the test Postgres, dropped at the end."""
    yield from fresh_database()


@pytest.fixture(scope="session")
def s3_env() -> dict[str, str]:
    """`VTP_BLOB_URL` and `VTP_S3_*` for a fresh prefix of the test bucket."""
    endpoint = os.environ.get("VTP_TEST_S3_ENDPOINT")
    key = os.environ.get("VTP_TEST_S3_ACCESS_KEY_ID")
    secret = os.environ.get("VTP_TEST_S3_SECRET_ACCESS_KEY")
    if not (endpoint and key and secret):
        unavailable("VTP_TEST_S3_ENDPOINT / _ACCESS_KEY_ID / _SECRET_ACCESS_KEY are not set")
    bucket = os.environ.get("VTP_TEST_S3_BUCKET", "vtp-test")
    return {
        "VTP_BLOB_URL": f"s3://{bucket}/py-{uuid.uuid4().hex[:12]}",
        "VTP_S3_ENDPOINT": str(endpoint),
        "VTP_S3_REGION": os.environ.get("VTP_TEST_S3_REGION", "garage"),
        "VTP_S3_ACCESS_KEY_ID": str(key),
        "VTP_S3_SECRET_ACCESS_KEY": str(secret),
        "VTP_S3_ALLOW_HTTP": "true",
    }


@pytest.fixture(scope="session")
def backend(
    postgres_url: str, s3_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """The real `vtp-backend` (subprocess trainer) on Postgres and Garage,
    with tokens required (``VTP_AUTH=tokens``); yields its base URL."""
    work = tmp_path_factory.mktemp("backend")
    env = {
        **os.environ,
        **s3_env,
        "VTP_DATABASE_URL": postgres_url,
        "VTP_LISTEN": "127.0.0.1:0",
        "VTP_LAUNCHER": "subprocess",
        "VTP_TRAINER_BIN": str(binary("vtp-trainer-service")),
        "VTP_WORK_DIR": str(work / "trainer"),
        "VTP_LOG": "info",
        "VTP_AUTH": "tokens",
    }
    yield from run_backend(work, env)


def run_backend(work: Path, env: dict[str, str]) -> Iterator[str]:
    """Runs `vtp-backend` in `work` with `env`; yields its base URL, and
    stops it after."""
    log = (work / "backend.log").open("w")
    process = subprocess.Popen(
        [str(binary("vtp-backend"))],
        cwd=work,
        env=env,
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line.startswith("vtp-backend listening on "):
        process.kill()
        log.close()
        pytest.fail(f"vtp-backend did not start: {(work / 'backend.log').read_text()[-2000:]}")
    url = line.removeprefix("vtp-backend listening on ").strip()
    yield url
    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
    log.close()


def token_maker(database: str) -> Callable[[str], str]:
    """Makes API tokens for users of the backend on `database`, with
    ``vtp-backend token create``."""

    def make(user: str) -> str:
        env = {**os.environ, "VTP_DATABASE_URL": database}
        made = subprocess.run(
            [str(binary("vtp-backend")), "token", "create", "--user", user],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        return made.stdout.strip()

    return make


@pytest.fixture(scope="session")
def make_token(postgres_url: str) -> Callable[[str], str]:
    """Makes an API token for a user of the `backend` fixture."""
    return token_maker(postgres_url)


# The backend that runs Python in its trainer: user code (`framework:
# "python"`) and the ultralytics package engine.


@pytest.fixture(scope="session")
def code_database() -> Iterator[str]:
    yield from fresh_database()


@pytest.fixture(scope="session")
def code_backend(
    code_database: str, s3_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """The backend with user code allowed (`VTP_ALLOW_USER_CODE=true`),
    tokens on, two trainer slots, fast heartbeats, on a database of its own."""
    work = tmp_path_factory.mktemp("code-backend")
    env = {
        **os.environ,
        **s3_env,
        # Its own prefix of the bucket: not the other backend's.
        "VTP_BLOB_URL": s3_env["VTP_BLOB_URL"] + "-code",
        "VTP_DATABASE_URL": code_database,
        "VTP_LISTEN": "127.0.0.1:0",
        "VTP_LAUNCHER": "subprocess",
        "VTP_TRAINER_BIN": str(binary("vtp-trainer-service")),
        "VTP_TRAINER_CONCURRENCY": "2",
        "VTP_WORK_DIR": str(work / "trainer"),
        "VTP_LOG": "info",
        "VTP_AUTH": "tokens",
        "VTP_ALLOW_USER_CODE": "true",
        "VTP_HEARTBEAT_SECS": "2",
        # Scripts never reach the Hugging Face hub (it is allow-listed
        # through to them).
        "HF_HUB_OFFLINE": "1",
        # The scripts' Python: this venv's, where `vtp` and torch are.
        "VIRTUAL_ENV": str(Path(sys.executable).parents[1]),
    }
    yield from run_backend(work, env)


@pytest.fixture(scope="session")
def code_token(code_database: str) -> Callable[[str], str]:
    return token_maker(code_database)


@pytest.fixture(scope="session")
def alice(code_backend: str, code_token: Callable[[str], str]) -> vtp.Client:
    return vtp.Client(code_backend, token=code_token("alice"))
