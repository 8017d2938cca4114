"""The user's own code (`framework: "python"`), end to end: the real backend
on Postgres and Garage with tokens on, its subprocess trainer running
`tests/scripts/train.py` (plain PyTorch) with the venv's Python, and the
`vtp.run()` SDK inside it."""

from __future__ import annotations

import os
import signal
import sys
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import vtp

SCRIPTS = Path(__file__).parent / "scripts"


@pytest.fixture(scope="module")
def uploaded(alice: vtp.Client, shapes: Path) -> tuple[str, str]:
    """Alice's dataset and code URIs."""
    dataset = alice.upload_dataset(shapes, name="shapes")
    code = alice.upload_code(SCRIPTS, name="scripts")
    return dataset, code


def python_job(
    client: vtp.Client,
    uploaded: tuple[str, str],
    epochs: int = 4,
    *,
    model: str = "tiny-mlp",
    entrypoint: str = "train.py",
    **config: object,
) -> vtp.Job:
    """Starts a python job over `uploaded` (a dataset URI, a code URI);
    `config` beside the code, entrypoint and epochs is the script's."""
    dataset, code = uploaded
    job = client.create_job(
        dataset,
        model=model,
        framework="python",
        config={"code_s3_uri": code, "entrypoint": entrypoint, "epochs": epochs, **config},
    )
    return job.start()


def paused_pid(job: vtp.Job, pid_file: Path) -> int:
    """The pid the script writes once it pauses (modes `pause`, `wait`)."""
    deadline = time.monotonic() + 180
    while not pid_file.exists():
        assert time.monotonic() < deadline, job.refresh().data
        time.sleep(0.2)
    return int(pid_file.read_text())


def test_a_script_trains_through_the_backend_and_its_checkpoint_downloads(
    alice: vtp.Client, uploaded: tuple[str, str], tmp_path: Path
) -> None:
    job = python_job(alice, uploaded).wait(timeout=240)
    assert job.status == "completed", job.data
    rows = job.metrics()
    assert [row["epoch"] for row in rows] == [1, 2, 3, 4]
    assert rows[-1]["accuracy"] > rows[0]["accuracy"] or rows[-1]["accuracy"] == 1.0
    assert rows[-1]["loss"] < rows[0]["loss"]
    # Nothing of the backend's or the trainer's secrets in its environment.
    assert all(row["leaked"] == 0 for row in rows)
    path = Path(job.download_checkpoint(tmp_path))
    assert path.name == "best.model.pt"
    saved = torch.load(path)
    assert set(saved) == {"model", "optimizer"}


def test_a_killed_script_is_relaunched_and_resumes_from_its_last_set(
    alice: vtp.Client, uploaded: tuple[str, str], tmp_path: Path
) -> None:
    pid_file = tmp_path / "pid"
    job = python_job(alice, uploaded, mode="pause", pause_after=2, pid_file=str(pid_file))
    pid = paused_pid(job, pid_file)
    # Epoch 2's set is stored before the script pauses (its reply waited).
    os.kill(pid, signal.SIGKILL)
    job.wait(timeout=240)
    assert job.status == "completed", job.data
    rows = job.metrics()
    assert [row["epoch"] for row in rows] == [1, 2, 3, 4], rows
    assert [row["attempt"] for row in rows] == [1, 1, 2, 2]
    # The second attempt restored epoch 2's set.
    assert [row["resumed_from"] for row in rows] == [0, 0, 2, 2]
    assert "signal 9" in str(job.data["attempts"][0]["reason"]), job.data["attempts"]


def test_a_cancelled_script_stops_and_keeps_its_last_checkpoint(
    alice: vtp.Client, uploaded: tuple[str, str], tmp_path: Path
) -> None:
    pid_file = tmp_path / "pid"
    job = python_job(alice, uploaded, mode="wait", pause_after=1, pid_file=str(pid_file))
    paused_pid(job, pid_file)
    job.cancel()
    job.wait(timeout=120)
    # It saw should_stop() turn true (the trainer's SIGTERM), left on its
    # own, and its last saved checkpoint was kept.
    assert job.status == "cancelled", job.data
    assert [row["epoch"] for row in job.metrics()] == [1]
    assert job.checkpoint_uri is not None and job.checkpoint_uri.endswith("last.model.pt")


def test_a_failing_script_fails_the_job_with_its_stderr(
    alice: vtp.Client, uploaded: tuple[str, str]
) -> None:
    job = python_job(alice, uploaded, mode="fail", max_attempts=1)
    with pytest.raises(vtp.JobFailed):
        job.wait(timeout=120)
    assert "exited with status 1" in str(job.error)
    assert "ValueError: boom: the script's own bug" in str(job.error)


