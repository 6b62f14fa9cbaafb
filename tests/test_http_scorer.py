"""The `http` scorer against a real `python -m rewards.serve` server, and through the reward service."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from cluster.config import RewardsConfig
from cluster.config_loading import load_config
import rewards
from learner.driver.inputs import InputError
from learner.driver.preflight import check_http_scorers, check_rewards
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
        HttpScorer(url="http://127.0.0.1:9/score", timeout_s=0.5, deadline_s=1)(images, prompts, metadata)


def test_options_are_checked():
    with pytest.raises(ValueError, match="url must be http"):
        HttpScorer.check(url="ftp://x")
    with pytest.raises(ValueError, match="batch_size"):
        HttpScorer.check(url="http://127.0.0.1:1/", batch_size=0)
    with pytest.raises(ValueError, match="url must be http"):
        HttpScorer(url="http:///score")  # no host
    with pytest.raises(ValueError, match=r"timeout_s = 20 \(each request\) must be <= deadline_s = 10"):
        HttpScorer(url="http://127.0.0.1:1/", timeout_s=20, deadline_s=10)


class FailsFirst(Scorer):
    """The mean pixel value; the first `failures` calls raise (the server answers 500), as a server that is restarting
    would."""

    name = "fails_first"

    def __init__(self, failures: int = 1):
        self.calls, self.failures = 0, failures

    def score(self, images, prompts, metadata):
        self.calls += 1
        if self.calls <= self.failures:
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
def test_the_scorer_asks_again_itself_when_the_server_fails_once(ray_local, flaky_server):
    images, prompts, metadata = group(4)
    cfg = RewardsConfig(scorers=[dict(name="http", options={"url": flaky_server, "timeout_s": 10, "deadline_s": 20})],
                        num_actors=1, num_cpus_per_actor=0.25, max_retries=2, timeout_s=30)
    events = []
    service = RewardService(cfg, report=lambda kind, message: events.append((kind, message)))
    try:
        result = service.score(images, prompts, metadata, group_id=1)
        np.testing.assert_allclose(result.scores["http"], images.mean(axis=(1, 2, 3)) / 255, rtol=1e-6)
        assert result.retries == 0 and events == []  # the scorer's backoff hid the 500 from the service
    finally:
        service.shutdown()


@pytest.mark.slow
def test_the_reward_service_fails_the_group_when_the_server_stays_down(ray_local):
    images, prompts, metadata = group(2)
    options = {"url": "http://127.0.0.1:9/score", "timeout_s": 1, "deadline_s": 2}
    cfg = RewardsConfig(scorers=[dict(name="http", options=options)], num_actors=1, num_cpus_per_actor=0.25,
                        max_retries=1)
    service = RewardService(cfg, report=lambda kind, message: None)
    try:
        with pytest.raises(RewardError, match="failed 2 times; last: .*no answer"):
            service.score(images, prompts, metadata, group_id=2)
    finally:
        service.shutdown()


# ---- backoff, deadline, checks of the url ---------------------------------------------------------------------------


def free_port() -> int:
    """A port of 127.0.0.1 that nothing listens on (connections to it are refused)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def serving(scorer: Scorer, port: int = 0, after_s: float = 0.0):
    """`make_server(scorer)` on 127.0.0.1:port, serving from `after_s` seconds on; yields its scoring url."""
    started = threading.Event()
    servers = []

    def serve():
        time.sleep(after_s)
        servers.append(make_server(scorer, port=port))
        started.set()
        servers[0].serve_forever()

    threading.Thread(target=serve, daemon=True).start()
    if after_s == 0:
        started.wait(10)
    try:
        yield f"http://127.0.0.1:{port or servers[0].server_address[1]}/score"
    finally:
        started.wait(10)
        servers[0].shutdown()
        servers[0].server_close()


