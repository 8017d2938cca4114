"""`vtp.Client` over https: the real backend behind a TLS-terminating proxy
(as behind an ingress), with a throwaway CA made by ``trustme``. The
deployment's CA comes from ``ca_cert=`` or ``VTP_CA_CERT``; a certificate
nobody vouched for is refused."""

from __future__ import annotations

import asyncio
import ssl
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import trustme

import vtp
from conftest import CONFIG


class TlsProxy:
    """Terminates TLS with ``context`` on 127.0.0.1 and forwards the bytes
    to ``target`` (host, port) over plain TCP."""

    def __init__(self, context: ssl.SSLContext, target: tuple[str, int]) -> None:
        self._target = target
        self._loop = asyncio.new_event_loop()
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=context)
        )
        self.port: int = self._server.sockets[0].getsockname()[1]
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._target)
        except OSError:
            writer.close()
            return

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, ssl.SSLError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._server.close)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def ca_pem(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tls") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


@pytest.fixture(scope="module")
def https_backend(backend: str, ca: trustme.CA) -> Iterator[str]:
    """The session's backend, reached over https at ``localhost``."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost", "127.0.0.1").configure_cert(context)
    plain = urlsplit(backend)
    proxy = TlsProxy(context, (str(plain.hostname), int(plain.port or 80)))
    yield f"https://localhost:{proxy.port}"
    proxy.close()


def test_the_client_works_over_https_with_the_deployments_ca(
    https_backend: str,
    ca_pem: Path,
    make_token: Callable[[str], str],
    shapes: Path,
    tmp_path: Path,
) -> None:
    client = vtp.Client(
        https_backend, token=make_token(f"tls-{uuid.uuid4().hex[:8]}"), ca_cert=ca_pem
    )
    assert client.health()["status"] == "ok"
    # Streaming upload and download go through TLS too.
    dataset = client.upload_dataset(shapes, name="tls-shapes")
    job = client.create_job(dataset, model="small_cnn", epochs=1, **CONFIG).start()
    job = job.wait(timeout=300)
    assert job.status == "completed", job
    weights = job.download_checkpoint(tmp_path / "model")
    assert weights.name == "best.safetensors" and weights.stat().st_size > 0
    assert [j.id for j in client.jobs()] == [job.id]


def test_the_ca_can_come_from_the_environment(
    https_backend: str,
    ca_pem: Path,
    make_token: Callable[[str], str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("VTP_CA_CERT", str(ca_pem))
    client = vtp.Client(https_backend, token=make_token(f"tls-{uuid.uuid4().hex[:8]}"))
    assert client.jobs() == []


def test_a_certificate_nobody_vouched_for_is_refused(
    https_backend: str, make_token: Callable[[str], str], tmp_path: Path
) -> None:
    token = make_token(f"tls-{uuid.uuid4().hex[:8]}")
    with pytest.raises(vtp.VtpError, match="(?i)certificate"):
        vtp.Client(https_backend, token=token).jobs()
    # Another CA's certificate is no better.
    other = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    with pytest.raises(vtp.VtpError, match="(?i)certificate"):
        vtp.Client(https_backend, token=token, ca_cert=other).jobs()
    # A CA file that is not one is a clear error at once.
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate")
    with pytest.raises(vtp.InvalidInput, match="ca_cert"):
        vtp.Client(https_backend, token=token, ca_cert=junk)
    with pytest.raises(vtp.InvalidInput, match="ca_cert"):
        vtp.Client(https_backend, token=token, ca_cert=tmp_path / "missing.pem")