def test_a_silent_script_is_stopped_as_hung(alice: vtp.Client, uploaded: tuple[str, str]) -> None:
    job = python_job(alice, uploaded, mode="hang", report_timeout_secs=3, max_attempts=1)
    with pytest.raises(vtp.JobFailed):
        job.wait(timeout=120)
    assert "stopped as hung" in str(job.error), job.error


def test_a_missing_entrypoint_fails_the_job_naming_it(
    alice: vtp.Client, uploaded: tuple[str, str]
) -> None:
    job = python_job(alice, uploaded, epochs=1, entrypoint="nowhere.py")
    with pytest.raises(vtp.JobFailed):
        job.wait(timeout=120)
    assert "config.entrypoint" in str(job.error) and "nowhere.py" in str(job.error)


def test_bad_python_jobs_are_refused_at_create_naming_the_field(
    alice: vtp.Client,
    uploaded: tuple[str, str],
    code_token: Callable[[str], str],
    code_backend: str,
) -> None:
    dataset, code = uploaded
    mallory = vtp.Client(code_backend, token=code_token("mallory"))
    their_dataset = mallory.upload_dataset(SCRIPTS.parent / "scripts", name="m")

    def field_of(client: vtp.Client, data: str, config: dict[str, object]) -> str:
        with pytest.raises(vtp.InvalidInput) as refused:
            client.create_job(data, model="m", framework="python", config=config)
        return str(refused.value)

    # Another user's code archive.
    assert "config.code_s3_uri" in field_of(
        mallory, their_dataset, {"code_s3_uri": code, "entrypoint": "train.py"}
    )
    # No entrypoint; one that climbs out of the archive; no archive there.
    assert "config.entrypoint" in field_of(alice, dataset, {"code_s3_uri": code})
    assert "config.entrypoint" in field_of(
        alice, dataset, {"code_s3_uri": code, "entrypoint": "../x.py"}
    )
    missing = code.rsplit("/", 1)[0] + f"/{uuid.uuid4().hex}.zip"
    assert "config.code_s3_uri" in field_of(
        alice, dataset, {"code_s3_uri": missing, "entrypoint": "train.py"}
    )
    # Ranks on several machines: only the Kubernetes launcher runs them.
    assert "config.distributed.nnodes" in field_of(
        alice,
        dataset,
        {"code_s3_uri": code, "entrypoint": "ddp.py", "distributed": {"nproc_per_node": 1, "nnodes": 2}},
    )


def test_a_backend_that_does_not_allow_user_code_refuses_python_jobs(
    backend: str, make_token: Callable[[str], str], shapes: Path
) -> None:
    bob = vtp.Client(backend, token=make_token("bob"))
    dataset = bob.upload_dataset(shapes, name="shapes")
    code = bob.upload_code(SCRIPTS, name="scripts")
    with pytest.raises(vtp.InvalidInput) as refused:
        bob.create_job(
            dataset,
            model="m",
            framework="python",
            config={"code_s3_uri": code, "entrypoint": "train.py"},
        )
    assert "framework" in str(refused.value) and "VTP_ALLOW_USER_CODE" in str(refused.value)


def test_outside_a_job_the_sdk_is_a_local_run_that_prints(
    capsys: pytest.CaptureFixture[str],
) -> None:
    before = signal.getsignal(signal.SIGTERM)
    try:
        run = vtp.run(epochs=2, config={"lr": 0.1})
        assert run.local and run.restored() is None and run.epochs == 2
        run.report(1, {"loss": 0.5})
        assert run.save_checkpoint("out/", 1) is None
        assert not run.should_stop()
        # A SIGTERM asks the run to stop; it does not end the process.
        os.kill(os.getpid(), signal.SIGTERM)
        assert run.should_stop()
    finally:
        signal.signal(signal.SIGTERM, before)
    assert "epoch 1/2: loss 0.5" in capsys.readouterr().out


