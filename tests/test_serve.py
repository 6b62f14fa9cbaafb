"""`python -m rewards.serve`: its limits (body size, images per request, pixels per image, checked before any pixel is
decoded), its token, its socket timeout and its bounded worker threads, on real sockets of 127.0.0.1."""

from __future__ import annotations

import base64
import http.client
import io
import json
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rewards.base import Scorer, ScoreResult
from rewards.remote import HttpScorer, encode_png
from rewards.serve import Limits, make_server

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "s3cret-token"


class Mean(Scorer):
    """The mean pixel value, in 0..1."""

    name = "mean"

    def score(self, images, prompts, metadata):
        return ScoreResult(images.mean(axis=(1, 2, 3)).astype(np.float32) / 255)


@contextmanager
def serving(limits: Limits = Limits(), token: str | None = None):
    """`make_server(Mean())` serving in a thread on a free port of 127.0.0.1; yields (host, port)."""
    server = make_server(Mean(), limits=limits, token=token)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[:2]
    finally:
        server.shutdown()
        server.server_close()


def post(address, body: bytes, headers: dict | None = None) -> tuple[int, dict]:
    """POST /score: the status and the JSON answer."""
    connection = http.client.HTTPConnection(*address, timeout=10)
    try:
        connection.request("POST", "/score", body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def request(images: list[str], n: int | None = None) -> bytes:
    n = len(images) if n is None else n
    return json.dumps({"images": images, "prompts": ["p"] * n, "metadata": [{}] * n}).encode()


def png_text(width: int, height: int, mode: str = "RGB") -> str:
    """A base64 PNG of zeros of that size (a huge one is small: zeros compress)."""
    buffer = io.BytesIO()
    Image.new(mode, (width, height)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


SMALL = Limits(max_body_bytes=2**20, max_images=4, max_pixels=64 * 64, timeout_s=1.0, workers=2)


def test_a_body_over_the_limit_is_answered_413_unread():
    with serving(SMALL) as address:
        connection = http.client.HTTPConnection(*address, timeout=5)
        connection.putrequest("POST", "/score")
        connection.putheader("Content-Length", str(2**20 + 1))
        connection.endheaders()  # and no body: the answer must not wait for it
        response = connection.getresponse()
        assert response.status == 413
        assert json.loads(response.read())["error"] == (f"Content-Length {2**20 + 1}: a request body of 1..{2**20} "
                                                        f"bytes (--max-body-mib)")
        connection.close()


def test_too_many_images_or_pixels_are_answered_400_naming_the_limit():
    with serving(SMALL) as address:
        assert post(address, request([png_text(8, 8)] * 4))[0] == 200
        assert post(address, request([png_text(8, 8)] * 5)) == (400, {"error": "5 images: at most 4 images per "
                                                                                  "request"})
        assert post(address, request([png_text(8, 8), png_text(65, 64)])) == (
            400, {"error": "image 1 is 65x64 = 4160 pixels: at most 4096 pixels per image"})


def test_the_token_is_required_when_the_server_has_one(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    body = request([encode_png(image) for image in images])
    (tmp_path / "right").write_text(TOKEN + "\n")
    (tmp_path / "wrong").write_text("not-it")
    with serving(SMALL, token=TOKEN) as address:
        for headers in ({}, {"Authorization": "Bearer not-it"}, {"Authorization": TOKEN}):
            status, answer = post(address, body, headers)
            assert status == 401 and "missing or wrong token" in answer["error"]
        status, answer = post(address, body, {"Authorization": f"Bearer {TOKEN}"})
        assert status == 200 and len(answer["scores"]) == 3
        url = f"http://{address[0]}:{address[1]}/score"
        result = HttpScorer(url=url, token_file=str(tmp_path / "right"))(images, ["p"] * 3)
        np.testing.assert_allclose(result.scores, images.mean(axis=(1, 2, 3)) / 255, rtol=1e-6)
        with pytest.raises(RuntimeError, match="HTTP 401: missing or wrong token.*give the server's token in the "
                                               "option token_file"):
            HttpScorer(url=url, token_file=str(tmp_path / "wrong"))(images, ["p"] * 3)
        with pytest.raises(RuntimeError, match="GET .*/score/health answered HTTP 401"):
            HttpScorer.check(url=url)  # the dry run's check of the server sees the missing token too
        HttpScorer.check(url=url, token_file=str(tmp_path / "right"))


def test_a_silent_connection_is_closed_after_the_timeout():
    with serving(SMALL) as address, socket.create_connection(address, timeout=5) as client:
        began = time.monotonic()
        assert client.recv(1024) == b""  # the server closed it (sends nothing: no request was read)
        assert 0.9 <= time.monotonic() - began < 3


def test_connections_beyond_the_workers_wait_for_a_free_one():
    def health_s(address) -> float:
        """Seconds until GET /health is answered."""
        began = time.monotonic()
        connection = http.client.HTTPConnection(*address, timeout=10)
        connection.request("GET", "/health")
        assert connection.getresponse().status == 200
        connection.close()
        return time.monotonic() - began

    for workers, waits in ((1, True), (2, False)):
        limits = Limits(timeout_s=1.0, workers=workers)
        with serving(limits) as address, socket.create_connection(address):  # holds a worker until its timeout
            time.sleep(0.1)
            seconds = health_s(address)
            assert (seconds >= 0.8) == waits, (workers, seconds)


@pytest.fixture(scope="module")
def cli_server(tmp_path_factory):
    """`python -m rewards.serve --token-file ...` with the default limits; yields (url, its process id)."""
    token_file = tmp_path_factory.mktemp("serve") / "token"
    token_file.write_text(TOKEN)
    proc = subprocess.Popen([sys.executable, "-m", "rewards.serve", "--scorer", "jpeg_compressibility", "--port", "0",
                             "--token-file", str(token_file)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert "serving scorer 'jpeg_compressibility' at http://127.0.0.1:" in line, line
    yield line.split(" at ")[1].split()[0], proc.pid
    proc.terminate()
    proc.wait(timeout=10)


def peak_rss_mib(pid: int) -> float:
    """The most resident memory the process has had (VmHWM), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmHWM in /proc/{pid}/status")


def test_a_huge_png_is_refused_from_its_header_without_decoding_it(cli_server):
    url, pid = cli_server
    address = url.split("//")[1].split("/")[0].split(":")
    address = (address[0], int(address[1]))
    headers = {"Authorization": f"Bearer {TOKEN}"}
    before = peak_rss_mib(pid)
    huge = png_text(8000, 8000, mode="1")  # 64 M pixels (192 MiB as RGB) in a few kB
    began = time.monotonic()
    status, answer = post(address, request([huge]), headers)
    assert time.monotonic() - began < 1
    assert (status, answer) == (400, {"error": f"image 0 is 8000x8000 = 64000000 pixels: at most {4096 * 4096} "
                                               f"pixels per image"})
    assert peak_rss_mib(pid) - before < 32, (before, peak_rss_mib(pid))
    assert post(address, request([png_text(16, 16)]), headers)[0] == 200  # the CLI's server scores what fits
    assert post(address, request([png_text(16, 16)]))[0] == 401  # ... with its token only