def test_the_scorer_backs_off_exponentially_while_the_server_answers_500():
    images, prompts, metadata = group(3)
    scorer = FailsFirst(failures=2)
    with serving(scorer) as url:
        began = time.monotonic()
        result = HttpScorer(url=url, timeout_s=5, deadline_s=10)(images, prompts, metadata)
        elapsed = time.monotonic() - began
    np.testing.assert_allclose(result.scores, images.mean(axis=(1, 2, 3)) / 255, rtol=1e-6)
    assert scorer.calls == 3
    assert 1.5 <= elapsed < 4, elapsed  # waited 0.5 s, then 1 s: doubling, not at once, not 0.5 s twice


def test_the_scorer_backs_off_while_connections_are_refused():
    images, prompts, metadata = group(2)
    port = free_port()
    with serving(FailsFirst(failures=0), port=port, after_s=1.0) as url:  # refuses until 1 s
        began = time.monotonic()
        result = HttpScorer(url=url, timeout_s=5, deadline_s=10)(images, prompts, metadata)
        elapsed = time.monotonic() - began
    np.testing.assert_allclose(result.scores, images.mean(axis=(1, 2, 3)) / 255, rtol=1e-6)
    assert 1.5 <= elapsed < 4, elapsed  # refused at 0 s and 0.5 s, answered at 1.5 s


def test_a_server_that_never_answers_is_one_error_within_the_deadline():
    images, prompts, metadata = group(2)
    with socket.socket() as silent:  # accepts connections (the kernel's queue) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/score"
        began = time.monotonic()
        with pytest.raises(ScorerUnavailable) as e:
            HttpScorer(url=url, timeout_s=0.4, deadline_s=1.5)(images, prompts, metadata)
        elapsed = time.monotonic() - began
    # tries at 0 s and 0.9 s (0.4 s each, 0.5 s apart); the next one (1 s later) would end past the deadline
    assert str(e.value).startswith(f"http scorer at {url}: no answer within deadline_s = 1.5 s (2 tries over 1.")
    assert "timed out" in str(e.value)
    assert 1.2 <= elapsed < 1.75, elapsed  # 1.3 s; the slack is for a busy machine


def test_check_names_a_url_where_no_server_answers(server):
    HttpScorer.check(url=server)  # the server answers its health check
    url = f"http://127.0.0.1:{free_port()}/score"
    with pytest.raises(ScorerUnavailable, match=f"url '{url}': no server answers there .*refused"):
        HttpScorer.check(url=url)


def tiny_job(scorer: str):
    return load_config(ROOT / "cluster/tiny.yaml", [f"rewards.scorers=[{scorer}]"])


def test_the_preflight_refuses_a_malformed_url_and_reports_one_no_server_answers():
    for url in ("ftp://127.0.0.1/score", "http:///score", "127.0.0.1:8765/score", "http://127.0.0.1:99999/score"):
        cfg = tiny_job(f"{{name: http, options: {{url: '{url}', deadline_s: 50}}}}")
        for check in (check_rewards, check_http_scorers):  # on the node; anywhere (a job joining a cluster)
            with pytest.raises(InputError, match=f"rewards.scorers.0.options: http: url .*{url}"):
                check(cfg, "none")
    url = f"http://127.0.0.1:{free_port()}/score"
    cfg = tiny_job(f"{{name: http, options: {{url: '{url}', deadline_s: 50}}}}")
    check_http_scorers(cfg, "none")  # well formed: only where the actors run is the server asked
    with pytest.raises(InputError, match=f"rewards.scorers.0.options: http: url '{url}': no server answers there"):
        check_rewards(cfg, "none")


def test_the_preflight_refuses_a_deadline_the_reward_service_would_cut(server):
    cfg = tiny_job(f"{{name: http, options: {{url: '{server}'}}}}")  # deadline_s 90, rewards.timeout_s 60
    with pytest.raises(InputError, match=r"rewards.scorers.0.options.deadline_s = 90: must be < rewards.timeout_s = "
                                         r"60, after which the reward service kills the call"):
        check_http_scorers(cfg, "none")
    check_http_scorers(tiny_job(f"{{name: http, options: {{url: '{server}', deadline_s: 59}}}}"), "none")