@pytest.fixture(scope="module")
def digits_example(alice: vtp.Client, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """The digits ImageFolder and examples/user_code, uploaded by Alice."""
    repo = Path(__file__).resolve().parents[3]
    out = tmp_path_factory.mktemp("digits")
    subprocess.run([sys.executable, str(repo / "examples/digits/export_digits.py"), str(out)], check=True)
    dataset = alice.upload_dataset(out / "digits.zip", name="digits")
    return dataset, alice.upload_code(repo / "examples/user_code", name="example")


def example_job(alice: vtp.Client, digits_example: tuple[str, str], **config: object) -> vtp.Job:
    model = "digits-" + str(config.get("backbone", "cnn")).replace("/", "-")
    return python_job(alice, digits_example, epochs=3, model=model, **config)


def test_the_plain_pytorch_example_learns_the_digits_through_the_backend(
    alice: vtp.Client, digits_example: tuple[str, str]
) -> None:
    job = example_job(alice, digits_example, lr=0.1).wait(timeout=300)
    rows = job.metrics()
    assert [row["epoch"] for row in rows] == [1, 2, 3]
    assert rows[-1]["val_accuracy"] > 0.8, rows
    assert job.checkpoint_uri is not None and job.checkpoint_uri.endswith("best.state.pt")


def test_the_timm_and_transformers_examples_learn_the_digits_through_the_backend(
    alice: vtp.Client, digits_example: tuple[str, str]
) -> None:
    # Both built from their libraries' configs (nothing downloaded), both
    # jobs at once (the backend has two trainer slots). Chance is 0.1.
    timm = example_job(alice, digits_example, backbone="timm/resnet10t", size=16, lr=0.05)
    vit = example_job(alice, digits_example, backbone="hf/vit", size=16, lr=0.002, optimizer="adamw")
    # timm's resnet10t has about 4.9M parameters, this ViT about 70k, the
    # example's own CNN 2.7k: each job trained the model it named.
    for job, floor, size in ((timm, 0.8, (4e6, 6e6)), (vit, 0.5, (5e4, 1e5))):
        job.wait(timeout=600)
        assert job.status == "completed", job.data
        rows = job.metrics()
        assert [row["epoch"] for row in rows] == [1, 2, 3]
        assert size[0] < rows[-1]["parameters"] < size[1], rows
        assert rows[-1]["val_accuracy"] > floor, (job.data["config"], rows)
        assert rows[-1]["val_loss"] < rows[0]["val_loss"], rows


def test_the_local_platform_runs_python_jobs_with_this_interpreter(
    shapes: Path, tmp_path: Path
) -> None:
    client = vtp.local(tmp_path / "local")
    try:
        dataset = client.upload_dataset(shapes, name="shapes")
        code = client.upload_code(SCRIPTS, name="scripts")
        job = python_job(client, (dataset, code), epochs=2)
        job.wait(timeout=120)
        assert [row["epoch"] for row in job.metrics()] == [1, 2]
        assert job.checkpoint_path is not None and job.checkpoint_path.name == "best.model.pt"
    finally:
        client.close()


def ddp_job(
    client: vtp.Client, uploaded: tuple[str, str], nproc: int, batch: int, **config: object
) -> vtp.Job:
    return python_job(
        client,
        uploaded,
        model="tiny-ddp",
        entrypoint="ddp.py",
        batch=batch,
        distributed={"nproc_per_node": nproc},
        **config,
    )


def test_two_gloo_ranks_under_torchrun_learn_as_one_process_with_the_doubled_batch(
    alice: vtp.Client, uploaded: tuple[str, str], tmp_path: Path
) -> None:
    two = ddp_job(alice, uploaded, nproc=2, batch=8)
    one = ddp_job(alice, uploaded, nproc=1, batch=16)
    for job in (two, one):
        job.wait(timeout=300)
        assert job.status == "completed", job.data
    rows_two, rows_one = two.metrics(), one.metrics()
    # Every epoch once, and only rank 0's reports (every rank sent them).
    assert [row["epoch"] for row in rows_two] == [1, 2, 3, 4]
    assert {(row["rank"], row["world"]) for row in rows_two} == {(0, 2)}
    assert {(row["rank"], row["world"]) for row in rows_one} == {(0, 1)}
    for a, b in zip(rows_two, rows_one, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-6), (rows_two, rows_one)
    assert rows_two[-1]["loss"] < rows_two[0]["loss"]
    saved = torch.load(two.download_checkpoint(tmp_path))
    assert set(saved) == {"model", "optimizer"}


def test_a_killed_rank_ends_the_attempt_and_the_relaunch_resumes(
    alice: vtp.Client, uploaded: tuple[str, str], tmp_path: Path
) -> None:
    pid_file = tmp_path / "pid"
    job = ddp_job(
        alice, uploaded, nproc=2, batch=8, mode="pause", pause_after=2, pause_rank=1,
        pid_file=str(pid_file),
    )
    os.kill(paused_pid(job, pid_file), signal.SIGKILL)
    job.wait(timeout=300)
    assert job.status == "completed", job.data
    rows = job.metrics()
    assert [row["epoch"] for row in rows] == [1, 2, 3, 4], rows
    assert [row["attempt"] for row in rows] == [1, 1, 2, 2]
    assert [row["resumed_from"] for row in rows] == [0, 0, 2, 2]
    reason = str(job.data["attempts"][0]["reason"])
    assert "signal 9" in reason and "rank 1" in reason, job.data["attempts"]
