"""The `http` scorer against a real `python -m rewards.serve` server, and through the reward service."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from cluster.config import RewardsConfig
import rewards
from rewards.base import RewardInputError, Scorer, ScoreResult, ScorerUnavailable
from rewards.remote import HttpScorer
from rewards.serve import make_server
from rewards.service import RewardError, RewardService

ROOT = Path(__file__).resolve().parents[1]


def group(n: int, seed: int = 0):
    images = np.random.default_rng(seed).integers(0, 256, (n, 24, 20, 3), dtype=np.uint8)
    return images, [f"prompt {i}" for i in range(n)], [{"index": i} for i in range(n)]


@pytest.fixture(scope="module")
def server():
    """`python -m rewards.serve` serving jpeg_compressibility on a free port of 127.0.0.1."""
    proc = subprocess.Popen([sys.executable, "-m", "rewards.serve", "--scorer", "jpeg_compressibility", "--port", "0",
                             "--option", "quality=90"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert "serving scorer 'jpeg_compressibility' at http://127.0.0.1:" in line, line
    yield line.split(" at ")[1].split()[0]  # http://127.0.0.1:PORT/score
    proc.terminate()
    proc.wait(timeout=10)


def test_remote_scores_equal_the_scorer_run_here(server):
    images, prompts, metadata = group(7)
    remote = HttpScorer(url=server, batch_size=3)(images, prompts, metadata)  # 3 requests: 3 + 3 + 1 images
    here = rewards.build("jpeg_compressibility", quality=90)(images, prompts, metadata)
    np.testing.assert_array_equal(remote.scores, here.scores)
    np.testing.assert_array_equal(remote.metrics["jpeg_kb"], here.metrics["jpeg_kb"])


def test_the_server_answers_health_and_refuses_bad_requests(server):
    base = server.rsplit("/", 1)[0]
    with urllib.request.urlopen(f"{base}/health", timeout=10) as r:
        assert json.loads(r.read()) == {"scorer": "jpeg_compressibility"}
    for body, expected in ((b"not json", "not JSON"),
                           (json.dumps({"images": ["aGVsbG8="], "prompts": ["x"]}).encode(), "not base64 PNG"),
                           (json.dumps({"images": [], "prompts": []}).encode(), "at least one image")):
        request = urllib.request.Request(server, data=body, method="POST")
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(request, timeout=10)
        assert e.value.code == 400 and expected in json.loads(e.value.read())["error"]


def test_a_refused_input_is_a_reward_input_error(server):
    images, prompts, _ = group(2)
    with pytest.raises(RewardInputError, match="the server refused the input: 2 images, 1 prompts"):
        HttpScorer(url=server)._post({"images": [rewards.remote.encode_png(i) for i in images], "prompts": prompts[:1]})


def test_a_server_that_is_down_is_unavailable_not_an_error():
    images, prompts, metadata = group(2)
    with pytest.raises(ScorerUnavailable, match="no answer"):
        HttpScorer(url="http://127.0.0.1:9/score", timeout_s=2)(images, prompts, metadata)


def test_options_are_checked():
    with pytest.raises(ValueError, match="url must be http"):
        HttpScorer.check(url="ftp://x")
    with pytest.raises(ValueError, match="batch_size"):
        HttpScorer.check(url="http://127.0.0.1:1/", batch_size=0)


class FailsFirst(Scorer):
    """The mean pixel value; the first call raises (the server answers 500), as a server that is restarting would."""

    name = "fails_first"

    def __init__(self):
        self.calls = 0

    def score(self, images, prompts, metadata):
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("warming up")
        return ScoreResult(images.mean(axis=(1, 2, 3)).astype(np.float32) / 255)


@pytest.fixture
def flaky_server():
    server = make_server(FailsFirst())
    assert server.server_address[0] == "127.0.0.1"  # loopback unless told otherwise
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/score"
    server.shutdown()
    server.server_close()


@pytest.mark.slow
def test_the_reward_service_sends_a_batch_again_when_the_server_fails(ray_local, flaky_server):
    images, prompts, metadata = group(4)
    cfg = RewardsConfig(scorers=[dict(name="http", options={"url": flaky_server, "timeout_s": 10})], num_actors=1,
                        num_cpus_per_actor=0.25, max_retries=2)
    events = []
    service = RewardService(cfg, report=lambda kind, message: events.append((kind, message)))
    try:
        result = service.score(images, prompts, metadata, group_id=1)
        np.testing.assert_allclose(result.scores["http"], images.mean(axis=(1, 2, 3)) / 255, rtol=1e-6)
        assert result.retries == 1 and [kind for kind, _ in events] == ["reward_retry"]
        assert "HTTP 500: RuntimeError: warming up" in events[0][1]
    finally:
        service.shutdown()


@pytest.mark.slow
def test_the_reward_service_fails_the_group_when_the_server_stays_down(ray_local):
    images, prompts, metadata = group(2)
    cfg = RewardsConfig(scorers=[dict(name="http", options={"url": "http://127.0.0.1:9/score", "timeout_s": 2})],
                        num_actors=1, num_cpus_per_actor=0.25, max_retries=1)
    service = RewardService(cfg, report=lambda kind, message: None)
    try:
        with pytest.raises(RewardError, match="failed 2 times; last: .*no answer"):
            service.score(images, prompts, metadata, group_id=2)
    finally:
        service.shutdown()
