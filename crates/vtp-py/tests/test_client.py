"""`vtp.Client` against the real backend binary on Postgres and Garage: the
whole life cycle, the event stream, checkpoints, and errors for bad input."""

from __future__ import annotations

import _thread
import signal
import socket
import sys
import threading
import time
import uuid
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import vtp
from conftest import CLASSES, CONFIG, REPO

sys.path.insert(0, str(REPO / "benches" / "peers"))
from vtp_models import SmallCnn, load_vtp_weights  # noqa: E402


@pytest.fixture(scope="module")
def client(backend: str, make_token: Callable[[str], str]) -> vtp.Client:
    return vtp.Client(backend, token=make_token(f"py-{uuid.uuid4().hex[:8]}"))


def test_tokens_are_required_and_come_from_the_environment(
    backend: str, make_token: Callable[[str], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(vtp.AuthError, match="Bearer"):
        vtp.Client(backend).jobs()
    with pytest.raises(vtp.AuthError):
        vtp.Client(backend, token="vtp_" + "0" * 64).jobs()
    monkeypatch.setenv("VTP_TOKEN", make_token("py-env"))
    assert vtp.Client(backend).jobs() == []


@pytest.fixture(scope="module")
def dataset(client: vtp.Client, shapes: Path) -> str:
    return client.upload_dataset(shapes)


def test_a_job_trains_streams_its_events_and_its_checkpoint_predicts(
    client: vtp.Client,
    dataset: str,
    tmp_path: Path,
    fresh_shapes: list[tuple[Path, str]],
) -> None:
    assert dataset.startswith("s3://") and dataset.endswith("/shapes.zip"), dataset
    job = client.create_job(dataset, model="small_cnn", epochs=3, **CONFIG)
    assert job.status == "pending" and job.config["epochs"] == 3
    assert job.start().status in ("queued", "running", "completed")

    events = list(job.events(poll_interval=0.1, timeout=300))
    assert events[-1].kind == "finished" and events[-1].status == "completed", events
    epochs = [e.metrics["epoch"] for e in events if e.kind == "metrics" and e.metrics]
    assert epochs == [1, 2, 3], "every epoch exactly once, in order"
    progress = [e.progress for e in events if e.kind == "progress"]
    assert progress == sorted(progress) and progress[-1] == 1.0, progress

    # The same job through every read path.
    finished = client.get_job(job.id)
    assert finished.status == "completed"
    # The final report's validation per class: each class's accuracy is
    # its row of the confusion matrix, read off the diagonal.
    per_class = finished.per_class
    assert per_class is not None and per_class["classes"] == CLASSES, finished.data
    for c, (row, accuracy) in enumerate(zip(per_class["confusion"], per_class["values"])):
        assert len(row) == len(CLASSES) and sum(row) > 0, per_class
        assert accuracy == pytest.approx(row[c] / sum(row)), per_class
    assert job.id in {j.id for j in client.jobs(user_id=client.user_id)}
    assert job.id in {j.id for j in client.jobs(status="completed", limit=100)}
    metrics = job.metrics()
    assert [row["epoch"] for row in metrics] == [1, 2, 3]
    assert metrics[-1]["loss"] < metrics[0]["loss"], metrics
    frame = job.dataframe()
    assert list(frame.index) == [1, 2, 3] and "val_accuracy" in frame.columns
    figure = job.plot()
    loss_axes, accuracy_axes = figure.axes[:2]
    assert {line.get_label() for line in loss_axes.get_lines()} >= {"loss", "val_loss"}
    assert "val_accuracy" in {line.get_label() for line in accuracy_axes.get_lines()}

    # Download: weights and sidecar; the model predicts images it never saw.
    weights = job.download_checkpoint(tmp_path / "checkpoint")
    assert weights.name == "best.safetensors" and (weights.parent / "best.json").is_file()
    checkpoint = vtp.load_checkpoint(weights)
    assert checkpoint.class_names == CLASSES
    assert checkpoint.model == "small_cnn" and checkpoint.config["epochs"] == 3
    predictions = checkpoint.predict([path for path, _ in fresh_shapes])
    right = sum(p["class"] == kind for p, (_, kind) in zip(predictions, fresh_shapes))
    assert right / len(fresh_shapes) > 0.6, predictions
    single = checkpoint(str(fresh_shapes[0][0]))
    assert single["class"] == predictions[0]["class"], "a single image, a single prediction"
    assert single["probability"] == pytest.approx(predictions[0]["probability"], abs=1e-5)

    # The same weights load in PyTorch and compute the same logits.
    model = SmallCnn(len(CLASSES))
    load_vtp_weights(model, load_file(checkpoint.weights))
    model.eval()
    images = [path for path, _ in fresh_shapes[:4]]
    side = checkpoint.image_size
    inputs = torch.tensor(checkpoint.preprocess(images)).view(len(images), 3, side, side)
    with torch.no_grad():
        theirs = model(inputs)
    ours = torch.tensor(checkpoint.logits(images))
    assert torch.allclose(ours, theirs, atol=1e-4), (ours, theirs)


def test_cancel_and_wait(client: vtp.Client, dataset: str) -> None:
    job = client.create_job(dataset, model="small_cnn", epochs=200, **CONFIG).start()
    deadline = time.monotonic() + 120
    while job.refresh().status != "running":
        assert time.monotonic() < deadline, job
        time.sleep(0.1)
    assert job.cancel().status in ("cancelling", "cancelled")
    finished = job.wait(timeout=120)
    assert finished is job and job.status == "cancelled", job.data
    assert len(job.metrics()) < 200


def test_a_waiting_job_shows_its_place_and_a_finished_one_is_deleted(
    client: vtp.Client, dataset: str, shapes: Path
) -> None:
    # The backend runs one job at a time (the subprocess trainer's one slot).
    first = client.create_job(dataset, model="small_cnn", epochs=200, **CONFIG).start()
    deadline = time.monotonic() + 120
    while first.refresh().status != "running":
        assert time.monotonic() < deadline, first
        time.sleep(0.1)
    second = client.create_job(dataset, model="small_cnn", epochs=1, **CONFIG).start()
    assert second.status == "queued" and second.queue_position == 1, second.data
    assert second.refresh().queue_position == 1
    first.cancel()
    assert first.wait(timeout=120).status == "cancelled"
    assert second.wait(timeout=300).status == "completed", second.data
    assert second.queue_position is None
    # A user may not raise a job above the backend's limit.
    with pytest.raises(vtp.InvalidInput, match="priority"):
        client.create_job(dataset, epochs=1, priority=5, **CONFIG)
    # Deleted with everything stored for it: gone.
    second.delete()
    with pytest.raises(vtp.NotFound):
        client.get_job(second.id)
    # A dataset no job under way uses can go too, once.
    name = f"gone-{uuid.uuid4().hex[:8]}"
    client.upload_dataset(shapes, name=name)
    client.delete_dataset(name)
    with pytest.raises(vtp.NotFound):
        client.delete_dataset(name)


def test_a_failing_job_raises_job_failed_with_the_reason(
    client: vtp.Client, tmp_path: Path
) -> None:
    hostile = tmp_path / "hostile.zip"
    with zipfile.ZipFile(hostile, "w") as archive:
        archive.writestr("../../escape.png", b"not really")
        archive.writestr("cats/0.png", b"not really")
    uri = client.upload_dataset(hostile)
    job = client.create_job(uri, epochs=1, **CONFIG).start()
    with pytest.raises(vtp.JobFailed) as failed:
        job.wait(timeout=120)
    assert isinstance(failed.value, vtp.VtpError)
    assert "escape.png" in str(failed.value) or "outside" in str(failed.value), failed.value
    assert job.status == "failed" and job.error


def test_bad_input_raises_the_matching_error_with_the_servers_message(
    client: vtp.Client, dataset: str, tmp_path: Path
) -> None:
    with pytest.raises(vtp.NotFound, match="not found"):
        client.get_job(str(uuid.uuid4()))
    with pytest.raises(vtp.InvalidInput, match="job_id"):
        client.get_job("not-a-uuid")
    with pytest.raises(vtp.InvalidInput, match="dataset_s3_uri"):
        client.create_job("ftp://elsewhere/data.zip")
    with pytest.raises(vtp.InvalidInput, match="config"):
        client.create_job(dataset, config={"bad": object()})
    with pytest.raises(vtp.InvalidInput, match="no dataset"):
        client.create_job(dataset.replace("shapes.zip", "missing.zip")).start()
    with pytest.raises(vtp.InvalidInput, match="model"):
        client.create_job(dataset, model="no_such_net", epochs=1).start()

    pending = client.create_job(dataset, epochs=1)
    assert pending.cancel().status == "cancelled"
    with pytest.raises(vtp.Conflict, match="only a pending job"):
        pending.start()
    with pytest.raises(vtp.NotFound, match="no checkpoint"):
        pending.download_checkpoint(tmp_path)

    with pytest.raises(vtp.NotFound):
        client.upload_dataset(tmp_path / "missing")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(vtp.InvalidInput, match="not a .zip"):
        client.upload_dataset(tmp_path / "notes.txt")
    with pytest.raises(vtp.InvalidInput):
        vtp.Client("ftp://example.invalid")

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        dead = probe.getsockname()[1]
    with pytest.raises(vtp.Unavailable):
        vtp.Client(f"http://127.0.0.1:{dead}", timeout=2).health()
    for error in (vtp.NotFound, vtp.Conflict, vtp.InvalidInput, vtp.Unavailable, vtp.JobFailed):
        assert issubclass(error, vtp.VtpError)


def test_ctrl_c_interrupts_a_blocking_call() -> None:
    """A server that accepts and never answers: the call blocks in Rust with
    the GIL released, and Ctrl-C (here `interrupt_main`) ends it at once."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    held: list[socket.socket] = []
    threading.Thread(target=lambda: held.append(server.accept()[0]), daemon=True).start()
    ticks: list[float] = []
    done = threading.Event()

    # Ctrl-C raises once; interrupts that arrive after it (the other thread
    # keeps pressing until the call has ended) are ignored.
    def on_interrupt(signum: int, frame: object) -> None:
        if not done.is_set():
            done.set()
            raise KeyboardInterrupt

    def other_thread() -> None:  # runs while the main thread waits in Rust
        for _ in range(5):
            ticks.append(time.monotonic())
            time.sleep(0.05)
        # Pressed again until it lands: one press, taken before the call
        # began to wait on a loaded machine, must not fail the test.
        for _ in range(100):
            if done.is_set():
                return
            _thread.interrupt_main()
            time.sleep(0.1)

    previous = signal.signal(signal.SIGINT, on_interrupt)
    try:
        threading.Thread(target=other_thread, daemon=True).start()
        started = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            vtp.Client(f"http://127.0.0.1:{port}", timeout=60).health()
        assert time.monotonic() - started < 15
    finally:
        done.set()
        time.sleep(0.2)
        signal.signal(signal.SIGINT, previous)
    assert len(ticks) == 5, "other Python threads ran: the GIL was released"
    server.close()
    for connection in held:
        connection.close()
